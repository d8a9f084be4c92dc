"""Sampling: determinism, guidance, filtering, O(1) state, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs.lasad import get_config
from lasad_jax import model as M
from lasad_jax import sampling as S


@pytest.fixture(scope="module")
def model():
  return M.LASADGen(get_config("tiny"), rngs=nnx.Rngs(0))


@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
def test_same_seed_same_tokens(model, cfg_scale):
  kw = dict(height=8, width=8, cfg_scale=cfg_scale, top_k=5, top_p=0.9)
  a = S.sample(model, jnp.array([0, 3, 10]), rng=jax.random.key(0), **kw)
  b = S.sample(model, jnp.array([0, 3, 10]), rng=jax.random.key(0), **kw)
  c = S.sample(model, jnp.array([0, 3, 10]), rng=jax.random.key(1), **kw)
  assert a.shape == (3, 64) and a.dtype == jnp.int32
  assert bool((a == b).all()) and not bool((a == c).all())
  assert int(a.min()) >= 0 and int(a.max()) < model.config.vocab_size


def test_any_resolution_same_state_size(model):
  """The decoder state is [L, B, H, K, V] whatever the image size: no KV cache."""
  s = M.init_state(model.config, 2)
  assert s.shape == (2, 2, 4, 16, 16)
  toks = S.sample(model, jnp.array([1, 2]), height=5, width=13, rng=jax.random.key(2))
  assert toks.shape == (2, 65)


def test_greedy_sampling_follows_decode_logits(model):
  """top_k=1 picks the argmax of the logits the decoder computes for its own prefix."""
  lab = jnp.array([4, 7])
  toks = S.sample(model, lab, height=4, width=4, rng=jax.random.key(0), top_k=1)
  logits = S.decode_logits(model, toks, lab, width=4)
  np.testing.assert_array_equal(np.asarray(toks), np.asarray(jnp.argmax(logits, -1)))


def test_filter_logits():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
  assert int(jnp.isfinite(S.filter_logits(logits, top_k=2)).sum()) == 2
  kept = jnp.isfinite(S.filter_logits(logits, top_p=0.7))
  np.testing.assert_array_equal(np.asarray(kept[0]), [True, True, False, False])
  kept = jnp.isfinite(S.filter_logits(logits, top_p=0.1))
  np.testing.assert_array_equal(np.asarray(kept[0]), [True, False, False, False])


@pytest.mark.parametrize("kw,msg", [
    (dict(cfg_scale=-1.0), "cfg_scale"), (dict(temperature=0.0), "temperature"),
    (dict(top_k=10**6), "top_k"), (dict(top_p=0.0), "top_p"), (dict(height=0), "height"),
    (dict(width=-2), "width"), (dict(labels=jnp.array([11])), "labels"),
    (dict(labels=jnp.array([[1]])), "labels"),
])
def test_bad_sampling_arguments(model, kw, msg):
  args = dict(height=4, width=4, rng=jax.random.key(0), labels=jnp.array([1]))
  args.update(kw)
  labels = args.pop("labels")
  with pytest.raises(ValueError, match=msg):
    S.sample(model, labels, **args)


def test_bad_model_inputs(model):
  tok = jnp.zeros((2, 8), jnp.int32)
  with pytest.raises(ValueError, match="`tokens` must be in"):
    model(tok.at[0, 3].set(17), jnp.array([0, 1]))
  with pytest.raises(ValueError, match="`labels` must be in"):
    S.decode_logits(model, tok, jnp.array([0, 12]), width=4)
  with pytest.raises(ValueError, match="`width`"):
    model(tok, jnp.array([0, 1]), width=0)


def test_cfg_scale_one_equals_no_guidance(model):
  """The guided path (cond and null rows in one batch) at scale 1 gives the unguided tokens."""
  kw = dict(height=8, width=8, rng=jax.random.key(5))
  plain = S.sample(model, jnp.array([2, 9]), cfg_scale=1.0, **kw)
  guided = S.sample(model, jnp.array([2, 9]), cfg_scale=1.0 + 1e-7, **kw)  # takes the CFG path
  np.testing.assert_array_equal(np.asarray(plain), np.asarray(guided))


def test_softmax_baseline_samples_with_kv_cache():
  c = get_config("tiny")
  c.attention = "softmax"
  m = M.LASADGen(c, rngs=nnx.Rngs(0))
  lab = jnp.array([4, 7])
  toks = S.sample(m, lab, height=4, width=6, rng=jax.random.key(0), top_k=1, cfg_scale=1.0)
  assert toks.shape == (2, 24)
  np.testing.assert_array_equal(np.asarray(toks), np.asarray(
      jnp.argmax(S.decode_logits(m, toks, lab, width=6), -1)))
  kc, vc = M.init_state(c, 2, 25)
  assert kc.shape == (2, 2, 25, 4, 16)   # the cache grows with the sequence; LASAD's does not


@pytest.mark.parametrize("attention", ["lasad", "softmax"])
def test_fused_decode_projections_match_separate(attention):
  """unstack_for_decode's side-by-side q|f|v (q|k|v) and w1|w3 weights give the logits of the
  separate matmuls, token after token."""
  cfg = get_config("tiny")
  cfg.attention = attention
  m = M.LASADGen(cfg, rngs=nnx.Rngs(3))
  c, params = m.config, m.params()
  toks = jax.random.randint(jax.random.key(1), (2, 12), 0, c.vocab_size)
  labels = jnp.array([1, 5])
  out = {}
  for fuse in (True, False):
    p, state = M.unstack_for_decode(c, params, M.init_state(c, 2, 12), fuse=fuse)
    assert ("w_in" in p["layers"][0][0]) == fuse and ("wq" in p["layers"][0][0]) != fuse
    logits = []
    for pos in range(12):
      x = M.embed(p, jnp.int32(pos), labels, toks[:, pos - 1] if pos else jnp.zeros(2, jnp.int32))
      state, lg = M.decode_step(c, p, state, x, jnp.int32(pos), 4)
      logits.append(lg)
    out[fuse] = np.stack(logits)
  np.testing.assert_allclose(out[True], out[False], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dim", [64, 48])
def test_decode_kernel_applies_the_norm_scale(dim):
  """decode_attention(y, ..., x=x, norm_eps=eps) is decode_attention(r * y, ...) with
  r = rsqrt(mean(x^2) + eps) per row, also for a width that is not a power of two (48: the
  kernel reads x padded with zeros to 64 and divides by 48); giving only one of x / norm_eps
  is refused."""
  from kernels.lasad.decode import decode_attention
  b, h, d, eps = 3, 2, 16, 1e-5
  ks = jax.random.split(jax.random.key(dim), 6)
  y = jax.random.normal(ks[0], (b, 3, h, d))
  x = 3.0 * jax.random.normal(ks[1], (b, dim))
  state = jax.random.normal(ks[2], (b, h, d, d))
  lb = jax.nn.sigmoid(jax.random.normal(ks[3], (h, d)))
  hn = 1.0 + 0.1 * jax.random.normal(ks[4], (h, d))
  start, bnd = jnp.array([True, False, True]), jnp.array([-0.5, -jnp.inf])
  r = jax.lax.rsqrt(jnp.mean(x * x, -1) + eps)
  want = decode_attention(y * r[:, None, None, None], state, lb, start, bnd, hn, eps=1e-6)
  got = decode_attention(y, state, lb, start, bnd, hn, eps=1e-6, x=x, norm_eps=eps)
  for a, w in zip(got, want):
    np.testing.assert_allclose(a, w, rtol=1e-5, atol=1e-6)
  assert float(jnp.abs(r - 1).min()) > 0.1     # the scale matters here
  # y as 4 partial sums [S, B, 3, H, D], added in the kernel
  parts = jax.random.normal(ks[5], (4,) + y.shape)
  got = decode_attention(parts, state, lb, start, bnd, hn, eps=1e-6, x=x, norm_eps=eps)
  want = decode_attention(parts.sum(0), state, lb, start, bnd, hn, eps=1e-6, x=x, norm_eps=eps)
  for a, w in zip(got, want):
    np.testing.assert_allclose(a, w, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match=r"\[S, B, 3, H, D\] \(S a power of two\)"):
    decode_attention(parts[:3], state, lb, start, bnd, hn, eps=1e-6)
  with pytest.raises(ValueError, match="both `x` and `norm_eps`"):
    decode_attention(y, state, lb, start, bnd, hn, eps=1e-6, x=x)
  with pytest.raises(ValueError, match="x must be"):
    decode_attention(y, state, lb, start, bnd, hn, eps=1e-6, x=x[:2], norm_eps=eps)


@pytest.mark.parametrize("boundary", ["carry", "reset", "learned", "none"])
def test_decode_kernel_matches_xla_decode(boundary):
  """config.decode_impl='pallas' (kernels/lasad/decode.py, in the Pallas interpreter here) gives
  the XLA decode path's logits, through row starts, for every boundary mode; and greedy samples
  agree token for token."""
  import ml_collections
  cfg = get_config("tiny")
  cfg.boundary = boundary
  m = M.LASADGen(cfg, rngs=nnx.Rngs(5))
  params = m.params()
  if boundary == "learned":   # distinct per-head boundaries, one of them a near-reset
    params["blocks"]["boundary"] = params["blocks"]["boundary"].at[:, 0].set(-8.0)
  toks = jax.random.randint(jax.random.key(2), (2, 19), 0, cfg.vocab_size)
  labels = jnp.array([3, 10])
  out = {}
  # the norm's scale and the projection's parts in the kernel; [w1 | w3] as partial products
  forms = (("xla", "auto", 0, 0), ("pallas", "xla", 0, 0), ("pallas", "kernel", 0, 0),
           ("pallas", "kernel", 4, 0), ("pallas", "xla", 2, 0), ("pallas", "kernel", 4, 2),
           ("pallas", "xla", 0, 4))
  for form in forms:
    (cfg.decode_impl, cfg.decode_norm, cfg.decode_in_splits, cfg.decode_mlp_splits) = form
    c = ml_collections.FrozenConfigDict(cfg)
    out[form] = np.asarray(S._decode_logits(c, params, toks, labels, jnp.int32(4))[0])
  for key in forms[1:]:
    np.testing.assert_allclose(out[key], out[forms[0]], rtol=2e-5, atol=2e-5, err_msg=str(key))
  assert np.abs(out[forms[0]][:, 1:] - out[forms[0]][:, :-1]).max() > 1e-3


@pytest.mark.parametrize("boundary", ["carry", "reset", "learned", "none"])
def test_persistent_decode_matches_xla_decode(boundary):
  """config.decode_impl='persistent' (kernels/lasad/decode_persistent.py: every layer of a token
  in one kernel; here its body as one program in the Pallas interpreter, where the grid barriers
  and last-arriver tests are trivially met) gives the XLA decode path's logits through row starts
  for every boundary mode, with 3 rows padded to the kernel's 16 and an odd width; and the
  parallel forward's."""
  import ml_collections
  cfg = get_config("tiny")
  cfg.boundary = boundary
  m = M.LASADGen(cfg, rngs=nnx.Rngs(5))
  params = m.params()
  blk = params["blocks"]
  if boundary == "learned":   # distinct per-head boundaries, one of them a near-reset
    blk["boundary"] = blk["boundary"].at[:, 0].set(-8.0)
  # non-trivial norms and lower bounds (the model initialises them to ones)
  ks = jax.random.split(jax.random.key(7), 4)
  for i, name in enumerate(("attn_norm", "ffn_norm", "head_norm", "lower_bound")):
    blk[name] = blk[name] + 0.3 * jax.random.normal(ks[i], blk[name].shape)
  toks = jax.random.randint(jax.random.key(2), (3, 23), 0, cfg.vocab_size)
  labels = jnp.array([3, 10, 0])
  out = {}
  for impl in ("xla", "persistent"):
    cfg.decode_impl = impl
    logits, fails = S._decode_logits(ml_collections.FrozenConfigDict(cfg), params, toks, labels,
                                     jnp.int32(5))
    out[impl] = np.asarray(logits)
    assert int(fails) == 0
  np.testing.assert_allclose(out["persistent"], out["xla"], rtol=2e-5, atol=2e-5)
  par = np.asarray(M.forward(ml_collections.FrozenConfigDict(cfg), params, toks, labels, 5))
  np.testing.assert_allclose(out["persistent"], par, rtol=5e-5, atol=5e-5)


