"""LINA's bidirectional linear attention as one Pallas GPU kernel (Triton backend), forward only.

    o_i = phi(q_i) . (mean_n k~_n v~_n^T) / (phi(q_i) . mean_n k~_n + 1e-6)   (see lina/attention.py)

For bfloat16 q, k, v (what LINA's autocast Linear produces). With phi(x) = relu(x) + eps, relu of
a bf16 number is a bf16 number, and the float32 operand of each contraction is cut into three bf16
pieces (24 mantissa bits), so both contractions run as bf16 tensor-core dots with float32
accumulation and exact products: float32 accuracy (tested against float64) at tensor-core speed.
Writing a_n = mask_n key_scale_n value_scale_n / count and u_n = a_n v_n (float32):

    kv    = relu(k)^T u + eps U,                       U = sum_n u_n
    num_i = relu(q_i) . R + eps (U |relu(q_i)|_1 + colsum(R) + K eps U),   R = relu(k)^T u
    den_i = relu(q_i) . S + eps (A |relu(q_i)|_1 + sum(S) + K eps A) + eps

with S = relu(k)^T (a_n / value_scale_n) and A its weight sum (the key mean). Grid (B, H, D/piece):
each program owns one ``piece``-column slice of the values, walks N once to build R[:, slice] and S
in registers, then walks N again to write o[:, slice]. q, k, v are read from the fused
[B, N, 3, H, D] projection (or separate arrays) in place: no transposes, no float32 copies, and the
output is written in the caller's dtype (bf16 for the model).

Triton tiles must be powers of two, so D is cut into P pieces of ``piece`` columns (96 = 3 x 32);
N is walked in blocks of ``block_n`` rows (the wrapper pads N up with zero-weight rows when it does
not divide). The same body runs under ``interpret=True`` on CPU, which is how CI tests it.

Gradients: the custom_vjp in ``lasad_jax/lina/attention.py`` differentiates the float32 XLA form.
Status (H100, BENCHMARKS.md session 6): the model's default on a GPU up to 2048 tokens, where it
beats the XLA float32 form (fwd 0.46 vs 0.60 ms at (32, 320, 16, 96) with 2 warps) and makes LINA's
sampler 1-2% faster than the softmax variant at 256 px; at (2, 5120) XLA's form is faster (0.66 vs
0.83 ms), so the model uses that there. A first version (session 4: one program per (batch, head),
float32 operands split on both sides) was 1.6-6.6x slower than XLA and was replaced by this one.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

F32 = jnp.float32
BF16 = jnp.bfloat16
EPS = 1e-6
TERMS = 3


def piece_size(d):
  """Largest power of two <= 64 dividing d (>= 16 for tensor-core dots), else None."""
  for p in (64, 32, 16):
    if d % p == 0:
      return p
  return None


def _terms(x):
  """float32 x as TERMS bf16 pieces whose float32 sum is x to 8 * TERMS bits."""
  out = []
  for _ in range(TERMS):
    hi = x.astype(BF16)
    out.append(hi)
    x = x - hi.astype(F32)
  return out


def _dot(a, b, trans_a=False):
  dims = (((0 if trans_a else 1,), (0,)), ((), ()))
  return lax.dot_general(a, b, dims, preferred_element_type=F32)


def _kernel(q_ref, k_ref, v_ref, av_ref, ak_ref, o_ref, *, n, d, piece, vp, block_n, defer):
  """One program: the values' columns [c * vp * piece, (c + 1) * vp * piece) of one (b, h)."""
  parts = d // piece
  c = pl.program_id(2)
  nb = n // block_n

  def relu_pieces(ref, rows):
    return [jnp.maximum(ref[rows, pl.ds(a * piece, piece)], 0).astype(BF16) for a in range(parts)]

  def accumulate(i, carry):
    r, s, usum, asum = carry
    rows = pl.ds(i * block_n, block_n)
    kp = relu_pieces(k_ref, rows)
    av = av_ref[rows]
    ak = ak_ref[rows]
    u = [v_ref[rows, pl.ds((c * vp + j) * piece, piece)].astype(F32) * av[:, None]
         for j in range(vp)]
    ut = [_terms(x) for x in u]
    r = [[r[a][j] + sum(_dot(kp[a], t, trans_a=True) for t in ut[j]) for j in range(vp)]
         for a in range(parts)]
    if defer:   # elementwise [block_n, piece] partial sums, reduced once after the loop
      s = [s[a] + kp[a].astype(F32) * ak[:, None] for a in range(parts)]
      usum = [usum[j] + u[j] for j in range(vp)]
      return r, s, usum, asum + ak
    s = [s[a] + jnp.sum(kp[a].astype(F32) * ak[:, None], axis=0) for a in range(parts)]
    usum = [usum[j] + jnp.sum(u[j], axis=0) for j in range(vp)]
    return r, s, usum, asum + jnp.sum(ak)

  zt = jnp.zeros((piece, piece), F32)
  zv = jnp.zeros((block_n, piece) if defer else (piece,), F32)
  init = ([[zt] * vp for _ in range(parts)], [zv] * parts, [zv] * vp,
          jnp.zeros((block_n,) if defer else (), F32))
  r, s, usum, asum = lax.fori_loop(0, nb, accumulate, init)
  if defer:
    s = [jnp.sum(x, axis=0) for x in s]
    usum = [jnp.sum(x, axis=0) for x in usum]
    asum = jnp.sum(asum)
  rt = [[_terms(x) for x in row] for row in r]
  ssum = sum(jnp.sum(x) for x in s)
  den_c = EPS * ssum + d * EPS * EPS * asum + EPS
  # eps terms of num: eps (colsum(R) + K eps U) per column, plus eps U |relu(q_i)|_1 per row
  num_c = [EPS * sum(jnp.sum(r[a][j], axis=0) for a in range(parts)) + (d * EPS * EPS) * usum[j]
           for j in range(vp)]

  def emit(i, _):
    rows = pl.ds(i * block_n, block_n)
    qp = relu_pieces(q_ref, rows)
    q32 = [x.astype(F32) for x in qp]
    l1 = sum(jnp.sum(x, axis=1) for x in q32)                      # |relu(q_i)|_1 [block_n]
    den = sum(jnp.sum(q32[a] * s[a][None, :], axis=1) for a in range(parts))
    den = den + EPS * asum * l1 + den_c
    for j in range(vp):
      num = sum(_dot(qp[a], t) for a in range(parts) for t in rt[a][j])
      num = num + (EPS * l1)[:, None] * usum[j][None, :] + num_c[j][None, :]
      o_ref[rows, pl.ds(j * piece, piece)] = (num / den[:, None]).astype(o_ref.dtype)
    return 0

  lax.fori_loop(0, nb, emit, 0)


