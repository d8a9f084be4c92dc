"""Residual add + RMSNorm (kernels/norm/add_rms.py): the Pallas kernels (interpreted on CPU)
against the jnp reference, forward and every gradient; the model with config.fused_norm."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from configs.lasad import get_config
from kernels.norm.add_rms import BlockSizes, add_rms_pallas, add_rms_reference, column_block
from lasad_jax import model as M
from lasad_jax.ops import default_impl
from oracle import rel_rms


def _case(lead, dim, n_d, seed=0):
  ks = jax.random.split(jax.random.key(seed), 6)
  x = 3.0 * jax.random.normal(ks[0], lead + (dim,))
  ds = tuple(jax.random.normal(ks[1 + i], lead + (dim,)).astype(jnp.bfloat16)
             for i in range(n_d))
  w = 1.0 + 0.1 * jax.random.normal(ks[3], (dim,))
  gy = jax.random.normal(ks[4], lead + (dim,))
  gh = jax.random.normal(ks[5], lead + (dim,)).astype(jnp.bfloat16)
  return x, ds, w, gy, gh


def _run(f, x, ds, w, gy, gh):
  def loss(x, ds, w):
    y, h = f(x, ds, w, 1e-5, jnp.bfloat16)
    return jnp.sum(y * gy) + jnp.sum(h.astype(jnp.float32) * gh.astype(jnp.float32))
  return f(x, ds, w, 1e-5, jnp.bfloat16), jax.grad(loss, argnums=(0, 1, 2))(x, ds, w)


# (leading shape, dim, deltas, save_output): rows not a multiple of the program's block (padding),
# a dim in three column blocks of 256 (LASADGen-B's 768), one and two deltas
# (a ``save_output`` name: the gradient kernel reads y instead of x + deltas)
@pytest.mark.parametrize("lead,dim,n_d,save", [((3, 37), 1024, 2, None), ((2, 64), 768, 1, None),
                                               ((5,), 192, 1, None), ((3, 37), 1024, 2, "out"),
                                               ((5,), 192, 1, "out")])
def test_kernel_matches_reference(lead, dim, n_d, save):
  case = _case(lead, dim, n_d)
  (y0, h0), (gx0, gd0, dw0) = _run(add_rms_reference, *case)
  f = lambda *a: add_rms_pallas(*a, save, block_sizes=BlockSizes(rows=2, steps=4))  # noqa: E731
  (y1, h1), (gx1, gd1, dw1) = _run(f, *case)
  assert y1.dtype == jnp.float32 and h1.dtype == jnp.bfloat16 and gd1[0].dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(y1), np.asarray(y0))   # the same float32 adds
  # h: bf16 roundings flip where the two sums of squares differ in the last bit (~1e-5 seen)
  assert rel_rms(h1, h0) < 1e-4
  assert rel_rms(gx1, gx0) < 1e-6 and rel_rms(dw1, dw0) < 1e-6
  for a, b in zip(gd1, gd0):
    assert rel_rms(a, b) < 1e-4   # gx rounded to bf16: a flip where gx differs in the last bits


@pytest.mark.parametrize("lead,copies", [((3, 37), 3), ((4, 16), 2)])
def test_kernel_copies(lead, copies):
  """h given to ``copies`` consumers as separate outputs (one buffer): each copy's cotangent goes
  into the backward kernel, which adds them; the same gradients as one h whose cotangent is their
  sum. (3, 37) rows need padding, where h is sliced once and then copied."""
  x, ds, w, gy, _ = _case(lead, 1024, 1)
  # small integers: their sums are exact in bf16 too, so autodiff's bf16 sum of the cotangents
  # (the reference) and the kernel's float32 sum agree and the comparison can be tight
  ghs = [jax.random.randint(jax.random.key(10 + i), x.shape, -8, 9).astype(jnp.bfloat16)
         for i in range(copies)]

  def loss(f, x, ds, w):
    y, hs = f(x, ds, w, 1e-5, jnp.bfloat16, None, copies)
    assert isinstance(hs, tuple) and len(hs) == copies
    return jnp.sum(y * gy) + sum(jnp.sum(h.astype(jnp.float32) * g.astype(jnp.float32))
                                 for h, g in zip(hs, ghs))
  kern = functools.partial(add_rms_pallas, block_sizes=BlockSizes(rows=2, steps=4))
  g0 = jax.grad(functools.partial(loss, add_rms_reference), argnums=(0, 1, 2))(x, ds, w)
  g1 = jax.grad(functools.partial(loss, kern), argnums=(0, 1, 2))(x, ds, w)
  (gx1, (gd1,), dw1), (gx0, (gd0,), dw0) = g1, g0
  assert rel_rms(gx1, gx0) < 1e-6 and rel_rms(dw1, dw0) < 1e-6
  assert rel_rms(gd1, gd0) < 1e-4   # gx rounded to bf16, as in test_kernel_matches_reference
  y, hs = kern(x, ds, w, 1e-5, jnp.bfloat16, None, copies)
  _, h = kern(x, ds, w, 1e-5, jnp.bfloat16)
  for c in hs:
    np.testing.assert_array_equal(np.asarray(c), np.asarray(h))


def test_kernel_bad_input():
  x, ds, w, _, _ = _case((4,), 128, 1)
  with pytest.raises(ValueError, match="x must be float32"):
    add_rms_pallas(x.astype(jnp.bfloat16), ds, w, 1e-5, jnp.bfloat16)
  with pytest.raises(ValueError, match=r"deltas\[0\] has shape"):
    add_rms_pallas(x, (ds[0][:2],), w, 1e-5, jnp.bfloat16)
  with pytest.raises(ValueError, match="w must have shape"):
    add_rms_pallas(x, ds, w[:64], 1e-5, jnp.bfloat16)
  with pytest.raises(ValueError, match="power-of-two divisor"):
    add_rms_pallas(x[:, :96], (ds[0][:, :96],), w[:96], 1e-5, jnp.bfloat16)
  with pytest.raises(ValueError, match="copies must be an int >= 1"):
    add_rms_pallas(x, ds, w, 1e-5, jnp.bfloat16, copies=0)
  with pytest.raises(ValueError, match="rows must be a power of two"):
    add_rms_pallas(x, ds, w, 1e-5, jnp.bfloat16, block_sizes=BlockSizes(rows=3))
  assert column_block(1024) == 1024 and column_block(3200) == 128 and column_block(96) is None


def _model_grads(dtype, mode, scan):
  tok = jax.random.randint(jax.random.key(1), (2, 32), 0, 17)
  c = get_config("tiny")
  c.dtype, c.fused_norm, c.scan_layers = dtype, mode, scan
  params = M.LASADGen(c, rngs=nnx.Rngs(0)).params()
  c = ml_collections.FrozenConfigDict(c)

  def loss(p):
    logits = M.forward(c, p, tok, jnp.array([0, 1]), width=8)
    return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(
        logits, tok[..., None], -1)[..., 0])
  with jax.default_matmul_precision("highest"):   # no TF32 on a GPU: it would swamp 1e-5
    return jax.jit(jax.value_and_grad(loss))(params)


@pytest.mark.parametrize("scan", [True, False])
def test_model_fused_norm_pallas_matches_xla(scan):
  """The model's loss and gradients with the kernels (interpreted) against the jnp path's (in a
  scan only the FFN norm is fused; unrolled, the block-end norm too)."""
  def worst(a, b):
    return max(rel_rms(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))

  # float32: the same math up to summation order (~7e-7 seen)
  (l0, g0), (l1, g1) = (_model_grads("float32", m, scan) for m in ("xla", "pallas"))
  assert abs(float(l1) - float(l0)) < 1e-6 * abs(float(l0))
  assert worst(g1, g0) < 1e-5
  # bf16 (the training dtype): h and the delta gradients are rounded to bf16, and a rounding that
  # flips between the two paths propagates (~1e-2 seen); it must stay below bf16's own distance
  # from float32 on the jnp path
  (_, b0), (_, b1) = (_model_grads("bfloat16", m, scan) for m in ("xla", "pallas"))
  assert worst(b1, b0) < worst(b0, g0)
  with pytest.raises(ValueError, match="fused_norm"):
    _model_grads("float32", "triton", scan)


def test_model_fused_norm_auto_resolves():
  c = get_config("tiny")
  assert M.add_rms_impl(c) is add_rms_reference   # layers in a scan: jnp (measured faster)
  c.scan_layers = False
  on_gpu = default_impl() == "pallas"
  assert M.add_rms_impl(c) is (add_rms_pallas if on_gpu else add_rms_reference)
  c.impl = "pallas"
  assert M.add_rms_impl(c) is add_rms_pallas
  c.dim = 96
  assert M.add_rms_impl(c) is add_rms_reference   # no power-of-two divisor >= 64: jnp
  c.fused_norm = "pallas"
  with pytest.raises(ValueError, match="power-of-two divisor"):
    M.add_rms_impl(c)


@pytest.mark.parametrize("scan", [True, False])
def test_model_remat_keeps_nothing_extra(scan):
  """Under remat the fused norms keep nothing the plain model did not. Unrolled, the second
  norm's gradient reads the block output (named "block_out", the next block's input anyway), so
  the w2 matmul's output is not kept for it (keeping it was +3.2 GB for L at batch 256 on an
  H100: out of memory, session 21). In a scan the block output would be a second stacked copy of
  the carry, so there the block ends with a plain add: one float32 stack, the carry. Checked on
  the jnp path, whose saved list is exact (the kernels' lists name a dead call's inputs too)."""
  from jax._src.ad_checkpoint import saved_residuals
  c = get_config("tiny")
  c.update(dtype="bfloat16", remat=True, remat_policy="dots_attn_acts", scan_layers=scan,
           fused_norm="xla")
  params = M.LASADGen(c, rngs=nnx.Rngs(0)).params()
  c = ml_collections.FrozenConfigDict(c)
  tok = jnp.zeros((2, 32), jnp.int32)

  def loss(p):
    return jnp.mean(M.forward(c, p, tok, jnp.array([0, 1]), width=8))
  saved = saved_residuals(loss, params)
  if scan:
    stacks = [aval for aval, _ in saved if aval.dtype == jnp.float32 and aval.ndim == 4]
    assert len(stacks) == 1, stacks
    return
  ffn_out = [why for aval, why in saved
             if "_swiglu" in why and "dot_general" in why and aval.shape[-1] == c.dim]
  assert not ffn_out, ffn_out
  assert sum("block_out" in why for _, why in saved) == c.num_layers


def _bf16_cotangent_sums(jaxpr, dim):
  """add_any equations with a bf16 [..., dim] output, in sub-jaxprs too."""
  n = 0
  for e in jaxpr.eqns:
    out = e.outvars[0].aval
    n += (e.primitive.name == "add_any" and out.dtype == jnp.bfloat16 and out.shape[-1] == dim)
    for v in e.params.values():
      sub = getattr(v, "jaxpr", v)
      if hasattr(sub, "eqns"):
        n += _bf16_cotangent_sums(sub, dim)
  return n


def _unrolled_grad(mode, copies, tok):
  c = get_config("tiny")
  c.update(dtype="bfloat16", scan_layers=False, remat=True, remat_policy="dots_attn_acts",
           fused_norm=mode, norm_copies=copies)
  params = M.LASADGen(c, rngs=nnx.Rngs(0)).params()
  c = ml_collections.FrozenConfigDict(c)
  loss = lambda p: jnp.mean(M.forward(c, p, tok, jnp.zeros(tok.shape[:1], jnp.int32), width=8))  # noqa: E731
  return jax.grad(loss), params, c


def _temp_bytes(grad, params):
  """Temporary memory of the compiled gradient (XLA's buffer assignment)."""
  return jax.jit(grad).lower(params).compile().memory_analysis().temp_size_in_bytes


def test_model_copies_leave_no_cotangent_sums():
  """Unrolled with the kernels, each normed h reaches its matmuls as separate copies, so autodiff
  sums none of their bf16 gradients (the kernel adds them as it reads them); only block 0's
  attention norm (XLA's) keeps its two sums of three. Without copies (config.norm_copies=False),
  and on the jnp path, there are 3 per layer."""
  tok = jnp.zeros((2, 32), jnp.int32)
  sums = {}
  for mode, copies in (("xla", True), ("pallas", True), ("pallas", False)):
    g, params, c = _unrolled_grad(mode, copies, tok)
    sums[mode, copies] = _bf16_cotangent_sums(jax.make_jaxpr(g)(params).jaxpr, c.dim)
  n = c.num_layers
  assert sums == {("xla", True): 3 * n, ("pallas", True): 2, ("pallas", False): 3 * n}, sums


def test_model_copies_cost_no_memory():
  """The copies are one buffer: they add nothing to the compiled gradient's temporary memory (XLA
  on the CPU, kernels interpreted: 72 bytes apart when written; compiled on an H100, 131 KB less
  with them; three real copies of h, seeded by hand, were +262 KB on the CPU)."""
  tok = jnp.zeros((4, 128), jnp.int32)
  temp = {}
  for copies in (True, False):
    temp[copies] = _temp_bytes(*_unrolled_grad("pallas", copies, tok)[:2])
  assert temp[True] <= temp[False] + 1024, temp


# head_dim 16: one program holds a whole head (as at LASADGen-L's training shape), the kernel
# normalises; 32 at this small B*H: V in blocks of 16, XLA normalises inside the op
@pytest.mark.parametrize("scan,head_dim", [(True, 16), (False, 16), (False, 32)])
def test_model_kernel_head_norm(scan, head_dim, monkeypatch):
  """config.kernel_head_norm: the attention's per-head norm by the forward kernel (or XLA inside
  the op) gives the loss and gradients of XLA's norm in the model, float32, kernels interpreted,
  under remat."""
  from kernels.lasad import pallas as P
  whole_heads = head_dim == 16
  xla_norms = []
  monkeypatch.setattr(P, "_with_norm", lambda *a, f=P._with_norm: xla_norms.append(1) or f(*a))
  tok = jax.random.randint(jax.random.key(3), (2, 40), 0, 17)
  out = {}
  for on in (True, False):
    c = get_config("tiny")
    c.update(impl="pallas", scan_layers=scan, kernel_head_norm=on, remat=True,
             remat_policy="dots_attn_acts", head_dim=head_dim, num_heads=c.dim // head_dim)
    assert M.kernel_head_norm(c) == on
    params = M.LASADGen(c, rngs=nnx.Rngs(0)).params()
    c = ml_collections.FrozenConfigDict(c)

    def loss(p, c=c):
      logits = M.forward(c, p, tok, jnp.array([0, 1]), width=8)
      return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(
          logits, tok[..., None], -1)[..., 0])
    with jax.default_matmul_precision("highest"):
      out[on] = jax.jit(jax.value_and_grad(loss))(params)
  assert bool(xla_norms) != whole_heads   # the kernel normalised, or XLA inside the op
  (l1, g1), (l0, g0) = out[True], out[False]
  assert abs(float(l1) - float(l0)) < 1e-6 * abs(float(l0))
  assert max(rel_rms(a, b) for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0))) < 1e-5
  c = get_config("tiny")
  assert not M.kernel_head_norm(c) or default_impl() == "pallas"   # CPU: the jnp paths


