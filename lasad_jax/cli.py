"""Command-line pieces shared by ``sample.py`` and ``scripts/autotune_sampler.py``: the sampling
flags both take (so that a tuned sampler is compiled for exactly what sample.py will ask for) and
dashed flag names (``--cfg-scale`` as well as absl's ``--cfg_scale``)."""

from absl import flags


def define_sampling_flags(batch_help):
  """--batch_size, --cfg_scale, --temperature, --top_k, --top_p, --height, --width."""
  flags.DEFINE_integer("batch_size", 32, batch_help)
  flags.DEFINE_float("cfg_scale", 1.0, "classifier-free guidance scale (1 = off; else the "
                     "batch runs a null-class row beside each image)")
  flags.DEFINE_float("temperature", 1.0, "softmax temperature")
  flags.DEFINE_integer("top_k", 0, "top-k filter (0 = off)")
  flags.DEFINE_float("top_p", 1.0, "nucleus filter (1 = off)")
  flags.DEFINE_integer("height", None, "token rows (default: the config's grid)")
  flags.DEFINE_integer("width", None, "tokens per row (default: the config's grid)")


def dashes_to_underscores(argv):
  """Accept --num-per-class as well as absl's --num_per_class (names only, not values; the
  config's own ``--config.x-y`` overrides are left as given)."""
  out = []
  for a in argv:
    if a.startswith("--") and not a.startswith("--config"):
      name, eq, val = a[2:].partition("=")
      a = "--" + name.replace("-", "_") + eq + val
    out.append(a)
  return out
