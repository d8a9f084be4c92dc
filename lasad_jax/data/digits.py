"""scikit-learn's 8x8 handwritten digits as class-conditional token images (ships with the package).

Pixel intensities 0..16 are the tokens (vocab 17), the grid is 8x8, the class is the digit. A fixed
held-out split: a permutation with seed 0, the last 297 of the 1797 images are the test split.
"""

import grain.python as grain
import numpy as np

VOCAB, GRID, NUM_CLASSES, TEST_SIZE = 17, (8, 8), 10, 297


class DigitsSource(grain.RandomAccessDataSource):
  """Random-access source of {"tokens": int32 [64], "label": int32} for split train | test."""

  def __init__(self, split="train"):
    if split not in ("train", "test"):
      raise ValueError(f"`split` must be 'train' or 'test', got {split!r}")
    from sklearn.datasets import load_digits
    d = load_digits()
    order = np.random.default_rng(0).permutation(len(d.target))
    idx = order[:-TEST_SIZE] if split == "train" else order[-TEST_SIZE:]
    self._tokens = d.images[idx].reshape(len(idx), -1).astype(np.int32)
    self._labels = d.target[idx].astype(np.int32)

  def __len__(self):
    return len(self._labels)

  def __getitem__(self, i):
    return {"tokens": self._tokens[i], "label": self._labels[i]}


def make_loader(source, batch_size, *, seed, shuffle=True, num_epochs=None, shard_index=0,
                shard_count=1):
  """A deterministic, checkpointable grain DataLoader of batches (drop_remainder), sharded per
  process. Its iterator's get_state()/set_state() resume the stream exactly."""
  if batch_size <= 0 or batch_size > len(source):
    raise ValueError(f"`batch_size` must be in [1, {len(source)}], got {batch_size}")
  sampler = grain.IndexSampler(
      len(source), shuffle=shuffle, seed=seed, num_epochs=num_epochs,
      shard_options=grain.ShardOptions(shard_index=shard_index, shard_count=shard_count,
                                       drop_remainder=True))
  return grain.DataLoader(data_source=source, sampler=sampler,
                          operations=[grain.Batch(batch_size, drop_remainder=True)],
                          worker_count=0)