def test_model_kernel_head_norm_does_not_rerun_the_forward(monkeypatch):
  """Under remat the op's normalised output and inverse rms are named "attn_out", so the backward
  reads them and the forward kernel's recomputation is dead (XLA drops it). Measured as what the
  compiled gradient keeps of the forward kernel: its ops' count of "lasad_fused_forward" in the
  HLO is about that without the kernel norm, and doubles when the values are left unnamed, which
  shows a rerun (without / named / unnamed: 930 / 978 / 1954 on the CPU, kernels interpreted; 8 /
  10 / 18 compiled on an H100, session 22). With config.kernel_save_states the saved states carry
  the same name: still no rerun (1056 on the CPU; 12 on an H100, session 23), and the backward's
  states kernel is gone from the compiled gradient."""
  import re
  orig = M.hgrn2_attention
  tok = jnp.zeros((2, 40), jnp.int32)

  def kernel_ops(on, save, states=False):
    monkeypatch.setattr(M, "hgrn2_attention", lambda *a, **k: orig(
        *a, **{**k, "norm_save": k["norm_save"] if save else None}))
    c = get_config("tiny")
    c.update(impl="pallas", scan_layers=False, kernel_head_norm=on, remat=True,
             remat_policy="dots_attn_acts", kernel_save_states=states)
    params = M.LASADGen(c, rngs=nnx.Rngs(0)).params()
    c = ml_collections.FrozenConfigDict(c)
    loss = lambda p: jnp.mean(M.forward(c, p, tok, jnp.array([0, 1]), width=8))  # noqa: E731
    hlo = jax.jit(jax.grad(loss)).lower(params).compile().as_text()
    return len(re.findall("lasad_fused_forward", hlo)), len(re.findall("lasad_states", hlo))
  (off, states_off), (named, _), (unnamed, _) = (
      kernel_ops(False, True), kernel_ops(True, True), kernel_ops(True, False))
  assert named < 1.5 * off and unnamed > 1.7 * off, (off, named, unnamed)
  saved, states_saved = kernel_ops(True, True, states=True)
  # (the states are one more output of the kernel, so a few more ops name it: <=, not <)
  assert saved <= 1.5 * off and states_off > 0 and states_saved == 0, (off, saved, states_saved)


@pytest.mark.parametrize("scan", [True, False])
def test_model_kernel_head_norm_keeps_no_second_copy(scan):
  """The op's normalised output is the value its gradient keeps and the wo matmul's operand, one
  named value: the compiled gradient's temporary memory is no larger than with XLA's norm. (With
  the model naming the output again, the scan stacked it twice: +155 KB here, +3.2 GB for
  LASADGen-L at batch 256.)"""
  tok = jnp.zeros((4, 256), jnp.int32)
  temp = {}
  for on in (True, False):
    c = get_config("tiny")
    c.update(impl="pallas", scan_layers=scan, kernel_head_norm=on, remat=True,
             remat_policy="dots_attn_acts", dtype="bfloat16")
    params = M.LASADGen(c, rngs=nnx.Rngs(0)).params()
    c = ml_collections.FrozenConfigDict(c)
    loss = lambda p, c=c: jnp.mean(M.forward(c, p, tok, jnp.zeros(4, jnp.int32), width=16))  # noqa: E731
    temp[on] = _temp_bytes(jax.grad(loss), params)
  assert temp[True] <= temp[False] + 1024, temp
