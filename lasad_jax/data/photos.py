"""Crops of the colour photographs scikit-image ships in its wheel, as palette tokens.

Natural-image statistics on 32x32 (or wider) token grids with no download: the local stand-in for
ImageNet codes. Class = source photograph (eight of them). Each photo is resized so its short side
is ``6 * size`` pixels; its rightmost quarter is held out (test crops come only from there, training
crops only from the rest). Pixels become tokens through a fixed palette: k-means (``k`` colours,
seed 0) over pixels of the training regions, nearest colour per pixel. Training crops are random
(position, horizontal flip) but fixed per record index, so the stream is reproducible and resumable.
"""

import functools

import grain.python as grain
import numpy as np

PHOTOS = ("astronaut", "chelsea", "coffee", "hubble_deep_field", "immunohistochemistry",
          "motorcycle_left", "retina", "rocket")
NUM_CLASSES = len(PHOTOS)
TRAIN_PER_PHOTO, TEST_PER_PHOTO = 2500, 64
HELD_OUT = 0.25


def _load(name):
  from skimage import data
  if name == "motorcycle_left":
    return data.stereo_motorcycle()[0]
  return getattr(data, name)()


@functools.lru_cache(maxsize=4)
def prepared(size, k):
  """(palette uint8 [k, 3], token maps int32 per photo, train column limit per photo)."""
  from PIL import Image
  from sklearn.cluster import KMeans
  imgs = []
  for name in PHOTOS:
    im = Image.fromarray(_load(name)[..., :3])
    s = 6 * size / min(im.size)
    imgs.append(np.asarray(im.resize((round(im.size[0] * s), round(im.size[1] * s)),
                                     Image.LANCZOS)))
  limits = [int(im.shape[1] * (1 - HELD_OUT)) for im in imgs]
  rng = np.random.default_rng(0)
  pix = np.concatenate([
      im[:, :lim].reshape(-1, 3)[rng.choice(im.shape[0] * lim, 4000, replace=False)]
      for im, lim in zip(imgs, limits)]).astype(np.float64)
  km = KMeans(n_clusters=k, n_init=1, random_state=0, max_iter=100).fit(pix)
  palette = np.clip(np.rint(km.cluster_centers_), 0, 255).astype(np.uint8)
  maps = [quantise(im, palette) for im in imgs]
  return palette, maps, limits


def quantise(img, palette):
  """uint8 [h, w, 3] -> int32 [h, w] nearest palette colour (squared RGB distance)."""
  flat = img.reshape(-1, 3).astype(np.float32)
  pal = palette.astype(np.float32)
  out = np.empty(len(flat), np.int32)
  for s in range(0, len(flat), 65536):
    x = flat[s:s + 65536]
    d = (x * x).sum(1, keepdims=True) - 2 * x @ pal.T + (pal * pal).sum(1)
    out[s:s + 65536] = d.argmin(1)
  return out.reshape(img.shape[:2])


class PhotosSource(grain.RandomAccessDataSource):
  """{"tokens": int32 [size*size], "label": int32} for split train | test."""

  def __init__(self, split="train", size=32, palette_size=256):
    if split not in ("train", "test"):
      raise ValueError(f"`split` must be 'train' or 'test', got {split!r}")
    if not 8 <= size <= 128:
      raise ValueError(f"`size` (crop side in pixels = tokens) must be in [8, 128], got {size}")
    self.split, self.size = split, size
    self.palette, self._maps, self._limits = prepared(size, palette_size)

  def __len__(self):
    return NUM_CLASSES * (TRAIN_PER_PHOTO if self.split == "train" else TEST_PER_PHOTO)

  def __repr__(self):   # grain checks it on resume
    return f"PhotosSource(split={self.split!r}, size={self.size}, palette_size={len(self.palette)})"

  def __getitem__(self, i):
    i = int(i)
    cls = i % NUM_CLASSES
    m, lim, s = self._maps[cls], self._limits[cls], self.size
    rng = np.random.default_rng([0 if self.split == "train" else 1, i])
    y = rng.integers(0, m.shape[0] - s + 1)
    if self.split == "train":
      x = rng.integers(0, lim - s + 1)
      crop = m[y:y + s, x:x + s]
      if rng.random() < 0.5:
        crop = crop[:, ::-1]
    else:
      x = rng.integers(lim, m.shape[1] - s + 1)
      crop = m[y:y + s, x:x + s]
    return {"tokens": np.ascontiguousarray(crop).reshape(-1), "label": np.int32(cls)}

  def to_pixels(self, tokens):
    return self.palette[np.clip(tokens, 0, len(self.palette) - 1)]
