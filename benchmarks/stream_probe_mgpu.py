"""Can one Mosaic GPU kernel stream a decode token's weights at HBM speed? (issue 5 probe)

    PYTHONPATH=.:benchmarks python benchmarks/stream_probe_mgpu.py [--stages 8 --tn 128]

A persistent decode kernel (one launch per token) needs each program to stream its share of all
24 layers' weights (LASADGen-L: 617 MB in bf16) with the next phase's weights already in flight
while a phase waits for the last. Session 14's Triton probe streamed them at 1.23 TB/s (501.7 us
per token, no barriers), and a Triton prefetch blocks the program (session 15). Here each of the
132 programs walks its share of every layer's four matmuls (w_in, wo, w1|w3, w2: contiguous runs
of [tk, tn] blocks per matrix) in one loop, fed by a ring of ``stages`` TMA buffers that crosses
matrix and layer boundaries, with a wgmma of 16 rows of x per block. No dependencies between
phases and no partial stores: an upper bound for a Mosaic GPU persistent decode kernel's
streaming, to compare with the Triton probe's. Prints device us per token and TB/s.
"""

import argparse
import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax import lax  # noqa: E402
from jax.experimental import pallas as pl  # noqa: E402
from jax.experimental.pallas import mosaic_gpu as plgpu  # noqa: E402

from benchmarks_common import device_us_per_call, write_results  # noqa: E402
from kernels.lasad.decode_persistent import _share  # noqa: E402
from kernels.sampling.gemm import ring_step, tile_transforms  # noqa: E402

F32 = jnp.float32


