"""Run the Pallas LASAD operator once (forward, then forward+backward) for an outside profiler.

    ncu --kernel-name regex:lasad --launch-skip 0 --launch-count 4 \
        python benchmarks/kernel_once.py [--shape 32,1024,16,64]

Compiles, warms up once, then runs each jitted function exactly once more, so a kernel-level
profiler (Nsight Compute, Nsight Systems) sees a short, predictable launch sequence. bf16, row
mask on (width 16, prefix 1, reset), as benchmarks/ops.py.
"""

import argparse

import jax
import jax.numpy as jnp

from benchmarks_common import inputs
from lasad_jax.ops import lasad_attention


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--shape", default="32,1024,16,64")
  ap.add_argument("--backward", action="store_true", help="also run forward+backward")
  args = ap.parse_args()
  shape = tuple(int(x) for x in args.shape.split(","))
  q, k, v, g, do = inputs(shape)
  f = lambda q, k, v, g: lasad_attention(q, k, v, g, width=16, prefix=1,   # noqa: E731
                                         boundary=-jnp.inf, scale=1.0, impl="pallas")
  fwd = jax.jit(f)
  fns = [(fwd, (q, k, v, g))]
  if args.backward:
    loss = lambda q, k, v, g, do: jnp.sum(f(q, k, v, g).astype(jnp.float32) * do)  # noqa: E731
    fns.append((jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))), (q, k, v, g, do)))
  for fn, a in fns:   # compile and warm up
    jax.block_until_ready(fn(*a))
  for fn, a in fns:
    jax.block_until_ready(fn(*a))
  print(f"ran {shape} on {jax.devices()[0].device_kind}")


if __name__ == "__main__":
  main()
