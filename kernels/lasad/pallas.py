"""LASAD operator as Pallas GPU kernels (Triton backend), forward and backward under custom_vjp.

Reads top to bottom: block sizes, the in-kernel row mask, the five kernels, then the public
``lasad_pallas`` that pads, dispatches and defines the VJP. The chunked math is the one in
README.md; here every kernel works on one (batch, head) and chunks of C = 64 tokens (32 in the
backward) split into sub-chunks of c = 32 (or 16):

  _fused_kernel    grid (B, H, V/bv): the forward in one pass (default): walks the chunks in
                   order with the state on chip, writes o and the final state.
  _states_kernel   grid (B, H, V/bv): walks the chunks in order and writes the state entering
                   each chunk, S_n [B, H, N, K, V] float32, and the final state (the backward's
                   recompute; the two-pass forward; segment ends for the one-pass forward's split).
  _output_kernel   grid (B, N, H): one chunk; a c-token recurrence from S_n over its C/c
                   sub-chunks (every exponent <= 0) plus the exact pairwise term inside each
                   sub-chunk; writes o (the two-pass forward, BlockSizes(fused_forward=False)).
  _dstates_kernel  grid (B, H, V/bv): walks the chunks backwards and writes dS_n, the gradient
                   of the state leaving each chunk, and d initial_state.
  _grads_kernel    grid (B, N, H): one chunk; dq, dk, dv, dg (zero on row starts) and the
                   per-chunk sum of the boundary gradient.

The row mask is applied inside every kernel from ``width``/``prefix`` (int32 per example) and
``boundary`` (float32 per head): nothing mask-shaped is written to HBM. A reset (boundary -inf)
never enters an exponent: it is a segment id, so decays across it are exactly 0.

The backward recomputes S_n instead of saving it (memory O(T) in activations, like fla), unless
``BlockSizes.save_states`` has the one-pass forward kernel write them (opt-in: 2x the output's
memory). Nothing of size T x T exists: the largest temporaries are [C, K] tiles.

Backend: Triton lowering of plain ``pl.pallas_call`` (see README.md for why not Mosaic GPU yet).
The same kernel bodies run under ``interpret=True`` on CPU, which is how CI tests them.
"""

import contextlib
import contextvars
import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.ad_checkpoint import checkpoint_name
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from kernels.lasad.reference import GATE_FLOOR

F32 = jnp.float32
CUMSUM_MODES = ("auto", "scan", "dot")   # BlockSizes.cumsum
FUSED_BWD_MIN_BH = 512   # BlockSizes.fused_backward=None: the fused backward from this B*H on


# BlockSizes.fused_maxnreg / bwd_maxnreg (and scripts/kernel_ir.py --maxnreg): registers per thread
MAXNREG_RANGE = range(24, 256)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  chunk: int = 64        # C: tokens per chunk (one program of the parallel kernels)
  # c: sub-chunk of the exact pairwise term (16 = the smallest tensor-core tile; 16 or 32). 32
  # (default since session 5) halves the sequential steps: at (256, 256, 16, 64) on the H100 the
  # gradient kernel fell 6.1 -> 3.9 ms and fwd+bwd 6.8 -> 4.6 ms
  # (benchmarks/results/ops_parts_h100_b256_sub32.log), LASADGen-L's training step 558 -> 517 ms,
  # and it passed tests/test_gpu.py's bf16-vs-fp64 oracle on the H100 as 16 does. Its price: a
  # sub-chunk whose log decay reaches -fast_limit (more likely over 32 tokens) takes the slower
  # exact column loop.
  sub: int = 32
  # V columns per program of the two sequential kernels; None: the largest of 64/32/16 that
  # still gives >= 2 programs per SM (B*H*V/bv >= 264), so small B*H with long T keeps the GPU busy.
  block_v_scan: int | None = None
  num_warps: int = 4
  num_stages: int = 2
  # The gradient kernel's warps. None: 4 when a gradient program is one sub-chunk (the default
  # 32-token backward: 3.27 -> 2.40 ms at (256, 256, 16, 64), 1.74 -> 1.38 at (32, 1024) against
  # 8 warps, ops_parts_h100_s8_*_bwd.log), else 8 (with 64-token chunks of 16-token sub-chunks
  # 8 warps took it 6.72 -> 6.03 and 6.77 -> 6.29 ms in two H100 runs).
  grads_num_warps: int | None = None
  # Exact within-sub-chunk term. "auto": tensor-core factorisation e^{b_t} e^{-b_s} (b relative to
  # the sub-chunk start) when the sub-chunk's total log decay is > -fast_limit on every channel,
  # so no factor exceeds e^fast_limit; else the column loop. "loop" walks the c key columns;
  # "bcast" forms the [c, c, K] pairwise tile at once. (Dropping the fallback and its lax.cond
  # made the kernels no faster on the H100, session 8.)
  diag: str = "auto"
  fast_limit: float = 60.0
  # bf16 inputs: float32 operands of the diagonal dots (q e^{b}, k e^{-b}, score tiles) and of
  # the backward's state dots (S, dS) are split into hi + lo bf16 parts, 2-3 tensor-core passes
  # to ~16 mantissa bits (dropping lo*lo). False rounds them to bf16: one pass, but o 3.3e-3 and
  # dg 2.1e-2 vs float64 on the H100, where fla chunk_gla has 2.4e-3 (BENCHMARKS.md).
  split_dots: bool = True
  # Sequence split of the two sequential kernels (states, state gradients): S segments of T/S
  # run as separate programs from zero states, then a scan over the S segment ends and one fix-up
  # pass over the per-chunk states (XLA) add what enters each segment. For small B*H with long T,
  # where B*H*V/bv programs leave SMs idle. Used when S divides T/chunk and T is a multiple of the
  # chunk (else 1). None (default): see ``_segments`` (for B*H < 132, the H100's SMs, the
  # smallest power of two S with B*H*S >= 512 and >= 8 chunks per segment; else 1). Session 5's
  # S = 4 took fwd / fwd+bwd at (8, 4096, 16, 64) on the H100 1.04 / 3.10 -> 0.90 / 2.65 ms, at
  # (2, 16384, 16, 64) 1.14 / 3.39 -> 1.08 / 3.26 (benchmarks/results/ops_h100_s5.json).
  seq_split: int | None = None
  # Forward in one pass: ``_fused_kernel`` walks the chunks of a (batch, head, V block) keeping
  # the state on chip and writes o, so the per-chunk states never go to HBM (the two-launch form
  # writes and re-reads S_n [B, H, N, K, V] float32: twice the bytes of q, k, v, g, o at D = 64).
  # With a sequence split, a states pass over the segments (segment ends only) and an XLA scan
  # over them give each segment's incoming state first. The backward is unchanged. Its split
  # (``seq_split`` None) is its own: none for B*H >= 512, else the smallest power of two S with
  # B*H*S >= 1024 and >= 4 chunks per segment. H100, forward ms two-pass -> one-pass (session 7,
  # benchmarks/results/ops_h100_s7_fused.json): (32, 256) 0.28 -> 0.23, (32, 1024) 0.73 -> 0.52,
  # (8, 4096) 0.83 -> 0.63 (S = 8; S = 4: 0.68), (2, 16384) 1.03 -> 1.05 (S = 8; S = 4: 1.86).
  fused_forward: bool = True
  fused_num_warps: int | None = None    # the one-pass kernel's warps (None: num_warps)
  # The one-pass kernel loops over sub-chunks and loads the next one's q, k, v, g while it
  # computes the current one (a manual two-stage pipeline: the loads pass through float32
  # gate math before any dot, which Triton's pipeliner does not cover). H100 (session 8,
  # benchmarks/results/ops_parts_h100_s8_*.log), kernel ms without -> with: (32, 1024) 0.450 ->
  # 0.452, (8, 4096) 0.597 -> 0.581, (256, 256) 0.917 -> 0.850, (2, 16384) 0.704 -> 0.634.
  fused_prefetch: bool = True
  # Chunk of the backward's kernels; None: 32 when sub = 32 (and 32 divides chunk), else chunk.
  # 32 with sub = 32: each gradient program is one sub-chunk, so it carries no per-sub-chunk
  # state and far fewer live values (the kernels are register-bound: Nsight Compute,
  # BENCHMARKS.md). H100 (session 8,
  # ops_parts_h100_s8_*_c32.log): gradient kernel 3.94 -> 3.38 ms at (256, 256, 16, 64) and
  # 2.30 -> 1.89 at (32, 1024, 16, 64); the state scans write twice the per-chunk states.
  bwd_chunk: int | None = None
  # Sequence split of the backward's two sequential kernels (its chunks are ``bwd_chunk``);
  # None: ``seq_split`` if given, else the automatic rule of ``_segments``.
  bwd_seq_split: int | None = None
  # How the kernels form cumulative sums over a block's rows (the gate's log decays, the
  # gradient kernel's dg): "scan", Triton's associative scan (shuffles and shared memory across
  # the rows' threads); "dot", a tensor-core product with a 0/1 triangular matrix on the float32
  # rows split exactly into three bf16 parts (hi + mid + lo carry all 24 mantissa bits); "auto"
  # (default), dots in the gradient kernel and scans elsewhere. H100, session 10
  # (benchmarks/results/ops_parts_h100_s10_*.log), scan -> dot, ms per launch at (32, 1024, 16, 64)
  # / (256, 256, 16, 64): gradient kernel 1.255 -> 1.214 / 2.352 -> 2.175; one-pass forward
  # 0.374 -> 0.458 / 0.625 -> 0.688; state gradients 0.383 -> 0.408 / 0.637 -> 0.679.
  cumsum: str = "auto"
  # With the gates in the kernels and a named output norm (``hgrn2_pallas(norm_eps=...,
  # norm_save=name)``, LASADGen's training path): the one-pass forward kernel also writes the
  # state entering each chunk ([B, H, T/chunk, K, V] float32, named ``name`` for remat), so the
  # backward's states kernel does not run; with 32-token backward chunks the gradient kernel's
  # odd chunks advance the saved state through the chunk before (``_advance``). Only where
  # neither pass splits the sequence. Memory: 2x the bf16 output at K = V = 64 (every 32-token
  # state, 4x, put LASADGen-L's training at batch 256 out of memory on an H100, session 23).
  # Opt-in: on an H100 (session 24) L at batch 256 is still out of memory, and at batch 192 the
  # step is no faster (265.0 vs 263.9 ms, +4.3 GiB).
  save_states: bool = False
  # The backward as one kernel per (batch, head) (``_bwd_fused_kernel``): a forward walk over the
  # sub-chunks carrying S gives dq, a backward walk carrying dS gives dk, dv, dg, so the states
  # and state-gradient kernels do not run and no per-chunk state goes through HBM (the unfused
  # form writes and reads S_n and dS_n, [B, H, T/32, K, V] float32 each: at K = V = 64 4x the
  # bytes of q). Only V whole per program and no sequence split. None (default): for
  # B*H >= FUSED_BWD_MIN_BH with K, V <= 64 and split dots, where the other form would not
  # split; not with the forward's saved states. dg is the sum of q dq - k dk over all later rows
  # of a segment (the unfused form restarts each chunk from float32 S_out dS_out), so without
  # split dots the rounded S and dS cost dg 3.4x the unfused form's error (T = 384,
  # tests/test_ops.py); with them it is within 1.2x.
  fused_backward: bool | None = None
  # The fused backward's walks load the next sub-chunk's rows before computing the current one
  # (as ``fused_prefetch`` in the forward). H100, session 25 (ops_parts_h100_s25_bwd.log),
  # whole operator fwd+bwd ms without -> with: (256, 256, 16, 64) 2.625 -> 2.224, (32, 1024)
  # 1.351 -> 1.159.
  bwd_prefetch: bool = True
  # The next three options move work into the fused kernel. On 32-row steps each made
  # LASADGen-L's step slower (session 26, train_L_s26_bwd_options.log; 334.9 / 334.0 ms without),
  # as each added to that kernel's register spills (scripts/kernel_ir.py --regs: 376 stack bytes
  # without them). On 16-row steps (bwd_sub below) the kernel spills 16 bytes with or without
  # them, and bwd_dq_raw and bwd_norm made the step faster (session 28,
  # train_h100_L_s28_flags_*.json, two alternating runs each: 32-row steps without either 333.2 /
  # 332.1 ms; 16-row 328.8 / 328.5; + bwd_dq_raw 328.3 / 326.4; + bwd_norm 323.9 / 324.1, 40.5%
  # MFU), so those two are on. The next call, these defaults against session 26's: 321.4 / 321.2
  # vs 329.7 / 329.9 ms (40.8% vs 39.8% MFU; train_h100_L_s28_defaults_*.json).
  # With prefetch, the backward walk's q dq rows (the first walk's float32 scratch) are loaded a
  # step ahead too (32-row steps, with the two below: 352.5 / 352.5 ms; 704 stack bytes). On
  # 16-row steps no faster: 324.6 / 325.0 vs 327.2 / 325.0 ms (session 28,
  # train_h100_L_s28_qdq_*.json), so off.
  bwd_prefetch_qdq: bool = False
  # With the gates in the kernel: the first walk applies silu's derivative to dq and writes the
  # gradient of q_raw, so XLA's pass over dq after the backward (3.2 ms per LASADGen-L step)
  # goes.
  bwd_dq_raw: bool = True
  # With HGRN2's output norm (``hgrn2_pallas(norm_eps=...)``): the fused backward reads the
  # normalised output n, its inverse rms r and the incoming gradient dn, and forms the
  # attention's do = r (dn - n sum(dn n) / V) per row itself (rounded to the input dtype, as
  # XLA's pass does), so XLA's pass over dn and n that writes do (~3.1 ms per LASADGen-L step on
  # an H100, BENCHMARKS.md session 22) goes.
  bwd_norm: bool = True
  # Rows per step of the fused backward's walks (16 or 32); None: ``sub``. Its own so the
  # forward keeps 32. The fused kernel at 32 rows uses all 255 registers and spills (Nsight
  # Compute, session 26: 2 programs of 4 warps per SM, 24M local-memory requests per launch);
  # 16-row steps hold half the tiles: 16 stack bytes instead of 376, also with the options
  # above (scripts/kernel_ir.py --regs). H100: the whole operator fwd+bwd at (256, 256, 16, 64)
  # with sub = 16 everywhere 2.179 vs 2.279 ms (session 26, ops_parts_h100_s26_bwd.log);
  # LASADGen-L's step 328.8 / 328.5 vs 333.2 / 332.1 ms (session 28, options above off).
  bwd_sub: int | None = 16
  # Registers per thread for the one-pass forward / the fused backward (PTX ``.maxnreg``, set as
  # the kernel module's ``ttg.maxnreg`` through ``_maxnreg_hook``); None: the compiler's choice.
  # At 4 warps both take all 255, so an SM holds 2 programs though their shared memory (20 / 26
  # KB) would allow 8; 168 allows 3, 128 four, at the price of spills (scripts/kernel_ir.py
  # --regs --block-sizes fused_maxnreg=168: at (32, 1024, 16, 64) 272 stack bytes forward, 360
  # backward). Experimental: it reaches into Pallas Triton's lowering, a private JAX API;
  # compiled GPU kernels only (the interpreter ignores it). H100, device time (session 29,
  # benchmarks/kernel_variants.py, BENCHMARKS.md): every cap and 8 warps, with or without
  # 16-row forward steps, slower than the defaults, by 10-100% (168: forward 238 -> 339 us at
  # (32, 1024, 16, 64), fused backward 919 -> 1360 us), so all stay off.
  fused_maxnreg: int | None = None
  bwd_maxnreg: int | None = None

  def __post_init__(self):
    if self.sub not in (16, 32) or self.chunk % self.sub:
      raise ValueError(f"BlockSizes: sub must be 16 or 32 and divide chunk, got sub={self.sub}, "
                       f"chunk={self.chunk}")
    if self.bwd_sub is not None and (self.bwd_sub not in (16, 32) or self.chunk % self.bwd_sub):
      raise ValueError(f"BlockSizes: bwd_sub must be None, 16 or 32 and divide chunk, got "
                       f"bwd_sub={self.bwd_sub}, chunk={self.chunk}")
    if self.bwd_chunk is not None and (self.bwd_chunk % self.sub or self.chunk % self.bwd_chunk):
      raise ValueError(f"BlockSizes: bwd_chunk must be a multiple of sub and divide chunk, got "
                       f"bwd_chunk={self.bwd_chunk}, sub={self.sub}, chunk={self.chunk}")
    if self.cumsum not in CUMSUM_MODES:
      raise ValueError(f"BlockSizes: cumsum must be one of {CUMSUM_MODES}, got {self.cumsum!r}")
    if self.diag not in ("auto", "loop", "bcast"):
      raise ValueError(f"BlockSizes: diag must be auto, loop or bcast, got {self.diag!r}")
    for name in ("fused_maxnreg", "bwd_maxnreg"):
      val = getattr(self, name)
      if val is not None and (not isinstance(val, int) or val not in MAXNREG_RANGE):
        raise ValueError(f"BlockSizes: {name} must be None or registers per thread in "
                         f"{MAXNREG_RANGE.start}..{MAXNREG_RANGE.stop - 1}, got {val!r}")
    for name in ("seq_split", "bwd_seq_split"):
      val = getattr(self, name)
      if val is not None and (not isinstance(val, int) or val < 1):
        raise ValueError(f"BlockSizes: {name} must be None (auto) or an int >= 1, got {val!r}")


