"""Kernels behind lasad_jax.ops: one sub-package per operator."""