@functools.partial(jax.jit, static_argnames=("fused", "out_dtype", "block_n", "num_warps",
                                             "value_pieces", "defer_sums", "interpret"))
def lina_forward(q, k, v, key_scale, value_scale, mask, *, fused=False, out_dtype=F32,
                 block_n=64, num_warps=None, value_pieces=1, defer_sums=False, interpret=False):
  """The kernel. Either q, k, v [B, N, H, D] or (``fused=True``) q = qkv [B, N, 3, H, D] with k, v
  None, all bf16; key_scale, value_scale [H, N] float32 or None; mask [B, N] or None.
  -> [B, N, H, D] in ``out_dtype``. ``value_pieces``: value column pieces per program (1: grid
  B x H x D/piece, k and q re-read per piece; D/piece: one program per (b, h)). ``defer_sums``:
  keep the key/value sums as [block_n, piece] tiles over the N loop and reduce them once after it
  (fewer cross-thread reductions, more registers)."""
  if fused:
    b, n, _, h, d = q.shape
  else:
    b, n, h, d = q.shape
  piece = piece_size(d)
  if piece is None:
    raise ValueError(f"the LINA Pallas kernel needs a head dim that is a multiple of 16, got {d}; "
                     f"use impl='xla'.")
  # Row weights (tiny [B, H, N] float32 arrays): ak weights phi(k) in the key mean, av = ak *
  # value_scale weights phi(k) v^T in the kv mean.
  w = jnp.ones((b, n), F32) if mask is None else mask.astype(F32)
  w = w / jnp.maximum(jnp.sum(w, axis=1, keepdims=True), 1.0)
  ak = jnp.broadcast_to(w[:, None, :], (b, h, n))
  if key_scale is not None:
    ak = ak * key_scale.astype(F32)[None]
  av = ak if value_scale is None else ak * value_scale.astype(F32)[None]
  if num_warps is None:   # H100, bf16 out (benchmarks/results/lina_h100_s6_kernel.json): 2 warps
    num_warps = 2 if n <= 2048 else 4   # 0.37 vs 0.42 ms at N=320, 0.36 vs 0.50 at 1280, 0.80 vs 0.66 at 5120
  parts = d // piece
  if parts % value_pieces:
    raise ValueError(f"value_pieces={value_pieces} must divide the {parts} column pieces of head "
                     f"dim {d}")
  pad = -n % block_n
  if pad:   # zero-weight rows: relu(0) = 0 and a = 0, so they add nothing
    def npad(x, axis):
      return jnp.pad(x, [(0, pad) if i == axis else (0, 0) for i in range(x.ndim)])
    q = npad(q, 1)
    if not fused:
      k, v = npad(k, 1), npad(v, 1)
    ak, av = npad(ak, 2), npad(av, 2)
  t = n + pad
  if fused:
    specs = [pl.BlockSpec((None, t, None, None, d), lambda i, j, c, s=s: (i, 0, s, j, 0))
             for s in range(3)]
    args = (q, q, q)
  else:
    specs = [pl.BlockSpec((None, t, None, d), lambda i, j, c: (i, 0, j, 0))] * 3
    args = (q, k, v)
  row = pl.BlockSpec((None, None, t), lambda i, j, c: (i, j, 0))
  kern = functools.partial(_kernel, n=t, d=d, piece=piece, vp=value_pieces, block_n=block_n,
                           defer=defer_sums)
  cols = piece * value_pieces
  out = pl.pallas_call(
      kern, grid=(b, h, parts // value_pieces),
      in_specs=specs + [row, row],
      out_specs=pl.BlockSpec((None, t, None, cols), lambda i, j, c: (i, 0, j, c)),
      out_shape=jax.ShapeDtypeStruct((b, t, h, d), out_dtype),
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=2),
      interpret=interpret, name="lina_attention",
  )(*args, av, ak)
  return out[:, :n] if pad else out
