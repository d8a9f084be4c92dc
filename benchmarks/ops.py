"""Time the LASAD operator against fla's chunk_gla and cuDNN causal softmax attention.

    python benchmarks/ops.py [--out benchmarks/results/ops_h100.json] [--shapes 32,1024,16,64 ...]

bf16 inputs, shapes (B, T, H, D) with K = V = D. For each shape: the Pallas kernel with the row mask
on (width 16/32/64/128, prefix 1, boundary -inf) and off, and once more as calls ran before
session 30 ("pallas state arrays": a zero initial state in, the final state out, width / prefix /
boundary broadcast first; ``--skip state`` leaves it out), the XLA chunk implementation, fla
``chunk_gla`` (no mask; skipped if torch/fla are missing), and
``jax.nn.dot_product_attention(..., implementation="cudnn", is_causal=True)``; forward and
forward+backward. Median ms after warm-up, two ways (``--stream 0``: the first only):

- ``ms``: one call at a time (JAX: ``block_until_ready`` after each; torch: CUDA events around
  each), so a JAX time also holds one host round trip per call (tens of microseconds);
- ``stream_ms``: 10 calls issued back to back, waited for once, per call (JAX:
  ``benchmarks_common.time_jax_stream``; torch: CUDA events around the 10): the device's
  throughput, the measure the HBM floor compares with.

Also measures device copy bandwidth and prints each shape's HBM floor (the bytes that must move
once / that bandwidth) and each time's ratio to it. Prints a table; writes one JSON record per
impl x shape x pass.
"""

import argparse
import datetime
import json
import os
import statistics
import sys

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # leave room for torch

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks_common import (device_us_per_call, fwd_bwd, inputs, time_jax,  # noqa: E402
                               time_jax_stream)
from lasad_jax.ops import lasad_attention  # noqa: E402

SHAPES = [(32, 256, 16, 64), (32, 1024, 16, 64), (8, 4096, 16, 64), (2, 16384, 16, 64)]


def time_torch(fn, iters=20, warmup=3, calls=1):
  """Median ms per call between CUDA events around ``calls`` calls issued back to back."""
  import torch
  for _ in range(warmup):
    fn()
  torch.cuda.synchronize()
  ts = []
  for _ in range(iters):
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(calls):
      fn()
    b.record()
    torch.cuda.synchronize()
    ts.append(a.elapsed_time(b) / calls)
  return statistics.median(ts)


def copy_bandwidth():
  """Bytes read + written per second of a large device-to-device copy: (one call at a time, as
  ``ms`` is timed; 10 calls back to back, as ``stream_ms`` is)."""
  x = jnp.ones((256 * 1024 * 1024,), jnp.float32)  # 1 GiB
  f = jax.jit(lambda x: x * 1.0 + 0.0)
  return (2 * x.nbytes / (time_jax(f, x, iters=10) / 1e3),
          2 * x.nbytes / (time_jax_stream(f, x) / 1e3))


def jax_fns(impl, masked, block_sizes=None, state_arrays=False):
  """Jitted forward and forward+backward; ``width`` is a runtime argument (one compile).
  ``state_arrays``: as every call before session 30 ran: width, prefix and boundary broadcast to
  [B] / [H] arrays, a zero initial state array in and the final state out (unused), i.e. three
  broadcast kernels and a memset before the kernel, and a state read and written by it."""
  kw = dict(impl=impl, scale=1.0)
  if block_sizes is not None:
    kw["block_sizes"] = block_sizes

  def att(q, k, v, g, w):
    if state_arrays:
      b, _, h, d = q.shape
      o, _ = lasad_attention(q, k, v, g, width=jnp.broadcast_to(w, (b,)),
                             prefix=jnp.broadcast_to(jnp.int32(1), (b,)),
                             boundary=jnp.broadcast_to(-jnp.inf, (h,)),
                             initial_state=jnp.zeros((b, h, d, v.shape[-1]), jnp.float32),
                             return_final_state=True, **kw)
      return o
    if masked:
      return lasad_attention(q, k, v, g, width=w, prefix=1, boundary=-jnp.inf, **kw)
    return lasad_attention(q, k, v, g, **kw)
  fwd = jax.jit(att)
  return fwd, jax.jit(
      lambda q, k, v, g, w, do: fwd_bwd(lambda *x: att(*x, w), (q, k, v, g), do))


