"""The LASAD operator against a float64 oracle: every implementation, every mask mode.

Chain (as in fla's tests): oracle (float64 NumPy) -> reference (lax.scan) -> chunk (XLA) -> pallas,
forward, final state and the gradient of every input, with relative-RMS tolerances.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import oracle
from kernels.lasad.reference import recurrent_step
from lasad_jax.ops import lasad_attention

IMPLS = ["reference", "chunk", "pallas"]
# float32 arithmetic; the chunked form's within-chunk cumulative sums of strongly negative gates
# (normaliser 0.1: g ~ -7 per token, sums ~ -500) lose ~1e-5 relative in the exponent.
TOL = {"reference": 2e-5, "chunk": 1e-4, "pallas": 1e-4}


def make_inputs(seed, b, t, h, dk, dv, norm, h0=False):
  rng = np.random.default_rng(seed)
  q = rng.standard_normal((b, t, h, dk)).astype(np.float32)
  k = rng.standard_normal((b, t, h, dk)).astype(np.float32)
  v = rng.standard_normal((b, t, h, dv)).astype(np.float32)
  g = (np.log(1 / (1 + np.exp(-rng.standard_normal((b, t, h, dk))))) / norm).astype(np.float32)
  s0 = rng.standard_normal((b, h, dk, dv)).astype(np.float32) if h0 else None
  return q, k, v, g, s0


def run(impl, q, k, v, g, s0, do, dst, **kw):
  """o, final state and all gradients of sum(o*do) + sum(S*dst) through one implementation."""
  boundary = kw.pop("boundary")
  scale = kw.pop("scale", None)
  has_h0 = s0 is not None
  s0 = jnp.zeros((q.shape[0], q.shape[2], q.shape[3], v.shape[3])) if s0 is None else s0

  def f(q, k, v, g, s0, bnd):
    return lasad_attention(q, k, v, g, boundary=bnd, scale=scale, impl=impl,
                           initial_state=s0 if has_h0 else None, return_final_state=True, **kw)

  (o, st), vjp = jax.vjp(f, q, k, v, g, s0, jnp.asarray(boundary, jnp.float32))
  grads = vjp((jnp.asarray(do), jnp.asarray(dst)))
  names = ("dq", "dk", "dv", "dg", "dh0", "dboundary")
  return o, st, dict(zip(names, grads))


CASES = [
    # (b, t, h, dk, dv, norm, width, prefix, boundary, h0)
    (2, 1, 2, 8, 8, 1.0, None, 0, 0.0, False),
    (2, 63, 2, 8, 4, 1.0, 8, 1, 0.0, True),          # carry, K != V, h0
    (2, 64, 2, 8, 8, 0.1, 8, 1, -np.inf, False),      # reset, strong gates
    (2, 65, 2, 4, 8, 10.0, 16, 1, -0.5, True),        # partial scalar, weak gates
    (1, 1000, 2, 8, 8, 1.0, 16, 1, -np.inf, True),    # long, reset
    (1, 1000, 1, 4, 4, 10.0, 32, 0, 0.0, False),      # long, carry, weak gates
    (2, 100, 3, 8, 8, 1.0, 7, 2, [-np.inf, 0.0, -1.5], True),   # per-head mixed; 7 divides nothing
    (2, 90, 2, 8, 8, 0.1, None, 0, 0.0, True),        # no mask, strong gates
    (3, 77, 2, 8, 8, 1.0, [4, 6, 16], [1, 0, 3], -np.inf, False),  # per-example width/prefix
    (2, 50, 2, 8, 8, 1.0, [5, 9], 1, [-2.0, -0.1], True),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"T{c[1]}-w{c[6]}-b{c[8]}")
def test_against_oracle(impl, case):
  _check_against_oracle(impl, case)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"T{c[1]}-w{c[6]}-b{c[8]}")
def test_pallas_backward_chunk_64(case):
  """The backward on 64-token chunks of two sub-chunks each (``BlockSizes(bwd_chunk=64)``; the
  default runs it on 32-token chunks, one sub-chunk per gradient program)."""
  from kernels.lasad.pallas import BlockSizes
  _check_against_oracle("pallas", case, block_sizes=BlockSizes(bwd_chunk=64))


@pytest.mark.parametrize("cumsum", ["dot", "scan"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"T{c[1]}-w{c[6]}-b{c[8]}")
def test_pallas_cumsum_forms(case, cumsum):
  """``BlockSizes(cumsum=...)`` in every kernel (the default "auto" takes dots in the gradient
  kernel only, test_against_oracle's): "dot", the row cumulative sums (log decays, dg) as
  triangular tensor-core products of an exact three-part bf16 split; "scan", Triton's scan.
  Forward and all gradients at the same tolerances."""
  from kernels.lasad.pallas import BlockSizes
  _check_against_oracle("pallas", case, block_sizes=BlockSizes(cumsum=cumsum))


def _check_against_oracle(impl, case, **extra):
  b, t, h, dk, dv, norm, width, prefix, boundary, h0 = case
  q, k, v, g, s0 = make_inputs(CASES.index(case), b, t, h, dk, dv, norm, h0)
  rng = np.random.default_rng(1)
  do = rng.standard_normal((b, t, h, dv))
  dst = rng.standard_normal((b, h, dk, dv))
  kw = dict(width=None if width is None else jnp.asarray(width, jnp.int32) if
            isinstance(width, list) else width,
            prefix=jnp.asarray(prefix, jnp.int32) if isinstance(prefix, list) else prefix)
  o, st, grads = run(impl, q, k, v, g, s0, do.astype(np.float32), dst.astype(np.float32),
                     boundary=np.asarray(boundary, np.float32), **kw, **extra)
  okw = dict(width=width, prefix=prefix, boundary=boundary, h0=s0)
  o_ref, st_ref, _ = oracle.forward(q, k, v, g, **okw)
  g_ref = oracle.backward(q, k, v, g, do, dst, **okw)
  tol = TOL[impl]
  assert oracle.rel_rms(o, o_ref) < tol
  assert oracle.rel_rms(st, st_ref) < tol
  for name, ref in g_ref.items():
    got = np.asarray(grads[name])
    assert np.all(np.isfinite(got)), f"{name} has NaN/inf"
    if name == "dh0" and s0 is None:
      continue
    if name == "dboundary":
      finite = np.isfinite(np.broadcast_to(np.asarray(boundary, np.float64), (h,)))
      # d/d boundary is exactly 0 for heads whose boundary is a reset (-inf).
      np.testing.assert_array_equal(np.broadcast_to(got, (h,))[~finite], 0.0)
      if width is None or not finite.any():
        continue
      if np.ndim(boundary) == 0:
        ref = ref.sum()
      else:
        got, ref = got[finite], ref[finite]
    if not np.any(ref):
      # e.g. dg at T=1 with no initial state is exactly 0; the chunked forms get it as the
      # difference q*dq - k*dk, which cancels to rounding: bound it absolutely instead.
      assert np.max(np.abs(got)) < 1e-5, name
      continue
    assert oracle.rel_rms(got, ref) < tol * 5, name


@pytest.mark.parametrize("impl", IMPLS)
def test_reset_is_exact(impl):
  """With boundary=-inf the output after a row start ignores everything before it."""
  q, k, v, g, _ = make_inputs(0, 1, 40, 2, 8, 8, 1.0)
  o = lasad_attention(q, k, v, g, width=10, prefix=0, boundary=-np.inf, impl=impl)
  tail = lasad_attention(q[:, 20:], k[:, 20:], v[:, 20:], g[:, 20:], impl=impl)
  np.testing.assert_allclose(np.asarray(o[:, 20:30]), np.asarray(tail[:, :10]), rtol=1e-5,
                             atol=1e-5)
  assert np.isfinite(np.asarray(o)).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_traced_width_compiles_once(impl):
  q, k, v, g, _ = make_inputs(3, 2, 48, 2, 8, 8, 1.0)
  if impl == "pallas":
    # JAX's Pallas interpreter changes a global on its first run, so the first jitted function
    # that runs any interpreted pallas_call compiles twice (jax 0.11.2; a two-line pallas_call
    # shows it). Run one first, so this test means the same alone as after the others.
    lasad_attention(q, k, v, g, width=4, impl=impl)
  f = jax.jit(lambda w, p: lasad_attention(q, k, v, g, width=w, prefix=p, boundary=-1.0,
                                           impl=impl))
  for w, p in ((4, 1), (8, 0), (12, 3)):
    o = f(jnp.int32(w), jnp.int32(p))
    o_ref, _, _ = oracle.forward(q, k, v, g, width=w, prefix=p, boundary=-1.0)
    assert oracle.rel_rms(o, o_ref) < TOL[impl]
  assert f._cache_size() == 1


@pytest.mark.parametrize("impl", IMPLS)
def test_bfloat16_inputs(impl):
  q, k, v, g, _ = make_inputs(4, 2, 70, 2, 16, 16, 1.0)
  bf = [jnp.asarray(x, jnp.bfloat16) for x in (q, k, v, g)]
  o = lasad_attention(*bf, width=8, prefix=1, boundary=-np.inf, impl=impl)
  assert o.dtype == jnp.bfloat16
  o_ref, _, _ = oracle.forward(*[np.asarray(x, np.float64) for x in bf], width=8, prefix=1,
                               boundary=-np.inf)
  assert oracle.rel_rms(o, o_ref) < 1e-2


@pytest.mark.parametrize("chunk_size", [16, 32, 128])
def test_chunk_sizes(chunk_size):
  q, k, v, g, s0 = make_inputs(5, 2, 150, 2, 8, 8, 1.0, h0=True)
  o, st = lasad_attention(q, k, v, g, width=12, prefix=1, boundary=-np.inf, impl="chunk",
                          chunk_size=chunk_size, initial_state=s0, return_final_state=True)
  o_ref, st_ref, _ = oracle.forward(q, k, v, g, width=12, prefix=1, boundary=-np.inf, h0=s0)
  assert oracle.rel_rms(o, o_ref) < 1e-4 and oracle.rel_rms(st, st_ref) < 1e-4


@pytest.mark.parametrize("boundary", [-np.inf, -0.7])
def test_split_sequence_with_state(boundary):
  """Splitting a sequence and handing the state over equals one pass (prefill, long inputs)."""
  q, k, v, g, _ = make_inputs(6, 2, 97, 2, 8, 8, 1.0)
  kw = dict(width=12, boundary=boundary, impl="chunk")
  full = lasad_attention(q, k, v, g, prefix=1, **kw)
  # (a) Prefill the class token, then continue with prefix 0.
  o1, s1 = lasad_attention(q[:, :1], k[:, :1], v[:, :1], g[:, :1], prefix=1, **kw,
                           return_final_state=True)
  o2 = lasad_attention(q[:, 1:], k[:, 1:], v[:, 1:], g[:, 1:], prefix=0, initial_state=s1, **kw)
  assert oracle.rel_rms(jnp.concatenate([o1, o2], 1), full) < 1e-5
  # (b) Split exactly at a row start (t = 1 + 48): the row break falls between the two calls,
  # so the caller applies it: decay the handed-over state by exp(boundary), set the first gate of
  # the second call to 0 (that token's own gate is replaced by the boundary), and continue with
  # prefix 0 (the next row starts are 12, 24, ... tokens later).
  s = 49
  o1, s1 = lasad_attention(q[:, :s], k[:, :s], v[:, :s], g[:, :s], prefix=1, **kw,
                           return_final_state=True)
  g2 = g[:, s:].copy()
  g2[:, 0] = 0.0
  o2 = lasad_attention(q[:, s:], k[:, s:], v[:, s:], g2, prefix=0,
                       initial_state=s1 * np.exp(boundary), **kw)
  assert oracle.rel_rms(jnp.concatenate([o1, o2], 1), full) < 1e-5


def test_recurrent_step_matches_scan():
  q, k, v, g, s0 = make_inputs(7, 2, 30, 2, 8, 4, 1.0, h0=True)
  o_ref, st_ref, _ = oracle.forward(q, k, v, g, width=6, prefix=1, boundary=-np.inf, h0=s0)
  gt, _ = oracle.masked_gate(g, 6, 1, -np.inf)
  s, outs = jnp.asarray(s0), []
  for t in range(30):
    s, o_t = recurrent_step(s, q[:, t].swapaxes(0, 0), k[:, t], v[:, t],
                            jnp.asarray(gt[:, t], jnp.float32), 8 ** -0.5)
    outs.append(o_t)
  assert oracle.rel_rms(jnp.stack(outs, 1), o_ref) < 2e-5
  assert oracle.rel_rms(s, st_ref) < 2e-5


# ----------------------------------------------------------------------------- bad input
def _good():
  q, k, v, g, _ = make_inputs(8, 2, 16, 2, 8, 4, 1.0)
  return dict(q=q, k=k, v=v, g=g)


BAD = [
    (dict(q=np.zeros((2, 16, 8), np.float32)), "`q` must have rank 4"),
    (dict(k=np.zeros((2, 16, 2, 4), np.float32)), "`k` must have the shape of `q`"),
    (dict(g=np.zeros((2, 15, 2, 8), np.float32)), "`g` .* must have the shape of `q`"),
    (dict(v=np.zeros((2, 16, 3, 4), np.float32)), "`v` must share"),
    (dict(q=np.zeros((2, 16, 2, 8), np.int32)), "`q` must be a floating dtype"),
    (dict(width=0), "`width` must be positive"),
    (dict(width=np.array([4, -1], np.int32)), "`width` must be positive"),
    (dict(width=np.array([4, 4, 4], np.int32)), "`width` must be a scalar or have shape"),
    (dict(width=4.0), "`width` must be an int"),
    (dict(prefix=-1, width=4), "`prefix` must be non-negative"),
    (dict(impl="cuda"), "`impl` must be one of"),
    (dict(boundary=0.5, width=4), "`boundary` is a log decay and must be <= 0"),
    (dict(boundary=np.zeros(3, np.float32), width=4), "`boundary` must be a scalar or have shape"),
    (dict(initial_state=np.zeros((2, 2, 8, 5), np.float32)), "`initial_state` must have shape"),
    (dict(initial_state=np.zeros((2, 2, 8, 4), np.int32)), "`initial_state` must be floating"),
    (dict(chunk_size=24), "`chunk_size` must be a positive multiple of 16"),
]


@pytest.mark.parametrize("bad,msg", BAD, ids=[m.split("`")[1] + str(i) for i, (_, m) in
                                              enumerate(BAD)])
def test_bad_input(bad, msg):
  args = _good()
  args.update(bad)
  q, k, v, g = (args.pop(n) for n in ("q", "k", "v", "g"))
  with pytest.raises(ValueError, match=msg):
    lasad_attention(q, k, v, g, **args)


@pytest.mark.parametrize("diag", ["auto", "loop", "bcast"])
@pytest.mark.parametrize("norm", [0.1, 1.0])
def test_pallas_diag_variants(diag, norm):
  """Every form of the exact within-sub-chunk term, with a reset head and a partial head.

  Normaliser 0.1 (sub-chunk log decay ~ -110) sends "auto" down the column loop; 1.0 (~ -13)
  takes the tensor-core factorisation."""
  from kernels.lasad.pallas import BlockSizes
  q, k, v, g, s0 = make_inputs(9, 2, 83, 2, 16, 16, norm, h0=True)
  rng = np.random.default_rng(2)
  do, dst = rng.standard_normal((2, 83, 2, 16)), rng.standard_normal((2, 2, 16, 16))
  bnd = np.array([-np.inf, -0.3], np.float32)
  o, st, grads = run("pallas", q, k, v, g, s0, do.astype(np.float32), dst.astype(np.float32),
                     width=8, prefix=1, boundary=bnd, block_sizes=BlockSizes(diag=diag))
  okw = dict(width=8, prefix=1, boundary=bnd, h0=s0)
  o_ref, st_ref, _ = oracle.forward(q, k, v, g, **okw)
  g_ref = oracle.backward(q, k, v, g, do, dst, **okw)
  assert oracle.rel_rms(o, o_ref) < 1e-4 and oracle.rel_rms(st, st_ref) < 1e-4
  for name in ("dq", "dk", "dv", "dg", "dh0"):
    assert oracle.rel_rms(grads[name], g_ref[name]) < 5e-4, name
  assert oracle.rel_rms(grads["dboundary"][1], g_ref["dboundary"][1]) < 5e-4


def _bf16_case(seed, n):
  """bf16 q, k, v, log-sigmoid g [1, 384, 2, 64], float32 do and dst (and with n = 7 an initial
  state), from ``n`` keys of ``seed``; and q, k, v, g in float64 for the oracle."""
  ks = jax.random.split(jax.random.key(seed), n)
  shape = (1, 384, 2, 64)
  q, k, v = (jax.random.normal(kk, shape, jnp.bfloat16) for kk in ks[:3])
  g = jax.nn.log_sigmoid(jax.random.normal(ks[3], shape)).astype(jnp.bfloat16)
  do = jax.random.normal(ks[4], shape)
  rest = [jax.random.normal(kk, (1, 2, 64, 64)) for kk in ks[5:]]
  return (q, k, v, g, do, *rest), [np.asarray(a, np.float64) for a in (q, k, v, g)]


@pytest.mark.parametrize("split", [True, False])
def test_pallas_bf16_gradient_accuracy(split):
  """bf16 inputs against the float64 oracle, every gradient, with the XLA chunk form as the yardstick.

  The interpreter runs the kernel's own bf16 dots, so it sees the operand rounding the GPU does.
  Rounding S, dS and the diagonal factors to bf16 (``split_dots=False``) costs dg ~4x here (2.1e-2
  vs fla's 2.4e-3 on the H100); splitting them into hi + lo parts keeps every gradient within 1.3x
  of the chunk form, whose dots see float32 states. The False case documents that gap."""
  from kernels.lasad.pallas import BlockSizes
  (q, k, v, g, do, dst), x64 = _bf16_case(7, 6)
  ref = oracle.backward(*x64, np.asarray(do, np.float64), np.asarray(dst, np.float64))

  def grads(impl, **kw):
    f = lambda *x: lasad_attention(*x, impl=impl, return_final_state=True, **kw)
    (o, _), vjp = jax.vjp(f, q, k, v, g)
    return dict(zip(("dq", "dk", "dv", "dg"), vjp((do.astype(o.dtype), dst))))

  ours = grads("pallas", block_sizes=BlockSizes(split_dots=split))
  yard = grads("chunk")
  ratio = {n: oracle.rel_rms(ours[n], ref[n]) / oracle.rel_rms(yard[n], ref[n]) for n in ours}
  if split:
    assert max(ratio.values()) < 1.3, ratio
  else:
    assert ratio["dg"] > 2.0, ratio  # the measured gap the split closes


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("seq_split,t", [(2, 256), (4, 256), (4, 200)])
def test_pallas_sequence_split(seq_split, t, fused):
  _check_split(t, seq_split=seq_split, fused_forward=fused)


@pytest.mark.parametrize("fwd,bwd", [(1, 4), (4, 1), (2, 8)])
def test_pallas_backward_own_split(fwd, bwd):
  """BlockSizes(bwd_seq_split=S): the backward splits the sequence on its own, whatever the forward
  does; same oracle checks, and the dstates kernel's grid shows S segments (B*S programs)."""
  from kernels.lasad.pallas import BlockSizes
  bs = BlockSizes(seq_split=fwd, bwd_seq_split=bwd)
  _check_split(256, seq_split=fwd, bwd_seq_split=bwd)
  x = jnp.ones((2, 256, 2, 16))
  f = lambda q: jnp.sum(lasad_attention(q, x, x, -x, width=8, impl="pallas", block_sizes=bs))  # noqa: E731
  assert _pallas_grids(jax.grad(f), x)["lasad_dstates"][0] == 2 * bwd


def _check_split(t, **block_sizes):
  """BlockSizes(seq_split=S): the two sequential kernels run on S segments from zero states and an
  XLA scan over segment ends fixes the per-chunk states and state gradients up. Against the
  float64 oracle, every gradient, a carry head and a partial head (so state crosses segment
  borders), per-example width and prefix, h0 and a final-state cotangent. T = 200 needs padding,
  where the split falls back to one segment. ``fused_forward``: the one-pass forward, whose split runs a
  segment-ends-only states pass first."""
  from kernels.lasad.pallas import BlockSizes
  q, k, v, g, s0 = make_inputs(11, 2, t, 2, 16, 16, 20.0, h0=True)   # mild decay: e^-4 per chunk
  rng = np.random.default_rng(4)
  do, dst = rng.standard_normal((2, t, 2, 16)), rng.standard_normal((2, 2, 16, 16))
  bnd = np.array([0.0, -0.3], np.float32)
  kw = dict(width=np.array([12, 16]), prefix=np.array([1, 5]), boundary=bnd)
  o, st, grads = run("pallas", q, k, v, g, s0, do.astype(np.float32), dst.astype(np.float32),
                     block_sizes=BlockSizes(**block_sizes), **kw)
  o_ref, st_ref, _ = oracle.forward(q, k, v, g, h0=s0, **kw)
  g_ref = oracle.backward(q, k, v, g, do, dst, h0=s0, **kw)
  assert oracle.rel_rms(o, o_ref) < 1e-4 and oracle.rel_rms(st, st_ref) < 1e-4
  for name in ("dq", "dk", "dv", "dg", "dh0"):
    assert oracle.rel_rms(grads[name], g_ref[name]) < 5e-4, name
  assert oracle.rel_rms(grads["dboundary"][1], g_ref["dboundary"][1]) < 5e-4


FORWARD_FORMS = {"two_pass": dict(fused_forward=False), "no_prefetch": dict(fused_prefetch=False),
                 "sub16": dict(sub=16)}


@pytest.mark.parametrize("form", FORWARD_FORMS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"T{c[1]}-w{c[6]}-b{c[8]}")
def test_pallas_forward_forms(case, form):
  """The forward's other forms (the default one-pass kernel is test_against_oracle's) against the
  float64 oracle, output and final state, every mask mode: BlockSizes(fused_forward=False), the
  two-launch forward (per-chunk states through HBM); the one-pass kernel's loop without the
  next-sub-chunk prefetch (``fused_prefetch=False``); and the one-pass kernel with 16-row
  sub-chunks."""
  from kernels.lasad.pallas import BlockSizes
  b, t, h, dk, dv, norm, width, prefix, boundary, h0 = case
  q, k, v, g, s0 = make_inputs(CASES.index(case), b, t, h, dk, dv, norm, h0)
  arr = lambda x: jnp.asarray(x, jnp.int32) if isinstance(x, list) else x  # noqa: E731
  o, st = lasad_attention(q, k, v, g, width=arr(width), prefix=arr(prefix),
                          boundary=np.asarray(boundary, np.float32), impl="pallas",
                          initial_state=s0, return_final_state=True,
                          block_sizes=BlockSizes(**FORWARD_FORMS[form]))
  o_ref, st_ref, _ = oracle.forward(q, k, v, g, width=width, prefix=prefix, boundary=boundary,
                                    h0=s0)
  assert oracle.rel_rms(o, o_ref) < TOL["pallas"]
  assert oracle.rel_rms(st, st_ref) < TOL["pallas"]


def test_sequence_split_auto_choice_and_block_size_errors():
  """seq_split=None (default) splits in 4 only for few (batch x head) programs and >= 16 chunks,
  and never where T needs padding; bad block sizes are refused with the field's name."""
  from kernels.lasad.pallas import BlockSizes, _fused_segments, _segments
  auto = BlockSizes()
  # B*H*S >= 512 with >= 8 chunks per segment, for B*H < 132
  assert _segments(auto, 1024, 1024, 8) == 2            # 16 chunks
  assert _segments(auto, 16384, 16384, 131) == 4
  from kernels.lasad.pallas import _bwd_blocks          # the backward's 32-token chunks
  assert [_segments(_bwd_blocks(auto), t, t, bh) for t, bh in
          ((16384, 32), (4096, 128), (1024, 8), (256, 8))] == [16, 4, 4, 1]
  assert _segments(_bwd_blocks(BlockSizes(bwd_seq_split=2)), 16384, 16384, 32) == 2
  assert _segments(_bwd_blocks(BlockSizes(seq_split=8)), 16384, 16384, 32) == 8
  assert _segments(auto, 16384, 16384, 132) == 1        # enough programs already
  assert _segments(auto, 960, 960, 8) == 1              # 15 chunks
  assert _segments(auto, 1024, 1000, 8) == 1            # padded T
  assert _segments(BlockSizes(seq_split=1), 16384, 16384, 8) == 1
  assert _segments(BlockSizes(seq_split=8), 1024, 1024, 4096) == 8
  # the one-pass forward's own split: B*H*S >= 1024, >= 4 chunks per segment, none from 512
  assert [_fused_segments(auto, t, t, bh) for t, bh in
          ((1024, 512), (256, 512), (4096, 128), (16384, 32), (256, 8), (1024, 8), (1000, 8))] \
      == [1, 1, 8, 32, 1, 4, 1]
  assert _fused_segments(BlockSizes(seq_split=2), 1024, 1024, 512) == 2
  with pytest.raises(ValueError, match="seq_split"):
    BlockSizes(seq_split=0)
  with pytest.raises(ValueError, match="bwd_seq_split"):
    BlockSizes(bwd_seq_split=1.5)
  with pytest.raises(ValueError, match="fused_maxnreg"):
    BlockSizes(fused_maxnreg=300)
  with pytest.raises(ValueError, match="bwd_maxnreg"):
    BlockSizes(bwd_maxnreg=168.0)
  with pytest.raises(ValueError, match="bwd_chunk"):
    BlockSizes(bwd_chunk=48)
  with pytest.raises(ValueError, match="cumsum"):
    BlockSizes(cumsum="tree")
  from kernels.lasad.pallas import _bwd_chunk
  assert [_bwd_chunk(b) for b in (auto, BlockSizes(sub=16), BlockSizes(chunk=32),
                                  BlockSizes(bwd_chunk=64))] == [32, 64, 32, 64]
  from kernels.lasad.pallas import _grads_warps   # given the backward's chunk: 4 for one sub-chunk
  assert [_grads_warps(b) for b in (BlockSizes(chunk=32), auto, BlockSizes(chunk=32,
                                    grads_num_warps=8))] == [4, 8, 8]
  with pytest.raises(ValueError, match="sub"):
    BlockSizes(sub=24)


def _pallas_eqns(fn, *args):
  """The pallas_call equations in fn's jaxpr (nested jaxprs included)."""
  found = []

  def walk(jaxpr):
    for e in jaxpr.eqns:
      if e.primitive.name == "pallas_call":
        found.append(e)
      for v in e.params.values():
        inner = getattr(v, "jaxpr", None)
        if inner is not None:
          walk(inner if hasattr(inner, "eqns") else inner.jaxpr)
  walk(jax.make_jaxpr(fn)(*args).jaxpr)
  return found


def _pallas_grids(fn, *args):
  """{kernel name: grid} of the pallas_calls in fn's jaxpr (nested jaxprs included)."""
  return {str(e.params["name"]): tuple(e.params["grid_mapping"].grid)
          for e in _pallas_eqns(fn, *args)}


def test_pallas_backward_runs_on_32_token_chunks():
  """By default the backward's kernels run on 32-token chunks (grid (B, T/32, H) for the gradient
  kernel), the forward keeps 64; ``BlockSizes(bwd_chunk=64)`` restores 64."""
  from kernels.lasad.pallas import BlockSizes
  x = jnp.ones((1, 128, 2, 16))

  def grids(**kw):
    f = lambda q: jnp.sum(lasad_attention(q, x, x, -x, width=8, impl="pallas", **kw))  # noqa: E731
    return _pallas_grids(jax.grad(f), x)
  assert grids()["lasad_grads"] == (1, 4, 2)
  assert grids(block_sizes=BlockSizes(bwd_chunk=64))["lasad_grads"] == (1, 2, 2)


GATE_CASES = [
    # (b, t, h, dk, dv, width, prefix, boundary, h0)
    (2, 63, 2, 8, 4, 8, 1, 0.0, True),                               # carry, K != V
    (2, 65, 2, 24, 8, 16, 1, -0.5, True),                            # K padded to 32
    (2, 100, 3, 8, 8, 7, 2, [-np.inf, 0.0, -1.5], True),             # per-head mixed
    (2, 90, 2, 8, 8, None, 0, 0.0, False),                           # no mask
    (3, 77, 2, 8, 8, [4, 6, 16], [1, 0, 3], -np.inf, False),         # per-example width/prefix
]


def _gate_inputs(b, t, h, dk, dv, h0, seed=0):
  rng = np.random.default_rng(seed)
  qr = rng.standard_normal((b, t, h, dk)).astype(np.float32)
  f = (2 * rng.standard_normal((b, t, h, dk)) + 1).astype(np.float32)
  v = rng.standard_normal((b, t, h, dv)).astype(np.float32)
  lb = np.stack([np.zeros(dk)] + [rng.uniform(0, 0.95, dk) for _ in range(h - 1)]).astype(np.float32)
  s0 = (0.3 * rng.standard_normal((b, h, dk, dv))).astype(np.float32) if h0 else None
  return qr, f, v, lb, s0


def _gated_run(impl, gate, qr, f, v, lb, s0, boundary, width, prefix, dtype=jnp.float32, **kw):
  """o, final state and the gradients of sum(o * do) + sum(S * dst) for qr, f, v, lb, h0 and the
  boundary through ``hgrn2_attention``."""
  from lasad_jax.ops import hgrn2_attention
  b, t, h, _ = qr.shape
  rng = np.random.default_rng(7)
  do = jnp.asarray(rng.standard_normal((b, t, h, v.shape[-1])), jnp.float32)
  dst = jnp.asarray(rng.standard_normal((b, h, qr.shape[-1], v.shape[-1])), jnp.float32)
  s0 = jnp.zeros((b, h, qr.shape[-1], v.shape[-1])) if s0 is None else s0
  width = jnp.asarray(width, jnp.int32) if isinstance(width, list) else width
  prefix = jnp.asarray(prefix, jnp.int32) if isinstance(prefix, list) else prefix

  def fn(qr, f, v, lb, s0, bnd):
    o, st = hgrn2_attention(qr.astype(dtype), f.astype(dtype), v.astype(dtype), lb, width=width,
                            prefix=prefix, boundary=bnd, initial_state=s0,
                            return_final_state=True, impl=impl, gate=gate, **kw)
    return jnp.sum(o.astype(jnp.float32) * do) + jnp.sum(st * dst), (o, st)

  bnd = jnp.broadcast_to(jnp.asarray(boundary, jnp.float32), (h,))
  (_, (o, st)), grads = jax.value_and_grad(fn, argnums=range(6), has_aux=True)(
      qr, f, v, lb, s0, bnd)
  return o, st, dict(zip(("dq_raw", "df", "dv", "dlb", "dh0", "dboundary"), grads))


@pytest.mark.parametrize("case", GATE_CASES)
def test_pallas_gate_in_kernel_matches_xla_gates(case):
  """``hgrn2_attention(gate="kernel")``: the Pallas kernels compute HGRN2's gates from q_raw and f
  themselves. Against the same gates in XLA followed by the float32 reference recurrence, forward,
  final state and the gradients of every input (lb and the boundary included), float32."""
  b, t, h, dk, dv, width, prefix, boundary, h0 = case
  qr, f, v, lb, s0 = _gate_inputs(b, t, h, dk, dv, h0)
  got = _gated_run("pallas", "kernel", qr, f, v, lb, s0, boundary, width, prefix)
  ref = _gated_run("reference", "xla", qr, f, v, lb, s0, boundary, width, prefix)
  assert oracle.rel_rms(got[0], ref[0]) < 1e-4
  assert oracle.rel_rms(got[1], ref[1]) < 1e-4
  _assert_gated_grads(got, ref, boundary, width, s0)


def _assert_gated_grads(got, ref, boundary, width, s0):
  """Every gradient of ``_gated_run`` against the reference's within 2e-4 relative RMS: finite,
  exactly 0 for reset heads' boundaries; dh0 only with an initial state."""
  h = np.asarray(got[2]["dv"]).shape[2]
  finite = np.isfinite(np.broadcast_to(np.asarray(boundary, np.float64), (h,)))
  for name, want in ref[2].items():
    g = np.asarray(got[2][name])
    assert np.all(np.isfinite(g)), f"{name} has NaN/inf"
    if name == "dboundary":
      np.testing.assert_array_equal(g[~finite], 0.0)   # resets: exactly 0
      if width is None or not finite.any():
        continue
      g, want = g[finite], np.asarray(want)[finite]
    if name == "dh0" and s0 is None:
      continue
    assert oracle.rel_rms(g, want) < 2e-4, (name, oracle.rel_rms(g, want))


def test_pallas_gate_in_kernel_bf16_error_no_worse():
  """At bf16 the in-kernel gates are as accurate as XLA's gates feeding the same kernels (both
  against the float32 reference on the unrounded inputs): o and every gradient within 1.2x + 1e-4,
  with the unfused and with the fused backward."""
  qr, f, v, lb, s0 = _gate_inputs(2, 100, 2, 32, 32, True, seed=3)
  args = (qr, f, v, lb, s0, -0.5, 10, 1)
  ref = _gated_run("reference", "xla", *args)
  kern = _gated_run("pallas", "kernel", *args, dtype=jnp.bfloat16)
  xla = _gated_run("pallas", "xla", *args, dtype=jnp.bfloat16)
  # the fused backward too (silu's derivative in the kernel, from the float32 dq)
  from kernels.lasad.pallas import BlockSizes
  fused = [_gated_run("pallas", "kernel", *args, dtype=jnp.bfloat16,
                      block_sizes=BlockSizes(fused_backward=True, bwd_dq_raw=raw))
           for raw in (False, True)]
  for got in [kern] + fused:
    _assert_gated_no_worse(got, xla, ref)


def _assert_gated_no_worse(got, base, ref):
  """Two bf16 ``_gated_run`` results against the float32 ``ref``: o and every gradient of
  ``got`` within 1.2x + 1e-4 of ``base``'s error."""
  pairs = [("o", got[0], base[0], ref[0])] + [
      (n, got[2][n], base[2][n], ref[2][n]) for n in ("dq_raw", "df", "dv", "dlb", "dh0")]
  for name, a, b_, r in pairs:
    ea, eb = oracle.rel_rms(a, r), oracle.rel_rms(b_, r)
    assert ea < 1.2 * eb + 1e-4, (name, ea, eb)


def _compare_gated(got, ref, tol=2e-4):
  assert oracle.rel_rms(got[0], ref[0]) < 1e-4 and oracle.rel_rms(got[1], ref[1]) < 1e-4
  for name, want in ref[2].items():
    g = np.asarray(got[2][name])
    assert np.all(np.isfinite(g)), f"{name} has NaN/inf"
    assert oracle.rel_rms(g, want) < tol, (name, oracle.rel_rms(g, want))


# (dv, block_v_scan, T, seq_split): whole heads per program, so the one-pass kernel normalises
# (32, 32); V in blocks of 16, so XLA normalises after it (32, None: the default at this small
# B*H); V padded 24 -> 32, the rms over the first 24 columns (24, 32); a sequence split of the
# forward into 2 segments (T = 512), normalised by XLA after it
@pytest.mark.parametrize("dv,bv,t,split", [(32, 32, 100, None), (32, None, 100, None),
                                           (24, 32, 100, None), (32, 32, 512, 2)])
def test_pallas_gate_in_kernel_head_norm(dv, bv, t, split, monkeypatch):
  """``hgrn2_attention(norm_eps=...)`` with the gates in the kernels: each head's output RMS-
  normalised (by the forward kernel where a program holds whole heads), its gradient from the
  normalised output and the inverse rms. Against the float32 reference then jnp's norm: output,
  final state and every gradient, awkward T, masked rows, an initial state."""
  from kernels.lasad import pallas as P
  qr, f, v, lb, s0 = _gate_inputs(2, t, 2, 32, dv, True, seed=5)
  args = (qr, f, v, lb, s0, -0.5, 10, 1)
  bs = P.BlockSizes(block_v_scan=bv, seq_split=split)
  calls = []
  monkeypatch.setattr(P, "_with_norm", lambda *a, f=P._with_norm: calls.append(1) or f(*a))
  got = _gated_run("pallas", "kernel", *args, norm_eps=1e-5, norm_save="n", block_sizes=bs)
  ref = _gated_run("reference", "xla", *args, norm_eps=1e-5)
  o = np.asarray(got[0], np.float64)
  np.testing.assert_allclose(np.mean(o * o, -1), 1.0, rtol=1e-3)   # normalised rows
  assert bool(calls) == (bv is None or split is not None)   # XLA's norm where the kernel cannot
  _compare_gated(got, ref)


def test_pallas_gate_in_kernel_head_norm_bf16_error_no_worse():
  """At bf16 the kernel's normalised output (from its float32 o) and the gradients through it
  (from the bf16 normalised output) are as accurate as XLA normalising the bf16 output, both
  against the float32 reference: within 1.2x + 1e-4."""
  from kernels.lasad.pallas import BlockSizes
  qr, f, v, lb, s0 = _gate_inputs(2, 100, 2, 32, 32, True, seed=3)
  args = (qr, f, v, lb, s0, -0.5, 10, 1)
  bs = BlockSizes(block_v_scan=32)
  ref = _gated_run("reference", "xla", *args, norm_eps=1e-5)
  kern = _gated_run("pallas", "kernel", *args, dtype=jnp.bfloat16, norm_eps=1e-5,
                    block_sizes=bs)
  xla = _gated_run("pallas", "xla", *args, dtype=jnp.bfloat16, norm_eps=1e-5, block_sizes=bs)
  _assert_gated_no_worse(kern, xla, ref)


@pytest.mark.parametrize("dv,t", [(32, 100), (24, 100), (32, 160)])
def test_pallas_fused_backward_head_norm(dv, t, monkeypatch):
  """``BlockSizes.bwd_norm``: the fused backward takes the gradient through the output norm
  itself (from the normalised output, its inverse rms and the incoming gradient) instead of
  XLA's pass before it. Float32 against the reference then jnp's norm, every gradient, V padded
  (24 -> 32: the rms over the first 24 columns), awkward T, with and without silu' in the
  kernel; at bf16 within 1.2x + 1e-4 of XLA's pass, both against the float32 reference."""
  from kernels.lasad import pallas as P
  qr, f, v, lb, s0 = _gate_inputs(2, t, 2, 32, dv, True, seed=5)
  args = (qr, f, v, lb, s0, -0.5, 10, 1)
  ref = _gated_run("reference", "xla", *args, norm_eps=1e-5)
  calls = []
  monkeypatch.setattr(P, "_norm_rows_bwd", lambda *a, f=P._norm_rows_bwd: calls.append(1) or f(*a))
  for raw in (False, True):
    bs = P.BlockSizes(block_v_scan=32, fused_backward=True, bwd_norm=True, bwd_dq_raw=raw)
    _compare_gated(_gated_run("pallas", "kernel", *args, norm_eps=1e-5, norm_save="n",
                              block_sizes=bs), ref)
  assert not calls   # the kernel's, not XLA's pass
  if dv != 32 or t != 100:
    return
  runs = [_gated_run("pallas", "kernel", *args, dtype=jnp.bfloat16, norm_eps=1e-5,
                     norm_save="n", block_sizes=P.BlockSizes(block_v_scan=32, fused_backward=True,
                                                             bwd_norm=inside))
          for inside in (True, False)]
  assert len(calls) == 1   # bwd_norm=False: XLA's pass
  _assert_gated_no_worse(*runs, ref)


def _kernel_names(fn, *args):
  """Names of the pallas_calls in the jaxpr of fn(*args), sub-jaxprs included."""
  from jax.extend import core

  def walk(jaxpr):
    for e in jaxpr.eqns:
      if e.primitive.name == "pallas_call":
        yield e.params["name"]
      for p in e.params.values():
        for sub in p if isinstance(p, (list, tuple)) else [p]:
          if isinstance(sub, (core.ClosedJaxpr, core.Jaxpr)):
            yield from walk(getattr(sub, "jaxpr", sub))
  return list(walk(jax.make_jaxpr(fn)(*args).jaxpr))


# (sub, prefetch, seq_split): 32-row sub-chunks (32-row backward chunks: every other one advances
# the saved state), with and without the one-pass kernel's prefetch loop; 16-row sub-chunks, a
# state kept every 4th (64-row backward chunks); a split forward, and 128-row chunks over 32-row
# backward chunks (nothing saved in either: recomputed); 32-row chunks, unsplit (at this small
# B*H the automatic split would take them; every state the backward reads is saved, none advanced)
@pytest.mark.parametrize("sub,prefetch,split,chunk", [(32, True, None, 64), (32, False, None, 64),
                                                      (16, True, None, 64), (32, True, 2, 64),
                                                      (32, True, None, 128), (32, True, 1, 32)])
def test_pallas_forward_saves_the_backward_states(sub, prefetch, split, chunk):
  """BlockSizes.save_states (opt-in): with a named output norm the one-pass forward kernel
  writes the state entering each of its chunks, the backward's states kernel does not run, and
  where the forward's chunks are two of the backward's the gradient kernel advances the saved
  state through the 32-row chunk before; the gradients are those of the recomputed states to float32 rounding (the
  kernels' cumulative sums differ in order), forward, every input, masked rows, h0."""
  from kernels.lasad.pallas import BlockSizes
  from lasad_jax.ops import hgrn2_attention
  qr, f, v, lb, s0 = _gate_inputs(2, 256, 2, 32, 32, True, seed=13)
  args = ("pallas", "kernel", qr, f, v, lb, s0, -0.5, 10, 1)
  got = {}
  for save in (True, False):
    bs = BlockSizes(sub=sub, fused_prefetch=prefetch, seq_split=split, block_v_scan=32,
                    save_states=save, chunk=chunk)
    got[save] = _gated_run(*args, norm_eps=1e-5, norm_save="n", block_sizes=bs)
    names = _kernel_names(jax.grad(lambda x, bs=bs: jnp.sum(hgrn2_attention(
        x, x, x, jnp.asarray(lb), width=10, impl="pallas", gate="kernel", norm_eps=1e-5,
        norm_save="n", block_sizes=bs))), jnp.asarray(qr))
    recompute = not save or split not in (None, 1) or chunk == 128
    assert names.count("lasad_states") == int(recompute), names
  assert oracle.rel_rms(got[True][0], got[False][0]) < 1e-6
  for name, want in got[False][2].items():
    err = oracle.rel_rms(got[True][2][name], want)
    assert err < 1e-5, (name, err)


def test_hgrn2_attention_bad_input():
  from lasad_jax.ops import hgrn2_attention
  x = jnp.zeros((1, 8, 2, 4))
  with pytest.raises(ValueError, match="`lb`"):
    hgrn2_attention(x, x, x, jnp.zeros((4,)), impl="chunk")
  with pytest.raises(ValueError, match="`f`"):
    hgrn2_attention(x, x[:, :4], x, jnp.zeros((2, 4)), impl="chunk")
  with pytest.raises(ValueError, match="impl='pallas'"):
    hgrn2_attention(x, x, x, jnp.zeros((2, 4)), impl="chunk", gate="kernel")
  with pytest.raises(ValueError, match="`gate`"):
    hgrn2_attention(x, x, x, jnp.zeros((2, 4)), gate="inside")
  with pytest.raises(ValueError, match="`norm_eps`"):
    hgrn2_attention(x, x, x, jnp.zeros((2, 4)), impl="chunk", norm_eps=0.0)


@pytest.mark.parametrize("diag,prefetch", [("auto", False), ("loop", False), ("bcast", False),
                                           ("auto", True), ("auto", "qdq"), ("auto", "sub16"),
                                           ("loop", "sub16")])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"T{c[1]}-w{c[6]}-b{c[8]}")
def test_pallas_fused_backward(case, diag, prefetch):
  """``BlockSizes(fused_backward=True)``: the whole backward as one kernel per (batch, head), a
  forward walk carrying S (dq) and a backward walk carrying dS (dk, dv, dg), against the oracle
  at the tolerances of the unfused form; every diagonal form (the fallback loop too), and with
  the next sub-chunk's rows loaded a step ahead (``bwd_prefetch``, and its q dq too), and on
  16-row steps under the forward's 32 (``bwd_sub``)."""
  from kernels.lasad.pallas import BlockSizes
  _check_against_oracle("pallas", case, block_sizes=BlockSizes(
      fused_backward=True, diag=diag, bwd_prefetch=bool(prefetch),
      bwd_prefetch_qdq=prefetch == "qdq", bwd_sub=16 if prefetch == "sub16" else None))


@pytest.mark.parametrize("case", GATE_CASES)
def test_pallas_fused_backward_gate_in_kernel(case):
  """The fused backward with HGRN2's gates in the kernel (d f in the dk slot, d lb summed over
  the whole sequence per head): against XLA's gates and the float32 reference, as the unfused
  form is."""
  from kernels.lasad.pallas import BlockSizes
  b, t, h, dk, dv, width, prefix, boundary, h0 = case
  qr, f, v, lb, s0 = _gate_inputs(b, t, h, dk, dv, h0)
  ref = _gated_run("reference", "xla", qr, f, v, lb, s0, boundary, width, prefix)
  # silu's derivative by XLA, or in the kernel, on the forward's 32-row steps; the defaults
  # (16-row steps, in the kernel)
  for kw in (dict(bwd_dq_raw=False, bwd_sub=None), dict(bwd_dq_raw=True, bwd_sub=None), {}):
    got = _gated_run("pallas", "kernel", qr, f, v, lb, s0, boundary, width, prefix,
                     block_sizes=BlockSizes(fused_backward=True, **kw))
    _assert_gated_grads(got, ref, boundary, width, s0)


def test_pallas_fused_backward_auto_choice():
  """``fused_backward=None`` runs the one backward kernel (grid (B, H)) from B*H =
  FUSED_BWD_MIN_BH with K, V <= 64, else the states, state-gradient and gradient kernels;
  True / False force either; saved forward states keep the unfused form."""
  from kernels.lasad.pallas import FUSED_BWD_MIN_BH, BlockSizes
  h = 2
  wide = jnp.ones((FUSED_BWD_MIN_BH // h, 64, h, 16))
  narrow = jnp.ones((FUSED_BWD_MIN_BH // h - 1, 64, h, 16))

  def kernels(x, **kw):
    f = lambda q: jnp.sum(lasad_attention(q, x, x, -x, width=8, impl="pallas", **kw))  # noqa: E731
    return _pallas_grids(jax.grad(f), x)
  got = kernels(wide)
  assert got["lasad_bwd_fused"] == (FUSED_BWD_MIN_BH // h, h)
  assert not {"lasad_grads", "lasad_states", "lasad_dstates"} & set(got)
  assert {"lasad_grads", "lasad_states", "lasad_dstates"} <= set(kernels(narrow))
  assert "lasad_bwd_fused" not in kernels(narrow)
  assert "lasad_bwd_fused" in kernels(narrow, block_sizes=BlockSizes(fused_backward=True))
  assert "lasad_bwd_fused" not in kernels(wide, block_sizes=BlockSizes(fused_backward=False))
  assert "lasad_bwd_fused" not in kernels(jnp.ones((FUSED_BWD_MIN_BH // h, 64, h, 128)))


@pytest.mark.parametrize("split", [True, False])
def test_pallas_fused_backward_bf16_error_no_worse(split):
  """bf16 inputs against the float64 oracle: the fused backward's gradients within 1.2x of the
  unfused kernels' (and so of the XLA chunk form, test_pallas_bf16_gradient_accuracy) with split
  dots; without them all but dg. T = 384 walks 12 sub-chunks in each direction."""
  from kernels.lasad.pallas import BlockSizes
  (q, k, v, g, do, dst, h0), x64 = _bf16_case(8, 7)
  okw = dict(width=16, prefix=1, boundary=-0.5, h0=np.asarray(h0, np.float64))
  ref = oracle.backward(*x64, np.asarray(do, np.float64), np.asarray(dst, np.float64), **okw)

  def errs(fused):
    bs = BlockSizes(split_dots=split, fused_backward=fused)
    f = lambda *x: lasad_attention(*x[:4], width=16, prefix=1, boundary=-0.5,  # noqa: E731
                                   initial_state=x[4], impl="pallas", return_final_state=True,
                                   block_sizes=bs)
    (o, _), vjp = jax.vjp(f, q, k, v, g, h0)
    got = dict(zip(("dq", "dk", "dv", "dg", "dh0"), vjp((do.astype(o.dtype), dst))))
    return {n: oracle.rel_rms(got[n], ref[n]) for n in got}
  fused, unfused = errs(True), errs(False)
  for n in fused:
    if n == "dg" and not split:
      # bf16-rounded S and dS give every row's q dq - k dk ~2^-9 error, which the fused dg sums
      # over all later rows (the unfused form restarts each chunk from float32 S_out dS_out):
      # measured 3.4x here, so fused_backward=None keeps the unfused form without split dots
      assert fused[n] > 2 * unfused[n], (fused, unfused)
      continue
    assert fused[n] < 1.2 * unfused[n] + 1e-5, (n, fused, unfused)


NO_STATE_FORMS = {"default": {}, "fused_bwd": dict(fused_backward=True),
                  "two_pass_unfused": dict(fused_forward=False, fused_backward=False),
                  "seq_split": dict(seq_split=2)}


@pytest.mark.parametrize("form", NO_STATE_FORMS)
@pytest.mark.parametrize("boundary", [-np.inf, [-0.4, 0.0, -np.inf]], ids=["scalar", "per_head"])
def test_pallas_without_state_arrays(form, boundary):
  """No initial state and no final state asked for (the training path): the kernels start from
  zeros and write no final state or initial-state gradient, and scalar width / prefix /
  boundary go in as [1] arrays; no pallas_call takes or returns a [B, H, K, V] array. Output and
  every gradient against the float64 oracle (zero h0, no final-state cotangent), in the
  default forms, the two-pass forward with the three-kernel backward, and a sequence split."""
  from kernels.lasad.pallas import BlockSizes
  b, t, h, d = 2, 256, 3, 16
  q, k, v, g, _ = make_inputs(21, b, t, h, d, d, 20.0)
  do = np.random.default_rng(5).standard_normal((b, t, h, d)).astype(np.float32)
  bnd = np.asarray(boundary, np.float32)
  bs = BlockSizes(**NO_STATE_FORMS[form])

  def f(q, k, v, g, bd):
    return lasad_attention(q, k, v, g, width=12, prefix=1, boundary=bd, impl="pallas",
                           block_sizes=bs)

  o, vjp = jax.vjp(f, q, k, v, g, jnp.asarray(bnd))
  grads = dict(zip(("dq", "dk", "dv", "dg", "dboundary"), vjp(jnp.asarray(do))))
  kw = dict(width=12, prefix=1, boundary=boundary)
  o_ref, _, _ = oracle.forward(q, k, v, g, **kw)
  g_ref = oracle.backward(q, k, v, g, do, np.zeros((b, h, d, d)), **kw)
  assert oracle.rel_rms(o, o_ref) < 1e-4
  for name in ("dq", "dk", "dv", "dg"):
    assert oracle.rel_rms(grads[name], g_ref[name]) < 5e-4, name
  assert grads["dboundary"].shape == bnd.shape
  finite = np.isfinite(np.broadcast_to(bnd, (h,)))
  if finite.any():
    got, ref = np.broadcast_to(grads["dboundary"], (h,)), g_ref["dboundary"]
    assert oracle.rel_rms(got[finite], ref[finite]) < 5e-4

  loss = lambda *x: jnp.sum(f(*x) * do)  # noqa: E731
  shapes = _pallas_shapes(jax.grad(loss, argnums=(0, 1, 2, 3, 4)), q, k, v, g, bnd)
  assert shapes, "no pallas_call found"
  assert (b, h, d, d) not in shapes, "a [B, H, K, V] state went through HBM"
  assert (b,) not in shapes, "width / prefix were broadcast to [B]"
  if bnd.ndim == 0:
    assert (h,) not in shapes, "the boundary was broadcast to [H]"


def _pallas_shapes(fn, *args):
  """The shapes of every operand and result of the pallas_calls in fn's jaxpr (nested too)."""
  return [tuple(x.aval.shape) for e in _pallas_eqns(fn, *args)
          for x in list(e.invars) + list(e.outvars)]


def test_hgrn2_training_path_has_no_state_arrays():
  """LASADGen's attention call in training (hgrn2_attention, gates in the kernels, the output
  norm named for remat, no initial or final state): its forward and backward pallas_calls move
  no [B, H, K, V] state and take width / prefix / boundary as [1] arrays; the gradients equal
  those of the call with a zero initial state and the final state out (zero cotangent)."""
  from lasad_jax.ops import hgrn2_attention
  b, t, h, d = 2, 128, 3, 16
  rng = np.random.default_rng(8)
  qr, f, v, do = (jnp.asarray(rng.standard_normal((b, t, h, d)), jnp.float32) for _ in range(4))
  lb = jnp.asarray(rng.uniform(0, 0.9, (h, d)), jnp.float32)
  kw = dict(width=8, prefix=1, boundary=-np.inf, impl="pallas", gate="kernel", norm_eps=1e-5,
            norm_save="n")

  def loss(qr, f, v, lb, state):
    if state:
      o, _ = hgrn2_attention(qr, f, v, lb, initial_state=jnp.zeros((b, h, d, d)),
                             return_final_state=True, **kw)
    else:
      o = hgrn2_attention(qr, f, v, lb, **kw)
    return jnp.sum(o * do)
  grad = jax.grad(loss, argnums=(0, 1, 2, 3))
  shapes = _pallas_shapes(lambda *x: grad(*x, False), qr, f, v, lb)
  assert shapes and (b, h, d, d) not in shapes and (b,) not in shapes and (h,) not in shapes
  for a, r in zip(grad(qr, f, v, lb, False), grad(qr, f, v, lb, True)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(r), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("fused_bwd", [False, True], ids=["three_kernel_bwd", "fused_bwd"])
@pytest.mark.parametrize("has_h0,final", [(False, True), (True, False)],
                         ids=["final_no_h0", "h0_no_final"])
def test_pallas_one_state_only(has_h0, final, fused_bwd):
  """One of the two states: no initial state but the final one out (prefill; its cotangent
  given), or an initial state in and no final state (a continuation; dh0 from the output alone).
  Output, final state and every gradient against the float64 oracle, both backward forms."""
  from kernels.lasad.pallas import BlockSizes
  b, t, h, d = 2, 96, 2, 16
  q, k, v, g, s0 = make_inputs(22, b, t, h, d, d, 5.0, h0=has_h0)
  rng = np.random.default_rng(6)
  do = rng.standard_normal((b, t, h, d))
  dst = rng.standard_normal((b, h, d, d)) if final else np.zeros((b, h, d, d))
  kw = dict(width=8, prefix=1, boundary=-0.5)
  bs = BlockSizes(fused_backward=fused_bwd)

  def f(q, k, v, g, s0):
    return lasad_attention(q, k, v, g, impl="pallas", initial_state=s0 if has_h0 else None,
                           return_final_state=final, block_sizes=bs, **kw)
  x0 = jnp.asarray(s0) if has_h0 else jnp.zeros((b, h, d, d))
  out, vjp = jax.vjp(f, q, k, v, g, x0)
  ct = (jnp.asarray(do, jnp.float32), jnp.asarray(dst, jnp.float32)) if final else \
      jnp.asarray(do, jnp.float32)
  grads = dict(zip(("dq", "dk", "dv", "dg", "dh0"), vjp(ct)))
  o_ref, st_ref, _ = oracle.forward(q, k, v, g, h0=s0, **kw)
  g_ref = oracle.backward(q, k, v, g, do, dst, h0=s0, **kw)
  o = out[0] if final else out
  assert oracle.rel_rms(o, o_ref) < 1e-4
  if final:
    assert oracle.rel_rms(out[1], st_ref) < 1e-4
  for name in ("dq", "dk", "dv", "dg") + (("dh0",) if has_h0 else ()):
    assert oracle.rel_rms(grads[name], g_ref[name]) < 5e-4, name
