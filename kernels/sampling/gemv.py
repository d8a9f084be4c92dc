"""The sampler's skinny matmuls with their neighbours fused in: one Pallas (Triton) kernel each.

A decode step multiplies M = 2 x images rows (CFG pairs; 16 for 8 images) by every weight of
every layer. XLA runs each layer as ten kernels (BENCHMARKS.md, session 5 profile): four split-K
GEMMs, the LASAD decode kernel, and five small fusions (split-K sums, residual adds, two RMSNorms,
``silu(a) * b``) of ~1.5-2 us each, mostly fixed cost. Here each matmul takes its neighbours:

  prologue  ``norm``:     RMSNorm of a float32 input row, weight ``norm`` (the sum of squares is
                          accumulated in the same K loop as the dot; rows scaled after the dot)
  epilogue  ``w3``:       SwiGLU, ``silu(x W1) * (x W3)`` from two weights in one program
            ``residual``: ``residual + x W`` in float32 (the residual stream)

so a layer is five kernels: ``norm -> [q|f|v]``, the decode kernel, ``wo + residual``,
``norm -> w1, w3 -> SwiGLU``, ``w2 + residual``. No split-K (its partial sums would be another
kernel): the grid is N / block_n programs, each streaming whole contiguous rows of a weight
stored transposed, ``[N, K]`` (``transpose_weights`` once per sampling call).

Numerics. With ``norm`` the kernel rounds ``x * norm`` (not ``x * rsqrt(mean x^2) * norm``) to the
compute dtype and scales each output row by the float32 ``rsqrt(mean x^2 + eps)`` afterwards:
the same product up to where the per-row scalar is applied (bit-equal in float32 up to
reassociation). Outputs are rounded once, at the end (XLA's path rounds the matmul result before
the SwiGLU and the residual add), so this is at least as accurate. ``interpret=None`` runs
compiled on a GPU and in the Pallas interpreter elsewhere (how CI tests it).
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

F32 = jnp.float32


# Per-role defaults (LASADGen-L shapes on an H100: BENCHMARKS.md, session 12,
# ``benchmarks/decode_gemm.py --fused``).
DEFAULT_BLOCKS = {
    "in": (32, 256, 4, 4),      # norm -> [q|f|v]     [1024 -> 3072]
    "out": (16, 256, 4, 4),     # wo + residual       [1024 -> 1024]
    "w13": (32, 256, 4, 4),     # norm -> SwiGLU      [1024 -> 2 x 2816]
    "w2": (16, 256, 4, 4),      # w2 + residual       [2816 -> 1024]
    "head": (64, 256, 4, 4),    # norm -> logits      [1024 -> 16384]
}


def _pow2_at_least(n, lo):
  p = lo
  while p < n:
    p *= 2
  return p


def _fit(n, block):
  """Largest power of two <= block dividing n (>= 16), or None."""
  b = block
  while b >= 16 and n % b:
    b //= 2
  return b if b >= 16 else None


def _kernel(*refs, n_k, bk, has_norm, has_w3, has_res, eps, k_total, cdt, precision):
  it = iter(refs)
  x_ref, w_ref = next(it), next(it)
  w3_ref = next(it) if has_w3 else None
  nw_ref = next(it) if has_norm else None
  r_ref = next(it) if has_res else None
  o_ref = next(it)
  m, bn = o_ref.shape
  dims = (((1,), (1,)), ((), ()))

  def body(i, carry):
    acc, acc3, ss = carry
    ks = pl.ds(pl.multiple_of(i * bk, bk), bk)
    x = x_ref[:, ks]
    if has_norm:
      x = x.astype(F32)
      ss = ss + jnp.sum(x * x, axis=1)
      x = x * nw_ref[ks][None, :]
    x = x.astype(cdt)
    acc = acc + jax.lax.dot_general(x, w_ref[:, ks], dims, precision=precision,
                                    preferred_element_type=F32)
    if has_w3:
      acc3 = acc3 + jax.lax.dot_general(x, w3_ref[:, ks], dims, precision=precision,
                                        preferred_element_type=F32)
    return acc, acc3, ss

  zero = jnp.zeros((m, bn), F32)
  acc, acc3, ss = jax.lax.fori_loop(0, n_k, body, (zero, zero if has_w3 else jnp.zeros((), F32),
                                                   jnp.zeros((m,), F32)))
  if has_norm:
    r = jax.lax.rsqrt(ss / k_total + eps)[:, None]
    acc = acc * r
    if has_w3:
      acc3 = acc3 * r
  if has_w3:
    acc = acc * jax.nn.sigmoid(acc) * acc3
  if has_res:
    acc = r_ref[...] + acc
  o_ref[...] = acc.astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("eps", "blocks", "out_dtype", "interpret"))
def fused_matmul(x, w_t, *, w3_t=None, norm=None, residual=None, eps=1e-5, blocks=None,
                 out_dtype=None, interpret=None):
  """``epilogue(prologue(x) @ w_t.T)`` in one kernel.

  x [M, K]: float32 when ``norm`` is given (the residual stream), else the compute dtype.
  w_t [N, K]: the weight transposed (its dtype is the compute dtype); w3_t [N, K] the SwiGLU's
  second weight. norm [K]: RMSNorm weight (then x's rows are normalised first, eps ``eps``).
  residual [M, N] float32: added to the result. blocks: (block_n, block_k, num_warps,
  num_stages), clipped to the shapes. Returns [M, N] in ``out_dtype`` (default: float32 with a
  residual, else w_t's dtype).
  """
  if interpret is None:
    interpret = jax.default_backend() != "gpu"
  m, k = x.shape
  n = w_t.shape[0]
  if w_t.ndim != 2 or w_t.shape[1] != k:
    raise ValueError(f"fused_matmul: w_t must be [N, K={k}] (the weight transposed), got "
                     f"{w_t.shape}")
  if w3_t is not None and w3_t.shape != w_t.shape:
    raise ValueError(f"fused_matmul: w3_t must match w_t {w_t.shape}, got {w3_t.shape}")
  if norm is not None and norm.shape != (k,):
    raise ValueError(f"fused_matmul: norm must be [K={k}], got {norm.shape}")
  if residual is not None and residual.shape != (m, n):
    raise ValueError(f"fused_matmul: residual must be [M, N] = {(m, n)}, got {residual.shape}")
  bn, bk, warps, stages = blocks or DEFAULT_BLOCKS["in"]
  bn, bk = _fit(n, bn), _fit(k, bk)
  if bn is None or bk is None:
    raise ValueError(f"fused_matmul: N={n} and K={k} must be multiples of 16")
  cdt = w_t.dtype
  out_dtype = jnp.dtype(out_dtype or (F32 if residual is not None else cdt))
  mp = _pow2_at_least(m, 16)           # Triton tiles: power-of-two rows, >= 16 for the dot
  if mp != m:
    x = jnp.pad(x, ((0, mp - m), (0, 0)))
    residual = None if residual is None else jnp.pad(residual, ((0, mp - m), (0, 0)))
  x = x.astype(F32 if norm is not None else cdt)
  full_w = pl.BlockSpec((bn, k), lambda j: (j, 0))
  args, specs = [x, w_t], [pl.BlockSpec((mp, k), lambda j: (0, 0)), full_w]
  if w3_t is not None:
    args.append(w3_t), specs.append(full_w)
  if norm is not None:
    args.append(norm.astype(F32)), specs.append(pl.BlockSpec((k,), lambda j: (0,)))
  if residual is not None:
    args.append(residual.astype(F32)), specs.append(pl.BlockSpec((mp, bn), lambda j: (0, j)))
  precision = jax.lax.Precision.HIGHEST if cdt == jnp.float32 else None
  out = pl.pallas_call(
      functools.partial(_kernel, n_k=k // bk, bk=bk, has_norm=norm is not None,
                        has_w3=w3_t is not None, has_res=residual is not None, eps=eps,
                        k_total=k, cdt=cdt, precision=precision),
      grid=(n // bn,), in_specs=specs,
      out_specs=pl.BlockSpec((mp, bn), lambda j: (0, j)),
      out_shape=jax.ShapeDtypeStruct((mp, n), out_dtype),
      compiler_params=plgpu.CompilerParams(num_warps=warps, num_stages=stages),
      interpret=interpret, name="fused_matmul")(*args)
  return out if mp == m else out[:m]
