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


def test_reference_stats(tmp_path):
  np.savez(tmp_path / "ref.npz", mu=np.zeros(3), sigma=np.eye(3))
  mu, sigma = fid.load_reference_stats(tmp_path / "ref.npz")
  assert mu.shape == (3,) and sigma.shape == (3, 3)
  np.savez(tmp_path / "bad.npz", arr_0=np.zeros(3))
  with pytest.raises(KeyError, match="mu"):
    fid.load_reference_stats(tmp_path / "bad.npz")
