"""Time each of the Pallas kernel's four launches separately, over a few block-size variants.

    python benchmarks/ops_parts.py [--shape 32,1024,16,64] [--only forward]

First the one-pass forward kernel (the default forward) under several block sizes. Then
where the two-pass forward and the backward time goes (states scan, outputs, state-gradient scan, gradients,
and the fused backward kernel that replaces the three backward launches), so tuning starts from
the largest term. bf16, row mask on (width 16, prefix 1, reset). Then the
whole operator (``lasad_attention(impl="pallas")``, forward and forward+backward, default and
one-pass bf16 dots) and cuDNN causal softmax attention at the same shape: the gap between the
sum of the launches and the whole is the XLA glue around them.
"""

import argparse
import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402

from lasad_jax.ops import lasad_attention  # noqa: E402

from benchmarks_common import fwd_bwd, masked_case, time_jax  # noqa: E402
from kernels.lasad import pallas as P  # noqa: E402

# The per-launch table: states, state gradients and gradients at the backward's chunk
# (BlockSizes.bwd_chunk), the two-pass forward's outputs kernel at the forward's.
VARIANTS = {
    "default": P.BlockSizes(),
    # (16-warp gradient kernel: 15.8 vs 3.9 ms at (256, 256), it spills; session 8)
    "bwd64": P.BlockSizes(bwd_chunk=64),   # the backward on 64-token chunks (before session 8)
    "grads8": P.BlockSizes(grads_num_warps=8),   # the default before session 8's 4
    "onepass": P.BlockSizes(split_dots=False),
    "cumscan": P.BlockSizes(cumsum="scan"),   # the default before session 10
    "cumdot": P.BlockSizes(cumsum="dot"),
}

