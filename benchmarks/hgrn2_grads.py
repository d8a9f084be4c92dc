"""Device time of HGRN2 attention's gradient (LASADGen's layer core) by kernel.

    python benchmarks/hgrn2_grads.py [--shape 256,256,16,64] [--gates kernel,xla] [--out F.json]

``hgrn2_attention(impl="pallas")`` with the gates in the kernels or in XLA, bf16, row mask on
(width 16, prefix 1, boundary -0.05), at LASADGen-L's training shape by default: every kernel of
one jitted ``jax.grad`` call with its microseconds per call (profiler trace), so a change to the
gradient kernel's epilogue is seen beside the XLA passes it replaces. (The gradient needs only the
inputs, so the forward kernel does not run in it.)
"""

import argparse
import os
import sys

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from lasad_jax.ops import GATES, hgrn2_attention  # noqa: E402

from benchmarks_common import trace_kernels, write_results  # noqa: E402


def run(shape, gate, iters):
  b, t, h, d = shape
  ks = jax.random.split(jax.random.key(0), 4)
  qr, f, v, do = (jax.random.normal(k, (b, t, h, d), jnp.bfloat16) for k in ks)
  lb = jnp.linspace(0.0, 0.9, h * d, dtype=jnp.float32).reshape(h, d)
  impl = "pallas" if jax.default_backend() == "gpu" else "chunk"

  @jax.jit
  def step(qr, f, v, lb):
    def loss(qr, f, v, lb):
      o = hgrn2_attention(qr, f, v, lb, width=16, prefix=1, boundary=-0.05, impl=impl,
                          gate=gate if impl == "pallas" else "xla")
      return jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32))
    return jax.grad(loss, argnums=range(4))(qr, f, v, lb)

  stats = trace_kernels(step, qr, f, v, lb, iters=iters)
  return {k: dict(calls=c / iters, us=round(ns / 1e3 / iters, 1)) for k, (c, ns) in
          sorted(stats.items(), key=lambda kv: -kv[1][1])}


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--shape", default="256,256,16,64")
  ap.add_argument("--gates", default="kernel,xla")
  ap.add_argument("--iters", type=int, default=10)
  ap.add_argument("--out", default="")
  args = ap.parse_args()
  shape = tuple(int(x) for x in args.shape.split(","))
  print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}, (B, T, H, D) = {shape}, bf16")
  records = []
  for gate in args.gates.split(","):
    if gate not in GATES:
      sys.exit(f"--gates: {gate!r} is not one of {GATES}")
    kernels = run(shape, gate, args.iters)
    total = sum(k["us"] for k in kernels.values())
    print(f"gate={gate}: {total:.1f} us per gradient call")
    for name, k in kernels.items():
      print(f"  {name[:60]:60s} {k['calls']:4.0f} {k['us']:9.1f} us")
    records.append(dict(gate=gate, shape=shape, total_us=round(total, 1), kernels=kernels))
  if args.out:
    write_results(args.out, "benchmarks/hgrn2_grads.py", records)


if __name__ == "__main__":
  main()
