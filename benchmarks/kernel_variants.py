"""Device time of the one-pass forward and the fused backward kernels under block-size variants,
alternating the variants over several rounds (identical code on one machine spreads ~10-25%
run to run, so each variant is timed once per round and the medians compared).

    python benchmarks/kernel_variants.py [--shapes 32,1024,16,64 256,256,16,64] [--rounds 3]
        [--forward default,w8_s16_r128,...] [--backward default,w8_r128,...] [--out FILE]

bf16, row mask on (width 16, prefix 1, reset). Device microseconds per call from a profiler
trace (the kernels' summed durations, ``benchmarks_common.device_us_per_call``), so host
dispatch does not enter. Each variant's output is compared with the default's (relative RMS) so
a variant that computes something else shows.

The variants trade registers for programs per SM (Nsight Compute, BENCHMARKS.md session 26: both
kernels take 255 registers at 4 warps, 2 programs per SM): ``w8`` runs 8 warps per program,
``r<N>`` caps registers per thread at N (``BlockSizes.fused_maxnreg`` / ``bwd_maxnreg``), ``s16``
the forward on 16-row sub-chunks. ``python scripts/kernel_ir.py --regs --warps 8 --maxnreg 128
--block-sizes sub=16`` gives their registers and spills offline: at (32, 1024, 16, 64) the
forward at 8 warps, 16 rows, 128 registers spills nothing (2 programs of 8 warps per SM, twice
today's warps), at 32 rows 136 bytes; the fused backward at 8 warps and 128 registers 160 bytes.
On the H100 (session 29, BENCHMARKS.md, results/kernel_variants_h100_s29a.json) every variant
was 10-100% slower than the default at (32, 1024), (256, 256) and (8, 4096).
"""

import argparse
import dataclasses
import os
import statistics

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402

from benchmarks_common import (device_us_per_call, masked_case, rel_rms,  # noqa: E402
                               write_results)
from kernels.lasad import pallas as P  # noqa: E402

FORWARD = {
    "default": P.BlockSizes(),
    "r168": P.BlockSizes(fused_maxnreg=168),                                  # 3 programs / SM
    "s16_r128": P.BlockSizes(sub=16, fused_maxnreg=128),                      # 4 programs / SM
    "w8": P.BlockSizes(fused_num_warps=8),                                    # 1 program / SM
    "w8_r128": P.BlockSizes(fused_num_warps=8, fused_maxnreg=128),            # 2 x 8 warps / SM
    "w8_s16": P.BlockSizes(fused_num_warps=8, sub=16),
    "w8_s16_r128": P.BlockSizes(fused_num_warps=8, sub=16, fused_maxnreg=128),
}
BACKWARD = {
    "default": P.BlockSizes(),
    "r168": P.BlockSizes(bwd_maxnreg=168),
    "w8": P.BlockSizes(grads_num_warps=8),
    "w8_r128": P.BlockSizes(grads_num_warps=8, bwd_maxnreg=128),
}
INTERPRET = jax.default_backend() != "gpu"   # CPU: a smoke run of the code paths


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--shapes", nargs="+", default=["32,1024,16,64", "256,256,16,64"])
  ap.add_argument("--rounds", type=int, default=3)
  ap.add_argument("--iters", type=int, default=10, help="calls per profiled measurement")
  ap.add_argument("--forward", default=",".join(FORWARD), help="forward variants ('' none)")
  ap.add_argument("--backward", default=",".join(BACKWARD), help="backward variants ('' none)")
  ap.add_argument("--out", default=None, help="JSON results (benchmarks_common.write_results)")
  args = ap.parse_args()
  fwd = [v for v in args.forward.split(",") if v]
  bwd = [v for v in args.backward.split(",") if v]
  for names, table, what in ((fwd, FORWARD, "--forward"), (bwd, BACKWARD, "--backward")):
    bad = [n for n in names if n not in table]
    if bad:
      ap.error(f"{what}: unknown variants {bad}; choose from {sorted(table)}")
  print(f"{jax.devices()[0].device_kind}  bf16, device us per call, {args.rounds} rounds")
  records = []
  for spec in args.shapes:
    shape = tuple(int(x) for x in spec.split(","))
    b, t, h, _ = shape
    q, k, v, g, do, width, prefix, bnd, zeros = masked_case(shape)
    fns = {}
    for name in fwd:
      fns[("forward", name)] = (jax.jit(
          lambda q, k, v, g, bs=FORWARD[name]: P._fused_forward(
              q, k, v, g, width, prefix, bnd, zeros, seq_len=t, scale=1.0, bs=bs,
              interpret=INTERPRET)[0]), (q, k, v, g))
    # the fused backward only where the model would take it (B*H >= FUSED_BWD_MIN_BH)
    for name in bwd if b * h >= P.FUSED_BWD_MIN_BH else ():
      bs = dataclasses.replace(BACKWARD[name], fused_backward=True)
      fns[("backward", name)] = (jax.jit(
          lambda q, k, v, g, do, bs=P._bwd_blocks(bs): P._fused_grads(
              q, k, v, g, do, width, prefix, bnd, zeros, zeros, seq_len=t, scale=1.0, bs=bs,
              interpret=INTERPRET)[:4]), (q, k, v, g, do))
    # compile each, and check it against its kernel's default (or itself without one)
    outs = {key: jax.tree.leaves(jax.block_until_ready(fn(*xs))) for key, (fn, xs) in fns.items()}
    errs = {key: max(rel_rms(a, r) for a, r in zip(out, outs.get((key[0], "default"), out)))
            for key, out in outs.items()}
    times = {key: [] for key in fns}
    for _ in range(args.rounds):
      for key, (fn, xs) in fns.items():
        times[key].append(device_us_per_call(fn, *xs, iters=args.iters)[0])
    print(f"shape {shape}")
    for key in fns:
      med = statistics.median(times[key])
      print(f"  {key[0]:<8} {key[1]:<12} {med:9.1f} us  rounds "
            + " ".join(f"{x:.1f}" for x in times[key]) + f"  vs default {errs[key]:.1e}",
            flush=True)
      records.append(dict(shape=list(shape), kernel=key[0], variant=key[1], us=med,
                          rounds=times[key], rel_rms_vs_default=errs[key]))
  if args.out:
    write_results(args.out, "benchmarks/kernel_variants.py", records)


if __name__ == "__main__":
  main()
