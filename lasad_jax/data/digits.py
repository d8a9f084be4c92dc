"""scikit-learn's 8x8 handwritten digits as class-conditional token images (ships with the package).

Pixel intensities 0..16 are the tokens (vocab 17), the grid is 8x8, the class is the digit. A fixed
held-out split: a permutation with seed 0, the last 297 of the 1797 images are the test split.
"""

import grain.python as grain
import numpy as np

from lasad_jax.data.loader import make_loader  # noqa: F401  (re-exported)

VOCAB, GRID, NUM_CLASSES, TEST_SIZE = 17, (8, 8), 10, 297


class DigitsSource(grain.RandomAccessDataSource):
  """Random-access source of {"tokens": int32 [64], "label": int32} for split train | test."""

  def __init__(self, split="train"):
    if split not in ("train", "test"):
      raise ValueError(f"`split` must be 'train' or 'test', got {split!r}")
    from sklearn.datasets import load_digits
    d = load_digits()
    self._split = split
    order = np.random.default_rng(0).permutation(len(d.target))
    idx = order[:-TEST_SIZE] if split == "train" else order[-TEST_SIZE:]
    self._tokens = d.images[idx].reshape(len(idx), -1).astype(np.int32)
    self._labels = d.target[idx].astype(np.int32)

  def __len__(self):
    return len(self._labels)

  def __repr__(self):   # grain checks it on resume: the same data, whatever the object
    return f"DigitsSource(split={self._split!r})"

  def __getitem__(self, i):
    return {"tokens": self._tokens[i], "label": self._labels[i]}


def to_pixels(tokens):
  """Token grids [N, 8, 8] (intensities 0..16) -> uint8 RGB [N, 8, 8, 3], ink dark on white."""
  grey = (255 - np.clip(tokens, 0, 16) * 255 // 16).astype(np.uint8)
  return np.repeat(grey[..., None], 3, -1)

