"""LINA on ImageNet 256 px from extracted KL-16 posteriors (LINA.md "Training").

    python scripts/extract_codes.py --kl-checkpoint kl16.ckpt --out /data/lina_latents
    python train.py --config configs/lina_imagenet.py:d48w768 \
        --config.data_dir=/data/lina_latents --workdir runs/lina768

AdamW (0.9, 0.95), weight decay 0.02 (not on norms or biases), lr 8e-4 constant after a 10k-step
warm-up, no clipping, EMA 0.9999 per step; LINA's batch 768 for 1.2M steps at 1.4B.
"""

from configs import common, lina


def get_config(variant="d48w768"):
  c = lina.get_config(variant or "d48w768")
  common.with_training(c, data="imagenet_latents", batch_size=768, learning_rate=8e-4,
                       num_steps=1_200_000)
  c.lr_schedule = "constant"
  c.warmup_steps = 10_000
  c.weight_decay = 0.02
  c.grad_clip = 0.0
  c.ema_decay = 0.9999
  c.remat = True
  c.sample = c.sample.to_dict() | dict(ar_steps=64, euler_steps=25, cfg_scale=2.4,
                                       num_per_class=4)
  return c