def stream(x, mats, *, nprog, tn, tk, stages, barriers=False, data=False, blocks=True,
           interpret=False):
  """sum over every block of every matrix of W^T x^T, one [tn, R] float32 sum per program.
  x [R, Kmax]; mats: stacked [L, K, N] weights, walked layer by layer in the given order.
  ``barriers``: a grid barrier after each matrix of each layer (compiled only: the interpreter
  has no semaphores), as a persistent kernel's phases need, with no data passed between them.
  ``data`` (with barriers): around each barrier, what a real kernel's phases exchange: before it
  the program's float32 partial [tn, R] goes to HBM (smem, TMA store, waited for), after it x's
  tiles for the next matrix come back from HBM by TMA (all of its K: an upper bound).
  ``blocks=False``: no weights at all, the barriers alone."""
  barriers = barriers and not interpret
  data = data and barriers
  r = x.shape[0]
  nl = mats[0].shape[0]
  kx = x.shape[1] // tk
  # blocks of each matrix, tile-major: block b -> (column tile b // ksteps, K step b % ksteps)
  ksteps = [m.shape[1] // tk for m in mats]
  nblocks = [k * (m.shape[2] // tn) for k, m in zip(ksteps, mats)]

  reload_k = sorted(set(ksteps))   # one barrier per tile count of x reloads (data)

  def kernel(x_gmem, *refs, w_smem, x_smem, o_smem, w_bar, x_bar, **reload_bars):
    w_gmems, o_gmem = refs[:-1], refs[-1]
    pid = lax.axis_index("p")
    shares = [_share(pid, nprog, n if blocks else 0) for n in nblocks]
    sizes = [hi - lo for lo, hi in shares]
    per_layer = sum(sizes)
    total = nl * per_layer

    def locate(seq):
      """(layer, matrix index, column tile, K step) of this program's block number ``seq``."""
      layer, rest = lax.div(seq, per_layer), lax.rem(seq, per_layer)
      which, tile, kstep, start = jnp.int32(0), jnp.int32(0), jnp.int32(0), jnp.int32(0)
      for t, ((lo, _), size) in enumerate(zip(shares, sizes)):
        inside = (rest >= start) & (rest < start + size)
        b = lo + rest - start
        which = jnp.where(inside, t, which)
        tile = jnp.where(inside, lax.div(b, ksteps[t]), tile)
        kstep = jnp.where(inside, lax.rem(b, ksteps[t]), kstep)
        start = start + size
      return layer, which, tile, kstep

    def issue(seq, slot):
      layer, which, tile, kstep = locate(seq)
      for t, w in enumerate(w_gmems):
        @pl.when(which == t)
        def _(w=w):
          plgpu.copy_gmem_to_smem(w.at[layer, pl.ds(kstep * tk, tk), pl.ds(tile * tn, tn)],
                                  w_smem.at[slot], w_bar.at[slot])

    # Global semaphores persist across launches (pl.get_global), so the barriers count up on
    # one (count: every program adds 1 per barrier and waits for nprog x barriers passed, the
    # Triton kernel's scheme) and the exit puts it back to 0: each program reports on a second
    # one (done) once past its last wait, and program 0, when all have, subtracts the total. (A
    # barrier through program 0, which then signals each program's own semaphore, took ~51 us:
    # 132 signals one after another.)
    sems = pl.get_global(plgpu.SemaphoreType.REGULAR((2,))) if barriers else None
    count, done = (sems.at[0], sems.at[1]) if barriers else (None, None)
    n_barriers = nl * len(mats)

    def grid_barrier(b):
      plgpu.semaphore_signal(count, 1, memory_scope="gpu")
      plgpu.semaphore_wait(count, nprog * (b + 1), decrement=False, memory_scope="gpu")

    def release_barriers():
      plgpu.semaphore_signal(done, 1, memory_scope="gpu")

      @pl.when(pid == 0)
      def _():
        plgpu.semaphore_wait(done, nprog, memory_scope="gpu")          # back to 0
        plgpu.semaphore_signal(count, -nprog * n_barriers, memory_scope="gpu")

    for s in range(stages):
      @pl.when(s < total)
      def _(s=s):
        issue(jnp.int32(s), s)
    for i in range(kx):   # one barrier for all of x (at most 32 barriers per group)
      plgpu.copy_gmem_to_smem(x_gmem.at[:, pl.ds(i * tk, tk)], x_smem.at[i], x_bar)
    plgpu.barrier_wait(x_bar)

    def with_acc(acc):
      def step(i, carry):
        ring_step(acc, i, total, w_smem, w_bar, x_smem.at[locate(i)[3]], issue)
        return carry

      if not barriers:
        lax.fori_loop(0, total, step, 0)
      else:   # each phase (layer, matrix) ends in a grid barrier; the ring keeps loading ahead
        def layer(l, carry):
          start = l * per_layer
          for t, size in enumerate(sizes):
            lax.fori_loop(start, start + size, step, 0)
            if data:
              o_smem[...] = acc[...]
              plgpu.commit_smem()
              plgpu.copy_smem_to_gmem(o_smem, o_gmem.at[pid])
              plgpu.wait_smem_to_gmem(0, wait_read_only=False)
            grid_barrier(l * len(mats) + t)
            if data:
              kn = ksteps[(t + 1) % len(mats)]
              bar = reload_bars[f"reload_{kn}"]
              for i in range(kn):
                plgpu.copy_gmem_to_smem(x_gmem.at[:, pl.ds(i * tk, tk)], x_smem.at[i], bar)
              plgpu.barrier_wait(bar)
            start = start + size
          return carry
        lax.fori_loop(0, nl, layer, 0)
        release_barriers()
      o_smem[...] = acc[...]

    pl.run_scoped(with_acc, plgpu.ACC((tn, r), F32))
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(o_smem, o_gmem.at[pid])
    plgpu.wait_smem_to_gmem(0)

  dt = x.dtype
  return plgpu.kernel(
      kernel, out_type=jax.ShapeDtypeStruct((nprog, tn, r), F32),
      scratch_types=dict(
          w_smem=plgpu.SMEM((stages, tk, tn), dt, transforms=tile_transforms(tn, dt)),
          x_smem=plgpu.SMEM((kx, r, tk), dt, transforms=tile_transforms(tk, dt)),
          o_smem=plgpu.SMEM((tn, r), F32),
          w_bar=plgpu.Barrier(num_barriers=stages), x_bar=plgpu.Barrier(num_arrivals=kx),
          **{f"reload_{k}": plgpu.Barrier(num_arrivals=k) for k in reload_k}),
      grid=(nprog,), grid_names=("p",),
      interpret=plgpu.InterpretGPUParams() if interpret else None,
  )(x, *mats)


def reference(x, mats, *, nprog, tn, tk):
  """The same sums in XLA (for the interpreter check): every block's W^T x^T, per program."""
  out = []
  for p in range(nprog):
    acc = jnp.zeros((tn, x.shape[0]), F32)
    for layer in range(mats[0].shape[0]):
      for m in mats:
        ks, nt = m.shape[1] // tk, m.shape[2] // tn
        n = ks * nt
        for b in range(p * n // nprog, (p + 1) * n // nprog):
          t, k = divmod(b, ks)
          w = m[layer, k * tk:(k + 1) * tk, t * tn:(t + 1) * tn].astype(F32)
          acc += w.T @ x[:, k * tk:(k + 1) * tk].astype(F32).T
    out.append(acc)
  return jnp.stack(out)


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--stages", default="4,8,12")
  ap.add_argument("--tn", default="64,128")
  ap.add_argument("--layers", type=int, default=24)
  ap.add_argument("--barriers", default="0", help="0 none, 1 a grid barrier after each phase, 2 "
                  "barriers with the partial stores and x reloads around them; e.g. 0,1,2")
  ap.add_argument("--out", default="benchmarks/results/stream_probe_mgpu_h100.json")
  args = ap.parse_args()
  on_gpu = jax.default_backend() == "gpu"
  d, hid, L = (1024, 2816, args.layers) if on_gpu else (128, 256, 2)
  nprog = jax.devices()[0].core_count if on_gpu else 3
  key = iter(jax.random.split(jax.random.key(0), 8))
  shapes = [(d, 3 * d), (d, d), (d, 2 * hid), (hid, d)]
  mats = [jax.random.normal(next(key), (L,) + s, jnp.bfloat16) * 0.02 for s in shapes]
  x = jax.random.normal(next(key), (16, hid), jnp.bfloat16)
  mb = sum(m.size for m in mats) * 2 / 1e6
  print(f"device {jax.devices()[0].device_kind}, {nprog} programs, {L} layers, {mb:.0f} MB of "
        f"weights per token")
  records = []
  ints = lambda arg: [int(v) for v in arg.split(",")]  # noqa: E731
  runs = [(tn, st, bar) for bar in ints(args.barriers) for tn in ints(args.tn)
          for st in ints(args.stages)]
  if on_gpu and set(ints(args.barriers)) & {1, 2}:
    runs.append((64, 2, "alone"))   # the barriers without weights: is each one really waited?
  for tn, stages, bar in runs:
    f = jax.jit(lambda x, *m, tn=tn, s=stages, b=bar: stream(
        x, m, nprog=nprog, tn=tn, tk=64, stages=s, barriers=bool(b), data=b == 2,
        blocks=b != "alone", interpret=not on_gpu))
    try:
      got = f(x, *mats)
      if not on_gpu:
        ref = reference(x, mats, nprog=nprog, tn=tn, tk=64)
        err = float(jnp.max(jnp.abs(got - ref)) / jnp.max(jnp.abs(ref)))
        print(f"tn={tn} stages={stages}: interpreter vs XLA max rel err {err:.1e}")
        continue
      us = device_us_per_call(f, x, *mats, iters=10)[0]
      if bar == "alone":
        records.append(dict(barriers="alone", us=us, us_per_barrier=us / (L * len(mats))))
        print(f"{L * len(mats)} barriers alone: {us:8.1f} us, {us / (L * len(mats)):.2f} us per "
              "barrier", flush=True)
        continue
      records.append(dict(tn=tn, tk=64, stages=stages, barriers=bar, us=us, tb_s=mb / us, mb=mb))
      print(f"tn={tn} stages={stages} barriers={int(bar)}: {us:8.1f} us per token, "
            f"{mb / us:.2f} TB/s", flush=True)
    except Exception as e:  # noqa: BLE001
      print(f"tn={tn} stages={stages}: failed {type(e).__name__}: {str(e)[:300]}")
  if on_gpu:
    write_results(args.out, "benchmarks/stream_probe_mgpu.py", records)
    print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
