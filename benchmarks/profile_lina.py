"""Where LINA's sampler spends its time, linear vs softmax attention: GPU kernels of one call.

    python benchmarks/profile_lina.py [--variant d48w1536] [--grid 16] [--images 8]
        [--linear xla/shift,...] [--out benchmarks/results/profile_lina_h100.json]

For each linear variant (``config.attn_impl/config.conv_impl``) and the softmax baseline: one
compiling call, three timed calls (median s/call), then one call under ``jax.profiler.trace``
whose device kernels are summed by name (calls and ms per sampler call, top 40 printed). Random
weights as ``benchmarks/lina.py`` makes them; bf16 matmuls. On a machine without a GPU only the
timings are written.
"""

import argparse
import datetime
import json
import os
import sys

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import ml_collections  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks_common import profile_call  # noqa: E402
from configs.lina import get_config  # noqa: E402
from lasad_jax.lina import flow as F  # noqa: E402
from lina import random_params, time_sampler  # noqa: E402


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--variant", default="d48w1536")
  ap.add_argument("--grid", type=int, default=16)
  ap.add_argument("--images", type=int, default=8)
  ap.add_argument("--linear", default="auto/auto",
                  help="comma-separated attn_impl/conv_impl[/conv_dtype] triples ('auto' keeps the config's)")
  ap.add_argument("--skip-softmax", action="store_true")
  ap.add_argument("--top", type=int, default=40)
  ap.add_argument("--hlo", action="store_true",
                  help="also write each run's compiled HLO beside the JSON (to trace kernel names)")
  ap.add_argument("--out", default="benchmarks/results/profile_lina_h100.json")
  args = ap.parse_args()
  runs = [("linear", tuple(o.split("/"))) for o in args.linear.split(",")]
  if not args.skip_softmax:
    runs.append(("softmax", None))
  dev = jax.devices()[0]
  rec = dict(meta=dict(date=datetime.date.today().isoformat(), device=dev.device_kind,
                       jax=jax.__version__, variant=args.variant, grid=args.grid,
                       images=args.images,
                       command="python benchmarks/profile_lina.py " + " ".join(sys.argv[1:])),
             runs=[])
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  for attention, opt in runs:
    c = get_config(args.variant)
    c.grid, c.attention = (args.grid, args.grid), attention
    if opt is not None:
      c.attn_impl = c.attn_impl if opt[0] == "auto" else opt[0]
      c.conv_impl = opt[1]
      if len(opt) > 2:
        c.conv_dtype = opt[2]
    cfg = ml_collections.FrozenConfigDict(c)
    params = random_params(cfg)
    first, sec = time_sampler(cfg, args.images, params=params)
    labels = [i % cfg.num_classes for i in range(args.images)]
    name = attention if opt is None else f"linear {'/'.join(opt)}"
    if args.hlo:
      s = cfg.sample
      hlo = F._sample.lower(cfg, params, jax.numpy.asarray(labels, "int32"), jax.random.key(9),
                            float(s.cfg_scale), s.ar_steps, s.euler_steps).compile().as_text()
      with open(os.path.splitext(args.out)[0] + f".{name.replace(' ', '_').replace('/', '-')}"
                f".hlo.txt", "w") as f:
        f.write(hlo)
    stats, span = profile_call(lambda: F.sample(cfg, params, labels, rng=jax.random.key(9)))
    r = dict(name=name, first_call_s=first, s_per_call=sec)
    print(f"{args.variant} {args.grid * 16}px {name}: {sec:.3f} s/call (first {first:.1f} s)",
          flush=True)
    if span:
      wall, busy = span[1] - span[0], span[2]
      r.update(wall_ms=wall / 1e6, kernels_busy_ms=busy / 1e6,
               launches=sum(k for k, _ in stats.values()))
      r["kernels"] = {k: dict(calls=n, ms=t / 1e6, us_per_call=t / n / 1e3)
                      for k, (n, t) in sorted(stats.items(), key=lambda kv: -kv[1][1])}
      print(f"  traced call: {r['wall_ms']:.1f} ms wall, {r['kernels_busy_ms']:.1f} ms in "
            f"kernels, {r['launches']} launches")
      print(f"  {'kernel':<64} {'calls':>7} {'ms':>8} {'us/call':>8}")
      for k, v in list(r["kernels"].items())[:args.top]:
        print(f"  {k[:64]:<64} {v['calls']:7d} {v['ms']:8.2f} {v['us_per_call']:8.2f}")
    rec["runs"].append(r)
    with open(args.out, "w") as f:
      json.dump(rec, f, indent=1)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
