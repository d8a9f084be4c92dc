"""Device time of the Mosaic GPU persistent decode kernel (kernels/lasad/decode_mgpu.py) alone.

    PYTHONPATH=.:benchmarks python benchmarks/decode_mgpu.py [--variants ,attn,own,wait]

Every layer of one LASADGen-L token (24 layers, 16 rows = 8 images with CFG, bf16 weights,
random values) on one GPU, one warpgroup per SM. Variants are Plan.skip sets (timing experiments:
the results are then wrong): "attn" / "own" skip the attention / owner units' math, "build" the
B operand tiles (and C's and E's waits, inside their builds), "wait" every semaphore wait; and
Plan fields as "name=N" (e.g. "state_bufs=2+stages=10", "att_split=1", "b_13=8",
"b_o=4"). Prints device us per token.

``--profile DIR`` also runs the first variants (``--profile-variants``) under Mosaic GPU's
on-device profiler (its trace writer replaced by ``_raw_dump``: raw per-SM cycle stamps, converted
at ``--clock-ghz``, without the writer's cumulative per-event overhead correction) and prints,
for the layers past the first two, per program: the time in each phase, in its semaphore waits
and in the steps inside its units (build, mma, store, signal; gates, rows, out), means over
programs. These per-program times are what to read. Across programs the stamps do not line up
(session 19, H100: the first A and D units to pass their waits did so 15-28 us before the last
owner they wait for had signalled, which cannot happen; and program 0, which waits for every
program's last signal, ended 53 us before the latest program: the SMs' cycle counters do not
all run at one rate), so the phase spans across programs ("first start", "last end") and that
check are printed only as such.
"""

import argparse
import collections
import dataclasses
import glob
import json
import os
import statistics

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental.mosaic.gpu import profiler as mgpu_profiler  # noqa: E402

from benchmarks_common import device_us_per_call, rel_rms, write_results  # noqa: E402
from kernels.lasad import decode_mgpu as DM  # noqa: E402


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--variants", default=",attn,own,build,wait,attn+own+build+wait",
                  help="comma-separated; each +-joined Plan.skip entries and Plan sizes ('' = as is)")
  ap.add_argument("--layers", type=int, default=24)
  ap.add_argument("--out", default="benchmarks/results/decode_mgpu_h100.json")
  ap.add_argument("--profile", default="", help="directory for the profiled variants' traces")
  ap.add_argument("--profile-variants", type=int, default=1, help="how many variants to profile")
  ap.add_argument("--clock-ghz", type=float, default=1.98, help="SM clock for the trace's cycles")
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
  plans, ref = [], None
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
    plans.append(plan)
    # the layers' output against the first variant's (size variants change only the order of
    # float32 sums; the skip entries' outputs are wrong by design)
    x_out = f(*args_)[0]
    if ref is None:
      ref = x_out
    diff = rel_rms(x_out, ref)
    records.append(dict(variant=v or "as is", us_per_token=us, us_per_layer=us / L,
                        rel_rms_vs_first=diff))
    print(f"{v or 'as is':<24} {us:8.1f} us per token, {us / L:6.1f} per layer; output "
          f"{diff:.2e} rel RMS from the first variant's", flush=True)
  meta = {"profiles": []}
  if args.profile and plans:
    os.makedirs(args.profile, exist_ok=True)
    mgpu_profiler.ProfilerSpec.dump = _raw_dump
    for plan, rec in list(zip(plans, records))[:args.profile_variants]:
      f = jax.jit(lambda *a, plan=plan: DM.decode_layers(*a, plan=plan, profile_dir=args.profile))
      for _ in range(2):   # the second call's trace (the first includes compilation effects)
        jax.block_until_ready(f(*args_))
      jax.effects_barrier()
      trace = max(glob.glob(os.path.join(args.profile, "*-trace.json")), key=os.path.getmtime)
      print(f"-- profile of {rec['variant']}")
      summary = summarize(trace, plan, args.clock_ghz)
      meta["profiles"].append(dict(variant=rec["variant"], **summary))
  write_results(args.out, "benchmarks/decode_mgpu.py", records, **meta)
  print(f"wrote {args.out}")


def _raw_dump(self, buffer, f, grid, block):
  """Replaces ProfilerSpec.dump: every trace's start (globaltimer ns), SM and raw events
  [name, begin, cycles since the trace's first event], with no overhead correction."""
  buffer = np.asarray(buffer).astype(np.int64)
  entries = buffer.reshape(int(np.prod(grid)), self._num_traces((), block),
                           self.entries_per_warpgroup)
  names = {v: k for k, v in self.interned_names.items()}
  traces = []
  for b, t in np.ndindex(entries.shape[:2]):
    used = int(entries[b, t, 2])
    ev = entries[b, t, 3:3 + used].reshape(-1, 2)
    if not len(ev):
      continue
    cyc = (ev[:, 1] - ev[0, 1]) % 2 ** 32
    traces.append(dict(tid=int(b * entries.shape[1] + t), sm=int(entries[b, t, 1]),
                       start_ns=int(entries[b, t, 0]),
                       events=[[names[int(tag) & ~self.EXIT], not int(tag) & self.EXIT, int(c)]
                               for tag, c in zip(ev[:, 0], cyc)]))
  json.dump({"raw": True, "traces": traces}, f)


