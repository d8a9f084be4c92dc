"""Residual add + RMSNorm as one pass each way (Pallas GPU, Triton backend), under custom_vjp.

    y = x + d_1 + ... + d_n        (float32, added in that order)
    h = (y * rsqrt(mean(y^2) + eps) * w).astype(out_dtype)

Both outputs are used by a transformer block: y is the residual stream, h the next matmuls'
operand. XLA computes this as an add pass and a norm pass forward, and backward as a reduction
pass, an elementwise pass and a conversion of the residual gradient to bf16 (each re-reading the
rows: LASADGen-L's training step spent ~1.6 ms per layer in them on an H100, BENCHMARKS.md session
13). Here each direction reads its rows once:

  forward   x [M, D] f32, d_i [M, D] -> y f32, h
  backward  x, d_i, gy (f32), gh -> gx = gy + dRMSNorm(gh) (f32), gd = gx in the d_i dtype,
            dw (per-program partial sums, added up in XLA)

With ``copies=n`` h is returned n times (one buffer), one per consuming matmul, and the backward
kernel reads the n gradients gh_1..gh_n and adds them itself (no XLA pass summing them first):
LASADGen-L's step 347.6 -> 343.5 ms on one H100 (session 22).

The backward recomputes y from x and the d_i (its residuals are the inputs), or with
``save_output`` reads y itself; either way a remat policy that keeps those values does not rerun
the forward kernel (the rematerialised jaxpr still holds a dead copy of the forward call, because
pallas_call's DCE rule keeps every call, and it lists its inputs as saved; XLA drops the dead
call: LASADGen-L's profile shows one forward kernel per op and step, and peak memory did not grow).

LASADGen-L training on one H100 (batch 256, remat dots_attn_acts, unrolled): 361.8 -> 354.2 ms per
step; the kernels move 2.8 TB/s forward (BENCHMARKS.md, session 21).

``add_rms_reference`` is the same math in jnp (the model's path on CPU and for dims the kernel
does not take). The kernels run compiled on a GPU and in the Pallas interpreter elsewhere.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.ad_checkpoint import checkpoint_name
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

F32 = jnp.float32
MODES = ("auto", "pallas", "xla")   # config.fused_norm (lasad_jax.model.add_rms_impl)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  rows: int = 2          # rows per step (a power of two); a step's tiles are [rows, D]
  steps: int = 32        # steps per program: the backward's dw partials are [M / (rows*steps), D]
  num_warps: int = 4


def rms_norm(x, w, eps):
  """RMSNorm in float32 (LASADGen's, LlamaGen's): x / sqrt(mean(x^2) + eps) * w."""
  x32 = x.astype(F32)
  return x32 * lax.rsqrt(jnp.mean(x32 * x32, -1, keepdims=True) + eps) * w


def _check_copies(copies):
  if not isinstance(copies, int) or copies < 1:
    raise ValueError(f"add_rms: copies must be an int >= 1 (h once per consumer), got {copies!r}")


def add_rms_reference(x, deltas, w, eps, out_dtype, save_output=None, copies=1):
  """(y, h) in jnp: ``rms_norm`` after the residual adds. ``save_output``: a ``checkpoint_name``
  for y, which the norm's gradient then reads (see ``add_rms_pallas``). ``copies`` > 1 returns
  (y, (h,) * copies), as ``add_rms_pallas`` does (here they are one value)."""
  _check_copies(copies)
  y = x.astype(F32)
  for d in deltas:
    y = y + d.astype(F32)
  if save_output is not None:
    y = checkpoint_name(y, save_output)
  h = rms_norm(y, w, eps).astype(out_dtype)
  return (y, h) if copies == 1 else (y, (h,) * copies)


def column_block(dim):
  """The largest power of two <= 1024 dividing ``dim`` (Triton tiles are powers of two), or None
  when that is below 64 (the kernel would loop over too many tiny column blocks)."""
  cb = 1
  while dim % (2 * cb) == 0 and 2 * cb <= 1024:
    cb *= 2
  return cb if cb >= 64 else None


def supported(dim):
  return column_block(dim) is not None


# --------------------------------------------------------------------------- kernels
def _cols(dim):
  cb = column_block(dim)
  return [pl.ds(c * cb, cb) for c in range(dim // cb)]


def _load_y(x_ref, d_refs, rows, cols):
  """y of the step's rows, one [r, cb] float32 tile per column block."""
  ys = []
  for c in cols:
    y = x_ref[rows, c].astype(F32)
    for d in d_refs:
      y = y + d[rows, c].astype(F32)
    ys.append(y)
  return ys


def _inv_rms(ys, dim, eps):
  ss = sum(jnp.sum(y * y, axis=1, keepdims=True) for y in ys)
  return lax.rsqrt(ss / dim + eps)


