"""The spatial-decay experiment (DESIGN.md §5): the same small model, data and seeds with the row
boundary mode carry / reset / learned / none (plain gated linear attention) and the softmax
LlamaGen baseline; held-out NLL per token (mean and spread over seeds) and sample grids.

    python scripts/sad_ablation.py --out results/sad            # GPU: a few minutes
    python scripts/sad_ablation.py --datasets digits --steps 300 --seeds 0 --out /tmp/sad   # CPU

Writes ``OUT/sad.json`` (every run), ``OUT/table.md`` (the table for RESULTS.md) and
``OUT/{dataset}_{variant}.png`` (samples of seed 0: one row per class, CFG 2).
The training split sits on the device; each step draws a batch uniformly with replacement (keyed by
seed and step) and steps run 50 at a time in one compiled scan, so the tiny models train at GPU
speed rather than at the speed of the Python input pipeline. Every run of one (dataset, variant)
shares the compiled program; seeds change the initial parameters, the batches and the label
dropout. Evaluation covers the whole held-out split.
"""

import argparse
import functools
import importlib
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from lasad_jax import data as D  # noqa: E402
from lasad_jax import model as M  # noqa: E402
from lasad_jax import training as T  # noqa: E402

VARIANTS = ("carry", "reset", "learned", "none", "softmax")


def make_config(dataset, variant, args):
  cfg = importlib.import_module(f"configs.{dataset}").get_config()
  cfg.dim, cfg.num_layers, cfg.head_dim = args.dim, args.layers, args.head_dim
  cfg.num_heads = args.dim // args.head_dim
  if variant == "softmax":
    cfg.attention = "softmax"
  else:
    cfg.boundary = variant
  cfg.impl = args.impl
  cfg.num_steps = args.steps
  cfg.warmup_steps = max(1, args.steps // 20)
  cfg.learning_rate = args.lr
  cfg.batch_size = args.batch_size
  return ml_collections.FrozenConfigDict(cfg)


def held_out_nll(cfg, params):
  src, ops = D.get_source(cfg, "test")
  bs = min(256, len(src))
  total, count = 0.0, 0
  for batch in D.make_loader(src, bs, seed=0, shuffle=False, num_epochs=1, operations=ops):
    n = len(batch["label"])
    total += float(T.eval_nll(cfg, params, batch)) * n
    count += n
  rest = len(src) - count   # the last partial batch (the loader drops it)
  if rest:
    recs = [src[i] for i in range(count, len(src))]
    batch = {k: np.stack([r[k] for r in recs]) for k in recs[0]}
    total += float(T.eval_nll(cfg, params, batch)) * rest
    count += rest
  return total / count


def load_split(cfg, split):
  """The whole split as numpy arrays (these datasets are small)."""
  src, ops = D.get_source(cfg, split)
  recs = [src[i] for i in range(len(src))]
  return (np.stack([r["tokens"] for r in recs]).astype(np.int32),
          np.asarray([r["label"] for r in recs], np.int32))


@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=(2,))
def _train_chunk(cfg, n_steps, state, tokens, labels, data_key):
  """``n_steps`` optimizer steps in one compiled scan; each step draws a batch uniformly (with
  replacement) from the device-resident split, keyed by (seed, step)."""
  def body(st, _):
    idx = jax.random.randint(jax.random.fold_in(data_key, st.step), (cfg.batch_size,), 0,
                             tokens.shape[0])
    st, m = T._train_step(cfg, st, {"tokens": tokens[idx], "label": labels[idx]})
    return st, m["loss"]
  return jax.lax.scan(body, state, None, length=n_steps)