def test_persistent_shares_cover_every_unit_once():
  """decode_persistent._share: the programs' contiguous shares of n units tile [0, n) exactly,
  each within one unit of n / nprog, also for n < nprog."""
  from kernels.lasad import decode_persistent as DP
  for n, nprog in ((384, 132), (1408, 132), (128, 132), (7, 3), (0, 5)):
    shares = [DP._share(p, nprog, n) for p in range(nprog)]
    assert shares[0][0] == 0 and shares[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(shares, shares[1:]))
    sizes = [hi - lo for lo, hi in shares]
    assert max(sizes) - min(sizes) <= 1


def test_persistent_plans_agree():
  """The kernel's tilings agree (float32, so only summation order differs): K blocks of 64 (four
  loop steps per unit, the partial carried across them), K segments of 128 with narrower w1|w3
  tiles (twice the units and partials), and the default (K segments of 256 in blocks of 128)."""
  import dataclasses
  from kernels.lasad import decode_persistent as DP
  L, B, D, F, H, HD = 2, 3, 256, 512, 4, 64
  ks = jax.random.split(jax.random.key(3), 10)
  w = lambda k, *s: 0.05 * jax.random.normal(k, s)  # noqa: E731
  args = (jax.random.normal(ks[0], (B, D)), 0.1 * jax.random.normal(ks[5], (L, B, H, HD, HD)),
          w(ks[1], L, D, 3 * D), w(ks[2], L, D, D), w(ks[3], L, D, 2 * F), w(ks[4], L, F, D),
          1 + 0.2 * jax.random.normal(ks[6], (L, D)), 1 + 0.2 * jax.random.normal(ks[7], (L, D)),
          1 + 0.2 * jax.random.normal(ks[8], (L, D)),
          jax.nn.sigmoid(jax.random.normal(ks[9], (L, D))),
          jnp.array([[0.0, -1.0, -jnp.inf, 0.0]] * L), jnp.array([True, False, True]))
  base = DP.make_plan(layers=L, batch=B, dim=D, hidden=F, heads=H, head_dim=HD, eps=1e-5, nprog=1)
  outs = {}
  for name, kw in (("default", {}), ("bk64", dict(bk=64)),
                   ("fine", dict(k_in=128, k_ff=128, k_2=128, bn_ff=32))):
    x, st, fails = DP.decode_layers(*args, plan=dataclasses.replace(base, **kw), interpret=True)
    assert int(fails) == 0
    outs[name] = (np.asarray(x), np.asarray(st))
  for name in ("bk64", "fine"):
    for got, want in zip(outs[name], outs["default"]):
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  assert np.isfinite(outs["default"][0]).all()
  assert np.abs(outs["default"][0] - args[0]).max() > 1e-2   # the layers did something


