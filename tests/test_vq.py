"""VQ tokenizer: PyTorch parity through the safe loader, config, errors.

The fixture comes from scripts/torch_vq_reference.py (a minimal PyTorch VQ with LlamaGen's
parameter names; random weights of a tiny config; torch 2.13 CPU).
"""

import os

import jax
import numpy as np
import pytest

import oracle
from lasad_jax import torch_io
from lasad_jax.tokenizer import vq as V

FIX = os.path.join(os.path.dirname(__file__), "fixtures", "vq_tiny")
TINY = V.VQConfig(ch=32, ch_mult=(1, 2), z_channels=32, codebook_size=64, codebook_dim=8)


@pytest.fixture(scope="module")
def converted():
  sd = torch_io.load_state_dict(FIX + ".pt", key="model")   # LlamaGen's layout: {"model": ...}
  return V.VQTokenizer(TINY, params=V.convert_state_dict(sd, TINY)), np.load(FIX + ".npz")


def test_matches_pytorch_reference(converted):
  vq, ref = converted
  p = vq.params()
  z = V._l2norm(V._conv(p, "quant_conv", V.encoder(TINY, p, ref["images"])))
  assert oracle.rel_rms(z, ref["latents"]) < 1e-5
  np.testing.assert_array_equal(vq.encode(ref["images"]), ref["codes"])
  rec = vq.decode(ref["codes"])
  assert rec.shape == (2, 32, 32, 3)
  assert oracle.rel_rms(rec, ref["reconstructions"]) < 1e-5


def test_vq16_size_and_shapes():
  shapes = V.param_shapes(V.VQConfig())
  total = sum(int(np.prod(s)) for s in shapes.values())
  assert 71e6 < total < 73e6            # LlamaGen reports 72M for VQ-16
  assert V.VQConfig().downsample == 16
  assert shapes["quantize.embedding.weight"] == (16384, 8)


def test_errors(converted):
  vq, ref = converted
  sd = torch_io.load_state_dict(FIX + ".pt", key="model")
  del sd["decoder.conv_out.bias"]
  sd["extra.weight"] = np.zeros(3)
  with pytest.raises(ValueError, match=r"missing \['decoder.conv_out.bias'\].*unexpected"):
    V.convert_state_dict(sd, TINY)
  with pytest.raises(ValueError, match="multiples of 2"):
    vq.encode(np.zeros((1, 15, 16, 3), np.float32))
  with pytest.raises(ValueError, match="images"):
    vq.encode(np.zeros((1, 16, 16), np.float32))
  with pytest.raises(ValueError, match="codes"):
    vq.decode(np.zeros((1, 4, 4), np.float32))


def test_random_init_round_trip_shapes():
  vq = V.VQTokenizer(TINY)
  x = jax.random.uniform(jax.random.key(1), (1, 16, 24, 3), minval=-1, maxval=1)
  c = vq.encode(x)
  assert c.shape == (1, 8, 12) and int(c.max()) < 64
  assert vq.decode(c).shape == (1, 16, 24, 3)


def test_live_against_torch_reference():
  """Where torch imports: the PyTorch port on fresh random weights vs the converted JAX model."""
  torch = pytest.importorskip("torch")
  import sys
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "scripts"))
  import torch_vq_reference as R
  torch.manual_seed(1)
  ref = R.VQ(**R.TINY).eval()
  sd = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
  vq = V.VQTokenizer(TINY, params=V.convert_state_dict(sd, TINY))
  x = np.random.default_rng(2).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
  with torch.no_grad():
    codes = ref.encode(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
    rec = ref.decode(torch.from_numpy(codes)).permute(0, 2, 3, 1).numpy()
  np.testing.assert_array_equal(vq.encode(x), codes)
  assert oracle.rel_rms(vq.decode(codes), rec) < 1e-5
