"""GPU-only: the Pallas kernel compiled (not interpreted) at real shapes, and vs fla's chunk_gla.

Marked ``gpu``; skipped cleanly where JAX has no GPU. Run on the GPU machine with
``pytest -q tests/test_gpu.py``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import oracle
from lasad_jax.ops import lasad_attention

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a CUDA GPU")]


def _bf16_inputs(seed, b, t, h, d):
  ks = jax.random.split(jax.random.key(seed), 6)
  q, k, v = (jax.random.normal(kk, (b, t, h, d), jnp.bfloat16) for kk in ks[:3])
  g = jax.nn.log_sigmoid(jax.random.normal(ks[3], (b, t, h, d), jnp.float32)).astype(jnp.bfloat16)
  do = jax.random.normal(ks[4], (b, t, h, d), jnp.float32)
  dst = jax.random.normal(ks[5], (b, h, d, d), jnp.float32)
  return q, k, v, g, do, dst


def _ours(q, k, v, g, do, dst, impl, **kw):
  f = lambda q, k, v, g: lasad_attention(q, k, v, g, impl=impl, return_final_state=True, **kw)
  (o, st), vjp = jax.vjp(f, q, k, v, g)
  return (o, st) + tuple(vjp((do.astype(o.dtype), dst)))


# sub32 is the default (the gradient kernel's cumulative sums by dots); cumsum_scan / cumsum_dot:
# Triton's scan / tensor-core dots in every kernel.
# fused_bwd: the backward as one kernel per (batch, head) (the default only from B*H = 512).
ORACLE_BLOCKS = {"sub16": dict(sub=16), "sub32": dict(sub=32), "cumsum_scan": dict(cumsum="scan"),
                 "cumsum_dot": dict(cumsum="dot"), "fused_bwd": dict(fused_backward=True)}


@pytest.mark.parametrize("blocks", ORACLE_BLOCKS)
@pytest.mark.parametrize("t", [1000, 2048])
@pytest.mark.parametrize("boundary", [0.0, -np.inf, -0.5])
def test_pallas_bf16_vs_fp64_oracle(t, boundary, blocks):
  from kernels.lasad.pallas import BlockSizes
  b, h, d = 2, 4, 64
  q, k, v, g, do, dst = _bf16_inputs(t, b, t, h, d)
  got = _ours(q, k, v, g, do, dst, "pallas", width=16, prefix=1, boundary=boundary,
              block_sizes=BlockSizes(**ORACLE_BLOCKS[blocks]))
  x64 = [np.asarray(a, np.float64) for a in (q, k, v, g)]
  kw = dict(width=16, prefix=1, boundary=boundary)
  o_ref, st_ref, _ = oracle.forward(*x64, **kw)
  grads = oracle.backward(*x64, np.asarray(do, np.float64), np.asarray(dst, np.float64), **kw)
  errs = dict(o=oracle.rel_rms(got[0], o_ref), S=oracle.rel_rms(got[1], st_ref))
  for name, val in zip(("dq", "dk", "dv", "dg"), got[2:]):
    errs[name] = oracle.rel_rms(val, grads[name])
  print(f"pallas bf16 T={t} boundary={boundary} {blocks}: {errs}")
  assert all(np.isfinite(np.asarray(x, np.float32)).all() for x in got)
  assert max(errs.values()) < 1e-2, errs  # bf16 operands: 1e-3 .. 1e-2 (see DESIGN §6)


@pytest.mark.parametrize("t,b,h", [(1000, 2, 4), (4096, 2, 4), (2048, 16, 16)])
@pytest.mark.parametrize("boundary", [0.0, -np.inf, -0.5])
def test_pallas_one_pass_forward_bf16(t, b, h, boundary):
  """The one-pass forward (BlockSizes(fused_forward=True); with its sequence split at B*H = 8 and
  T = 4096) compiled, against the float64 oracle and no less accurate than the two-pass form."""
  from kernels.lasad.pallas import BlockSizes
  q, k, v, g, _, _ = _bf16_inputs(t + 7, b, t, h, 64)
  kw = dict(width=16, prefix=1, boundary=boundary, impl="pallas", return_final_state=True)
  o_ref, st_ref, _ = oracle.forward(*[np.asarray(a, np.float64) for a in (q, k, v, g)],
                                    width=16, prefix=1, boundary=boundary)
  errs = {}
  forms = dict(one_pass=BlockSizes(), two_pass=BlockSizes(fused_forward=False),
               no_prefetch=BlockSizes(fused_prefetch=False), cumsum_dot=BlockSizes(cumsum="dot"))
  for name, bs in forms.items():
    o, st = jax.jit(lambda q, k, v, g, bs=bs: lasad_attention(
        q, k, v, g, block_sizes=bs, **kw))(q, k, v, g)
    assert np.isfinite(np.asarray(o, np.float32)).all() and np.isfinite(np.asarray(st)).all()
    errs[name] = (oracle.rel_rms(o, o_ref), oracle.rel_rms(st, st_ref))
  print(f"forward bf16 T={t} B={b} H={h} boundary={boundary}: (o, S) {errs}")
  for name in ("one_pass", "no_prefetch", "cumsum_dot"):
    assert max(errs[name]) < 1e-2, errs
    assert errs[name][0] < 1.2 * errs["two_pass"][0] + 1e-4, errs


def test_pallas_float32_compiled_matches_reference():
  rng = np.random.default_rng(0)
  b, t, h, d = 2, 333, 3, 32
  q, k, v = (rng.standard_normal((b, t, h, d)).astype(np.float32) for _ in range(3))
  g = -np.logaddexp(0, -rng.standard_normal((b, t, h, d))).astype(np.float32) / 0.1
  kw = dict(width=jnp.array([12, 16]), prefix=jnp.array([1, 0]), boundary=-np.inf)
  o = lasad_attention(q, k, v, g, impl="pallas", **kw)
  o_ref, _, _ = oracle.forward(q, k, v, g, width=np.array([12, 16]), prefix=np.array([1, 0]),
                               boundary=-np.inf)
  assert oracle.rel_rms(o, o_ref) < 1e-4


def test_pallas_error_no_worse_than_fla_chunk_gla():
  """Both at bf16 on the same inputs, against the fp64 recurrence (no mask: fla has none)."""
  torch = pytest.importorskip("torch")
  fla_gla = pytest.importorskip("fla.ops.gla")
  b, t, h, d = 4, 2048, 8, 64
  q, k, v, g, do, dst = _bf16_inputs(7, b, t, h, d)
  x64 = [np.asarray(a, np.float64) for a in (q, k, v, g)]
  o_ref, _, _ = oracle.forward(*x64)
  ref_grads = oracle.backward(*x64, np.asarray(do, np.float64), np.asarray(dst, np.float64))
  ours = _ours(q, k, v, g, do, dst, "pallas")

  tt = [torch.tensor(np.asarray(a, np.float32), device="cuda").bfloat16().requires_grad_()
        for a in (q, k, v, g)]
  o_fla, ht = fla_gla.chunk_gla(*tt, output_final_state=True)
  ((o_fla.float() * torch.tensor(np.asarray(do), device="cuda")).sum()
   + (ht.float() * torch.tensor(np.asarray(dst), device="cuda")).sum()).backward()
  theirs = [o_fla.detach()] + [x.grad for x in tt]
  names = ("o", "dq", "dk", "dv", "dg")
  refs = (o_ref, ref_grads["dq"], ref_grads["dk"], ref_grads["dv"], ref_grads["dg"])
  from kernels.lasad.pallas import BlockSizes
  loop = _ours(q, k, v, g, do, dst, "pallas", block_sizes=BlockSizes(diag="loop"))
  ours_sel = (ours[0],) + tuple(ours[2:6])
  loop_sel = (loop[0],) + tuple(loop[2:6])
  failures = []
  for name, mine, mine_loop, fla_x, ref in zip(names, ours_sel, loop_sel, theirs, refs):
    e_ours = oracle.rel_rms(mine, ref)
    e_fla = oracle.rel_rms(fla_x.float().cpu().numpy(), ref)
    print(f"{name}: pallas {e_ours:.2e} (diag=loop {oracle.rel_rms(mine_loop, ref):.2e})  "
          f"fla chunk_gla {e_fla:.2e}")
    if e_ours > max(1.25 * e_fla, 2e-3):
      failures.append((name, e_ours, e_fla))
  assert not failures, failures


def test_lina_tiny_bf16_compiled():
  """LINA on the GPU in bf16: a training loss and its gradients are finite, sampling is
  deterministic per seed and finite."""
  import ml_collections

  from configs.lina import get_config
  from lasad_jax.lina import flow as F
  from lasad_jax.lina import model as LM
  c = get_config("tiny")
  c.dtype = "bfloat16"
  cfg = ml_collections.FrozenConfigDict(c)
  params = LM.init_params(cfg, jax.random.key(0))
  x = jax.random.normal(jax.random.key(1), (4, 64, 1))
  loss, grads = jax.jit(jax.value_and_grad(
      lambda p: F.loss_fn(cfg, p, x, jnp.arange(4), jax.random.key(2))))(params)
  assert np.isfinite(float(loss))
  assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
  a = F.sample(cfg, params, np.array([1, 2]), rng=jax.random.key(3), ar_steps=8, euler_steps=4)
  b = F.sample(cfg, params, np.array([1, 2]), rng=jax.random.key(3), ar_steps=8, euler_steps=4)
  assert np.isfinite(np.asarray(a)).all()
  np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("n,d", [(320, 96), (1000, 64)])
def test_lina_pallas_kernel_compiled(n, d):
  """The fused LINA kernel compiled by Triton, and impl="split" (bf16 tensor-core einsums), on
  bf16 fused qkv with gates and a mask, against the float32 XLA form (HIGHEST) on the same
  values; also the kernel's bf16 output."""
  from lasad_jax.lina.attention import lina_attention_qkv
  rng = np.random.default_rng(n)
  b, h = 2, 4
  qkv = jnp.asarray(rng.standard_normal((b, n, 3, h, d)), jnp.bfloat16)
  ks, vs = (rng.uniform(0.2, 2.0, (h, n)).astype(np.float32) for _ in range(2))
  mask = (rng.random((b, n)) < 0.6).astype(np.float32)
  ref = np.asarray(lina_attention_qkv(qkv.astype(jnp.float32), ks, vs, mask=mask, impl="xla"),
                   np.float64)
  keep = mask > 0
  for impl in ("pallas", "split"):
    o = np.asarray(lina_attention_qkv(qkv, ks, vs, mask=mask, impl=impl), np.float64)
    err = np.sqrt(np.mean((o[keep] - ref[keep]) ** 2) / np.mean(ref[keep] ** 2))
    print(f"lina {impl} n={n} d={d}: {err:.2e} relative RMS vs the float32 form")
    assert err < 1e-5, (impl, err)
  o16 = lina_attention_qkv(qkv, ks, vs, mask=mask, impl="pallas", out_dtype=jnp.bfloat16)
  assert o16.dtype == jnp.bfloat16
  err = np.sqrt(np.mean((np.asarray(o16, np.float64)[keep] - ref[keep]) ** 2)
                / np.mean(ref[keep] ** 2))
  assert err < 4e-3, err   # bf16 rounding of the output (2^-9 relative at most)


