"""CPU demo of the LASAD operator: every implementation against a float64 recurrence.

    python -m lasad_jax.demo

Prints one row per (implementation, row-mask mode): relative RMS error of the output, the final
state and the gradient of q against an exact float64 NumPy recurrence, and the wall time.
"""

import time

import jax
import jax.numpy as jnp
import numpy as np

from lasad_jax.ops import lasad_attention


def _oracle(q, k, v, g, width, prefix, boundary):
  b, t, h, dk = q.shape
  q, k, v, g = (np.asarray(x, np.float64) for x in (q, k, v, g))
  rel = np.arange(t) - prefix
  starts = (rel >= width) & (rel % width == 0) if width else np.zeros(t, bool)
  g = np.where(starts[None, :, None, None], boundary, g)
  s = np.zeros((b, h, dk, v.shape[-1]))
  o = np.zeros(v.shape)
  for i in range(t):
    s = np.exp(g[:, i])[..., None] * s + k[:, i, ..., None] * v[:, i, :, None, :]
    o[:, i] = np.einsum("bhk,bhkv->bhv", q[:, i], s) * dk ** -0.5
  return o, s


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.sqrt(np.mean((a - b) ** 2) / np.mean(b ** 2))


def main():
  b, t, h, d, width, prefix = 2, 257, 4, 32, 16, 1
  ks = jax.random.split(jax.random.key(0), 4)
  q, k, v = (jax.random.normal(kk, (b, t, h, d)) for kk in ks[:3])
  g = jax.nn.log_sigmoid(jax.random.normal(ks[3], (b, t, h, d)) + 3.0)
  print(f"LASAD operator on {jax.default_backend()}: B={b} T={t} H={h} K=V={d}, "
        f"16x16 image + 1 class token (width {width}, prefix {prefix})")
  print(f"{'impl':<10} {'mask':<6} {'rel err o':>10} {'rel err S':>10} {'grad q vs ref':>14} "
        f"{'ms':>8}")
  worst = 0.0
  for mode, boundary in (("none", 0.0), ("carry", 0.0), ("reset", -np.inf), ("-1.0", -1.0)):
    w = None if mode == "none" else width
    o_ref, s_ref = _oracle(q, k, v, g, w, prefix, boundary)
    grads = {}
    for impl in ("reference", "chunk"):
      fn = lambda q: lasad_attention(q, k, v, g, width=w, prefix=prefix, boundary=boundary,
                                     impl=impl, return_final_state=True)
      (o, s) = fn(q)
      t0 = time.perf_counter()
      jax.block_until_ready(fn(q))
      ms = (time.perf_counter() - t0) * 1e3
      grads[impl] = jax.grad(lambda q: jnp.sum(fn(q)[0] ** 2))(q)
      gerr = _rel(grads[impl], grads["reference"])
      worst = max(worst, _rel(o, o_ref), _rel(s, s_ref), gerr)
      print(f"{impl:<10} {mode:<6} {_rel(o, o_ref):>10.2e} {_rel(s, s_ref):>10.2e} "
            f"{gerr:>14.2e} {ms:>8.1f}")
  if worst > 1e-4:
    raise SystemExit(f"FAIL: worst relative error {worst:.2e} exceeds 1e-4")
  print(f"worst relative error {worst:.2e}: the implementations agree to float32 rounding.")


if __name__ == "__main__":
  main()
