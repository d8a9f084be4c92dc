"""Fréchet distance and Inception Score from features / logits (ADM evaluator conventions).

FID = |mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^{1/2}) over pool features (float64, the matrix
square root by SciPy's ``sqrtm`` with the ADM evaluator's handling of a singular product: retry
with ``eps`` on the diagonals, drop a negligible imaginary part). Reference batches in ADM's
``.npz`` format carry ``mu`` and ``sigma`` (from ``pool_3``): :func:`load_reference_stats`.
"""

import numpy as np


def statistics(features):
  """(mu, sigma) of features [N, D] in float64 (sigma with N - 1, as numpy.cov)."""
  f = np.asarray(features, np.float64)
  if f.ndim != 2 or len(f) < 2:
    raise ValueError(f"`features` must be [N >= 2, D], got {f.shape}")
  return f.mean(0), np.cov(f, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
  from scipy import linalg
  mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
  s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
  if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (len(mu1), len(mu1)):
    raise ValueError(f"statistics differ in shape: mu {mu1.shape} vs {mu2.shape}, sigma "
                     f"{s1.shape} vs {s2.shape}")
  diff = mu1 - mu2
  covmean = linalg.sqrtm(s1 @ s2)
  if not np.isfinite(covmean).all():
    off = np.eye(len(s1)) * eps
    covmean = linalg.sqrtm((s1 + off) @ (s2 + off))
  if np.iscomplexobj(covmean):
    if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
      raise ValueError(f"imaginary component {np.max(np.abs(covmean.imag))} in sqrtm")
    covmean = covmean.real
  return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def inception_score(logits, splits=10):
  """Mean and std over ``splits`` of exp(E_x KL(p(y|x) || p(y))) from classifier logits [N, C]."""
  z = np.asarray(logits, np.float64)
  splits = max(1, min(splits, len(z)))   # no empty splits for small N
  p = np.exp(z - z.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  scores = []
  for part in np.array_split(p, splits):
    py = part.mean(0, keepdims=True)
    kl = np.sum(part * (np.log(part + 1e-12) - np.log(py + 1e-12)), axis=1)
    scores.append(np.exp(kl.mean()))
  return float(np.mean(scores)), float(np.std(scores))


def _sq_dists(a, b):
  return np.maximum((a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T, 0.0)


def _radii(feats, k, batch):
  """Distance from each feature to its k-th nearest neighbour in the same set (itself excluded)."""
  r = np.empty(len(feats))
  for i in range(0, len(feats), batch):
    d = _sq_dists(feats[i:i + batch], feats)
    r[i:i + batch] = np.sqrt(np.partition(d, k, axis=1)[:, k])   # index 0 is the point itself
  return r


def _coverage(queries, manifold, radii, batch):
  """Fraction of ``queries`` inside at least one ball (centre in ``manifold``, its radius)."""
  inside = 0
  for i in range(0, len(queries), batch):
    d = np.sqrt(_sq_dists(queries[i:i + batch], manifold))
    inside += int(np.sum(np.any(d <= radii[None, :], axis=1)))
  return inside / len(queries)


def precision_recall(real, fake, k=3, batch=1000):
  """Improved precision and recall (Kynkäänniemi et al. 2019; the ADM evaluator's k = 3) from
  pool features: precision = share of generated features inside the real manifold (union of
  k-NN balls), recall = share of real features inside the generated one."""
  real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)
  if min(len(real), len(fake)) <= k:
    raise ValueError(f"precision/recall with k={k} needs more than {k} features per set")
  return (_coverage(fake, real, _radii(real, k, batch), batch),
          _coverage(real, fake, _radii(fake, k, batch), batch))


def load_reference_stats(path):
  """(mu, sigma) from an ADM reference batch ``.npz`` (keys ``mu``, ``sigma``)."""
  with np.load(path) as f:
    if "mu" not in f or "sigma" not in f:
      raise KeyError(f"{path}: no 'mu'/'sigma' (ADM reference batches carry them); keys "
                     f"{list(f.keys())}")
    return f["mu"], f["sigma"]
