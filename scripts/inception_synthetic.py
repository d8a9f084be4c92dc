"""Deterministic synthetic weights for the FID Inception-v3 (pure NumPy; shared by the PyTorch
fixture script and the JAX test, so the 95 MB network never has to be committed)."""

import numpy as np


def synthetic_weights(shapes):
  """{name: float32 array} for torch-layout ``shapes`` ({name: shape}); generated in sorted-name
  order from one seed: He-scaled conv/fc weights, BatchNorm statistics away from the identity."""
  rng = np.random.default_rng(0)
  out = {}
  for name in sorted(shapes):
    shape = tuple(shapes[name])
    if name.endswith("conv.weight"):
      fan_in = int(np.prod(shape[1:]))
      v = rng.normal(0.0, np.sqrt(2.0 / fan_in), shape)
    elif name.endswith("bn.weight") or name.endswith("running_var"):
      v = rng.uniform(0.5, 1.5, shape)
    elif name.endswith("bn.bias") or name.endswith("running_mean"):
      v = rng.normal(0.0, 0.1, shape)
    else:   # fc
      v = rng.normal(0.0, 0.02, shape)
    out[name] = v.astype(np.float32)
  return out
