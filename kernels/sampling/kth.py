"""The k-th largest logit of each row, exactly, by a bitwise search: a Pallas kernel (Triton).

Top-k sampling only needs each row's threshold (the k-th largest value), not the sorted top k
that ``lax.top_k`` produces; on the H100 that sort costs ~51 us per generated token at
LASADGen-L's vocabulary (16384) and k = 2000 (BENCHMARKS.md, session 5 profile). Here one program
per row holds the row on chip and finds the threshold in 32 counting passes: float32 values map
to int32 keys with the same order, and the answer is built from the most significant bit down
(the largest t with count(key >= t) >= k, which is the k-th largest key). Same value as
``lax.top_k(x, k)[0][:, -1]`` for every finite or infinite input (NaN unsupported).

``impl="pallas"`` runs compiled on a GPU and in the Pallas interpreter elsewhere; ``impl="xla"``
is the same search in plain jnp (for tests: 32 small passes, slower than the sort on a GPU).
Opt-in and NOT yet timed on a GPU: ``lasad_jax.sampling.filter_logits(..., top_k_impl=...)``.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

_MIN = np.int32(-2**31)
_LOW31 = np.int32(0x7FFFFFFF)


def _keys(x):
  """float32 -> int32 with the same order (negative floats: low 31 bits flipped)."""
  bits = lax.bitcast_convert_type(x.astype(jnp.float32), jnp.int32)
  return jnp.where(bits < 0, bits ^ _LOW31, bits)


def _value(key):
  bits = jnp.where(key < 0, key ^ _LOW31, key)
  return lax.bitcast_convert_type(bits, jnp.float32)


def _search(keys, k, axis):
  """Largest int32 t with count(keys >= t) >= k along ``axis``: 32 passes, MSB first, built in
  the sign-flipped (unsigned-ordered) space and compared back in the signed one."""
  ans = jnp.zeros(keys.shape[:axis] + (1,) * (keys.ndim - axis), jnp.int32)
  for bit in range(31, -1, -1):
    trial = ans | (np.int32(-2**31) if bit == 31 else np.int32(1 << bit))
    count = jnp.sum((keys >= (trial ^ _MIN)).astype(jnp.int32), axis=axis, keepdims=True)
    ans = jnp.where(count >= k, trial, ans)
  return ans ^ _MIN


def _kernel(x_ref, o_ref, *, k):
  keys = _keys(x_ref[...])                     # [1, V]
  o_ref[...] = _value(_search(keys, k, 1))     # [1, 1]


@functools.partial(jax.jit, static_argnames=("k", "impl", "interpret"))
def kth_largest(x, k, *, impl="pallas", interpret=None):
  """x [B, V] -> [B, 1] float32: each row's k-th largest value (1 <= k <= V)."""
  b, v = x.shape
  if not 1 <= k <= v:
    raise ValueError(f"kth_largest: k must be in [1, {v}], got {k}")
  if impl == "xla":
    return _value(_search(_keys(x), k, 1))
  if impl != "pallas":
    raise ValueError(f"kth_largest: impl must be 'pallas' or 'xla', got {impl!r}")
  x = x.astype(jnp.float32)
  if v & (v - 1):   # Triton blocks are powers of two: pad with -inf (k <= V keeps the answer)
    x = jnp.pad(x, ((0, 0), (0, (1 << v.bit_length()) - v)), constant_values=-jnp.inf)
    v = x.shape[1]
  if interpret is None:
    interpret = jax.default_backend() != "gpu"
  return pl.pallas_call(
      functools.partial(_kernel, k=k), grid=(b,),
      in_specs=[pl.BlockSpec((1, v), lambda i: (i, 0))],
      out_specs=pl.BlockSpec((1, 1), lambda i: (i, 0)),
      out_shape=jax.ShapeDtypeStruct((b, 1), jnp.float32),
      compiler_params=plgpu.CompilerParams(num_warps=8, num_stages=1),
      interpret=interpret, name="kth_largest")(x)
