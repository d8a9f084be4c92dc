"""The GPU kernels lower for the GPU on a machine without one.

CI has no GPU, and the interpreter (how tests/test_ops.py runs the kernels) does not lower them:
a kernel body can be right in the interpreter and still not lower for Triton. Session 23's
saved-states path did that (``j % m`` on a traced loop index lowered to a remainder with a
boolean divisor, jax 0.11.2; first seen on an H100 in session 24). Here each path of the LASAD
kernels, forward and gradient, the LINA kernel, LASADGen-L's training step and the sampler are
lowered to Triton IR (the Mosaic GPU decode kernel to its own) for compute capability 9.0, with
JAX's GPU query answered by a stand-in. Nothing is compiled or run (ptxas is not involved), so
these tests say the kernels lower, not that they compile or compute the right values."""

import re
import types

import jax
import jax.numpy as jnp
import pytest

from kernels.lasad.pallas import FUSED_BWD_MIN_BH, BlockSizes
from lasad_jax.ops import hgrn2_attention, lasad_attention


@pytest.fixture
def fake_hopper(monkeypatch):
  """JAX's GPU query answers compute capability 9.0, and lasad_jax.ops's Pallas entry points
  build the compiled kernels (interpret=False) instead of the interpreter's."""
  import functools

  from jax._src.pallas.triton import pallas_call_registration as reg

  import kernels.lasad.pallas as kp
  monkeypatch.setattr(reg.gpu_info_lib, "get_gpu_info",
                      lambda: types.SimpleNamespace(compute_capability="9.0"))
  for name in ("lasad_pallas", "hgrn2_pallas"):
    monkeypatch.setattr(kp, name, functools.partial(getattr(kp, name), interpret=False))


def _lower_cuda(fn, *args):
  """Lower jit(fn) for CUDA; returns the StableHLO text (with the kernels as custom calls)."""
  return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


def _kernels(text):
  """Names of the LASAD kernels among the lowered module's Triton custom calls."""
  assert "__gpu$xla.gpu.triton" in text, text[:2000]
  return set(re.findall(
      r"lasad_(?:fused_forward|forward|grads|dstates|states|segment_states|bwd_fused)\b", text))


SHAPE = (2, 256, 2, 64)    # b, t, h, d: four 64-token chunks


# The BlockSizes paths: the defaults (one-pass forward with prefetch, 32-token backward chunks),
# 16-token sub-chunks (64-token backward chunks), the two-pass forward, a split sequence, the
# cumulative sums as scans or dots everywhere, the other diagonal forms, unsplit bf16 dots, and
# the states saved by the forward kernel (every other 32-token backward chunk advances them;
# with 16-token sub-chunks every 64-token chunk has its own; with 32-token chunks, unsplit (at
# this small B*H the automatic split would take them), each 32-token chunk has its own).
BLOCKS = {
    "default": BlockSizes(),
    "sub16": BlockSizes(sub=16),
    "no_prefetch": BlockSizes(fused_prefetch=False),
    "two_pass": BlockSizes(fused_forward=False),
    "split": BlockSizes(seq_split=2, bwd_seq_split=2),
    "cumsum_dot": BlockSizes(cumsum="dot"),
    "cumsum_scan": BlockSizes(cumsum="scan"),
    "diag_loop": BlockSizes(diag="loop"),
    "diag_bcast": BlockSizes(diag="bcast"),
    "bf16_dots": BlockSizes(split_dots=False),
    "save_states": BlockSizes(save_states=True),
    "save_states_sub16": BlockSizes(save_states=True, sub=16),
    "save_states_no_prefetch": BlockSizes(save_states=True, fused_prefetch=False),
    "save_states_chunk32": BlockSizes(save_states=True, chunk=32, seq_split=1),
    "fused_backward": BlockSizes(fused_backward=True),
    "fused_backward_sub16": BlockSizes(fused_backward=True, sub=16),
    "fused_backward_no_prefetch": BlockSizes(fused_backward=True, bwd_prefetch=False),
    "fused_backward_qdq_dq_raw": BlockSizes(fused_backward=True, bwd_prefetch_qdq=True,
                                            bwd_dq_raw=True),
    "fused_backward_bwd_sub32": BlockSizes(fused_backward=True, bwd_sub=32, bwd_dq_raw=False,
                                           bwd_norm=False),
    "fused_backward_all_options": BlockSizes(fused_backward=True, bwd_prefetch_qdq=True,
                                             bwd_dq_raw=True, bwd_norm=True),
    "fused_backward_diag_loop": BlockSizes(fused_backward=True, diag="loop"),
    "fused_backward_diag_bcast": BlockSizes(fused_backward=True, diag="bcast"),
}


