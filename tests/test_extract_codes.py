"""scripts/extract_codes.py end to end on tensorflow-datasets' mock ImageNet, with the tiny VQ."""

import json
import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
TINY = {"ch": 32, "ch_mult": [1, 2], "z_channels": 32, "codebook_size": 64}


def test_variants_order_and_shapes():
  import extract_codes as E
  img = np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8)
  v = E.variants(img, 16, ten_crop=True)
  assert v.shape == (10, 16, 16, 3)
  np.testing.assert_array_equal(v[5], v[0][:, ::-1])      # flips follow the five crops
  assert E.variants(img, 16, ten_crop=False).shape == (2, 16, 16, 3)


def test_extract_mock_imagenet_and_resume(tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")
  import extract_codes as E

  from lasad_jax.data import imagenet_codes as ic
  args = ["--vq-checkpoint", os.path.join(ROOT, "tests/fixtures/vq_tiny.pt"),
          "--vq-config", json.dumps(TINY), "--out", str(tmp_path), "--image-size", "16",
          "--ten-crop", "--batch-size", "3", "--shard-size", "4", "--splits", "train,validation"]
  with tfds.testing.mock_data(num_examples=10, policy=tfds.testing.MockPolicy.USE_CODE):
    E.main(args)
    src = ic.CodesSource(str(tmp_path), "train")
    assert len(src) == 10 and src.grid == (8, 8) and src.index["num_variants"] == 10
    assert len(src.index["shards"]) == 3 and ic.CodesSource(str(tmp_path), "val").grid == (8, 8)
    first = np.load(tmp_path / "train" / "codes-00001.npy")
    # Interrupted run: a shard is missing; rerunning rebuilds only it, identically.
    os.remove(tmp_path / "train" / "labels-00001.npy")
    os.remove(tmp_path / "train" / "codes-00001.npy")
    before = os.path.getmtime(tmp_path / "train" / "codes-00000.npy")
    E.main(args)
    np.testing.assert_array_equal(np.load(tmp_path / "train" / "codes-00001.npy"), first)
    assert os.path.getmtime(tmp_path / "train" / "codes-00000.npy") == before
  x = src[3]
  assert x["variants"].shape == (10, 64) and int(x["variants"].max()) < 64


def test_extract_kl_latents_for_lina(tmp_path):
  """--kl-checkpoint: posterior moments as lasad_latents/v1; the LINA source reads them back."""
  tfds = pytest.importorskip("tensorflow_datasets")
  import extract_codes as E

  from lasad_jax.data import imagenet_latents as il
  kl_cfg = {"ch": 32, "ch_mult": [1, 1], "num_res_blocks": 1, "embed_dim": 4}
  args = ["--kl-checkpoint", os.path.join(ROOT, "tests/fixtures/kl_tiny.pt"),
          "--vq-config", json.dumps(kl_cfg), "--out", str(tmp_path), "--image-size", "16",
          "--batch-size", "4", "--shard-size", "5", "--splits", "train"]
  with tfds.testing.mock_data(num_examples=7, policy=tfds.testing.MockPolicy.USE_CODE):
    E.main(args)
  src = il.LatentsSource(str(tmp_path), "train")
  assert len(src) == 7 and src.grid == (8, 8) and src.channels == 4
  rec = src[6]
  assert rec["moments"].shape == (2, 64, 8)              # centre crop + flip, mean ; logvar
  rng = np.random.default_rng(0)
  a = il.SamplePosterior(0.5).random_map(rec, np.random.default_rng(1))
  b = il.SamplePosterior(0.5).random_map(rec, np.random.default_rng(1))
  np.testing.assert_array_equal(a["latents"], b["latents"])
  assert a["latents"].shape == (64, 4) and np.isfinite(a["latents"]).all()
  mean = il.PosteriorMean(0.5).map(rec)["latents"]
  np.testing.assert_allclose(mean, 0.5 * rec["moments"][0, :, :4].astype(np.float32))
  del rng
