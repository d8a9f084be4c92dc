"""Training slice: digits source, optimizer, train step on real data, iterator resume."""

import jax
import ml_collections
import numpy as np
import pytest

from configs.digits import get_config
from lasad_jax import training as T
from lasad_jax.data.digits import DigitsSource, make_loader


def test_digits_source():
  tr, te = DigitsSource("train"), DigitsSource("test")
  assert len(tr) == 1500 and len(te) == 297
  x = tr[0]
  assert x["tokens"].shape == (64,) and x["tokens"].dtype == np.int32
  assert 0 <= x["tokens"].min() and x["tokens"].max() <= 16 and 0 <= x["label"] <= 9
  # The split is fixed: no test image appears in train.
  train = {tuple(tr[i]["tokens"]) for i in range(len(tr))}
  assert sum(tuple(te[i]["tokens"]) in train for i in range(len(te))) < 10  # digits has duplicates
  with pytest.raises(ValueError, match="split"):
    DigitsSource("val")


def test_loader_is_deterministic_and_resumes_exactly():
  src = DigitsSource("train")
  a = iter(make_loader(src, 32, seed=3))
  first = [next(a)["label"] for _ in range(5)]
  state = a.get_state()
  rest = [next(a)["label"] for _ in range(3)]
  b = iter(make_loader(src, 32, seed=3))
  np.testing.assert_array_equal(next(b)["label"], first[0])
  c = iter(make_loader(src, 32, seed=3))
  c.set_state(state)
  for want in rest:
    np.testing.assert_array_equal(next(c)["label"], want)
  with pytest.raises(ValueError, match="batch_size"):
    make_loader(src, 0, seed=0)


def test_weight_decay_only_on_matrices():
  cfg = ml_collections.FrozenConfigDict(get_config())
  st = T.create_train_state(cfg)
  mask = T.decay_mask(st.params)
  assert mask["blocks"]["wq"] and mask["blocks"]["w2"] and mask["tok_emb"] and mask["head"]
  # Stacked per-layer vectors ([L, d], [L, H]) are not matrices.
  for k in ("attn_norm", "ffn_norm", "head_norm", "lower_bound", "boundary"):
    assert not mask["blocks"][k], k
  assert not mask["norm"]


def test_training_lowers_loss_on_digits():
  cfg = get_config("reset")
  cfg.num_steps = 25
  cfg = ml_collections.FrozenConfigDict(cfg)
  st = T.create_train_state(cfg)
  it = iter(make_loader(DigitsSource("train"), cfg.batch_size, seed=0))
  test = next(iter(make_loader(DigitsSource("test"), 256, seed=0, shuffle=False)))
  before = float(T.eval_nll(cfg, st.params, test))
  losses = []
  for _ in range(25):
    st, m = T.train_step(cfg, st, next(it))
    losses.append(float(m["loss"]))
  after = float(T.eval_nll(cfg, st.params, test))
  assert np.isfinite(losses).all() and int(st.step) == 25
  assert after < before - 0.3, (before, after)   # ~2.87 -> ~2.1 nats/token


def test_train_step_materialises_gradients_before_the_optimizer():
  """With unrolled layers the stacked weight gradients are sums of padded per-layer slices; the
  step puts them behind an optimization barrier so XLA cannot fuse that chain into the
  global-norm reductions (on the H100 those ran at ~0.05 TB/s, BENCHMARKS.md session 11)."""
  cfg = get_config()
  cfg.scan_layers = False
  cfg = ml_collections.FrozenConfigDict(cfg)
  st = T.create_train_state(cfg)
  batch = next(iter(make_loader(DigitsSource("train"), cfg.batch_size, seed=0)))
  text = T.train_step.lower(cfg, st, batch).as_text()
  assert "optimization_barrier" in text
