"""LASADGen on scikit-learn's 8x8 digits: trains on CPU in minutes (no download).

    python train.py --config configs/digits.py --workdir runs/digits
    python train.py --config configs/digits.py:reset --workdir runs/digits_reset   # boundary mode
"""

from configs import common, lasad


def get_config(variant="carry"):
  """``variant``: the boundary mode (carry | reset | none | learned) or ``softmax`` (the LlamaGen
  baseline), for the SAD experiment."""
  variant = variant or "carry"
  c = lasad.get_config("tiny")
  if variant == "softmax":
    c.attention = "softmax"
  else:
    c.boundary = variant
  c.vocab_size, c.num_classes, c.grid = 17, 10, (8, 8)
  common.small_cpu_run(c, data="digits", batch_size=64, learning_rate=3e-3, num_steps=400,
                       every=100)
  return c
