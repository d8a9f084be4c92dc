"""Run lasad_attention on an fla parity case (dict of arrays) and return fla-comparable results."""

import jax
import jax.numpy as jnp
import numpy as np

from lasad_jax.ops import lasad_attention

import oracle

# What each implementation must reach against fla's float32 naive recurrence (relative RMS).
# chunk: within-chunk cumulative sums of normaliser-0.1 gates lose ~1e-5 in the exponent.
TOL_NAIVE = {"reference": 1e-5, "chunk": 1e-4, "pallas": 1e-4}
# fla's chunk_gla runs the K = V = 64 cases in bf16 (inputs, outputs, gradients): ~2e-3 from exact.
TOL_CHUNK_GLA = 1e-2


def _width(x):
  """The case's width, None for no mask (stored as -1)."""
  return None if np.all(np.asarray(x["width"]) < 0) else np.asarray(x["width"])


def ours(x, impl):
  width = _width(x)
  width = None if width is None else jnp.asarray(width)
  has_h0 = bool(x["has_h0"])

  def f(q, k, v, g, h0):
    return lasad_attention(q, k, v, g, width=width, prefix=jnp.asarray(x["prefix"]),
                           boundary=jnp.asarray(x["boundary"]), impl=impl,
                           initial_state=h0 if has_h0 else None, return_final_state=True)

  (o, ht), vjp = jax.vjp(f, *(jnp.asarray(x[n]) for n in ("q", "k", "v", "g", "h0")))
  dq, dk, dv, dg, dh0 = vjp((jnp.asarray(x["do"]), jnp.asarray(x["dht"])))
  return dict(o=o, ht=ht, dq=dq, dk=dk, dv=dv, dg=dg, dh0=dh0)


def compare(x, mine, theirs):
  """Relative RMS per quantity. fla's dg is w.r.t. g~: off row starts it equals ours, on row
  starts our dg is 0 (there g~ is the boundary, not g). Row starts come from width / prefix, not
  from comparing g~ with g: a bf16-rounded g can equal the boundary exactly (case 7 of the fixture
  has g = -0.5 at 17 places, some of them on row starts)."""
  b, t = x["g"].shape[:2]
  off = ~oracle.row_starts(t, _width(x), x["prefix"], b)[:, :, None, None]
  errs = {}
  for n in ("o", "ht", "dq", "dk", "dv", "dg", "dh0"):
    if n == "dh0" and not bool(x["has_h0"]):
      continue
    ref = np.where(off, theirs["dg_masked"], 0.0) if n == "dg" else theirs[n]
    errs[n] = oracle.rel_rms(mine[n], ref)
    if n == "dg":
      assert np.all(np.where(off, 0.0, np.asarray(mine[n])) == 0.0), \
          "dg must be 0 at masked positions"
  return errs
