"""Timing helpers shared by the benchmark scripts (median ms after warm-up)."""

import collections
import datetime
import glob
import json
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
from jax.profiler import ProfileData


def time_jax(fn, *args, iters=20, warmup=3):
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  ts = []
  for _ in range(iters):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    ts.append((time.perf_counter() - t0) * 1e3)
  return statistics.median(ts)


def time_jax_stream(fn, *args, calls=10, iters=10, warmup=3):
  """Median ms per call when ``calls`` calls are issued back to back and waited for once: the
  device's throughput, with the host's dispatch of each call overlapping the kernels of the one
  before (what CUDA events around a stream of launches see). ``time_jax`` waits after every call,
  so each of its times also holds one host round trip (dispatch, wait, wake-up)."""
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  ts = []
  for _ in range(iters):
    t0 = time.perf_counter()
    outs = [fn(*args) for _ in range(calls)]
    jax.block_until_ready(outs)
    ts.append((time.perf_counter() - t0) * 1e3 / calls)
  return statistics.median(ts)


def fwd_bwd(f, xs, do):
  """(o, gradients of xs) of o = f(*xs) for the output gradient do, as fla's timing does
  (o, then torch.autograd.grad(o, xs, do)). o is returned so that the forward runs: with
  ``jax.grad`` of a loss alone XLA drops the forward kernels whose output only the discarded
  loss value reads (LASAD's backward recomputes what it needs), and times the backward alone, as
  benchmarks/ops.py and ops_parts.py did until session 29."""
  o, pull = jax.vjp(f, *xs)
  return o, pull(do)


def rel_rms(a, b):
  """Relative RMS difference of a from b, in float32."""
  a, b = (jnp.asarray(x, jnp.float32) for x in (a, b))
  return float(jnp.sqrt(jnp.mean((a - b) ** 2) / jnp.mean(b ** 2)))


def inputs(shape, seed=0):
  b, t, h, d = shape
  ks = jax.random.split(jax.random.key(seed), 5)
  q, k, v = (jax.random.normal(kk, shape, jnp.bfloat16) for kk in ks[:3])
  g = jax.nn.log_sigmoid(jax.random.normal(ks[3], shape, jnp.float32)).astype(jnp.bfloat16)
  do = jax.random.normal(ks[4], shape, jnp.bfloat16)
  return q, k, v, g, do


def masked_case(shape, width=16):
  """Inputs of the kernel-level benchmarks at ``shape`` = (B, T, H, D), bf16, row mask on:
  (q, k, v, g, do, width [B], prefix [B] (1), boundary [H] (-inf, resets), a zero state
  [B, H, D, D] float32)."""
  b, _, h, d = shape
  return (*inputs(shape), jnp.full((b,), width, jnp.int32), jnp.ones((b,), jnp.int32),
          jnp.full((h,), -jnp.inf, jnp.float32), jnp.zeros((b, h, d, d), jnp.float32))


def device_kernels(xplane_path):
  """{kernel name: [calls, total ns]} and (first start, last end, busy ns) over GPU planes."""
  stats = collections.defaultdict(lambda: [0, 0.0])
  spans = []
  for plane in ProfileData.from_file(xplane_path).planes:
    if not plane.name.startswith("/device:GPU"):
      continue
    for line in plane.lines:
      if "stream" not in line.name.lower():   # kernels live on the stream lines
        continue
      for ev in line.events:
        stats[ev.name][0] += 1
        stats[ev.name][1] += ev.duration_ns
        spans.append((ev.start_ns, ev.end_ns))
  if not spans:
    return {}, None
  spans.sort()
  busy, cur_s, cur_e = 0.0, *spans[0]
  for s, e in spans[1:]:
    if s > cur_e:
      busy += cur_e - cur_s
      cur_s, cur_e = s, e
    else:
      cur_e = max(cur_e, e)
  busy += cur_e - cur_s
  return dict(stats), (spans[0][0], max(e for _, e in spans), busy)


def _traced(fn, args, iters):
  """``iters`` calls of ``fn(*args)`` under ``jax.profiler.trace``: :func:`device_kernels`."""
  with tempfile.TemporaryDirectory() as d:
    with jax.profiler.trace(d):
      for _ in range(iters):
        jax.block_until_ready(fn(*args))
    return device_kernels(glob.glob(f"{d}/**/*.xplane.pb", recursive=True)[-1])


