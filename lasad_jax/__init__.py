"""lasad_jax: LASADGen (gated linear attention with Spatial-Aware Decay) in JAX/Flax."""

from lasad_jax.ops import lasad_attention

__all__ = ["lasad_attention"]