def _mosaic_test_config(boundary):
  """The smallest LASADGen the Mosaic GPU decode kernel takes: dim 128 (a 128-column tile), two
  heads of 64, bf16 (its matmuls are bf16 wgmma), two layers."""
  cfg = get_config("tiny")
  cfg.dim, cfg.num_heads, cfg.head_dim, cfg.num_layers = 128, 2, 64, 2
  cfg.dtype, cfg.boundary = "bfloat16", boundary
  return cfg


@pytest.mark.parametrize("boundary", ["learned", "reset"])
def test_mosaic_decode_matches_persistent(boundary):
  """config.decode_impl='mosaic' (kernels/lasad/decode_mgpu.py, one Mosaic GPU kernel per token;
  here Mosaic GPU's interpreter, one program, which meets every semaphore dependency in order):
  teacher-forced logits with 3 rows padded to 16 equal the Triton persistent kernel's in bf16 up
  to float32 summation order (both round where decode_step rounds: measured 3.6e-4 / 0 rel RMS),
  and stay as close to the float32 XLA path as bf16 allows (measured 1.0e-2 / 1.4e-2; XLA's own
  bf16 path 1.0e-2 / 0.9e-2)."""
  import ml_collections
  cfg = _mosaic_test_config(boundary)
  params = M.LASADGen(cfg, rngs=nnx.Rngs(5)).params()
  blk = params["blocks"]
  ks = jax.random.split(jax.random.key(7), 4)
  for i, name in enumerate(("attn_norm", "ffn_norm", "head_norm", "lower_bound")):
    blk[name] = blk[name] + 0.3 * jax.random.normal(ks[i], blk[name].shape)
  if boundary == "learned":
    blk["boundary"] = blk["boundary"].at[:, 0].set(-8.0)
  toks = jax.random.randint(jax.random.key(2), (3, 19), 0, cfg.vocab_size)
  labels = jnp.array([3, 10, 0])
  out = {}
  for impl, dtype in (("xla", "float32"), ("persistent", "bfloat16"), ("mosaic", "bfloat16")):
    cfg.decode_impl, cfg.dtype = impl, dtype
    logits, fails = S._decode_logits(ml_collections.FrozenConfigDict(cfg), params, toks, labels,
                                     jnp.int32(5))
    assert int(fails) == 0
    out[impl] = np.asarray(logits, np.float64)

  def rel(a, b):
    return float(np.sqrt(np.mean((a - b) ** 2) / np.mean(b ** 2)))
  assert rel(out["mosaic"], out["persistent"]) < 2e-3
  assert rel(out["mosaic"], out["xla"]) < 3e-2