@pytest.mark.parametrize("name", sorted(BLOCKS))
def test_hgrn2_kernels_lower_for_triton(fake_hopper, name):
  """LASADGen's training path (gates in the kernels, the output norm named for remat): value
  and all gradients, bf16, the row mask on, an initial state."""
  bs = BLOCKS[name]
  b, t, h, d = SHAPE

  def loss(qr, f, v, lb):
    o, st = hgrn2_attention(qr, f, v, lb, width=16, prefix=1, boundary=jnp.full((h,), -0.5),
                            initial_state=jnp.zeros((b, h, d, d)), return_final_state=True,
                            impl="pallas", gate="kernel", block_sizes=bs, norm_eps=1e-5,
                            norm_save="attn_out")
    return jnp.sum(o.astype(jnp.float32)) + jnp.sum(st)

  x = jax.ShapeDtypeStruct(SHAPE, jnp.bfloat16)
  names = _kernels(_lower_cuda(jax.grad(loss, argnums=(0, 1, 2, 3)), x, x, x,
                               jax.ShapeDtypeStruct((h, d), jnp.float32)))
  if bs.fused_backward:   # the one backward kernel
    assert "lasad_bwd_fused" in names and not {"lasad_grads", "lasad_dstates",
                                                "lasad_states"} & names, names
    return
  # the gradient kernel and the state-gradient scan, and the states kernel unless the forward
  # kernel saved the states
  assert {"lasad_grads", "lasad_dstates"} <= names, names
  assert ("lasad_states" in names) == (not bs.save_states), names


@pytest.mark.parametrize("name", ["default", "sub16", "two_pass", "split", "save_states",
                                  "fused_backward"])
@pytest.mark.parametrize("t", [256, 200])
def test_lasad_kernels_lower_for_triton(fake_hopper, name, t):
  """The bare operator (q, k, v, g given): float32 and bf16, awkward T (padding inside)."""
  bs = BLOCKS[name]
  b, _, h, d = SHAPE
  for dtype in (jnp.float32, jnp.bfloat16):
    x = jax.ShapeDtypeStruct((b, t, h, d), dtype)
    g = jax.ShapeDtypeStruct((b, t, h, d), jnp.float32)

    def loss(q, k, v, g):
      o, st = lasad_attention(q, k, v, g, width=8, boundary=-jnp.inf, impl="pallas",
                              return_final_state=True, block_sizes=bs)
      return jnp.sum(o.astype(jnp.float32)) + jnp.sum(st)

    names = _kernels(_lower_cuda(jax.grad(loss, argnums=(0, 1, 2, 3)), x, x, x, g))
    # no output norm here, so nothing is saved: the backward recomputes the states
    want = ({"lasad_bwd_fused"} if bs.fused_backward else
            {"lasad_grads", "lasad_dstates", "lasad_states"})
    assert want <= names, (dtype, names)


@pytest.fixture
def fake_gpu_backend(fake_hopper, monkeypatch):
  """On top of ``fake_hopper``: ``jax.default_backend()`` says "gpu", so the model's "auto"
  choices (Pallas attention with the gates and the output norm in the kernels, the fused
  norms when unrolled, the Pallas decode kernel, the selection top-k) take their GPU paths."""
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")


def _config(variant="L", **fields):
  from configs.imagenet import get_config
  cfg = get_config(variant)
  for k, v in fields.items():
    setattr(cfg, k, v)
  return cfg


# LASADGen-L's training step as benchmarks/train.py runs it (remat dots_attn_acts), layers in a
# scan (the default) and unrolled (the fused norms), with the forward kernel saving the states,
# and at a batch whose B*H (32 x 16) takes the fused backward
@pytest.mark.parametrize("scan,save,batch", [(True, False, 4), (False, False, 4), (False, True, 4),
                                             (False, False, 32)])
def test_train_step_lowers_for_the_gpu(fake_gpu_backend, scan, save, batch):
  import ml_collections

  from lasad_jax import training as T
  cfg = ml_collections.FrozenConfigDict(_config(
      remat=True, remat_policy="dots_attn_acts", scan_layers=scan, kernel_save_states=save))
  state = jax.eval_shape(lambda: T.create_train_state(cfg))
  inputs = {"tokens": jax.ShapeDtypeStruct((batch, 256), jnp.int32),
            "label": jax.ShapeDtypeStruct((batch,), jnp.int32)}
  text = jax.jit(lambda s, b: T._train_step(cfg, s, b)).trace(state, inputs).lower(
      lowering_platforms=("cuda",)).as_text()
  names = _kernels(text)
  assert "lasad_fused_forward" in names, names
  if batch * cfg.num_heads >= FUSED_BWD_MIN_BH and not save:
    assert "lasad_bwd_fused" in names and not {"lasad_grads", "lasad_states"} & names, names
  else:
    assert {"lasad_grads", "lasad_dstates"} <= names, names
    assert ("lasad_states" in names) == (not save), names
  assert ("add_rms_forward" in text) == (not scan)    # the fused norms only unrolled


