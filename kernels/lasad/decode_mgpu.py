"""A whole LASADGen decode token, every layer, as one persistent Mosaic GPU kernel (issue 5).

The Triton persistent kernel (decode_persistent.py) cannot keep weights in flight across its
grid barriers and moves them at ~1.5 TB/s. Here one warpgroup per SM stays resident for all
layers and streams its share of every layer's four weight matrices through one ring of
``Plan.stages`` TMA buffers of [64, 128] bf16 that runs on across phases and layers: weights do
not depend on the token, so while a program waits for its inputs the next blocks are landing.
On the H100 such a ring streamed a token's LASADGen-L weights at 3.0 TB/s
(benchmarks/stream_probe_mgpu.py, BENCHMARKS.md session 16).

Matmuls are y^T [128, R] += W^T [128, 64] x^T [64, R] on the tensor cores (R = the padded batch
rows, wgmma's narrow operand; kernels/sampling/gemm.py). So every activation lives in HBM
transposed, [features, R]: the accumulator's layout, stored and loaded from registers as is.
A B operand is built in shared memory by storing such a [64, R] tile through a transposed view.

Work per layer, in units; unit u of a phase runs on program (u + phase offset) % nprog:

  A  (tile of [wq|wf|wv], K segment)   h = RMSNorm(x) tiles, partial y^T -> p_in
  B  (head, 8 / att_split rows)        the HGRN2 step per row from the summed partials -> o^T
  C  (tile of wo, K segment)           partial -> p_o
  C' (64 rows of x)                    x += bf16(sum of partials); sums of squares per row
  D  (tile of [w1|w3] interleaved, K)  h = RMSNorm(x), partial [a | b]^T -> p_13
  E  (tile of w2, K segment)           m^T = silu(a) b of its K segment from the summed
                                       partials (each unit its own copy), partial -> p_2
  E' (64 rows of x)                    as C'

No grid barrier: each unit waits on global semaphores for exactly its inputs (counters that only
grow during a launch: a unit of layer l waits for count >= (l + 1) x producers; program 0 puts
them back to 0 at the end). Partials are summed in segment order by one owner, so a token's
result does not depend on timing. The math is ``lasad_jax.model.decode_step``'s, rounded where it
rounds (bf16 matmul outputs, q and k, silu(a)), up to the order of float32 sums.

Off the GPU, Mosaic GPU's interpreter runs the body as one program (it has no semaphores; one
program meets every dependency in order): that is how CI tests it. All programs must be resident
at once, and the semaphore waits have no time limit.

Status (H100, BENCHMARKS.md sessions 17-19): correct; 0.83 ms per token, level with the
sampler's default in the sampler; each layer is one chain of seven dependent units
(kernels/lasad/README.md).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from kernels.lasad.decode import GATE_FLOOR
from kernels.sampling.gemm import ring_step, tile_transforms

F32, BF16 = jnp.float32, jnp.bfloat16
TK, TN, HD = 64, 128, 64       # K block, column tile, head dim (= TK: a K block of o is a head)
GROUP = 8                      # rows of an o^T tile (a WGMMA tile's narrowest width); an
                               # attention unit takes GROUP / Plan.att_split of them
WG = plgpu.Layout.WGMMA
ROWS = WG.reduce(1)            # a vector indexed like the rows of a WGMMA tile
COLS = WG.reduce(0)            # ... like its columns


def _divisor_at_most(n, target):
  return max(d for d in range(1, min(n, target) + 1) if n % d == 0)


@dataclasses.dataclass(frozen=True)
class Plan:
  """Static sizes. rows: the padded batch (a multiple of 8). b_*: K blocks of 64 per unit of each
  matmul (divisors of its K / 64; fewer = more units and more partials to sum)."""
  layers: int
  rows: int
  batch: int
  dim: int
  hidden: int
  heads: int
  nprog: int
  eps: float
  b_in: int = 4
  b_o: int = 2
  b_13: int = 8
  b_2: int = 4
  stages: int = 4       # weight ring depth: 3-5 measured ~3% faster than 8 (BENCHMARKS.md s18)
  state_bufs: int = 2   # attention states in flight per program (TMA, [64, 64] float32 each;
                        # 2 took 830 us per token against 844 for 4, BENCHMARKS.md session 19)
  att_split: int = 4    # attention units per (head, 8 rows): each takes 8 / att_split rows
  # timing experiments only (the results are then wrong): "attn" / "own" skip the attention and
  # owner units' math (they still wait and signal), "build" the B operand tiles (with the waits
  # of C and E), "wait" every wait, "wait:NAME" the waits on one semaphore group (x: A and D for
  # the residual owners, a: B for A, o: C for B, c: C' for C, d: E for D, e: E' for E)
  skip: tuple = ()

  def __post_init__(self):
    if self.dim % TN or self.hidden % TK or self.dim != self.heads * HD:
      raise ValueError(f"decode_mgpu: needs dim a multiple of {TN} (got {self.dim}), hidden of "
                       f"{TK} (got {self.hidden}) and head_dim {HD} (dim / heads = "
                       f"{self.dim // max(self.heads, 1)})")
    if self.batch > 64:
      raise ValueError(f"config.decode_impl='mosaic' decodes at most 64 rows at a time (a wgmma "
                       f"operand's width), got a batch of {self.batch} (images, x 2 with CFG): "
                       "sample in smaller batches or use config.decode_impl='auto'")
    if self.rows % GROUP or not self.batch <= self.rows <= 64:
      raise ValueError(f"decode_mgpu: rows={self.rows} must be a multiple of {GROUP}, >= batch="
                       f"{self.batch} and <= 64")
    for name, k, b in (("b_in", self.dim, self.b_in), ("b_o", self.dim, self.b_o),
                       ("b_13", self.dim, self.b_13), ("b_2", self.hidden, self.b_2)):
      if (k // TK) % b:
        raise ValueError(f"decode_mgpu: {name}={b} must divide the {k // TK} K blocks")
    if not 1 <= self.stages <= 32:
      raise ValueError(f"decode_mgpu: stages={self.stages} must be in 1..32 (barriers per group)")
    if not 2 <= self.state_bufs <= 32:
      raise ValueError(f"decode_mgpu: state_bufs={self.state_bufs} must be in 2..32 (a buffer "
                       "is refilled a row after its store)")
    if GROUP % self.att_split:
      raise ValueError(f"decode_mgpu: att_split={self.att_split} must divide {GROUP}")
    nb = max(m[2] for m in self.mats.values())
    smem = (self.stages * TK * TN * 2 + nb * self.rows * TK * 2 + self.state_bufs * HD * HD * 4
            + 3 * GROUP * HD * 4)
    if smem > 227 * 1024:
      raise ValueError(f"decode_mgpu: {smem // 1024} KB of shared memory (ring {self.stages} x "
                       f"16 KB, states {self.state_bufs} x 16 KB, B operands) exceed the 227 KB "
                       "of an H100 SM: lower stages or state_bufs")

  # column tiles and K segments of each matmul: (tiles, segments, K blocks per unit)
  @property
  def mats(self):
    d, f = self.dim, self.hidden
    return {"in": (3 * d // TN, d // TK // self.b_in, self.b_in),
            "o": (d // TN, d // TK // self.b_o, self.b_o),
            "13": (2 * f // TN, d // TK // self.b_13, self.b_13),
            "2": (d // TN, f // TK // self.b_2, self.b_2)}

  @property
  def groups(self):
    return self.rows // GROUP

  @property
  def per_head(self):   # attention units per head
    return self.groups * self.att_split

  @property
  def unit_rows(self):   # rows per attention unit
    return GROUP // self.att_split

  def units(self):
    """Units per phase, in the order they run within a layer."""
    m = self.mats
    return {"A": m["in"][0] * m["in"][1], "B": self.heads * self.per_head,
            "C": m["o"][0] * m["o"][1], "C'": self.dim // 64,
            "D": m["13"][0] * m["13"][1],
            "E": m["2"][0] * m["2"][1], "E'": self.dim // 64}

  def offsets(self):
    """First program of each phase: each phase starts where the one before ended, so that the
    programs' work per layer evens out."""
    out, at = {}, 0
    for name, n in self.units().items():
      out[name] = at
      at = (at + n) % self.nprog
    return out

  # One semaphore per consumer's input set, so that a unit polls once (each poll is an L2 round
  # trip): "a" per head pair (the q, f and v tiles of its columns), "o" per wo K segment (b_o
  # heads), "d" per w2 K segment (b_2 tiles of [w1 | w3]); "c" / "e" per column tile; "x"
  # counts the residual owners (C' and E').
  def sem_index(self, phase, u):
    """(group, index) of the semaphore that unit u of ``phase`` signals (u an int or a traced
    int32; its consumers wait on it through ``wait_on``)."""
    m = self.mats
    if phase == "A":
      return "a", (u // m["in"][1]) % (self.dim // TN)
    if phase == "B":
      return "o", u // (self.per_head * self.b_o)
    if phase == "C":
      return "c", u // m["o"][1]
    if phase == "D":
      return "d", u // m["13"][1] // self.b_2
    if phase == "E":
      return "e", u // m["2"][1]
    return "x", u * 0   # C', E'

  def wait_on(self, phase, u, layer):
    """(group, index, count) that unit u of ``phase`` in ``layer`` waits for before it reads its
    inputs (u, layer ints or traced int32; the kernel's waits): its producers' semaphore, once
    every producer up to this layer has signalled. A and D wait on "x" once per phase (u unused)
    for the residual owners of the layer before (A) or of this layer's C' too (D)."""
    per = {k: v[1] for k, v in self.sem_counts().items()}
    if phase in ("A", "D"):
      return "x", 0, per["x"] * layer + (per["x"] // 2 if phase == "D" else 0)
    if phase == "B":    # q, f and v of its head
      return "a", u // self.per_head * HD // TN, per["a"] * (layer + 1)
    if phase == "C":    # o of its K segment's heads
      return "o", u % self.mats["o"][1], per["o"] * (layer + 1)
    if phase == "E":    # [a | b] partials of its K segment's tiles
      return "d", u % self.mats["2"][1], per["d"] * (layer + 1)
    group = {"C'": "c", "E'": "e"}[phase]   # owners of x rows 64 u..: their tile's partials
    return group, u * 64 // TN, per[group] * (layer + 1)

  def sem_counts(self):
    """{group: (semaphores, signals each gets per layer)}: a consumer of layer l waits for
    (l + 1) x the latter (x: a layer's C' owners are half of it)."""
    m = self.mats
    return {"a": (self.dim // TN, 3 * m["in"][1]),
            "o": (self.heads // self.b_o, self.b_o * self.per_head),
            "c": (m["o"][0], m["o"][1]), "x": (1, 2 * (self.dim // 64)),
            "d": (m["13"][0] // self.b_2, self.b_2 * m["13"][1]),
            "e": (m["2"][0], m["2"][1])}

  def semaphores(self):
    """(offset, count, signals per launch) of each semaphore group, and the total number."""
    groups = {k: (n, per * self.layers) for k, (n, per) in self.sem_counts().items()}
    groups["done"] = (1, self.nprog)
    out, at = {}, 0
    for name, (n, per_launch) in groups.items():
      out[name] = (at, n, per_launch)
      at += n
    return out, at


def check_device(device):
  """Raise a clear error unless ``device`` can run the kernel: a Hopper GPU (compute capability
  9.x; the kernel is built on wgmma and TMA, which other generations lack or replace)."""
  cc = str(getattr(device, "compute_capability", ""))
  if not cc.startswith("9."):
    raise ValueError(f"config.decode_impl='mosaic' needs a Hopper GPU (compute capability 9.x, "
                     f"e.g. H100 / H200); {getattr(device, 'device_kind', device)} has "
                     f"{cc or 'none'}: use config.decode_impl='auto'")


def make_plan(*, layers, batch, dim, hidden, heads, eps, nprog):
  """The tiling for these sizes (LASADGen-L: 96 / 64 / 88 / 88 matmul units per layer). On the
  H100 b_13 = 8 took 844 us per token against 863 for 4 (b_in 8, b_2 2 or 11, b_o 1 or 4,
  att_split 2 or 8 were slower or equal; BENCHMARKS.md session 19)."""
  rows = max(16, -(-batch // GROUP) * GROUP)
  return Plan(layers=layers, rows=rows, batch=batch, dim=dim, hidden=hidden, heads=heads,
              nprog=nprog, eps=eps, b_in=_divisor_at_most(dim // TK, 4),
              b_o=_divisor_at_most(dim // TK, 2), b_13=_divisor_at_most(dim // TK, 8),
              b_2=_divisor_at_most(hidden // TK, 4))


def interleave_w13(w13, hidden):
  """[.., d, 2 hidden] = [w1 | w3] -> column tiles of 128 = [w1 cols 64 t.. | w3 cols 64 t..]:
  a unit's accumulator then holds a and b of the same 64 columns of m."""
  lead = w13.shape[:-1]
  return w13.reshape(*lead, 2, hidden // 64, 64).swapaxes(-3, -2).reshape(*lead, 2 * hidden)


def _bf16_round(x):
  return x.astype(BF16).astype(F32)


def _kernel(xin, ssin, st_hbm, startr, w_in, wo, w13, w2, an, fn, hn, lbr, bndr,
            xout, ot, p_in, p_o, p_13, p_2, ss,
            w_smem, x_smem, cv_smem, st_smem, w_bar, st_bar, *, plan, interpret):
  P = plan
  R, D, L, H = P.rows, P.dim, P.layers, P.heads
  nprog = P.nprog
  pid = lax.axis_index("p")
  mats = P.mats
  offs = P.offsets()
  sem_layout, n_sems = P.semaphores()
  sems = None if interpret else pl.get_global(plgpu.SemaphoreType.REGULAR((n_sems,)))

  def sem(name, i=0):
    return sems.at[sem_layout[name][0] + i]

  def signal(name, i=0):
    if not interpret:
      plgpu.semaphore_signal(sem(name, i), 1, memory_scope="gpu")

  def wait_for(phase, u, layer):
    wait(*P.wait_on(phase, u, layer))

  def wait(name, i, target):
    if not interpret and "wait" not in P.skip and f"wait:{name}" not in P.skip:
      with jax.named_scope(f"wait_{name}"):   # a span of the profile (decode_layers' profile_dir)
        plgpu.semaphore_wait(sem(name, i), target, decrement=False, memory_scope="gpu")

  def mine(phase):
    """(first unit of this program in ``phase``, how many: units q, q + nprog, ...)."""
    q = lax.rem(pid - offs[phase] + nprog, nprog)
    n = P.units()[phase]
    return q, jnp.where(q < n, lax.div(n - q + nprog - 1, nprog), 0)

  # The weight blocks this program consumes per layer: its units of A, C, D, E in that order.
  phase_mats = (("A", "in", w_in), ("C", "o", wo), ("D", "13", w13), ("E", "2", w2))
  counts = [mine(ph)[1] * mats[m][2] for ph, m, _ in phase_mats]
  per_layer = sum(counts)
  total = L * per_layer

  def issue(seq, slot):
    """TMA of this program's weight block number ``seq`` into ring slot ``slot``."""
    layer = lax.div(seq, jnp.maximum(per_layer, 1))
    rest = seq - layer * per_layer
    start = jnp.int32(0)
    for (ph, m, w), n in zip(phase_mats, counts):
      _, segs, nb = mats[m]
      inside = (rest >= start) & (rest < start + n)
      r = rest - start

      @pl.when(inside)
      def _(r=r, ph=ph, w=w, segs=segs, nb=nb):
        u = mine(ph)[0] + lax.div(r, nb) * nprog
        t, s = lax.div(u, segs), lax.rem(u, segs)
        krow = (s * nb + lax.rem(r, nb)) * TK
        plgpu.copy_gmem_to_smem(w.at[layer, pl.ds(krow, TK), pl.ds(t * TN, TN)],
                                w_smem.at[slot], w_bar.at[slot])
      start = start + n

  for s in range(P.stages):
    @pl.when(s < total)
    def _(s=s):
      issue(jnp.int32(s), s)

  # Attention states: this program's rows k = 0, 1, ... of a layer (row k % unit_rows of its
  # unit k // unit_rows)
  # come through their own ring of state_bufs TMA buffers; a layer's first ones are requested at
  # the layer's start, long before its attention units can run.
  q_att, n_att = mine("B")
  att_rows = n_att * P.unit_rows
  per_head = P.per_head

  def issue_state(layer, k, slot):
    h, b = att_row(q_att + lax.div(k, P.unit_rows) * nprog, lax.rem(k, P.unit_rows))
    b = jnp.minimum(b, P.batch - 1)
    plgpu.copy_gmem_to_smem(st_hbm.at[layer, b, h], st_smem.at[slot], st_bar.at[slot])

  def att_row(u, i):
    """(head, batch row) of attention unit u's row i."""
    h, r = lax.div(u, per_head), lax.rem(u, per_head)
    return h, lax.div(r, P.att_split) * GROUP + lax.rem(r, P.att_split) * P.unit_rows + i

  def prefetch_states(layer):
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)   # the last layer's state stores
    for k in range(P.state_bufs):
      @pl.when(k < att_rows)
      def _(k=k):
        issue_state(layer, jnp.int32(k), k)

  # ---------------------------------------------------------------- helpers
  def load_wg(ref):   # a [64k, n] tile from HBM into registers
    return plgpu.load(ref, layout=WG, optimized=False)

  def bcast_rows(v, n):   # v [64] (ROWS) -> [64, n]: v[i] along row i
    return lax.broadcast_in_dim(v, (v.shape[0], n), (0,))

  def bcast_cols(v, m):   # v [n] (COLS) -> [m, n]
    return lax.broadcast_in_dim(v, (m, v.shape[0]), (1,))

  def rstd(ss_ref):   # [R] (COLS): 1 / RMS of each row of x from the per-64-row sums of squares
    acc = plgpu.load(ss_ref.at[0], layout=COLS, optimized=False)
    for j in range(1, D // 64):
      acc = acc + plgpu.load(ss_ref.at[j], layout=COLS, optimized=False)
    return lax.rsqrt(acc / D + P.eps)

  def to_x_smem(tiles):
    """x_smem[kb] = tiles[kb] ([64, R] each, cast to bf16). Builds load all their tiles before
    the first store, so that the loads are in flight together (a store is a barrier)."""
    for kb, t in enumerate(tiles):
      x_smem.at[kb].transpose((1, 0))[...] = t.astype(BF16)
    plgpu.commit_smem()

  def normed_tiles(x_ref, ss_ref, norm_ref, layer, k0, nb):
    """x_smem[kb] = bf16(x * rstd * norm) for the nb K blocks from row k0 of x^T."""
    rows = [pl.ds(k0 + kb * TK, TK) for kb in range(nb)]
    xs = [load_wg(x_ref.at[r, :]) for r in rows]
    gs = [plgpu.load(norm_ref.at[layer, r], layout=ROWS, optimized=False) for r in rows]
    r = bcast_cols(rstd(ss_ref), TK)
    to_x_smem([x * r * bcast_rows(g, R) for x, g in zip(xs, gs)])

  def copied_tiles(srcs, k0, nb):
    """x_smem[kb] = the sum of srcs' rows k0 + 64 kb ... (bf16 already; at most one of them is
    nonzero at each place, so the sum is exact)."""
    tiles = []
    for kb in range(nb):
      rows = pl.ds(k0 + kb * TK, TK)
      ts = [load_wg(src.at[rows, :]) for src in srcs]
      tiles.append(functools.reduce(lambda a, b: a + b, ts))
    to_x_smem(tiles)

  def matmul_units(phase, m, build, out_ref, seq, before=None):
    """This program's units of one matmul phase: build(t, s, nb) fills x_smem, then nb ring
    steps, the float32 partial to out_ref[s, tile columns] and a signal (Plan.sem_index)."""
    _, segs, nb = mats[m]
    q, n = mine(phase)

    def body(i, seq):
      u = q + i * nprog
      t, s = lax.div(u, segs), lax.rem(u, segs)
      if "build" not in P.skip:
        with jax.named_scope("build"):   # profile steps (decode_layers' profile_dir)
          build(t, s, nb)

      def with_acc(acc):
        with jax.named_scope("mma"):
          for kb in range(nb):
            ring_step(acc, seq + kb, total, w_smem, w_bar, x_smem.at[kb], issue)
        with jax.named_scope("store"):
          out_ref[s, pl.ds(t * TN, TN), :] = acc[...]
      pl.run_scoped(with_acc, plgpu.ACC((TN, R), F32))
      with jax.named_scope("signal"):
        signal(*P.sem_index(phase, u))
      return seq + nb

    with jax.named_scope(phase):   # one span per layer of the profile
      if before is not None:
        @pl.when(n > 0)
        def _():
          before()
      return lax.fori_loop(0, n, body, seq)

  def owner_units(phase, fn):
    """This program's units of a phase without weights: fn(u), then a signal (Plan.sem_index)."""
    q, n = mine(phase)

    def body(i, c):
      u = q + i * nprog
      args = (u, i * P.unit_rows) if phase == "B" else (u,)
      if ("attn" if phase == "B" else "own") not in P.skip:
        fn(*args)
      else:   # timing experiments: only the waits
        fn(*args, dry=True)
      signal(*P.sem_index(phase, u))
      return c
    with jax.named_scope(phase):
      lax.fori_loop(0, n, body, 0)

  def partial_sum(p_ref, rows, cols=slice(None)):
    segs = p_ref.shape[0]
    acc = load_wg(p_ref.at[0, rows, cols])
    for s in range(1, segs):
      acc = acc + load_wg(p_ref.at[s, rows, cols])
    return acc

  def residual(layer, j, p_ref, first):
    """x^T rows 64 j.. += bf16(sum of p_ref's partials); their sums of squares per row."""
    rows = pl.ds(j * 64, 64)
    y = _bf16_round(partial_sum(p_ref, rows))

    def finish(x):
      x = x + y
      xout[rows, :] = x
      ss[j] = jnp.sum(x * x, axis=0)

    if first:   # C' of layer 0 reads the kernel's input
      @pl.when(layer == 0)
      def _():
        finish(load_wg(xin.at[rows, :]))

      @pl.when(layer > 0)
      def _():
        finish(load_wg(xout.at[rows, :]))
    else:
      finish(load_wg(xout.at[rows, :]))

  # ---------------------------------------------------------------- one layer

  def layer_body(l, seq):
    prefetch_states(l)
    # A: partial y^T = (h @ [wq | wf | wv])^T
    def build_a(t, s, nb):
      k0 = s * nb * TK

      @pl.when(l == 0)
      def _():
        normed_tiles(xin, ssin, an, l, k0, nb)

      @pl.when(l > 0)
      def _():
        normed_tiles(xout, ss, an, l, k0, nb)

    seq = matmul_units("A", "in", build_a, p_in, seq, before=lambda: wait_for("A", 0, l))

    # B: attention for some rows of one head. States are kept transposed, S^T [V, K]: o = q S is
    # then a sum along the rows of a WGMMA tile (within a warp), not across the 4 warps.
    def take_state(k):
      """(ring slot, row k's state S^T) from its TMA buffer."""
      slot = lax.rem(k, P.state_bufs)
      plgpu.barrier_wait(st_bar.at[slot])
      return slot, plgpu.load(st_smem.at[slot], layout=WG)

    def give_state(k, slot, st, b, h):
      """Row k's new state to HBM by TMA from its buffer (batch row b, head h; nothing for padding
      rows or st None). Row k - 1's buffer, whose store has had a row's time to be read, then
      takes row k - 1 + state_bufs."""
      if st is not None:
        st_smem.at[slot][...] = st
        plgpu.commit_smem()   # every thread has written the buffer

        @pl.when(b < P.batch)
        def _():
          plgpu.copy_smem_to_gmem(st_smem.at[slot], st_hbm.at[l, b, h])

      @pl.when((k >= 1) & (k - 1 + P.state_bufs < att_rows))
      def _():
        if st is None:
          plgpu.wait_smem_to_gmem(0, wait_read_only=True)
        else:   # all but row k's store (if any) have read their buffers
          @pl.when(b < P.batch)
          def _():
            plgpu.wait_smem_to_gmem(1, wait_read_only=True)

          @pl.when(b >= P.batch)
          def _():
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)
        issue_state(l, k - 1 + P.state_bufs, lax.rem(k - 1, P.state_bufs))

    def attention(u, k0, dry=False):
      """Unit u: unit_rows rows (from row j0 of an 8-row group) of one head; k0: this program's
      attention rows before them in this layer. The gates are computed on the group's [64, 8]
      tiles at once and the unit's columns, needed along the state's K columns, go through the
      buffer cv_smem (one barrier per unit); per row only the state's update and o = q S remain.
      Its o^T goes to its own [64, 8] tile of ot[part] (zero in the other parts' columns)."""
      h, b0 = att_row(u, 0)   # the same rows as the state loads (issue_state)
      g, j0 = lax.div(b0, GROUP), lax.rem(b0, GROUP)
      part = lax.div(j0, P.unit_rows)
      wait_for("B", u, l)   # its q, f and v tiles
      if dry:
        for i in range(P.unit_rows):
          slot, _ = take_state(k0 + i)
          give_state(k0 + i, slot, None, b0 + i, h)
        return
      with jax.named_scope("gates"):   # profile steps
        cols = pl.ds(g * GROUP, GROUP)
        q_t, f_t, v_t = (_bf16_round(partial_sum(p_in, pl.ds(m3 * D + h * HD, HD), cols))
                         for m3 in range(3))
        lb = bcast_rows(plgpu.load(lbr.at[l, pl.ds(h * HD, HD)], layout=ROWS, optimized=False),
                        GROUP)
        hnorm = plgpu.load(hn.at[l, pl.ds(h * HD, HD)], layout=ROWS, optimized=False)
        is_start = plgpu.load(startr.at[cols], layout=COLS, optimized=False) != 0      # [8]
        real = g * GROUP + lax.broadcasted_iota(jnp.int32, (GROUP,), 0) < P.batch      # [8]
        q_t = _bf16_round(jax.nn.silu(q_t))
        sg = jax.nn.sigmoid(f_t)
        gate = jnp.log(jnp.maximum(sg + lb * (1.0 - sg), GATE_FLOOR))
        k_t = _bf16_round((1.0 - lb) * (1.0 - sg))
        gate = jnp.where(bcast_cols(is_start, HD),
                         lax.broadcast_in_dim(bndr[l, h], (HD, GROUP), ()), gate)
        iota = lax.broadcasted_iota(jnp.int32, (HD, GROUP), 1)
        picks = [(iota == j0 + i).astype(F32) for i in range(P.unit_rows)]

        def column(t, i):   # the column of the unit's row i in a [64, 8] tile (ROWS)
          return jnp.sum(t * picks[i], axis=1)

        for m3, t in enumerate((jnp.exp(gate), k_t, q_t)):
          for i in range(P.unit_rows):
            cv_smem.at[m3, i][...] = column(t, i)
        plgpu.commit_smem()
      with jax.named_scope("rows"):
        o_t = jnp.zeros((HD, GROUP), F32)
        for i in range(P.unit_rows):
          slot, st = take_state(k0 + i)
          decay, k, q = (plgpu.load(cv_smem.at[m3, i], layout=COLS, optimized=False)
                         for m3 in range(3))
          st = bcast_cols(decay, HD) * st + bcast_rows(column(v_t, i), HD) * bcast_cols(k, HD)
          o = jnp.sum(bcast_cols(q, HD) * st, axis=1)                              # ROWS
          give_state(k0 + i, slot, st, b0 + i, h)
          o_t = o_t + bcast_rows(o, GROUP) * picks[i]
      with jax.named_scope("out"):
        # the head's RMSNorm per row; rows past the batch (and the other parts' rows) give 0
        scale = jnp.where(real, lax.rsqrt(jnp.sum(o_t * o_t, axis=0) / HD + P.eps), 0.0)
        o_t = o_t * bcast_cols(scale, HD) * bcast_rows(hnorm, GROUP)
        ot[part, pl.ds(h * HD, HD), cols] = o_t.astype(BF16)
    owner_units("B", attention)

    def copied(srcs):
      """B operands of C: the sum of srcs^T's rows of the unit's K blocks, once the attention
      units of its K segment's heads have signalled."""
      def build(t, s, nb):
        wait_for("C", t * mats["o"][1] + s, l)
        copied_tiles(srcs, s * nb * TK, nb)
      return build

    def residual_owners(phase, p_ref, first):
      """C' and E': x rows 64 j.. += the sum of their tile's partials."""
      def fn(j, dry=False):
        wait_for(phase, j, l)
        if not dry:
          residual(l, j, p_ref, first=first)
      owner_units(phase, fn)

    # C: partial (o @ wo)^T;  C': x += o @ wo
    parts = [ot.at[p] for p in range(P.att_split)]
    seq = matmul_units("C", "o", copied(parts), p_o, seq)
    residual_owners("C'", p_o, first=True)

    # D: partial (h @ [w1 | w3])^T, once this layer's C' owners (half of x's per layer) are done
    seq = matmul_units("D", "13", lambda t, s, nb: normed_tiles(xout, ss, fn, l, s * nb * TK, nb),
                       p_13, seq, before=lambda: wait_for("D", 0, l))

    # E: partial (m @ w2)^T with m = silu(a) b of the unit's K blocks made from D's partials
    # (D tile j holds a and b of m's rows 64 j..: no SwiGLU phase and hop of its own);
    # E': x += m @ w2
    def swiglu_tiles(t, s, nb):
      wait_for("E", t * mats["2"][1] + s, l)
      tiles = []
      for kb in range(nb):
        j = s * nb + kb
        a = _bf16_round(partial_sum(p_13, pl.ds(j * TN, 64)))
        b = _bf16_round(partial_sum(p_13, pl.ds(j * TN + 64, 64)))
        tiles.append(_bf16_round(jax.nn.silu(a)) * b)
      to_x_smem(tiles)

    seq = matmul_units("E", "2", swiglu_tiles, p_2, seq)
    residual_owners("E'", p_2, first=False)
    return seq

  lax.fori_loop(0, L, layer_body, jnp.int32(0))
  plgpu.wait_smem_to_gmem(0)   # the last state stores have landed before the program exits

  # Global semaphores outlive the launch: once every program is past its last wait, program 0
  # takes each back by the count this launch added.
  if not interpret:
    signal("done")

    @pl.when(pid == 0)
    def _():
      wait("done", 0, nprog)
      plgpu.semaphore_signal_parallel(*[
          plgpu.SemaphoreSignal(sem(name, i), device_id=None, inc=-per_launch)
          for name, (_, n, per_launch) in sem_layout.items() for i in range(n)])


@functools.partial(jax.jit, static_argnames=("plan", "interpret", "profile_dir"))
def decode_layers(x, state, w_in, wo, w13, w2, attn_norm, ffn_norm, head_norm, lb, boundary,
                  start, *, plan, interpret=False, profile_dir=""):
  """Every layer of one decode token. x [B, d] float32; state [L, B, H, 64, 64] float32, each
  head's state transposed, S^T [V, K] (the sampler's states start at zero and only this kernel
  reads them; the other decode paths keep [K, V]); w_in
  [L, d, 3d] (wq | wf | wv), wo [L, d, d], w13 [L, d, 2 hidden] (``interleave_w13``), w2
  [L, hidden, d] in bf16; attn_norm, ffn_norm, head_norm, lb [L, d] float32; boundary [L, H];
  start [B] bool. Returns (x after the last layer [B, d] float32, new state).

  ``profile_dir`` (GPU): each call also writes a Chrome trace of every program's phases and
  semaphore waits there (Mosaic GPU's on-device profiler; benchmarks/decode_mgpu.py --profile
  summarises it)."""
  P = plan
  b = x.shape[0]
  R, D, F = P.rows, P.dim, P.hidden
  if w_in.dtype != BF16 or not all(w.dtype == BF16 for w in (wo, w13, w2)):
    raise ValueError(f"decode_mgpu: weights must be bfloat16, got {w_in.dtype}")
  xt = jnp.pad(x.astype(F32), ((0, R - b), (0, 0))).T                     # [D, R]
  ss0 = jnp.sum(jnp.square(xt).reshape(D // 64, 64, R), axis=1)           # [D / 64, R]
  m = P.mats
  out_type = (
      jax.ShapeDtypeStruct((D, R), F32),                       # x^T
      jax.ShapeDtypeStruct((P.att_split, D, R), BF16),         # o^T, one per att_split part
      jax.ShapeDtypeStruct((m["in"][1], 3 * D, R), F32),       # partials
      jax.ShapeDtypeStruct((m["o"][1], D, R), F32),
      jax.ShapeDtypeStruct((m["13"][1], 2 * F, R), F32),
      jax.ShapeDtypeStruct((m["2"][1], D, R), F32),
      jax.ShapeDtypeStruct((D // 64, R), F32),                 # sums of squares of x
  )
  nb = max(m[k][2] for k in m)
  # The state is updated in place (each state is read by TMA before it is written), so that XLA's
  # token loop copies no state: a mutable Ref the kernel writes becomes an aliased output.
  st_ref = jax.new_ref(state.astype(F32))
  outs = plgpu.kernel(
      functools.partial(_kernel, plan=P, interpret=interpret), out_type=out_type,
      scratch_types=dict(
          w_smem=plgpu.SMEM((P.stages, TK, TN), BF16, transforms=tile_transforms(TN, BF16)),
          x_smem=plgpu.SMEM((nb, R, TK), BF16, transforms=tile_transforms(TK, BF16)),
          cv_smem=plgpu.SMEM((3, GROUP // P.att_split, HD), F32),
          st_smem=plgpu.SMEM((P.state_bufs, HD, HD), F32, transforms=tile_transforms(HD, F32)),
          w_bar=plgpu.Barrier(num_barriers=P.stages),
          st_bar=plgpu.Barrier(num_barriers=P.state_bufs)),
      grid=(P.nprog,), grid_names=("p",),
      compiler_params=plgpu.CompilerParams(
          # spans per program: per layer 7 phases and their waits (~12), with room
          profile_space=64 * P.layers if profile_dir else 0, profile_dir=profile_dir,
          profile_bounds_check=True),
      interpret=plgpu.InterpretGPUParams() if interpret else None,
  )(xt, ss0, st_ref, jnp.pad(start.astype(jnp.int32), (0, R - b)), w_in, wo, w13, w2,
    attn_norm.astype(F32), ffn_norm.astype(F32), head_norm.astype(F32), lb.astype(F32),
    boundary.astype(F32))
  return outs[0].T[:b], jax.freeze(st_ref)
