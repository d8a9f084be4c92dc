"""LASADGen on crops of scikit-image's photographs (32x32 tokens, 256-colour k-means palette).

    python train.py --config configs/photos.py --workdir runs/photos
"""

from configs import common, lasad


def get_config(variant="32"):
  side = int(variant or 32)
  c = lasad.get_config("tiny")
  c.vocab_size, c.num_classes, c.grid = 256, 8, (side, side)   # vocab = palette size
  return common.small_cpu_run(c, data="photos", batch_size=32, learning_rate=1e-3, num_steps=400)