def test_decode_kernel_compiled_matches_xla_decode():
  """kernels/lasad/decode.py compiled for the GPU, at LASADGen's head_dim 64 and a learned
  boundary with a near-reset head: teacher-forced decode logits against the XLA decode path's.
  float32: equal up to XLA's own dot precision (its o = q S einsum may run as a TF32 GEMM on the
  GPU, hence 2e-3). bf16: no further from the float32 logits than the XLA bf16 path is (both
  round q, k, v and o to bf16, in different places: 1.8e-2 vs 1.9e-2 on CPU)."""
  import ml_collections
  from flax import nnx

  from configs.lasad import get_config
  from lasad_jax import model as M
  from lasad_jax import sampling as S
  out = {}
  for dtype in ("float32", "bfloat16"):
    cfg = get_config("tiny")
    cfg.dim, cfg.num_heads, cfg.head_dim, cfg.boundary, cfg.dtype = 256, 4, 64, "learned", dtype
    params = M.LASADGen(cfg, rngs=nnx.Rngs(1)).params()
    params["blocks"]["boundary"] = params["blocks"]["boundary"].at[:, 0].set(-8.0)
    toks = jax.random.randint(jax.random.key(0), (3, 45), 0, cfg.vocab_size)
    forms = {"xla": ("xla", "auto", 0, 0), "pallas": ("pallas", "xla", 0, 0),
             "pallas+norm": ("pallas", "kernel", 0, 0), "pallas+norm+4": ("pallas", "kernel", 4, 0),
             "pallas+norm+4+mlp2": ("pallas", "kernel", 4, 2)}
    for name, form in forms.items():
      cfg.decode_impl, cfg.decode_norm, cfg.decode_in_splits, cfg.decode_mlp_splits = form
      out[dtype, name] = np.asarray(S._decode_logits(
          ml_collections.FrozenConfigDict(cfg), params, toks, jnp.array([1, 4, 7]),
          jnp.int32(8))[0])
  ref = out["float32", "xla"]
  errs = {k: oracle.rel_rms(v, ref) for k, v in out.items()}
  print(f"decode kernel vs XLA decode (rel RMS vs float32 XLA): {errs}")
  # +norm: the kernel applies the attention RMSNorm's scale (config.decode_norm); +4: it adds
  # the projection's 4 partial products (config.decode_in_splits); +mlp2: [w1 | w3] as 2 partial
  # products added before silu(a) * b (config.decode_mlp_splits)
  for impl in ("pallas", "pallas+norm", "pallas+norm+4", "pallas+norm+4+mlp2"):
    assert errs["float32", impl] < 2e-3, errs
    assert errs["bfloat16", impl] <= 1.25 * errs["bfloat16", "xla"], errs


