"""Device time of the Mosaic GPU persistent decode kernel (kernels/lasad/decode_mgpu.py) alone.

    PYTHONPATH=.:benchmarks python benchmarks/decode_mgpu.py [--variants ,attn,own,wait]

Every layer of one LASADGen-L token (24 layers, 16 rows = 8 images with CFG, bf16 weights,
random values) on one GPU, one warpgroup per SM. Variants are Plan.skip sets (timing experiments:
the results are then wrong): "attn" / "own" skip the attention / owner units' math, "build" the
B operand tiles (and C's and E's waits, inside their builds), "wait" every semaphore wait; and
Plan fields as "name=N" (e.g. "state_bufs=2+stages=10", "att_split=1", "b_13=8"). Prints device
us per token.
"""

import argparse
import dataclasses
import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks_common import device_us_per_call, write_results  # noqa: E402
from kernels.lasad import decode_mgpu as DM  # noqa: E402


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--variants", default=",attn,own,build,wait,attn+own+build+wait",
                  help="comma-separated; each +-joined Plan.skip entries and Plan sizes ('' = as is)")
  ap.add_argument("--layers", type=int, default=24)
  ap.add_argument("--out", default="benchmarks/results/decode_mgpu_h100.json")
  args = ap.parse_args()
  L, B, D, F, H = args.layers, 16, 1024, 2816, 16
  nprog = jax.devices()[0].core_count
  base = DM.make_plan(layers=L, batch=B, dim=D, hidden=F, heads=H, eps=1e-5, nprog=nprog)
  ks = iter(jax.random.split(jax.random.key(0), 16))
  bf = jnp.bfloat16
  w = lambda *s: (jax.random.normal(next(ks), s, jnp.float32) * 0.02).astype(bf)  # noqa: E731
  args_ = (jax.random.normal(next(ks), (B, D)), 0.1 * jax.random.normal(next(ks), (L, B, H, 64, 64)),
           w(L, D, 3 * D), w(L, D, D), w(L, D, 2 * F), w(L, F, D), jnp.ones((L, D)),
           jnp.ones((L, D)), jnp.ones((L, D)), jnp.full((L, D), 0.5), jnp.zeros((L, H)),
           jnp.zeros((B,), bool))
  mb = sum(a.size * a.dtype.itemsize for a in args_[2:6]) / 1e6
  print(f"device {jax.devices()[0].device_kind}, {nprog} programs, {L} layers, {mb:.0f} MB of "
        f"weights per token, units per layer {base.units()}")
  records = []
  for v in args.variants.split(","):
    parts = [x for x in v.split("+") if x]
    sizes = {k: int(n) for k, n in (x.split("=") for x in parts if "=" in x)}
    try:
      plan = dataclasses.replace(base, skip=tuple(x for x in parts if "=" not in x), **sizes)
      f = jax.jit(lambda *a, plan=plan: DM.decode_layers(*a, plan=plan))
      us, _ = device_us_per_call(f, *args_, iters=10)
    except Exception as e:  # noqa: BLE001
      print(f"{v or 'as is':<24} failed {type(e).__name__}: {str(e)[:300]}", flush=True)
      continue
    records.append(dict(variant=v or "as is", us_per_token=us, us_per_layer=us / L))
    print(f"{v or 'as is':<24} {us:8.1f} us per token, {us / L:6.1f} per layer", flush=True)
  write_results(args.out, "benchmarks/decode_mgpu.py", records)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