def _fwd_kernel(x_ref, *refs, n_d, dim, eps, bs):
  d_refs, (w_ref, y_ref, h_ref) = refs[:n_d], refs[n_d:]
  cols = _cols(dim)

  def step(j, carry):
    rows = pl.ds(j * bs.rows, bs.rows)
    ys = _load_y(x_ref, d_refs, rows, cols)
    r = _inv_rms(ys, dim, eps)
    for c, y in zip(cols, ys):
      y_ref[rows, c] = y
      h_ref[rows, c] = (y * r * w_ref[:, c].astype(F32)).astype(h_ref.dtype)
    return carry

  lax.fori_loop(0, bs.steps, step, 0)


def _bwd_kernel(x_ref, *refs, n_d, n_h, dim, eps, bs):
  d_refs = refs[:n_d]
  w_ref, gy_ref = refs[n_d:n_d + 2]
  gh_refs = refs[n_d + 2:n_d + 2 + n_h]
  gx_ref, gd_ref, dw_ref = refs[n_d + 2 + n_h:]
  cols = _cols(dim)

  def step(j, dws):
    rows = pl.ds(j * bs.rows, bs.rows)
    ys = _load_y(x_ref, d_refs, rows, cols)
    r = _inv_rms(ys, dim, eps)
    ns = [y * r for y in ys]
    ghs = [sum(g[rows, c].astype(F32) for g in gh_refs) for c in cols]   # h's copies' parts
    gns = [gh * w_ref[:, c].astype(F32) for gh, c in zip(ghs, cols)]
    m = sum(jnp.sum(gn * n, axis=1, keepdims=True) for gn, n in zip(gns, ns)) / dim
    out = []
    for c, n, gn, gh, dw in zip(cols, ns, gns, ghs, dws):
      gx = gy_ref[rows, c] + r * (gn - n * m)
      gx_ref[rows, c] = gx
      gd_ref[rows, c] = gx.astype(gd_ref.dtype)
      out.append(dw + jnp.sum(gh * n, axis=0, keepdims=True))
    return tuple(out)

  cb = column_block(dim)
  init = tuple(jnp.zeros((1, cb), F32) for _ in cols)
  dws = lax.fori_loop(0, bs.steps, step, init)
  for c, dw in zip(cols, dws):
    dw_ref[:, c] = dw


# --------------------------------------------------------------------------- calls
def _block(bs):
  return bs.rows * bs.steps


def _specs(n, dim, bs):
  return [pl.BlockSpec((_block(bs), dim), lambda i: (i, 0)) for _ in range(n)]


def _w_spec(dim):
  return pl.BlockSpec((1, dim), lambda i: (0, 0))


def _params(bs):
  return plgpu.CompilerParams(num_warps=bs.num_warps, num_stages=1)


def _fwd_call(x, deltas, w, eps, out_dtype, bs, interpret):
  m, dim = x.shape
  kern = functools.partial(_fwd_kernel, n_d=len(deltas), dim=dim, eps=eps, bs=bs)
  return pl.pallas_call(
      kern, grid=(m // _block(bs),),
      in_specs=_specs(1 + len(deltas), dim, bs) + [_w_spec(dim)],
      out_specs=_specs(2, dim, bs),
      out_shape=[jax.ShapeDtypeStruct((m, dim), F32), jax.ShapeDtypeStruct((m, dim), out_dtype)],
      compiler_params=_params(bs), interpret=interpret, name="add_rms_forward",
  )(x, *deltas, w)


def _bwd_call(x, deltas, w, gy, ghs, eps, gd_dtype, bs, interpret):
  m, dim = x.shape
  g = m // _block(bs)
  kern = functools.partial(_bwd_kernel, n_d=len(deltas), n_h=len(ghs), dim=dim, eps=eps, bs=bs)
  gx, gd, dw = pl.pallas_call(
      kern, grid=(g,),
      in_specs=_specs(1 + len(deltas), dim, bs) + [_w_spec(dim)] + _specs(1 + len(ghs), dim, bs),
      out_specs=_specs(2, dim, bs) + [pl.BlockSpec((1, dim), lambda i: (i, 0))],
      out_shape=[jax.ShapeDtypeStruct((m, dim), F32), jax.ShapeDtypeStruct((m, dim), gd_dtype),
                 jax.ShapeDtypeStruct((g, dim), F32)],
      compiler_params=_params(bs), interpret=interpret, name="add_rms_backward",
  )(x, *deltas, w, gy, *ghs)
  return gx, gd, jnp.sum(dw, axis=0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6, 7, 8, 9))
def _add_rms(x, deltas, w, eps, out_dtype, bs, interpret, save_output, d_spec, copies):
  y, h = _fwd_call(x, deltas, w, eps, out_dtype, bs, interpret)
  return y, (h,) * copies


