"""MAR's KL-16 VAE in JAX against a PyTorch port with MAR's names (scripts/torch_kl_reference.py)."""

import ast
import sys

import numpy as np
import pytest

from lasad_jax.tokenizer import kl
from oracle import rel_rms

FIX = "tests/fixtures/kl_tiny"


def _cfg():
  meta = np.load(FIX + ".npz")
  return kl.KLConfig(**ast.literal_eval(str(meta["config"]))), meta


def _check(vae, fx):
  mean, logvar = vae.encode(fx["images"])
  assert rel_rms(mean, fx["mean"]) < 1e-5 and rel_rms(logvar, fx["logvar"]) < 1e-5
  assert rel_rms(vae.decode(fx["latents"]), fx["decoded"]) < 1e-5


def test_kl_matches_pytorch_fixture():
  cfg, fx = _cfg()
  _check(kl.load(FIX + ".pt", cfg), fx)


def test_kl_full_size_shapes():
  shapes = kl.param_shapes(kl.KLConfig())
  n = sum(int(np.prod(s)) for s in shapes.values())
  assert 60e6 < n < 90e6, n            # LDM's f16 KL-VAE with ch 128, ch_mult (1,1,2,2,4)
  assert shapes["encoder.conv_out.weight"] == (3, 3, 512, 32)
  assert shapes["decoder.conv_in.weight"] == (3, 3, 16, 512)


def test_kl_converter_errors_and_input_checks():
  cfg, fx = _cfg()
  from lasad_jax import torch_io
  sd = torch_io.load_state_dict(FIX + ".pt", key="model")
  sd["loss.discriminator.w"] = np.zeros(3)            # LDM training leftovers are dropped
  del sd["decoder.up.1.upsample.conv.weight"]
  with pytest.raises(ValueError, match="missing.*decoder.up.1.upsample.conv.weight"):
    kl.convert_state_dict(sd, cfg)
  vae = kl.load(FIX + ".pt", cfg)
  with pytest.raises(ValueError, match="multiples of 2"):
    vae.encode(np.zeros((1, 15, 16, 3), np.float32))
  with pytest.raises(ValueError, match="latents"):
    vae.decode(np.zeros((1, 8, 8, 3), np.float32))


def test_kl_live_torch(tmp_path):
  pytest.importorskip("torch")
  import subprocess
  subprocess.run([sys.executable, "scripts/torch_kl_reference.py", "--out", str(tmp_path)],
                 check=True)
  cfg, _ = _cfg()
  _check(kl.load(str(tmp_path / "kl_tiny.pt"), cfg), np.load(tmp_path / "kl_tiny.npz"))
