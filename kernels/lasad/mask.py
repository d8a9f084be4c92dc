"""The Spatial-Aware Decay row mask (DESIGN.md §1), shared by every implementation.

A position ``t`` is a *row start* when ``t >= prefix + width`` and ``(t - prefix) % width == 0``:
the first token of image rows 1..h-1. There the log forget gate is replaced by ``boundary``.
``width`` and ``prefix`` are int32 arrays of shape [B] (scalars broadcast), so one compiled
program serves every resolution and a batch may mix them.
"""

import jax.numpy as jnp


def row_starts(seq_len, width, prefix, batch):
  """Bool [B, T]: True where the spatial mask replaces the gate.

  A traced ``width <= 0`` means "no mask" for that example (concrete values are rejected
  earlier by ``lasad_jax.ops``), so the modulo never divides by zero.
  """
  t = jnp.arange(seq_len, dtype=jnp.int32)[None, :]
  width = jnp.broadcast_to(jnp.asarray(width, jnp.int32), (batch,))[:, None]
  prefix = jnp.broadcast_to(jnp.asarray(prefix, jnp.int32), (batch,))[:, None]
  rel = t - prefix
  safe_width = jnp.maximum(width, 1)
  return (width > 0) & (rel >= safe_width) & (rel % safe_width == 0)


def head_boundary(boundary, num_heads):
  """Float32 [H] boundary log-decay from a scalar or a per-head array."""
  return jnp.broadcast_to(jnp.asarray(boundary, jnp.float32), (num_heads,))


def masked_gate(g, starts, boundary):
  """g~ : ``g`` [B, T, H, K] with row starts set to ``boundary`` [H] (may be -inf)."""
  b = boundary[None, None, :, None].astype(g.dtype)
  return jnp.where(starts[:, :, None, None], b, g)


def split_gate(g, starts, boundary):
  """Split g~ into a finite log-decay and a reset flag, for the chunked forms.

  Returns ``(g_finite [B, T, H, K] float32, reset [B, T, H] bool)``: ``g~ = -inf`` exactly where
  ``reset`` is set, and ``g_finite`` is 0 there. Cumulative sums of ``g_finite`` never meet
  ``-inf - -inf``; the reset flags become segment ids that zero the decay across a reset exactly.
  """
  is_reset = jnp.isneginf(boundary)
  finite_b = jnp.where(is_reset, 0.0, boundary)
  g_finite = masked_gate(g.astype(jnp.float32), starts, finite_b)
  reset = starts[:, :, None] & is_reset[None, None, :]
  return g_finite, reset
