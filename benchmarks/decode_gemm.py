"""Skinny GEMMs of the decode step: XLA's choice vs a plain Pallas (Triton) kernel, L-sized.

    python benchmarks/decode_gemm.py [--out benchmarks/results/decode_gemm_h100.json]

The sampler's four matmuls per layer have M = 16 rows (8 images + their CFG twins) and move
their weights at 0.7-1.4 TB/s under XLA (BENCHMARKS.md, session 5 profile). This times
x [16, K] @ W [K, N] in bf16 for LASADGen-L's shapes, 24 distinct weights per call (one per layer,
so they come from HBM, not L2), for XLA's dot and for a Pallas kernel over a grid of
(N / block_n, split_k) with split-K partials summed by XLA. Device microseconds per matmul (from a
profiler trace) and the bandwidth of reading W. Exploration for issue 5: nothing in the library uses this kernel yet.
"""

import argparse
import datetime
import functools
import json
import os
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.experimental import pallas as pl  # noqa: E402
from jax.experimental.pallas import triton as plgpu  # noqa: E402

SHAPES = {"w_in (q|f|v)": (1024, 3072), "wo": (1024, 1024), "w1|w3": (1024, 5632),
          "w2": (2816, 1024)}
LAYERS = 24


def _kernel(x_ref, w_ref, o_ref, *, block_k, n_k):
  def body(i, acc):
    ks = pl.ds(i * block_k, block_k)
    return acc + jnp.dot(x_ref[:, ks], w_ref[ks, :], preferred_element_type=jnp.float32)
  acc = jax.lax.fori_loop(0, n_k, body, jnp.zeros(o_ref.shape, jnp.float32))
  o_ref[...] = acc