def _grads_warps(bs):
  """Warps of the gradient kernel; ``bs`` holds the backward's chunk."""
  if bs.grads_num_warps is not None:
    return bs.grads_num_warps
  return 4 if bs.chunk == bs.sub else 8


def _cumsum(bs, grads=False):
  """The row cumulative sums of one kernel (BlockSizes.cumsum; "auto": dots in the gradient
  kernel only)."""
  if bs.cumsum != "auto":
    return bs.cumsum
  return "dot" if grads else "scan"


def _bwd_blocks(bs):
  """The block sizes the backward runs with: its chunk and its sequence split."""
  split = bs.seq_split if bs.bwd_seq_split is None else bs.bwd_seq_split
  return dataclasses.replace(bs, chunk=_bwd_chunk(bs), bwd_chunk=None, seq_split=split,
                             bwd_seq_split=None)


def _bwd_chunk(bs):
  if bs.bwd_chunk is not None:
    return bs.bwd_chunk
  return 32 if bs.sub == 32 and bs.chunk % 32 == 0 else bs.chunk


# --------------------------------------------------------------------------- shared pieces
def _dot(a, b, trans_a=False, trans_b=False):
  """a @ b with float32 accumulation; float32 operands use full-precision (IEEE) dots."""
  prec = lax.Precision.HIGHEST if a.dtype == F32 else None
  dims = (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ()))
  return lax.dot_general(a, b, dims, precision=prec, preferred_element_type=F32)


def _hi_lo(x):
  hi = x.astype(jnp.bfloat16)
  return hi, (x - hi.astype(F32)).astype(jnp.bfloat16)


def _sdot(a, b, dtype, split, **kw):
  """a @ b, float32 accumulation. With bf16 inputs and ``split``, float32 operands enter as hi + lo
  bf16 parts (bf16 operands are exact as they are): hi*hi + hi*lo + lo*hi. Plain bf16 dots only,
  so the CPU interpreter computes exactly what the GPU does. (One TF32 dot instead measured no
  faster on the H100 and cost dg 1.5x, session 8.)"""
  if dtype == F32 or not split:
    return _dot(_mx(a, dtype), _mx(b, dtype), **kw)
  pa = (a,) if a.dtype == jnp.bfloat16 else _hi_lo(a)
  pb = (b,) if b.dtype == jnp.bfloat16 else _hi_lo(b)
  out = _dot(pa[0], pb[0], **kw)
  if len(pb) == 2:
    out = out + _dot(pa[0], pb[1], **kw)
  if len(pa) == 2:
    out = out + _dot(pa[1], pb[0], **kw)
  return out


LOG2E = 1.4426950408889634


_GPU_EXP = contextvars.ContextVar("lasad_gpu_exp", default=False)
_CUMSUM = contextvars.ContextVar("lasad_cumsum", default="scan")


def _exp(x):
  """e^y for x = y log2(e), float32: the kernels keep log decays in base 2 (``_gate`` scales
  them), so each exponential is one exp2. Compiled for the GPU (``_pallas_call`` with interpret
  off) it is the bare ``ex2.approx.ftz.f32`` instruction (relative error ~2^-22; results below
  2^-126 flush to 0, decays of e^-87 that change nothing here): libdevice's expf spent ~6 extra
  instructions per call on argument reduction, and its exp2f 3 on subnormal handling (Nsight
  Compute, session 9: most of the one-pass kernel's FFMA, FSETP and predicated FMUL). The
  interpreter uses jnp.exp2."""
  return _approx("ex2", x, jnp.exp2)


def _approx(instr, x, interpreted):
  """float32 x through the one PTX instruction ``<instr>.approx.ftz.f32`` when compiled for the
  GPU; ``interpreted(x)`` in the interpreter."""
  if not _GPU_EXP.get():
    return interpreted(x)
  [y] = plgpu.elementwise_inline_asm(
      f"{instr}.approx.ftz.f32 $0, $1;", args=[x], constraints="=f,f", pack=1,
      result_shape_dtypes=[jax.ShapeDtypeStruct(x.shape, F32)])
  return y


_MAXNREG_SUFFIX = "_maxnreg"


def _maxnreg_hook():
  """Wraps Pallas Triton's ``lower_jaxpr_to_triton_module`` (once) so that a kernel named
  ``<name>_maxnreg<N>`` gets the module attribute ``ttg.maxnreg = N``, which Triton's lowering to
  LLVM turns into the PTX ``.maxnreg N`` directive (``BlockSizes.fused_maxnreg`` /
  ``bwd_maxnreg``). The name carries N, so each pallas_call keeps its own cap through jit
  caching."""
  try:
    from jax._src.pallas.triton import lowering as tl
    from jax._src.lib.mlir import ir
    orig = tl.lower_jaxpr_to_triton_module
  except (ImportError, AttributeError) as e:
    raise RuntimeError("BlockSizes.fused_maxnreg / bwd_maxnreg need Pallas Triton's "
                       "jax._src.pallas.triton.lowering.lower_jaxpr_to_triton_module (jax 0.11), "
                       f"not found in jax {jax.__version__}: leave them None") from e
  if getattr(orig, "_lasad_maxnreg", False):
    return

  def lower(jaxpr, *args, **kwargs):
    result = orig(jaxpr, *args, **kwargs)
    name = jaxpr.debug_info.func_name if jaxpr.debug_info is not None else ""
    head, sep, n = name.rpartition(_MAXNREG_SUFFIX)
    if sep and head and n.isdigit():
      op = result.module.operation
      with op.context:
        op.attributes["ttg.maxnreg"] = ir.IntegerAttr.get(ir.IntegerType.get_signless(32), int(n))
    return result
  lower._lasad_maxnreg = True
  tl.lower_jaxpr_to_triton_module = lower


def _pallas_call(kernel, *, interpret, head_axis, cumsum="scan", maxnreg=None, **kw):
  """``pl.pallas_call`` whose kernel body is traced with the GPU exponential of ``_exp`` unless
  it runs in the interpreter, and with ``cumsum`` (BlockSizes.cumsum) for ``_cumsum_rows``.

  Under ``_gated(lb)`` (the gate in the kernel) the padded lower bounds lb [Hp, K] go in as one
  more input, whole, and the body reads its head's row (grid axis ``head_axis``) for the row
  loaders ``_tq``, ``_tkg``, ``_tk`` and ``_tg2``. ``maxnreg``: the compiled kernel's registers
  per thread (``_maxnreg_hook``)."""
  if maxnreg is not None and not interpret:
    _maxnreg_hook()
    kw = dict(kw, name=f"{kw['name']}{_MAXNREG_SUFFIX}{maxnreg}")
  lb = _GATE_LB.get()
  n_in = len(kw["in_specs"])
  body = kernel
  if lb is not None:
    kw = dict(kw, in_specs=list(kw["in_specs"]) + [pl.BlockSpec(lb.shape, lambda *ids: (0, 0))])

    def body(*refs):
      # read at the kernel's top level (the interpreter resolves program_id only there)
      token = _LB.set(refs[n_in][pl.ds(pl.program_id(head_axis), 1), :])
      try:
        kernel(*refs[:n_in], *refs[n_in + 1:])
      finally:
        _LB.reset(token)
  call = pl.pallas_call(body, interpret=interpret, **kw)

  def run(*args):
    tokens = _GPU_EXP.set(not interpret), _CUMSUM.set(cumsum)
    try:
      return call(*args, *(() if lb is None else (lb,)))
    finally:
      _GPU_EXP.reset(tokens[0])
      _CUMSUM.reset(tokens[1])
  return run


@contextlib.contextmanager
def _gated(lb):
  """Kernels called inside run the HGRN2 gate on their q / k / g inputs (``_tq``...)."""
  token = _GATE_LB.set(lb)
  try:
    yield
  finally:
    _GATE_LB.reset(token)


def _tri_dot(x, upper):
  """Row prefix sums (or with ``upper`` suffix sums) of float32 x [r, n] as tensor-core dots:
  x = hi + mid + lo exactly in bf16 parts, each multiplied by the 0/1 triangular [r, r] matrix
  with float32 accumulation, smallest part first."""
  r = x.shape[0]
  t_i = lax.broadcasted_iota(jnp.int32, (r, r), 0)
  s_i = lax.broadcasted_iota(jnp.int32, (r, r), 1)
  return _exact_mask_dot(((s_i >= t_i) if upper else (s_i <= t_i)), x)


