"""Plot a training run's metrics.jsonl (loss, held-out NLL, throughput) to a PNG.

    python scripts/plot_metrics.py runs/digits              # writes runs/digits/metrics.png
    python scripts/plot_metrics.py runs/a runs/b --out cmp.png   # several runs on the same axes
"""

import argparse
import json
import os


def read_metrics(path):
  """Records of a metrics.jsonl (a run directory or the file), skipping a half-written line."""
  if os.path.isdir(path):
    path = os.path.join(path, "metrics.jsonl")
  recs = []
  with open(path) as f:
    for line in f:
      try:
        recs.append(json.loads(line))
      except json.JSONDecodeError:
        pass
  return recs


def series(recs, key):
  pts = [(r["step"], r[key]) for r in recs if key in r]
  return [p[0] for p in pts], [p[1] for p in pts]


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("runs", nargs="+", help="run directories (or metrics.jsonl files)")
  ap.add_argument("--out", help="PNG path (default: RUN/metrics.png of the first run)")
  args = ap.parse_args(argv)
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 3, figsize=(15, 4))
  for run in args.runs:
    recs = read_metrics(run)
    if not recs:
      raise SystemExit(f"{run}: no metrics records")
    name = os.path.basename(os.path.normpath(run))
    axes[0].plot(*series(recs, "loss"), label=name, lw=0.8)
    axes[1].plot(*series(recs, "eval_nll"), "o-", label=name)
    axes[2].plot(*series(recs, "tokens_per_s"), label=name)
  for ax, title in zip(axes, ("training loss (nats/token)", "held-out NLL (nats/token)",
                              "throughput (tokens/s)")):
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  out = args.out or os.path.join(args.runs[0] if os.path.isdir(args.runs[0]) else
                                 os.path.dirname(args.runs[0]), "metrics.png")
  fig.tight_layout()
  fig.savefig(out, dpi=100)
  print(f"wrote {out}")


if __name__ == "__main__":
  main()
