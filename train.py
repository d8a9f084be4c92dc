"""Train LASADGen (or the softmax baseline, or LINA) from a config; resumes from the workdir's
checkpoint. A config with ``model = "lina"`` (configs/lina_digits.py, configs/lina_imagenet.py)
trains LINA with its flow-matching objective and keeps an EMA of the parameters in the checkpoint.

    python train.py --config configs/digits.py --workdir runs/digits          # CPU, minutes
    python train.py --config configs/photos.py --config.boundary=reset --workdir runs/photos_reset
    python train.py --config configs/imagenet.py:L --config.data_dir=/data/codes --workdir runs/L

Writes ``WORKDIR/checkpoints/<step>/`` (Orbax: params, optimizer state, step, PRNG, data iterator),
``WORKDIR/metrics.jsonl`` (loss per step, throughput, held-out NLL), ``WORKDIR/config.json`` and, at
the end, ``WORKDIR/samples.png`` (one row per class). Rerunning the same command after a crash or a
kill resumes from the latest checkpoint and reproduces the uninterrupted run exactly.

Several hosts: launch one process per host with the same command; ``jax.distributed.initialize()``
finds the cluster under SLURM, or set JAX_COORDINATOR_ADDRESS=host:port, JAX_NUM_PROCESSES and
JAX_PROCESS_ID on each (see README, "Training on several hosts").
"""

import os
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", "configs/digits.py", "training config")
flags.DEFINE_string("workdir", None, "directory for checkpoints, metrics and samples")
flags.DEFINE_bool("sample", True, "write WORKDIR/samples.png at the end")
FLAGS = flags.FLAGS


def _multihost():
  env = os.environ
  return ("SLURM_NTASKS" in env and int(env["SLURM_NTASKS"]) > 1) or \
      int(env.get("JAX_NUM_PROCESSES", "1")) > 1


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _multihost():
    jax.distributed.initialize()
  from lasad_jax import training as T
  cfg = _CONFIG.value
  if not FLAGS.workdir:
    raise app.UsageError("--workdir DIR is required (checkpoints, metrics and samples go there)")
  log = print if jax.process_index() == 0 else (lambda *a, **k: None)
  try:
    state = T.train_and_evaluate(cfg, FLAGS.workdir, log=lambda s: log(s, flush=True))
  except T.TrainingDiverged as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  except (ValueError, PermissionError, FileNotFoundError) as e:
    raise app.UsageError(str(e))
  if FLAGS.sample and jax.process_index() == 0:
    path = os.path.join(FLAGS.workdir, "samples.png")
    T.sample_grid(cfg, state.params if state.ema is None else state.ema, path)
    if os.path.exists(path):
      log(f"wrote {path}", flush=True)


if __name__ == "__main__":
  logging.set_verbosity(logging.WARNING)
  app.run(main)