def run(cfg, seed, data, chunk=50):
  state = T.create_train_state(cfg, seed=seed)
  tokens, labels = (jnp.asarray(x) for x in data)
  key = jax.random.key(1000 + seed)
  losses = []
  done = 0
  while done < cfg.num_steps:
    n = min(chunk, cfg.num_steps - done)
    state, l = _train_chunk(cfg, n, state, tokens, labels, key)
    losses.append(l)
    done += n
  return state, [float(x) for x in np.concatenate(jax.device_get(losses))]


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--datasets", default="digits,shapes,photos")
  ap.add_argument("--variants", default=",".join(VARIANTS))
  ap.add_argument("--seeds", default="0,1,2")
  ap.add_argument("--steps", type=int, default=600)
  ap.add_argument("--batch-size", type=int, default=64)
  ap.add_argument("--lr", type=float, default=2e-3)
  ap.add_argument("--dim", type=int, default=128)
  ap.add_argument("--layers", type=int, default=4)
  ap.add_argument("--head-dim", type=int, default=32)
  ap.add_argument("--impl", default="chunk", help="lasad_attention implementation")
  ap.add_argument("--out", default="results/sad")
  args = ap.parse_args()
  os.makedirs(args.out, exist_ok=True)
  seeds = [int(s) for s in args.seeds.split(",")]
  dev = jax.devices()[0]
  print(f"SAD ablation on {getattr(dev, 'device_kind', dev.platform)}: dim {args.dim}, "
        f"{args.layers} layers, head dim {args.head_dim}, {args.steps} steps x batch "
        f"{args.batch_size}, lr {args.lr}, seeds {seeds}", flush=True)
  path = os.path.join(args.out, "sad.json")
  results = json.load(open(path)) if os.path.exists(path) else {}
  cache = {}
  for ds in args.datasets.split(","):
    for variant in args.variants.split(","):
      cfg = make_config(ds, variant, args)
      D.check_config(cfg)
      key = f"{ds}/{variant}"
      if key in results and sorted(results[key]["seeds"]) == sorted(map(str, seeds)):
        print(f"{key}: done already", flush=True)
        continue
      rec = {"seeds": {}, "params": M.count_params(cfg), "grid": list(cfg.grid)}
      if ds not in cache:
        cache[ds] = load_split(cfg, "train")
      for seed in seeds:
        t0 = time.time()
        state, losses = run(cfg, seed, cache[ds])
        nll = held_out_nll(cfg, state.params)
        rec["seeds"][str(seed)] = {"nll": nll, "final_train_loss": statistics.mean(losses[-20:]),
                                   "seconds": round(time.time() - t0, 1)}
        print(f"{key:<18} seed {seed}: held-out NLL {nll:.4f}  train {losses[-1]:.4f}  "
              f"({time.time() - t0:.0f}s)", flush=True)
        if seed == seeds[0]:
          sc = ml_collections.ConfigDict(cfg.to_dict())
          sc.sample.num_per_class, sc.sample.cfg_scale = 8, 2.0
          T.sample_grid(sc, state.params, os.path.join(args.out, f"{ds}_{variant}.png"))
      nlls = [v["nll"] for v in rec["seeds"].values()]
      rec["mean"] = statistics.mean(nlls)
      rec["std"] = statistics.stdev(nlls) if len(nlls) > 1 else 0.0
      results[key] = rec
      with open(path + ".tmp", "w") as f:
        json.dump({k: v for k, v in results.items()}, f, indent=1)
      os.replace(path + ".tmp", path)
  lines = ["| data (grid) | " + " | ".join(args.variants.split(",")) + " |",
           "|---|" + "---:|" * len(args.variants.split(","))]
  for ds in args.datasets.split(","):
    row = []
    for variant in args.variants.split(","):
      r = results.get(f"{ds}/{variant}")
      row.append(f"{r['mean']:.4f} ± {r['std']:.4f}" if r else "-")
    grid = results.get(f"{ds}/{args.variants.split(',')[0]}", {}).get("grid", "?")
    lines.append(f"| {ds} ({grid[0]}x{grid[1]}) | " + " | ".join(row) + " |")
  table = "\n".join(lines)
  with open(os.path.join(args.out, "table.md"), "w") as f:
    f.write(table + "\n")
  print(table)


if __name__ == "__main__":
  main()
