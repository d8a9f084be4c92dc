"""One decode step of a LASADGen attention layer as a single Pallas GPU kernel (Triton backend).

The sampler's token loop spends most of its time in many small kernels (BENCHMARKS.md, session 5:
per layer XLA runs five for the attention core alone: v and k from the projection, the decay with
the row mask, the state update, then o and its per-head RMSNorm). This kernel does all of it in
one pass per (batch row, head), reading the [K, V] float32 state once and writing it once:

  q = silu(q_raw)          s = sigmoid(f_raw)         gate = s + lb (1 - s)
  g = log(gate)            k = (1 - lb)(1 - s)        g~ = boundary if the token starts a row else g
  S' = e^{g~} S + k v^T    o = q S'                   out = RMSNorm_head(o) * head_norm

exactly the HGRN2-style math of ``lasad_jax.model._qkvg`` / ``reference.recurrent_step`` /
``model._attn_out`` (q and k are rounded to the compute dtype as there). Grid (B, H); the state
is updated in place (input/output alias). ``interpret=None`` runs compiled on GPU and in the
Pallas interpreter elsewhere (how CI tests it).
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from kernels.lasad.reference import GATE_FLOOR

F32 = jnp.float32


def attention_step(q_raw, f_raw, v, lb, head_norm, is_start, boundary, state, *, eps, dtype):
  """The math above for one (row, head): float32 [D] vectors q_raw, f_raw, v, lb, head_norm, the
  [D, D] state; is_start / boundary scalars. Returns (out [D] float32, new state). Shared with
  the persistent kernel (decode_persistent.py)."""
  q = jax.nn.silu(q_raw).astype(dtype).astype(F32)
  s = jax.nn.sigmoid(f_raw)
  g = jnp.log(jnp.maximum(s + lb * (1.0 - s), GATE_FLOOR))
  k = ((1.0 - lb) * (1.0 - s)).astype(dtype).astype(F32)
  g = jnp.where(is_start, boundary, g)                      # row start: the boundary decay
  state = jnp.exp(g)[:, None] * state + k[:, None] * v[None, :]
  o = jnp.sum(q[:, None] * state, axis=0)
  return o * jax.lax.rsqrt(jnp.mean(o * o) + eps) * head_norm, state


def _kernel(q_ref, f_ref, v_ref, lb_ref, hn_ref, start_ref, bnd_ref, s_ref, *rest, eps, dtype,
            norm_eps, dim):
  x_ref, (o_ref, s_out_ref) = (rest[0], rest[1:]) if norm_eps is not None else (None, rest)
  q, f, v = (r[...].astype(F32) for r in (q_ref, f_ref, v_ref))
  if q.ndim == 2:   # [S, D] partial sums of a split-K projection
    q, f, v = (jnp.sum(a, axis=0) for a in (q, f, v))
  if x_ref is not None:   # y = (x * w) @ W: the row's RMSNorm scale applies here (zero padding)
    x = x_ref[...]
    r = jax.lax.rsqrt(jnp.sum(x * x) / dim + norm_eps)
    q, f, v = q * r, f * r, v * r
  o, s_out_ref[...] = attention_step(q, f, v, lb_ref[...], hn_ref[...], start_ref[0] != 0,
                                     bnd_ref[0], s_ref[...], eps=eps, dtype=dtype)
  o_ref[...] = o.astype(o_ref.dtype)


# Warps per (row, head) program. A module value, read when the kernel is traced, so that
# benchmarks/sampling.py --decode-warps can time others without a config key.
NUM_WARPS = 4


def _pow2(n):
  return n >= 16 and n & (n - 1) == 0


def supported(head_dim):
  """Triton tiles need power-of-two sizes: head_dim 16, 32, 64, 128, ..."""
  return _pow2(head_dim)


@functools.partial(jax.jit, static_argnames=("eps", "norm_eps", "dtype", "interpret"))
def decode_attention(y, state, lb, start, boundary, head_norm, *, eps, x=None, norm_eps=None,
                     dtype=None, interpret=None):
  """One token's attention core for every (row, head).

  y [B, 3, H, D]: the input projections q_raw | f_raw | v (compute dtype), or [S, B, 3, H, D]:
  S partial sums of them (float32, a projection split S ways along its input; S a power of
  two), which the kernel adds; ``dtype``: the compute dtype (q and k are rounded to it, the
  output has it), default y's. state [B, H, D, D]
  float32; lb [H, D] the layer's forget-gate lower bound; start [B] bool (the token starts an
  image row); boundary [H] log decay at a row start (-inf = reset); head_norm [H, D].
  With ``x`` [B, d] float32 (the layer's input) and ``norm_eps``, y holds the projections of
  ``x * attn_norm`` without the RMSNorm's per-row scale, and the kernel applies it:
  RMSNorm(x) @ W = rsqrt(mean(x^2) + norm_eps) * ((x * attn_norm) @ W). The norm then needs no
  kernel of its own before the projection (the multiply fuses into its neighbours).
  Returns (out [B, H, D] in ``dtype``: RMSNorm_head(q S') * head_norm, new state [B, H, D, D]).
  """
  if interpret is None:
    interpret = jax.default_backend() != "gpu"
  dtype = jnp.dtype(y.dtype if dtype is None else dtype)
  splits = y.shape[0] if y.ndim == 5 else None
  b, three, h, d = y.shape[-4:]
  if (y.ndim not in (4, 5) or three != 3 or state.shape != (b, h, d, d) or not supported(d)
      or (splits is not None and splits & (splits - 1))):
    raise ValueError(f"decode_attention: y must be [B, 3, H, D] or [S, B, 3, H, D] (S a power "
                     f"of two) and state [B, H, D, D], with D a power of two >= 16; got y "
                     f"{y.shape}, state {state.shape}")
  if (x is None) != (norm_eps is None):
    raise ValueError("decode_attention: give both `x` and `norm_eps` (the RMSNorm's scale in "
                     "the kernel) or neither")
  if splits is None:
    row = lambda part: pl.BlockSpec((None, None, None, d), lambda i, j: (i, part, j, 0))
  else:
    row = lambda part: pl.BlockSpec((splits, None, None, None, d),
                                    lambda i, j: (0, i, part, j, 0))
  per_head = pl.BlockSpec((None, d), lambda i, j: (j, 0))
  st = pl.BlockSpec((None, None, d, d), lambda i, j: (i, j, 0, 0))
  extra, extra_specs, dim = (), [], None
  if x is not None:
    if x.ndim != 2 or x.shape[0] != b:
      raise ValueError(f"decode_attention: x must be [B, d] with B = {b}, got {x.shape}")
    dim = x.shape[1]
    width = 1 << (dim - 1).bit_length()   # Triton blocks are powers of two: zeros pad the row
    extra = (jnp.pad(x.astype(F32), ((0, 0), (0, width - dim))),)
    extra_specs = [pl.BlockSpec((None, width), lambda i, j: (i, 0))]
  out, new_state = pl.pallas_call(
      functools.partial(_kernel, eps=eps, dtype=dtype, norm_eps=norm_eps, dim=dim),
      grid=(b, h),
      in_specs=[row(0), row(1), row(2), per_head, per_head,
                pl.BlockSpec((1,), lambda i, j: (i,)), pl.BlockSpec((1,), lambda i, j: (j,)), st]
               + extra_specs,
      out_specs=[pl.BlockSpec((None, None, d), lambda i, j: (i, j, 0)), st],
      out_shape=[jax.ShapeDtypeStruct((b, h, d), dtype), jax.ShapeDtypeStruct(state.shape, F32)],
      input_output_aliases={7: 1},
      compiler_params=plgpu.CompilerParams(num_warps=NUM_WARPS, num_stages=1),
      interpret=interpret, name="lasad_decode_attention",
  )(y, y, y, lb.astype(F32), head_norm.astype(F32), start.astype(jnp.int32),
    boundary.astype(F32), state, *extra)
  return out, new_state
