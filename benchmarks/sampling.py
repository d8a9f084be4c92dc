"""Sampling speed and memory: LASADGen (O(1) state) vs the softmax baseline (KV cache).

    python benchmarks/sampling.py [--variant L] [--out benchmarks/results/sampling_h100.json]
        [--attentions lasad,softmax] [--top-k 2000] [--grids 16,32,64] [--unfused]
        [--decode-impl auto|xla|pallas] [--top-k-impl auto|sort|select]

(a) ``--variant`` with CFG (scale 4, top-k 2000), 8 images at 16x16 tokens, random weights,
    bf16: first call (compile + run) and the median of later calls, images/s.
(b) Per-token decode time and the compiled sampler's scratch memory (XLA memory analysis) for grids
    16x16, 32x32, 64x64, LASAD vs softmax.
(c) The compiled token loop: kernels (fusions, library calls, copies) per generated token, from
    the optimised HLO of the 16x16 sampler's while-loop body.
``--unfused`` keeps each layer's q/f/v and w1/w3 projections as separate matmuls (the sampler
before session 5) for an A/B run. Random weights: speed does not depend on them. Prints a table; writes JSON (with the XLA_FLAGS the
run had, since XLA's command-buffer flags change the decode loop's launch overhead).
"""

import argparse
import datetime
import json
import os
import statistics
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from configs.lasad import get_config  # noqa: E402
from lasad_jax import model as M  # noqa: E402
from lasad_jax import sampling as S  # noqa: E402
from benchmarks_common import add_decode_args, apply_decode_args, decode_args  # noqa: E402


def compiled_temp_bytes(model, n_images, grid, cfg_scale, top_k, top_k_impl="auto"):
  """XLA's memory analysis of the compiled sampler: scratch bytes beyond parameters/outputs.

  Per grid, independent of what ran before (a process-wide peak only ever grows)."""
  labels = jnp.arange(n_images, dtype=jnp.int32) % model.config.num_classes
  lowered = S._sample.lower(model.config, model.params(), labels, jax.random.key(0), grid * grid,
                            grid, cfg_scale, 1.0, top_k, 1.0, top_k_impl)
  mem = lowered.compile().memory_analysis()
  return getattr(mem, "temp_size_in_bytes", None) if mem is not None else None


# Optimised-HLO opcodes that are not kernel launches of their own.
_FREE = {"parameter", "get-tuple-element", "tuple", "constant", "bitcast", "after-all",
         "partition-id", "replica-id", "opt-barrier"}


def loop_kernels(model, n_images, grid, cfg_scale, top_k, top_k_impl="auto"):
  """Per computation of the compiled sampler that is not itself fused: its operations that launch
  work (fusion, custom-call (GEMMs), copy, ...) by opcode. Returns the largest such computation's
  counts: the token loop's body, run once per generated token."""
  import collections
  import re
  labels = jnp.arange(n_images, dtype=jnp.int32) % model.config.num_classes
  text = S._sample.lower(model.config, model.params(), labels, jax.random.key(0), grid * grid,
                         grid, cfg_scale, 1.0, top_k, 1.0, top_k_impl).compile().as_text()
  best, counts, fused = collections.Counter(), None, False
  for line in text.splitlines():
    if line and not line.startswith(" "):         # a computation header (or the module line)
      if counts is not None and not fused and sum(counts.values()) > sum(best.values()):
        best = counts
      fused = "fused" in line.split("(")[0] or "wrapped" in line.split("(")[0]
      counts = collections.Counter()
      continue
    m = re.match(r"\s+(?:ROOT )?%?[\w.\-]+ = [^=]*? ([a-z][\w\-]*)\(", line)
    if m and counts is not None and m.group(1) not in _FREE:
      counts[m.group(1)] += 1
  if counts is not None and not fused and sum(counts.values()) > sum(best.values()):
    best = counts
  return dict(best)


