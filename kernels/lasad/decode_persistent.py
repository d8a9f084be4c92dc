"""A whole LASADGen decode token, every layer, as one persistent Pallas GPU kernel (Triton backend).

XLA runs a LASADGen-L sampler token as ~254 kernels, ~10 per layer, and each costs ~2.5-3 us more
than its bytes (BENCHMARKS.md, sessions 10-12): the four skinny matmuls (M = 16 rows: 8 images and
their CFG twins) move their weights at ~1.3 TB/s. Here one program per SM stays resident for all
layers and walks five phases per layer, separated by grid-wide barriers (an atomic arrival count in
HBM; ~1.35 us each on the H100, ``benchmarks/persistent_probe.py``):

  1. h = RMSNorm(x) (attn_norm);  y = h @ [wq | wf | wv]          split-K partials
  2. per (row, head): the HGRN2 gate, S' = e^{g~} S + k v^T, o = q S', per-head RMSNorm
  3. x += o @ wo                                                 split-K, last arriver adds
  4. h = RMSNorm(x) (ffn_norm); a, b = h @ w1, h @ w3; m = silu(a) b     last arriver applies
  5. x += m @ w2                                                 split-K, last arriver adds

Every matmul is cut into (column tile, K segment) units; each program takes a contiguous share
of them and walks all its K blocks in one loop (``_stream``), so Triton's software pipeline keeps
the next blocks' weights in flight across unit boundaries. Each unit writes its float32 partial;
after the loop, per-tile arrival counts (``_arrivals``) tell the program that completes a tile to
sum the tile's partials in K order (so the result does not depend on which program ran what:
same input, same bits) and apply the epilogue: residual add, and each tile's sum of squares per row
for the next RMSNorm (the next phase sums those instead of re-reading x). The math is
``lasad_jax.model.decode_step``'s, rounded where it rounds (bf16 matmul outputs, q and k); the
final RMSNorm and the logits stay in XLA.

All programs must be resident at once (the barrier waits for every one): the grid is the number of
SMs, one 4-warp program each. A barrier that waits longer than ``max_spins`` polls gives up and
counts itself in the returned ``timeouts`` (then the output is wrong, never a hang); callers check
it. The Pallas interpreter runs programs one after another, so off the GPU the same kernel body
runs as a single program (every barrier and last-arriver test is then trivially met): that is how
CI tests it.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from kernels.lasad.decode import attention_step

F32 = jnp.float32
MAX_SPINS = 1 << 22


def _zero():
  return jnp.zeros((), jnp.int32)   # an array index / value: the interpreter's atomics need one


@dataclasses.dataclass(frozen=True)
class Plan:
  """Static shapes and tiling. rows: padded batch (power of two >= 16, the smallest dot tile)."""
  layers: int
  rows: int
  batch: int
  dim: int
  hidden: int
  heads: int
  head_dim: int
  nprog: int
  eps: float
  # Tiling (H100, benchmarks/persistent_decode.py, BENCHMARKS.md session 14): K segments of 256
  # took a token 1284 -> 1066 us against 128; wider column tiles were slower.
  bn_in: int = 64     # columns per unit of phase 1 ([wq|wf|wv])
  k_in: int = 256     # K segment per unit of phase 1
  bn_x: int = 32      # columns per unit of phases 3 and 5 (tiles of the residual stream)
  k_o: int = 256
  bn_ff: int = 64     # columns per unit of phase 4 (each of w1 and w3)
  k_ff: int = 256
  k_2: int = 256
  bk: int = 128       # K block of the inner loops (<= every K segment)
  skip: tuple = ()    # phases (1-5) left out: timing experiments only (the results are wrong)
  # Loads of what other programs wrote (see _vload): volatile took a token 2394 -> 1545 us on the
  # H100 against plain loads, which the barrier's and arrival count's acquire already order.
  volatile: bool = False
  # Triton's software pipeline depth. H100, streamed form, us per token: 2 stages 1101, 3 1027,
  # 4 976-980, 6 1106 (benchmarks/persistent_decode.py, BENCHMARKS.md session 15).
  num_stages: int = 4
  num_warps: int = 4

  def __post_init__(self):
    for name, n, div in (("dim", self.dim, self.bn_x), ("dim", self.dim, self.k_in),
                         ("3 dim", 3 * self.dim, self.bn_in), ("dim", self.dim, self.k_o),
                         ("hidden", self.hidden, self.bn_ff), ("dim", self.dim, self.k_ff),
                         ("hidden", self.hidden, self.k_2)):
      if n % div:
        raise ValueError(f"decode_persistent: {name}={n} is not a multiple of a tile {div}")
    for k in (self.k_in, self.k_o, self.k_ff, self.k_2):
      if k % min(self.bk, k):
        raise ValueError(f"decode_persistent: K segment {k} not a multiple of bk={self.bk}")

  @property
  def x_tiles(self):
    return self.dim // self.bn_x

  @property
  def tile_counts(self):
    """Arrival counters per phase and layer: one per residual tile or w1|w3 tile."""
    return max(self.x_tiles, self.hidden // self.bn_ff)


def _spread(pid, nprog, n_units, fn):
  """fn(u) for the units u = pid, pid + nprog, ... < n_units of this program."""
  def body(r, c):
    u = pid + r * nprog

    @pl.when(u < n_units)
    def _():
      fn(u)
    return c
  lax.fori_loop(0, pl.cdiv(n_units, nprog), body, 0)


def _vload(ref, volatile=True):
  """A load of data other programs wrote in this kernel. ``volatile`` (``Plan.volatile``): never
  from a stale L1 line (jax 0.11.2 refuses every cache_modifier: it checks '.cg' against keys
  spelled 'cg'); else plain, relying on the acquire of the barrier / arrival atomic before it."""
  return plgpu.load(ref, volatile=volatile)


def _vsum(ref, n, idx, volatile=True):
  """sum_{i < n} ref[idx(i)] in order i = 0, 1, ...: with n a power of two one load of all n
  (idx(slice(None))), else n loads unrolled (Triton blocks are powers of two)."""
  if n & (n - 1) == 0:
    return jnp.sum(_vload(ref.at[idx(slice(None))], volatile), axis=0)
  def at(i):   # Python ints as arrays: the interpreter's load takes no plain int index
    return ref.at[tuple(_zero() + v if isinstance(v, int) else v for v in idx(i))]
  acc = _vload(at(0), volatile)
  for i in range(1, n):
    acc = acc + _vload(at(i), volatile)
  return acc


def _share(pid, nprog, n):
  """This program's contiguous share [lo, hi) of n units (shares differ by at most one unit)."""
  return pid * n // nprog, (pid + 1) * n // nprog


