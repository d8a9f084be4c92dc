"""Pre-extracted KL-VAE posteriors of ImageNet (LINA's training data) as a grain source.

On-disk format (``lasad_latents/v1``), one directory per split::

    DIR/{split}/index.json          {"format": "lasad_latents/v1", "grid": [h, w], "channels": C,
                                     "num_variants": V, "shards": [{"moments": ..., "labels": ...,
                                     "count": n}, ...]}
    DIR/{split}/moments-00000.npy   float16 [n, V, h, w, 2C]  posterior mean and log-variance of
                                    V augmentations (centre crop and flip, or ten-crop x flip)
    DIR/{split}/labels-00000.npy    int32 [n]

As MAR caches them: training draws a variant and a posterior sample ``mean + exp(logvar / 2) eps``
per record and epoch (a seeded ``grain.RandomMapTransform``: deterministic and resumable), scaled
by ``config.latent_scale``; evaluation takes variant 0's mean. Records come out as
``{"latents": float32 [h*w, C], "label"}``, which the LINA objective reads. Written by
``scripts/extract_codes.py --kl-checkpoint`` (and :func:`write_shards`); shards are memory-mapped.
"""

import json
import os

import grain.python as grain
import numpy as np

from lasad_jax.data.imagenet_codes import ShardedSource, _save_npy

FORMAT = "lasad_latents/v1"


def shard_names(j):
  return f"moments-{j:05d}.npy", f"labels-{j:05d}.npy"


def write_shard(directory, j, moments, labels):
  """Shard ``j``: moments [n, V, h, w, 2C] (or [n, h, w, 2C]) as float16, labels [n] as int32;
  each file under a temporary name then renamed, labels last (they mark a complete shard)."""
  moments = np.asarray(moments)
  if moments.ndim == 4:
    moments = moments[:, None]
  labels = np.asarray(labels, np.int32)
  if moments.ndim != 5 or len(moments) != len(labels) or moments.shape[-1] % 2:
    raise ValueError(f"`moments` must be [n, V, h, w, 2C] with n = len(labels); got "
                     f"{moments.shape} and {labels.shape}")
  os.makedirs(directory, exist_ok=True)
  mname, lname = shard_names(j)
  _save_npy(os.path.join(directory, mname), moments.astype(np.float16))
  _save_npy(os.path.join(directory, lname), labels)


def write_index(directory, num_shards):
  shards, shape = [], None
  for j in range(num_shards):
    mname, lname = shard_names(j)
    m = np.load(os.path.join(directory, mname), mmap_mode="r")
    shape = m.shape
    shards.append({"moments": mname, "labels": lname, "count": int(m.shape[0])})
  index = {"format": FORMAT, "grid": list(shape[2:4]), "channels": int(shape[4] // 2),
           "num_variants": int(shape[1]), "shards": shards}
  tmp = os.path.join(directory, "index.json.tmp")
  with open(tmp, "w") as f:
    json.dump(index, f, indent=1)
  os.replace(tmp, os.path.join(directory, "index.json"))


def write_shards(directory, moments, labels, *, shard_size=10000):
  n = 0
  for j, s in enumerate(range(0, len(moments), shard_size)):
    write_shard(directory, j, moments[s:s + shard_size], labels[s:s + shard_size])
    n = j + 1
  write_index(directory, n)


class LatentsSource(ShardedSource):
  """{"moments": float16 [V, h*w, 2C], "label": int32}; pair with :func:`operations`."""

  FORMAT = FORMAT
  ARRAY = "moments"
  WHAT = "extracted latents (scripts/extract_codes.py --kl-checkpoint)"

  def __init__(self, data_dir, split="train"):
    super().__init__(data_dir, split)
    self.channels = int(self.index["channels"])

  def __getitem__(self, i):
    m, label = self._record(i)
    return {"moments": m.reshape(m.shape[0], -1, m.shape[-1]), "label": label}


class SamplePosterior(grain.RandomMapTransform):
  def __init__(self, scale):
    self.scale = scale

  def random_map(self, element, rng):
    m = element["moments"][rng.integers(len(element["moments"]))].astype(np.float32)
    mean, logvar = np.split(m, 2, axis=-1)
    eps = rng.standard_normal(mean.shape).astype(np.float32)
    z = mean + np.exp(0.5 * np.clip(logvar, -30.0, 20.0)) * eps
    return {"latents": (z * self.scale).astype(np.float32), "label": element["label"]}


class PosteriorMean(grain.MapTransform):
  def __init__(self, scale):
    self.scale = scale

  def map(self, element):
    mean = np.split(element["moments"][0].astype(np.float32), 2, axis=-1)[0]
    return {"latents": mean * self.scale, "label": element["label"]}


def operations(split, scale):
  return [SamplePosterior(scale)] if split == "train" else [PosteriorMean(scale)]
