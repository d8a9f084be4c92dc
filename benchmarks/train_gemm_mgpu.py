"""LASADGen-L's training matmuls: cuBLAS (XLA's jnp.dot) vs JAX's own Mosaic GPU Hopper matmul.

    PYTHONPATH=.:benchmarks python benchmarks/train_gemm_mgpu.py

Issue 6's remaining time is in elementwise passes around the GEMMs (SwiGLU, RMSNorms, residual
adds: ~89 ms of a 366 ms step, all at HBM speed; BENCHMARKS.md session 13) that only GEMM
prologue / epilogue fusion can cut, which XLA does not do around cuBLAS. A Mosaic GPU GEMM could
carry such an epilogue, if it is about as fast as cuBLAS first. This times, at L's training
shapes (batch 256 x 256 tokens = 65536 rows, bf16), jnp.dot against
``jax.experimental.pallas.ops.gpu.hopper_matmul_mgpu.matmul`` (warp-specialised, TMA, wgmma) over
a few tilings: device ms per matmul from a profiler trace, and TFLOP/s. Exploration only.
"""

import argparse
import dataclasses
import functools
import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.experimental.pallas.ops.gpu import hopper_matmul_mgpu as H  # noqa: E402

from benchmarks_common import device_us_per_call, write_results  # noqa: E402

M = 65536
SHAPES = {"w_in (q|f|v)": (1024, 3072), "wo": (1024, 1024), "w1|w3": (1024, 5632),
          "w2": (2816, 1024), "head": (1024, 16384)}
# (tile_m, tile_n, tile_k, stages, grid_minor_dim, grid_tile_width, wg_dimension)
CONFIGS = [(128, 128, 64, 4, "N", 4, "N"), (128, 128, 64, 4, "M", 8, "N"),
           (128, 256, 64, 3, "N", 4, "M"), (128, 128, 64, 5, "M", 16, "M")]


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--out", default="benchmarks/results/train_gemm_mgpu_h100.json")
  args = ap.parse_args()
  if jax.default_backend() != "gpu":
    raise SystemExit("train_gemm_mgpu.py needs a Hopper GPU (Mosaic GPU compiles for sm_90a)")
  print(f"device {jax.devices()[0].device_kind}, M={M}, bf16")
  records = []
  for name, (k, n) in SHAPES.items():
    a = jax.random.normal(jax.random.key(0), (M, k), jnp.bfloat16)
    b = jax.random.normal(jax.random.key(1), (k, n), jnp.bfloat16) * 0.03
    flop = 2 * M * k * n
    ref = jax.jit(jnp.dot)(a, b)
    us = device_us_per_call(jax.jit(jnp.dot), a, b, iters=10)[0]
    records.append(dict(shape=name, k=k, n=n, impl="xla", ms=us / 1e3, tflops=flop / us / 1e6))
    print(f"{name:<13} K={k} N={n}: xla {us / 1e3:6.3f} ms ({flop / us / 1e6:5.0f} TFLOP/s)",
          flush=True)
    for tm, tn, tk, st, minor, width, wg in CONFIGS:
      cfg = H.TuningConfig(tile_m=tm, tile_n=tn, tile_k=tk, max_concurrent_steps=st,
                           grid_minor_dim=H.MatmulDimension[minor], grid_tile_width=width,
                           wg_dimension=H.MatmulDimension[wg])
      label = f"mgpu {tm}x{tn}x{tk} s{st} {minor}{width} wg{wg}"
      try:
        f = jax.jit(functools.partial(H.matmul, c=None, config=cfg))
        got = f(a, b)
        err = float(jnp.sqrt(jnp.mean((got.astype(jnp.float32) - ref.astype(jnp.float32)) ** 2)
                             / jnp.mean(ref.astype(jnp.float32) ** 2)))
        us = device_us_per_call(f, a, b, iters=10)[0]
        records.append(dict(shape=name, k=k, n=n, impl=label, config=dataclasses.asdict(cfg),
                            ms=us / 1e3, tflops=flop / us / 1e6, rel_err=err))
        print(f"{'':<13} {label}: {us / 1e3:6.3f} ms ({flop / us / 1e6:5.0f} TFLOP/s), rel err "
              f"{err:.1e}", flush=True)
      except Exception as e:  # noqa: BLE001
        print(f"{'':<13} {label}: failed {type(e).__name__}: {str(e)[:200]}")
    write_results(args.out, "benchmarks/train_gemm_mgpu.py", records)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
