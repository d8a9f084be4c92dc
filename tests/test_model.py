"""LASADGen: sizes from abstract shapes, parallel forward == recurrent decode, config errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs.lasad import get_config
from kernels.lasad.pallas import BlockSizes
from lasad_jax import model as M
from lasad_jax import sampling as S
from lasad_jax.ops import hgrn2_attention, lasad_attention

# LlamaGen's GPTs as built (DESIGN.md §6), millions of parameters.
LLAMAGEN = {"B": 110.9, "L": 342.9, "XL": 774.7, "XXL": 1411.0}


@pytest.mark.parametrize("attention", ["lasad", "softmax"])
@pytest.mark.parametrize("variant", sorted(LLAMAGEN))
def test_param_count_matches_llamagen(variant, attention):
  c = get_config(variant)
  c.attention = attention
  n = M.count_params(c) / 1e6
  assert abs(n - LLAMAGEN[variant]) / LLAMAGEN[variant] < 0.05, n
  if attention == "softmax":  # the same architecture as LlamaGen: the same count
    assert abs(n - LLAMAGEN[variant]) < 0.1, n


def _tiny(boundary, attention="lasad"):
  c = get_config("tiny")
  c.boundary = boundary
  c.attention = attention
  return M.LASADGen(c, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("boundary", ["carry", "reset", "none", "learned"])
@pytest.mark.parametrize("width,n", [(4, 37), (8, 64), (16, 33)])
def test_parallel_logits_equal_decode_logits(boundary, width, n):
  m = _tiny(boundary)
  tok = jax.random.randint(jax.random.key(n), (2, n), 0, m.config.vocab_size)
  lab = jnp.array([1, m.config.num_classes])  # a class and the null class
  par = m(tok, lab, width=width)
  dec = S.decode_logits(m, tok, lab, width=width)
  assert par.shape == (2, n, m.config.vocab_size)
  err = float(jnp.sqrt(jnp.mean((par - dec) ** 2) / jnp.mean(par ** 2)))
  assert err < 1e-4, err


@pytest.mark.parametrize("width,n", [(4, 37), (8, 64), (16, 33)])
def test_softmax_baseline_parallel_equals_kv_cache_decode(width, n):
  m = _tiny("carry", "softmax")
  tok = jax.random.randint(jax.random.key(n), (2, n), 0, m.config.vocab_size)
  lab = jnp.array([3, 0])
  par, dec = m(tok, lab, width=width), S.decode_logits(m, tok, lab, width=width)
  err = float(jnp.sqrt(jnp.mean((par - dec) ** 2) / jnp.mean(par ** 2)))
  assert err < 1e-5, err


def test_rope_2d_follows_llamagen_layout():
  cos, sin = M.rope_2d(jnp.arange(6), 2, 8)
  # class token: cos = sin = 0 (LlamaGen pads the table with zeros for condition tokens).
  assert float(jnp.abs(cos[0]).max()) == 0 and float(jnp.abs(sin[0]).max()) == 0
  # token at grid (row 1, col 0) = sequence position 3: the column pairs are unrotated.
  np.testing.assert_allclose(np.asarray(cos[3, 2:]), 1.0)
  np.testing.assert_allclose(np.asarray(sin[3, :2]), np.sin([1.0, 0.01]), rtol=1e-6)


def test_row_mask_changes_logits_after_first_row():
  tok = jax.random.randint(jax.random.key(0), (1, 24), 0, 17)
  lab = jnp.array([2])
  carry, reset = _tiny("carry")(tok, lab, width=8), _tiny("reset")(tok, lab, width=8)
  # Identical up to and including the first row start's predecessor, different after it.
  np.testing.assert_allclose(carry[:, :9], reset[:, :9], rtol=1e-5, atol=1e-6)
  assert float(jnp.abs(carry[:, 9:] - reset[:, 9:]).max()) > 1e-4


def test_learned_boundary_gets_gradient():
  m = _tiny("learned")
  tok = jax.random.randint(jax.random.key(1), (2, 32), 0, 17)
  params = m.params()

  def loss(p):
    logits = M.forward(m.config, p, tok, jnp.array([0, 1]), width=8)
    return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(
        logits, tok[..., None], -1)[..., 0])
  g = jax.grad(loss)(params)
  assert float(jnp.abs(g["blocks"]["boundary"]).sum()) > 0
  assert all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(g))


def test_config_errors():
  with pytest.raises(ValueError, match="unknown LASADGen variant"):
    get_config("huge")
  c = get_config("tiny")
  c.attention = "linear"
  with pytest.raises(ValueError, match="config.attention must be"):
    M.LASADGen(c, rngs=nnx.Rngs(0))
  c = get_config("tiny")
  c.boundary = "sometimes"
  with pytest.raises(ValueError, match="config.boundary"):
    M.LASADGen(c, rngs=nnx.Rngs(0))


def test_scan_layers_false_unrolls_the_layers():
  """config.scan_layers=False: no scan over the layers in the forward's jaxpr (one copy per
  layer), True (default): one scan."""
  c = get_config("tiny")
  params = M.LASADGen(c, rngs=nnx.Rngs(0)).params()
  tok, lab = jnp.zeros((1, 16), jnp.int32), jnp.zeros((1,), jnp.int32)

  def n_scans(scan):
    c.scan_layers = scan
    jaxpr = jax.make_jaxpr(lambda p: M.forward(c, p, tok, lab, width=4))(params)
    return sum(e.primitive.name == "scan" for e in jaxpr.jaxpr.eqns)
  assert n_scans(True) == 1 and n_scans(False) == 0


@pytest.mark.parametrize("attention", ["lasad", "softmax"])
def test_remat_policies_give_the_same_gradients(attention):
  """Rematerialisation changes what is stored, never the numbers (float32 tiny model)."""
  import ml_collections
  tok = jax.random.randint(jax.random.key(1), (2, 32), 0, 17)
  base = get_config("tiny")
  base.attention = attention
  params = M.LASADGen(base, rngs=nnx.Rngs(0)).params()

  def grads(**kw):
    c = ml_collections.ConfigDict(base.to_dict())
    c.update(kw)
    c = ml_collections.FrozenConfigDict(c)

    def loss(p):
      logits = M.forward(c, p, tok, jnp.array([0, 1]), width=8)
      return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(
          logits, tok[..., None], -1)[..., 0])
    return jax.jit(jax.grad(loss))(params)

  ref = grads(remat=False)
  # config.scan_layers=False: the layers unrolled (with and without remat), same numbers
  for kw in [dict(remat=True, remat_policy=p, scan_layers=scan)
             for p in ("full", "dots", "dots_attn", "dots_attn_acts")
             for scan in (True, False)] + [dict(remat=False, scan_layers=False)]:
    got = grads(**kw)
    for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(got)):
      np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-7, err_msg=kw)
  with pytest.raises(ValueError, match="remat_policy"):
    grads(remat=True, remat_policy="some")


def test_remat_dots_attn_acts_keeps_the_named_activations(capsys):
  """remat_policy "dots_attn_acts" saves, per layer, what "dots_attn" saves plus the values named
  attn_in, mlp_in and mlp_act (the matmuls' bf16 input activations)."""
  import ml_collections
  base = get_config("tiny")
  params = M.LASADGen(base, rngs=nnx.Rngs(0)).params()
  tok = jax.random.randint(jax.random.key(1), (2, 16), 0, 17)
  saved = {}
  for policy in ("dots_attn", "dots_attn_acts"):
    c = ml_collections.ConfigDict(base.to_dict())
    c.update(dict(remat=True, remat_policy=policy, scan_layers=False))
    c = ml_collections.FrozenConfigDict(c)
    jax.ad_checkpoint.print_saved_residuals(
        lambda p, c=c: jnp.sum(M.forward(c, p, tok, jnp.array([0, 1]), width=8)), params)
    saved[policy] = capsys.readouterr().out
  layers = base.num_layers
  for name in ("attn_out", "attn_in", "mlp_in", "mlp_act"):
    want = (layers, layers) if name == "attn_out" else (0, layers)
    got = tuple(saved[p].count(f"named '{name}'") for p in ("dots_attn", "dots_attn_acts"))
    assert got == want, (name, got)


def test_kernel_sub_config_reaches_the_kernel(monkeypatch):
  """config.kernel_sub 16 and 32 (Pallas sub-chunks; 32 is the default), config.kernel_forward
  two_pass, config.kernel_dots and config.kernel_cumsum reach the kernel's block sizes (the first
  two give the same logits); bad values are refused."""
  import ml_collections
  seen = []

  def spy(*a, **kw):
    bs = kw.get("block_sizes")
    seen.append(32 if bs is None else bs.sub)   # None: the kernel's defaults (sub 32)
    return hgrn2_attention(*a, **kw)
  monkeypatch.setattr(M, "hgrn2_attention", spy)
  tok = jax.random.randint(jax.random.key(2), (1, 40), 0, 17)
  c = get_config("tiny")
  c.impl = "pallas"
  params = M.LASADGen(c, rngs=nnx.Rngs(0)).params()
  out = {}
  for sub in (16, 32):
    c.kernel_sub = sub
    seen.clear()
    out[sub] = M.forward(ml_collections.FrozenConfigDict(c), params, tok, jnp.array([3]), width=8)
    assert seen and set(seen) == {sub}, seen
  np.testing.assert_allclose(np.asarray(out[32]), np.asarray(out[16]), rtol=1e-4, atol=1e-5)
  c.kernel_sub = 32
  seen_fused = []
  monkeypatch.setattr(M, "hgrn2_attention", lambda *a, **kw: (
      seen_fused.append(kw["block_sizes"].fused_forward), hgrn2_attention(*a, **kw))[1])
  c.kernel_forward = "two_pass"   # the default is the one-pass forward
  one = M.forward(ml_collections.FrozenConfigDict(c), params, tok, jnp.array([3]), width=8)
  assert seen_fused and set(seen_fused) == {False}, seen_fused
  np.testing.assert_allclose(np.asarray(one), np.asarray(out[32]), rtol=1e-4, atol=1e-5)
  c.kernel_forward = "fused"
  with pytest.raises(ValueError, match="kernel_forward"):
    M.forward(ml_collections.FrozenConfigDict(c), params, tok, jnp.array([3]), width=8)
  c.kernel_forward = "auto"

  def reaches(key, attr, cases, default, bad=None):
    """config.<key> = each value gives BlockSizes.<attr> = want in every call; ``bad`` (if any) is
    refused."""
    seen = []
    monkeypatch.setattr(M, "hgrn2_attention", lambda *a, **kw: (
        seen.append(getattr(kw["block_sizes"], attr) if "block_sizes" in kw else default),
        hgrn2_attention(*a, **kw))[1])
    for val, want in cases:
      c[key] = val
      seen.clear()
      M.forward(ml_collections.FrozenConfigDict(c), params, tok, jnp.array([3]), width=8)
      assert seen and set(seen) == {want}, (key, val, seen)
    if bad is not None:
      c[key] = bad
      with pytest.raises(ValueError, match=key):
        M.forward(ml_collections.FrozenConfigDict(c), params, tok, jnp.array([3]), width=8)
    c[key] = cases[0][0]

  reaches("kernel_dots", "split_dots", (("split", True), ("bf16", False)), True, "tf32")
  reaches("kernel_cumsum", "cumsum", (("auto", "auto"), ("scan", "scan"), ("dot", "dot")), "auto",
          "tree")
  reaches("kernel_chunk", "chunk", ((64, 64), (32, 32), (128, 128)), 64, 48)
  # (a bool: nothing to refuse; ends on the first value, False, as the rest below expects)
  reaches("kernel_save_states", "save_states", ((False, False), (True, True)), False)
  reaches("kernel_backward", "fused_backward",
          (("auto", None), ("fused", True), ("unfused", False)), None, "one")
  for key in ("kernel_bwd_prefetch_qdq", "kernel_bwd_dq_raw", "kernel_bwd_norm"):
    field = key.replace("kernel_", "", 1)
    dflt = getattr(BlockSizes, field)
    reaches(key, field, ((dflt, dflt), (not dflt, not dflt)), dflt)   # (bools, as above)
  dflt = BlockSizes.bwd_sub   # None: BlockSizes' default
  reaches("kernel_bwd_sub", "bwd_sub", ((None, dflt), (16, 16), (32, 32)), dflt, 24)
  # warps and register caps: the block sizes config.<key> makes (M._kernel_kw, which the keys
  # above show reaching every call; compiling the model once more per value would only add
  # executables to this long test process)
  for key, field, val, bad in (("kernel_fwd_warps", "fused_num_warps", 8, 3),
                               ("kernel_fwd_maxnreg", "fused_maxnreg", 128, 16),
                               ("kernel_bwd_warps", "grads_num_warps", 8, 6),
                               ("kernel_bwd_maxnreg", "bwd_maxnreg", 168, 256)):
    c[key] = None
    assert M._kernel_kw(c) == {}, key
    c[key] = val
    assert getattr(M._kernel_kw(c)["block_sizes"], field) == val, key
    c[key] = bad
    with pytest.raises(ValueError, match=key):
      M._kernel_kw(c)
    c[key] = None
  # config.kernel_gate: the gates inside the kernels or in XLA, the same logits
  gates, logits = [], {}
  monkeypatch.setattr(M, "hgrn2_attention", lambda *a, **kw: (
      gates.append(kw["gate"]), hgrn2_attention(*a, **kw))[1])
  for gate in ("kernel", "xla"):
    c.kernel_gate = gate
    logits[gate] = M.forward(ml_collections.FrozenConfigDict(c), params, tok, jnp.array([3]),
                             width=8)
  assert gates == ["kernel", "xla"], gates
  np.testing.assert_allclose(np.asarray(logits["kernel"]), np.asarray(logits["xla"]),
                             rtol=1e-4, atol=1e-5)
  c.kernel_gate = "inside"
  with pytest.raises(ValueError, match="kernel_gate"):
    M.forward(ml_collections.FrozenConfigDict(c), params, tok, jnp.array([3]), width=8)
  c.kernel_gate = "auto"
  c.kernel_sub = 24
  with pytest.raises(ValueError, match="kernel_sub"):
    M.forward(ml_collections.FrozenConfigDict(c), params, tok, jnp.array([3]), width=8)
