"""PyTorch parity with flash-linear-attention 0.6.0: frozen fixtures (always) and live (if fla)."""

import os

import numpy as np
import pytest

import parity

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "fla_gla.npz")
IMPLS = ["reference", "chunk", "pallas"]


def _cases():
  data = np.load(FIXTURE)
  n = int(data["num_cases"])
  cases = []
  for i in range(n):
    keys = [k for k in data.files if k.startswith(f"c{i}_")]
    cases.append({k[len(f"c{i}_"):]: data[k] for k in keys})
  return data, cases


def test_fixture_present_and_from_fla():
  data, cases = _cases()
  assert str(data["fla_version"]).startswith("0.6"), "fixtures must come from fla 0.6"
  assert len(cases) >= 5


@pytest.mark.parametrize("impl", IMPLS)
def test_against_fla_naive_fixture(impl):
  _, cases = _cases()
  for i, x in enumerate(cases):
    theirs = {n[len("naive_"):]: x[n] for n in x if n.startswith("naive_")}
    errs = parity.compare(x, parity.ours(x, impl), theirs)
    worst = max(errs.values())
    assert worst < parity.TOL_NAIVE[impl], f"case {i}: {errs}"


@pytest.mark.parametrize("impl", IMPLS)
def test_against_fla_chunk_fixture(impl):
  data, cases = _cases()
  if not bool(data["has_chunk"]):
    pytest.skip("fixture was made without a GPU: no chunk_gla outputs")
  checked = 0
  for i, x in enumerate(cases):
    if not bool(x["chunk_ran"]):
      continue  # only the K = V = 64 cases go through chunk_gla
    if not bool(x["chunk_finite"]):
      continue  # fla's chunk_gla gave NaN/inf on this case (see the fixture script's log)
    theirs = {n[len("chunk_"):]: x[n] for n in x
              if n.startswith("chunk_") and n not in ("chunk_finite", "chunk_ran")}
    errs = parity.compare(x, parity.ours(x, impl), theirs)
    assert max(errs.values()) < parity.TOL_CHUNK_GLA, f"case {i}: {errs}"
    checked += 1
  assert checked >= 2


def test_live_against_fla():
  """Same comparison run directly against fla when torch and fla import (the GPU machine)."""
  torch = pytest.importorskip("torch")
  pytest.importorskip("fla.ops.gla.naive")
  import sys
  sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "scripts"))
  import make_parity_fixtures as mk
  dev = "cuda" if torch.cuda.is_available() else "cpu"
  from fla.ops.gla.naive import naive_recurrent_gla

  def naive(q, k, v, g, h0):
    return naive_recurrent_gla(q, k, v, g, initial_state=h0, output_final_state=True)

  case = (2, 90, 2, 16, 8, 1.0, [8, 12], 1, [-0.3, float("-inf")], True)
  x = mk.make_case(77, case)
  theirs = mk.run_fla(naive, x, dev)
  for impl in IMPLS:
    errs = parity.compare(x, parity.ours(x, impl), theirs)
    print(f"live fla naive vs {impl}: {errs}")
    assert max(errs.values()) < parity.TOL_NAIVE[impl]
  if torch.cuda.is_available():
    from fla.ops.gla import chunk_gla
    x = mk.make_case(78, (2, 300, 4, 64, 64, 1.0, 16, 1, -0.5, True))  # bf16-rounded inputs
    theirs = mk.run_fla(lambda q, k, v, g, h0: chunk_gla(q, k, v, g, initial_state=h0,
                                                         output_final_state=True), x, dev,
                        torch.bfloat16)
    for impl in IMPLS:
      errs = parity.compare(x, parity.ours(x, impl), theirs)
      print(f"live fla chunk_gla vs {impl}: {errs}")
      assert max(errs.values()) < parity.TOL_CHUNK_GLA