def _decode_run(cfg, params, toks, labels, width, impl):
  """Teacher-forced decode logits with config.decode_impl = impl (no barrier timeouts)."""
  import ml_collections

  from lasad_jax import sampling as S
  cfg.decode_impl = impl
  logits, fails = S._decode_logits(ml_collections.FrozenConfigDict(cfg), params, toks, labels,
                                   jnp.int32(width))
  assert int(fails) == 0, f"{impl}: {int(fails)} barrier timeouts"
  return np.asarray(logits)


def _l_decode_case():
  """LASADGen-L's layer sizes, two layers (learned boundary, head 0's row-start decay -8 in each
  layer), a 1024-token vocabulary; 16 rows (8 images with CFG) of 40 teacher-forced tokens."""
  from flax import nnx

  from configs.lasad import get_config
  from lasad_jax import model as M

  cfg = get_config("L")
  cfg.num_layers, cfg.boundary, cfg.vocab_size = 2, "learned", 1024
  params = M.LASADGen(cfg, rngs=nnx.Rngs(1)).params()
  params["blocks"]["boundary"] = params["blocks"]["boundary"].at[:, 0].set(-8.0)
  toks = jax.random.randint(jax.random.key(0), (16, 40), 0, cfg.vocab_size)
  labels = jnp.arange(16) % 1001
  return cfg, params, toks, labels


