"""The k-th largest logit of each row, exactly, by a digit-by-digit search: a Pallas kernel (Triton).

Top-k sampling only needs each row's threshold (the k-th largest value), not the sorted top k
that ``lax.top_k`` produces; on the H100 that sort costs ~51 us per generated token at
LASADGen-L's vocabulary (16384) and k = 2000 (BENCHMARKS.md, session 5 profile). Here one program
per row holds the row on chip: float32 values map to int32 keys with the same order, and the
answer is built from the most significant digit down (the largest t with count(key >= t) >= k,
which is the k-th largest key), ``radix`` 2 (default: 32 passes of one count) or 4 (16 passes of
3 independent counts). Same value as ``lax.top_k(x, k)[0][:, -1]`` for every
finite or infinite input (NaN unsupported).

Measured on an H100 at [8, 16384], k = 2000 (``benchmarks/topk.py``, BENCHMARKS.md session 12):
radix 2 with 8 warps 13.9 us per call in isolation against the sort's 55.7 us (radix 4: 17.3 us
at best; a packed radix-16 form spilled registers, 264 us: fewer, wider passes do not pay);
inside the sampler 29 us per token against the sort's ~51 us, i.e. L's 8 images 0.217 -> 0.212 s.
``lasad_jax.sampling`` uses it on GPUs (``top_k_impl="auto"``).

``impl="pallas"`` runs compiled on a GPU and in the Pallas interpreter elsewhere; ``impl="xla"``
is the same search in plain jnp (for tests: many small passes, slower than the sort on a GPU).
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


def _i32(pattern):
  """An unsigned 32-bit pattern as the int32 with the same bits."""
  return np.int32(pattern - (1 << 32) if pattern >= 1 << 31 else pattern)


def _search(keys, k, axis, bits=1):
  """Largest int32 t with count(keys >= t) >= k along ``axis``, built ``bits`` bits per pass from
  the most significant down in the sign-flipped (unsigned-ordered) space: each pass counts the
  keys at or above each of the 2^bits - 1 candidate next digits (independent sums) and keeps the
  largest digit whose count reaches k. bits=1: 32 dependent passes of one sum; 2: 16 passes of 3
  sums."""
  ans = jnp.zeros(keys.shape[:axis] + (1,) * (keys.ndim - axis), jnp.int32)
  for shift in range(32 - bits, -1, -bits):
    digit = jnp.zeros_like(ans)
    for d in range(1, 1 << bits):
      trial = ans | _i32(d << shift)
      count = jnp.sum((keys >= (trial ^ _MIN)).astype(jnp.int32), axis=axis, keepdims=True)
      digit = digit + (count >= k).astype(jnp.int32)   # counts fall with d: digit = #d that pass
    ans = ans | (digit << shift)
  return ans ^ _MIN


def _kernel(x_ref, o_ref, *, k, bits):
  keys = _keys(x_ref[...])                              # [1, V]
  o_ref[...] = _value(_search(keys, k, 1, bits))        # [1, 1]


@functools.partial(jax.jit, static_argnames=("k", "impl", "interpret", "radix", "num_warps"))
def kth_largest(x, k, *, impl="pallas", interpret=None, radix=2, num_warps=8):
  """x [B, V] -> [B, 1] float32: each row's k-th largest value (1 <= k <= V).

  ``radix``: 2 or 4: digits of 1 or 2 bits, i.e. 32 or 16 dependent passes of 1 or 3
  independent counts.
  ``num_warps``: of the kernel's one program per row."""
  b, v = x.shape
  if not 1 <= k <= v:
    raise ValueError(f"kth_largest: k must be in [1, {v}], got {k}")
  if radix not in (2, 4):
    raise ValueError(f"kth_largest: radix must be 2 or 4, got {radix}")
  bits = radix.bit_length() - 1
  if impl == "xla":
    return _value(_search(_keys(x), k, 1, bits))
  if impl != "pallas":
    raise ValueError(f"kth_largest: impl must be 'pallas' or 'xla', got {impl!r}")
  x = x.astype(jnp.float32)
  if v & (v - 1):   # Triton blocks are powers of two: pad with -inf (k <= V keeps the answer)
    x = jnp.pad(x, ((0, 0), (0, (1 << v.bit_length()) - v)), constant_values=-jnp.inf)
    v = x.shape[1]
  if interpret is None:
    interpret = jax.default_backend() != "gpu"
  return pl.pallas_call(
      functools.partial(_kernel, k=k, bits=bits), grid=(b,),
      in_specs=[pl.BlockSpec((1, v), lambda i: (i, 0))],
      out_specs=pl.BlockSpec((1, 1), lambda i: (i, 0)),
      out_shape=jax.ShapeDtypeStruct((b, 1), jnp.float32),
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
      interpret=interpret, name="kth_largest")(x)
