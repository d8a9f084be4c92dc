"""LINA (lasad_jax.lina): operator vs a float64 oracle, sizes, masking schedule, loss, sampling."""

import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

sys.path.insert(0, ".")
from configs.lina import get_config  # noqa: E402
from lasad_jax.lina import flow as F  # noqa: E402
from lasad_jax.lina import model as M  # noqa: E402
from lasad_jax.lina.attention import lina_attention, lina_attention_qkv  # noqa: E402
from oracle import rel_rms  # noqa: E402


def oracle(q, k, v, ks=None, vs=None, mask=None):
  """LINA's formula in float64 on the selected tokens only (the gather LINA does)."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  b, n, h, _ = q.shape
  out = np.zeros(v.shape)
  for bi in range(b):
    sel = np.ones(n, bool) if mask is None else np.asarray(mask[bi], bool)
    for hi in range(h):
      qq = np.maximum(q[bi, :, hi], 0) + 1e-6
      kk = (np.maximum(k[bi, :, hi], 0) + 1e-6) * (1 if ks is None else ks[hi][:, None])
      vv = v[bi, :, hi] * (1 if vs is None else vs[hi][:, None])
      kk, vv = kk[sel], vv[sel]
      kv = kk.T @ vv / len(kk)
      out[bi, :, hi] = (qq @ kv) / (qq @ kk.mean(0) + 1e-6)[:, None]
  return out


@pytest.mark.parametrize("gates", [False, True])
@pytest.mark.parametrize("n", [37, 320])
def test_operator_vs_float64(gates, n):
  rng = np.random.default_rng(n)
  b, h, d = 2, 3, 16
  q, k, v = (rng.standard_normal((b, n, h, d)).astype(np.float32) for _ in range(3))
  ks = vs = None
  if gates:
    ks, vs = (rng.uniform(0.2, 2.0, (h, n)).astype(np.float32) for _ in range(2))
  o = lina_attention(q, k, v, ks, vs)
  assert o.dtype == jnp.float32
  assert rel_rms(o, oracle(q, k, v, ks, vs)) < 1e-5


@pytest.mark.parametrize("n,d,gates,masked", [(37, 16, True, True), (128, 96, False, False),
                                              (70, 96, True, False), (64, 32, False, True),
                                              (320, 64, True, True)])
def test_pallas_kernel_vs_float64(n, d, gates, masked):
  """The fused kernel (CPU interpreter; the same bf16 dots as on the GPU) on bf16 inputs against
  the float64 oracle, on the separate and the fused [B, N, 3, H, D] inputs; N not a multiple of
  the 64-row block; bf16 output equals the float32 output rounded."""
  rng = np.random.default_rng(n + d)
  b, h = 2, 2
  q, k, v = (jnp.asarray(rng.standard_normal((b, n, h, d)), jnp.bfloat16) for _ in range(3))
  ks = vs = mask = None
  if gates:
    ks, vs = (rng.uniform(0.2, 2.0, (h, n)).astype(np.float32) for _ in range(2))
  if masked:
    mask = (rng.random((b, n)) < 0.5).astype(np.float32)
  ref = oracle(*[np.asarray(x, np.float32) for x in (q, k, v)], ks, vs,
               mask=None if mask is None else mask > 0)
  keep = np.ones((b, n), bool) if mask is None else mask > 0   # outputs at masked rows: unused
  o = np.asarray(lina_attention(q, k, v, ks, vs, mask=mask, impl="pallas"))
  assert o.dtype == np.float32
  assert rel_rms(o[keep], ref[keep]) < 1e-6
  o2 = np.asarray(lina_attention_qkv(jnp.stack([q, k, v], 2), ks, vs, mask=mask, impl="pallas"))
  np.testing.assert_array_equal(o2, o)
  if d == 96:   # one program per (b, h) (all three value pieces) and 32-row blocks
    from kernels.lina.pallas import lina_forward
    o4 = lina_forward(q, k, v, ks, vs, mask, value_pieces=3, block_n=32, interpret=True)
    assert rel_rms(np.asarray(o4)[keep], ref[keep]) < 1e-6
    o5 = lina_forward(q, k, v, ks, vs, mask, defer_sums=True, interpret=True)
    assert rel_rms(np.asarray(o5)[keep], ref[keep]) < 1e-6
  o3 = lina_attention_qkv(jnp.stack([q, k, v], 2), ks, vs, mask=mask, impl="pallas",
                          out_dtype=jnp.bfloat16)
  assert o3.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(o3, np.float32),
                                np.asarray(jnp.asarray(o).astype(jnp.bfloat16), np.float32))


def test_pallas_kernel_gradients_match_xla():
  rng = np.random.default_rng(5)
  b, n, h, d = 1, 40, 2, 32
  qkv = jnp.asarray(rng.standard_normal((b, n, 3, h, d)), jnp.bfloat16)
  ks, vs = (jnp.asarray(rng.uniform(0.5, 1.5, (h, n)), jnp.float32) for _ in range(2))
  w = jnp.asarray(rng.standard_normal((b, n, h, d)), jnp.float32)
  grads = {impl: jax.grad(lambda x, a, c: jnp.sum(lina_attention_qkv(x, a, c, impl=impl) * w),
                          argnums=(0, 1, 2))(qkv, ks, vs) for impl in ("xla", "pallas")}
  for gx, gp in zip(grads["xla"], grads["pallas"]):
    np.testing.assert_array_equal(np.asarray(gp, np.float32), np.asarray(gx, np.float32))


@pytest.mark.parametrize("n,gates,masked", [(37, True, True), (320, True, False), (70, False, True)])
def test_operator_split_vs_float64(n, gates, masked):
  """impl="split" (bf16 tensor-core contractions on 3-piece splits of the float32 operand) is as
  accurate as the float32 einsums: observed ~2e-7 relative RMS for both; 2 pieces give ~3e-6 and 1
  piece ~2e-3, so the bound catches a lost piece."""
  rng = np.random.default_rng(n)
  b, h, d = 2, 3, 96
  bf = [jnp.asarray(rng.standard_normal((b, n, h, d)), jnp.bfloat16) for _ in range(3)]
  ks = vs = mask = None
  if gates:
    ks, vs = (rng.uniform(0.2, 2.0, (h, n)).astype(np.float32) for _ in range(2))
  if masked:
    mask = rng.uniform(size=(b, n)) < 0.6
  keep = np.ones((b, n), bool) if mask is None else mask
  ref = oracle(*[np.asarray(x, np.float32) for x in bf], ks, vs, mask)
  o = lina_attention(*bf, ks, vs, mask=mask, impl="split")
  assert o.dtype == jnp.float32
  assert rel_rms(np.asarray(o)[keep], ref[keep]) < 1e-6
  o2 = lina_attention_qkv(jnp.stack(bf, 2), ks, vs, mask=mask, impl="split")
  np.testing.assert_array_equal(np.asarray(o2), np.asarray(o))


def test_operator_split_gradients_and_float32_inputs():
  """split's gradient is the float32 form's (not one through bf16 pieces); float32 inputs fall
  back to the float32 form, so results are identical."""
  rng = np.random.default_rng(5)
  b, n, h, d = 2, 45, 3, 16
  qkv = jnp.asarray(rng.standard_normal((b, n, 3, h, d)), jnp.bfloat16)
  ks, vs = (jnp.asarray(rng.uniform(0.2, 2, (h, n)), jnp.float32) for _ in range(2))
  mask = jnp.asarray(rng.uniform(size=(b, n)) < 0.7)
  w = jnp.asarray(rng.standard_normal((b, n, h, d)), jnp.float32)
  grads = {impl: jax.grad(lambda x, a, c: jnp.sum(lina_attention_qkv(x, a, c, mask=mask,
                                                                     impl=impl) * w),
                          argnums=(0, 1, 2))(qkv, ks, vs) for impl in ("xla", "split")}
  for gs, gx in zip(grads["split"], grads["xla"]):
    np.testing.assert_array_equal(np.asarray(gs, np.float32), np.asarray(gx, np.float32))
  x32 = qkv.astype(jnp.float32)
  np.testing.assert_array_equal(
      np.asarray(lina_attention_qkv(x32, ks, vs, mask=mask, impl="split")),
      np.asarray(lina_attention_qkv(x32, ks, vs, mask=mask, impl="xla")))


def test_operator_impl_checked():
  x = np.zeros((1, 4, 1, 2), np.float32)
  with pytest.raises(ValueError, match="impl"):
    lina_attention(x, x, x, impl="triton")
  with pytest.raises(ValueError, match="multiple of 16"):
    lina_attention(x, x, x, impl="pallas")
  with pytest.raises(ValueError, match="qkv"):
    lina_attention_qkv(np.zeros((1, 4, 2, 1, 16), np.float32))


def test_operator_mask_equals_gather():
  rng = np.random.default_rng(1)
  b, n, h, d = 2, 50, 2, 8
  q, k, v = (rng.standard_normal((b, n, h, d)).astype(np.float32) for _ in range(3))
  mask = rng.random((b, n)) < 0.3
  o = np.asarray(lina_attention(q, k, v, mask=jnp.asarray(mask)))
  ref = oracle(q, k, v, mask=mask)
  assert rel_rms(o, ref) < 1e-5
  # the selected tokens alone give the same outputs (LINA gathers them)
  sel = mask[0]
  o0 = lina_attention(q[:1, sel], k[:1, sel], v[:1, sel])
  assert rel_rms(o0[0], o[0, sel]) < 1e-5


def test_operator_bf16_inputs_are_computed_in_float32():
  rng = np.random.default_rng(2)
  q, k, v = (rng.standard_normal((1, 64, 2, 16)).astype(np.float32) for _ in range(3))
  bf = [jnp.asarray(x, jnp.bfloat16) for x in (q, k, v)]
  o = lina_attention(*bf)
  assert o.dtype == jnp.float32
  assert rel_rms(o, oracle(*[np.asarray(x, np.float32) for x in bf])) < 1e-5


@pytest.mark.parametrize("bad,msg", [
    (dict(q=np.zeros((2, 5, 4))), "rank 4"),
    (dict(key_scale=np.ones((3, 9))), "key_scale"),
    (dict(value_scale=np.ones((2, 5))), "value_scale"),
    (dict(mask=np.ones((2, 4))), "mask"),
])
def test_operator_bad_input(bad, msg):
  args = dict(q=np.zeros((2, 5, 3, 4)), k=np.zeros((2, 5, 3, 4)), v=np.zeros((2, 5, 3, 4)))
  kw = {k: v for k, v in bad.items() if k not in args}
  args.update({k: v for k, v in bad.items() if k in args})
  with pytest.raises(ValueError, match=msg):
    lina_attention(args["q"], args["k"], args["v"], kw.get("key_scale"), kw.get("value_scale"),
                   mask=kw.get("mask"))


@pytest.mark.parametrize("variant,expected", [("d48w768", 362.35e6), ("d48w1024", 643.30e6),
                                              ("d48w1536", 1445e6)])
def test_parameter_counts(variant, expected):
  n = M.count_params(get_config(variant))
  assert abs(n / expected - 1) < 0.02, (variant, n)


def test_abstract_init_matches_shapes():
  cfg = get_config("d48w768")
  p = jax.eval_shape(lambda: M.init_params(cfg, jax.random.key(0)))
  assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(p)) == M.count_params(cfg)


def test_ar_schedule():
  sched = F.ar_schedule(256, 64)
  assert len(sched) == 61 and sum(sched) == 256 and min(sched) >= 1
  assert sum(F.ar_schedule(64, 16)) == 64
  with pytest.raises(ValueError, match="AR steps"):
    F.ar_schedule(256, 0)


def test_mask_ratio_and_visible_counts():
  cfg = get_config("tiny")
  r = np.array([float(F.sample_mask_ratio(cfg, jax.random.key(i))) for i in range(200)])
  assert r.min() >= 0.7 and r.max() <= 1.0 and r.mean() > 0.8
  vis = F.random_visible(jax.random.key(0), 4, 64, 10)
  assert vis.shape == (4, 64) and (np.asarray(vis).sum(1) == 10).all()
  assert len({tuple(np.flatnonzero(row)) for row in np.asarray(vis)}) == 4   # own order per row


@pytest.fixture(scope="module")
def tiny():
  cfg = ml_collections.FrozenConfigDict(get_config("tiny"))
  params = M.init_params(cfg, jax.random.key(0))
  # LINA zero-initialises the head's AdaLN and output (a fresh head predicts 0): perturb every
  # leaf so that labels, guidance and noise all reach the output.
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  return cfg, jax.tree.unflatten(tree, [x + 0.05 * jax.random.normal(k, x.shape)
                                        for x, k in zip(leaves, keys)])


def test_flow_matching_loss_zero_at_exact_target(tiny, monkeypatch):
  cfg, params = tiny
  x = jax.random.normal(jax.random.key(1), (3, 64, 1))
  r = cfg.loss_repeat
  xr = jnp.tile(x, (r, 1, 1))
  # a head that knows the answer: eps - x = (x_s - x) / s
  monkeypatch.setattr(M, "head", lambda cfg, p, x_s, t, z: (x_s - xr) / (t / 1000.0)[..., None])
  loss = F.loss_fn(cfg, params, x, jnp.array([0, 1, 2]), jax.random.key(2))
  assert float(loss) < 1e-8
  monkeypatch.setattr(M, "head", lambda cfg, p, x_s, t, z: jnp.zeros_like(x_s))
  assert float(F.loss_fn(cfg, params, x, jnp.array([0, 1, 2]), jax.random.key(2))) > 0.5


def test_loss_bad_latents(tiny):
  cfg, params = tiny
  with pytest.raises(ValueError, match="latent_channels"):
    F.loss_fn(cfg, params, jnp.zeros((2, 64, 3)), jnp.array([0, 1]), jax.random.key(0))


def test_fixed_length_gates_reject_other_grids(tiny):
  cfg, params = tiny
  other = ml_collections.FrozenConfigDict({**cfg.to_dict(), "grid": (6, 6)})
  c = M.class_encoder(other, params, jnp.array([0]))
  with pytest.raises(ValueError, match="fixed-length"):
    M.image_transformer(other, params, jnp.zeros((1, 36, 1)), jnp.zeros((1, 36), bool), c)


def test_sampling_deterministic_and_guided(tiny):
  cfg, params = tiny
  labels = np.array([1, 7])
  kw = dict(ar_steps=8, euler_steps=4)
  a = F.sample(cfg, params, labels, rng=jax.random.key(5), cfg_scale=2.0, **kw)
  b = F.sample(cfg, params, labels, rng=jax.random.key(5), cfg_scale=2.0, **kw)
  c = F.sample(cfg, params, labels, rng=jax.random.key(6), cfg_scale=2.0, **kw)
  d = F.sample(cfg, params, labels, rng=jax.random.key(5), cfg_scale=1.0, **kw)
  assert a.shape == (2, 64, 1) and np.isfinite(np.asarray(a)).all()
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a, c) and not np.allclose(a, d)
  with pytest.raises(ValueError, match="cfg_scale"):
    F.sample(cfg, params, labels, rng=jax.random.key(0), cfg_scale=0.5)
  with pytest.raises(ValueError, match="labels"):
    F.sample(cfg, params, np.array([10]), rng=jax.random.key(0))


def test_sampler_reveals_every_token_once(tiny, monkeypatch):
  """With a head whose velocity is -1 everywhere, Euler from s=1 to 0 adds exactly +1 to the noise;
  every token must be written (an unwritten one stays exactly 0)."""
  cfg, params = tiny
  monkeypatch.setattr(M, "head", lambda cfg, p, x, t, z: -jnp.ones_like(x))
  out = F._sample.__wrapped__(cfg, params, jnp.array([3]), jax.random.key(0), 1.0, 16, 5)
  assert np.isfinite(np.asarray(out)).all() and (np.asarray(out) != 0).all()
  assert abs(float(jnp.mean(out)) - 1.0) < 0.35 and float(jnp.std(out)) > 0.5   # noise + 1


# --------------------------------------------------------------------------- PyTorch parity
FIXTURE = "tests/fixtures/lina_tiny.npz"


def _fixture_config():
  c = get_config("tiny")
  c.dim, c.num_heads, c.latent_channels = 32, 2, 3
  return ml_collections.FrozenConfigDict(c)


def _check_parity(sd, fx):
  from lasad_jax.lina.convert import convert_state_dict
  cfg = _fixture_config()
  params = jax.tree.map(jnp.asarray, convert_state_dict(sd, cfg))
  b, ch, g, _ = fx["latents"].shape
  c = M.class_encoder(cfg, params, jnp.asarray(fx["labels"]))
  assert rel_rms(c, fx["c"]) < 1e-5
  lat = jnp.asarray(fx["latents"]).transpose(0, 2, 3, 1).reshape(b, g * g, ch)
  visible = np.zeros((b, g * g), bool)
  np.put_along_axis(visible, fx["visible_ids"], True, axis=1)
  z = M.image_transformer(cfg, params, lat, jnp.asarray(visible), c)
  assert rel_rms(z, fx["z"]) < 1e-5
  x_t = jnp.asarray(fx["x_t"]).transpose(0, 2, 3, 1).reshape(b, g * g, ch)
  v = M.head(cfg, params, x_t, jnp.asarray(fx["t"]), jnp.asarray(fx["z"]))
  assert rel_rms(v, fx["v"]) < 1e-5


def test_parity_with_pytorch_fixture():
  """scripts/torch_lina_reference.py (LINA's parameter names and maths in PyTorch) -> converter ->
  the same condition tokens, transformer output and head velocity."""
  fx = np.load(FIXTURE)
  sd = {k[3:]: fx[k] for k in fx.files if k.startswith("sd/")}
  _check_parity(sd, fx)


def test_converter_lists_problems():
  from lasad_jax.lina.convert import convert_state_dict
  fx = np.load(FIXTURE)
  sd = {k[3:]: fx[k] for k in fx.files if k.startswith("sd/")}
  del sd["image_encoder.blocks.3.attn.key_scale"]
  sd["image_decoder.head.weight"] = sd["image_decoder.head.weight"][:, :5]
  sd["something.else"] = np.zeros(3)
  sd["video_encoder.patch_embed.proj.weight"] = np.zeros(3)   # ignored: unused by the image model
  with pytest.raises(ValueError) as e:
    convert_state_dict(sd, _fixture_config())
  msg = str(e.value)
  assert "missing image_encoder.blocks.3.attn.key_scale" in msg
  assert "image_decoder.head.weight: shape" in msg and "unexpected something.else" in msg
  assert "patch_embed" not in msg.split("head.weight")[0]


def test_live_parity_with_torch(tmp_path):
  """Where torch imports: rebuild the reference from the script and compare afresh."""
  pytest.importorskip("torch")
  import subprocess
  subprocess.run([sys.executable, "scripts/torch_lina_reference.py", "--out", str(tmp_path)],
                 check=True)
  fx = np.load(tmp_path / "lina_tiny.npz")
  _check_parity({k[3:]: fx[k] for k in fx.files if k.startswith("sd/")}, fx)


# --------------------------------------------------------------------------- training, CLI
def _digits_cfg(**over):
  from configs.lina_digits import get_config as digits
  c = digits()
  c.update(over)
  return c


def test_one_training_step_moves_params_and_ema():
  from lasad_jax import training as T
  cfg = ml_collections.FrozenConfigDict(_digits_cfg(batch_size=8))
  st = T.create_train_state(cfg)
  p0, e0 = st.params, st.ema
  rng = np.random.default_rng(0)
  batch = {"tokens": jnp.asarray(rng.integers(0, 17, (8, 64)), jnp.int32),
           "label": jnp.asarray(rng.integers(0, 10, (8,)), jnp.int32)}
  st, m = T.train_step(cfg, jax.tree.map(jnp.copy, st), batch)   # lr 0 at step 0 (warm-up)
  e1 = jax.tree.map(jnp.copy, st.ema)
  st, m = T.train_step(cfg, st, batch)
  assert np.isfinite(float(m["loss"])) and int(st.step) == 2
  moved = lambda a, b: max(float(jnp.max(jnp.abs(x - y))) for x, y in
                           zip(jax.tree.leaves(a), jax.tree.leaves(b)))
  assert moved(st.params, p0) > 0
  # EMA: e2 = d e1 + (1 - d) p2
  d = cfg.ema_decay
  want = jax.tree.map(lambda e, p: d * e + (1 - d) * p, e1, st.params)
  assert moved(st.ema, want) < 1e-6 and moved(st.ema, e0) > 0


def test_train_resume_and_sample_cli(tmp_path):
  """train_and_evaluate on digits (continuous) with EMA in the checkpoint, resumed to more steps,
  then sample.py on the workdir writes latents and a rendered grid."""
  import subprocess
  from lasad_jax import training as T
  from lasad_jax.checkpointing import Checkpointer, abstract
  cfg = _digits_cfg(batch_size=16, num_steps=3, checkpoint_every=3, eval_every=3, log_every=1,
                    eval_batches=1)
  wd = str(tmp_path / "run")
  logs = []
  st = T.train_and_evaluate(cfg, wd, log=logs.append)
  assert any("flow-matching loss" in line for line in logs)
  ck = Checkpointer(wd + "/checkpoints", read_only=True)
  back = ck.restore(abstract(st))
  ck.close()
  for a, b in zip(jax.tree.leaves(back.ema), jax.tree.leaves(st.ema)):
    np.testing.assert_array_equal(a, b)
  cfg.num_steps = 5
  st2 = T.train_and_evaluate(cfg, wd, log=logs.append)
  assert int(st2.step) == 5 and any("resumed" in line for line in logs)
  out = tmp_path / "s"
  r = subprocess.run([sys.executable, "sample.py", "--checkpoint", wd, "--classes", "1,2",
                      "--num-per-class", "2", "--ar-steps", "4", "--euler-steps", "2",
                      "--out", str(out)], capture_output=True, text=True)
  assert r.returncode == 0, r.stderr[-2000:]
  assert "loaded ema" in r.stderr
  lat = np.load(out / "latents.npz")
  assert lat["latents"].shape == (4, 8, 8, 1) and (out / "images.png").exists()
  assert np.load(out / "images.npz")["arr_0"].shape[0] == 4


def test_softmax_baseline_runs_and_masks(tiny):
  """attention="softmax" (the speed baseline): finite, and invisible tokens do not leak into the
  encoder phase (changing their values leaves z unchanged)."""
  cfg, params = tiny
  sm = ml_collections.FrozenConfigDict({**cfg.to_dict(), "attention": "softmax"})
  c = M.class_encoder(sm, params, jnp.array([1, 2]))
  x = jax.random.normal(jax.random.key(0), (2, 64, 1))
  vis = jnp.arange(64)[None] < jnp.array([[10], [30]])
  z1 = M.image_transformer(sm, params, x, vis, c)
  z2 = M.image_transformer(sm, params, jnp.where(vis[..., None], x, 5.0), vis, c)
  assert np.isfinite(np.asarray(z1)).all()
  np.testing.assert_allclose(z1, z2, atol=1e-5)
  z3 = M.image_transformer(cfg, params, jnp.where(vis[..., None], x, 5.0), vis, c)  # LINA too
  np.testing.assert_allclose(M.image_transformer(cfg, params, x, vis, c), z3, atol=1e-5)


def test_sample_cli_decodes_through_kl_vae(tmp_path):
  """sample.py with a LINA config naming a KL VAE checkpoint (the tiny PyTorch-made fixture):
  latents -> pixels, ADM-format images.npz."""
  import subprocess
  out = tmp_path / "s"
  r = subprocess.run(
      [sys.executable, "sample.py", "--config", "configs/lina.py:tiny", "--random-init",
       "--classes", "1,2", "--num-per-class", "2", "--ar-steps", "2", "--euler-steps", "2",
       "--out", str(out), "--config.latent_channels=4",
       "--config.vae_checkpoint=tests/fixtures/kl_tiny.pt", "--config.vae_config.ch=32",
       "--config.vae_config.ch_mult=(1,1)", "--config.vae_config.num_res_blocks=1",
       "--config.vae_config.embed_dim=4"], capture_output=True, text=True)
  assert r.returncode == 0, r.stderr[-2000:]
  img = np.load(out / "images.npz")["arr_0"]
  assert img.shape == (4, 16, 16, 3) and img.dtype == np.uint8
  assert np.load(out / "latents.npz")["latents"].shape == (4, 8, 8, 4)


def test_train_on_extracted_latents(tmp_path):
  """data="imagenet_latents": lasad_latents/v1 shards -> posterior samples -> LINA's loss."""
  from lasad_jax import training as T
  from lasad_jax.data import imagenet_latents as il
  rng = np.random.default_rng(0)
  for split, n in (("train", 24), ("val", 8)):
    m = np.concatenate([rng.standard_normal((n, 2, 8, 8, 4)),
                        np.full((n, 2, 8, 8, 4), -2.0)], axis=-1)
    il.write_shards(str(tmp_path / "lat" / split), m, rng.integers(0, 10, n), shard_size=10)
  c = get_config("tiny")
  from configs import common
  common.small_cpu_run(c, data="imagenet_latents", batch_size=8, learning_rate=1e-3,
                       num_steps=2, every=2)
  c.latent_channels, c.data_dir, c.eval_batches = 4, str(tmp_path / "lat"), 1
  st = T.train_and_evaluate(c, str(tmp_path / "run"), log=lambda s: None)
  assert int(st.step) == 2
  c.latent_channels = 3
  with pytest.raises(ValueError, match="latent_channels"):
    T.train_and_evaluate(c, str(tmp_path / "run2"), log=lambda s: None)


def test_depthwise_conv_impls_agree():
  rng = np.random.default_rng(3)
  img = rng.standard_normal((2, 6, 6, 8)).astype(np.float32)
  w = rng.standard_normal((5, 5, 8)).astype(np.float32)
  a = M.depthwise_conv5(img, w, "shift")
  b = M.depthwise_conv5(img, w, "xla")
  assert rel_rms(b, a) < 1e-6
  # the raster-axis form, also on a non-square grid (a wrong column mask would leak across rows)
  assert rel_rms(M.depthwise_conv5(img, w, "flat"), a) < 1e-6
  img2 = rng.standard_normal((2, 4, 7, 8)).astype(np.float32)
  assert rel_rms(M.depthwise_conv5(img2, w, "flat"), M.depthwise_conv5(img2, w, "shift")) < 1e-6
  assert rel_rms(M.depthwise_conv5(img, w, "flat", jnp.bfloat16),
                 M.depthwise_conv5(img, w, "shift", jnp.bfloat16)) < 1e-6
  # bf16 inputs (LINA's autocast conv): both impls sum the same bf16 products in float32
  a16 = M.depthwise_conv5(img, w, "shift", jnp.bfloat16)
  b16 = M.depthwise_conv5(img, w, "xla", jnp.bfloat16)
  assert a16.dtype == b16.dtype == jnp.float32
  assert rel_rms(b16, a16) < 1e-6
  r16 = M.depthwise_conv5(np.asarray(jnp.asarray(img, jnp.bfloat16), np.float32),
                          np.asarray(jnp.asarray(w, jnp.bfloat16), np.float32), "shift")
  np.testing.assert_allclose(np.asarray(a16), np.asarray(r16), rtol=1e-6, atol=1e-6)
  assert 1e-4 < rel_rms(a16, a) < 1e-2    # it is a different (bf16-rounded) conv
  with pytest.raises(ValueError, match="conv_impl"):
    M.depthwise_conv5(img, w, "fft")


def test_remat_policies_give_the_same_gradients(tiny):
  """LINA's block stacks honour config.remat_policy (lasad_jax/remat.py) without changing numbers."""
  cfg, params = tiny
  x = jax.random.normal(jax.random.key(3), (2, 64, 1))

  def grads(remat, policy="full"):
    c = ml_collections.ConfigDict(cfg.to_dict())
    c.remat_policy = policy
    c = ml_collections.FrozenConfigDict(c)
    return jax.jit(jax.grad(lambda p: F.loss_fn(c, p, x, jnp.array([1, 2]), jax.random.key(4),
                                                 remat=remat)))(params)
  ref = grads(False)
  for policy in ("full", "dots_attn"):
    for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(grads(True, policy))):
      np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=2e-5, atol=1e-6)


