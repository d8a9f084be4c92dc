"""``lina_attention``: LINA's bidirectional linear attention, float32 inside (as LINA computes it).

    phi(x) = relu(x) + 1e-6
    k~_n = phi(k_n) * key_scale[h, n],   v~_n = v_n * value_scale[h, n]
    o_i  = phi(q_i) . (mean_n k~_n v~_n^T) / (phi(q_i) . mean_n k~_n + 1e-6)

No head-dim scaling. ``mask`` [B, N] (1 = take part) restricts the means to some tokens, which is
exactly LINA's gather of the visible tokens (its encoder blocks run on [condition ; visible] only)
with static shapes: the outputs at masked positions are computed but meaningless. Cost O(N D^2)
per head, no N x N matrix.
"""

import jax
import jax.numpy as jnp

EPS = 1e-6


def _check(q, k, v, key_scale, value_scale, mask):
  for name, x in (("q", q), ("k", k), ("v", v)):
    if getattr(x, "ndim", None) != 4:
      raise ValueError(f"`{name}` must have rank 4 ([B, N, H, D]), got shape "
                       f"{getattr(x, 'shape', type(x).__name__)}.")
  if k.shape != q.shape or v.shape[:3] != q.shape[:3]:
    raise ValueError(f"`q`, `k` must share [B, N, H, D] and `v` [B, N, H]: got q {q.shape}, "
                     f"k {k.shape}, v {v.shape}.")
  b, n, h, _ = q.shape
  for name, s in (("key_scale", key_scale), ("value_scale", value_scale)):
    if s is not None and tuple(s.shape) != (h, n):
      raise ValueError(f"`{name}` must have shape [H, N] = {(h, n)} (LINA's KV gate is fixed-"
                       f"length: one value per head and position), got {tuple(s.shape)}.")
  if mask is not None and tuple(mask.shape) != (b, n):
    raise ValueError(f"`mask` must have shape [B, N] = {(b, n)}, got {tuple(mask.shape)}.")


def lina_attention(q, k, v, key_scale=None, value_scale=None, *, mask=None):
  """q, k [B, N, H, K], v [B, N, H, V] -> o [B, N, H, V] float32 (see module docstring)."""
  _check(q, k, v, key_scale, value_scale, mask)
  f32 = jnp.float32
  hp = jax.lax.Precision.HIGHEST
  q = jax.nn.relu(q.astype(f32)) + EPS
  k = jax.nn.relu(k.astype(f32)) + EPS
  v = v.astype(f32)
  if key_scale is not None:
    k = k * jnp.swapaxes(key_scale, 0, 1).astype(f32)[None, :, :, None]
  if value_scale is not None:
    v = v * jnp.swapaxes(value_scale, 0, 1).astype(f32)[None, :, :, None]
  if mask is None:
    count = jnp.full((q.shape[0],), q.shape[1], f32)
  else:
    w = mask.astype(f32)
    k = k * w[:, :, None, None]
    count = jnp.sum(w, axis=1)
  inv = (1.0 / jnp.maximum(count, 1.0))[:, None, None, None]
  kv = jnp.einsum("bnhk,bnhv->bhkv", k, v, precision=hp) * inv
  kmean = jnp.sum(k, axis=1, keepdims=True) * inv                           # [B, 1, H, K]
  num = jnp.einsum("bnhk,bhkv->bnhv", q, kv, precision=hp)
  den = jnp.sum(q * kmean, axis=-1, keepdims=True) + EPS
  return num / den