def _stream(lo, hi, nks, kseg, bk, rows, xload, w_ref, layer, col_sets, p_ref):
  """Units u in [lo, hi): (tile u // nks, K segment u % nks). ONE loop over all their K blocks:
  block i adds xload(K rows) @ w_ref[layer, K rows, cols] for each column slice in
  col_sets(tile) (one index: Triton's lowering takes no ``.at[layer]`` view indexed again), and
  the last block of a unit stores its float32 partials to p_ref[segment, :, cols] (a masked store,
  so the loop body has no branch and Triton pipelines its loads across unit boundaries)."""
  bk = min(bk, kseg)
  nb = kseg // bk
  n_sets = len(col_sets(0))

  def body(i, accs):
    u = lo + lax.div(i, nb)   # lax's div / rem: jnp's // and % on a dynamic-length loop's index
    b = lax.rem(i, nb)        # failed to lower (Triton: "i32 vs i1"); all of these are >= 0
    j, s = lax.div(u, nks), lax.rem(u, nks)
    ks = pl.ds(s * kseg + b * bk, bk)
    x = xload(ks)
    cols = col_sets(j)
    accs = tuple(a + jnp.dot(x, w_ref[layer, ks, c], preferred_element_type=F32)
                 for a, c in zip(accs, cols))
    last = b == nb - 1
    for a, c in zip(accs, cols):
      plgpu.store(p_ref.at[s, :, c], a, mask=jnp.full(a.shape, last))
    return tuple(jnp.where(last, 0.0, a) for a in accs)

  width = col_sets(0)[0].size
  lax.fori_loop(0, (hi - lo) * nb, body, (jnp.zeros((rows, width), F32),) * n_sets)