def run(model, n_images, grid, cfg_scale, top_k, repeats, top_k_impl="auto", autotune_dir=None):
  labels = jnp.arange(n_images, dtype=jnp.int32) % model.config.num_classes
  kw = dict(height=grid, width=grid, cfg_scale=cfg_scale, top_k=top_k, top_k_impl=top_k_impl,
            autotune_dir=autotune_dir)
  t0 = time.perf_counter()
  jax.block_until_ready(S.sample(model, labels, rng=jax.random.key(0), **kw))
  first = time.perf_counter() - t0
  times = []
  for i in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(S.sample(model, labels, rng=jax.random.key(i + 1), **kw))
    times.append(time.perf_counter() - t0)
  return first, statistics.median(times)


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--variant", default="L")
  ap.add_argument("--grids", default="16,32,64")
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--out", default="benchmarks/results/sampling_h100.json")
  ap.add_argument("--attentions", default="lasad,softmax")
  ap.add_argument("--top-k", type=int, default=None, help="default 2000 (5 for tiny); 0 = off")
  add_decode_args(ap)
  ap.add_argument("--top-k-impl", default="auto", choices=S.TOP_K_IMPLS,
                  help="auto (select on GPU) | sort (lax.top_k) | select (Pallas)")
  ap.add_argument("--autotune-dir", default=None,
                  help="time (a) and (b) with XLA autotuning results from "
                  "scripts/autotune_sampler.py (sampling.sample's autotune_dir; the launch "
                  "count and scratch memory compile without)")
  ap.add_argument("--unfused", action="store_true",
                  help="separate q/f/v and w1/w3 matmuls per layer (A/B against the default)")
  args = ap.parse_args()
  if args.unfused:
    import functools
    M.unstack_for_decode = functools.partial(M.unstack_for_decode, fuse=False)
  dev = jax.devices()[0]
  records = []
  print(f"device {dev.device_kind}, jax {jax.__version__}, LASADGen-{args.variant}, random weights")
  top_k = (2000 if args.variant != "tiny" else 5) if args.top_k is None else args.top_k
  meta = dict(date=datetime.date.today().isoformat(), device=dev.device_kind,
              jax=jax.__version__, command="python benchmarks/sampling.py " + " ".join(sys.argv[1:]),
              xla_flags=os.environ.get("XLA_FLAGS", ""), fused_projections=not args.unfused,
              **decode_args(args),
              autotune_dir=args.autotune_dir,
              top_k_impl=args.top_k_impl)
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)

  def save():   # after every record: a run cut off by a time limit keeps what it measured
    with open(args.out, "w") as f:
      json.dump(dict(meta=meta, records=records), f, indent=1)
  for attention in args.attentions.split(","):
    cfg = get_config(args.variant)
    cfg.attention = attention
    apply_decode_args(cfg, args)
    model = M.LASADGen(cfg, rngs=nnx.Rngs(0))
    first, med = run(model, 8, cfg.grid[0], 4.0, top_k, args.repeats, args.top_k_impl,
                     args.autotune_dir)
    rec = dict(kind="batch", attention=attention, images=8, grid=cfg.grid[0], cfg_scale=4.0,
               top_k=top_k, first_call_s=first, s_per_batch=med, images_per_s=8 / med)
    records.append(rec)
    save()
    print(f"(a) {attention:<8} 8 images {cfg.grid[0]}x{cfg.grid[0]} CFG 4 top-k {top_k}: first call "
          f"{first:.2f} s, then {med:.3f} s/batch ({8 / med:.1f} images/s)", flush=True)
    ops = loop_kernels(model, 8, cfg.grid[0], 4.0, top_k, args.top_k_impl)
    records.append(dict(kind="loop_body", attention=attention, grid=cfg.grid[0], ops=ops))
    save()
    print(f"(c) {attention:<8} token loop body ({S.SCAN_UNROLL} token(s)): "
          f"{sum(ops.values()) / S.SCAN_UNROLL:g} launches per token "
          f"({', '.join(f'{k} {v}' for k, v in sorted(ops.items(), key=lambda kv: -kv[1]))})",
          flush=True)
    for g in (int(x) for x in args.grids.split(",")):
      try:
        first, med = run(model, 8, g, 4.0, top_k, max(1, args.repeats - 1), args.top_k_impl,
                         args.autotune_dir)
      except Exception as e:  # noqa: BLE001 -- e.g. the KV cache running out of memory
        print(f"(b) {attention:<8} {g}x{g}: failed: {type(e).__name__}: {str(e)[:150]}")
        continue
      n = g * g
      temp = compiled_temp_bytes(model, 8, g, 4.0, top_k, args.top_k_impl)
      rec = dict(kind="per_token", attention=attention, grid=g, tokens=n, s_per_batch=med,
                 ms_per_token=med / n * 1e3, compiled_temp_bytes=temp, first_call_s=first)
      records.append(rec)
      save()
      print(f"(b) {attention:<8} {g}x{g}: {med / n * 1e3:.3f} ms/token, compiled scratch "
            f"{(temp or 0) / 2**20:.1f} MiB", flush=True)
  save()
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
