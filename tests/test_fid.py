"""Fréchet distance and Inception Score against direct computations."""

import numpy as np
import pytest
from scipy import linalg

from lasad_jax.eval import fid


def _scipy_fid(a, b):
  m1, m2 = a.mean(0), b.mean(0)
  s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
  return np.sum((m1 - m2) ** 2) + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real)


def test_frechet_distance_matches_scipy_and_closed_form():
  rng = np.random.default_rng(0)
  a = rng.normal(size=(2000, 16))
  b = rng.normal(size=(2000, 16)) @ np.diag(np.linspace(0.5, 2, 16)) + 0.3
  got = fid.frechet_distance(*fid.statistics(a), *fid.statistics(b))
  assert got == pytest.approx(_scipy_fid(a, b), rel=1e-8)
  # Closed form for diagonal Gaussians: |dmu|^2 + sum (s1 - s2)^2 (standard deviations).
  mu, s = np.full(4, 0.5), np.array([1.0, 2.0, 0.5, 3.0])
  assert fid.frechet_distance(np.zeros(4), np.eye(4), mu, np.diag(s ** 2)) == \
      pytest.approx(4 * 0.25 + np.sum((1 - s) ** 2), rel=1e-9)
  # Identical sets: ~0.
  assert abs(fid.frechet_distance(*fid.statistics(a), *fid.statistics(a))) < 1e-6
  with pytest.raises(ValueError, match="shape"):
    fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_inception_score_bounds():
  n, c = 1000, 10
  confident = np.full((n, c), -20.0)
  confident[np.arange(n), np.arange(n) % c] = 20.0
  assert fid.inception_score(confident)[0] == pytest.approx(c, rel=1e-3)   # max: #classes
  assert fid.inception_score(np.zeros((n, c)))[0] == pytest.approx(1.0)    # uniform: 1


def test_precision_recall():
  rng = np.random.default_rng(0)
  a = rng.normal(size=(500, 8))
  assert fid.precision_recall(a, a) == (1.0, 1.0)
  far = a + 100.0
  assert fid.precision_recall(a, far) == (0.0, 0.0)
  # Generated samples collapsed onto a small part of the real distribution: precise, low recall.
  mode = a[np.argsort(np.linalg.norm(a, axis=1))[:50]] * 0.5
  p, r = fid.precision_recall(a, mode)
  assert p > 0.9 and r < 0.3
  with pytest.raises(ValueError, match="k=3"):
    fid.precision_recall(a[:3], a)


def test_reference_stats(tmp_path):
  np.savez(tmp_path / "ref.npz", mu=np.zeros(3), sigma=np.eye(3))
  mu, sigma = fid.load_reference_stats(tmp_path / "ref.npz")
  assert mu.shape == (3,) and sigma.shape == (3, 3)
  np.savez(tmp_path / "bad.npz", arr_0=np.zeros(3))
  with pytest.raises(KeyError, match="mu"):
    fid.load_reference_stats(tmp_path / "bad.npz")


def test_inception_matches_pytorch_fid():
  """The JAX FID Inception vs pytorch-fid's on the same synthetic weights (fixture made by
  scripts/make_inception_fixture.py with pytorch-fid 0.3.0, torch 2.13 CPU)."""
  import os
  import sys

  import oracle
  from lasad_jax.eval import inception as I
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  sys.path.insert(0, os.path.join(root, "scripts"))
  from inception_synthetic import synthetic_weights
  ref = np.load(os.path.join(root, "tests", "fixtures", "inception_synthetic.npz"))
  params = I.convert_state_dict(synthetic_weights(I.param_shapes()))
  pool, logits = I.extract(params, ref["images"], batch_size=2, progress=False)
  assert pool.shape == (2, 2048) and logits.shape == (2, 1008)
  assert oracle.rel_rms(pool, ref["pool"]) < 1e-4
  assert oracle.rel_rms(logits, ref["logits"]) < 1e-4
  bad = synthetic_weights(I.param_shapes())
  del bad["fc.bias"]
  with pytest.raises(ValueError, match="missing \\['fc.bias'\\]"):
    I.convert_state_dict(bad)


def _write_safetensors(path, tensors):
  import json
  import struct
  header, blobs, off = {}, [], 0
  for k, v in tensors.items():
    b = np.ascontiguousarray(v, np.float32).tobytes()
    header[k] = {"dtype": "F32", "shape": list(v.shape), "data_offsets": [off, off + len(b)]}
    blobs.append(b)
    off += len(b)
  h = json.dumps(header).encode()
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def test_evaluate_script(tmp_path):
  """scripts/evaluate.py end to end: weights file -> features -> FID/IS; same sets give FID ~ 0."""
  import os
  import sys

  from lasad_jax.eval import inception as I
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  sys.path.insert(0, os.path.join(root, "scripts"))
  import evaluate
  from inception_synthetic import synthetic_weights
  _write_safetensors(tmp_path / "inc.safetensors", synthetic_weights(I.param_shapes()))
  rng = np.random.default_rng(0)
  a = rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
  b = np.clip(a.astype(int) + rng.integers(-60, 60, a.shape), 0, 255).astype(np.uint8)
  np.savez(tmp_path / "a.npz", a)
  np.savez(tmp_path / "b.npz", b)
  same = evaluate.main([str(tmp_path / "a.npz"), str(tmp_path / "a.npz"), "--inception",
                        str(tmp_path / "inc.safetensors"), "--batch-size", "4"])
  other = evaluate.main([str(tmp_path / "a.npz"), str(tmp_path / "b.npz"), "--inception",
                         str(tmp_path / "inc.safetensors"), "--batch-size", "4"])
  assert abs(same["fid"]) < 1e-3 and other["fid"] > 1e-3 and same["inception_score"] >= 1.0
  assert same["precision"] == same["recall"] == 1.0
  with pytest.raises(SystemExit, match="does not exist"):
    evaluate.main([str(tmp_path / "a.npz"), str(tmp_path / "a.npz"), "--inception", "nope.pth"])