def test_mosaic_decode_attention_split_and_state_ring():
  """decode_mgpu's attention units take 8 / att_split rows of a head's 8-row group and write
  their own o^T tile, which the wo units sum; a state's TMA buffer is refilled one row after its
  store. Whatever the split (1, 4, 8) and ring depth (2, 4), the layers give the same x and
  states bit for bit (interpreter, one program; 3 rows padded to 16, two rows starting an image
  row). That the states, kept transposed (S^T [V, K]), carry the right values from token to token
  is test_mosaic_decode_matches_persistent's: 19 tokens of logits."""
  import dataclasses

  from kernels.lasad import decode_mgpu as DM
  L, B, D, F, H = 2, 3, 128, 256, 2
  ks = iter(jax.random.split(jax.random.key(0), 12))
  w = lambda *s: (0.05 * jax.random.normal(next(ks), s)).astype(jnp.bfloat16)  # noqa: E731
  args = (jax.random.normal(next(ks), (B, D)), 0.1 * jax.random.normal(next(ks), (L, B, H, 64, 64)),
          w(L, D, 3 * D), w(L, D, D), DM.interleave_w13(w(L, D, 2 * F), F), w(L, F, D),
          1 + 0.1 * jax.random.normal(next(ks), (L, D)), jnp.ones((L, D)), jnp.ones((L, D)),
          jnp.full((L, D), 0.5), jnp.full((L, H), -2.0), jnp.array([True, False, True]))
  base = DM.make_plan(layers=L, batch=B, dim=D, hidden=F, heads=H, eps=1e-5, nprog=1)
  out = {}
  for split, bufs in ((1, 4), (4, 2), (8, 4)):
    plan = dataclasses.replace(base, att_split=split, state_bufs=bufs)
    x, st = DM.decode_layers(*args, plan=plan, interpret=True)
    out[split] = (np.asarray(x), np.asarray(st))
  for split in (4, 8):
    np.testing.assert_array_equal(out[split][0], out[1][0])
    np.testing.assert_array_equal(out[split][1], out[1][1])
  assert np.isfinite(out[1][1]).all() and not np.allclose(out[1][1], np.asarray(args[1]))
  for bad, match in ((dict(att_split=3), "att_split=3"), (dict(state_bufs=1), "state_bufs=1")):
    with pytest.raises(ValueError, match=match):
      dataclasses.replace(base, **bad)


