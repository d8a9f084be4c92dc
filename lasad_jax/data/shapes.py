"""Procedural class-conditional images: one coloured shape on a dark background.

Eight classes (the shape), a random colour from eight, random size and position; tokens are
palette indices (0 = background, 1..8 = colours), so the vocabulary is 9. Images are generated from
the record index alone (``numpy`` generator seeded by (split, index)): random access, no files,
the same on every machine. Grids of 16x16 or 32x32 tokens give the long rows the row mask is about.
"""

import grain.python as grain
import numpy as np

CLASSES = ("circle", "square", "triangle", "cross", "ring", "frame", "diamond", "saltire")
PALETTE = np.array([[16, 16, 24], [230, 57, 70], [244, 162, 97], [233, 196, 106], [42, 157, 143],
                    [69, 123, 157], [168, 218, 220], [181, 101, 167], [241, 250, 238]], np.uint8)
VOCAB, NUM_CLASSES = len(PALETTE), len(CLASSES)
SIZES = {"train": 20000, "test": 1000}


def draw(cls, size, cy, cx, r):
  """Boolean mask [size, size] of shape ``cls`` centred at (cy, cx) with radius r (in tokens)."""
  yy, xx = np.mgrid[:size, :size].astype(np.float64) + 0.5
  dy, dx = yy - cy, xx - cx
  d = np.hypot(dy, dx)
  box = np.maximum(np.abs(dx), np.abs(dy))
  t = 0.3 * r   # stroke half-width
  name = CLASSES[cls]
  if name == "circle":
    return d <= r
  if name == "square":
    return box <= 0.8 * r
  if name == "triangle":
    return (dy <= 0.8 * r) & (dy >= -r) & (np.abs(dx) <= 0.55 * (dy + r))
  if name == "cross":
    return ((np.abs(dx) <= t) | (np.abs(dy) <= t)) & (box <= r)
  if name == "ring":
    return (d <= r) & (d >= r - 1.6 * t)
  if name == "frame":
    return (box <= 0.85 * r) & (box >= 0.85 * r - 1.6 * t)
  if name == "diamond":
    return np.abs(dx) + np.abs(dy) <= r
  return ((np.abs(dx - dy) <= 1.2 * t) | (np.abs(dx + dy) <= 1.2 * t)) & (box <= 0.8 * r)


class ShapesSource(grain.RandomAccessDataSource):
  """{"tokens": int32 [size*size], "label": int32} for split train | test (different streams)."""

  def __init__(self, split="train", size=16):
    if split not in SIZES:
      raise ValueError(f"`split` must be 'train' or 'test', got {split!r}")
    if size < 8:
      raise ValueError(f"`size` (grid side in tokens) must be >= 8, got {size}")
    self.split, self.size = split, size
    self._stream = 0 if split == "train" else 1

  def __len__(self):
    return SIZES[self.split]

  def __repr__(self):   # grain checks it on resume
    return f"ShapesSource(split={self.split!r}, size={self.size})"

  def __getitem__(self, i):
    rng = np.random.default_rng([self._stream, int(i)])
    cls = int(i) % NUM_CLASSES
    s = self.size
    r = rng.uniform(0.2, 0.4) * s
    cy, cx = rng.uniform(r, s - r, 2)
    colour = rng.integers(1, VOCAB)
    tokens = np.where(draw(cls, s, cy, cx, r), colour, 0).astype(np.int32)
    return {"tokens": tokens.reshape(-1), "label": np.int32(cls)}


def to_pixels(tokens):
  """Token grids [N, h, w] -> uint8 RGB [N, h, w, 3] through the palette."""
  return PALETTE[np.clip(tokens, 0, VOCAB - 1)]
