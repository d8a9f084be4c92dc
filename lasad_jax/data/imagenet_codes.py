"""Pre-extracted VQ codes of ImageNet (or any labelled image set) as a grain source.

On-disk format (``lasad_codes/v1``), one directory per split::

    DIR/{split}/index.json       {"format": "lasad_codes/v1", "grid": [h, w], "num_variants": V,
                                  "codebook_size": 16384, "shards": [{"codes": "codes-00000.npy",
                                  "labels": "labels-00000.npy", "count": n}, ...]}
    DIR/{split}/codes-00000.npy  uint16 [n, V, h, w]   V augmentations of each image (LlamaGen's
                                                       ten-crop x flip; V = 1 is fine)
    DIR/{split}/labels-00000.npy int32  [n]

:func:`write_shards` writes it (the code extractor and the tests use it); shards are memory-mapped.
Training picks one of the V variants per record and epoch (a ``grain.RandomMapTransform``, seeded
by the loader: deterministic and resumable); evaluation uses variant 0.
"""

import json
import os

import grain.python as grain
import numpy as np

FORMAT = "lasad_codes/v1"


def _save_npy(path, arr):
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    np.save(f, arr)
  os.replace(tmp, path)


def shard_names(j):
  return f"codes-{j:05d}.npy", f"labels-{j:05d}.npy"


def write_shard(directory, j, codes, labels, *, codebook_size):
  """Shard ``j``: codes [n, V, h, w] (or [n, h, w]) as uint16 and labels [n] as int32, each file
  under a temporary name then renamed (a killed writer leaves no partial shard)."""
  codes = np.asarray(codes)
  if codes.ndim == 3:
    codes = codes[:, None]
  labels = np.asarray(labels, np.int32)
  if codes.ndim != 4 or len(codes) != len(labels):
    raise ValueError(f"`codes` must be [n, V, h, w] with n = len(labels); got {codes.shape} and "
                     f"{labels.shape}")
  if codes.size and (codes.min() < 0 or codes.max() >= codebook_size or codebook_size > 65536):
    raise ValueError(f"codes must lie in [0, codebook_size={codebook_size}) and fit uint16")
  os.makedirs(directory, exist_ok=True)
  cname, lname = shard_names(j)
  _save_npy(os.path.join(directory, cname), codes.astype(np.uint16))
  _save_npy(os.path.join(directory, lname), labels)   # written last: marks the shard complete


def write_index(directory, num_shards, *, codebook_size):
  """index.json over shards 0..num_shards-1 (read back for counts, grid and variants)."""
  shards = []
  grid = variants = None
  for j in range(num_shards):
    cname, lname = shard_names(j)
    c = np.load(os.path.join(directory, cname), mmap_mode="r")
    grid, variants = list(c.shape[2:]), int(c.shape[1])
    shards.append({"codes": cname, "labels": lname, "count": int(c.shape[0])})
  index = {"format": FORMAT, "grid": grid, "num_variants": variants,
           "codebook_size": int(codebook_size), "shards": shards}
  tmp = os.path.join(directory, "index.json.tmp")
  with open(tmp, "w") as f:
    json.dump(index, f, indent=1)
  os.replace(tmp, os.path.join(directory, "index.json"))


def write_shards(directory, codes, labels, *, codebook_size, shard_size=10000):
  """Write ``codes`` [n, V, h, w] (or [n, h, w]) and ``labels`` [n] as a ``lasad_codes/v1`` split:
  shards, then the index (a reader never sees half a set)."""
  codes, labels = np.asarray(codes), np.asarray(labels)
  if len(codes) != len(labels):
    raise ValueError(f"`codes` and `labels` differ in length: {codes.shape} vs {labels.shape}")
  n = 0
  for j, s in enumerate(range(0, len(codes), shard_size)):
    write_shard(directory, j, codes[s:s + shard_size], labels[s:s + shard_size],
                codebook_size=codebook_size)
    n = j + 1
  write_index(directory, n, codebook_size=codebook_size)


class ShardedSource(grain.RandomAccessDataSource):
  """Shards listed in ``DIR/{split}/index.json`` (format ``FORMAT``), each an array file under
  ``ARRAY`` (memory-mapped) and a labels file; records are addressed across shards."""

  FORMAT = FORMAT
  ARRAY = "codes"
  WHAT = "extracted codes (see scripts/extract_codes.py)"

  def __init__(self, data_dir, split="train"):
    if not data_dir:
      raise ValueError(f"config.data_dir must name the directory of {self.WHAT}; it is empty")
    self.split = split
    root = os.path.join(data_dir, split)
    path = os.path.join(root, "index.json")
    if not os.path.exists(path):
      raise FileNotFoundError(f"no {path}: config.data_dir={data_dir!r} holds no {split!r} split "
                              f"of {self.WHAT} (format {self.FORMAT})")
    with open(path) as f:
      self.index = json.load(f)
    if self.index.get("format") != self.FORMAT:
      raise ValueError(f"{path}: format {self.index.get('format')!r}, expected {self.FORMAT!r}")
    self.grid = tuple(self.index["grid"])
    self._arrays = [np.load(os.path.join(root, s[self.ARRAY]), mmap_mode="r")
                    for s in self.index["shards"]]
    self._labels = [np.load(os.path.join(root, s["labels"])) for s in self.index["shards"]]
    self._starts = np.cumsum([0] + [s["count"] for s in self.index["shards"]])

  def __len__(self):
    return int(self._starts[-1])

  def __repr__(self):   # grain checks it on resume; the directory may move between runs
    return f"{type(self).__name__}(split={self.split!r}, records={len(self)}, grid={self.grid})"

  def _record(self, i):
    """(the array row of record i, its label)."""
    j = int(np.searchsorted(self._starts, i, side="right") - 1)
    r = int(i) - int(self._starts[j])
    return np.asarray(self._arrays[j][r]), self._labels[j][r]


class CodesSource(ShardedSource):
  """{"variants": uint16 [V, h*w], "label": int32}; pair with :func:`operations` to pick one."""

  def __getitem__(self, i):
    codes, label = self._record(i)
    return {"variants": codes.reshape(self.index["num_variants"], -1), "label": label}


class PickVariant(grain.RandomMapTransform):
  """A random augmentation variant per record and epoch (seeded by grain from the loader seed)."""

  def random_map(self, element, rng):
    v = element["variants"]
    return {"tokens": v[rng.integers(len(v))].astype(np.int32), "label": element["label"]}


class FirstVariant(grain.MapTransform):
  def map(self, element):
    return {"tokens": element["variants"][0].astype(np.int32), "label": element["label"]}


def operations(split):
  return [PickVariant()] if split == "train" else [FirstVariant()]