def profile_call(fn):
  """Runs ``fn()`` (already compiled) once under ``jax.profiler.trace``: (kernel stats, span) as
  :func:`device_kernels` gives them; ({}, None) without a GPU plane."""
  return _traced(fn, (), 1)


def trace_kernels(fn, *args, iters=10):
  """{kernel name: [launches, total ns]} over ``iters`` calls of ``fn(*args)`` (run once first, to
  compile), from a profiler trace; {} without a GPU plane."""
  jax.block_until_ready(fn(*args))
  return _traced(fn, args, iters)[0]


def device_us_per_call(fn, *args, iters=10):
  """Device microseconds per ``fn(*args)`` call: the kernels' summed durations in a profiler
  trace of ``iters`` calls, and {kernel name: launches per call}."""
  stats = trace_kernels(fn, *args, iters=iters)
  return (sum(t for _, t in stats.values()) / 1e3 / iters,
          {k: c / iters for k, (c, _) in stats.items()})


def write_results(path, script, records, **meta):
  """The JSON every benchmark writes: date, device, jax version and the command, then records."""
  meta = dict(date=datetime.date.today().isoformat(), device=jax.devices()[0].device_kind,
              jax=jax.__version__, command=f"python {script} " + " ".join(sys.argv[1:]), **meta)
  with open(path, "w") as fh:
    json.dump(dict(meta=meta, records=records), fh, indent=1)


DECODE_OPTIONS = ("decode_impl", "decode_norm", "decode_in_splits", "decode_mlp_splits")


def add_decode_args(ap):
  """The sampler's decode-step options (config keys of the same names), shared by
  benchmarks/sampling.py and benchmarks/profile_sampler.py."""
  from lasad_jax import model as M
  ap.add_argument("--decode-impl", default="auto", choices=M.DECODE_IMPLS,
                  help="config.decode_impl: auto (a Pallas attention kernel per layer on GPU) | "
                  "xla | pallas | persistent (every layer in one Triton kernel) | mosaic (every "
                  "layer in one Mosaic GPU kernel)")
  ap.add_argument("--decode-norm", default="auto", choices=M.DECODE_NORMS,
                  help="config.decode_norm: where the Pallas decode kernel path applies each "
                  "layer's attention RMSNorm scale (auto = kernel: in the decode kernel)")
  ap.add_argument("--decode-in-splits", type=int, default=None,
                  help="config.decode_in_splits: default auto (4), 0 (XLA's split of the q|f|v "
                  "projection) or S partial products added in the decode kernel")
  ap.add_argument("--decode-mlp-splits", type=int, default=None,
                  help="config.decode_mlp_splits: default auto (4), 0 (one [w1|w3] GEMM) or S "
                  "partial products added in silu(a) * b's kernel")
  ap.add_argument("--decode-warps", type=int, default=None,
                  help="warps per program of the Pallas decode kernel (kernels/lasad/decode.py "
                  "NUM_WARPS, default 4)")
  ap.add_argument("--scan-unroll", type=int, default=None,
                  help="tokens per iteration of the sampler's token loop (lasad_jax/sampling.py "
                  "SCAN_UNROLL, default 1)")


def decode_args(args):
  """add_decode_args' options as given, a dict (for a results file's metadata)."""
  return {k: getattr(args, k) for k in DECODE_OPTIONS + ("decode_warps", "scan_unroll")}


def apply_decode_args(cfg, args):
  """Copies add_decode_args' config keys into the config, --decode-warps into
  kernels/lasad/decode.py's NUM_WARPS and --scan-unroll into lasad_jax/sampling.py's SCAN_UNROLL."""
  for k in DECODE_OPTIONS:
    setattr(cfg, k, getattr(args, k))
  if args.decode_warps is not None:
    from kernels.lasad import decode
    decode.NUM_WARPS = args.decode_warps
  if args.scan_unroll is not None:
    if args.scan_unroll < 1:
      raise SystemExit(f"--scan-unroll must be >= 1, got {args.scan_unroll}")
    from lasad_jax import sampling
    sampling.SCAN_UNROLL = args.scan_unroll