def _sampler_text(variant, decode_impl, images, height_width, top_k, **fields):
  """The lowered sampler (``sampling._sample``) with guidance 4: ``images`` rows of class labels
  plus as many null rows, an [h, w] = ``height_width`` grid of tokens; ``fields`` set config."""
  import ml_collections
  from flax import nnx

  from lasad_jax import model as M
  from lasad_jax import sampling
  cfg = ml_collections.FrozenConfigDict(_config(variant, decode_impl=decode_impl, **fields))
  params = jax.eval_shape(lambda: M.LASADGen(cfg, rngs=nnx.Rngs(0)).params())
  labels = jax.ShapeDtypeStruct((images,), jnp.int32)
  rng = jax.eval_shape(lambda: jax.random.key(0))
  h, w = height_width
  return sampling._sample.trace(cfg, params, labels, rng, h * w, w, 4.0, 1.0, top_k, 1.0).lower(
      lowering_platforms=("cuda",)).as_text()


# The sampler with classifier-free guidance and top-k on the GPU's defaults (the Pallas decode
# kernel per layer, applying the attention norm's scale: config.decode_norm, B's width 768
# padded to a power of two for it; the selection top-k), with the norm before the projection,
# with the projection's 4 partial products added in the decode kernel (config.decode_in_splits),
# with [w1 | w3] as 2 partial products (config.decode_mlp_splits) and with the persistent kernel
# (all layers in one)
@pytest.mark.parametrize("decode_impl,decode_norm,splits,mlp_splits", [
    ("auto", "auto", 0, 0), ("auto", "xla", 0, 0), ("auto", "auto", 4, 0), ("auto", "auto", 4, 2),
    ("persistent", "auto", 0, 0)])
def test_sampler_lowers_for_the_gpu(fake_gpu_backend, decode_impl, decode_norm, splits,
                                    mlp_splits):
  text = _sampler_text("B", decode_impl, 2, (8, 8), 100, decode_norm=decode_norm,
                       decode_in_splits=splits, decode_mlp_splits=mlp_splits)
  assert "__gpu$xla.gpu.triton" in text
  kernel = {"auto": "lasad_decode_attention", "persistent": "lasad_decode_persistent"}
  assert kernel[decode_impl] in text
  assert "kth_largest" in text      # the selection top-k


def test_mosaic_sampler_lowers_for_the_gpu(fake_gpu_backend, monkeypatch):
  """config.decode_impl='mosaic' (kernels/lasad/decode_mgpu.py): LASADGen-L's sampler, 8 images
  with guidance (16 rows), lowers with the token step as one Mosaic GPU kernel. (Its device
  check, which refuses anything but a Hopper GPU, is skipped: there is no device here.)"""
  from kernels.lasad import decode_mgpu
  monkeypatch.setattr(decode_mgpu, "check_device", lambda device: None)
  assert "custom_call @mosaic_gpu" in _sampler_text("L", "mosaic", 8, (16, 16), 0)


@pytest.mark.parametrize("fused,pieces,defer", [(False, 1, False), (True, 1, False),
                                                (False, 3, False), (False, 1, True)])
def test_lina_kernel_lowers_for_triton(fake_hopper, fused, pieces, defer):
  """The LINA attention kernel (kernels/lina/pallas.py): separate and packed q|k|v, value pieces per
  program, deferred sums; N not a multiple of the block (padding inside)."""
  from kernels.lina.pallas import lina_forward
  b, n, h, d = 2, 100, 2, 48
  bf = jnp.bfloat16
  q = jax.ShapeDtypeStruct((b, n, 3, h, d) if fused else (b, n, h, d), bf)
  kv = None if fused else jax.ShapeDtypeStruct((b, n, h, d), bf)
  scale = jax.ShapeDtypeStruct((h, n), jnp.float32)
  mask = jax.ShapeDtypeStruct((b, n), jnp.bool_)
  text = _lower_cuda(lambda q, k, v, ks, vs, m: lina_forward(
      q, k, v, ks, vs, m, fused=fused, value_pieces=pieces, defer_sums=defer), q, kv, kv, scale,
      scale, mask)
  assert "lina_attention" in text


