"""FID and Inception Score of generated samples against a reference batch (ADM evaluator format).

    python scripts/evaluate.py samples.npz VIRTUAL_imagenet256_labeled.npz \
        --inception pt_inception-2015-12-05-6726825d.pth

``samples.npz``: ``arr_0`` uint8 [N, H, W, 3] (what ``sample.py`` writes as images.npz).
Reference: an ``.npz`` with precomputed ``mu``/``sigma`` (ADM's reference batches), or images in
``arr_0`` (statistics computed here). ``--inception``: the FID Inception weights (user-supplied;
``.pth`` read without running pickled code, or ``.safetensors``). Prints FID, IS (10 splits) and,
when the reference holds images (ADM reference batches do, in ``arr_0``), improved precision and
recall (k = 3) on pool features.
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from lasad_jax import torch_io  # noqa: E402
from lasad_jax.eval import fid, inception  # noqa: E402


def load_images(path):
  with np.load(path) as f:
    if "arr_0" not in f:
      raise SystemExit(f"{path}: no arr_0 (uint8 [N, H, W, 3] images) in {list(f.keys())}")
    x = f["arr_0"]
  if x.ndim != 4 or x.shape[-1] != 3 or x.dtype != np.uint8:
    raise SystemExit(f"{path}: arr_0 must be uint8 [N, H, W, 3], got {x.dtype} {x.shape}")
  return x


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("samples")
  ap.add_argument("reference")
  ap.add_argument("--inception", required=True, help="pt_inception-2015-12-05-6726825d.pth")
  ap.add_argument("--batch-size", type=int, default=100)
  ap.add_argument("--json", default=None, help="also write the numbers here")
  args = ap.parse_args(argv)
  if not os.path.exists(args.inception):
    raise SystemExit(f"--inception {args.inception!r} does not exist (download the FID Inception "
                     f"weights yourself; nothing is fetched at run time)")
  params = inception.convert_state_dict(torch_io.load_state_dict(args.inception))
  feats, logits = inception.extract(params, load_images(args.samples), args.batch_size)
  with np.load(args.reference) as f:
    has_stats, has_images = "mu" in f and "sigma" in f, "arr_0" in f
  ref_feats = None
  if has_images:
    ref_feats, _ = inception.extract(params, load_images(args.reference), args.batch_size)
  if has_stats:
    mu_r, sigma_r = fid.load_reference_stats(args.reference)
  elif ref_feats is not None:
    mu_r, sigma_r = fid.statistics(ref_feats)
  else:
    raise SystemExit(f"{args.reference}: neither mu/sigma nor arr_0 images")
  out = {"fid": fid.frechet_distance(*fid.statistics(feats), mu_r, sigma_r),
         "inception_score": fid.inception_score(logits)[0], "num_samples": int(len(feats))}
  line = f"FID {out['fid']:.3f}  IS {out['inception_score']:.2f}"
  if ref_feats is not None and min(len(ref_feats), len(feats)) > 3:
    out["precision"], out["recall"] = fid.precision_recall(ref_feats, feats)
    line += f"  precision {out['precision']:.3f}  recall {out['recall']:.3f}"
  print(f"{line}  ({out['num_samples']} samples)")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(out, f, indent=1)
  return out


if __name__ == "__main__":
  main()
