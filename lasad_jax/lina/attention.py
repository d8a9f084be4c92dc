"""``lina_attention``: LINA's bidirectional linear attention, float32 inside (as LINA computes it).

    phi(x) = relu(x) + 1e-6
    k~_n = phi(k_n) * key_scale[h, n],   v~_n = v_n * value_scale[h, n]
    o_i  = phi(q_i) . (mean_n k~_n v~_n^T) / (phi(q_i) . mean_n k~_n + 1e-6)

No head-dim scaling. ``mask`` [B, N] (1 = take part) restricts the means to some tokens, which is
exactly LINA's gather of the visible tokens (its encoder blocks run on [condition ; visible] only)
with static shapes: the outputs at masked positions are computed but meaningless. Cost O(N D^2)
per head, no N x N matrix.

``precision`` picks how the two float32 contractions (k~^T v~ and phi(q) . kv) run:

- ``"highest"``: float32 dots (``lax.Precision.HIGHEST``). On a GPU these are the slow float32
  (non-tensor-core) GEMMs: at LINA's 256 px shapes they made the operator 1.9x slower than cuDNN
  softmax attention.
- ``"bf16x3"``: each float32 operand is split into a bf16 high part and a bf16 low part and the
  product is ``hi.hi + hi.lo + lo.hi`` in three bf16 tensor-core dots with float32 accumulation
  (the split XLA calls BF16_BF16_F32_X3), written out in jnp so that every backend computes the
  same thing and the CPU tests cover it. Relative error ~1e-5 (float32 ~1e-7, one bf16 pass
  ~3e-3); everything else stays float32.
- ``"auto"`` (default): ``"bf16x3"`` on GPU, ``"highest"`` elsewhere (a CPU has no bf16 tensor
  cores to gain from, and the PyTorch parity fixtures are float32).
"""

import jax
import jax.numpy as jnp

EPS = 1e-6
PRECISIONS = ("auto", "highest", "bf16x3")


def _split(x):
  hi = x.astype(jnp.bfloat16)
  return hi, (x - hi.astype(jnp.float32)).astype(jnp.bfloat16)


def _einsum(spec, a, b, precision):
  """float32 einsum, either float32 dots or the three-pass bf16 split (see module docstring)."""
  if precision == "highest":
    return jnp.einsum(spec, a, b, precision=jax.lax.Precision.HIGHEST)
  (ah, al), (bh, bl) = _split(a), _split(b)
  if jax.default_backend() == "gpu":
    dot = lambda x, y: jnp.einsum(spec, x, y, preferred_element_type=jnp.float32)
  else:   # XLA:CPU has no bf16 x bf16 -> f32 dot; a bf16 product is exact in float32 anyway
    dot = lambda x, y: jnp.einsum(spec, x.astype(jnp.float32), y.astype(jnp.float32),
                                  precision=jax.lax.Precision.HIGHEST)
  return (dot(ah, bl) + dot(al, bh)) + dot(ah, bh)


def resolve_precision(precision):
  if precision not in PRECISIONS:
    raise ValueError(f"`precision` must be one of {PRECISIONS}, got {precision!r}.")
  if precision == "auto":
    return "bf16x3" if jax.default_backend() == "gpu" else "highest"
  return precision


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


def lina_attention(q, k, v, key_scale=None, value_scale=None, *, mask=None, precision="auto"):
  """q, k [B, N, H, K], v [B, N, H, V] -> o [B, N, H, V] float32 (see module docstring)."""
  _check(q, k, v, key_scale, value_scale, mask)
  precision = resolve_precision(precision)
  f32 = jnp.float32
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
  kv = _einsum("bnhk,bnhv->bhkv", k, v, precision) * inv
  kmean = jnp.sum(k, axis=1, keepdims=True) * inv                           # [B, 1, H, K]
  num = _einsum("bnhk,bhkv->bnhv", q, kv, precision)
  den = jnp.sum(q * kmean, axis=-1, keepdims=True) + EPS
  return num / den
