"""PyTorch -> Flax conversion: frozen parity fixture, errors, safe loading, live torch check."""

import io
import json
import os
import pickle
import struct
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs.lasad import get_config
from lasad_jax import convert as C
from lasad_jax import model as M
from lasad_jax import torch_io

FIX = os.path.join(os.path.dirname(__file__), "fixtures", "torch_lasadgen_tiny")


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.sqrt(np.mean((a - b) ** 2) / np.mean(b ** 2)))


@pytest.mark.parametrize("boundary", ["carry", "reset"])
def test_converted_model_matches_torch_fixture(boundary):
  """scripts/torch_reference.py (PyTorch + fla's naive recurrence) -> .pt -> our loader."""
  fx = np.load(FIX + ".npz")
  cfg = get_config("tiny")
  cfg.boundary = boundary
  model = M.LASADGen(cfg, rngs=nnx.Rngs(5))
  C.load_params(model, C.convert_state_dict(torch_io.load_state_dict(FIX + ".pt"), cfg))
  logits = model(jnp.asarray(fx["tokens"]), jnp.asarray(fx["labels"]), width=int(fx["width"]))
  assert _rel(logits, fx[f"logits_{boundary}"]) < 1e-5


def test_errors_list_missing_unknown_and_shapes():
  sd = torch_io.load_state_dict(FIX + ".pt")
  cfg = get_config("tiny")
  bad = dict(sd)
  del bad["layers.1.attention.f_proj.weight"]
  bad["layers.0.attention.extra.weight"] = np.zeros(3, np.float32)
  bad["output.weight"] = np.zeros((16, 64), np.float32)
  with pytest.raises(ValueError) as e:
    C.convert_state_dict(bad, cfg)
  msg = str(e.value)
  assert "missing in the checkpoint: layers.1.attention.f_proj.weight" in msg
  assert "not used (unknown name): layers.0.attention.extra.weight" in msg
  assert "output.weight: shape (64, 16)" in msg


class _Evil:
  def __reduce__(self):
    return (os.system, ("echo pwned > /tmp/lasad_pwned",))


def test_code_executing_pickle_is_refused(tmp_path):
  path = tmp_path / "evil.pt"
  with zipfile.ZipFile(path, "w") as zf:
    zf.writestr("archive/data.pkl", pickle.dumps({"w": _Evil()}))
  if os.path.exists("/tmp/lasad_pwned"):
    os.remove("/tmp/lasad_pwned")
  with pytest.raises(torch_io.UnsafeCheckpointError, match="refusing to load posix.system"):
    torch_io.load_state_dict(path)
  assert not os.path.exists("/tmp/lasad_pwned")


def test_safetensors_and_nested_key(tmp_path):
  arrs = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(4, np.float16)}
  header, blobs, off = {}, [], 0
  for name, a in arrs.items():
    raw = a.tobytes()
    header[name] = {"dtype": {"float32": "F32", "float16": "F16"}[str(a.dtype)],
                    "shape": list(a.shape), "data_offsets": [off, off + len(raw)]}
    blobs.append(raw)
    off += len(raw)
  h = json.dumps(header).encode()
  path = tmp_path / "w.safetensors"
  path.write_bytes(struct.pack("<Q", len(h)) + h + b"".join(blobs))
  got = torch_io.load_state_dict(path)
  np.testing.assert_array_equal(got["a"], arrs["a"])
  assert got["b"].dtype == np.float16
  with pytest.raises(KeyError, match="no entry 'model'"):
    torch_io.load_state_dict(path, key="model")


def test_llamagen_softmax_layout_roundtrip():
  """LlamaGen's packed wqkv: our params -> torch names -> back gives the same logits."""
  cfg = get_config("tiny")
  cfg.attention = "softmax"
  src = M.LASADGen(cfg, rngs=nnx.Rngs(2))
  p = jax.tree.map(np.asarray, src.params())
  sd = {"tok_embeddings.weight": p["tok_emb"],
        "cls_embedding.embedding_table.weight": p["cls_emb"],
        "norm.weight": p["norm"], "output.weight": p["head"].T}
  for i in range(cfg.num_layers):
    b = {k: v[i] for k, v in p["blocks"].items()}
    pre = f"layers.{i}."
    sd[pre + "attention.wqkv.weight"] = np.concatenate([b["wq"].T, b["wk"].T, b["wv"].T], 0)
    sd[pre + "attention.wo.weight"] = b["wo"].T
    sd[pre + "attention_norm.weight"] = b["attn_norm"]
    sd[pre + "ffn_norm.weight"] = b["ffn_norm"]
    for w in ("w1", "w2", "w3"):
      sd[pre + f"feed_forward.{w}.weight"] = b[w].T
  dst = C.load_params(M.LASADGen(cfg, rngs=nnx.Rngs(9)), C.convert_state_dict(sd, cfg))
  tok = jax.random.randint(jax.random.key(0), (2, 20), 0, cfg.vocab_size)
  lab = jnp.array([1, 2])
  assert _rel(dst(tok, lab, width=4), src(tok, lab, width=4)) < 1e-6


def test_live_against_torch_reference():
  torch = pytest.importorskip("torch")
  pytest.importorskip("fla.ops.gla.naive")
  import sys
  sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "scripts"))
  from torch_reference import TorchLASADGen
  torch.manual_seed(3)
  tm = TorchLASADGen(2, 64, 16, 17, 10, 256)
  sd = {k: v.detach().numpy() for k, v in tm.state_dict().items()}
  tok = torch.randint(0, 17, (2, 30))
  lab = torch.tensor([3, 10])
  with torch.no_grad():
    ref = tm(tok, lab, 6, float("-inf")).numpy()
  cfg = get_config("tiny")
  cfg.boundary = "reset"
  m = C.load_params(M.LASADGen(cfg, rngs=nnx.Rngs(0)), C.convert_state_dict(sd, cfg))
  assert _rel(m(jnp.asarray(tok.numpy()), jnp.asarray(lab.numpy()), width=6), ref) < 1e-5