def pallas_gemm(x, w, *, block_n, split, block_k=128, num_warps=4, num_stages=4, interpret=False):
  m, k = x.shape
  n = w.shape[1]
  kseg = k // split
  out = pl.pallas_call(
      functools.partial(_kernel, block_k=block_k, n_k=kseg // block_k),
      grid=(n // block_n, split),
      in_specs=[pl.BlockSpec((m, kseg), lambda j, s: (0, s)),
                pl.BlockSpec((kseg, block_n), lambda j, s: (s, j))],
      out_specs=pl.BlockSpec((None, m, block_n), lambda j, s: (s, 0, j)),
      out_shape=jax.ShapeDtypeStruct((split, m, n), jnp.float32),
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret)(x, w)
  return out.sum(0).astype(x.dtype)


def _kernel_t(x_ref, w_ref, o_ref, *, block_k, n_k):
  def body(i, acc):
    ks = pl.ds(i * block_k, block_k)
    return acc + jax.lax.dot_general(x_ref[:, ks], w_ref[:, ks], (((1,), (1,)), ((), ())),
                                     preferred_element_type=jnp.float32)
  o_ref[...] = jax.lax.fori_loop(0, n_k, body, jnp.zeros(o_ref.shape, jnp.float32))


def pallas_gemm_t(x, w_t, *, block_n, split, block_k=128, num_warps=4, num_stages=4,
                  interpret=False):
  """x [M, K] @ w_t.T with the weight stored [N, K] (each program reads whole contiguous
  K-rows of its block_n outputs): grid (N / block_n, split), partials summed by XLA."""
  m, k = x.shape
  n = w_t.shape[0]
  kseg = k // split
  out = pl.pallas_call(
      functools.partial(_kernel_t, block_k=block_k, n_k=kseg // block_k),
      grid=(n // block_n, split),
      in_specs=[pl.BlockSpec((m, kseg), lambda j, s: (0, s)),
                pl.BlockSpec((block_n, kseg), lambda j, s: (j, s))],
      out_specs=pl.BlockSpec((None, m, block_n), lambda j, s: (s, 0, j)),
      out_shape=jax.ShapeDtypeStruct((split, m, n), jnp.float32),
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret)(x, w_t)
  return out.sum(0).astype(x.dtype)


def time_us(f, *args, iters=10):
  """Device time per matmul: the kernels' summed durations in a profiler trace of ``iters`` calls
  (host dispatch of a 24-output call would otherwise dominate), split-K sums included."""
  import glob
  import tempfile

  from benchmarks_common import device_kernels
  jax.block_until_ready(f(*args))
  with tempfile.TemporaryDirectory() as d:
    with jax.profiler.trace(d):
      for _ in range(iters):
        jax.block_until_ready(f(*args))
    stats, _ = device_kernels(glob.glob(f"{d}/**/*.xplane.pb", recursive=True)[-1])
  return max(sum(t for _, t in stats.values()) / 1e3 / (iters * LAYERS), 1e-9)  # CPU: no GPU lines


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--out", default="benchmarks/results/decode_gemm_h100.json")
  ap.add_argument("--configs", default="32:1,32:2,64:1,64:2,64:4,128:2,128:4,32:4",
                  help="block_n:split_k pairs, for the [K, N] weight layout")
  ap.add_argument("--t-configs", default="",
                  help="block_n:split_k:block_k:num_stages:num_warps, for weights stored [N, K]")
  args = ap.parse_args()
  interpret = jax.default_backend() != "gpu"
  records = []
  print(f"device {jax.devices()[0].device_kind}, M=16 bf16, {LAYERS} weights per call")
  for name, (k, n) in SHAPES.items():
    ws = [jax.random.normal(jax.random.key(i), (k, n), jnp.bfloat16) * 0.02 for i in range(LAYERS)]
    x = jax.random.normal(jax.random.key(99), (16, k), jnp.bfloat16)
    mb = k * n * 2 / 1e6
    fx = jax.jit(lambda x, ws: [x @ w for w in ws])
    us = time_us(fx, x, ws)
    ref = fx(x, ws)[0].astype(jnp.float32)
    records.append(dict(shape=name, k=k, n=n, impl="xla", us=us, tb_s=mb / us))
    print(f"{name:<14} K={k} N={n} ({mb:.1f} MB): xla {us:6.2f} us ({mb / us:.2f} TB/s)", flush=True)
    for cfg in args.configs.split(","):
      bn, split = (int(v) for v in cfg.split(":"))
      if n % bn or (k // split) % 128:
        continue
      try:
        f = jax.jit(lambda x, ws, bn=bn, split=split: [
            pallas_gemm(x, w, block_n=bn, split=split, interpret=interpret) for w in ws])
        got = f(x, ws)[0].astype(jnp.float32)
        err = float(jnp.sqrt(jnp.mean((got - ref) ** 2) / jnp.mean(ref ** 2)))
        us = time_us(f, x, ws)
        records.append(dict(shape=name, k=k, n=n, impl=f"pallas bn={bn} split={split}", us=us,
                            tb_s=mb / us, rel_err=err))
        print(f"{'':<14} pallas block_n={bn:<3} split_k={split}: {us:6.2f} us "
              f"({mb / us:.2f} TB/s), rel err {err:.1e}", flush=True)
      except Exception as e:  # noqa: BLE001
        print(f"{'':<14} pallas block_n={bn} split_k={split}: failed {type(e).__name__}: "
              f"{str(e)[:150]}")
    wts = [w.T for w in ws] if args.t_configs else []
    for cfg in filter(None, args.t_configs.split(",")):
      bn, split, bk, st, nw = (int(v) for v in cfg.split(":"))
      if n % bn or (k // split) % bk:
        continue
      try:
        f = jax.jit(lambda x, ws, bn=bn, split=split, bk=bk, st=st, nw=nw: [
            pallas_gemm_t(x, w, block_n=bn, split=split, block_k=bk, num_stages=st,
                          num_warps=nw, interpret=interpret) for w in ws])
        got = f(x, wts)[0].astype(jnp.float32)
        err = float(jnp.sqrt(jnp.mean((got - ref) ** 2) / jnp.mean(ref ** 2)))
        us = time_us(f, x, wts)
        records.append(dict(shape=name, k=k, n=n, impl=f"pallas [N,K] {cfg}", us=us,
                            tb_s=mb / us, rel_err=err))
        print(f"{'':<14} [N,K] bn={bn:<3} split={split} bk={bk} stages={st} warps={nw}: "
              f"{us:6.2f} us ({mb / us:.2f} TB/s), rel err {err:.1e}", flush=True)
      except Exception as e:  # noqa: BLE001
        print(f"{'':<14} [N,K] {cfg}: failed {type(e).__name__}: {str(e)[:150]}")
    with open(args.out, "w") as fh:
      json.dump(dict(meta=dict(date=datetime.date.today().isoformat(),
                               device=jax.devices()[0].device_kind, jax=jax.__version__,
                               command="python benchmarks/decode_gemm.py " + " ".join(sys.argv[1:])),
                     records=records), fh, indent=1)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
