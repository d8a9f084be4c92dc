"""sample.py end to end on the tiny config: random init, and an Orbax checkpoint round trip."""

import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args):
  return subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=600)


def test_refuses_without_checkpoint(tmp_path):
  r = _run("--config", "configs/lasad.py:tiny", "--out", str(tmp_path))
  assert r.returncode != 0 and "--random-init" in r.stderr


def test_random_init_and_checkpoint_give_same_tokens(tmp_path):
  import orbax.checkpoint as ocp
  from flax import nnx

  from configs.lasad import get_config
  from lasad_jax import model as M
  ckpt = tmp_path / "ckpt"
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(str(ckpt), M.LASADGen(get_config("tiny"), rngs=nnx.Rngs(0)).params())
  ckptr.wait_until_finished()
  common = ["--config", "configs/lasad.py:tiny", "--classes", "1,7", "--num-per-class", "3",
            "--batch-size", "4", "--cfg-scale", "2.0", "--top-k", "5", "--seed", "3"]
  r1 = _run(*common, "--random-init", "--out", str(tmp_path / "a"))
  assert r1.returncode == 0, r1.stderr[-2000:]
  r2 = _run(*common, "--checkpoint", str(ckpt), "--out", str(tmp_path / "b"))
  assert r2.returncode == 0, r2.stderr[-2000:]
  a, b = np.load(tmp_path / "a" / "tokens.npz"), np.load(tmp_path / "b" / "tokens.npz")
  assert a["tokens"].shape == (6, 8, 8)
  np.testing.assert_array_equal(a["labels"], [1, 1, 1, 7, 7, 7])
  # The tiny model's random init uses seed 0, the checkpoint holds the same weights.
  np.testing.assert_array_equal(a["tokens"], b["tokens"])
  assert (tmp_path / "a" / "tokens.png").exists()


@pytest.mark.parametrize("classes", ["11", "x"])
def test_bad_classes(tmp_path, classes):
  r = _run("--config", "configs/lasad.py:tiny", "--random-init", "--classes", classes,
           "--out", str(tmp_path))
  assert r.returncode != 0 and "--classes" in r.stderr


def test_vq_checkpoint_decodes_to_pixels(tmp_path):
  """A config naming a VQ checkpoint gets images through the tokenizer (tiny fixture VQ: codebook
  64, downsample 2, so an 8x8 token grid becomes 16x16 pixels)."""
  fix = os.path.join(ROOT, "tests", "fixtures", "vq_tiny.pt")
  r = _run("--config", "configs/lasad.py:tiny", "--random-init", "--classes", "1",
           "--num-per-class", "2", "--config.vocab_size=64", f"--config.vq_checkpoint={fix}",
           "--config.vq_config.ch=32", "--config.vq_config.ch_mult=(1, 2)",
           "--config.vq_config.z_channels=32", "--config.vq_config.codebook_size=64",
           "--out", str(tmp_path))
  assert r.returncode == 0, r.stderr[-2000:]
  img = np.load(tmp_path / "images.npz")["arr_0"]
  assert img.shape == (2, 16, 16, 3) and img.dtype == np.uint8 and img.std() > 0


def test_autotune_script_then_sample_with_its_directory(tmp_path):
  """scripts/autotune_sampler.py makes the directory sample.py --autotune_dir reads (on a CPU
  XLA autotunes nothing, so it stays empty: the GPU side is in BENCHMARKS.md session 32); the
  tokens are those of a run without it; a missing directory is refused by name."""
  common = ["--config", "configs/lasad.py:tiny", "--cfg_scale", "2.0", "--top_k", "5"]
  at = tmp_path / "at"
  r = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "autotune_sampler.py"),
                      *common, "--batch-size", "2", "--out", str(at)], cwd=ROOT,   # dashes too
                     capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-2000:]
  assert at.is_dir() and "autotuning results written to" in r.stdout, r.stdout
  assert "nothing was searched" in r.stdout, r.stdout
  run = common + ["--random-init", "--classes", "1,7", "--num-per-class", "1", "--seed", "4"]
  r1 = _run(*run, "--out", str(tmp_path / "a"))
  r2 = _run(*run, "--autotune_dir", str(at), "--out", str(tmp_path / "b"))
  assert r1.returncode == 0 and r2.returncode == 0, (r1.stderr[-2000:], r2.stderr[-2000:])
  np.testing.assert_array_equal(np.load(tmp_path / "a" / "tokens.npz")["tokens"],
                                np.load(tmp_path / "b" / "tokens.npz")["tokens"])
  r3 = _run(*run, "--autotune_dir", str(tmp_path / "missing"), "--out", str(tmp_path / "c"))
  assert r3.returncode != 0 and "`autotune_dir`" in r3.stderr and "is not a directory" in r3.stderr
