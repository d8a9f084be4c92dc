"""LASADGen-{B,L,XL,XXL,3B} on pre-extracted ImageNet VQ codes (16x16 tokens, 1000 classes).

    python train.py --config configs/imagenet.py:L --config.data_dir=/data/imagenet_codes \
        --workdir runs/imagenet_L
    python train.py --config configs/imagenet.py:B --config.data=synthetic --workdir /tmp/b  # smoke

LlamaGen's recipe: global batch 256, lr 1e-4, AdamW 0.9/0.95, wd 0.05, 300 epochs (~1.5M steps).
"""

from configs import common, lasad


def get_config(variant="B"):
  c = lasad.get_config(variant or "B")
  common.with_training(c, data="imagenet_codes", batch_size=256, learning_rate=1e-4,
                       num_steps=1_500_000)
  c.lr_schedule = "constant"   # LlamaGen trains at a constant lr
  c.warmup_steps = 0
  c.checkpoint_every = 5000
  c.eval_every = 5000
  return c
