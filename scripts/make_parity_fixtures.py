"""Freeze flash-linear-attention's GLA outputs and gradients into tests/fixtures/fla_gla.npz.

    python scripts/make_parity_fixtures.py [--out tests/fixtures/fla_gla.npz]

Needs torch and flash-linear-attention 0.6.0 (fla-core). fla has no row mask, so the masked gate g~
is computed here (same rule as kernels/lasad/mask.py, written again in NumPy) and fed to fla as its
gate. Runs `fla.ops.gla.naive.naive_recurrent_gla` (pure PyTorch, float32, scale K**-0.5) on every case
and `fla.ops.gla.chunk_gla` (Triton, bf16 inputs) on the K = V = 64 cases when CUDA is present; forward, final state and torch-autograd
gradients of sum(o*do) + sum(ht*dht) with respect to q, k, v, g~ and h0.
"""

import argparse
import os

import numpy as np
import torch

# (B, T, H, K, V, gate normaliser, width, prefix, boundary, with h0)
CASES = [
    (2, 63, 2, 16, 8, 1.0, None, 0, 0.0, True),
    (2, 100, 2, 16, 16, 1.0, 16, 1, 0.0, False),
    (2, 100, 2, 16, 16, 0.1, 16, 1, float("-inf"), True),
    (2, 129, 3, 16, 8, 10.0, 8, 1, [-0.5, float("-inf"), 0.0], True),
    (3, 77, 2, 16, 16, 1.0, [4, 6, 16], [1, 0, 3], float("-inf"), False),
    (1, 1000, 1, 8, 8, 1.0, 32, 1, -1.0, True),
    # K = V = 64: also run through chunk_gla (fla autotunes per head size, so the Triton cases
    # share one tuning with the benchmark's shapes).
    (1, 100, 2, 64, 64, 1.0, 16, 1, 0.0, True),
    (1, 90, 1, 64, 64, 1.0, 8, 1, -0.5, False),
    (1, 70, 2, 64, 64, 1.0, 8, 1, [float("-inf"), -1.0], True),
]


def row_starts(t, width, prefix, b):
  if width is None:
    return np.zeros((b, t), bool)
  w = np.broadcast_to(np.asarray(width), (b,))[:, None]
  p = np.broadcast_to(np.asarray(prefix), (b,))[:, None]
  rel = np.arange(t)[None] - p
  return (rel >= w) & (rel % w == 0)


def make_case(i, case):
  b, t, h, dk, dv, norm, width, prefix, boundary, h0 = case
  rng = np.random.default_rng(1000 + i)
  f32 = np.float32
  x = dict(
      q=rng.standard_normal((b, t, h, dk)).astype(f32),
      k=rng.standard_normal((b, t, h, dk)).astype(f32),
      v=rng.standard_normal((b, t, h, dv)).astype(f32),
      g=(-np.logaddexp(0, -rng.standard_normal((b, t, h, dk))) / norm).astype(f32),
      h0=(rng.standard_normal((b, h, dk, dv)) if h0 else np.zeros((b, h, dk, dv))).astype(f32),
      has_h0=np.asarray(h0),
      do=rng.standard_normal((b, t, h, dv)).astype(f32),
      dht=rng.standard_normal((b, h, dk, dv)).astype(f32),
      width=np.asarray(-1 if width is None else width, np.int32),  # -1: no mask
      prefix=np.asarray(prefix, np.int32),
      boundary=np.asarray(boundary, f32),
  )
  if dk == dv == 64:
    # chunk_gla runs these in bf16 (its float32 autotuning takes minutes per head size); round
    # the inputs to bf16 so every implementation sees exactly the values fla saw.
    for n in ("q", "k", "v", "g", "do"):
      x[n] = torch.tensor(x[n]).bfloat16().float().numpy()
  starts = row_starts(t, width, prefix, b)
  bnd = np.broadcast_to(x["boundary"], (h,))
  x["g_masked"] = np.where(starts[:, :, None, None], bnd[None, None, :, None], x["g"]).astype(f32)
  return x


def run_fla(fn, x, device, dtype=torch.float32):
  t = {n: torch.tensor(x[n], device=device, dtype=torch.float32 if n == "h0" else dtype,
                       requires_grad=True)
       for n in ("q", "k", "v", "g_masked", "h0")}
  o, ht = fn(t["q"], t["k"], t["v"], t["g_masked"], t["h0"] if x["has_h0"] else None)
  loss = (o.float() * torch.tensor(x["do"], device=device)).sum() + (
      ht.float() * torch.tensor(x["dht"], device=device)).sum()
  loss.backward()
  out = dict(o=o, ht=ht, dq=t["q"].grad, dk=t["k"].grad, dv=t["v"].grad,
             dg_masked=t["g_masked"].grad)
  out["dh0"] = t["h0"].grad if x["has_h0"] else torch.zeros_like(t["h0"])
  return {n: v.detach().float().cpu().numpy() for n, v in out.items()}


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "tests",
                                                "fixtures", "fla_gla.npz"))
  args = ap.parse_args()
  from fla.ops.gla.naive import naive_recurrent_gla
  cuda = torch.cuda.is_available()
  import fla
  arrays = {"fla_version": np.asarray(getattr(fla, "__version__", "unknown")),
            "torch_version": np.asarray(torch.__version__),
            "num_cases": np.asarray(len(CASES)), "has_chunk": np.asarray(cuda)}

  def naive(q, k, v, g, h0):
    return naive_recurrent_gla(q, k, v, g, initial_state=h0, output_final_state=True)

  if cuda:
    from fla.ops.gla import chunk_gla

    def chunk(q, k, v, g, h0):
      return chunk_gla(q, k, v, g, initial_state=h0, output_final_state=True)

  dev = "cuda" if cuda else "cpu"
  for i, case in enumerate(CASES):
    x = make_case(i, case)
    arrays.update({f"c{i}_{n}": a for n, a in x.items()})
    res = run_fla(naive, x, dev)
    arrays.update({f"c{i}_naive_{n}": a for n, a in res.items()})
    msg = f"case {i} {case[:5]} width={case[6]} boundary={case[8]}: naive ok"
    ran = cuda and case[3] == case[4] == 64
    arrays[f"c{i}_chunk_ran"] = np.asarray(ran)
    if ran:
      res = run_fla(chunk, x, dev, torch.bfloat16)
      finite = all(np.isfinite(a).all() for a in res.values())
      arrays[f"c{i}_chunk_finite"] = np.asarray(finite)
      arrays.update({f"c{i}_chunk_{n}": a for n, a in res.items()})
      msg += f", chunk_gla {'ok' if finite else 'NON-FINITE (fla cannot take g~ = -inf)'}"
    print(msg, flush=True)
    # Save after every case: fla's first chunk_gla call autotunes for minutes, and a run cut
    # off there still leaves the cases finished so far (num_cases says how many).
    arrays["num_cases"] = np.asarray(i + 1)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    np.savez_compressed(args.out, **arrays)
  print(f"wrote {args.out} ({os.path.getsize(args.out) / 1e6:.2f} MB)")


if __name__ == "__main__":
  main()
