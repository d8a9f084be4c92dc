"""Device time of the persistent decode kernel (kernels/lasad/decode_persistent.py) at LASADGen-L's
sizes, 16 rows (8 images with CFG), random bf16 weights, by phase left out, and by tiling.

    python benchmarks/persistent_decode.py [--variants all,-1,-2,...] [--tilings default,...]

"-N" leaves phase N out (timing only; its results are then wrong): 1 [wq|wf|wv], 2 attention,
3 wo, 4 w1|w3, 5 w2. Microseconds per token (24 layers; XLA's final norm and logits not
included) from a profiler trace, and the weights' read bandwidth.
"""

import argparse
import dataclasses
import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks_common import device_us_per_call, write_results  # noqa: E402
from kernels.lasad import decode_persistent as DP  # noqa: E402

TILINGS = {"default": {}, "wide": dict(bn_in=128, bn_ff=128, bn_x=64),
           "k128": dict(k_in=128, k_o=128, k_ff=128), "bk64": dict(bk=64),
           "volatile": dict(volatile=True),
           "fine": dict(k_in=128, k_ff=128, k_2=128, bn_ff=32), "w8": dict(num_warps=8),
           "s2": dict(num_stages=2), "s3": dict(num_stages=3), "s6": dict(num_stages=6),
           "s2p2": dict(num_stages=2, nprog_per_sm=2)}


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--variants", default="all,-1,-2,-3,-4,-5,-12345")
  ap.add_argument("--tilings", default="default")
  ap.add_argument("--out", default="benchmarks/results/persistent_decode_h100.json")
  args = ap.parse_args()
  L, B, D, F, H, HD = 24, 16, 1024, 2816, 16, 64
  nprog = getattr(jax.devices()[0], "core_count", 132)
  ks = jax.random.split(jax.random.key(0), 8)
  w = lambda k, *s: (0.02 * jax.random.normal(k, s)).astype(jnp.bfloat16)  # noqa: E731
  args_ = (jax.random.normal(ks[0], (B, D)), jnp.zeros((L, B, H, HD, HD)),
           w(ks[1], L, D, 3 * D), w(ks[2], L, D, D), w(ks[3], L, D, 2 * F), w(ks[4], L, F, D),
           jnp.ones((L, D)), jnp.ones((L, D)), jnp.ones((L, D)), jnp.full((L, D), 0.5),
           jnp.zeros((L, H)), jnp.zeros((B,), bool))
  wbytes = sum(a.size * 2 for a in args_[2:6])
  base = DP.make_plan(layers=L, batch=B, dim=D, hidden=F, heads=H, head_dim=HD, eps=1e-5,
                      nprog=nprog)
  print(f"{jax.devices()[0].device_kind}, {nprog} programs, weights {wbytes / 1e6:.0f} MB/token")
  records = []
  for tiling in args.tilings.split(","):
    for var in args.variants.split(","):
      skip = () if var == "all" else tuple(int(c) for c in var[1:])
      t = dict(TILINGS[tiling])
      per_sm = t.pop("nprog_per_sm", 1)
      t["nprog"] = nprog * per_sm   # all must be resident, or every barrier times out:
      spins = DP.MAX_SPINS if per_sm == 1 else 1 << 12   # then give up fast
      plan = dataclasses.replace(base, skip=skip, **t)
      f = jax.jit(lambda *a, plan=plan, spins=spins: DP.decode_layers(*a, plan=plan,
                                                                      max_spins=spins))
      try:
        us, _ = device_us_per_call(f, *args_)
        fails = int(f(*args_)[2])
      except Exception as e:  # noqa: BLE001 - a tiling Triton refuses is reported, not fatal
        print(f"{tiling:8s} {var:8s}: failed: {type(e).__name__}: {str(e)[:300]}")
        continue
      print(f"{tiling:8s} {var:8s}: {us:8.1f} us/token ({us / L:6.2f} per layer, "
            f"{wbytes / us / 1e6:.2f} TB/s of weights){'  TIMEOUTS' if fails else ''}")
      records.append(dict(tiling=tiling, variant=var, us=us, timeouts=fails))
  write_results(args.out, "benchmarks/persistent_decode.py", records, programs=nprog)


if __name__ == "__main__":
  main()