def test_persistent_decode_compiled():
  """kernels/lasad/decode_persistent.py compiled, one program per SM with grid barriers: at
  LASADGen-L's layer sizes (two layers, 16 rows = 8 images with CFG, bf16) teacher-forced decode
  logits no further from the float32 XLA path's than the bf16 per-layer Pallas path is, twice
  bit for bit the same, no barrier timeout; and the tiny float32 model (most programs idle) equal
  to the XLA path up to XLA's own dot precision."""
  from flax import nnx

  from configs.lasad import get_config
  from lasad_jax import model as M

  run = _decode_run

  cfg, params, toks, labels = _l_decode_case()
  out = {}
  for dtype, impl in (("float32", "xla"), ("bfloat16", "pallas"), ("bfloat16", "persistent")):
    cfg.dtype = dtype
    out[dtype, impl] = run(cfg, params, toks, labels, 16, impl)
  again = run(cfg, params, toks, labels, 16, "persistent")
  ref = out["float32", "xla"]
  errs = {k: oracle.rel_rms(v, ref) for k, v in out.items()}
  print(f"persistent decode vs float32 XLA (rel RMS): {errs}")
  assert errs["bfloat16", "persistent"] <= 1.25 * errs["bfloat16", "pallas"], errs
  np.testing.assert_array_equal(again, out["bfloat16", "persistent"])

  tiny = get_config("tiny")
  params = M.LASADGen(tiny, rngs=nnx.Rngs(2)).params()
  toks = jax.random.randint(jax.random.key(3), (3, 30), 0, tiny.vocab_size)
  want = run(tiny, params, toks, jnp.array([1, 4, 7]), 5, "xla")
  got = run(tiny, params, toks, jnp.array([1, 4, 7]), 5, "persistent")
  err = oracle.rel_rms(got, want)
  print(f"tiny float32 persistent vs XLA: {err:.2e}")
  assert err < 2e-3, err


