"""Top-k threshold of the sampler's logits: ``lax.top_k`` (a sort) vs ``kernels.sampling.kth``.

    python benchmarks/topk.py [--rows 8] [--vocab 16384] [--k 2000] [--out benchmarks/results/topk_h100.json]

The sampler filters each row of CFG-combined logits (8 images: 8 rows of LASADGen's 16384) to its
top k (2000) per generated token, for which it needs only each row's k-th largest value. Device
microseconds per call (kernels' summed durations in a profiler trace of 20 calls) for the sort
and for the Pallas search kernel at radix 2 and 4 (32 and 16 passes) and several warp counts;
every variant's threshold is checked equal to the sort's first.
"""

import argparse
import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks_common import device_us_per_call, write_results  # noqa: E402
from kernels.sampling.kth import kth_largest  # noqa: E402


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--rows", type=int, default=8)
  ap.add_argument("--vocab", type=int, default=16384)
  ap.add_argument("--k", type=int, default=2000)
  ap.add_argument("--warps", default="4,8,16")
  ap.add_argument("--radices", default="2,4")
  ap.add_argument("--out", default="benchmarks/results/topk_h100.json")
  args = ap.parse_args()
  x = 3 * jax.random.normal(jax.random.key(0), (args.rows, args.vocab), jnp.float32)
  k = args.k
  runs = {"lax.top_k": jax.jit(lambda x: jax.lax.top_k(x, k)[0][:, -1:])}
  interpret = jax.default_backend() != "gpu"
  for radix in (int(v) for v in args.radices.split(",")):
    for w in (int(v) for v in args.warps.split(",")):
      runs[f"kth radix {radix} warps {w}"] = jax.jit(
          lambda x, r=radix, w=w: kth_largest(x, k, radix=r, num_warps=w, interpret=interpret))
  ref = np.asarray(runs["lax.top_k"](x))
  records = []
  print(f"device {jax.devices()[0].device_kind}: [{args.rows}, {args.vocab}] float32, k = {k}")
  for name, f in runs.items():
    same = bool((np.asarray(f(x)) == ref).all())
    us, launches = device_us_per_call(f, x, iters=20)
    records.append(dict(impl=name, us=us, kernels_per_call=sum(launches.values()), same=same))
    print(f"  {name:<24} {us:8.2f} us/call, {sum(launches.values()):.0f} kernels, same as sort: "
          f"{same}", flush=True)
  write_results(args.out, "benchmarks/topk.py", records)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
