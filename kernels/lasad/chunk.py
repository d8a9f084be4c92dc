"""Chunked LASAD in plain jnp (XLA): the CPU fallback and the backward reference.

Per chunk of ``chunk_size`` tokens (``b`` = within-chunk cumulative log decay, ``seg`` = number of
resets so far in the chunk; see README.md for the derivation):

  * state entering chunk n:   S_n = diag(D_{n-1}) S_{n-1} + L_{n-1}   (a scan over chunks)
  * inter-chunk output:       scale * (q * exp(b) * [seg == 0]) @ S_n
  * intra-chunk output:       scale * A @ v, with A[t, s] = sum_k q_t k_s exp(b_t - b_s) for s <= t
                              in the same segment, computed in sub-chunks of 16 so every
                              exponent is <= 0 (no overflow at strong decay, no -inf - -inf).
"""

import functools

import jax
import jax.numpy as jnp

from kernels.lasad import mask

_HI = jax.lax.Precision.HIGHEST
SUB_CHUNK = 16


def _mm(spec, *xs):
  return jnp.einsum(spec, *xs, precision=_HI, preferred_element_type=jnp.float32)


def _intra(q, k, v, b, seg, sub):
  """Within-chunk causal part. q, k, b: [..., C, K]; v: [..., C, V]; seg: [..., C]."""
  c = q.shape[-2]
  n = c // sub
  causal = jnp.tril(jnp.ones((sub, sub), bool))
  outs = []
  for i in range(n):
    blk = slice(i * sub, (i + 1) * sub)
    qi, ki, vi, bi, si = q[..., blk, :], k[..., blk, :], v[..., blk, :], b[..., blk, :], seg[..., blk]
    # Diagonal block: pairwise exponent (exact, <= 0 where it is used).
    ok = causal & (si[..., :, None] == si[..., None, :])
    diff = bi[..., :, None, :] - bi[..., None, :, :]
    w = jnp.where(ok[..., None], jnp.exp(jnp.where(ok[..., None], diff, 0.0)), 0.0)
    a = jnp.sum(qi[..., :, None, :] * ki[..., None, :, :] * w, axis=-1)
    o = _mm("...ts,...sv->...tv", a, vi)
    if i:
      # Earlier sub-chunks: factor through the gate at the end of the previous sub-chunk, so
      # both factors are exp(<= 0). Segment masks make a reset in between give exactly 0.
      ref, ref_seg = b[..., i * sub - 1, :], seg[..., i * sub - 1]
      qf = qi * jnp.exp(bi - ref[..., None, :]) * (si == ref_seg[..., None])[..., None]
      kp, bp, sp = k[..., :i * sub, :], b[..., :i * sub, :], seg[..., :i * sub]
      kf = kp * jnp.exp(ref[..., None, :] - bp) * (sp == ref_seg[..., None])[..., None]
      o = o + _mm("...tk,...sk,...sv->...tv", qf, kf, v[..., :i * sub, :])
    outs.append(o)
  return jnp.concatenate(outs, axis=-2)


@functools.partial(jax.jit, static_argnames=("scale", "use_mask", "chunk_size"))
def lasad_chunk(q, k, v, g, width, prefix, boundary, initial_state, *, scale, use_mask,
                chunk_size=64):
  """Same contract as ``reference.lasad_reference``; returns float32 ``(o, final_state)``."""
  f32 = jnp.float32
  batch, seq_len, heads, dk = q.shape
  if use_mask:
    starts = mask.row_starts(seq_len, width, prefix, batch)
    g, reset = mask.split_gate(g, starts, boundary)
  else:
    g, reset = g.astype(f32), jnp.zeros((batch, seq_len, heads), bool)

  c = chunk_size
  n_chunks = -(-seq_len // c)
  pad = n_chunks * c - seq_len
  # Padding is k = v = 0, g = 0, no reset: it adds nothing to the state and decays nothing.
  def prep(x):
    x = jnp.pad(x.astype(f32) if x.dtype != bool else x,
                [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    x = jnp.swapaxes(x, 1, 2)  # [B, H, T, ...]
    return x.reshape(x.shape[:2] + (n_chunks, c) + x.shape[3:])
  q, k, v, g, reset = map(prep, (q, k, v, g, reset))

  b = jnp.cumsum(g, axis=-2)                       # [B, H, N, C, K]
  seg = jnp.cumsum(reset.astype(jnp.int32), -1)    # [B, H, N, C]
  sub = SUB_CHUNK if c % SUB_CHUNK == 0 else c
  o_intra = _intra(q, k, v, b, seg, sub)

  b_last, seg_last = b[..., -1:, :], seg[..., -1:]
  to_end = jnp.exp(b_last - b) * (seg == seg_last)[..., None]
  local = _mm("...ck,...cv->...kv", k * to_end, v)                    # [B, H, N, K, V]
  through = jnp.exp(b_last[..., 0, :]) * (seg_last == 0)             # [B, H, N, K]

  def step(s, xs):
    d, l = xs
    return d[..., None] * s + l, s
  final, s_in = jax.lax.scan(step, initial_state.astype(f32),
                             (jnp.moveaxis(through, 2, 0), jnp.moveaxis(local, 2, 0)))
  s_in = jnp.moveaxis(s_in, 0, 2)                                      # [B, H, N, K, V]
  q_in = q * jnp.exp(b) * (seg == 0)[..., None]
  o = scale * (o_intra + _mm("...ck,...kv->...cv", q_in, s_in))
  o = o.reshape(batch, heads, n_chunks * c, -1)[:, :, :seq_len]
  return jnp.swapaxes(o, 1, 2), final
