"""Where a generated token's time goes: GPU kernels of one sampling call, from a profiler trace.

    python benchmarks/profile_sampler.py [--variant L] [--attention lasad] [--grid 16]
        [--top-k 2000] [--decode-impl auto] [--top-k-impl auto] [--out benchmarks/results/profile_sampler_h100.json]

Runs ``lasad_jax.sampling.sample`` once to compile, then once under ``jax.profiler.trace``, and
sums the device plane's kernel events by name: calls and microseconds per generated token, and the
gaps between kernels (launch overhead) per token. Also writes the optimised HLO of the sampler
beside the JSON (``.hlo.txt``) so a kernel name can be traced back to its fusion. 8 images, CFG 4,
random weights (bf16 compute). On a machine without a GPU the device plane is missing and only
the HLO is written.
"""

import argparse
import datetime
import json
import os
import sys

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from configs.lasad import get_config  # noqa: E402
from lasad_jax import model as M  # noqa: E402
from lasad_jax import sampling as S  # noqa: E402
from benchmarks_common import add_decode_args, apply_decode_args, profile_call  # noqa: E402


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--variant", default="L")
  ap.add_argument("--attention", default="lasad")
  ap.add_argument("--grid", type=int, default=16)
  ap.add_argument("--top-k", type=int, default=2000)
  add_decode_args(ap)
  ap.add_argument("--top-k-impl", default="auto", choices=S.TOP_K_IMPLS,
                  help="auto (select on GPU) | sort (lax.top_k) | select (Pallas)")
  ap.add_argument("--out", default="benchmarks/results/profile_sampler_h100.json")
  args = ap.parse_args()
  cfg = get_config(args.variant)
  cfg.attention = args.attention
  apply_decode_args(cfg, args)
  model = M.LASADGen(cfg, rngs=nnx.Rngs(0))
  labels = jnp.arange(8, dtype=jnp.int32) % cfg.num_classes
  kw = dict(height=args.grid, width=args.grid, cfg_scale=4.0, top_k=args.top_k,
            top_k_impl=args.top_k_impl)
  n = args.grid * args.grid
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  hlo = S._sample.lower(model.config, model.params(), labels, jax.random.key(0), n, args.grid,
                        4.0, 1.0, args.top_k, 1.0, args.top_k_impl).compile().as_text()
  with open(os.path.splitext(args.out)[0] + ".hlo.txt", "w") as f:
    f.write(hlo)
  jax.block_until_ready(S.sample(model, labels, rng=jax.random.key(0), **kw))
  stats, span = profile_call(lambda: S.sample(model, labels, rng=jax.random.key(1), **kw))
  rec = dict(meta=dict(date=datetime.date.today().isoformat(), device=jax.devices()[0].device_kind,
                       jax=jax.__version__, tokens=n,
                       command="python benchmarks/profile_sampler.py " + " ".join(sys.argv[1:])))
  if span:
    wall, busy = span[1] - span[0], span[2]
    rec["per_token_us"] = dict(wall=wall / n / 1e3, kernels_busy=busy / n / 1e3,
                               gaps=(wall - busy) / n / 1e3,
                               launches=sum(c for c, _ in stats.values()) / n)
    rec["kernels"] = {k: dict(calls_per_token=c / n, us_per_token=t / n / 1e3, us_per_call=t / c / 1e3)
                      for k, (c, t) in sorted(stats.items(), key=lambda kv: -kv[1][1])}
    p = rec["per_token_us"]
    print(f"{args.variant} {args.attention} {args.grid}x{args.grid}: per token {p['wall']:.1f} us "
          f"wall, {p['kernels_busy']:.1f} us in kernels, {p['gaps']:.1f} us between them, "
          f"{p['launches']:.1f} launches")
    print(f"{'kernel':<60} {'calls/tok':>9} {'us/tok':>8} {'us/call':>8}")
    for k, v in list(rec["kernels"].items())[:40]:
      print(f"{k[:60]:<60} {v['calls_per_token']:9.2f} {v['us_per_token']:8.2f} "
            f"{v['us_per_call']:8.2f}")
  else:
    print("no GPU plane in the trace (no GPU?): wrote the HLO only")
  with open(args.out, "w") as f:
    json.dump(rec, f, indent=1)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