INTERPRET = jax.default_backend() != "gpu"   # CPU: a smoke run of the code paths
# Session 7 also timed 2 / 8 warps, bv = 32, 1 / 3 stages (all slower); session 8 TF32 diagonal
# dots and no exact fallback (no faster): ops_parts_h100_s{7,8}_*.log in benchmarks/results.
# Session 10: 64-row sub-chunks in the one-pass forward alone (4 or 8 warps, scans or dots) were
# 2.9-3.5x slower (ops_parts_h100_s10_*.log); bv = 32 and/or 2 warps 1.6-2.1x slower; the
# gradient kernel split into a dq kernel and a dk / dv / dg kernel (q dq through HBM in float32)
# 2.52 vs 2.10 ms and 1.37 vs 1.24 ms (ops_parts_h100_s10b_*.log; LASADGen-L's step 411.5 vs
# 402.8 ms, train_h100_L_s10_grads_split.json). None of these options was kept.
FORWARD_VARIANTS = {
    "default": P.BlockSizes(),
    "no prefetch": P.BlockSizes(fused_prefetch=False),
    "sub=16": P.BlockSizes(sub=16),
    "one-pass bf16 dots": P.BlockSizes(split_dots=False),
    "chunk=32": P.BlockSizes(chunk=32),
    "cumsum dot": P.BlockSizes(cumsum="dot"),
    # at most 168 / 128 registers per thread: 3 / 4 programs per SM instead of 2, with spills
    "maxnreg 168": P.BlockSizes(fused_maxnreg=168),
    "maxnreg 128": P.BlockSizes(fused_maxnreg=128),
}


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--shape", default="32,1024,16,64")
  ap.add_argument("--only", default="", choices=("", "forward", "bwd"),
                  help="'forward': only the one-pass forward variants; 'bwd': the default's "
                  "launches and the whole operator with the fused and the unfused backward")
  args = ap.parse_args()
  shape = tuple(int(x) for x in args.shape.split(","))
  _, t, _, _ = shape
  q, k, v, g, do, width, prefix, bnd, h0 = masked_case(shape)
  dht = h0
  print(f"{jax.devices()[0].device_kind}  shape {shape} bf16; ms per launch (median)")
  print("one-pass forward (its sequence split's states pass included), ms")
  for name, bs in ({} if args.only == "bwd" else FORWARD_VARIANTS).items():
    f = jax.jit(lambda q, k, v, g, bs=bs: P._fused_forward(q, k, v, g, width, prefix, bnd, h0,
                                                             seq_len=t, scale=1.0, bs=bs,
                                                             interpret=INTERPRET)[0])
    try:
      print(f"  {name:<24} {time_jax(f, q, k, v, g):8.3f}", flush=True)
    except Exception as e:  # noqa: BLE001
      print(f"  {name:<24} failed: {type(e).__name__}: {str(e)[:200]}")
  if args.only == "forward":
    return
  print(f"{'variant':<10} {'states':>8} {'outputs':>8} {'dstates':>8} {'grads':>8} "
        f"{'fused bwd':>9}")
  for name, bs in VARIANTS.items():
    if args.only == "bwd" and name != "default":
      continue
    kw_f = dict(seq_len=t, bs=bs, interpret=INTERPRET)
    bsb = P._bwd_blocks(bs)
    kw = dict(seq_len=t, bs=bsb, interpret=INTERPRET)
    try:
      st = jax.jit(lambda k, v, g: P._chunk_states_dec(k, v, g, width, prefix, bnd, h0, **kw))
      states, _, dec = st(k, v, g)
      states_f = P._chunk_states(k, v, g, width, prefix, bnd, h0, **kw_f)[0]
      out = jax.jit(lambda q, k, v, g, s: P._outputs(q, k, v, g, width, prefix, bnd, s,
                                                     scale=1.0, **kw_f))
      dst = jax.jit(lambda q, do, g, dec: P._dstates(q, do, g, width, prefix, bnd, dht,
                                                     scale=1.0, dec=dec, **kw))
      dstates, _ = dst(q, do, g, dec)
      gr = jax.jit(lambda q, k, v, g, do, s, ds: P._grads(q, k, v, g, do, width, prefix, bnd, s,
                                                          ds, scale=1.0, **kw))
      ms = [time_jax(st, k, v, g), time_jax(out, q, k, v, g, states_f),
            time_jax(dst, q, do, g, dec), time_jax(gr, q, k, v, g, do, states, dstates)]
      # the whole backward as one kernel (BlockSizes.fused_backward) in place of the three
      fused = jax.jit(lambda q, k, v, g, do: P._fused_grads(q, k, v, g, do, width, prefix, bnd,
                                                             h0, dht, scale=1.0, **kw))
      ms.append(time_jax(fused, q, k, v, g, do))
      print(f"{name:<10} " + " ".join(f"{m:8.3f}" for m in ms), flush=True)
    except Exception as e:  # noqa: BLE001
      print(f"{name:<10} failed: {type(e).__name__}: {str(e)[:200]}")

  print("whole operator, ms fwd / fwd+bwd")
  whole = [("default", P.BlockSizes()), ("fused bwd", P.BlockSizes(fused_backward=True)),
           ("unfused bwd", P.BlockSizes(fused_backward=False)),
           ("fused bwd no prefetch", P.BlockSizes(fused_backward=True, bwd_prefetch=False)),
           ("fused bwd qdq prefetch", P.BlockSizes(fused_backward=True, bwd_prefetch_qdq=True)),
           ("fused bwd 8 warps", P.BlockSizes(fused_backward=True, grads_num_warps=8)),
           ("fused bwd 2 warps", P.BlockSizes(fused_backward=True, grads_num_warps=2)),
           ("fused bwd sub16", P.BlockSizes(fused_backward=True, sub=16)),
           ("fused bwd_sub32", P.BlockSizes(fused_backward=True, bwd_sub=32)),
           ("fused bwd maxnreg 168", P.BlockSizes(fused_backward=True, bwd_maxnreg=168)),
           ("fused maxnreg 168 both", P.BlockSizes(fused_backward=True, fused_maxnreg=168,
                                                   bwd_maxnreg=168))]
  if args.only != "bwd":
    whole += [("no prefetch", P.BlockSizes(fused_prefetch=False)),
              ("bwd64", P.BlockSizes(bwd_chunk=64)), ("cumsum scan", P.BlockSizes(cumsum="scan")),
              ("one-pass", P.BlockSizes(split_dots=False))]
  for name, bs in whole:
    f = lambda q, k, v, g, bs=bs: lasad_attention(q, k, v, g, width=width, prefix=prefix,
                                                  boundary=bnd, scale=1.0, impl="pallas",
                                                  block_sizes=bs)
    fb = jax.jit(lambda q, k, v, g, do, f=f: fwd_bwd(f, (q, k, v, g), do))
    print(f"{name:<10} {time_jax(jax.jit(f), q, k, v, g):8.3f} {time_jax(fb, q, k, v, g, do):8.3f}",
          flush=True)
  try:
    sm = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                                      implementation="cudnn")
    smfb = jax.jit(lambda q, k, v, do: fwd_bwd(sm, (q, k, v), do))
    print(f"{'cudnn':<10} {time_jax(jax.jit(sm), q, k, v):8.3f} {time_jax(smfb, q, k, v, do):8.3f}")
  except Exception as e:  # noqa: BLE001
    print(f"cudnn failed: {type(e).__name__}: {str(e)[:200]}")


if __name__ == "__main__":
  main()