def _exact_mask_dot(mask, x):
  """mask [r, r] (bool) @ float32 x [r, n] on tensor cores, exact to float32 accumulation: x as
  hi + mid + lo bf16 parts (all 24 mantissa bits), smallest part first."""
  m = mask.astype(jnp.bfloat16)
  hi = x.astype(jnp.bfloat16)
  rem = x - hi.astype(F32)
  mid = rem.astype(jnp.bfloat16)
  lo = (rem - mid.astype(F32)).astype(jnp.bfloat16)
  return (_dot(m, lo) + _dot(m, mid)) + _dot(m, hi)


def _cumsum_rows(x):
  """Inclusive cumulative sum over the rows of float32 x [r, n] (see BlockSizes.cumsum)."""
  if _CUMSUM.get() == "dot":
    return _tri_dot(x, upper=False)
  return jnp.cumsum(x, axis=0)


def _suffix_sum_rows(x, total):
  """sum_{t' >= t} x[t'] over the rows of float32 x [r, n]; ``total`` [1, n] is the caller's
  sum over all rows (the scan form is total - cumsum + x)."""
  if _CUMSUM.get() == "dot":
    return _tri_dot(x, upper=True)
  return total - jnp.cumsum(x, axis=0) + x


def _gate(g2, pos, seq_len, width, prefix, bnd):
  """Row mask inside the kernel. g2 [r, K] f32 log decay in base 2 (``_tg2``), pos [r] int32
  global positions.

  Returns (finite log decay [r, K] in base 2, i.e. times log2(e): exponentiate with ``_exp``;
  reset [r] bool; row_start [r] bool).
  """
  rel = pos - prefix
  safe_w = jnp.maximum(width, 1)
  start = (width > 0) & (rel >= safe_w) & (lax.rem(rel, safe_w) == 0) & (pos < seq_len)
  is_reset = bnd == -jnp.inf
  b_fin = jnp.where(is_reset, 0.0, bnd)
  gf = jnp.where(start[:, None], b_fin * LOG2E, g2)
  return gf, start & is_reset, start


# In-kernel HGRN2 gate (below): the lower bounds [Hp, K] while kernels are built under _gated,
# and inside a kernel body its head's row [1, K] float32 (None: q, k, g are given).
_GATE_LB = contextvars.ContextVar("lasad_gate_lb_array", default=None)
_LB = contextvars.ContextVar("lasad_gate_lb", default=None)


def _sigmoid(x):
  return _rcp(1.0 + _exp(-x * LOG2E))


def _rcp(x):
  """1 / x, float32: the bare ``rcp.approx.ftz.f32`` compiled (IEEE division is a dozen
  instructions), exact division interpreted."""
  return _approx("rcp", x, lambda x: 1.0 / x)


def _log2(x):
  """log2 of float32 x > 0: the bare ``lg2.approx.ftz.f32`` compiled, jnp.log2 interpreted."""
  return _approx("lg2", x, jnp.log2)


# Rows as loaded -> the operator's q, k and base-2 log decay. With the gate in the kernel
# (``hgrn2_pallas``) the refs hold the projections q_raw and f (in the k and g slots) and the
# HGRN2 math of ``reference.hgrn2_gates`` runs here: q = silu(q_raw), s = sigmoid(f),
# k = (1 - lb)(1 - s), g = log(lb + (1 - lb) s); q and k rounded to the input dtype as the model
# rounds them.
def _tq(x):
  if _LB.get() is None:
    return x
  xf = x.astype(F32)
  return (xf * _sigmoid(xf)).astype(x.dtype)


_GATE_FLOOR = GATE_FLOOR   # the forget gate's clamp before its log, as reference.hgrn2_gates


def _forget(f, lb):
  """s = sigmoid(f) and the clamped forget gate max(lb + (1 - lb) s, 1e-30) of float32 rows f:
  what ``_tkg`` (forward) and ``_gate_grads`` (its derivative) both start from."""
  s = _sigmoid(f)
  return s, jnp.maximum(s + lb * (1.0 - s), _GATE_FLOOR)


def _tkg(k, g):
  """(k, base-2 log decay) of rows loaded together; with the gate in the kernel both come from
  the f rows in ``k`` (g holds the same rows, unread) and share one sigmoid."""
  lb = _LB.get()
  if lb is None:
    return k, g.astype(F32) * LOG2E
  s, gate = _forget(k.astype(F32), lb)
  return ((1.0 - lb) * (1.0 - s)).astype(k.dtype), _log2(gate)


def _tk(x):
  """k of rows loaded alone (the unused log decay is dead code to the compiler)."""
  return _tkg(x, x)[0]


def _tg2(x):
  """Base-2 log decay of rows loaded alone."""
  return _tkg(x, x)[1]


def _gate_grads(f, dk, dg):
  """The gradient kernel's epilogue with the gate in the kernel: the chain rule through the
  forget-gate half of ``reference.hgrn2_gates`` for rows of f (as loaded) and float32 dk, dg (the
  natural-log gate's gradient). Returns (d f, d lb summed over the rows [1, K]): XLA's two passes
  over dk and a float32 dg go. With u = dg / gate - dk (gate = lb + (1 - lb) s, s = sigmoid(f);
  the 1e-30 clamp passes no gradient): d f = (1 - lb) s (1 - s) u, d lb = (1 - s) u.
  (d q_raw = dq silu'(q_raw) here too made the kernel 0.6 ms slower per call at LASADGen-L's
  training shape, more than XLA's pass takes; BENCHMARKS.md session 13.)"""
  lb = _LB.get()
  s, gate = _forget(f.astype(F32), lb)
  u = jnp.where(gate > _GATE_FLOOR, dg * _rcp(gate), 0.0) - dk
  return (1.0 - lb) * s * (1.0 - s) * u, jnp.sum((1.0 - s) * u, axis=0, keepdims=True)


def _decays(gf, rs):
  """Per block of rows, from ``_gate``'s (gf, reset): the log decay since the block start b [r, K]
  (inclusive cumulative sum), the segment id seg [r] (resets so far), the block's total log decay
  tot [K] and its number of resets."""
  rs_i = rs.astype(jnp.int32)
  return _cumsum_rows(gf), jnp.cumsum(rs_i), jnp.sum(gf, axis=0), jnp.sum(rs_i)


def _scalars(w_ref, p_ref, bd_ref):
  return w_ref[0], p_ref[0], bd_ref[0]


def _start(ref, rows_ref, cols_ref):
  """A walk's starting [K, V] state: ``ref``'s block, or zeros where the call has none (no initial
  state / no final-state gradient: no memset and no read of a zero array)."""
  if ref is None:
    return jnp.zeros((rows_ref.shape[-1], cols_ref.shape[-1]), F32)
  return ref[...].astype(F32)


def _put(ref, x):
  """Store x where the call has the output (an unwanted final state / initial-state gradient has
  none)."""
  if ref is not None:
    ref[...] = x


def _mx(x, dtype):
  """Operand dtype for tensor-core dots: the input dtype (bf16) or float32."""
  return x.astype(dtype)


# --------------------------------------------------------------------------- forward kernels
def _states_kernel(k_ref, v_ref, g_ref, w_ref, p_ref, bd_ref, h0_ref, s_ref, ht_ref, *dec_ref,
                   chunk, n_chunks, seq_len, dtype):
  """``dec_ref`` (only with a sequence split): each chunk's state decay e^{tot} (0 after a reset).
  ``s_ref`` None: only the last state (and decays) are written."""
  width, prefix, bnd = _scalars(w_ref, p_ref, bd_ref)
  pos0 = jnp.arange(chunk, dtype=jnp.int32)

  def body(n, s):
    if s_ref is not None:
      s_ref[n] = s
    rows = pl.ds(n * chunk, chunk)
    s, decay = _state_step(k_ref[rows, :], v_ref[rows, :], g_ref[rows, :], s, n * chunk + pos0,
                           (seq_len, width, prefix, bnd), dtype)
    if dec_ref:
      dec_ref[0][pl.ds(n, 1), :] = decay[None, :]
    return s

  _put(ht_ref, lax.fori_loop(0, n_chunks, body, _start(h0_ref, k_ref, v_ref)))


def _state_step(k, v, g, s, pos, gate_args, dtype):
  """The state s entering a chunk -> (the state leaving it, the chunk's decay [K]), from its rows
  k, v, g as loaded and their positions pos."""
  (k, g2) = _tkg(k, g)
  gf, rs, _ = _gate(g2, pos, *gate_args)
  b, seg, tot, seg_end = _decays(gf, rs)
  kd = k.astype(F32) * _exp(tot[None, :] - b) * (seg == seg_end)[:, None]
  decay = _exp(tot) * (seg_end == 0)
  return decay[:, None] * s + _dot(_mx(kd, dtype), v, trans_a=True), decay


def _gate_row(g_ref, idx, pos, seq_len, width, prefix, bnd):
  """Masked gate of one row: ([1, K] finite log decay, int32 reset flag)."""
  gf, rs, _ = _gate(_tg2(g_ref[pl.ds(idx, 1), :]), jnp.full((1,), pos, jnp.int32),
                    seq_len, width, prefix, bnd)
  return gf, jnp.sum(rs.astype(jnp.int32))


def _diag_out(q, k_ref, v_ref, g_ref, b, seg, base, pos0, gate_args):
  """Exact within-sub-chunk term sum_{s<=t} (q_t . k_s e^{b_t - b_s}) v_s (unscaled).

  Walks the key column s with a running gate sum b_s (row loads, no cross-thread reductions
  to pick a row out of a register tile).
  """
  sub = q.shape[0]
  rows = lax.broadcasted_iota(jnp.int32, (sub,), 0)

  def col(s, carry):
    o, bs, segs = carry
    gs, rs = _gate_row(g_ref, base + s, pos0 + s, *gate_args)
    bs, segs = bs + gs, segs + rs
    ks = _tk(k_ref[pl.ds(base + s, 1), :]).astype(F32)
    vs = v_ref[pl.ds(base + s, 1), :].astype(F32)
    ok = (rows >= s) & (seg == segs)
    e = jnp.where(ok[:, None], _exp(jnp.minimum(b - bs, 0.0)), 0.0)
    a = jnp.sum(q * ks * e, axis=1, keepdims=True)
    return o + a * vs, bs, segs

  init = (jnp.zeros((sub, v_ref.shape[-1]), F32), jnp.zeros((1, q.shape[-1]), F32), jnp.int32(0))
  return lax.fori_loop(0, sub, col, init)[0]


def _pairwise(b, seg):
  """[c, c, K] exp(b_t - b_s) for s <= t in the same segment, else 0 (all exponents <= 0)."""
  ok = _causal_same_seg(seg)
  diff = jnp.minimum(b[:, None, :] - b[None, :, :], 0.0)
  return jnp.where(ok[:, :, None], _exp(diff), 0.0), ok


def _causal_same_seg(seg):
  """[c, c] mask: key s <= query t and no reset between them."""
  c = seg.shape[0]
  t_i = lax.broadcasted_iota(jnp.int32, (c, c), 0)
  s_i = lax.broadcasted_iota(jnp.int32, (c, c), 1)
  return (s_i <= t_i) & (seg[:, None] == seg[None, :])


def _load_rows(refs, base, sub):
  rows = pl.ds(base, sub)
  return tuple(r[rows] if len(r.shape) == 1 else r[rows, :] for r in refs)


def _sub_chunk(q_ref, k_ref, v_ref, g_ref, s, base, pos0, gate_args, *, sub, dtype, diag,
               fast_limit, split, update, loaded=None):
  """One sub-chunk of ``sub`` rows starting at row ``base`` of the refs (global position
  ``pos0``), entered with state ``s`` [K, V] float32: (unscaled o [sub, V], the state leaving it,
  or None without ``update``). ``loaded``: its q, k, v, g rows, if already loaded."""
  if loaded is None:
    loaded = _load_rows((q_ref, k_ref, v_ref, g_ref), base, sub)
  q, k, v, g = loaded
  q, (k, g2) = _tq(q).astype(F32), _tkg(k, g)
  pos = pos0 + jnp.arange(sub, dtype=jnp.int32)
  gf, rs, _ = _gate(g2, pos, *gate_args)
  b, seg, tot, seg_end = _decays(gf, rs)   # b: log decay since the previous sub-chunk's end
  eb = _exp(b)
  o = _dot(_mx(q * eb * (seg == 0)[:, None], dtype), _mx(s, dtype))
  loop = functools.partial(_diag_out, q, k_ref, v_ref, g_ref, b, seg, base, pos0, gate_args)
  if diag == "bcast":
    e, _ = _pairwise(b, seg)
    a = jnp.sum(q[:, None, :] * k.astype(F32)[None, :, :] * e, axis=2)
    o = o + _dot(_mx(a, dtype), v)
  elif diag == "loop":
    o = o + loop()
  else:
    def fast():
      a = _sdot(q * eb, k.astype(F32) * _exp(-b), dtype, split, trans_b=True)
      return _sdot(jnp.where(_causal_same_seg(seg), a, 0.0), v, dtype, split)
    o = o + lax.cond(jnp.min(tot) > -fast_limit * LOG2E, fast, loop)
  if not update:
    return o, None
  kd = k.astype(F32) * _exp(tot[None, :] - b) * (seg == seg_end)[:, None]
  return o, (_exp(tot) * (seg_end == 0))[:, None] * s + _dot(_mx(kd, dtype), v, trans_a=True)