def cudnn_fns():
  att = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                                      implementation="cudnn")
  fwd = jax.jit(att)
  return fwd, jax.jit(lambda q, k, v, do: fwd_bwd(att, (q, k, v), do))


def fla_times(shape):
  try:
    import torch
    from fla.ops.gla import chunk_gla
  except Exception as e:  # noqa: BLE001 -- report and go on without fla
    print(f"fla unavailable ({type(e).__name__}: {e}); skipping chunk_gla")
    return None
  b, t, h, d = shape
  q, k, v = (torch.randn(b, t, h, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
             for _ in range(3))
  g = torch.nn.functional.logsigmoid(torch.randn(b, t, h, d, device="cuda")).bfloat16()
  g.requires_grad_()
  do = torch.randn(b, t, h, d, device="cuda", dtype=torch.bfloat16)

  def fwd():
    with torch.no_grad():
      chunk_gla(q, k, v, g, scale=1.0)

  def fb():
    o, _ = chunk_gla(q, k, v, g, scale=1.0)
    torch.autograd.grad(o, (q, k, v, g), do)

  return ((time_torch(fwd), time_torch(fb)),
          (time_torch(fwd, iters=10, calls=10), time_torch(fb, iters=10, calls=10)))


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--out", default="benchmarks/results/ops_h100.json")
  ap.add_argument("--shapes", nargs="*", default=None, help="B,T,H,D entries")
  ap.add_argument("--widths", default="16,32,64,128")
  ap.add_argument("--stream", type=int, default=1, choices=(0, 1),
                  help="also time 10 calls back to back (stream_ms); 0: one at a time only")
  ap.add_argument("--device-time", type=int, default=1, choices=(0, 1),
                  help="JAX impls: also the kernels' summed device time per call from a profiler "
                  "trace (device_ms, kernels per call); 0: not")
  ap.add_argument("--skip", default="", help="comma list of impls to skip: "
                  "chunk,fla,cudnn,loop,tuning,fused,cumsum,state")
  args = ap.parse_args()
  shapes = [tuple(int(x) for x in s.split(",")) for s in args.shapes] if args.shapes else SHAPES
  widths = [int(w) for w in args.widths.split(",") if w]
  skip = set(args.skip.split(","))
  dev = jax.devices()[0]
  bw, bw_stream = copy_bandwidth()
  print(f"device {dev.device_kind}, jax {jax.__version__}, copy bandwidth {bw / 1e12:.2f} TB/s "
        f"(back to back: {bw_stream / 1e12:.2f} TB/s)")
  records = []

  def add(impl, shape, pas, floor_ms, ms, stream_ms=None, dev_extra=None, **extra):
    """``floor_ms`` at the one-call copy bandwidth; ``stream_ms`` and ``device_ms`` are compared
    with the floor at the back-to-back copy bandwidth (stream_hbm_floor_ms)."""
    extra.update(dev_extra or {})
    sfloor = floor_ms * bw / bw_stream
    if stream_ms is not None:
      extra.update(stream_ms=stream_ms, stream_hbm_floor_ms=sfloor,
                   stream_ratio_to_floor=stream_ms / sfloor)
    records.append(dict(impl=impl, shape=list(shape), dtype="bfloat16", **{"pass": pas}, ms=ms,
                        hbm_floor_ms=floor_ms, ratio_to_floor=ms / floor_ms, **extra))
    streamed = ("" if stream_ms is None else
                f"   stream {stream_ms:8.3f} ms {stream_ms / sfloor:5.2f}x floor")
    if "device_ms" in extra:
      streamed += (f"   device {extra['device_ms']:8.3f} ms {extra['device_ms'] / sfloor:5.2f}x "
                   f"({sum(extra['kernels'].values()):g} kernels)")
    print(f"  {impl:<22} {pas:<4} {ms:8.3f} ms   {ms / floor_ms:6.1f}x floor{streamed}",
          flush=True)

  def jax_time(fn, *xs):   # (ms, stream_ms or None, **device time)
    extra = {}
    if args.device_time and dev.platform == "gpu":
      us, kernels = device_us_per_call(fn, *xs)
      extra = dict(device_ms=us / 1e3, kernels={k: round(c, 2) for k, c in kernels.items()})
    return time_jax(fn, *xs), (time_jax_stream(fn, *xs) if args.stream else None), extra

  for shape in shapes:
    b, t, h, d = shape
    n = b * t * h * d * 2  # bytes of one bf16 [B, T, H, D] tensor
    floor_f = 5 * n / bw * 1e3      # read q, k, v, g; write o
    floor_fb = 14 * n / bw * 1e3    # + read q, k, v, g, do; write dq, dk, dv, dg (no recompute)
    print(f"shape B={b} T={t} H={h} D={d}: HBM floor fwd {floor_f:.3f} ms, fwd+bwd "
          f"{floor_fb:.3f} ms (back to back: {floor_f * bw / bw_stream:.3f} / "
          f"{floor_fb * bw / bw_stream:.3f})")
    q, k, v, g, do = inputs(shape)
    from kernels.lasad.pallas import BlockSizes
    variants = [("pallas", "pallas", widths, None), ("pallas nomask", "pallas", [0], None),
                ("pallas diag=loop", "pallas", widths[:1], BlockSizes(diag="loop")),
                ("pallas split_dots=False", "pallas", widths[:1], BlockSizes(split_dots=False)),
                # the backward as one kernel or three (the default picks by B*H)
                ("pallas fused bwd", "pallas", widths[:1], BlockSizes(fused_backward=True)),
                ("pallas unfused bwd", "pallas", widths[:1], BlockSizes(fused_backward=False))]
    if "loop" in skip:
      variants = variants[:2]
    if "state" not in skip:   # the calls' form before session 30 (jax_fns' state_arrays)
      variants.insert(1, ("pallas state arrays", "pallas", widths[:1], "state"))
    if "cumsum" not in skip:   # Triton scans in every kernel (the default before session 10)
      variants += [("pallas cumsum=scan", "pallas", widths[:1], BlockSizes(cumsum="scan"))]
    if "tuning" not in skip:   # other block sizes, at the first width
      variants += [("pallas sub=16", "pallas", widths[:1], BlockSizes(sub=16))]
      if b * h < 132:   # the default splits the sequence here (seq_split=None: _segments); without:
        variants += [("pallas seq_split=1", "pallas", widths[:1], BlockSizes(seq_split=1))]
        from kernels.lasad.pallas import _bwd_blocks, _segments     # the backward's split
        auto_b = _segments(_bwd_blocks(BlockSizes()), t, t, b * h)
        variants += [(f"pallas bwd seq_split={s}", "pallas", widths[:1],
                      BlockSizes(bwd_seq_split=s)) for s in (1, 4, 8, 16, 32) if s != auto_b]
    if "fused" not in skip:   # the default is the one-pass forward; the two-pass one, no
      from kernels.lasad.pallas import _fused_segments    # prefetch, other sequence splits
      auto = _fused_segments(BlockSizes(), t, t, b * h)
      variants += [("pallas two-pass", "pallas", widths[:1], BlockSizes(fused_forward=False)),
                   ("pallas no prefetch", "pallas", widths[:1], BlockSizes(fused_prefetch=False)),
                   # the one-pass kernel at <= 168 registers: 3 programs per SM (opt-in, session 28)
                   ("pallas maxnreg=168", "pallas", widths[:1], BlockSizes(fused_maxnreg=168))]
      for s in sorted({max(1, auto // 2), auto * 2} - {auto}):
        variants += [(f"pallas fused seq_split={s}", "pallas", widths[:1],
                      BlockSizes(seq_split=s))]
    if "chunk" not in skip:
      variants.append(("chunk (XLA)", "chunk", widths[:1], None))
    for label, impl, ws, bsz in variants:
      try:
        fwd, fb = (jax_fns(impl, True, state_arrays=True) if bsz == "state" else
                   jax_fns(impl, ws != [0], bsz))
        for w in ws:
          name = label + (f" w={w}" if w else "")
          wa = jnp.int32(w)
          add(name, shape, "fwd", floor_f, *jax_time(fwd, q, k, v, g, wa), width=w or None)
          add(name, shape, "fb", floor_fb, *jax_time(fb, q, k, v, g, wa, do), width=w or None)
      except Exception as e:  # noqa: BLE001 -- e.g. out of memory for the XLA form
        print(f"  {label}: failed: {type(e).__name__}: {str(e)[:300]}")
    if "cudnn" not in skip:
      try:
        fwd, fb = cudnn_fns()
        add("cudnn softmax causal", shape, "fwd", floor_f, *jax_time(fwd, q, k, v))
        add("cudnn softmax causal", shape, "fb", floor_fb, *jax_time(fb, q, k, v, do))
      except Exception as e:  # noqa: BLE001
        print(f"  cudnn: failed: {type(e).__name__}: {str(e)[:200]}")
    if "fla" not in skip:
      res = fla_times(shape)
      if res:
        (f1, fb1), (fs, fbs) = res
        add("fla chunk_gla", shape, "fwd", floor_f, f1, fs if args.stream else None)
        add("fla chunk_gla", shape, "fb", floor_fb, fb1, fbs if args.stream else None)
    write(args, dev, (bw, bw_stream), records)  # after every shape: a timeout keeps what was measured

  print_table(records)
  print(f"wrote {args.out}")


def write(args, dev, bw, records):
  meta = dict(date=datetime.date.today().isoformat(), device=dev.device_kind,
              jax=jax.__version__, copy_bandwidth_tb_s=bw[0] / 1e12,
              copy_bandwidth_stream_tb_s=bw[1] / 1e12,
              command=" ".join(["python benchmarks/ops.py"] + sys.argv[1:]))
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(dict(meta=meta, records=records), f, indent=1)


def print_table(records):
  """Markdown tables, ms fwd / fwd+bwd: one call at a time, then back to back (if measured)."""
  shapes = sorted({tuple(r["shape"]) for r in records}, key=lambda s: s[1])
  impls = list(dict.fromkeys(r["impl"] for r in records))
  for key, what in (("ms", "one call at a time"), ("stream_ms", "10 calls back to back")):
    by = {(r["impl"], tuple(r["shape"]), r["pass"]): r[key] for r in records if key in r}
    if not by:
      continue
    print(f"\n{what}\n| impl | " + " | ".join(f"{s[0]},{s[1]},{s[2]},{s[3]} fwd / fwd+bwd"
                                                for s in shapes) + " |")
    print("|---|" + "---|" * len(shapes))
    for impl in impls:
      cells = []
      for s in shapes:
        f, fb = by.get((impl, s, "fwd")), by.get((impl, s, "fb"))
        cells.append(f"{f:.3f} / {fb:.3f}" if f is not None and fb is not None else "-")
      print(f"| {impl} | " + " | ".join(cells) + " |")
    fkey = "hbm_floor_ms" if key == "ms" else "stream_hbm_floor_ms"
    print("| HBM floor | " + " | ".join(
        "{:.3f} / {:.3f}".format(*[next(r[fkey] for r in records
                                        if tuple(r["shape"]) == s and r["pass"] == p)
                                   for p in ("fwd", "fb")]) for s in shapes) + " |")


if __name__ == "__main__":
  main()