def _kernel_ir():
  """The ``scripts/kernel_ir.py`` module (scripts/ is not a package)."""
  import importlib.util
  import os
  path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts",
                      "kernel_ir.py")
  spec = importlib.util.spec_from_file_location("kernel_ir", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_kernel_ir_script_is_stable():
  """``scripts/kernel_ir.py`` (the kernels' Triton IR without source locations, to compare two
  trees): at B*H = 512 the forward kernel and the fused backward, the same text twice, no
  locations, and another block size changes it."""
  ir = _kernel_ir()
  block_sizes, kernel_asm = ir.block_sizes, ir.kernel_asm
  one = kernel_asm((32, 64, 16, 64))
  assert len(one) == 2 and "lasad_fused_forward" in one[0] and "lasad_bwd_fused" in one[1]
  assert one == kernel_asm((32, 64, 16, 64))
  assert not any("loc(" in a for a in one)
  assert kernel_asm((32, 64, 16, 64), BlockSizes(bwd_dq_raw=False))[1] != one[1]
  # --block-sizes: fields parsed by type; the fused backward's 32-row steps leave the forward
  assert block_sizes("bwd_sub=16,bwd_norm=True,diag=loop,fast_limit=50.5,seq_split=None") == \
      BlockSizes(bwd_sub=16, bwd_norm=True, diag="loop", fast_limit=50.5, seq_split=None)
  assert block_sizes("") is None
  with pytest.raises(SystemExit, match="BlockSizes field"):
    block_sizes("bwd_subb=16")
  sub32 = kernel_asm((32, 64, 16, 64), block_sizes("bwd_sub=32"))
  assert sub32[0] == one[0] and sub32[1] != one[1]
  # register caps (BlockSizes.fused_maxnreg / bwd_maxnreg) reach each kernel's module as
  # ttg.maxnreg, under a name of its own; without them no kernel has one
  assert not any("maxnreg" in a for a in one)
  capped = kernel_asm((32, 64, 16, 64), BlockSizes(fused_maxnreg=168, bwd_maxnreg=128))
  assert capped[0].startswith("module @lasad_fused_forward_maxnreg168 attributes "
                              "{ttg.maxnreg = 168 : i32}"), capped[0][:120]
  assert capped[1].startswith("module @lasad_bwd_fused_maxnreg128 attributes "
                              "{ttg.maxnreg = 128 : i32}"), capped[1][:120]
  assert kernel_asm((32, 64, 16, 64), BlockSizes(bwd_maxnreg=128))[0] == one[0]


def test_kernel_ir_script_counts_registers():
  """``scripts/kernel_ir.py --regs`` / ``--sass``: the fused backward compiled for sm_90 by the
  triton package (not a test dependency: skipped without it) gives its registers and stack
  bytes, and 16-row steps spill no more than 32-row ones (at this shape, with the in-kernel silu'
  and norm gradient on by default, 16 vs 688 bytes with triton 3.6.0); ``--maxnreg`` caps the
  registers and spills more (16-row steps at 128: 688 bytes); and its static opcode counts."""
  pytest.importorskip("triton")
  ir = _kernel_ir()
  bwd = [ir.kernel_asm((32, 64, 16, 64), BlockSizes(bwd_sub=sub))[1] for sub in (32, 16)]
  usage = [ir.resource_usage(text, 4) for text in bwd]
  assert [u[0] for u in usage] == ["lasad_bwd_fused"] * 2
  assert all(0 < u[1] <= 255 and u[2] >= 0 for u in usage), usage
  assert usage[1][2] <= usage[0][2], usage
  name, regs, stack = ir.resource_usage(bwd[1], 4, maxnreg=128)
  assert name == "lasad_bwd_fused" and regs <= 128 and stack > usage[1][2], (regs, stack, usage)
  # the same cap from BlockSizes.bwd_maxnreg, through the module attribute
  capped = ir.kernel_asm((32, 64, 16, 64), BlockSizes(bwd_maxnreg=128))[1]
  assert ir.resource_usage(capped, 4) == ("lasad_bwd_fused_maxnreg128", regs, stack)
  # --sass: the same compile's opcodes; the backward's dots run on the tensor cores (HMMA) and its
  # exponentials are the one ex2 instruction (MUFU), and the 16-row walks are the shorter code
  name32, ops32 = ir.opcode_counts(bwd[0], 4)
  name, ops = ir.opcode_counts(bwd[1], 4)
  assert name == name32 == "lasad_bwd_fused"
  assert ops["HMMA"] > 0 and ops["MUFU"] > 0 and ops["EXIT"] >= 1, ops.most_common(20)
  assert all(op.isupper() and "." not in op for op in ops), sorted(ops)
  assert sum(ops.values()) < sum(ops32.values()), (sum(ops.values()), sum(ops32.values()))
