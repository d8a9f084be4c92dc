"""Skinny GEMMs of the decode step: XLA's choice vs a plain Pallas (Triton) kernel, L-sized.

    python benchmarks/decode_gemm.py [--out benchmarks/results/decode_gemm_h100.json]

The sampler's four matmuls per layer have M = 16 rows (8 images + their CFG twins) and move
their weights at 0.7-1.4 TB/s under XLA (BENCHMARKS.md, session 5 profile). This times
x [16, K] @ W [K, N] in bf16 for LASADGen-L's shapes, 24 distinct weights per call (one per layer,
so they come from HBM, not L2), for XLA's dot and for a Pallas kernel over a grid of
(N / block_n, split_k) with split-K partials summed by XLA. Device microseconds per matmul (from a
profiler trace) and the bandwidth of reading W. Exploration for issue 5: nothing in the library uses this kernel yet.
``--mgpu-configs`` times kernels/sampling/gemm.py (Mosaic GPU, TMA pipeline) the same way.
"""

import argparse
import functools
import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.experimental import pallas as pl  # noqa: E402
from jax.experimental.pallas import triton as plgpu  # noqa: E402

from benchmarks_common import device_us_per_call, time_jax, write_results  # noqa: E402
from kernels.sampling import gemm as G  # noqa: E402  (PYTHONPATH=.:benchmarks)

SHAPES = {"w_in (q|f|v)": (1024, 3072), "wo": (1024, 1024), "w1|w3": (1024, 5632),
          "w2": (2816, 1024)}
LAYERS = 24


def _kernel(x_ref, w_ref, o_ref, *, block_k, n_k, trans_w):
  def body(i, acc):
    ks = pl.ds(i * block_k, block_k)
    w = w_ref[:, ks] if trans_w else w_ref[ks, :]
    dims = (((1,), (1 if trans_w else 0,)), ((), ()))
    return acc + jax.lax.dot_general(x_ref[:, ks], w, dims, preferred_element_type=jnp.float32)
  o_ref[...] = jax.lax.fori_loop(0, n_k, body, jnp.zeros(o_ref.shape, jnp.float32))


