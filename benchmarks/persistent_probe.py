"""Feasibility probe for issue 5: one persistent Pallas (Triton) kernel per decode token.

    python benchmarks/persistent_probe.py [--programs 132] [--out benchmarks/results/persistent_probe_h100.json]

XLA runs a LASADGen-L decode token as ~254 kernels (~10 per layer); each costs ~2.5-3 us beyond
its bytes (BENCHMARKS.md, sessions 10-12). A persistent kernel keeps one program per SM alive for
all 24 layers and separates its phases by grid-wide barriers (an atomic counter in HBM), so what a
phase costs is its bytes plus one barrier. This probe times, for L's four matmul shapes per layer
(M = 16 rows: 8 images and their CFG twins), 24 distinct stacked weights:
  barrier:  the 96 barriers alone (4 per layer), no matmuls;
  stream:   the matmuls, no barriers (data races; timing only);
  chain:    matmuls and barriers, a residual chain x += ... (what a real step does), checked against
            the same chain in XLA.
Device microseconds per call from a profiler trace. Exploration: nothing in the library uses it.
The spin loop gives up after ``--max-spins`` polls and the kernel then reports it in its flag
output (no hang on a barrier that never completes).
"""

import argparse
import functools
import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax import lax  # noqa: E402
from jax.experimental import pallas as pl  # noqa: E402
from jax.experimental.pallas import triton as plgpu  # noqa: E402

from benchmarks_common import device_us_per_call, rel_rms, write_results  # noqa: E402
from kernels.lasad.decode_persistent import _spread, grid_barrier  # noqa: E402

M, D, F, LAYERS = 16, 1024, 2816, 24


