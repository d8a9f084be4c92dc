"""Data sources: shapes, photos, imagenet_codes (on generated shards), registry checks."""

import ml_collections
import numpy as np
import pytest

from configs import photos as photos_cfg
from configs import shapes as shapes_cfg
from lasad_jax import data as D
from lasad_jax.data import imagenet_codes as ic
from lasad_jax.data.photos import PhotosSource
from lasad_jax.data.shapes import NUM_CLASSES, ShapesSource, draw


def test_shapes_are_deterministic_and_class_dependent():
  a, b = ShapesSource("train", 16), ShapesSource("train", 16)
  for i in (0, 7, 1234):
    np.testing.assert_array_equal(a[i]["tokens"], b[i]["tokens"])
  x = a[3]
  assert x["tokens"].shape == (256,) and x["tokens"].dtype == np.int32 and x["label"] == 3
  assert set(np.unique(x["tokens"])) <= set(range(9)) and (x["tokens"] > 0).sum() > 4
  assert not np.array_equal(ShapesSource("test", 16)[3]["tokens"], x["tokens"])
  # Same centre and size: every class draws a different mask.
  masks = [draw(c, 32, 16, 16, 10).tobytes() for c in range(NUM_CLASSES)]
  assert len(set(masks)) == NUM_CLASSES
  assert ShapesSource("train", 32)[0]["tokens"].shape == (1024,)
  with pytest.raises(ValueError, match="size"):
    ShapesSource("train", 4)


def test_photos_split_palette_and_crops():
  tr, te = PhotosSource("train", 32), PhotosSource("test", 32)
  assert tr.palette.shape == (256, 3) and len(tr) == 20000 and len(te) == 512
  x = tr[5]
  assert x["tokens"].shape == (1024,) and x["label"] == 5 and x["tokens"].max() < 256
  assert len(np.unique(x["tokens"])) > 4     # a natural crop uses many colours
  np.testing.assert_array_equal(PhotosSource("train", 32)[5]["tokens"], x["tokens"])
  # Held-out crops come from the held-out columns: no test crop equals a training crop.
  train_set = {tr[i]["tokens"].tobytes() for i in range(0, 2000)}
  assert not any(te[i]["tokens"].tobytes() in train_set for i in range(len(te)))
  # The palette reproduces the photos closely (mean abs error in 0..255).
  from lasad_jax.data import photos as P
  _, maps, _ = P.prepared(32, 256)
  assert maps[0].dtype == np.int32
  pix = te.to_pixels(te[0]["tokens"].reshape(32, 32))
  assert pix.shape == (32, 32, 3) and pix.dtype == np.uint8


def test_codes_shards_round_trip_and_variants(tmp_path):
  rng = np.random.default_rng(0)
  codes = rng.integers(0, 16384, (25, 4, 16, 16))
  labels = rng.integers(0, 1000, 25)
  ic.write_shards(tmp_path / "train", codes, labels, codebook_size=16384, shard_size=10)
  ic.write_shards(tmp_path / "val", codes[:5, 0], labels[:5], codebook_size=16384)
  src = ic.CodesSource(str(tmp_path), "train")
  assert len(src) == 25 and src.grid == (16, 16) and len(src.index["shards"]) == 3
  np.testing.assert_array_equal(src[17]["variants"], codes[17].reshape(4, 256))
  assert src[17]["label"] == labels[17]
  # Training picks a random variant per record and epoch, reproducibly.
  def stream(seed):
    it = iter(D.make_loader(src, 5, seed=seed, operations=ic.operations("train")))
    return [next(it) for _ in range(10)]    # two epochs
  a, b = stream(0), stream(0)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x["tokens"], y["tokens"])
  picked = {}
  for batch in a:
    for t, l in zip(batch["tokens"], batch["label"]):
      i = next(j for j in range(25) if labels[j] == l and
               any((t == codes[j, v].reshape(-1)).all() for v in range(4)))
      picked.setdefault(i, set()).add(next(v for v in range(4) if (t == codes[i, v].reshape(-1)).all()))
  assert any(len(v) > 1 for v in picked.values())   # some image seen as two different variants
  val = ic.CodesSource(str(tmp_path), "val")
  x = ic.FirstVariant().map(val[2])
  np.testing.assert_array_equal(x["tokens"], codes[2, 0].reshape(-1))
  with pytest.raises(FileNotFoundError, match="config.data_dir"):
    ic.CodesSource(str(tmp_path / "nope"), "train")
  with pytest.raises(ValueError, match="codebook_size"):
    ic.write_shards(tmp_path / "bad", codes, labels, codebook_size=100)


def test_registry_checks_configs(tmp_path):
  c = shapes_cfg.get_config("32")
  src, ops = D.get_source(c, "train")
  assert src[0]["tokens"].shape == (1024,) and ops == ()
  D.check_config(c)
  c.vocab_size = 4
  with pytest.raises(ValueError, match="config.vocab_size=4"):
    D.check_config(c)
  p = photos_cfg.get_config()
  p.grid = (32, 16)
  with pytest.raises(ValueError, match="square"):
    D.check_config(p)
  c = shapes_cfg.get_config()
  c.data = "imagenet_codes"
  c.data_dir = ""
  with pytest.raises(ValueError, match="config.data_dir"):
    D.check_config(c)
  c.data = "synthetic"
  s, _ = D.get_source(ml_collections.FrozenConfigDict(c), "train")
  assert s[3]["tokens"].max() < c.vocab_size and len(s) == 100_000
  assert D.to_pixels(c, np.zeros((2, 16, 16), np.int32)) is None
  assert D.to_pixels(shapes_cfg.get_config(), np.zeros((2, 16, 16), np.int32)).shape == (2, 16, 16, 3)
