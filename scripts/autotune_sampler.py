"""Search the GEMM tilings of a LASADGen sampler once, for ``sample.py --autotune_dir``.

    python scripts/autotune_sampler.py --config configs/lasad.py:L --batch_size 8 \
        --cfg_scale 4 --top_k 2000 --out autotune/L_b8_cfg

Compiles the sampler for the config, batch and sampling settings given (the same sampling flags
as ``sample.py``, from ``lasad_jax.cli``; random weights: tilings depend on shapes only) with
XLA's exhaustive GEMM tiling search, and writes what XLA found to ``--out`` (its per-fusion
autotuning cache; see ``lasad_jax.sampling.autotune_options``). That compilation takes about a
minute for LASADGen-L on an H100. Afterwards ``sample.py --autotune_dir DIR`` (or
``sampling.sample(..., autotune_dir=DIR)``) compiles in the usual ~6 s with those tilings: 8 L
images with guidance ~0.189 -> ~0.186 s on an H100 (BENCHMARKS.md session 32). Run it on the
kind of GPU you sample on, with the jax version you sample with; entries that do not match are
ignored. Off a GPU, XLA does not autotune and nothing is written.
"""

import os
import sys
import time

import jax
import jax.numpy as jnp
from absl import app, flags
from flax import nnx
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from lasad_jax import model as M  # noqa: E402
from lasad_jax import sampling as S  # noqa: E402
from lasad_jax.cli import dashes_to_underscores, define_sampling_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", "configs/lasad.py:tiny", "model config")
define_sampling_flags("images per compiled batch: sample.py's --batch_size, or the number of "
                      "images where they fit in one batch")
flags.DEFINE_string("out", None, "directory for XLA's autotuning results (created)")
flags.mark_flag_as_required("out")
FLAGS = flags.FLAGS


def _entries(directory):
  return sum(len(files) for _, _, files in os.walk(directory))


def main(argv):
  del argv
  cfg = _CONFIG.value
  if cfg.get("model", "lasad") == "lina":
    raise app.UsageError("--config must be a LASADGen config (LINA's sampler is not covered)")
  height, width = FLAGS.height or cfg.grid[0], FLAGS.width or cfg.grid[1]
  model = M.LASADGen(cfg, rngs=nnx.Rngs(0))
  labels = jnp.arange(FLAGS.batch_size, dtype=jnp.int32) % cfg.num_classes
  try:
    S.check_sample_args(model.config, labels, height, width, FLAGS.cfg_scale,
                        FLAGS.temperature, FLAGS.top_k, FLAGS.top_p)
  except ValueError as e:
    raise app.UsageError(str(e))
  before = _entries(FLAGS.out) if os.path.isdir(FLAGS.out) else 0
  try:
    fn = S.sampler_with(S.autotune_options(FLAGS.out, search=True))
  except ValueError as e:
    raise app.UsageError(str(e).replace("`autotune_dir`", "--out"))
  print(f"compiling the sampler ({FLAGS.batch_size} images, {height}x{width} tokens, guidance "
        f"{FLAGS.cfg_scale}) with XLA's exhaustive tiling search on {jax.devices()[0].device_kind}"
        " (about a minute for LASADGen-L on an H100) ...", flush=True)
  t0 = time.perf_counter()
  lowered = fn.lower(model.config, model.params(), labels, jax.random.key(0), height * width,
                     width, float(FLAGS.cfg_scale), float(FLAGS.temperature), int(FLAGS.top_k),
                     float(FLAGS.top_p), "auto")
  lowered.compile()
  added = _entries(FLAGS.out) - before
  print(f"compiled in {time.perf_counter() - t0:.1f} s; {added} autotuning results written to "
        f"{FLAGS.out}")
  if jax.default_backend() != "gpu":
    print("(XLA autotunes on GPUs only: this backend is "
          f"{jax.default_backend()!r}, so nothing was searched)")
  # every flag that shapes the compiled sampler (top_p adds a sort; height and width the loop)
  same = " ".join(f"--{k} {FLAGS[k].value}" for k in
                  ("batch_size", "cfg_scale", "temperature", "top_k", "top_p", "height", "width")
                  if FLAGS[k].value is not None)
  print(f"sample with: python sample.py --config ... {same} --autotune_dir {FLAGS.out}")


if __name__ == "__main__":
  app.run(main, argv=dashes_to_underscores(sys.argv))