@pytest.mark.parametrize("sizes", [
    dict(layers=24, batch=16, dim=1024, hidden=2816, heads=16, nprog=132),   # LASADGen-L, H100
    dict(layers=2, batch=3, dim=128, hidden=512, heads=2, nprog=1),          # the interpreter's
    dict(layers=3, batch=40, dim=768, hidden=2048, heads=12, nprog=114)])    # B-sized, H20-like
def test_mosaic_decode_semaphore_bookkeeping(sizes):
  """decode_mgpu's units signal and wait on global semaphores, which Mosaic GPU's interpreter
  skips and the GPU test covers only at L: a consumer waiting for one signal too many hangs the
  kernel, one too few reads partials being written. Here, from Plan alone: every semaphore of a
  group gets exactly the per-layer count its consumers wait for, from exactly the producers
  whose outputs the consumer reads, and the counts per launch (taken back at the end) add up."""
  from kernels.lasad import decode_mgpu as DM
  P = DM.make_plan(eps=1e-5, **sizes)
  units, counts, m = P.units(), P.sem_counts(), P.mats
  by_sem = {}   # (group, index) -> the units (phase, u) of one layer that signal it
  for phase, n in units.items():
    for u in range(n):
      group, i = P.sem_index(phase, u)
      by_sem.setdefault((group, int(i)), []).append((phase, u))
  for group, (n, per_layer) in counts.items():
    for i in range(n):
      assert len(by_sem.get((group, i), ())) == per_layer, (group, i)
  assert set(by_sem) == {(g, i) for g, (n, _) in counts.items() for i in range(n)}, \
      "signals on semaphores no consumer waits on"
  layout, _ = P.semaphores()
  for group, (n, per_layer) in counts.items():
    assert layout[group][1:] == (n, per_layer * P.layers)

  def producers(phase, u):   # the units whose signals unit u of phase waits for (Plan.wait_on)
    group, i, _ = P.wait_on(phase, u, 0)
    return by_sem[group, i]
  segs_in, segs_o, segs_13, segs_2 = (m[k][1] for k in ("in", "o", "13", "2"))
  per_head = P.per_head
  # what each consumer reads, restated here from the units' definitions (the module docstring)
  for u in range(units["B"]):   # an attention unit: the A tiles holding its head's q, f and v
    h = u // per_head
    assert {ph for ph, _ in producers("B", u)} == {"A"}
    tiles = {pu // segs_in for _, pu in producers("B", u)}
    assert {(m3 * P.dim + h * DM.HD) // DM.TN for m3 in range(3)} <= tiles
  for u in range(units["C"]):   # a wo unit of K segment s: the attention units of its b_o heads
    s = u % segs_o
    assert {pu // per_head for ph, pu in producers("C", u) if ph == "B"} == \
        set(range(s * P.b_o, (s + 1) * P.b_o))
    assert {ph for ph, _ in producers("C", u)} == {"B"}
  for u in range(units["E"]):   # a w2 unit of K segment s: the w1|w3 tiles of its K blocks
    s = u % segs_2
    assert {ph for ph, _ in producers("E", u)} == {"D"}
    assert {pu // segs_13 for _, pu in producers("E", u)} == set(range(s * P.b_2, (s + 1) * P.b_2))
  for owner, mat, segs in (("C'", "C", segs_o), ("E'", "E", segs_2)):
    for j in range(units[owner]):   # a residual owner of x rows 64 j..: all of its tile's units
      t = j * 64 // DM.TN
      assert sorted(producers(owner, j)) == [(mat, t * segs + s) for s in range(segs)]
  for phase in ("A", "D"):   # the input norms: every residual owner
    assert sorted(producers(phase, 0)) == sorted(
        [("C'", j) for j in range(units["C'"])] + [("E'", j) for j in range(units["E'"])])
  # the counts waited for: run the units one after another, layer by layer (an order the
  # dependencies allow, as the interpreter does): each wait's count is exactly the signals its
  # semaphore has had by then, i.e. it waits for every producer before it and for nothing more
  have = dict.fromkeys(by_sem, 0)
  for layer in range(min(P.layers, 3)):
    for phase, n in units.items():
      for u in range(n):
        group, i, count = P.wait_on(phase, u, layer)
        assert have[group, i] == count, (layer, phase, u, group, i)
      for u in range(n):
        group, i = P.sem_index(phase, u)
        have[group, int(i)] += 1


def test_mosaic_decode_refuses_what_it_cannot_run():
  """decode_impl='mosaic' names what does not fit: a float32 compute dtype, a head_dim other than
  64 (the softmax baseline: test_decode_impl_errors), a GPU other than Hopper, more than 64
  rows; Plan names the shared memory it would need and a K split that does not divide."""
  import collections
  import dataclasses

  from kernels.lasad import decode_mgpu as DM
  cfg = _mosaic_test_config("carry")
  cfg.decode_impl = "mosaic"
  cfg.dtype = "float32"
  with pytest.raises(ValueError, match="bfloat16"):
    M.decode_impl(cfg)
  cfg = get_config("tiny")   # head_dim 16
  cfg.decode_impl, cfg.dtype = "mosaic", "bfloat16"
  with pytest.raises(ValueError, match="head_dim 64"):
    M.decode_impl(cfg)
  plan = DM.make_plan(layers=24, batch=16, dim=1024, hidden=2816, heads=16, eps=1e-5, nprog=132)
  with pytest.raises(ValueError, match="at most 64 rows.*batch of 80.*decode_impl='auto'"):
    DM.make_plan(layers=24, batch=80, dim=1024, hidden=2816, heads=16, eps=1e-5, nprog=132)
  # a GPU without wgmma / TMA (the check on a GPU backend; here fake devices)
  gpu = collections.namedtuple("Device", "device_kind compute_capability")
  with pytest.raises(ValueError, match="Hopper.*A100-SXM4-80GB has 8.0.*decode_impl='auto'"):
    DM.check_device(gpu("NVIDIA A100-SXM4-80GB", "8.0"))
  with pytest.raises(ValueError, match="B200 has 10.0"):
    DM.check_device(gpu("NVIDIA B200", "10.0"))
  DM.check_device(gpu("NVIDIA H100 80GB HBM3", "9.0"))
  with pytest.raises(ValueError, match="shared memory"):
    dataclasses.replace(plan, stages=12)
  with pytest.raises(ValueError, match="b_2=3"):
    dataclasses.replace(plan, b_2=3)


def test_persistent_sampling_equals_xla_sampling():
  """sample() with decode_impl='persistent' draws the same tokens as with 'xla' (same seed, CFG,
  top-k), and a bad decode_impl is refused."""
  cfg = get_config("tiny")
  toks = {}
  for impl in ("xla", "persistent"):
    cfg.decode_impl = impl
    m = M.LASADGen(cfg, rngs=nnx.Rngs(3))
    toks[impl] = np.asarray(S.sample(m, jnp.array([1, 2]), height=4, width=4,
                                     rng=jax.random.key(9), cfg_scale=2.0, top_k=5))
  np.testing.assert_array_equal(toks["persistent"], toks["xla"])


def test_decode_impl_errors():
  cfg = get_config("tiny")
  cfg.decode_impl = "triton"
  with pytest.raises(ValueError, match="decode_impl"):
    M.use_decode_kernel(cfg)
  cfg.decode_impl, cfg.head_dim = "pallas", 24
  with pytest.raises(ValueError, match="head_dim"):
    M.use_decode_kernel(cfg)
  for impl in ("persistent", "mosaic"):
    cfg = get_config("tiny")
    cfg.decode_impl, cfg.attention = impl, "softmax"
    with pytest.raises(ValueError, match="LASAD attention only"):
      M.decode_impl(cfg)
  cfg = get_config("tiny")
  cfg.decode_norm = "pallas"
  with pytest.raises(ValueError,
                     match=r"config\.decode_norm must be one of auto \| xla \| kernel, got .pallas."):
    M.decode_norm_in_kernel(cfg)
  for bad in (3, 128, -1):   # tiny's width is 64
    cfg = get_config("tiny")
    cfg.decode_in_splits = bad
    with pytest.raises(ValueError, match="decode_in_splits must be None .auto., 0 or a power"):
      M.decode_in_splits(cfg)
    cfg = get_config("tiny")
    cfg.decode_mlp_splits = bad
    with pytest.raises(ValueError, match="decode_mlp_splits must be None .auto., 0 or a power"):
      M.decode_mlp_splits(cfg)
  cfg = get_config("tiny")
  assert M.decode_in_splits(cfg) == 4      # None: 4 where it divides the width
  assert M.decode_mlp_splits(cfg) == 4     # None: 4 where it divides the width
  cfg.dim = 66
  assert M.decode_in_splits(cfg) == 0
  assert M.decode_mlp_splits(cfg) == 0


def test_sampler_with_decode_kernel_same_tokens():
  """The sampler (per-layer weights, fused projections, CFG) with the Pallas decode kernel draws
  the XLA decode path's tokens for the same seed."""
  cfg = get_config("tiny")
  toks = {}
  for impl in ("xla", "pallas"):
    cfg.decode_impl = impl
    m = M.LASADGen(cfg, rngs=nnx.Rngs(0))
    toks[impl] = np.asarray(S.sample(m, jnp.array([2, 9]), height=5, width=6, cfg_scale=2.0,
                                     top_k=3, rng=jax.random.key(4)))
  np.testing.assert_array_equal(toks["pallas"], toks["xla"])


@pytest.mark.parametrize("radix", [2, 4])
@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_kth_largest_equals_top_k(impl, radix):
  """kernels/sampling/kth.py: the k-th largest value of each row equals lax.top_k's, with ties,
  +-inf, negative rows and k at both ends."""
  from kernels.sampling.kth import kth_largest
  rng = np.random.default_rng(0)
  x = rng.standard_normal((4, 500)).astype(np.float32) * 5   # not a power of two: padded
  x[0, :10] = np.inf
  x[1] = np.round(x[1])                 # many ties
  x[2, ::2] = -np.inf
  x[3] = -np.abs(x[3]) - 100.0          # all negative
  for k in (1, 2, 37, 256, 499, 500):
    ref = np.asarray(jax.lax.top_k(jnp.asarray(x), k)[0][:, -1:])
    np.testing.assert_array_equal(
        np.asarray(kth_largest(jnp.asarray(x), k, impl=impl, radix=radix)), ref)
  with pytest.raises(ValueError, match="k must be"):
    kth_largest(jnp.asarray(x), 0, impl=impl)
  with pytest.raises(ValueError, match="radix must be"):
    kth_largest(jnp.asarray(x), 5, impl=impl, radix=16)


def test_top_k_select_samples_the_same_tokens(model):
  """filter_logits(top_k_impl="select") keeps exactly the sort's top-k set: same tokens."""
  kw = dict(height=4, width=6, cfg_scale=3.0, top_k=5, rng=jax.random.key(8))
  a = S.sample(model, jnp.array([1, 6]), **kw)
  b = S.sample(model, jnp.array([1, 6]), top_k_impl="select", **kw)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  with pytest.raises(ValueError, match="top_k_impl"):
    S.sample(model, jnp.array([1]), top_k_impl="heap", **kw)


def test_unrolled_token_loop_samples_the_same_tokens(model, monkeypatch):
  """SCAN_UNROLL (tokens per while-loop iteration; 7 tokens: a remainder at 2 and 3) leaves the
  tokens as they are."""
  kw = dict(height=1, width=7, cfg_scale=2.0, top_k=5, rng=jax.random.key(3))
  lab = jnp.array([2, 9])
  base = S.sample(model, lab, **kw)
  args = (model.config, model.params(), lab, kw["rng"], 7, 7, 2.0, 1.0, 5, 1.0)
  for unroll in (2, 3):
    monkeypatch.setattr(S, "SCAN_UNROLL", unroll)
    jaxpr = jax.make_jaxpr(S._sample_fn, static_argnums=S._SAMPLE_STATIC)(*args)
    assert [e.params["unroll"] for e in jaxpr.eqns if e.primitive.name == "scan"] == [unroll]
    jax.clear_caches()   # SCAN_UNROLL is read when tracing: no cached sampler
    np.testing.assert_array_equal(np.asarray(S.sample(model, lab, **kw)), np.asarray(base))
  jax.clear_caches()


@pytest.mark.parametrize("r,k,n,cfg", [
    (16, 256, 128, dict(tn=64, tk=64, splits=2, stages=2)),
    (8, 192, 128, dict(tn=128, tk=64, splits=1, stages=4)),   # more steps than some stages
    (24, 128, 64, dict(tn=64, tk=64, splits=2, stages=3)),    # one step per program
])
def test_skinny_matmul_matches_dot(r, k, n, cfg):
  """kernels/sampling/gemm.py (Mosaic GPU, in its interpreter here): x @ W in float32 from bf16
  operands, against XLA's float32 dot, for several tilings, K splits and row counts."""
  from kernels.sampling import gemm as G
  x = jax.random.normal(jax.random.key(0), (r, k), jnp.bfloat16)
  w = jax.random.normal(jax.random.key(1), (k, n), jnp.bfloat16)
  ref = jnp.dot(x.astype(jnp.float32), w.astype(jnp.float32))
  got = G.skinny_matmul(x, w, G.GemmConfig(**cfg))
  assert got.shape == (r, n) and got.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-5, atol=1e-4)


def test_skinny_matmul_errors():
  from kernels.sampling import gemm as G
  x = jnp.zeros((16, 128), jnp.bfloat16)
  with pytest.raises(ValueError, match="rows of x"):
    G.skinny_matmul(jnp.zeros((12, 128), jnp.bfloat16), jnp.zeros((128, 64), jnp.bfloat16))
  with pytest.raises(ValueError, match="multiple of tn"):
    G.skinny_matmul(x, jnp.zeros((128, 96), jnp.bfloat16))
  with pytest.raises(ValueError, match="tk x splits"):
    G.skinny_matmul(x, jnp.zeros((128, 64), jnp.bfloat16), G.GemmConfig(splits=4))
  with pytest.raises(ValueError, match="bf16 or f16"):
    G.skinny_matmul(x.astype(jnp.float32), jnp.zeros((128, 64), jnp.float32))
  with pytest.raises(ValueError, match="w must be"):
    G.skinny_matmul(x, jnp.zeros((64, 64), jnp.bfloat16))
  with pytest.raises(ValueError, match="32 barriers"):
    G.skinny_matmul(x, jnp.zeros((128, 64), jnp.bfloat16), G.GemmConfig(stages=33))


def test_autotune_options(tmp_path):
  """sampling.autotune_options: reading a directory (which must exist) or, with search, XLA's
  exhaustive tiling search writing into it (created); sample(autotune_dir=...) compiles with them
  and draws the same tokens on a CPU (where XLA autotunes nothing)."""
  read = dict(S.autotune_options(tmp_path))
  assert read == {"xla_gpu_per_fusion_autotune_cache_dir": str(tmp_path),
                  "xla_gpu_experimental_autotune_cache_mode": "AUTOTUNE_CACHE_MODE_READ"}
  new = tmp_path / "new"
  search = dict(S.autotune_options(new, search=True))
  assert new.is_dir() and search["xla_gpu_exhaustive_tiling_search"] is True
  assert search["xla_gpu_experimental_autotune_cache_mode"] == "AUTOTUNE_CACHE_MODE_UPDATE"
  with pytest.raises(ValueError, match="`autotune_dir` .* is not a directory; make one with"):
    S.autotune_options(tmp_path / "missing")
  (tmp_path / "file").write_text("")
  with pytest.raises(ValueError, match="`autotune_dir` .* is not a directory"):
    S.autotune_options(tmp_path / "file", search=True)
  assert S.sampler_with(S.autotune_options(tmp_path)) is S.sampler_with(
      S.autotune_options(tmp_path))   # one jit (one compile cache) per option set
  m = M.LASADGen(get_config("tiny"), rngs=nnx.Rngs(3))
  kw = dict(height=3, width=4, rng=jax.random.key(1), cfg_scale=2.0, top_k=5)
  np.testing.assert_array_equal(S.sample(m, jnp.array([2, 5]), **kw),
                                S.sample(m, jnp.array([2, 5]), autotune_dir=tmp_path, **kw))
