"""LASADGen on scikit-learn's 8x8 digits: trains on CPU in minutes (no download)."""

from configs import lasad


def get_config(variant="carry"):
  """``variant``: the boundary mode (carry | reset | none | learned), for the SAD experiment."""
  c = lasad.get_config("tiny")
  c.boundary = variant or "carry"
  c.data = "digits"
  c.vocab_size, c.num_classes, c.grid = 17, 10, (8, 8)
  c.batch_size = 64
  c.learning_rate = 1e-3
  c.warmup_steps = 20
  c.num_steps = 300
  c.weight_decay = 0.05
  c.grad_clip = 1.0
  c.label_dropout = 0.1
  c.seed = 0
  return c