def _add_rms_fwd(x, deltas, w, eps, out_dtype, bs, interpret, save_output, d_spec, copies):
  y, h = _fwd_call(x, deltas, w, eps, out_dtype, bs, interpret)
  if save_output is None:
    return (y, (h,) * copies), (x, deltas, w)
  y = checkpoint_name(y, save_output)   # the residual itself, so a remat policy can keep it
  return (y, (h,) * copies), (y, (), w)


def _add_rms_bwd(eps, out_dtype, bs, interpret, save_output, d_spec, copies, res, cts):
  """d_spec: (number of deltas, their dtype). With ``save_output`` the residuals are (y, (), w) and
  the kernel reads y as its x with no deltas. h's copies' cotangents go in separately and the
  kernel adds them as it reads them (no XLA pass that sums them first)."""
  x, deltas, w = res
  gy, ghs = cts
  gx, gd, dw = _bwd_call(x, deltas, w, gy.astype(F32), [g.astype(out_dtype) for g in ghs], eps,
                         d_spec[1], bs, interpret)
  return gx.astype(x.dtype), (gd,) * d_spec[0], dw.reshape(w.shape).astype(w.dtype)


_add_rms.defvjp(_add_rms_fwd, _add_rms_bwd)


def add_rms_pallas(x, deltas, w, eps, out_dtype, save_output=None, copies=1, *,
                   block_sizes=BlockSizes(), interpret=None):
  """``add_rms_reference`` by the kernels. x [..., D] float32, deltas: arrays of x's shape (one
  dtype, at least one), w [D]. Returns (y [..., D] float32, h [..., D] out_dtype), or with
  ``copies`` = n > 1 (y, (h,) * n).

  ``copies``: give h to each of its n consumers (e.g. the q, f, v projections) as its own output.
  They are one buffer (nothing is copied), but their gradients reach the backward kernel
  separately and it adds them while it reads them; with one h, XLA first sums the n matmul
  gradients in a pass of its own (LASADGen-L on an H100: 175 us per layer for three, 128 us for
  two, session 21's profile).

  The gradient kernel needs y. By default it recomputes y from x and the deltas (its residuals
  are the inputs). With ``save_output`` (a ``checkpoint_name``) it reads y itself, named so: use it
  where y is kept anyway (a block's output, which the next block keeps as its input) and the
  deltas would otherwise be kept only for this (under a remat policy that saves the name)."""
  deltas = tuple(deltas)
  if not deltas:
    raise ValueError("add_rms_pallas: give at least one delta (for a plain RMSNorm use jnp)")
  dim = x.shape[-1]
  if x.dtype != F32:
    raise ValueError(f"add_rms_pallas: x must be float32 (the residual stream), got {x.dtype}")
  for i, d in enumerate(deltas):
    if d.shape != x.shape:
      raise ValueError(f"add_rms_pallas: deltas[{i}] has shape {d.shape}, x has {x.shape}")
    if d.dtype != deltas[0].dtype:
      raise ValueError(f"add_rms_pallas: deltas must share one dtype, got {d.dtype} and "
                       f"{deltas[0].dtype}")
  if w.shape != (dim,):
    raise ValueError(f"add_rms_pallas: w must have shape ({dim},), got {w.shape}")
  if not supported(dim):
    raise ValueError(f"add_rms_pallas: the last dim {dim} needs a power-of-two divisor >= 64; "
                     f"use add_rms_reference")
  _check_copies(copies)
  bs = block_sizes
  if bs.rows < 1 or bs.rows & (bs.rows - 1) or bs.steps < 1:
    raise ValueError(f"add_rms_pallas: BlockSizes.rows must be a power of two and steps >= 1, "
                     f"got {bs}")
  interpret = jax.default_backend() != "gpu" if interpret is None else interpret
  lead = x.shape[:-1]
  m = int(x.size // dim)
  pad = -m % _block(bs)
  flat = [a.reshape(m, dim) for a in (x,) + deltas]
  if pad:   # zero rows: finite (y = 0, rsqrt(eps)), and their gh = 0 adds nothing to dw
    flat = [jnp.pad(a, ((0, pad), (0, 0))) for a in flat]
  y, hs = _add_rms(flat[0], tuple(flat[1:]), w.reshape(1, dim), float(eps), jnp.dtype(out_dtype),
                   bs, interpret, save_output, (len(deltas), jnp.dtype(deltas[0].dtype)),
                   1 if pad else copies)
  if pad:   # padded rows are sliced off one h, and the copies made after that (one h, as above)
    y, hs = y[:m], (hs[0][:m],) * copies
  y, hs = y.reshape(lead + (dim,)), tuple(h.reshape(lead + (dim,)) for h in hs)
  return (y, hs[0]) if copies == 1 else (y, hs)
