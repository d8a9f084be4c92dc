"""Residual add + RMSNorm (kernels/norm/add_rms.py): the Pallas kernels (interpreted on CPU)
against the jnp reference, forward and every gradient; the model with config.fused_norm."""

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