def summarize(path, plan, ghz):
  """Per-phase spans and per-group waits of one profiled call (see the module docstring)."""
  with open(path) as fh:
    traces = json.load(fh)["traces"]
  t0 = min(t["start_ns"] for t in traces)
  spans = collections.defaultdict(list)   # per program (tid): [(name, start, end, depth)], us
  for tr in traces:
    stack = []
    for name, begin, cyc in tr["events"]:
      ts = (tr["start_ns"] - t0) / 1e3 + cyc / (ghz * 1e3)
      if begin:
        stack.append((name, ts))
      else:
        name, t_begin = stack.pop()
        spans[tr["tid"]].append((name, t_begin, ts, len(stack)))
  layers, phases = plan.layers, list(plan.units())
  # per layer: every program's span of each phase, and wait time per group
  first = collections.defaultdict(lambda: float("inf"))
  rng = collections.defaultdict(lambda: [float("inf"), float("-inf")])
  waits = collections.defaultdict(float)
  wait_end = {}   # (layer, phase, program): when its last wait ended
  phase_end = {}  # (layer, phase, program): when it left the phase
  busy = collections.defaultdict(float)   # summed span of each phase over programs
  steps = collections.defaultdict(float)
  for tid, sp in spans.items():
    seen = collections.Counter()
    cur = None
    for name, a, b, depth in sorted(sp, key=lambda x: (x[1], x[3])):
      if name in phases:
        layer = seen[name]
        seen[name] += 1
        cur = (layer, name)
        r = rng[layer, name]
        r[0], r[1] = min(r[0], a), max(r[1], b)
        busy[layer, name] += b - a
        phase_end[layer, name, tid] = b
        if name == "A":
          first[layer] = min(first[layer], a)
      elif name.startswith("wait_") and cur is not None:
        waits[cur[0], cur[1], name[5:]] += b - a
        wait_end[cur + (tid,)] = b
      elif cur is not None and name != "Init":   # a step inside a unit (build, mma, ...)
        steps[cur[0], cur[1], name] += b - a
  nprog = len(spans)
  keep = range(2, layers - 1)
  out = {"trace": os.path.basename(path), "programs": nprog, "layer_us": None, "phases": {},
         "waits_us_per_program": {}}
  starts = [first[layer] for layer in range(layers)]
  out["layer_us"] = statistics.median(b - a for a, b in zip(starts[2:-1], starts[3:]))
  print(f"profile {path}: {nprog} programs; median layer (A to next A) {out['layer_us']:.2f} us")
  print(f"{'phase':<6} {'first start':>11} {'last end':>9} {'mean span':>9} {'mean work':>9}   "
        "(us after the layer's first A; per program, work = span - waits; medians over layers)")
  for ph in phases:
    a = statistics.median(rng[layer, ph][0] - first[layer] for layer in keep)
    b = statistics.median(rng[layer, ph][1] - first[layer] for layer in keep)
    m = statistics.median(busy[layer, ph] / nprog for layer in keep)
    w = statistics.median(
        (busy[layer, ph] - sum(v for k, v in waits.items() if k[:2] == (layer, ph))) / nprog
        for layer in keep)
    out["phases"][ph] = dict(first_start=round(a, 3), last_end=round(b, 3), mean_span=round(m, 3),
                             mean_work=round(w, 3))
    print(f"{ph:<6} {a:>11.2f} {b:>9.2f} {m:>9.2f} {w:>9.2f}")
  # causality: the earliest A (D) wait to end against the last E' (C') owner's end, per layer
  # (owners: the programs that waited in that phase, i.e. had an owner unit)
  gaps = {}
  for ph, prod, lag in (("A", "E'", 1), ("D", "C'", 0)):
    vals = []
    for layer in keep:
      ends = [t for (lay, p, _), t in wait_end.items() if lay == layer and p == ph]
      owners = [phase_end[k[0], k[1], k[2]] for k in wait_end if k[:2] == (layer - lag, prod)]
      if ends and owners:
        vals.append(min(ends) - max(owners))
    if vals:
      gaps[ph] = round(statistics.median(vals), 3)
  out["first_wait_end_after_producer_us"] = gaps
  print("earliest A / D wait end after the last E' / C' owner's end, us (median over layers; "
        f">= 0 if the clock rate is right): {gaps}")
  groups = sorted({k[2] for k in waits})
  print("waits, us per program per layer (mean over programs, median over layers), by phase:")
  for ph in phases:
    row = {}
    for g in groups:
      vals = [waits.get((layer, ph, g), 0.0) / nprog for layer in keep]
      if any(vals):
        row[g] = round(statistics.median(vals), 3)
    if row:
      out["waits_us_per_program"][ph] = row
      print(f"  {ph:<4} " + "  ".join(f"{g}: {v:.2f}" for g, v in row.items()))
  print("steps inside units, us per program per layer (mean over programs, median over layers):")
  out["steps_us_per_program"] = {}
  for ph in phases:
    names = sorted({k[2] for k in steps if k[1] == ph})
    row = {n: round(statistics.median(steps.get((layer, ph, n), 0.0) / nprog for layer in keep), 3)
           for n in names}
    if row:
      out["steps_us_per_program"][ph] = row
      print(f"  {ph:<4} " + "  ".join(f"{n}: {v:.2f}" for n, v in row.items()))
  return out


if __name__ == "__main__":
  main()
