"""LINA's bidirectional linear attention as one Pallas GPU kernel (Triton backend), forward only.

    o_i = phi(q_i) . (mean_n k~_n v~_n^T) / (phi(q_i) . mean_n k~_n + 1e-6)   (see lina/attention.py)

Why a kernel: written as XLA einsums the operator takes separate passes for phi, the gates, the
two contractions (with layout transposes around them) and the division; at LINA's 256 px shapes
that made it 1.4-2.8x slower than cuDNN softmax attention, and the whole sampler slower than the
softmax variant at d48w1536 (BENCHMARKS.md). Here one program per (batch, head) reads k and v once
to build kv [D, D] and sum k [D] in registers, then reads q once and writes o: two reads of the
inputs' bytes and one write, nothing else in HBM.

Status: opt-in (``lina_attention(..., impl="pallas")``). Measured on the H100 it is SLOWER than
the XLA form: fwd 1.10 / 1.15 / 2.62 ms at (B, N, H, D) = (32, 320, 16, 96) / (8, 1280) /
(2, 5120) vs XLA 0.64 / 0.59 / 0.64 ms. One program per (batch, head) walks N serially through
small [64, 32] tiles (latency-bound; only B*H programs, 32 at the 1024 px shape). Next steps:
split the kv accumulation over N blocks (a second pass sums them) and the output over column
pieces, so the grid has B*H*(N/64) programs.

Layout: any head dim D that is a multiple of 16. Triton tiles must be powers of two, so D is cut
into P pieces of ``piece`` columns (96 = 3 x 32) and kv is held as P x P tiles. N is walked in
blocks of ``block_n`` rows (padded up with masked-out rows when it does not divide).

Precision: float32 everywhere as LINA; the contractions run as three bf16 tensor-core passes on
hi / lo splits of their float32 operands (``kernels.lasad.pallas._sdot``; relative error ~1e-6,
tested against float64), since Triton's IEEE float32 dots run without tensor cores.

Gradients: ``lina_pallas`` is a ``jax.custom_vjp`` whose backward differentiates the XLA form
(recomputing it); the kernel is for inference and for forward-heavy work such as sampling.
The same body runs under ``interpret=True`` on CPU, which is how CI tests it.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from kernels.lasad.pallas import _sdot

F32 = jnp.float32
EPS = 1e-6


def piece_size(d):
  """Largest power of two <= 64 dividing d (>= 16 for tensor-core dots), else None."""
  for p in (64, 32, 16):
    if d % p == 0:
      return p
  return None


def _kernel(q_ref, k_ref, v_ref, ks_ref, vs_ref, m_ref, o_ref, *, n, d, piece, block_n):
  parts = d // piece
  nb = n // block_n

  def load(ref, i, a):
    return ref[pl.ds(i * block_n, block_n), pl.ds(a * piece, piece)].astype(F32)

  def phi(x):
    return jnp.maximum(x, 0.0) + EPS

  def dot(a, b, **kw):
    return _sdot(a, b, jnp.bfloat16, True, **kw)

  def accumulate(i, carry):
    kv, ksum, cnt = carry
    rows = pl.ds(i * block_n, block_n)
    m = m_ref[rows].astype(F32)
    wk = (ks_ref[rows].astype(F32) * m)[:, None]
    wv = vs_ref[rows].astype(F32)[:, None]
    kp = [phi(load(k_ref, i, a)) * wk for a in range(parts)]
    vp = [load(v_ref, i, c) * wv for c in range(parts)]
    kv = [[kv[a][c] + dot(kp[a], vp[c], trans_a=True) for c in range(parts)]
          for a in range(parts)]
    ksum = [ksum[a] + jnp.sum(kp[a], axis=0) for a in range(parts)]
    return kv, ksum, cnt + jnp.sum(m)

  zero = jnp.zeros((piece, piece), F32)
  init = ([[zero] * parts for _ in range(parts)], [jnp.zeros((piece,), F32)] * parts,
          jnp.zeros((), F32))
  kv, ksum, cnt = lax.fori_loop(0, nb, accumulate, init)
  inv = 1.0 / jnp.maximum(cnt, 1.0)
  kv = [[t * inv for t in row] for row in kv]
  kmean = [s * inv for s in ksum]

  def emit(i, _):
    rows = pl.ds(i * block_n, block_n)
    qp = [phi(load(q_ref, i, a)) for a in range(parts)]
    den = sum(jnp.sum(qp[a] * kmean[a][None, :], axis=1) for a in range(parts)) + EPS
    for c in range(parts):
      num = sum(dot(qp[a], kv[a][c]) for a in range(parts))
      o_ref[rows, pl.ds(c * piece, piece)] = (num / den[:, None]).astype(o_ref.dtype)
    return 0

  lax.fori_loop(0, nb, emit, 0)


@functools.partial(jax.jit, static_argnames=("fused", "block_n", "num_warps", "interpret"))
def lina_forward(q, k, v, key_scale, value_scale, mask, *, fused=False, block_n=64, num_warps=4,
                 interpret=False):
  """The kernel. Either q, k, v [B, N, H, D] or (``fused=True``) q = qkv [B, N, 3, H, D] with k, v
  None; key_scale, value_scale [H, N], mask [B, N] float32 (ones where unused). -> [B, N, H, D] f32."""
  if fused:
    b, n, _, h, d = q.shape
  else:
    b, n, h, d = q.shape
  piece = piece_size(d)
  if piece is None:
    raise ValueError(f"the LINA Pallas kernel needs a head dim that is a multiple of 16, got {d}; "
                     f"use impl='xla'.")
  pad = -n % block_n
  if pad:
    npad = lambda x, axis, value=0.0: jnp.pad(
        x, [(0, pad) if i == axis else (0, 0) for i in range(x.ndim)], constant_values=value)
    q = npad(q, 1)
    if not fused:
      k, v = npad(k, 1), npad(v, 1)
    key_scale, value_scale = npad(key_scale, 1, 1.0), npad(value_scale, 1, 1.0)
    mask = npad(mask, 1)
  t = n + pad
  if fused:
    specs = [pl.BlockSpec((None, t, None, None, d), lambda i, j, s=s: (i, 0, s, j, 0))
             for s in range(3)]
    args = (q, q, q)
  else:
    specs = [pl.BlockSpec((None, t, None, d), lambda i, j: (i, 0, j, 0))] * 3
    args = (q, k, v)
  row_h = pl.BlockSpec((None, t), lambda i, j: (j, 0))
  row_b = pl.BlockSpec((None, t), lambda i, j: (i, 0))
  kern = functools.partial(_kernel, n=t, d=d, piece=piece, block_n=block_n)
  out = pl.pallas_call(
      kern, grid=(b, h),
      in_specs=specs + [row_h, row_h, row_b],
      out_specs=pl.BlockSpec((None, t, None, d), lambda i, j: (i, 0, j, 0)),
      out_shape=jax.ShapeDtypeStruct((b, t, h, d), F32),
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
      interpret=interpret, name="lina_attention",
  )(*args, key_scale.astype(F32), value_scale.astype(F32), mask.astype(F32))
  return out[:, :n] if pad else out