def test_mosaic_decode_compiled():
  """kernels/lasad/decode_mgpu.py compiled, one warpgroup per SM with semaphore waits: at
  LASADGen-L's layer sizes (two layers, 16 rows = 8 images with CFG, bf16) teacher-forced decode
  logits no further from the float32 XLA path's than the bf16 per-layer Pallas path is, close to
  the Triton persistent kernel's (same rounding points), and twice bit for bit the same."""
  cfg, params, toks, labels = _l_decode_case()
  out = {}
  for dtype, impl in (("float32", "xla"), ("bfloat16", "pallas"), ("bfloat16", "persistent"),
                      ("bfloat16", "mosaic")):
    cfg.dtype = dtype
    out[dtype, impl] = _decode_run(cfg, params, toks, labels, 16, impl)
  again = _decode_run(cfg, params, toks, labels, 16, "mosaic")
  ref = out["float32", "xla"]
  errs = {k: oracle.rel_rms(v, ref) for k, v in out.items()}
  twin = oracle.rel_rms(out["bfloat16", "mosaic"], out["bfloat16", "persistent"])
  print(f"mosaic decode vs float32 XLA (rel RMS): {errs}; vs the Triton persistent: {twin:.2e}")
  assert errs["bfloat16", "mosaic"] <= 1.25 * errs["bfloat16", "pallas"], errs
  np.testing.assert_array_equal(again, out["bfloat16", "mosaic"])


def test_kth_largest_compiled_equals_top_k():
  """kernels/sampling/kth.py compiled at LASADGen's vocabulary and top-k 2000, both radices: the
  sampler's top-k threshold on GPUs (top_k_impl="auto") must equal the sort's exactly."""
  from kernels.sampling.kth import kth_largest
  x = jax.random.normal(jax.random.key(0), (8, 16384), jnp.float32) * 4
  x = x.at[0, :100].set(jnp.round(x[0, :100]))
  for k in (1, 2000, 16384):
    ref = jax.lax.top_k(x, k)[0][:, -1:]
    for radix in (2, 4):
      np.testing.assert_array_equal(np.asarray(kth_largest(x, k, radix=radix)), np.asarray(ref))


@pytest.mark.parametrize("norm", [False, True])
@pytest.mark.parametrize("t,b,h", [(1000, 4, 4), (2048, 2, 4)])
def test_pallas_gate_in_kernel_compiled_bf16(t, b, h, norm):
  """The gates inside the compiled kernels (``hgrn2_attention(gate="kernel")``, the GPU default of
  LASADGen's attention): at bf16 no less accurate than XLA's gates feeding the same kernels,
  both against the float32 reference recurrence on the unrounded inputs; all gradients. With
  ``norm``: the output RMS-normalised per head (``norm_eps``), by the forward kernel (whole heads
  per program, forced at this small B*H) against XLA's norm after the XLA-gated kernels; named,
  so the forward kernel writes the states the backward reads."""
  from kernels.lasad.pallas import BlockSizes
  # a named norm and BlockSizes.save_states: the forward kernel also writes the backward's states
  kw = (dict(norm_eps=1e-5, norm_save="n", block_sizes=BlockSizes(block_v_scan=64, save_states=True))
        if norm else {})
  case = _hgrn2_case(5, b, t, h, 64)

  def run(impl, gate, dt):
    return _hgrn2_run(case, impl, dt, boundary=-0.5, gate=gate,
                      **(kw if impl == "pallas" else {"norm_eps": kw.get("norm_eps")}))

  ref = run("reference", "xla", jnp.float32)
  kern = run("pallas", "kernel", jnp.bfloat16)
  xla = run("pallas", "xla", jnp.bfloat16)
  for name, a, x, r in zip(("o", "dq_raw", "df", "dv", "dlb"), kern, xla, ref):
    ea, ex = oracle.rel_rms(a, r), oracle.rel_rms(x, r)
    print(f"gate in kernel vs XLA gates, T={t}, norm {norm}: {name} {ea:.2e} vs {ex:.2e}")
    assert np.all(np.isfinite(np.asarray(a))), name
    assert ea < 1.2 * ex + 1e-4, (name, ea, ex)


