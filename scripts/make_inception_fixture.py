"""Freeze pytorch-fid's FID Inception-v3 outputs on synthetic weights into a small fixture.

    pip install torch pytorch-fid && python scripts/make_inception_fixture.py [--out tests/fixtures]

Builds pytorch-fid's network (torchvision Inception-v3 with pytorch-fid's FID blocks, as its
``fid_inception_v3`` does, but with the deterministic weights of ``inception_synthetic.py``
instead of the downloaded file), runs ``pytorch_fid.inception.InceptionV3([3])`` (resize to 299,
scale to [-1, 1], pool3) plus the 1008-way ``fc`` on two small uint8 images, and writes
``inception_synthetic.npz`` (images, pool3 features, logits). ``tests/test_fid.py`` regenerates
the weights, converts them with ``lasad_jax.eval.inception.convert_state_dict`` and compares.
"""

import argparse
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from inception_synthetic import synthetic_weights  # noqa: E402


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--out", default="tests/fixtures")
  args = ap.parse_args()
  import pytorch_fid.inception as fi
  inc = fi._inception_v3(num_classes=1008, aux_logits=False, weights=None)
  for name, block in (("Mixed_5b", fi.FIDInceptionA(192, pool_features=32)),
                      ("Mixed_5c", fi.FIDInceptionA(256, pool_features=64)),
                      ("Mixed_5d", fi.FIDInceptionA(288, pool_features=64)),
                      ("Mixed_6b", fi.FIDInceptionC(768, channels_7x7=128)),
                      ("Mixed_6c", fi.FIDInceptionC(768, channels_7x7=160)),
                      ("Mixed_6d", fi.FIDInceptionC(768, channels_7x7=160)),
                      ("Mixed_6e", fi.FIDInceptionC(768, channels_7x7=192)),
                      ("Mixed_7b", fi.FIDInceptionE_1(1280)),
                      ("Mixed_7c", fi.FIDInceptionE_2(2048))):
    setattr(inc, name, block)
  sd = inc.state_dict()
  shapes = {k: tuple(v.shape) for k, v in sd.items() if not k.endswith("num_batches_tracked")}
  w = synthetic_weights(shapes)
  inc.load_state_dict({k: (torch.from_numpy(w[k]) if k in w else v) for k, v in sd.items()})
  fi.fid_inception_v3 = lambda: inc          # InceptionV3 takes its blocks from this network
  net = fi.InceptionV3([3], resize_input=True, normalize_input=True).eval()
  inc.eval()
  images = np.random.default_rng(1).integers(0, 256, (2, 64, 48, 3), dtype=np.uint8)
  with torch.no_grad():
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    pool = net(x)[0].flatten(1)
    logits = inc.fc(pool)
  os.makedirs(args.out, exist_ok=True)
  path = os.path.join(args.out, "inception_synthetic.npz")
  np.savez(path, images=images, pool=pool.numpy(), logits=logits.numpy(),
           torch_version=torch.__version__)
  print(f"wrote {path}: pool {tuple(pool.shape)}, logits {tuple(logits.shape)}, "
        f"{len(shapes)} weight tensors")


if __name__ == "__main__":
  main()