def pallas_gemm(x, w, *, block_n, split, block_k=128, num_warps=4, num_stages=4, interpret=False,
                trans_w=False):
  """x [M, K] @ W, W stored [K, N] or (``trans_w``) [N, K] (each program then reads whole
  contiguous K rows of its block_n outputs): grid (N / block_n, split), partials summed by XLA."""
  m, k = x.shape
  n = w.shape[0 if trans_w else 1]
  kseg = k // split
  w_spec = (pl.BlockSpec((block_n, kseg), lambda j, s: (j, s)) if trans_w
            else pl.BlockSpec((kseg, block_n), lambda j, s: (s, j)))
  out = pl.pallas_call(
      functools.partial(_kernel, block_k=block_k, n_k=kseg // block_k, trans_w=trans_w),
      grid=(n // block_n, split),
      in_specs=[pl.BlockSpec((m, kseg), lambda j, s: (0, s)), w_spec],
      out_specs=pl.BlockSpec((None, m, block_n), lambda j, s: (s, 0, j)),
      out_shape=jax.ShapeDtypeStruct((split, m, n), jnp.float32),
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret)(x, w)
  return out.sum(0).astype(x.dtype)


def time_us(f, *args, iters=10):
  """Device time per matmul: the kernels' summed durations in a profiler trace of ``iters`` calls
  (host dispatch of a 24-output call would otherwise dominate), split-K sums included."""
  return max(device_us_per_call(f, *args, iters=iters)[0] / LAYERS, 1e-9)  # CPU: no GPU lines


def chain_us(gemm, x, ws, iters=50):
  """Wall-clock microseconds per matmul of x_{i+1} = tile(x_i @ W_i) over the 24 weights (one
  small XLA fusion between two matmuls, as between a decode step's kernels)."""
  k = x.shape[1]

  def run(x, ws):
    for w in ws:
      y = gemm(x, w).astype(x.dtype)
      x = jnp.tile(y, (1, -(-k // y.shape[1])))[:, :k]
    return x
  return time_jax(jax.jit(run), x, ws, iters=iters) * 1e3 / LAYERS


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--out", default="benchmarks/results/decode_gemm_h100.json")
  ap.add_argument("--configs", default="32:1,32:2,64:1,64:2,64:4,128:2,128:4,32:4",
                  help="block_n:split_k pairs, for the [K, N] weight layout")
  ap.add_argument("--t-configs", default="",
                  help="block_n:split_k:block_k:num_stages:num_warps, for weights stored [N, K]")
  ap.add_argument("--mgpu-configs", default="",
                  help="tn:tk:splits:stages[:nopdl] of kernels/sampling/gemm.py (Mosaic GPU, [K, N])")
  ap.add_argument("--chain", action="store_true",
                  help="also time the 24 matmuls as a dependent chain by the wall clock (each "
                       "input made from the last output, as in a decode step), where one kernel "
                       "can overlap the next one's start")
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
    chain = chain_us(lambda x, w: x @ w, x, ws) if args.chain else None
    records.append(dict(shape=name, k=k, n=n, impl="xla", us=us, tb_s=mb / us, chain_us=chain))
    print(f"{name:<14} K={k} N={n} ({mb:.1f} MB): xla {us:6.2f} us ({mb / us:.2f} TB/s)"
          + (f", chained {chain:6.2f} us" if chain else ""), flush=True)
    runs = []   # (label, pallas_gemm keywords); [K, N] weights, then [N, K]
    for cfg in filter(None, args.configs.split(",")):
      bn, split = (int(v) for v in cfg.split(":"))
      runs.append((f"pallas bn={bn} split={split}", dict(block_n=bn, split=split)))
    for cfg in filter(None, args.t_configs.split(",")):
      bn, split, bk, st, nw = (int(v) for v in cfg.split(":"))
      runs.append((f"pallas [N,K] {cfg}", dict(block_n=bn, split=split, block_k=bk,
                                               num_stages=st, num_warps=nw, trans_w=True)))
    for cfg in filter(None, args.mgpu_configs.split(",")):
      tn, tk, split, st = (int(v) for v in cfg.split(":")[:4])
      runs.append((f"mgpu {cfg}", dict(mgpu=G.GemmConfig(tn=tn, tk=tk, splits=split, stages=st,
                                                         pdl=not cfg.endswith(":nopdl")))))
    wts = [w.T for w in ws] if args.t_configs else []
    for label, kw in runs:
      if "mgpu" in kw:
        try:
          G.check(16, k, n, kw["mgpu"], x.dtype)
        except ValueError:
          continue
        gemm = functools.partial(G.skinny_matmul, cfg=kw["mgpu"], interpret=interpret)
      elif n % kw["block_n"] or (k // kw["split"]) % kw.get("block_k", 128):
        continue
      else:
        gemm = functools.partial(pallas_gemm, interpret=interpret, **kw)
      w_in = wts if kw.get("trans_w") else ws
      try:
        f = jax.jit(lambda x, ws, gemm=gemm: [gemm(x, w).astype(x.dtype) for w in ws])
        got = f(x, w_in)[0].astype(jnp.float32)
        err = float(jnp.sqrt(jnp.mean((got - ref) ** 2) / jnp.mean(ref ** 2)))
        us = time_us(f, x, w_in)
        chain = chain_us(gemm, x, w_in) if args.chain else None
        records.append(dict(shape=name, k=k, n=n, impl=label, us=us, tb_s=mb / us, rel_err=err,
                            chain_us=chain))
        print(f"{'':<14} {label}: {us:6.2f} us ({mb / us:.2f} TB/s), rel err {err:.1e}"
              + (f", chained {chain:6.2f} us" if chain else ""), flush=True)
      except Exception as e:  # noqa: BLE001
        print(f"{'':<14} {label}: failed {type(e).__name__}: {str(e)[:150]}")
    write_results(args.out, "benchmarks/decode_gemm.py", records)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