def _hgrn2_case(seed, b, t, h, d):
  """float32 q_raw, f, v [b, t, h, d], lower bounds lb [h, d] (0 for head 0), and the cotangents
  do [b, t, h, d], dst [b, h, d, d], from 6 keys of ``seed``."""
  ks = jax.random.split(jax.random.key(seed), 6)
  qr, v = (jax.random.normal(kk, (b, t, h, d), jnp.float32) for kk in ks[:2])
  f = 2 * jax.random.normal(ks[2], (b, t, h, d), jnp.float32) + 1
  lb = jnp.concatenate([jnp.zeros((1, d)), jax.random.uniform(ks[3], (h - 1, d), maxval=0.95)])
  do = jax.random.normal(ks[4], (b, t, h, d), jnp.float32)
  dst = jax.random.normal(ks[5], (b, h, d, d), jnp.float32)
  return qr, f, v, lb, do, dst


def _hgrn2_run(case, impl, dt, **kw):
  """(o, d q_raw, d f, d v, d lb) of sum(o do) + sum(S dst) through ``hgrn2_attention`` (inputs
  cast to ``dt``, width 16, prefix 1, ``kw`` its other arguments), jitted."""
  from lasad_jax.ops import hgrn2_attention
  qr, f, v, lb, do, dst = case

  def fn(qr, f, v, lb):
    o, st = hgrn2_attention(qr.astype(dt), f.astype(dt), v.astype(dt), lb, width=16, prefix=1,
                            return_final_state=True, impl=impl, **kw)
    return jnp.sum(o.astype(jnp.float32) * do) + jnp.sum(st * dst), o
  (_, o), grads = jax.jit(jax.value_and_grad(fn, argnums=range(4), has_aux=True))(qr, f, v, lb)
  return (o,) + tuple(grads)


@pytest.mark.parametrize("opts", ["default", "all_options", "sub32_no_options", "maxnreg168",
                                  "w8_r128"])
@pytest.mark.parametrize("boundary", [-0.5, -np.inf])
def test_pallas_fused_backward_compiled_bf16(boundary, opts):
  """LASADGen's attention path at a training shape whose B*H (32 x 16) takes the fused backward
  by default (gates in the kernels, the output norm named): every gradient at bf16 within 1.2x
  of the three-kernel backward's error, both against the float32 reference; also with the
  fused backward's q dq prefetch (BlockSizes.bwd_prefetch_qdq), and on 32-row steps without the
  in-kernel silu' and output norm's gradient (session 26's defaults: bwd_sub, bwd_dq_raw,
  bwd_norm), with both kernels capped at 168 registers (fused_maxnreg, bwd_maxnreg: the
  module attribute reaches XLA's Triton compile), and both on 8 warps capped at 128 registers
  with the forward on 16-row sub-chunks (2 programs of 8 warps per SM)."""
  from kernels.lasad.pallas import BlockSizes
  case = _hgrn2_case(6, 32, 256, 16, 64)

  def run(impl, dt, **kw):
    return _hgrn2_run(case, impl, dt, boundary=boundary, norm_eps=1e-5, **kw)

  # (boundary -inf: every form's dq_raw, df and dlb are ~0.3 off, the same for both backwards.
  # The row of batch 15 starting at t = 209 follows a reset, so its o is one token's (q.k) v
  # with q.k near 0, and the RMS norm amplifies any rounding there: the float32 reference on
  # the bf16-rounded inputs is itself 0.65 off on the CPU, session 26.)
  ref = run("reference", jnp.float32)
  extra = {"default": {},
           "all_options": dict(block_sizes=BlockSizes(fused_backward=True, bwd_prefetch_qdq=True,
                                                      bwd_dq_raw=True, bwd_norm=True)),
           "sub32_no_options": dict(block_sizes=BlockSizes(fused_backward=True, bwd_sub=32,
                                                           bwd_dq_raw=False, bwd_norm=False)),
           "maxnreg168": dict(block_sizes=BlockSizes(fused_backward=True, fused_maxnreg=168,
                                                     bwd_maxnreg=168)),
           "w8_r128": dict(block_sizes=BlockSizes(fused_backward=True, sub=16, fused_num_warps=8,
                                                  fused_maxnreg=128, grads_num_warps=8,
                                                  bwd_maxnreg=128))}[opts]
  fused = run("pallas", jnp.bfloat16, gate="kernel", norm_save="n", **extra)
  unfused = run("pallas", jnp.bfloat16, gate="kernel", norm_save="n",
                block_sizes=BlockSizes(fused_backward=False))
  for name, a, u, r in zip(("o", "dq_raw", "df", "dv", "dlb"), fused, unfused, ref):
    ea, eu = oracle.rel_rms(a, r), oracle.rel_rms(u, r)
    print(f"fused vs unfused backward, boundary {boundary}: {name} {ea:.2e} vs {eu:.2e}")
    assert np.all(np.isfinite(np.asarray(a))), name
    assert ea < 1.2 * eu + 1e-4, (name, ea, eu)