def test_cast_dense_weights_is_exact_and_complete():
  """The sampler's one-time cast of the dense weights to the compute dtype gives bit-identical
  network outputs (dense casts them anyway) and leaves no float32 matrix behind except the conv,
  the tables and the gates."""
  cfg = get_config("tiny")
  cfg.dtype = "bfloat16"
  cfg = ml_collections.FrozenConfigDict(cfg)
  params = M.init_params(cfg, jax.random.key(0))
  leaves, tree = jax.tree.flatten(params)   # perturbed as in `tiny`: the head is zero-initialised
  keys = jax.random.split(jax.random.key(1), len(leaves))
  params = jax.tree.unflatten(tree, [x + 0.05 * jax.random.normal(k, x.shape)
                                     for x, k in zip(leaves, keys)])
  cast = M.cast_dense_weights(cfg, params)
  flat = jax.tree_util.tree_flatten_with_path(cast)[0]
  left = {jax.tree_util.keystr(p) for p, a in flat
          if a.dtype == jnp.float32 and a.ndim >= 2 and a.shape[-1] > 1
          and not any(s in jax.tree_util.keystr(p) for s in ("norm", "_b", "conv", "table",
                                                              "scale", "pos"))}
  assert not left, left
  assert sum(a.dtype == jnp.bfloat16 for _, a in flat) > 10
  labels = jnp.array([1, 4, 10])
  x = jax.random.normal(jax.random.key(1), (3, 64, cfg.latent_channels))
  vis = jax.random.uniform(jax.random.key(2), (3, 64)) < 0.5
  outs = []
  for p in (params, cast):
    c = M.class_encoder(cfg, p, labels)
    z = M.image_transformer(cfg, p, x, vis, c)
    outs.append((z, M.head(cfg, p, x, jnp.full((3, 64), 500.0), z)))
  for a, b in zip(*outs):
    assert float(jnp.abs(a).max()) > 0
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
