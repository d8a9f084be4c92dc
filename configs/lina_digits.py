"""LINA on scikit-learn's 8x8 digits as continuous one-channel tokens: trains on CPU in minutes.

    python train.py --config configs/lina_digits.py --workdir runs/lina_digits

Pixel intensities (17 levels) become x = 2 t / 16 - 1; the tiny LINA (2 class-encoder blocks,
4 image blocks split at 2, 2 head blocks, width 64) learns them by masked flow matching.
"""

from configs import common, lina


def get_config(arg=None):
  del arg
  c = lina.get_config("tiny")
  c.vocab_size = 17             # token levels of the data, read as continuous values
  common.small_cpu_run(c, data="digits", batch_size=64, learning_rate=2e-3, num_steps=400,
                       every=200)
  c.lr_schedule = "constant"    # LINA: constant after warm-up
  c.weight_decay = 0.02
  c.grad_clip = 0.0             # LINA trains without clipping
  c.ema_decay = 0.99            # LINA: 0.9999 per step at scale; short runs need a faster average
  c.sample = c.sample.to_dict() | dict(num_per_class=8, cfg_scale=2.0, ar_steps=16,
                                       euler_steps=25)
  return c
