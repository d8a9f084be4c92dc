"""Training fields shared by every trainable config (DESIGN.md §5 defaults)."""

import ml_collections


def with_training(c, *, data, batch_size=256, learning_rate=1e-4, num_steps=100_000):
  """Add the training fields to model config ``c`` (from ``configs.lasad.get_config``)."""
  c.data = data                 # digits | shapes | photos | imagenet_codes | synthetic
  c.data_dir = ""               # imagenet_codes: directory of extracted code shards
  c.batch_size = batch_size     # global, over all devices and processes
  c.learning_rate = learning_rate
  c.lr_schedule = "cosine"      # cosine (warm-up then cosine to 0) | constant (after warm-up)
  c.warmup_steps = 1000
  c.num_steps = num_steps
  c.weight_decay = 0.05         # on matrices only
  c.grad_clip = 1.0             # global norm
  c.label_dropout = 0.1         # class -> null class, for classifier-free guidance
  c.grad_accum = 1              # micro-batches per step (batch_size must divide by it)
  c.remat = False               # recompute each block in the backward pass
  c.remat_policy = "full"       # with remat: full | dots | dots_attn | dots_attn_acts
                                # (lasad_jax/remat.py)
  c.seed = 0
  # Devices: data x fsdp (-1: the remaining ones). Parameters and optimizer state split over fsdp
  # (leaves of at least min_shard_size elements), the batch over both.
  c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "min_shard_size": 2 ** 14})
  c.log_every = 50
  c.eval_every = 1000
  c.eval_batches = 8            # held-out batches per evaluation
  c.checkpoint_every = 1000
  c.keep_checkpoints = 3
  c.sample = ml_collections.ConfigDict(
      {"num_per_class": 8, "cfg_scale": 2.0, "temperature": 1.0, "top_k": 0})  # end-of-run grid
  return c


def small_cpu_run(c, *, data, batch_size, learning_rate, num_steps, every=200):
  """The training fields of the small built-in datasets (minutes on a CPU): short warm-up, a
  progress line every 25 steps, evaluation and checkpoints every ``every`` steps."""
  with_training(c, data=data, batch_size=batch_size, learning_rate=learning_rate,
                num_steps=num_steps)
  c.warmup_steps = 20
  c.log_every = 25
  c.eval_every = every
  c.eval_batches = 4
  c.checkpoint_every = every
  return c
