"""LASADGen on procedural coloured shapes (16x16 tokens; ``:32`` for 32x32): wide rows on CPU.

    python train.py --config configs/shapes.py --workdir runs/shapes
    python train.py --config configs/shapes.py:32 --config.boundary=reset --workdir runs/shapes32
"""

from configs import common, lasad


def get_config(variant="16"):
  side = int(variant or 16)
  c = lasad.get_config("tiny")
  c.vocab_size, c.num_classes, c.grid = 9, 8, (side, side)
  return common.small_cpu_run(c, data="shapes", batch_size=32, learning_rate=1e-3, num_steps=400)