def _output_kernel(q_ref, k_ref, v_ref, g_ref, w_ref, p_ref, bd_ref, s_ref, o_ref, *,
                   chunk, sub, seq_len, scale, **kw):
  n = pl.program_id(1)
  gate_args = (seq_len,) + _scalars(w_ref, p_ref, bd_ref)
  s = s_ref[...]
  for i in range(chunk // sub):
    o, s = _sub_chunk(q_ref, k_ref, v_ref, g_ref, s, i * sub, n * chunk + i * sub, gate_args,
                      sub=sub, update=i + 1 < chunk // sub, **kw)
    o_ref[pl.ds(i * sub, sub), :] = (scale * o).astype(o_ref.dtype)


def _store_out(o_ref, r_ref, rows, o, norm):
  """o (float32 [sub, V]) into o_ref's rows; with ``norm`` = (eps, dv) o / rms(o) instead (each
  row over its first dv columns, the rest being padding zeros) and the inverse rms into r_ref."""
  if norm is None:
    o_ref[rows, :] = o.astype(o_ref.dtype)
    return
  eps, dv = norm
  r = lax.rsqrt(jnp.sum(o * o, axis=1) / dv + eps)
  o_ref[rows, :] = (o * r[:, None]).astype(o_ref.dtype)
  r_ref[rows] = r


def _fused_kernel(q_ref, k_ref, v_ref, g_ref, w_ref, p_ref, bd_ref, h0_ref, o_ref, ht_ref, *extra,
                  chunk, sub, n_chunks, seq_len, scale, prefetch=False, norm=None, save=False,
                  **kw):
  """The forward in one pass over a whole (segment of a) sequence: the state stays on chip.
  ``prefetch``: loop over sub-chunks, loading the next one's rows before computing this one.
  ``norm``: (eps, dv) to write each row's RMS-normalised output and its inverse RMS (r_ref), when
  the program holds whole rows (V not split into blocks). ``save``: write the state entering
  each chunk into st_ref [T/chunk, K, bv], what the backward's states kernel would recompute."""
  r_ref = extra[0] if norm is not None else None
  st_ref = extra[-1] if save else None
  gate_args = (seq_len,) + _scalars(w_ref, p_ref, bd_ref)

  def keep(j, s):   # the state s entering sub-chunk j (traced), if j starts a chunk
    if st_ref is None:
      return
    m = chunk // sub
    if m == 1:
      st_ref[j] = s
      return

    # lax.rem/div, not % and //: jnp's forms lower for Triton with an i1 divisor (jax 0.11.2)
    @pl.when(lax.rem(j, jnp.int32(m)) == 0)
    def _():
      st_ref[lax.div(j, jnp.int32(m))] = s
  if prefetch:
    refs, n_sub = (q_ref, k_ref, v_ref, g_ref), n_chunks * chunk // sub

    def step(j, carry):
      s, cur = carry
      keep(j, s)
      nxt = _load_rows(refs, jnp.minimum(j + 1, n_sub - 1) * sub, sub)
      o, s = _sub_chunk(*refs, s, j * sub, j * sub, gate_args, sub=sub, update=True,
                        loaded=cur, **kw)
      _store_out(o_ref, r_ref, pl.ds(j * sub, sub), scale * o, norm)
      return s, nxt

    init = (_start(h0_ref, k_ref, v_ref), _load_rows(refs, 0, sub))
    _put(ht_ref, lax.fori_loop(0, n_sub, step, init)[0])
    return

  def body(n, s):
    if st_ref is not None:
      st_ref[n] = s
    for i in range(chunk // sub):
      base = n * chunk + i * sub
      o, s = _sub_chunk(q_ref, k_ref, v_ref, g_ref, s, base, base, gate_args, sub=sub,
                        update=True, **kw)
      _store_out(o_ref, r_ref, pl.ds(base, sub), scale * o, norm)
    return s

  _put(ht_ref, lax.fori_loop(0, n_chunks, body, _start(h0_ref, k_ref, v_ref)))


# --------------------------------------------------------------------------- backward kernels
def _dstates_kernel(q_ref, do_ref, g_ref, w_ref, p_ref, bd_ref, dht_ref, ds_ref, dh0_ref, *,
                    chunk, n_chunks, seq_len, scale, dtype):
  width, prefix, bnd = _scalars(w_ref, p_ref, bd_ref)
  pos0 = jnp.arange(chunk, dtype=jnp.int32)

  def body(i, ds):
    n = n_chunks - 1 - i
    ds_ref[n] = ds
    rows = pl.ds(n * chunk, chunk)
    q, do = _tq(q_ref[rows, :]).astype(F32), do_ref[rows, :]
    gf, rs, _ = _gate(_tg2(g_ref[rows, :]), n * chunk + pos0, seq_len, width, prefix, bnd)
    b, seg, tot, seg_end = _decays(gf, rs)
    qh = scale * q * _exp(b) * (seg == 0)[:, None]
    decay = _exp(tot) * (seg_end == 0)
    return decay[:, None] * ds + _dot(_mx(qh, dtype), do, trans_a=True)

  _put(dh0_ref, lax.fori_loop(0, n_chunks, body, _start(dht_ref, q_ref, do_ref)))


def _advance(k_ref, v_ref, g_ref, s, n, gate_args, dtype):
  """The state s entering chunk n - 1 (of k_ref's rows) -> the state entering chunk n: the
  states kernel's step (``_state_step``) for one chunk."""
  chunk = k_ref.shape[0]
  return _state_step(k_ref[...], v_ref[...], g_ref[...], s,
                     (n - 1) * chunk + jnp.arange(chunk, dtype=jnp.int32), gate_args, dtype)[0]


def _bwd_load(k_ref, g_ref, row0, pos0, sub, gate_args, raw=None):
  """The ``sub`` rows from ref row ``row0`` (global position ``pos0``) of a backward kernel: k after
  the gate (float32), the masked gate's log decays (``_decays``: b, seg, tot as [1, K] and
  [K, 1], nres) and the row-start / reset flags. ``raw``: those k and g rows, if loaded."""
  rows = pl.ds(row0, sub)
  k, g2 = _tkg(*(raw or (k_ref[rows, :], g_ref[rows, :])))
  gf, rs, start = _gate(g2, pos0 + lax.broadcasted_iota(jnp.int32, (sub,), 0), *gate_args)
  b, seg, tot, nres = _decays(gf, rs)
  return dict(rows=rows, b=b, seg=seg, start=start, reset=rs, tot=tot[None, :], nres=nres,
              tot_col=tot[:, None], k=k.astype(F32))


def _dg_rows(x, dgt, dk, dbnd, dlb, k_ref, dg_ref):
  """A backward kernel's rows x (``_bwd_load``) from their dg~: the boundary gradient takes the
  row starts that are not resets, dg is 0 on row starts and is stored, or with the gate in the
  kernel goes through ``_gate_grads`` (dk becomes d f, and d lb is summed). Returns (dk, dbnd,
  dlb)."""
  dbnd = dbnd + jnp.sum(jnp.where((x["start"] & ~x["reset"])[:, None], dgt, 0.0), axis=0,
                        keepdims=True)
  dg = jnp.where(x["start"][:, None], 0.0, dgt)
  if _LB.get() is not None:   # dk slot: d f; dg slot: d lb
    dk, dlb_rows = _gate_grads(k_ref[x["rows"], :], dk, dg)
    return dk, dbnd, dlb + dlb_rows
  dg_ref[x["rows"], :] = dg.astype(dg_ref.dtype)
  return dk, dbnd, dlb


def _diag_grads(x, q, k, v, do, dq, dk, dv, k_ref, v_ref, g_ref, row0, pos0, gate_args, *, scale,
                dtype, diag, fast_limit, split, want_q=True, want_kv=True):
  """The exact within-sub-chunk term's gradients added to dq (``want_q``) and to dk, dv
  (``want_kv``): x is the sub-chunk's ``_bwd_load``, q, k, v, do its float32 rows (q and k after
  the gate), starting at ref row ``row0`` and global position ``pos0``. Same three forms as the
  forward (BlockSizes.diag); exponents relative to the sub-chunk start, all <= 0."""
  sub = q.shape[0]
  rows_i = lax.broadcasted_iota(jnp.int32, (sub,), 0)

  def mm(a, b, **kw):
    return _dot(_mx(a, dtype), _mx(b, dtype), **kw)

  def sm(a, b, **kw):
    return _sdot(a, b, dtype, split, **kw)

  if diag == "bcast":
    e, ok = _pairwise(x["b"], x["seg"])
    da = jnp.where(ok, scale * mm(do, v, trans_b=True), 0.0)
    if want_q:
      dq = dq + jnp.sum(da[:, :, None] * k[None, :, :] * e, axis=1)
    if want_kv:
      a = jnp.sum(q[:, None, :] * k[None, :, :] * e, axis=2)                  # [c, c]
      dk = dk + jnp.sum(da[:, :, None] * q[:, None, :] * e, axis=0)
      dv = dv + scale * mm(a, do, trans_a=True)
    return dq, dk, dv

  def col(s, carry):
    dq, dk, dv, bs, segs = carry
    gs, rs = _gate_row(g_ref, row0 + s, pos0 + s, *gate_args)
    bs, segs = bs + gs, segs + rs
    ks = _tk(k_ref[pl.ds(row0 + s, 1), :]).astype(F32)
    vs = v_ref[pl.ds(row0 + s, 1), :].astype(F32)
    ok = (rows_i >= s) & (x["seg"] == segs)
    e = jnp.where(ok[:, None], _exp(jnp.minimum(x["b"] - bs, 0.0)), 0.0)
    da = jnp.where(ok[:, None], scale * jnp.sum(do * vs, axis=1, keepdims=True), 0.0)
    if want_q:
      dq = dq + da * ks * e
    if want_kv:
      a = jnp.sum(q * ks * e, axis=1, keepdims=True)                          # A[:, s]
      sel = (rows_i == s)[:, None]
      dk = dk + jnp.where(sel, jnp.sum(da * q * e, axis=0, keepdims=True), 0.0)
      dv = dv + jnp.where(sel, scale * jnp.sum(a * do, axis=0, keepdims=True), 0.0)
    return dq, dk, dv, bs, segs

  def loop(dq, dk, dv):
    init = (dq, dk, dv, jnp.zeros((1, q.shape[-1]), F32), jnp.int32(0))
    return lax.fori_loop(0, sub, col, init)[:3]

  def fast(dq, dk, dv):
    ok = _causal_same_seg(x["seg"])
    eb, enb = _exp(x["b"]), _exp(-x["b"])
    qt, kt = q * eb, k * enb
    da = jnp.where(ok, scale * mm(do, v, trans_b=True), 0.0)  # exact products of inputs
    if want_q:
      dq = dq + sm(da, kt) * eb
    if want_kv:
      a = jnp.where(ok, sm(qt, kt, trans_b=True), 0.0)
      dk = dk + sm(da, qt, trans_a=True) * enb
      dv = dv + scale * sm(a, do.astype(dtype), trans_a=True)
    return dq, dk, dv

  if diag == "loop":
    return loop(dq, dk, dv)
  return lax.cond(jnp.min(x["tot"]) > -fast_limit * LOG2E, fast, loop, dq, dk, dv)


def _grads_kernel(q_ref, k_ref, v_ref, g_ref, do_ref, w_ref, p_ref, bd_ref, s_ref, ds_ref, *refs,
                  chunk, sub, seq_len, scale, dtype, diag, fast_limit, split, advance=False):
  """One chunk, in two passes over its sub-chunks, each carrying one [K, V] state (with
  ``advance`` s_ref holds the state entering the pair of chunks, and an odd chunk first advances
  it through the chunk before, whose k, v, g rows come as three more inputs):

  forward:  P_i (state entering sub-chunk i, from S_in) gives the inter part of dq;
  backward: dP_{i+1} (gradient of the state leaving sub-chunk i, from dS_out) gives the inter
            parts of dk, dv; then the exact diagonal term, and dg~ as the reverse cumulative sum
            of q dq - k dk (+ sum_v S_out dS_out at the chunk end).
  Exponents are relative to the sub-chunk start (b) or end (tot - b): all <= 0.
  """
  if advance:
    pk_ref, pv_ref, pg_ref, *refs = refs
  dq_ref, dk_ref, dv_ref, dg_ref, dbnd_ref = refs
  n = pl.program_id(1)
  width, prefix, bnd = _scalars(w_ref, p_ref, bd_ref)
  gate_args = (seq_len, width, prefix, bnd)
  nsub = chunk // sub

  def mm(a, b, **kw):  # tensor-core operands in the input dtype (bf16), float32 accumulation
    return _dot(_mx(a, dtype), _mx(b, dtype), **kw)

  def sm(a, b, **kw):  # state and diagonal dots: float32 operands split (see _sdot)
    return _sdot(a, b, dtype, split, **kw)

  def load(i):
    return _bwd_load(k_ref, g_ref, i * sub, n * chunk + i * sub, sub, gate_args)

  # Forward pass: inter part of dq; P ends as S_out.
  p_state = s_ref[...]
  if advance:
    p_state = lax.cond(lax.rem(n, jnp.int32(2)) == 1,
                       lambda s: _advance(pk_ref, pv_ref, pg_ref, s, n, gate_args, dtype),
                       lambda s: s, p_state)
  dq_inter = []
  for i in range(nsub):
    x = load(i)
    do, k, v = do_ref[x["rows"], :], x["k"], v_ref[x["rows"], :]
    e_in = _exp(x["b"]) * (x["seg"] == 0)[:, None]
    dq_inter.append(scale * sm(do.astype(dtype), p_state, trans_b=True) * e_in)
    e_out = _exp(x["tot"] - x["b"]) * (x["seg"] == x["nres"])[:, None]
    p_state = _exp(x["tot_col"]) * (x["nres"] == 0) * p_state + sm(k * e_out, v.astype(dtype), trans_a=True)

  d_state = ds_ref[...]
  later = jnp.sum(p_state * d_state, axis=1)[None, :]      # d b_C from S_out
  dbnd = jnp.zeros((1, q_ref.shape[-1]), F32)
  gated = _LB.get() is not None
  dlb = jnp.zeros((1, q_ref.shape[-1]), F32)
  for i in reversed(range(nsub)):
    x = load(i)
    rows = x["rows"]
    q, k = _tq(q_ref[rows, :]).astype(F32), x["k"]
    v, do = v_ref[rows, :].astype(F32), do_ref[rows, :].astype(F32)
    e_out = _exp(x["tot"] - x["b"]) * (x["seg"] == x["nres"])[:, None]
    dk = sm(v.astype(dtype), d_state, trans_b=True) * e_out
    dv = mm(k * e_out, d_state)
    dq, dk, dv = _diag_grads(x, q, k, v, do, dq_inter[i], dk, dv, k_ref, v_ref, g_ref,
                             i * sub, n * chunk + i * sub, gate_args, scale=scale, dtype=dtype,
                             diag=diag, fast_limit=fast_limit, split=split)
    db = q * dq - k * dk
    tot_db = jnp.sum(db, axis=0, keepdims=True)
    dgt = later + _suffix_sum_rows(db, tot_db)                            # sum over t' >= t
    later = later + tot_db
    dk, dbnd, dlb = _dg_rows(x, dgt, dk, dbnd, dlb, k_ref, dg_ref)
    dq_ref[rows, :] = dq.astype(dq_ref.dtype)
    dk_ref[rows, :] = dk.astype(dk_ref.dtype)
    dv_ref[rows, :] = dv.astype(dv_ref.dtype)
    if i:
      q_hat = scale * q * _exp(x["b"]) * (x["seg"] == 0)[:, None]
      d_state = _exp(x["tot_col"]) * (x["nres"] == 0) * d_state + sm(q_hat, do.astype(dtype), trans_a=True)
  dbnd_ref[...] = dbnd
  if gated:
    dg_ref[...] = dlb


def _barrier():
  """A barrier of the program's threads (compiled only; the interpreter runs one thread). Its
  memory ordering makes one thread's global stores visible to the others' later loads."""
  if _GPU_EXP.get():
    plgpu.debug_barrier()


def _seg_suffix_rows(x, seg):
  """sum_{t' >= t, same segment} x[t'] over the rows of float32 x [r, n], seg [r] the segment ids
  (``_decays``): ``_exact_mask_dot`` with that 0/1 [r, r] matrix."""
  r = x.shape[0]
  t_i = lax.broadcasted_iota(jnp.int32, (r, r), 0)
  s_i = lax.broadcasted_iota(jnp.int32, (r, r), 1)
  return _exact_mask_dot((s_i >= t_i) & (seg[None, :] == seg[:, None]), x)


def _bwd_fused_kernel(q_ref, k_ref, v_ref, g_ref, do_ref, w_ref, p_ref, bd_ref, h0_ref, dht_ref,
                      *refs, sub, n_sub, seq_len, scale, dtype, diag, fast_limit, split,
                      prefetch=False, prefetch_qdq=False, dq_raw=False, norm_dv=None):
  """The whole backward of one (batch, head) in two walks over its sub-chunks, each carrying one
  [K, V] state on chip, so no per-chunk state goes through HBM (``BlockSizes.fused_backward``):

  forward walk:  S (from h0) gives dq, inter (do S^T) and diagonal parts, written out, and
                 q dq (float32) into qdq_ref for the second walk;
  backward walk: dS (from dht) gives dk, dv, inter and diagonal parts; dg~ is the reverse
                 cumulative sum of q dq - k dk within each segment plus, for the last segment of
                 a sub-chunk, ``later``: d of the decay at the next sub-chunk's first row, i.e.
                 that row's dg~ unless it is a reset (sum_v S_T dht at the sequence end).
  Rows as ``_grads_kernel``'s, one sub-chunk at a time; d lb (gate in the kernel) and d boundary
  summed over the sequence, dh0 = dS after the walk. ``prefetch``: each step loads the next
  sub-chunk's rows (and with ``prefetch_qdq`` in the backward walk its q dq) before computing its
  own (as the one-pass forward's ``prefetch``). ``dq_raw`` (with the gate in the kernel): dq_ref
  gets the gradient of q_raw, dq silu'(q_raw), so no XLA pass over dq follows. ``norm_dv``
  (``BlockSizes.bwd_norm``): do_ref holds the gradient dn of the normalised output, and two more
  inputs n [T, V] and its inverse rms r [T] give do = r (dn - n sum(dn n) / norm_dv) per row."""
  if norm_dv is not None:
    n_ref, r_ref, *refs = refs
  dq_ref, dk_ref, dv_ref, dg_ref, dbnd_ref, dh0_ref, qdq_ref = refs
  width, prefix, bnd = _scalars(w_ref, p_ref, bd_ref)
  gate_args = (seq_len, width, prefix, bnd)
  gated = _LB.get() is not None
  kdim = q_ref.shape[-1]

  def sm(a, b, **kw):  # state and diagonal dots: float32 operands split (see _sdot)
    return _sdot(a, b, dtype, split, **kw)

  refs = (q_ref, k_ref, v_ref, g_ref, do_ref)
  if norm_dv is not None:
    refs += (n_ref, r_ref)
  n_rows = len(refs)   # raw[n_rows]: the backward walk's prefetched q dq

  def rows_of(j, raw):
    q, k, v, g, do = raw[:5]
    x = _bwd_load(k_ref, g_ref, j * sub, j * sub, sub, gate_args, raw=(k, g))
    if norm_dv is None:
      return x, _tq(q).astype(F32), v.astype(F32), do.astype(F32)
    # the output norm's gradient (rounded to the input dtype, as _norm_rows_bwd's)
    do = _norm_grad(do.astype(F32), raw[5].astype(F32), raw[6][:, None], norm_dv).astype(dtype)
    return x, _tq(q).astype(F32), v.astype(F32), do.astype(F32)

  def walk(body, init, order, refs):
    """fori_loop over the sub-chunks j = order(i); ``body`` gets the rows of ``refs``, loaded one
    step ahead with prefetch."""
    def raw_rows(j):   # clamped: the last step's prefetch reloads its own rows
      return _load_rows(refs, jnp.clip(j, 0, n_sub - 1) * sub, sub)
    if not prefetch:
      return lax.fori_loop(0, n_sub, lambda i, c: body(order(i), raw_rows(order(i)), c), init)

    def step(i, carry):
      c, cur = carry
      nxt = raw_rows(order(i + 1))
      return body(order(i), cur, c), nxt
    return lax.fori_loop(0, n_sub, step, (init, raw_rows(order(0))))[0]

  diag_kw = dict(scale=scale, dtype=dtype, diag=diag, fast_limit=fast_limit, split=split)

  def fwd(j, raw, s):
    x, q, v, do = rows_of(j, raw)
    k = x["k"]
    e_in = _exp(x["b"]) * (x["seg"] == 0)[:, None]
    dq = scale * sm(do.astype(dtype), s, trans_b=True) * e_in
    dq = _diag_grads(x, q, k, v, do, dq, None, None, k_ref, v_ref, g_ref, j * sub, j * sub,
                     gate_args, want_kv=False, **diag_kw)[0]
    if dq_raw:   # silu'(x) = s (1 + x (1 - s)), s = sigmoid(x)
      xr = raw[0].astype(F32)
      sg = _sigmoid(xr)
      dq_ref[x["rows"], :] = (dq * sg * (1.0 + xr * (1.0 - sg))).astype(dq_ref.dtype)
    else:
      dq_ref[x["rows"], :] = dq.astype(dq_ref.dtype)
    qdq_ref[x["rows"], :] = q * dq
    e_out = _exp(x["tot"] - x["b"]) * (x["seg"] == x["nres"])[:, None]
    return (_exp(x["tot_col"]) * (x["nres"] == 0) * s
            + sm(k * e_out, v.astype(dtype), trans_a=True))

  s_end = walk(fwd, _start(h0_ref, k_ref, v_ref), lambda i: i, refs)
  d_end = _start(dht_ref, k_ref, v_ref)
  _barrier()   # qdq_ref's stores before the second walk's loads of them

  def bwd(j, raw, carry):
    ds, later, dbnd, dlb = carry
    x, q, v, do = rows_of(j, raw)
    k, rows = x["k"], x["rows"]
    e_out = _exp(x["tot"] - x["b"]) * (x["seg"] == x["nres"])[:, None]
    dk = sm(v.astype(dtype), ds, trans_b=True) * e_out
    dv = _dot(_mx(k * e_out, dtype), _mx(ds, dtype))
    _, dk, dv = _diag_grads(x, q, k, v, do, None, dk, dv, k_ref, v_ref, g_ref, j * sub, j * sub,
                            gate_args, want_q=False, **diag_kw)
    db = (raw[n_rows] if prefetch_qdq else qdq_ref[rows, :]) - k * dk
    last = (x["seg"] == x["nres"])[:, None]
    dgt = _seg_suffix_rows(db, x["seg"]) + jnp.where(last, later, 0.0)
    # d of the decay at this sub-chunk's first row: what the sub-chunk before adds to its rows
    # of the last segment (0 if the first row is a reset: seg counts it)
    later = (jnp.sum(jnp.where((x["seg"] == 0)[:, None], db, 0.0), axis=0, keepdims=True)
             + jnp.where(x["nres"] == 0, later, 0.0))
    dk, dbnd, dlb = _dg_rows(x, dgt, dk, dbnd, dlb, k_ref, dg_ref)
    dk_ref[rows, :] = dk.astype(dk_ref.dtype)
    dv_ref[rows, :] = dv.astype(dv_ref.dtype)
    q_hat = scale * q * _exp(x["b"]) * (x["seg"] == 0)[:, None]
    ds = (_exp(x["tot_col"]) * (x["nres"] == 0) * ds
          + sm(q_hat, do.astype(dtype), trans_a=True))
    return ds, later, dbnd, dlb

  zero = jnp.zeros((1, kdim), F32)
  later = jnp.sum(s_end * d_end, axis=1)[None, :]
  ds, _, dbnd, dlb = walk(bwd, (d_end, later, zero, zero), lambda i: n_sub - 1 - i,
                          refs + ((qdq_ref,) if prefetch_qdq else ()))
  _put(dh0_ref, ds)
  dbnd_ref[...] = dbnd
  if gated:
    dg_ref[...] = dlb


# --------------------------------------------------------------------------- pallas_calls
def _scalar_specs(order, width, prefix, bnd):
  """BlockSpecs for width and prefix ([B], or [1] for all rows) and boundary ([H], or [1] for all
  heads); ``order`` maps grid ids -> (b, h). A [1] array is read at index 0 by every program, so
  a scalar argument needs no broadcast kernel before the call."""
  def spec(x, axis):
    if x.shape[0] == 1:
      return pl.BlockSpec((1,), lambda *ids: (0,))
    return pl.BlockSpec((1,), lambda *ids: (order(*ids)[axis],))
  return [spec(width, 0), spec(prefix, 0), spec(bnd, 1)]


def _optional_refs(kernel, present):
  """``kernel(*refs)`` with None in place of each of its leading refs that ``present`` marks
  False: inputs and outputs a call leaves out (a zero initial state, an unwanted final state
  or initial-state gradient)."""
  if all(present):
    return kernel

  def body(*refs):
    it = iter(refs)
    kernel(*[next(it) if p else None for p in present], *it)
  return body


def _block_v(bs, bh, dv):
  if bs.block_v_scan is not None:
    return min(bs.block_v_scan, dv)
  for bv in (64, 32):
    if bv <= dv and bh * (dv // bv) >= 264:
      return bv
  return min(16, dv)


def _walk_specs(t, dk, bv):
  """BlockSpecs of the kernels that walk a whole sequence, grid (B, H, V/bv): a [T, K] input,
  a [T, bv] V block, a [K, bv] state."""
  return (pl.BlockSpec((None, t, None, dk), lambda i, j, kv: (i, 0, j, 0)),
          pl.BlockSpec((None, t, None, bv), lambda i, j, kv: (i, 0, j, kv)),
          pl.BlockSpec((None, None, dk, bv), lambda i, j, kv: (i, j, 0, kv)))


def _params(bs, num_warps=None):
  return plgpu.CompilerParams(num_warps=num_warps or bs.num_warps, num_stages=bs.num_stages)


def _scan_call(kernel, name, x, y, g, width, prefix, bnd, init, *, bs, interpret, decay=False,
               per_chunk=True, last=True):
  """The two sequential kernels: grid (B, H, V/bv); inputs x, g [B, T, H, K] whole, y [B, T, H, V]
  in V blocks, init [B, H, K, V] (None: zeros, read from no array); outputs per-chunk states
  [B, H, N, K, V] (not with ``per_chunk=False``: then None) and the last state (not with
  ``last=False``: None) (and with ``decay`` each chunk's decay [B, H, N, K], from the first V
  block)."""
  b, t, h, dk = x.shape
  dv = y.shape[-1]
  n = t // bs.chunk
  bv = _block_v(bs, b * h, dv)
  nv = dv // bv
  seq_k, seq_v, state = _walk_specs(t, dk, bv)
  per = (pl.BlockSpec((None, None, n, dk, bv), lambda i, j, kv: (i, j, 0, 0, kv)),
         jax.ShapeDtypeStruct((b, h, n, dk, dv), F32))
  end = (state, jax.ShapeDtypeStruct((b, h, dk, dv), F32))
  kept = [o for o, want in ((per, per_chunk), (end, last)) if want]
  out_specs, out_shape = [o[0] for o in kept], [o[1] for o in kept]
  body = _optional_refs(functools.partial(kernel, chunk=bs.chunk, n_chunks=n),
                        (True,) * 6 + (init is not None, per_chunk, last))
  if decay:   # one copy per V block (each program writes its own; identical values)
    out_specs.append(pl.BlockSpec((None, None, None, n, dk), lambda i, j, kv: (i, j, kv, 0, 0)))
    out_shape.append(jax.ShapeDtypeStruct((b, h, nv, n, dk), F32))
  out = _pallas_call(
      body, grid=(b, h, nv),
      in_specs=[seq_k, seq_v, seq_k] + _scalar_specs(lambda i, j, kv: (i, j), width, prefix, bnd)
      + ([] if init is None else [state]),
      out_specs=out_specs, out_shape=out_shape,
      compiler_params=_params(bs), interpret=interpret, cumsum=_cumsum(bs), name=name,
      head_axis=1,
  )(x, y, g, width, prefix, bnd, *(() if init is None else (init,)))
  out = list(out)
  if not per_chunk:
    out.insert(0, None)
  if not last:
    out.insert(1, None)
  return (out[0], out[1], out[2][:, :, 0]) if decay else tuple(out)


def _segments(bs, t, seq_len, bh):
  """Sequence split of the two sequential kernels: ``bs.seq_split``, or (None) for B*H = ``bh`` <
  132 the smallest power of two S with bh*S >= 512 keeping >= 8 chunks per segment (else 1);
  only where S divides the chunks and T needs no padding. H100, forward+backward ms with the
  backward's S = 4 (the rule before session 9) -> 16 at (2, 16384, 16, 64): 3.01 -> 2.36
  (S = 32: 2.33, 8: 2.46); at (8, 4096, 16, 64), S = 1 / 4 / 8 / 16: 2.32 / 2.39 / 2.29 / 2.38
  (benchmarks/results/ops_h100_s9_bwd_split.json)."""
  n = t // bs.chunk
  s = bs.seq_split
  if s is None:
    s = 1
    while bh < 132 and bh * s < 512 and n % (2 * s) == 0 and n // (2 * s) >= 8:
      s *= 2
  return s if s > 1 and n % s == 0 and seq_len == t else 1


def _fused_segments(bs, t, seq_len, bh):
  """Sequence split of the one-pass forward: ``bs.seq_split``, or (None) 1 for B*H = ``bh`` >= 512,
  else the smallest power of two S with bh*S >= 1024 keeping >= 4 chunks per segment; only where
  S divides the chunks and T needs no padding."""
  n = t // bs.chunk
  s = bs.seq_split
  if s is None:
    s = 1
    while bh < 512 and bh * s < 1024 and n % (2 * s) == 0 and n // (2 * s) >= 4:
      s *= 2
  return s if s > 1 and n % s == 0 and seq_len == t else 1


def _split_inputs(s, width, prefix, *xs):
  """[B, T, ...] -> [B*S, T/S, ...] segments, with per-segment width / prefix (a segment's local
  position p is global position s*T/S + p, so its prefix is prefix - s*T/S)."""
  b, t = xs[0].shape[:2]
  seg = t // s
  shaped = [x.reshape((b * s, seg) + x.shape[2:]) for x in xs]
  width, prefix = jnp.broadcast_to(width, (b,)), jnp.broadcast_to(prefix, (b,))
  w = jnp.repeat(width, s)
  p = (prefix[:, None] - seg * jnp.arange(s, dtype=jnp.int32)[None, :]).reshape(-1)
  return shaped, w, p


def _chunk_states(k, v, g, width, prefix, bnd, h0, *, seq_len, bs, interpret, last=True):
  return _chunk_states_dec(k, v, g, width, prefix, bnd, h0, seq_len=seq_len, bs=bs,
                           interpret=interpret, last=last)[:2]


def _chunk_states_dec(k, v, g, width, prefix, bnd, h0, *, seq_len, bs, interpret, last=True):
  """(states [B, H, N, K, V], final state (None with ``last=False``, where the kernel then does
  not write it), chunk decays [B, H, N, K] or None without a split).

  With a sequence split of S: the states kernel runs on B*S segments from zero states (S times
  the programs), then a scan over the S segment ends (tiny, in XLA) and one fix-up pass add the
  true incoming state, carried through each chunk's decay."""
  kern = functools.partial(_states_kernel, seq_len=seq_len, dtype=k.dtype)
  b, t, h, dk = k.shape
  s = _segments(bs, t, seq_len, b * h)
  if s == 1:
    states, final = _scan_call(kern, "lasad_states", k, v, g, width, prefix, bnd, h0, bs=bs,
                               interpret=interpret, last=last)
    return states, final, None
  (ks, vs, gs), w, p = _split_inputs(s, width, prefix, k, v, g)
  loc, loc_final, dec = _scan_call(kern, "lasad_states", ks, vs, gs, w, p, bnd, None, bs=bs,
                                   interpret=interpret, decay=True)
  m = loc.shape[2]                                               # chunks per segment
  dec = jnp.swapaxes(dec.reshape(b, s, h, m, dk), 1, 2).reshape(b, h, s * m, dk)
  states, final = _join_segments(loc, loc_final, dec, h0, s, reverse=False)
  return states, (final if last else None), dec


def _join_segments(loc, loc_end, dec, init, s, *, reverse):
  """Per-chunk values of S segments computed from zero starts -> the true ones.

  loc [B*S, H, M, K, V] per segment (a state entering, or with ``reverse`` a state gradient
  leaving, each chunk), loc_end [B*S, H, K, V] (what leaves the segment's far end), dec
  [B, H, S*M, K] the chunk decays, init [B, H, K, V] what enters the first segment (the last
  with ``reverse``). Walks the S segment ends in order, then adds what entered each segment,
  carried through the decays of the chunks between. Reverse = the same on the flipped sequence.
  Returns ([B, H, S*M, K, V], what leaves the last segment)."""
  bs_, h, m, dk, dv = loc.shape
  b = bs_ // s
  loc = loc.reshape(b, s, h, m, dk, dv)
  loc_end = loc_end.reshape(b, s, h, dk, dv)
  dec = jnp.swapaxes(dec.reshape(b, h, s, m, dk), 1, 2)          # [b, s, h, m, dk]
  if reverse:
    loc, loc_end, dec = jnp.flip(loc, (1, 3)), jnp.flip(loc_end, 1), jnp.flip(dec, (1, 3))
  incl = jnp.cumprod(dec, axis=3)                                # through chunks 0..n
  before = jnp.concatenate([jnp.ones_like(incl[:, :, :, :1]), incl[:, :, :, :-1]], axis=3)
  entering, carry = _walk_segments(loc_end, incl[:, :, :, -1], init)
  out = loc + before[..., None] * entering[:, :, :, None]
  if reverse:
    out = jnp.flip(out, (1, 3))
  return jnp.swapaxes(out, 1, 2).reshape(b, h, s * m, dk, dv), carry


def _walk_segments(loc_end, seg_dec, init):
  """The scan over S segment ends: loc_end [B, S, H, K, V] (what leaves each segment started from
  zero), seg_dec [B, S, H, K] (each segment's total decay), init [B, H, K, V] -> (what enters
  each segment [B, S, H, K, V], what leaves the last); init None: zeros."""
  carry = jnp.zeros_like(loc_end[:, 0], F32) if init is None else init.astype(F32)
  entering = []
  for i in range(loc_end.shape[1]):
    entering.append(carry)
    carry = seg_dec[:, i, :, :, None] * carry + loc_end[:, i]
  return jnp.stack(entering, 1), carry


def _fused_forward(q, k, v, g, width, prefix, bnd, h0, *, seq_len, scale, bs, interpret,
                   norm=None, save=False, final=True):
  """(o, final state) by ``_fused_kernel``; with a sequence split, a states pass that writes only
  each segment's end state and decays, and ``_walk_segments``, give each segment its start.
  ``norm`` (eps, dv): (o normalised per row, final state, inverse rms [B, H, T]), by the kernel
  where one program holds whole rows and there is no split, else by ``_norm_rows``.
  ``save``: one more result, the states entering each chunk [B, H, T/chunk, K, V] written by
  the kernel (``_chunk_states``' values at the forward's chunk; the backward's 32-token chunks
  take them and the gradient kernel advances every other one, ``_grads``), or None where
  either pass splits the sequence or the backward's chunk is under half the forward's (then the
  backward recomputes them). ``h0`` None: a zero initial state; ``final=False``: the final state
  is not written (None in its place)."""
  b, t, h, dk = q.shape
  dv = v.shape[-1]
  s = _fused_segments(bs, t, seq_len, b * h)
  if s == 1:
    bwd = _bwd_blocks(bs)
    # the gradient kernel advances a saved state through at most one chunk of its own
    keep = bool(save and _segments(bwd, t, seq_len, b * h) == 1
                and bs.chunk // bwd.chunk in (1, 2))
    in_kernel = norm is not None and _block_v(bs, b * h, dv) == dv
    out = _fused_call(q, k, v, g, width, prefix, bnd, h0, seq_len=seq_len, scale=scale, bs=bs,
                      interpret=interpret, norm=norm if in_kernel else None, save=keep,
                      final=final)
    states = out[-1] if keep else None
    out = out[:-1] if keep else out
    out = out if norm is None or in_kernel else _with_norm(*out, norm)
    return tuple(out) + (states,) if save else out
  (qs, ks, vs, gs), w, p = _split_inputs(s, width, prefix, q, k, v, g)
  kern = functools.partial(_states_kernel, seq_len=seq_len, dtype=k.dtype)
  _, loc_end, dec = _scan_call(kern, "lasad_segment_states", ks, vs, gs, w, p, bnd, None, bs=bs,
                               interpret=interpret, decay=True, per_chunk=False)
  seg_dec = jnp.prod(dec, axis=2).reshape(b, s, h, dk)
  entering, last = _walk_segments(loc_end.reshape(b, s, h, dk, dv), seg_dec, h0)
  o, _ = _fused_call(qs, ks, vs, gs, w, p, bnd, entering.reshape(b * s, h, dk, dv),
                     seq_len=seq_len, scale=scale, bs=bs, interpret=interpret, final=False)
  o = o.reshape(b, t, h, dv)
  last = last if final else None
  out = (o, last) if norm is None else _with_norm(o, last, norm)
  return out + (None,) if save else out


def _with_norm(o, final, norm):
  """(o / rms(o) per row, final, inverse rms [B, H, T]) in XLA, for the forms the kernel does not
  normalise itself. Rows as a [rows, V] view (on [B, T, H, V] XLA's GPU fusion tiled the norm
  [1, T, 1, V] and moved 1.2 TB/s, LASADGen-L session 11)."""
  eps, dv = norm
  b, t, h, v = o.shape
  rows = o.reshape(-1, v).astype(F32)
  r = lax.rsqrt(jnp.sum(rows * rows, axis=1) / dv + eps)
  n = (rows * r[:, None]).astype(o.dtype).reshape(o.shape)
  return n, final, jnp.swapaxes(r.reshape(b, t, h), 1, 2)


def _fused_call(q, k, v, g, width, prefix, bnd, h0, *, seq_len, scale, bs, interpret, norm=None,
                save=False, final=True):
  """[o, final state (None with ``final=False``), *the norm's and ``save``'s outputs];
  ``h0`` None: start from zeros."""
  b, t, h, dk = q.shape
  dv = v.shape[-1]
  bv = _block_v(bs, b * h, dv)
  seq_k, seq_v, state = _walk_specs(t, dk, bv)
  kern = functools.partial(_fused_kernel, chunk=bs.chunk, sub=bs.sub, n_chunks=t // bs.chunk,
                           seq_len=seq_len, scale=scale, dtype=q.dtype, diag=bs.diag,
                           fast_limit=bs.fast_limit, split=bs.split_dots,
                           prefetch=bs.fused_prefetch, norm=norm, save=save)
  kern = _optional_refs(kern, (True,) * 7 + (h0 is not None, True, final))
  out_specs = [seq_v] + ([state] if final else [])
  out_shape = [jax.ShapeDtypeStruct((b, t, h, dv), q.dtype)]
  if final:
    out_shape.append(jax.ShapeDtypeStruct((b, h, dk, dv), F32))
  if norm is not None:   # whole rows per program (bv == dv): their inverse rms, [B, H, T]
    assert bv == dv, (bv, dv)
    out_specs.append(pl.BlockSpec((None, None, t), lambda i, j, kv: (i, j, 0)))
    out_shape.append(jax.ShapeDtypeStruct((b, h, t), F32))
  if save:   # the states entering each chunk, as _scan_call's
    n = t // bs.chunk
    out_specs.append(pl.BlockSpec((None, None, n, dk, bv), lambda i, j, kv: (i, j, 0, 0, kv)))
    out_shape.append(jax.ShapeDtypeStruct((b, h, n, dk, dv), F32))
  out = _pallas_call(
      kern, grid=(b, h, dv // bv),
      in_specs=[seq_k, seq_k, seq_v, seq_k]
      + _scalar_specs(lambda i, j, kv: (i, j), width, prefix, bnd)
      + ([] if h0 is None else [state]),
      out_specs=out_specs,
      out_shape=out_shape,
      compiler_params=_params(bs, bs.fused_num_warps), interpret=interpret, cumsum=_cumsum(bs),
      name="lasad_fused_forward", head_axis=1, maxnreg=bs.fused_maxnreg,
  )(q, k, v, g, width, prefix, bnd, *(() if h0 is None else (h0,)))
  out = list(out)
  return out if final else [out[0], None] + out[1:]


def _chunk_spec(d, c):
  return pl.BlockSpec((None, c, None, d), lambda i, j, hh: (i, j, hh, 0))


def _state_spec(dk, dv):
  return pl.BlockSpec((None, None, None, dk, dv), lambda i, j, hh: (i, hh, j, 0, 0))


def _outputs(q, k, v, g, width, prefix, bnd, states, *, seq_len, scale, bs, interpret):
  b, t, h, dk = q.shape
  dv = v.shape[-1]
  c = bs.chunk
  kern = functools.partial(_output_kernel, chunk=c, sub=bs.sub, seq_len=seq_len, scale=scale,
                           dtype=q.dtype, diag=bs.diag, fast_limit=bs.fast_limit,
                           split=bs.split_dots)
  return _pallas_call(
      kern, grid=(b, t // c, h),
      in_specs=[_chunk_spec(dk, c), _chunk_spec(dk, c), _chunk_spec(dv, c), _chunk_spec(dk, c)]
      + _scalar_specs(lambda i, j, hh: (i, hh), width, prefix, bnd) + [_state_spec(dk, dv)],
      out_specs=_chunk_spec(dv, c),
      out_shape=jax.ShapeDtypeStruct((b, t, h, dv), q.dtype),
      compiler_params=_params(bs), interpret=interpret, cumsum=_cumsum(bs), name="lasad_output",
      head_axis=2,
  )(q, k, v, g, width, prefix, bnd, states)


def _dstates(q, do, g, width, prefix, bnd, dht, *, seq_len, scale, bs, interpret, dec=None,
             last=True):
  """(dS_n [B, H, N, K, V]: gradient of the state leaving chunk n, d initial_state (None with
  ``last=False``, not written where there is no split)). With a
  sequence split, ``dec`` (the chunk decays from ``_chunk_states_dec``) carries the gradient
  arriving at each segment's end back through its chunks, as the forward does the states."""
  kern = functools.partial(_dstates_kernel, seq_len=seq_len, scale=scale, dtype=q.dtype)
  b, t, h, dk = q.shape
  s = _segments(bs, t, seq_len, b * h)
  if s == 1:
    return _scan_call(kern, "lasad_dstates", q, do, g, width, prefix, bnd, dht, bs=bs,
                      interpret=interpret, last=last)
  if dec is None:
    raise ValueError("a sequence split needs the chunk decays of the forward states")
  (qs, dos, gs), w, p = _split_inputs(s, width, prefix, q, do, g)
  loc, loc_d0 = _scan_call(kern, "lasad_dstates", qs, dos, gs, w, p, bnd, None, bs=bs,
                           interpret=interpret)
  dstates, d0 = _join_segments(loc, loc_d0, dec, dht, s, reverse=True)
  return dstates, (d0 if last else None)


def _grads(q, k, v, g, do, width, prefix, bnd, states, dstates, *, seq_len, scale, bs,
           interpret):
  """``states`` [B, H, N', K, V]: one per chunk (N' = N), or one per two chunks (N' = N / 2, the
  forward's saved states): then the programs of odd chunks advance it through the chunk before
  (``_advance``, reading its k, v, g rows)."""
  b, t, h, dk = q.shape
  dv = v.shape[-1]
  c = bs.chunk
  n = t // c
  per_chunk = pl.BlockSpec((None, None, None, 1, dk), lambda i, j, hh: (i, j, hh, 0, 0))
  gated = _GATE_LB.get() is not None   # then d lb per chunk in the dg slot (_gate_grads)
  every = n // states.shape[2]
  if every not in (1, 2) or states.shape[2] * every != n:
    raise ValueError(f"{states.shape[2]} states for {n} chunks: need one per chunk or per two")
  kern = functools.partial(_grads_kernel, chunk=c, sub=bs.sub, seq_len=seq_len, scale=scale,
                           dtype=q.dtype, diag=bs.diag, fast_limit=bs.fast_limit,
                           split=bs.split_dots, advance=every == 2)
  s_spec = pl.BlockSpec((None, None, None, dk, dv), lambda i, j, hh: (i, hh, j // every, 0, 0))
  prev, prev_specs = (), []
  if every == 2:   # the chunk before's k, v, g rows (read by odd chunks only)
    prev = (k, v, g)
    prev_specs = [pl.BlockSpec((None, c, None, d),
                               lambda i, j, hh: (i, jnp.maximum(j - 1, 0), hh, 0))
                  for d in (dk, dv, dk)]
  return _pallas_call(
      kern, grid=(b, n, h),
      in_specs=[_chunk_spec(dk, c), _chunk_spec(dk, c), _chunk_spec(dv, c), _chunk_spec(dk, c),
                _chunk_spec(dv, c)] + _scalar_specs(lambda i, j, hh: (i, hh), width, prefix, bnd)
      + [s_spec, _state_spec(dk, dv)] + prev_specs,
      out_specs=[_chunk_spec(dk, c), _chunk_spec(dk, c), _chunk_spec(dv, c),
                 per_chunk if gated else _chunk_spec(dk, c), per_chunk],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct(k.shape, k.dtype),
                 jax.ShapeDtypeStruct(v.shape, v.dtype),
                 jax.ShapeDtypeStruct((b, n, h, 1, dk), F32) if gated else
                 jax.ShapeDtypeStruct(g.shape, g.dtype),
                 jax.ShapeDtypeStruct((b, n, h, 1, dk), F32)],
      compiler_params=_params(bs, _grads_warps(bs)), interpret=interpret,
      cumsum=_cumsum(bs, grads=True),
      name="lasad_grads", head_axis=2,
  )(q, k, v, g, do, width, prefix, bnd, states, dstates, *prev)


def _fused_bwd_applies(bs, b, t, h, dk, dv, seq_len):
  """Whether the backward runs as one ``_bwd_fused_kernel`` (``BlockSizes.fused_backward``; None:
  for B*H >= FUSED_BWD_MIN_BH with K, V <= 64 and split dots, where the other form would split
  no sequence). ``bs``: the backward's block sizes."""
  if bs.fused_backward is not None:
    return bs.fused_backward
  return (b * h >= FUSED_BWD_MIN_BH and max(dk, dv) <= 64 and bs.split_dots
          and _segments(bs, t, seq_len, b * h) == 1)


def _fused_grads(q, k, v, g, do, width, prefix, bnd, h0, dht, *, seq_len, scale, bs, interpret,
                 dq_raw=False, norm=None):
  """(dq, dk, dv, dg, d boundary [B, 1, H, 1, K], dh0) by ``_bwd_fused_kernel``, grid (B, H), the
  whole sequence and whole V per program; dg as ``_grads``' (with the gate in the kernel: d lb
  [B, 1, H, 1, K], and with ``dq_raw`` the gradient of q_raw in dq's place). ``norm``: (n, r,
  dv) of the output norm (``_hgrn2_fwd``): ``do`` is then the normalised output's gradient."""
  b, t, h, dk = q.shape
  dv = v.shape[-1]
  sub = bs.sub if bs.bwd_sub is None else bs.bwd_sub   # T is a multiple of the chunk: of both
  seq_k = pl.BlockSpec((None, t, None, dk), lambda i, j: (i, 0, j, 0))
  seq_v = pl.BlockSpec((None, t, None, dv), lambda i, j: (i, 0, j, 0))
  state = pl.BlockSpec((None, None, dk, dv), lambda i, j: (i, j, 0, 0))
  per_head = pl.BlockSpec((None, None, None, 1, dk), lambda i, j: (i, 0, j, 0, 0))
  gated = _GATE_LB.get() is not None
  kern = functools.partial(_bwd_fused_kernel, sub=sub, n_sub=t // sub, seq_len=seq_len,
                           scale=scale, dtype=q.dtype, diag=bs.diag, fast_limit=bs.fast_limit,
                           split=bs.split_dots, prefetch=bs.bwd_prefetch,
                           prefetch_qdq=bs.bwd_prefetch and bs.bwd_prefetch_qdq, dq_raw=dq_raw,
                           norm_dv=None if norm is None else float(norm[2]))
  head_row = jax.ShapeDtypeStruct((b, 1, h, 1, dk), F32)
  extra_specs, extra = [], ()
  if norm is not None:   # n [B, T, H, V] as do; r [B, H, T] whole rows per program
    extra_specs = [seq_v, pl.BlockSpec((None, None, t), lambda i, j: (i, j, 0))]
    extra = (norm[0].astype(do.dtype), norm[1].astype(F32))
  # h0 / dht None: the walks start from zeros; no h0, no dh0 output
  states = [x for x in (h0, dht) if x is not None]
  out_specs = [seq_k, seq_k, seq_v, per_head if gated else seq_k, per_head, state, seq_k]
  out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct(k.shape, k.dtype),
               jax.ShapeDtypeStruct(v.shape, v.dtype),
               head_row if gated else jax.ShapeDtypeStruct(g.shape, g.dtype), head_row,
               jax.ShapeDtypeStruct((b, h, dk, dv), F32),
               jax.ShapeDtypeStruct((b, t, h, dk), F32)]   # q dq, the two walks' scratch
  if h0 is None:   # no dh0 output (the 6th)
    del out_specs[5], out_shape[5]
  # refs: 8 inputs, h0, dht, the norm's inputs, then dq, dk, dv, dg, d boundary, dh0
  kern = _optional_refs(kern, (True,) * 8 + (h0 is not None, dht is not None)
                        + (True,) * (len(extra) + 5) + (h0 is not None,))
  out = _pallas_call(
      kern, grid=(b, h),
      in_specs=[seq_k, seq_k, seq_v, seq_k, seq_v]
      + _scalar_specs(lambda i, j: (i, j), width, prefix, bnd) + [state] * len(states)
      + extra_specs,
      out_specs=out_specs, out_shape=out_shape,
      compiler_params=_params(bs, bs.grads_num_warps or 4), interpret=interpret,
      cumsum=_cumsum(bs, grads=True), name="lasad_bwd_fused", head_axis=1,
      maxnreg=bs.bwd_maxnreg,
  )(q, k, v, g, do, width, prefix, bnd, *states, *extra)
  dq, dk_, dv_, dg, dbnd = out[:5]
  return dq, dk_, dv_, dg, dbnd, (None if h0 is None else out[5])


# --------------------------------------------------------------------------- custom VJP
@functools.partial(jax.custom_vjp, nondiff_argnums=(8, 9, 10, 11, 12))
def _lasad(q, k, v, g, width, prefix, bnd, h0, seq_len, scale, bs, interpret, final):
  return _lasad_fwd(q, k, v, g, width, prefix, bnd, h0, seq_len, scale, bs, interpret, final)[0]


def _forward(q, k, v, g, width, prefix, bnd, h0, seq_len, scale, bs, interpret, norm=None,
             save=False, final=True):
  """(o, final state), or with ``norm`` (eps, dv) (o normalised per row, final, inverse rms);
  ``save``: one more result, the backward's per-chunk states where the one-pass kernel wrote
  them (else None). ``h0`` None: a zero initial state; ``final=False``: None for the final
  state, which the one-pass kernel then does not write."""
  kw = dict(seq_len=seq_len, bs=bs, interpret=interpret)
  if bs.fused_forward:
    return _fused_forward(q, k, v, g, width, prefix, bnd, h0, scale=scale, norm=norm,
                          save=save, final=final, **kw)
  states, last = _chunk_states(k, v, g, width, prefix, bnd, h0, last=final, **kw)
  o = _outputs(q, k, v, g, width, prefix, bnd, states, scale=scale, **kw)
  out = (o, last) if norm is None else _with_norm(o, last, norm)
  return out + (None,) if save else out


def _lasad_fwd(q, k, v, g, width, prefix, bnd, h0, seq_len, scale, bs, interpret, final):
  out = _forward(q, k, v, g, width, prefix, bnd, h0, seq_len, scale, bs, interpret, final=final)
  return out, (q, k, v, g, width, prefix, bnd, h0)


def _lasad_bwd(seq_len, scale, bs, interpret, final, res, cts):
  return _bwd_impl(seq_len, scale, bs, interpret, res, cts)[0]


def _bwd_impl(seq_len, scale, bs, interpret, res, cts, dq_raw=False, norm=None):
  """(the eight inputs' gradients, whether dq is q_raw's). ``res``: the eight inputs, and
  optionally the per-chunk states the forward kernel saved (``_fused_forward``'s ``save``; None:
  recomputed here). ``dq_raw`` (gate in the kernel): the fused backward returns q_raw's gradient
  in dq's place where ``BlockSizes.bwd_dq_raw`` allows (the flag says whether it did). ``norm``:
  (n, r, dv) of an output norm (``_hgrn2_fwd``), cts[0] being the normalised output's gradient:
  the fused backward takes it through the norm where ``BlockSizes.bwd_norm`` allows, else
  ``_norm_rows_bwd`` does first."""
  q, k, v, g, width, prefix, bnd, h0, *saved = res
  do, dht = cts   # dht None: no final state was returned (a zero initial state: h0 None)
  dht = None if dht is None else dht.astype(F32)
  bs = _bwd_blocks(bs)
  kw = dict(seq_len=seq_len, bs=bs, interpret=interpret)
  fused = not (saved and saved[0] is not None) and _fused_bwd_applies(bs, *q.shape, v.shape[-1],
                                                                      seq_len)
  if norm is not None and not (fused and bs.bwd_norm):
    do, norm = _norm_rows_bwd(do, *norm), None
  if fused:
    raw = dq_raw and bs.bwd_dq_raw
    dq, dk, dv, dg, dbnd, dh0 = _fused_grads(q, k, v, g, do.astype(q.dtype), width, prefix, bnd,
                                             h0, dht, scale=scale, dq_raw=raw, norm=norm, **kw)
    return (dq, dk, dv, dg, None, None, _dbnd(dbnd, bnd), dh0), raw
  if saved and saved[0] is not None:   # saved only where the backward is unsplit: no decays
    states, dec = saved[0], None     # one per forward chunk, so maybe one per two of these
  else:
    states, _, dec = _chunk_states_dec(k, v, g, width, prefix, bnd, h0, last=False, **kw)
  dstates, dh0 = _dstates(q, do.astype(q.dtype), g, width, prefix, bnd, dht, scale=scale,
                          dec=dec, last=h0 is not None, **kw)
  dq, dk, dv, dg, dbnd = _grads(q, k, v, g, do.astype(q.dtype), width, prefix, bnd, states,
                                dstates, scale=scale, **kw)
  return (dq, dk, dv, dg, None, None, _dbnd(dbnd, bnd), dh0), False


_lasad.defvjp(_lasad_fwd, _lasad_bwd)


def _dbnd(parts, bnd):
  """The boundary's gradient from the kernels' [B, N, H, 1, K] parts, in bnd's shape ([H] or
  [1])."""
  d = jnp.sum(parts, axis=(0, 1, 3, 4))
  return jnp.sum(d, keepdims=True) if bnd.shape[0] == 1 else d


def _pow2_at_least_16(d):
  return max(16, 1 << (d - 1).bit_length())


class _Padding:
  """What the two entry points share: T to a multiple of the chunk, K and V to powers of two
  >= 16 (Triton tile shapes), q-like inputs in the kernel dtype (bf16 stays bf16, else float32),
  width 0 (no mask) without ``use_mask``; the results are cropped back by the caller."""

  def __init__(self, x, v, width, initial_state, use_mask, bs, interpret):
    self.interpret = jax.default_backend() != "gpu" if interpret is None else interpret
    batch, self.seq_len, _, self.dk = x.shape
    self.dv = v.shape[-1]
    # width <= 0 disables the mask in _gate
    self.width = width if use_mask else jnp.zeros((1,), jnp.int32)
    self.dtype = jnp.bfloat16 if x.dtype == jnp.bfloat16 else F32
    self.t_pad = -self.seq_len % bs.chunk
    self.kp = _pow2_at_least_16(self.dk) - self.dk
    self.vp = _pow2_at_least_16(self.dv) - self.dv
    # None: a zero initial state, which the kernels start from without reading an array
    self.h0 = None if initial_state is None else jnp.pad(
        initial_state, ((0, 0), (0, 0), (0, self.kp), (0, self.vp)))

  def __call__(self, x, d, value=0.0, dtype=None):
    return jnp.pad(x.astype(dtype or self.dtype), ((0, 0), (0, self.t_pad), (0, 0), (0, d)),
                   constant_values=value)

  def crop(self, o, final):
    return (o[:, :self.seq_len, :, :self.dv],
            None if final is None else final[:, :, :self.dk, :self.dv])


def lasad_pallas(q, k, v, g, width, prefix, boundary, initial_state, *, scale, use_mask,
                 block_sizes=BlockSizes(), interpret=None, final_state=True):
  """Same contract as ``reference.lasad_reference`` (already validated by lasad_jax.ops), except
  that width and prefix may be [1] (every row) and boundary [1] (every head), initial_state may
  be None (zeros, read from no array) and with ``final_state=False`` the final state is None
  (not written).

  Pads T to a multiple of the chunk and K, V to powers of two >= 16 (Triton tile shapes); the
  padding is k = v = q = 0 and g = 0, which changes nothing, and is cropped from the results.
  ``interpret=None`` runs compiled on GPU and in the Pallas interpreter elsewhere.
  """
  bs = block_sizes
  pad = _Padding(q, v, width, initial_state, use_mask, bs, interpret)
  # g keeps its own dtype (a float32 gate with bf16 q/k/v stays float32).
  gp = pad(g, pad.kp, dtype=g.dtype if pad.dtype == jnp.bfloat16 else F32)
  o, final = _lasad(pad(q, pad.kp), pad(k, pad.kp), pad(v, pad.vp), gp, pad.width, prefix,
                    boundary, pad.h0, pad.seq_len, scale, bs, pad.interpret, bool(final_state))
  return pad.crop(o, final)   # o in the kernel dtype; ops casts


# --------------------------------------------------------------------------- the gate inside
def _lb_rows(lb):
  """[H, K] lower bounds -> float32 [Hp, K], Hp a power of two (a whole Triton block)."""
  h = lb.shape[0]
  return jnp.pad(lb.astype(F32), ((0, (1 << (h - 1).bit_length()) - h), (0, 0)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(8, 9, 10, 11, 12, 13))
def _hgrn2(qr, f, v, lb, width, prefix, bnd, h0, seq_len, scale, bs, interpret, norm, final):
  return _hgrn2_fwd(qr, f, v, lb, width, prefix, bnd, h0, seq_len, scale, bs, interpret,
                    norm, final)[0]


def _hgrn2_fwd(qr, f, v, lb, width, prefix, bnd, h0, seq_len, scale, bs, interpret, norm, final):
  """``norm``: None, or (eps, dv, name): the output normalised per row (``_store_out``); its
  gradient reads that output and the inverse rms, both named ``name`` (a checkpoint_name, so a
  remat policy that keeps it keeps the forward kernel from rerunning; None: unnamed)."""
  # q_raw in the q slot, f in both the k and the g slots: _tq and _tkg make q, k, g of them.
  res = (qr, f, v, lb, width, prefix, bnd, h0)
  # With a named norm (the model's path) the forward kernel also writes the backward's
  # per-chunk states (BlockSizes.save_states), kept under the same name, so remat keeps them
  # and the backward's states kernel does not run.
  save = norm is not None and norm[2] is not None and bs.save_states
  with _gated(_lb_rows(lb)):
    out = _forward(qr, f, v, f, width, prefix, bnd, h0, seq_len, scale, bs, interpret,
                   None if norm is None else norm[:2], save=save, final=final)
  if norm is None:
    return out, res
  n, final, r, *rest = out
  states = rest[0] if rest else None
  name = norm[2]
  if name is not None:
    # the output itself is the named value, so a caller that keeps it (the model: its matmul
    # operand) and this residual are one value: inside a lax.scan, naming them apart would
    # stack a second copy of it (+3.2 GB for LASADGen-L at batch 256)
    n, r = checkpoint_name(n, name), checkpoint_name(r, name)
    states = None if states is None else checkpoint_name(states, name)
  return (n, final), res + (n, r, states)


def _norm_grad(dn, n, r, dv):
  """Gradient through n = o r, r = (sum(o^2) / dv + eps)^-1/2 per row (the last axis): do =
  r (dn - n sum(dn n) / dv), from float32 dn, n and r broadcast against them (not o). XLA's pass
  (``_norm_rows_bwd``) and the fused backward's rows (``BlockSizes.bwd_norm``) both use it."""
  m = jnp.sum(dn * n, axis=-1, keepdims=True) / dv
  return r * (dn - n * m)


def _norm_rows_bwd(dn, n, r, dv):
  """``_norm_grad`` in XLA: dn, n [B, T, H, V]; r [B, H, T]; do in dn's dtype."""
  return _norm_grad(dn.astype(F32), n.astype(F32), jnp.swapaxes(r, 1, 2)[..., None],
                    dv).astype(dn.dtype)


def _hgrn2_bwd(seq_len, scale, bs, interpret, norm, final, res, cts):
  states = norm_rows = None
  if norm is not None:   # through the norm in _bwd_impl (the fused kernel's or XLA's)
    *res, n, r, states = res
    norm_rows = (n, r, norm[1])
  qr, f, v, lb, width, prefix, bnd, h0 = res
  # the gradient kernel applies the forget gate's derivatives (_gate_grads): d f and d lb per
  # chunk (per head with the fused backward) come back in the dk and dg slots; silu's
  # derivative: the fused backward's, else XLA's, one pass over dq
  with _gated(_lb_rows(lb)):
    (dq, df, dv, dlb, _, _, dbnd, dh0), raw = _bwd_impl(
        seq_len, scale, bs, interpret, (qr, f, v, f, width, prefix, bnd, h0, states), cts,
        dq_raw=True, norm=norm_rows)
  dqr = dq if raw else jax.vjp(jax.nn.silu, qr)[1](dq)[0]
  return dqr, df, dv, jnp.sum(dlb, axis=(0, 1, 3)).astype(lb.dtype), None, None, dbnd, dh0


_hgrn2.defvjp(_hgrn2_fwd, _hgrn2_bwd)


def hgrn2_pallas(q_raw, f, v, lb, width, prefix, boundary, initial_state, *, scale, use_mask,
                 block_sizes=BlockSizes(), interpret=None, norm_eps=None, norm_save=None,
                 final_state=True):
  """``lasad_pallas`` on HGRN2's gates computed inside the kernels (``reference.hgrn2_gates``):
  q_raw, f [B, T, H, K] (the projections), lb [H, K]. The kernels read q_raw and f instead of q,
  k and a float32 g, so neither XLA's gate pass nor its recomputation in the backward writes
  them to memory. Padding: q_raw = v = 0, f = +inf (s = 1: k = 0, g = 0), lb = 0.

  ``norm_eps``: return each head's output RMS-normalised, o / sqrt(mean(o^2) + norm_eps) (no
  weight), written so by the one-pass forward kernel from its float32 o where a program holds
  whole heads (else by XLA after it); the gradient reads the normalised output and the inverse
  rms ([B, H, T] float32), named ``norm_save`` for remat."""
  bs = block_sizes
  pad = _Padding(q_raw, v, width, initial_state, use_mask, bs, interpret)
  lbp = jnp.pad(lb.astype(F32), ((0, 0), (0, pad.kp)))
  norm = None if norm_eps is None else (float(norm_eps), pad.dv, norm_save)
  o, final = _hgrn2(pad(q_raw, pad.kp), pad(f, pad.kp, jnp.inf), pad(v, pad.vp), lbp, pad.width,
                    prefix, boundary, pad.h0, pad.seq_len, scale, bs, pad.interpret, norm,
                    bool(final_state))
  return pad.crop(o, final)
