"""Data sources (grain) for training and evaluation, chosen by ``config.data``.

    digits          scikit-learn's 8x8 digits, 17 intensity tokens, 10 classes  (data/digits.py)
    shapes          procedural coloured shapes, 9 tokens, 8 classes, grid 16 or 32  (data/shapes.py)
    photos          crops of scikit-image's photographs, k-means palette tokens, 8 classes
                    (data/photos.py)
    imagenet_codes  pre-extracted VQ codes + labels from ``config.data_dir``  (data/imagenet_codes.py)
    imagenet_latents  pre-extracted KL-VAE posteriors + labels (LINA)  (data/imagenet_latents.py)
    synthetic       uniform random tokens and labels of the config's shape (benchmarks, smoke tests)

:func:`get_source` returns ``(source, operations)`` for :func:`lasad_jax.data.loader.make_loader`;
:func:`check_config` says clearly when the model config does not fit the data (vocabulary, grid,
classes); :func:`to_pixels` turns sampled token grids into RGB where the dataset defines how.
"""

import numpy as np

from lasad_jax.data.loader import make_loader  # noqa: F401

DATASETS = ("digits", "shapes", "photos", "imagenet_codes", "imagenet_latents", "synthetic")


class SyntheticSource:
  """Uniform random tokens and labels, fixed per index (ImageNet-code-shaped batches for timing)."""

  def __init__(self, split, vocab, grid, num_classes):
    self._stream, self.vocab, self.n, self.classes = (0 if split == "train" else 1), vocab, \
        int(np.prod(grid)), num_classes

  def __len__(self):
    return 100_000 if self._stream == 0 else 1_000

  def __repr__(self):
    return f"SyntheticSource(stream={self._stream}, vocab={self.vocab}, n={self.n})"

  def __getitem__(self, i):
    rng = np.random.default_rng([2, self._stream, int(i)])
    return {"tokens": rng.integers(0, self.vocab, self.n, dtype=np.int32),
            "label": np.int32(rng.integers(0, self.classes))}


def _name(cfg):
  name = cfg.get("data", None)
  if name not in DATASETS:
    raise ValueError(f"config.data={name!r} is not a dataset; choose one of {list(DATASETS)}")
  return name


def _side(cfg):
  h, w = cfg.grid
  if h != w:
    raise ValueError(f"config.data={cfg.data!r} makes square images; config.grid is {cfg.grid}")
  return h


def get_source(cfg, split):
  """``(source, operations)`` of split ``train`` | ``test`` for ``cfg.data``."""
  name = _name(cfg)
  if name == "digits":
    from lasad_jax.data.digits import DigitsSource
    return DigitsSource(split), ()
  if name == "shapes":
    from lasad_jax.data.shapes import ShapesSource
    return ShapesSource(split, size=_side(cfg)), ()
  if name == "photos":
    from lasad_jax.data.photos import PhotosSource
    return PhotosSource(split, size=_side(cfg), palette_size=cfg.vocab_size), ()
  if name == "synthetic":
    return SyntheticSource(split, cfg.vocab_size, tuple(cfg.grid), cfg.num_classes), ()
  split_dir = "train" if split == "train" else "val"
  if name == "imagenet_latents":
    from lasad_jax.data import imagenet_latents as il
    return il.LatentsSource(cfg.get("data_dir", ""), split_dir), \
        il.operations(split, cfg.get("latent_scale", 1.0))
  from lasad_jax.data import imagenet_codes as ic
  return ic.CodesSource(cfg.get("data_dir", ""), "train" if split == "train" else "val"), \
      ic.operations(split)


def spec(cfg):
  """(vocab_size, grid, num_classes) the dataset produces."""
  name = _name(cfg)
  if name == "digits":
    from lasad_jax.data import digits
    return digits.VOCAB, digits.GRID, digits.NUM_CLASSES
  if name == "shapes":
    from lasad_jax.data import shapes
    return shapes.VOCAB, (_side(cfg),) * 2, shapes.NUM_CLASSES
  if name == "photos":
    from lasad_jax.data import photos
    return cfg.vocab_size, (_side(cfg),) * 2, photos.NUM_CLASSES
  if name == "synthetic":
    return cfg.vocab_size, tuple(cfg.grid), cfg.num_classes
  src, _ = get_source(cfg, "train")
  if name == "imagenet_latents":
    if cfg.get("latent_channels") != src.channels:
      raise ValueError(f"config.latent_channels={cfg.get('latent_channels')} but the extracted "
                       f"latents have {src.channels} channels")
    return 0, src.grid, cfg.num_classes    # continuous: no vocabulary
  return src.index["codebook_size"], src.grid, cfg.num_classes


def check_config(cfg):
  """Raise a ValueError naming the field when the model cannot read or write this data."""
  vocab, grid, classes = spec(cfg)
  problems = []
  if cfg.get("vocab_size", 0) < vocab:
    problems.append(f"config.vocab_size={cfg.get('vocab_size')} < the data's {vocab} tokens")
  if tuple(cfg.grid) != tuple(grid):
    problems.append(f"config.grid={tuple(cfg.grid)} but the data's images are {tuple(grid)}")
  if cfg.num_classes < classes:
    problems.append(f"config.num_classes={cfg.num_classes} < the data's {classes} classes")
  if problems:
    raise ValueError(f"config does not fit data {cfg.data!r}: " + "; ".join(problems))


def to_pixels(cfg, tokens):
  """Token grids [N, h, w] -> uint8 RGB [N, h, w, 3], or None where the dataset has no decoder
  here (imagenet_codes needs the VQ tokenizer)."""
  name = _name(cfg)
  tokens = np.asarray(tokens)
  if name == "digits":
    from lasad_jax.data import digits
    return digits.to_pixels(tokens)
  if name == "shapes":
    from lasad_jax.data import shapes
    return shapes.to_pixels(tokens)
  if name == "photos":
    from lasad_jax.data.photos import PhotosSource
    return PhotosSource("test", size=_side(cfg), palette_size=cfg.vocab_size).to_pixels(tokens)
  return None


def save_image_grid(images, path, cols=8, pad=1, width=512):
  """uint8 images [N, h, w, 3] as one PNG grid on white (``cols`` per row), upscaled by an integer
  factor to about ``width`` pixels."""
  from PIL import Image
  images = np.asarray(images)
  n, h, w, _ = images.shape
  cols = max(1, min(cols, n))
  rows = -(-n // cols)
  grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), 255, np.uint8)
  for i, im in enumerate(images):
    r, c = divmod(i, cols)
    y, x = pad + r * (h + pad), pad + c * (w + pad)
    grid[y:y + h, x:x + w] = im
  scale = max(1, width // grid.shape[1])
  Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale),
                               Image.NEAREST).save(path)
