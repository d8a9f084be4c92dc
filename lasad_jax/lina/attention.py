"""``lina_attention``: LINA's bidirectional linear attention, float32 inside (as LINA computes it).

    phi(x) = relu(x) + 1e-6
    k~_n = phi(k_n) * key_scale[h, n],   v~_n = v_n * value_scale[h, n]
    o_i  = phi(q_i) . (mean_n k~_n v~_n^T) / (phi(q_i) . mean_n k~_n + 1e-6)

No head-dim scaling. ``mask`` [B, N] (1 = take part) restricts the means to some tokens, which is
exactly LINA's gather of the visible tokens (its encoder blocks run on [condition ; visible] only)
with static shapes: the outputs at masked positions are computed but meaningless. Cost O(N D^2)
per head, no N x N matrix.

``impl``: ``"xla"`` (the jnp form below, float32 einsums at ``Precision.HIGHEST``), ``"split"``
(the same float32 arithmetic as bf16 tensor-core einsums, see :func:`_split`) or ``"pallas"``
(``kernels/lina/pallas.py``: one fused forward kernel reading the fused projection in place, same
arithmetic as ``"split"``). ``"split"`` and ``"pallas"`` apply to bfloat16 q, k, v (LINA's autocast
Linear outputs); float32 inputs take the ``"xla"`` form. All three are float32-accurate (tests
against float64) and share the float32 form's gradient. ``out_dtype`` (default float32) is the
output's dtype; the kernel writes it directly (the model asks for bf16, which its output
projection takes). ``lina_attention_qkv`` takes the fused projection [B, N, 3, H, D] as the model
produces it.
"""

import functools

import jax
import jax.numpy as jnp

EPS = 1e-6
IMPLS = ("xla", "split", "pallas")
SPLIT_TERMS = 3


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


def _xla(q, k, v, key_scale, value_scale, mask):
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


def _bf16_terms(x, terms):
  """x (float32) as ``terms`` bfloat16 pieces whose float32 sum is x to 8 * terms bits."""
  out = []
  for _ in range(terms):
    hi = x.astype(jnp.bfloat16)
    out.append(hi)
    x = x - hi.astype(jnp.float32)
  return out


def _bf16_einsum(eq, a, b):
  """bf16 x bf16 -> float32 einsum; XLA:CPU has no such dot, so there the (exact) bf16 values run
  through a float32 einsum, which gives the same products and float32 sums."""
  if jax.default_backend() == "cpu":
    return jnp.einsum(eq, a.astype(jnp.float32), b.astype(jnp.float32),
                      precision=jax.lax.Precision.HIGHEST)
  return jnp.einsum(eq, a, b, preferred_element_type=jnp.float32)


def _split(q, k, v, key_scale, value_scale, mask, terms=SPLIT_TERMS):
  """The operator for bfloat16 q, k, v with both contractions on bf16 tensor cores, float32 exact
  to rounding. relu of a bf16 number is a bf16 number, so with phi(x) = relu(x) + eps:

      kv    = sum_n phi(k_n) a_n v_n^T = relu(k)^T u + eps * sum_n u_n,   u_n = a_n v_n (float32)
      num_i = phi(q_i) . kv           = relu(q_i) . kv + eps * colsum(kv)

  where a_n folds key_scale, value_scale, the mask and 1/count. The float32 operand (u, then kv)
  is cut into ``terms`` bf16 pieces (24 bits for 3) stacked along the contracted axis, so each
  contraction is one bf16 matmul with float32 accumulation whose products are exact: the result
  matches the float32 einsums to float32 rounding (tested against float64), at tensor-core speed
  instead of float32 CUDA-core speed. The denominators stay float32 elementwise reductions."""
  f32 = jnp.float32
  b, n, h, _ = q.shape
  rq = jax.nn.relu(q.astype(jnp.bfloat16))
  rk = jax.nn.relu(k.astype(jnp.bfloat16))
  if mask is None:
    w = jnp.full((b, n), 1.0 / n, f32)
  else:
    w = mask.astype(f32)
    w = w / jnp.maximum(jnp.sum(w, axis=1, keepdims=True), 1.0)
  ak = w[:, :, None] * (1.0 if key_scale is None else jnp.swapaxes(key_scale, 0, 1).astype(f32))
  av = ak * (1.0 if value_scale is None else jnp.swapaxes(value_scale, 0, 1).astype(f32))
  u = v.astype(f32) * av[..., None]                                           # [B, N, H, V]
  kv = _bf16_einsum("bnhk,bnhv->bhkv", jnp.concatenate([rk] * terms, axis=1),
                    jnp.concatenate(_bf16_terms(u, terms), axis=1))
  kv = kv + EPS * jnp.sum(u, axis=1)[:, :, None, :]                           # [B, H, K, V]
  kmean = jnp.sum(rk.astype(f32) * ak[..., None], axis=1) + EPS * jnp.sum(ak, axis=1)[..., None]
  num = _bf16_einsum("bnhk,bhkv->bnhv", jnp.concatenate([rq] * terms, axis=-1),
                     jnp.concatenate(_bf16_terms(kv, terms), axis=2))
  num = num + EPS * jnp.sum(kv, axis=2)[:, None]
  den = jnp.sum(rq.astype(f32) * kmean[:, None], axis=-1) + EPS * jnp.sum(kmean, -1)[:, None]
  return num / (den + EPS)[..., None]


