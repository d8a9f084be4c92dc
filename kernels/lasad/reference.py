"""Token-by-token LASAD recurrence: the exact float32 reference and the decoder's step.

    S_t = diag(exp(g~_t)) S_{t-1} + k_t^T v_t,     o_t = scale * q_t S_t

``g~_t = -inf`` gives ``exp = 0``: the previous state is dropped exactly, with no NaN in the
forward or in autodiff gradients (the derivative of exp at -inf is exactly 0).
"""

import jax
import jax.numpy as jnp

from kernels.lasad import mask


def recurrent_step(state, q_t, k_t, v_t, g_t, scale):
  """One token: ``state`` [B, H, K, V] f32; ``q_t, k_t, g_t`` [B, H, K]; ``v_t`` [B, H, V].

  ``g_t`` is the already-masked log decay g~ (may be -inf). Returns ``(new_state, o_t)`` with
  ``o_t`` [B, H, V] float32. This is what the sampler calls once per generated token.
  """
  f32 = jnp.float32
  decay = jnp.exp(g_t.astype(f32))[..., None]
  kv = k_t.astype(f32)[..., :, None] * v_t.astype(f32)[..., None, :]
  new_state = decay * state + kv
  o_t = jnp.einsum("bhk,bhkv->bhv", q_t.astype(f32) * scale, new_state)
  return new_state, o_t


def lasad_reference(q, k, v, g, width, prefix, boundary, initial_state, *, scale, use_mask):
  """``lax.scan`` over tokens. Inputs as in ``lasad_jax.ops.lasad_attention`` (already validated;
  ``width``/``prefix`` int32 [B], ``boundary`` f32 [H], ``initial_state`` f32 [B, H, K, V]).
  Returns ``(o [B, T, H, V] float32, final_state [B, H, K, V] float32)``.
  """
  batch, seq_len, heads, _ = q.shape
  if use_mask:
    g = mask.masked_gate(g.astype(jnp.float32), mask.row_starts(seq_len, width, prefix, batch),
                         boundary)

  def body(state, xs):
    return recurrent_step(state, *xs, scale)

  xs = tuple(jnp.moveaxis(x, 1, 0) for x in (q, k, v, g))
  final_state, o = jax.lax.scan(body, initial_state, xs)
  return jnp.moveaxis(o, 0, 1), final_state


GATE_FLOOR = 1e-30   # the forget gate's clamp before its log (here and in the decode / Pallas kernels)


def hgrn2_gates(q_raw, f, lb):
  """HGRN2's gates (LASADGen's attention, ``lasad_jax.model``) from the projections q_raw and f:
  q = silu(q_raw), s = sigmoid(f), k = (1 - lb)(1 - s) = 1 - exp(g) and the log forget gate
  g = log(lb + (1 - lb) s) (float32; lb = 0 in layer 0 gives log sigmoid(f)). q and k come back
  in the projections' dtype. ``lb`` broadcasts against the trailing axes of q_raw / f."""
  f32 = jnp.float32
  s = jax.nn.sigmoid(f.astype(f32))
  gate = s + lb * (1.0 - s)                          # lb + (1 - lb) * sigmoid(f)
  g = jnp.log(jnp.maximum(gate, GATE_FLOOR))
  k = (1.0 - lb) * (1.0 - s)                         # 1 - exp(g), from the unmasked gate
  return jax.nn.silu(q_raw), k.astype(f.dtype), g