def _gemv_phase(x_ref, w_ref, out_ref, layer, *, pid, k, n, bn, bk, nprog, accumulate, cast_x,
                volatile):
  """out[:, tile] (+)= x[:, :k] @ w[layer, :k, tile] for the tiles of program ``pid`` (column
  tiles only, no split-K)."""
  def xload(ks):
    xk = plgpu.load(x_ref.at[:, ks], volatile=volatile)
    return xk.astype(jnp.bfloat16) if cast_x else xk

  def tile(t):
    cols = pl.ds(t * bn, bn)

    def step(i, acc):
      ks = pl.ds(i * bk, bk)
      return acc + jnp.dot(xload(ks), w_ref[layer, ks, cols], preferred_element_type=jnp.float32)
    acc = lax.fori_loop(0, k // bk, step, jnp.zeros((M, bn), jnp.float32))
    if accumulate:
      acc = acc + plgpu.load(out_ref.at[:, cols], volatile=volatile)
    out_ref[:, cols] = acc.astype(out_ref.dtype)

  _spread(pid, nprog, n // bn, tile)


def _kernel(x0_ref, cnt0_ref, win_ref, wo_ref, w13_ref, w2_ref, x_ref, a_ref, b_ref, cnt_ref,
            flag_ref, *, nprog, gemv, barrier, max_spins, bn, bk, volatile, interpret):
  del x0_ref, cnt0_ref   # aliased to x_ref, cnt_ref
  pid = pl.program_id(0)   # read at the top level (the interpreter resolves it only there)
  phase = functools.partial(_gemv_phase, pid=pid, bn=bn, bk=bk, nprog=nprog, volatile=volatile)

  def layer(l, fails):
    def sync(fails, i):
      if not barrier:
        return fails
      return fails + grid_barrier(cnt_ref, nprog * (4 * l + i + 1), max_spins, interpret)
    if gemv:
      phase(x_ref, win_ref, a_ref, l, k=D, n=3 * D, accumulate=False, cast_x=True)
    fails = sync(fails, 0)
    if gemv:
      phase(a_ref, wo_ref, x_ref, l, k=D, n=D, accumulate=True, cast_x=False)
    fails = sync(fails, 1)
    if gemv:
      phase(x_ref, w13_ref, b_ref, l, k=D, n=2 * F, accumulate=False, cast_x=True)
    fails = sync(fails, 2)
    if gemv:
      phase(b_ref, w2_ref, x_ref, l, k=F, n=D, accumulate=True, cast_x=False)
    return sync(fails, 3)

  flag_ref[pid] = lax.fori_loop(0, LAYERS, layer, jnp.int32(0))


def persistent(x, win, wo, w13, w2, *, nprog, gemv=True, barrier=True, max_spins=1 << 16,
               bn=32, bk=128, num_warps=4, num_stages=3, volatile=False, interpret=False):
  if D % bk or F % bk or D % bn or (2 * F) % bn:
    raise ValueError(f"bk must divide {D} and {F}, bn {D} and {2 * F}: got bk={bk}, bn={bn}")
  cnt = jnp.zeros((1,), jnp.int32)   # the barrier's arrival count, zero at every call
  kern = functools.partial(_kernel, nprog=nprog, gemv=gemv, barrier=barrier,
                           max_spins=max_spins, bn=bn, bk=bk, volatile=volatile,
                           interpret=interpret)
  full = lambda a: pl.BlockSpec(a.shape, lambda i: (0,) * a.ndim)  # noqa: E731
  out_shape = [jax.ShapeDtypeStruct((M, D), jnp.float32),
               jax.ShapeDtypeStruct((M, 3 * D), jnp.bfloat16),
               jax.ShapeDtypeStruct((M, 2 * F), jnp.bfloat16),
               jax.ShapeDtypeStruct((1,), jnp.int32),
               jax.ShapeDtypeStruct((nprog,), jnp.int32)]
  outs = pl.pallas_call(
      kern, grid=(nprog,), in_specs=[full(a) for a in (x, cnt, win, wo, w13, w2)],
      out_specs=[pl.BlockSpec(s.shape, lambda i, n=len(s.shape): (0,) * n) for s in out_shape],
      out_shape=out_shape, input_output_aliases={0: 0, 1: 3}, interpret=interpret,
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      name="persistent_probe")(x, cnt, win, wo, w13, w2)
  return outs[0], outs[4]


def xla_chain(x, win, wo, w13, w2):
  def layer(x, ws):
    win, wo, w13, w2 = ws
    a = jnp.dot(x.astype(jnp.bfloat16), win, preferred_element_type=jnp.float32).astype(jnp.bfloat16)
    x = x + jnp.dot(a[:, :D], wo, preferred_element_type=jnp.float32)
    b = jnp.dot(x.astype(jnp.bfloat16), w13, preferred_element_type=jnp.float32).astype(jnp.bfloat16)
    x = x + jnp.dot(b[:, :F], w2, preferred_element_type=jnp.float32)
    return x, None
  return lax.scan(layer, x, (win, wo, w13, w2))[0]


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--programs", type=int, default=0, help="0: the GPU's SM count")
  ap.add_argument("--configs", default="32:128:4:3,16:256:4:3,32:256:4:4,64:128:4:3",
                  help="bn:bk:warps:stages,...")
  ap.add_argument("--max-spins", type=int, default=1 << 16)
  ap.add_argument("--volatile", default="0,1", help="volatile loads of what other programs wrote: "
                  "0, 1 or both (jax 0.11.2 refuses every cache_modifier: it checks '.cg' against "
                  "keys spelled 'cg')")
  ap.add_argument("--out", default="benchmarks/results/persistent_probe_h100.json")
  args = ap.parse_args()
  dev = jax.devices()[0]
  nprog = args.programs or getattr(dev, "core_count", 132)
  ks = jax.random.split(jax.random.key(0), 5)
  s = 0.02
  x = jax.random.normal(ks[0], (M, D), jnp.float32)
  win = (s * jax.random.normal(ks[1], (LAYERS, D, 3 * D))).astype(jnp.bfloat16)
  wo = (s * jax.random.normal(ks[2], (LAYERS, D, D))).astype(jnp.bfloat16)
  w13 = (s * jax.random.normal(ks[3], (LAYERS, D, 2 * F))).astype(jnp.bfloat16)
  w2 = (s * jax.random.normal(ks[4], (LAYERS, F, D))).astype(jnp.bfloat16)
  wbytes = sum(w.size * 2 for w in (win, wo, w13, w2))
  ref = jax.jit(xla_chain)
  us_xla, launches = device_us_per_call(ref, x, win, wo, w13, w2)
  want = ref(x, win, wo, w13, w2)
  print(f"{dev.device_kind}, {nprog} programs, weights {wbytes / 1e6:.0f} MB per token")
  print(f"XLA chain: {us_xla:.1f} us ({wbytes / us_xla / 1e6:.2f} TB/s), "
        f"{sum(launches.values()):.0f} launches")
  records = [dict(impl="xla", us=us_xla, launches=sum(launches.values()))]
  modes = [("barrier", False, True, 0)] + [
      (m, True, b, int(v)) for v in args.volatile.split(",")
      for m, b in (("stream", False), ("chain", True))]
  for cfg in args.configs.split(","):
    bn, bk, warps, stages = map(int, cfg.split(":"))
    for mode, gemv, barrier, vol in modes:
      if mode == "barrier" and cfg != args.configs.split(",")[0]:
        continue
      f = jax.jit(functools.partial(persistent, nprog=nprog, gemv=gemv, barrier=barrier,
                                    max_spins=args.max_spins, bn=bn, bk=bk, num_warps=warps,
                                    num_stages=stages, volatile=bool(vol)))
      try:
        got, flags = f(x, win, wo, w13, w2)
        us, _ = device_us_per_call(f, x, win, wo, w13, w2)
      except Exception as e:  # noqa: BLE001 - a config Triton refuses is reported, not fatal
        print(f"{cfg} {mode}: failed: {type(e).__name__}: {str(e)[:300]}")
        continue
      fails = int(flags.sum())
      rec = dict(impl="persistent", mode=mode, bn=bn, bk=bk, warps=warps, stages=stages, us=us,
                 volatile=vol, barrier_timeouts=fails)
      line = f"{cfg} {mode:8s} volatile={vol}: {us:8.1f} us"
      if mode != "barrier":
        line += f" ({wbytes / us / 1e6:.2f} TB/s)"
      if mode == "chain":
        err = rel_rms(got, want)
        rec["rel_rms_vs_xla"] = err
        line += f", rel RMS vs XLA {err:.2e}"
      if mode == "barrier":
        line += f" ({us / (4 * LAYERS):.2f} us per barrier)"
      print(line + (f", BARRIER TIMEOUTS {fails}" if fails else ""))
      records.append(rec)
  write_results(args.out, "benchmarks/persistent_probe.py", records, programs=nprog,
                weight_mb=wbytes / 1e6)


if __name__ == "__main__":
  main()