@jax.custom_vjp
def _split_op(q, k, v, key_scale, value_scale, mask):
  return _split(q, k, v, key_scale, value_scale, mask)


def _split_fwd(q, k, v, key_scale, value_scale, mask):
  return _split(q, k, v, key_scale, value_scale, mask), (q, k, v, key_scale, value_scale, mask)


def _split_bwd(res, do):
  # Differentiating the bf16 pieces would round cotangents to bf16; the float32 form's VJP keeps
  # the gradient at float32 accuracy (as impl="pallas" does).
  return jax.vjp(_xla, *res)[1](do)


_split_op.defvjp(_split_fwd, _split_bwd)


def _xla_qkv(qkv, key_scale, value_scale, mask):
  return _xla(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], key_scale, value_scale, mask)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _pallas(q, k, v, key_scale, value_scale, mask, out_dtype, interpret):
  from kernels.lina.pallas import lina_forward
  return lina_forward(q, k, v, key_scale, value_scale, mask, fused=k is None,
                      out_dtype=out_dtype, interpret=interpret)


def _pallas_fwd(q, k, v, key_scale, value_scale, mask, out_dtype, interpret):
  out = _pallas(q, k, v, key_scale, value_scale, mask, out_dtype, interpret)
  return out, (q, k, v, key_scale, value_scale, mask)


def _pallas_bwd(out_dtype, interpret, res, do):
  q, k, v, key_scale, value_scale, mask = res
  do = do.astype(jnp.float32)
  if k is None:   # fused [B, N, 3, H, D]
    _, vjp = jax.vjp(_xla_qkv, q, key_scale, value_scale, mask)
    dq, dks, dvs, dm = vjp(do)
    return dq, None, None, dks, dvs, dm
  _, vjp = jax.vjp(_xla, q, k, v, key_scale, value_scale, mask)
  return vjp(do)


_pallas.defvjp(_pallas_fwd, _pallas_bwd)


def _run(q, k, v, key_scale, value_scale, mask, impl, out_dtype):
  if impl not in IMPLS:
    raise ValueError(f"`impl` must be one of {IMPLS}, got {impl!r}.")
  d = q.shape[-1]
  if impl == "pallas" and d % 16:
    raise ValueError(f"impl='pallas' needs a head dim that is a multiple of 16, got {d}; "
                     f"use impl='xla'.")
  out_dtype = jnp.dtype(out_dtype)
  bf16 = all(x is None or x.dtype == jnp.bfloat16 for x in (q, k, v))
  if impl == "pallas" and bf16:
    from lasad_jax.sharding import over_batch
    interpret = jax.default_backend() != "gpu"
    return over_batch(   # per device on its batch rows under a sharded step
        lambda *a: _pallas(*a, out_dtype, interpret), (q, k, v, key_scale, value_scale, mask),
        batched=(True, True, True, False, False, True))
  if k is None:
    q, k, v = q[:, :, 0], q[:, :, 1], q[:, :, 2]
  if impl in ("split", "pallas") and bf16:
    return _split_op(q, k, v, key_scale, value_scale, mask).astype(out_dtype)
  return _xla(q, k, v, key_scale, value_scale, mask).astype(out_dtype)


def lina_attention(q, k, v, key_scale=None, value_scale=None, *, mask=None, impl="xla",
                   out_dtype=jnp.float32):
  """q, k [B, N, H, K], v [B, N, H, V] -> o [B, N, H, V] in ``out_dtype`` (computed in float32;
  see the module docstring)."""
  _check(q, k, v, key_scale, value_scale, mask)
  if impl == "pallas" and k.shape[-1] != v.shape[-1]:
    raise ValueError(f"impl='pallas' needs equal key and value head dims (square kv tiles), got "
                     f"{k.shape[-1]} and {v.shape[-1]}; use impl='xla'.")
  return _run(q, k, v, key_scale, value_scale, mask, impl, out_dtype)


def lina_attention_qkv(qkv, key_scale=None, value_scale=None, *, mask=None, impl="xla",
                       out_dtype=jnp.float32):
  """The same on the fused projection qkv [B, N, 3, H, D] -> o [B, N, H, D]."""
  if getattr(qkv, "ndim", None) != 5 or qkv.shape[2] != 3:
    raise ValueError(f"`qkv` must have shape [B, N, 3, H, D], got "
                     f"{getattr(qkv, 'shape', type(qkv).__name__)}.")
  q = qkv[:, :, 0]
  _check(q, q, q, key_scale, value_scale, mask)
  return _run(qkv, None, None, key_scale, value_scale, mask, impl, out_dtype)