def _arrivals(lo, hi, nks, cnt_ref, base, fn):
  """After ``_stream``: adds this program's units of each tile it touched to the tile's arrival
  count (cnt_ref[base + tile]; acq_rel) and runs fn(tile) where that completes the tile's nks."""
  j0 = lo // nks
  n = jnp.where(hi > lo, (hi - 1) // nks - j0 + 1, 0)

  def body(t, c):
    j = j0 + t
    mine = jnp.minimum(hi, (j + 1) * nks) - jnp.maximum(lo, j * nks)

    @pl.when(plgpu.atomic_add(cnt_ref, (base + j,), mine) + mine == nks)
    def _():
      fn(j)
    return c
  lax.fori_loop(0, n, body, 0)


def _sync_threads(interpret):
  """The program's threads meet (the interpreter has no rule for it and runs one thread)."""
  if not interpret:
    plgpu.debug_barrier()


def grid_barrier(cnt_ref, target, max_spins, interpret=False):
  """Wait until cnt_ref[0] (this kernel's barrier arrivals so far) reaches ``target`` = programs x
  barriers passed, this program's arrival included. Returns 1 if it gave up after ``max_spins``
  polls, else 0. The thread barriers order the program's stores before its arrival and its later
  loads after the others'; the acq_rel atomics order them across programs."""
  _sync_threads(interpret)
  plgpu.atomic_add(cnt_ref, (_zero(),), _zero() + 1)

  def poll():   # an atomic read (+0: a bare constant operand breaks the interpreter's discharge)
    return plgpu.atomic_add(cnt_ref, (_zero(),), _zero() + 0)

  def cond(c):
    return (c[0] < target) & (c[1] < max_spins)

  v, _ = lax.while_loop(cond, lambda c: (poll(), c[1] + 1), (poll(), jnp.int32(0)))
  _sync_threads(interpret)
  return (v < target).astype(jnp.int32)


def _kernel(x0_ref, st0_ref, cnt0_ref, w_in_ref, wo_ref, w13_ref, w2_ref, an_ref, fn_ref, hn_ref,
            lb_ref, bnd_ref, start_ref,
            x_ref, st_ref, cnt_ref, to_ref, p_in_ref, o_ref, p_o_ref, p_ff_ref, m_ref, p_2_ref,
            ss_ref, *, plan, interpret, max_spins):
  del x0_ref, st0_ref, cnt0_ref   # aliased to x_ref, st_ref, cnt_ref
  P = plan
  R, D, F, H, HD = P.rows, P.dim, P.hidden, P.heads, P.head_dim
  pid = pl.program_id(0)   # read at the top level (the interpreter resolves it only there)
  sync_threads = functools.partial(_sync_threads, interpret)
  dt = w_in_ref.dtype
  vload = functools.partial(_vload, volatile=P.volatile)
  vsum = functools.partial(_vsum, volatile=P.volatile)
  n_tile_cnt = P.tile_counts

  def barrier(n, fails):
    return fails + grid_barrier(cnt_ref, P.nprog * n, max_spins, interpret)

  def x_cols(j):
    return (pl.ds(j * P.bn_x, P.bn_x),)

  def ab_cols(j):   # tile j's columns of w1 and of w3
    return pl.ds(j * P.bn_ff, P.bn_ff), pl.ds(F + j * P.bn_ff, P.bn_ff)

  def in_cols(j):
    return (pl.ds(j * P.bn_in, P.bn_in),)

  n_in = 0 if 1 in P.skip else (3 * D // P.bn_in) * (D // P.k_in)
  n_ff = 0 if 4 in P.skip else (F // P.bn_ff) * (D // P.k_ff)

  def rstd():
    ss = vsum(ss_ref, P.x_tiles, lambda t: (t, slice(None)))      # [R]
    return lax.rsqrt(ss / D + P.eps)[:, None]

  def normed(w_ref, layer, r):
    return lambda ks: (vload(x_ref.at[:, ks]) * r * w_ref[pl.ds(layer, 1), ks]).astype(dt)

  def plain(ref):
    return lambda ks: vload(ref.at[:, ks])

  def cnt_base(layer, slot):   # tile arrival counters of (layer, phase): slots 0 (3), 1 (4), 2 (5)
    return 1 + (layer * 3 + slot) * n_tile_cnt

  def residual_tile(j, p_ref, nks):
    """x tile j += bf16(sum of its partials in K order); the tile's sums of squares per row."""
    (cols,) = x_cols(j)
    y = vsum(p_ref, nks, lambda i: (i, slice(None), cols)).astype(dt).astype(F32)
    x = vload(x_ref.at[:, cols]) + y
    x_ref[:, cols] = x
    ss_ref[j, :] = jnp.sum(x * x, axis=1)

  def add_matmul(layer, phase, inp_ref, w_ref, p_ref, k, kseg):
    """Phases 3 and 5: x += inp @ w[layer], in (x tile, K segment) units; the last arriver of a
    tile adds (``residual_tile``)."""
    nks = k // kseg
    n_units = 0 if phase in P.skip else P.x_tiles * nks
    base = cnt_base(layer, {3: 0, 5: 2}[phase])
    lo, hi = _share(pid, P.nprog, n_units)
    _stream(lo, hi, nks, kseg, P.bk, R, plain(inp_ref), w_ref, layer, x_cols, p_ref)
    sync_threads()
    _arrivals(lo, hi, nks, cnt_ref, base, lambda j: residual_tile(j, p_ref, nks))

  def layer(l, fails):
    # 1. y = RMSNorm(x) @ [wq | wf | wv], split-K partials (phase 2 sums them)
    r = rstd()
    nks = D // P.k_in
    xl = normed(an_ref, l, r)

    lo, hi = _share(pid, P.nprog, n_in)
    _stream(lo, hi, nks, P.k_in, P.bk, R, xl, w_in_ref, l, in_cols, p_in_ref)
    fails = barrier(5 * l + 2, fails)

    # 2. attention per (row, head)
    def attn_unit(u):
      b, hh = u // H, u % H
      cols = pl.ds(hh * HD, HD)

      @pl.when(b < P.batch)
      def _():
        def part(off):
          cs = pl.ds(off + hh * HD, HD)
          return vsum(p_in_ref, D // P.k_in, lambda i: (i, b, cs)).astype(dt).astype(F32)
        o, st_ref[l, b, hh] = attention_step(
            part(0), part(D), part(2 * D), lb_ref[l, cols], hn_ref[l, cols], start_ref[b] != 0,
            bnd_ref[l, hh], st_ref[l, b, hh], eps=P.eps, dtype=dt)
        o_ref[b, cols] = o.astype(dt)

      @pl.when(b >= P.batch)
      def _():
        o_ref[b, cols] = jnp.zeros((HD,), dt)
    _spread(pid, P.nprog, 0 if 2 in P.skip else R * H, attn_unit)
    fails = barrier(5 * l + 3, fails)

    # 3. x += o @ wo
    add_matmul(l, 3, o_ref, wo_ref, p_o_ref, D, P.k_o)
    fails = barrier(5 * l + 4, fails)

    # 4. m = silu(a) b, a | b = RMSNorm(x) @ w1 | w3
    r = rstd()
    nks = D // P.k_ff
    xl = normed(fn_ref, l, r)


    def swiglu_tile(j):
      """m tile j = silu(a) b from the sums of its partials in K order."""
      ca, cb = ab_cols(j)
      a = vsum(p_ff_ref, nks, lambda i: (i, slice(None), ca)).astype(dt).astype(F32)
      bb = vsum(p_ff_ref, nks, lambda i: (i, slice(None), cb)).astype(dt).astype(F32)
      act = (a * jax.nn.sigmoid(a)).astype(dt).astype(F32)
      m_ref[:, pl.ds(j * P.bn_ff, P.bn_ff)] = (act * bb).astype(dt)

    lo, hi = _share(pid, P.nprog, n_ff)
    _stream(lo, hi, nks, P.k_ff, P.bk, R, xl, w13_ref, l, ab_cols, p_ff_ref)
    sync_threads()
    _arrivals(lo, hi, nks, cnt_ref, cnt_base(l, 1), swiglu_tile)
    fails = barrier(5 * l + 5, fails)

    # 5. x += m @ w2
    add_matmul(l, 5, m_ref, w2_ref, p_2_ref, F, P.k_2)
    return barrier(5 * l + 6, fails)

  # the sums of squares of the input x, then the layers
  def ss_unit(j):
    cols = pl.ds(j * P.bn_x, P.bn_x)
    x = vload(x_ref.at[:, cols])
    ss_ref[j, :] = jnp.sum(x * x, axis=1)
  _spread(pid, P.nprog, P.x_tiles, ss_unit)
  fails = barrier(1, jnp.int32(0))
  to_ref[pid] = lax.fori_loop(0, P.layers, layer, fails)


def make_plan(*, layers, batch, dim, hidden, heads, head_dim, eps, nprog):
  """The tiling for these sizes: K segments and column tiles no larger than the dimensions."""
  rows = max(16, 1 << (batch - 1).bit_length())
  return Plan(layers=layers, rows=rows, batch=batch, dim=dim, hidden=hidden, heads=heads,
              head_dim=head_dim, nprog=nprog, eps=eps, k_in=min(256, dim), k_o=min(256, dim),
              k_ff=min(256, dim), k_2=min(256, hidden), bk=min(128, dim))


@functools.partial(jax.jit, static_argnames=("plan", "interpret", "max_spins"))
def decode_layers(x, state, w_in, wo, w13, w2, attn_norm, ffn_norm, head_norm, lb, boundary,
                  start, *, plan, interpret=False, max_spins=MAX_SPINS):
  """Every layer of one decode token. x [B, d] float32 input; state [L, B, H, D, D] float32;
  w_in [L, d, 3d] (wq | wf | wv), wo [L, d, d], w13 [L, d, 2 hidden] (w1 | w3), w2 [L, hidden, d]
  in the compute dtype; attn_norm, ffn_norm, head_norm, lb [L, d] float32; boundary [L, H]
  (log decay at a row start); start [B] bool. Returns (x after the last layer [B, d] float32,
  new state, barrier timeouts (int32; nonzero = the programs were not all resident: the results
  are then wrong))."""
  P = plan
  b = x.shape[0]
  pad = P.rows - b
  xp = jnp.pad(x.astype(F32), ((0, pad), (0, 0)))
  startp = jnp.pad(start.astype(jnp.int32), (0, pad))
  n_cnt = 1 + P.layers * 3 * P.tile_counts
  cnt = jnp.zeros((n_cnt,), jnp.int32)
  R, D, F = P.rows, P.dim, P.hidden
  scratch = [
      jax.ShapeDtypeStruct((D // P.k_in, R, 3 * D), F32),   # phase 1 partials
      jax.ShapeDtypeStruct((R, D), w_in.dtype),             # o
      jax.ShapeDtypeStruct((D // P.k_o, R, D), F32),        # phase 3 partials
      jax.ShapeDtypeStruct((D // P.k_ff, R, 2 * F), F32),   # phase 4 partials
      jax.ShapeDtypeStruct((R, F), w_in.dtype),             # silu(a) b
      jax.ShapeDtypeStruct((F // P.k_2, R, D), F32),        # phase 5 partials
      jax.ShapeDtypeStruct((P.x_tiles, R), F32),            # per-tile sums of squares
  ]
  out_shape = [jax.ShapeDtypeStruct(xp.shape, F32), jax.ShapeDtypeStruct(state.shape, F32),
               jax.ShapeDtypeStruct(cnt.shape, jnp.int32),
               jax.ShapeDtypeStruct((P.nprog,), jnp.int32)] + scratch
  args = (xp, state.astype(F32), cnt, w_in, wo, w13, w2, attn_norm.astype(F32),
          ffn_norm.astype(F32), head_norm.astype(F32), lb.astype(F32), boundary.astype(F32),
          startp)
  whole = lambda s: pl.BlockSpec(s.shape, lambda i, n=len(s.shape): (0,) * n)  # noqa: E731
  outs = pl.pallas_call(
      functools.partial(_kernel, plan=P, interpret=interpret, max_spins=max_spins),
      grid=(P.nprog,), in_specs=[whole(a) for a in args], out_specs=[whole(s) for s in out_shape],
      out_shape=out_shape, input_output_aliases={0: 0, 1: 1, 2: 2}, interpret=interpret,
      compiler_params=plgpu.CompilerParams(num_warps=P.num_warps, num_stages=P.num_stages),
      name="lasad_decode_persistent")(*args)
  return outs[0][:b], outs[1], jnp.sum(outs[3])
