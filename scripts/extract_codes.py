"""Extract VQ codes of ImageNet (tensorflow-datasets ``imagenet2012``) for training LASADGen.

    # once: prepare imagenet2012 from the manually downloaded tars (needs tensorflow for this step)
    tfds build imagenet2012 --manual_dir /data/imagenet_tars --data_dir /data/tfds \
        --file_format array_record
    # then
    python scripts/extract_codes.py --vq-checkpoint /ckpt/vq_ds16_c2i.pt --data-dir /data/tfds \
        --out /data/imagenet_codes --image-size 256 --ten-crop
    python train.py --config configs/imagenet.py:L --config.data_dir=/data/imagenet_codes ...

Preprocessing as LlamaGen's code extraction: resize the short side (bicubic) and centre-crop to
``crop = image_size * 1.1`` with ``--ten-crop`` (else ``image_size``); with ``--ten-crop`` the ten
variants are the four corner crops, the centre crop and their horizontal flips (torchvision's
TenCrop order), otherwise the centre crop and its flip. Images go to [-1, 1], are encoded on all
local devices (the batch is split over them), and land as ``lasad_codes/v1`` shards
(``lasad_jax/data/imagenet_codes.py``) in ``OUT/train`` and ``OUT/val``. Shards are written
atomically and skipped when present, so an interrupted run resumes where it stopped. The
checkpoint is read without running pickled code.

LINA's data: ``--kl-checkpoint kl16.ckpt`` (MAR's KL-16 VAE) instead of ``--vq-checkpoint`` writes
the posterior mean and log-variance of every variant as ``lasad_latents/v1`` shards
(``lasad_jax/data/imagenet_latents.py``) for ``configs/lina_imagenet.py``.
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from lasad_jax.data import imagenet_codes as ic  # noqa: E402
from lasad_jax.tokenizer import vq as V  # noqa: E402

SPLITS = {"train": "train", "validation": "val"}


def center_crop(img, size):
  """ADM/LlamaGen-style: shrink by 2x box steps while the short side >= 2*size, bicubic resize of
  the short side to ``size``, centre crop ``size`` x ``size``."""
  im = Image.fromarray(np.asarray(img)).convert("RGB")
  while min(im.size) >= 2 * size:
    im = im.resize(tuple(x // 2 for x in im.size), resample=Image.BOX)
  s = size / min(im.size)
  im = im.resize(tuple(round(x * s) for x in im.size), resample=Image.BICUBIC)
  a = np.asarray(im)
  y, x = (a.shape[0] - size) // 2, (a.shape[1] - size) // 2
  return a[y:y + size, x:x + size]


def variants(img, image_size, ten_crop):
  """uint8 [V, image_size, image_size, 3]: ten crops (TenCrop order) or centre + flip."""
  if not ten_crop:
    a = center_crop(img, image_size)
    return np.stack([a, a[:, ::-1]])
  crop = int(image_size * 1.1)
  a = center_crop(img, crop)
  s, m = image_size, (crop - image_size) // 2
  five = [a[:s, :s], a[:s, -s:], a[-s:, :s], a[-s:, -s:], a[m:m + s, m:m + s]]
  return np.stack(five + [c[:, ::-1] for c in five])


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  which = ap.add_mutually_exclusive_group(required=True)
  which.add_argument("--vq-checkpoint", help="LlamaGen vq_ds16_c2i.pt (or .safetensors): codes")
  which.add_argument("--kl-checkpoint", help="MAR kl16.ckpt (or .safetensors): LINA's latents")
  ap.add_argument("--vq-config", default="{}",
                  help="VQConfig (or, with --kl-checkpoint, KLConfig) fields as JSON")
  ap.add_argument("--data-dir", default=None, help="tensorflow-datasets data_dir")
  ap.add_argument("--dataset", default="imagenet2012")
  ap.add_argument("--splits", default="train,validation")
  ap.add_argument("--out", required=True)
  ap.add_argument("--image-size", type=int, default=256)
  ap.add_argument("--ten-crop", action="store_true")
  ap.add_argument("--batch-size", type=int, default=64, help="images per encode call")
  ap.add_argument("--shard-size", type=int, default=10000, help="images per shard file")
  ap.add_argument("--limit", type=int, default=None, help="first N images per split (testing)")
  args = ap.parse_args(argv)
  import tensorflow_datasets as tfds

  if args.kl_checkpoint:
    from lasad_jax.data import imagenet_latents as il
    from lasad_jax.tokenizer import kl
    vae = kl.load(args.kl_checkpoint, json.loads(args.vq_config))
    ds_factor = vae.config.downsample
    fmt = il

    def encode(x):
      mean, logvar = vae.encode(x)
      return np.concatenate([np.asarray(mean), np.asarray(logvar)], axis=-1)

    def write(out, j, arrays, labels):
      il.write_shard(out, j, arrays, labels)
  else:
    vq = V.load(args.vq_checkpoint, json.loads(args.vq_config))
    ds_factor = vq.config.downsample
    fmt = ic

    def encode(x):
      return np.asarray(vq.encode(x))

    def write(out, j, arrays, labels):
      ic.write_shard(out, j, arrays, labels, codebook_size=vq.config.codebook_size)
  if args.image_size % ds_factor:
    raise SystemExit(f"--image-size must be a multiple of {ds_factor}")
  n_dev = jax.local_device_count()
  mesh = jax.sharding.Mesh(np.asarray(jax.local_devices()), ("data",))
  shard_batch = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  for split in args.splits.split(","):
    if split not in SPLITS:
      raise SystemExit(f"--splits: unknown split {split!r}; use {list(SPLITS)}")
    try:
      src = tfds.data_source(args.dataset, split=split, data_dir=args.data_dir)
    except Exception as e:  # noqa: BLE001
      raise SystemExit(f"cannot open {args.dataset}/{split} in --data-dir {args.data_dir!r} "
                       f"({type(e).__name__}: {e}); prepare it first (see this script's doc)")
    n = len(src) if args.limit is None else min(args.limit, len(src))
    out = os.path.join(args.out, SPLITS[split])
    n_shards = -(-n // args.shard_size)
    t0, done = time.time(), 0
    for j in range(n_shards):
      cname, lname = fmt.shard_names(j)
      lo, hi = j * args.shard_size, min(n, (j + 1) * args.shard_size)
      if os.path.exists(os.path.join(out, lname)) and os.path.exists(os.path.join(out, cname)):
        done += hi - lo
        continue   # resumed: this shard is complete
      codes, labels = [], []
      for b in range(lo, hi, args.batch_size):
        recs = [src[i] for i in range(b, min(hi, b + args.batch_size))]
        x = np.stack([variants(r["image"], args.image_size, args.ten_crop) for r in recs])
        nb, nv = x.shape[:2]
        flat = x.reshape((nb * nv,) + x.shape[2:]).astype(np.float32) / 127.5 - 1.0
        pad = (-len(flat)) % n_dev
        flat = np.concatenate([flat, np.zeros((pad,) + flat.shape[1:], np.float32)])
        c = encode(jax.device_put(flat, shard_batch))[:nb * nv]
        codes.append(c.reshape((nb, nv) + c.shape[1:]))
        labels.extend(int(r["label"]) for r in recs)
        done += nb
        rate = done / max(time.time() - t0, 1e-9)
        print(f"\r{split}: {done}/{n} images  {rate:.1f} img/s  ETA "
              f"{(n - done) / max(rate, 1e-9) / 60:.1f} min", end="", file=sys.stderr, flush=True)
      write(out, j, np.concatenate(codes), np.asarray(labels))
    if fmt is ic:
      ic.write_index(out, n_shards, codebook_size=vq.config.codebook_size)
    else:
      fmt.write_index(out, n_shards)
    print(f"\n{split}: {n} images -> {out} ({n_shards} shards)", file=sys.stderr)


if __name__ == "__main__":
  main()