@pytest.mark.parametrize("pdl,splits", [(True, 1), (False, 4)])
def test_skinny_matmul_compiled(pdl, splits):
  """kernels/sampling/gemm.py compiled by Mosaic GPU at LASADGen-L's w2 shape (K = 2816: 44 or 11
  steps per K segment, more than the stages) against XLA's float32 dot of the same bf16 operands."""
  from kernels.sampling import gemm as G
  x = jax.random.normal(jax.random.key(0), (16, 2816), jnp.bfloat16)
  w = jax.random.normal(jax.random.key(1), (2816, 1024), jnp.bfloat16)
  ref = jnp.dot(x.astype(jnp.float32), w.astype(jnp.float32))
  got = jax.jit(lambda x, w: G.skinny_matmul(x, w, G.GemmConfig(splits=splits, pdl=pdl)))(x, w)
  err = float(jnp.sqrt(jnp.mean((got - ref) ** 2) / jnp.mean(ref ** 2)))
  assert err < 1e-5, err   # float32 accumulation of exact bf16 products: rounding only


@pytest.mark.parametrize("shape", [(32, 256, 16, 64), (2, 4096, 4, 64)])
def test_pallas_without_state_arrays_compiled(shape):
  """The training path compiled: no initial state and no final state asked for (the kernels
  start from zeros and write no state; scalar width / prefix / boundary go in as [1] arrays),
  against a zero initial-state array in and the final state out with a zero cotangent. Output
  and every gradient, lasad_attention (at (2, 4096) with the sequence split) and LASADGen's
  hgrn2_attention (gates in the kernels, output norm, the fused backward at B*H = 512). The two
  do the same arithmetic, so they agree to bf16 rounding; a wrong start state or a dropped
  state gradient would differ by O(1)."""
  b, t, h, d = shape
  q, k, v, g, do, _ = _bf16_inputs(31, b, t, h, d)
  zero = jnp.zeros((b, h, d, d), jnp.float32)
  kw = dict(width=16, prefix=1, boundary=-0.5, impl="pallas")

  def lasad(with_state):
    def fn(q, k, v, g):
      if with_state:
        o, _ = lasad_attention(q, k, v, g, initial_state=zero, return_final_state=True, **kw)
      else:
        o = lasad_attention(q, k, v, g, **kw)
      return jnp.sum(o.astype(jnp.float32) * do), o
    (_, o), grads = jax.jit(jax.value_and_grad(fn, argnums=range(4), has_aux=True))(q, k, v, g)
    return (o,) + tuple(grads)

  from lasad_jax.ops import hgrn2_attention
  qr, f, vv, lb, dn, _ = _hgrn2_case(7, b, t, h, d)

  def hgrn2(with_state):
    def fn(qr, f, v, lb):
      args = (qr.astype(jnp.bfloat16), f.astype(jnp.bfloat16), v.astype(jnp.bfloat16), lb)
      hkw = dict(kw, boundary=-jnp.inf, gate="kernel", norm_eps=1e-5, norm_save="n", scale=1.0)
      if with_state:
        o, _ = hgrn2_attention(*args, initial_state=zero, return_final_state=True, **hkw)
      else:
        o = hgrn2_attention(*args, **hkw)
      return jnp.sum(o.astype(jnp.float32) * dn), o
    (_, o), grads = jax.jit(jax.value_and_grad(fn, argnums=range(4), has_aux=True))(qr, f, vv, lb)
    return (o,) + tuple(grads)

  for name, run in (("lasad", lasad), ("hgrn2", hgrn2)):
    for i, (a, r) in enumerate(zip(run(False), run(True))):
      err = oracle.rel_rms(a, r)
      print(f"{name} {shape} output/grad {i}: no state arrays vs zero state: {err:.2e}")
      assert np.all(np.isfinite(np.asarray(a, np.float32))), (name, i)
      assert err < 1e-3, (name, i, err)
