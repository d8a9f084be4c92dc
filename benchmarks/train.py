"""Training throughput: step time, tokens/s, MFU and peak memory for LASADGen (and the softmax
baseline) on synthetic ImageNet-shaped code batches (16x16 tokens, 1000 classes).

    python benchmarks/train.py --variants B,L [--attention lasad,softmax] [--batches 512,256,128]
        [--mesh data|fsdp] [--remat [--remat-policy full|dots|dots_attn|dots_attn_acts]] [--kernel-sub 16] [--kernel-forward one_pass]
        [--kernel-dots bf16] [--kernel-cumsum scan|dot] [--kernel-gate kernel|xla] [--no-scan]
        [--fused-norm auto|pallas|xla] [--norm-copies 0|1] [--kernel-head-norm 0|1]
        [--kernel-save-states 0|1] [--kernel-chunk 32|64|128] [--kernel-backward auto|fused|unfused]
        [--kernel-bwd-qdq 0|1] [--kernel-bwd-dq-raw 0|1] [--kernel-bwd-norm 0|1]
        [--kernel-bwd-sub 16|32] [--kernel-fwd-warps 4|8] [--kernel-fwd-maxnreg N]
        [--kernel-bwd-warps 4|8] [--kernel-bwd-maxnreg N]
        [--profile N]
        [--out benchmarks/results/train_h100.json]

For each variant and attention, tries the global batch sizes in ``--batches`` from the largest and
reports the first that compiles and runs (the largest that fits), using the same sharded step as
``train.py`` over all local devices (``--mesh data``: data parallel; ``fsdp``: parameters and
optimizer state split over every device). Step time: the median over ``--iters`` steps after
warm-up, each waited for (``step_ms``, ``tokens_per_s``, ``mfu``: the numbers of sessions 1-21),
and the mean over ``--iters`` more dispatched back to back and waited for once
(``step_ms_pipelined``, ``mfu_pipelined``: how ``train.py``'s loop runs, its host dispatch
hidden behind the device's previous step).
MFU = tokens/s x model FLOPs per token (``training.flops_per_token``) / (devices x bf16 peak).
"""

import argparse
import datetime
import json
import os
import statistics
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from configs.imagenet import get_config  # noqa: E402
from kernels.lasad.pallas import CUMSUM_MODES  # noqa: E402
from kernels.norm.add_rms import MODES as FUSED_NORMS  # noqa: E402
from lasad_jax import model as M  # noqa: E402
from lasad_jax import sharding as S  # noqa: E402
from lasad_jax import training as T  # noqa: E402
from lasad_jax.ops import GATES  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchmarks_common import profile_call  # noqa: E402


KERNEL_OPTIONS = {
    "--kernel-bwd-qdq": ("kernel_bwd_prefetch_qdq", bool, (0, 1),
                         "the fused backward also prefetches its q dq rows"),
    "--kernel-bwd-dq-raw": ("kernel_bwd_dq_raw", bool, (0, 1),
                            "the fused backward applies silu' to dq"),
    "--kernel-bwd-norm": ("kernel_bwd_norm", bool, (0, 1),
                          "the fused backward takes the gradient through the output norm"),
    "--kernel-bwd-sub": ("kernel_bwd_sub", int, (16, 32),
                         "rows per step of the fused backward (BlockSizes' default: 16)"),
    "--kernel-fwd-warps": ("kernel_fwd_warps", int, (2, 4, 8), "warps of the one-pass forward"),
    "--kernel-fwd-maxnreg": ("kernel_fwd_maxnreg", int, None,
                             "registers per thread of the one-pass forward (cap)"),
    "--kernel-bwd-warps": ("kernel_bwd_warps", int, (2, 4, 8), "warps of the fused backward"),
    "--kernel-bwd-maxnreg": ("kernel_bwd_maxnreg", int, None,
                             "registers per thread of the fused backward (cap)"),
}


def run_one(variant, attention, batch, mesh_kind, iters, remat, policy="full", kernel_sub=32,
            profile=0, forward="auto", dots="split", scan=True, cumsum="auto", gate="auto",
            fused_norm="auto", norm_copies=True, head_norm=True, save_states=False, chunk=64,
            backward="auto", kernel_opts=None):
  n = jax.device_count()
  cfg = get_config(variant)
  cfg.attention = attention
  cfg.batch_size = batch
  cfg.remat = remat
  cfg.remat_policy = policy
  cfg.kernel_sub = kernel_sub
  cfg.kernel_chunk = chunk
  cfg.kernel_forward = forward
  cfg.kernel_dots = dots
  cfg.kernel_cumsum = cumsum
  cfg.kernel_gate = gate
  cfg.fused_norm = fused_norm
  cfg.norm_copies = norm_copies
  cfg.kernel_head_norm = head_norm
  cfg.kernel_save_states = save_states
  cfg.kernel_backward = backward
  for key, val in (kernel_opts or {}).items():   # config keys of KERNEL_OPTIONS
    cfg[key] = val
  cfg.scan_layers = scan
  cfg.warmup_steps = 10
  cfg.mesh.data, cfg.mesh.fsdp = (n, 1) if mesh_kind == "data" else (1, n)
  cfg = ml_collections.FrozenConfigDict(cfg)
  mesh = S.make_mesh(cfg.mesh.data, cfg.mesh.fsdp)
  _, shardings = T.state_shardings(cfg, mesh)
  import functools
  state = jax.jit(functools.partial(T.create_train_state, cfg), out_shardings=shardings)()
  step = T.make_train_step(cfg, mesh, shardings)
  rng = np.random.default_rng(0)
  n_tok = int(np.prod(cfg.grid))
  batches = [S.global_batch(mesh, {
      "tokens": rng.integers(0, cfg.vocab_size, (batch, n_tok), dtype=np.int32),
      "label": rng.integers(0, cfg.num_classes, batch, dtype=np.int32)}) for _ in range(2)]
  t0 = time.perf_counter()
  state, m = step(state, batches[0])
  jax.block_until_ready(m)
  compile_s = time.perf_counter() - t0
  for i in range(3):
    state, m = step(state, batches[i % 2])
  jax.block_until_ready(m)
  ts = []
  for i in range(iters):
    t0 = time.perf_counter()
    state, m = step(state, batches[i % 2])
    jax.block_until_ready(m)
    ts.append(time.perf_counter() - t0)
  # Pipelined: the same steps dispatched back to back and waited for once, as train.py's loop runs
  # them (it fetches metrics only every log_every steps); the host's dispatch of step i+1 overlaps
  # step i on the device, which the per-step waits above leave in each step.
  t0 = time.perf_counter()
  for i in range(iters):
    state, m = step(state, batches[i % 2])
  jax.block_until_ready((state, m))
  sec_pipe = (time.perf_counter() - t0) / iters
  loss = float(m["loss"])
  sec = statistics.median(ts)
  kernels = None
  if profile:   # one traced step: device time per kernel, summed over GPUs (collectives show)
    stats, span = profile_call(lambda: step(state, batches[0])[1])
    if span:
      tot = sorted(stats.items(), key=lambda kv: -kv[1][1])
      kernels = {k: dict(calls=c, ms=round(t / 1e6, 3)) for k, (c, t) in tot[:profile]}
      nccl = sum(t for k, (c, t) in stats.items() if "nccl" in k.lower()) / 1e6
      print(f"  traced step: {(span[1] - span[0]) / 1e6:.1f} ms wall, {span[2] / 1e6:.1f} ms busy "
            f"(union over GPUs); nccl kernels {nccl:.1f} ms summed over GPUs")
      for k, v in kernels.items():
        print(f"    {k[:70]:<70} {v['calls']:6d} {v['ms']:9.2f} ms")
  tps = batch * n_tok / sec
  peak = T.peak_flops(jax.devices()[0])

  def mfu(step_s):
    return round(batch * n_tok / step_s * T.flops_per_token(cfg) / (peak * n), 4) if peak else None
  mem = [d.memory_stats() or {} for d in jax.local_devices()]
  return dict(variant=variant, attention=attention, batch=batch, mesh=mesh_kind, devices=n,
              remat=policy if remat else False, kernel_sub=kernel_sub, kernel_chunk=chunk,
              kernel_forward=forward, kernel_dots=dots, kernel_cumsum=cumsum, kernel_gate=gate,
              fused_norm=fused_norm, norm_copies=norm_copies,
              kernel_head_norm=head_norm, kernel_save_states=save_states,
              kernel_backward=backward, **(kernel_opts or {}), scan_layers=scan,
              params_m=round(M.count_params(cfg) / 1e6, 2),
              step_ms=round(sec * 1e3, 2), tokens_per_s=round(tps),
              images_per_s=round(batch / sec, 1),
              mfu=mfu(sec), step_ms_pipelined=round(sec_pipe * 1e3, 2),
              mfu_pipelined=mfu(sec_pipe),
              peak_gib=round(max(x.get("peak_bytes_in_use", 0) for x in mem) / 2 ** 30, 2),
              compile_s=round(compile_s, 1), loss=round(loss, 4), kernels=kernels)


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--variants", default="B,L")
  ap.add_argument("--attention", default="lasad")
  ap.add_argument("--batches", default="512,256,128,64")
  ap.add_argument("--mesh", default="data", choices=("data", "fsdp"))
  ap.add_argument("--iters", type=int, default=10)
  ap.add_argument("--remat", action="store_true")
  ap.add_argument("--remat-policy", default="full", help="full | dots | dots_attn | dots_attn_acts (with --remat)")
  ap.add_argument("--kernel-sub", type=int, default=32, help="Pallas kernel sub-chunk: 16 | 32")
  ap.add_argument("--kernel-chunk", type=int, default=64, choices=(32, 64, 128),
                  help="Pallas kernel chunk (config.kernel_chunk)")
  ap.add_argument("--kernel-forward", default="auto", choices=("auto", "one_pass", "two_pass"),
                  help="Pallas forward kernels (config.kernel_forward)")
  ap.add_argument("--kernel-dots", default="split", choices=("split", "bf16"),
                  help="Pallas float32-operand dots (config.kernel_dots)")
  ap.add_argument("--kernel-cumsum", default="auto", choices=CUMSUM_MODES,
                  help="Pallas row cumulative sums (config.kernel_cumsum)")
  ap.add_argument("--kernel-gate", default="auto", choices=GATES,
                  help="where the HGRN2 gates run (config.kernel_gate)")
  ap.add_argument("--fused-norm", default="auto", choices=FUSED_NORMS,
                  help="residual add + RMSNorm op (config.fused_norm)")
  ap.add_argument("--norm-copies", type=int, default=1, choices=(0, 1),
                  help="config.norm_copies: normed h once per consumer matmul (1, default) or once")
  ap.add_argument("--kernel-head-norm", type=int, default=1, choices=(0, 1),
                  help="config.kernel_head_norm: attention output normed in the forward kernel (1)")
  ap.add_argument("--kernel-save-states", type=int, default=0, choices=(0, 1),
                  help="config.kernel_save_states: the forward kernel writes the backward's "
                  "states (1; default 0)")
  ap.add_argument("--kernel-backward", default="auto", choices=tuple(M.KERNEL_BACKWARDS),
                  help="config.kernel_backward: the Pallas backward as one kernel (fused) or "
                  "three (unfused); auto: fused from B*H >= 512")
  # the fused backward's options: flag -> (config key, type, choices, what it does); each
  # defaults to BlockSizes' (the flag absent: the key is left out of the config's overrides)
  for flag, (key, typ, choices, what) in KERNEL_OPTIONS.items():
    ap.add_argument(flag, type=int, default=None, choices=choices,
                    help=f"config.{key}: {what}; absent: BlockSizes' default")
  ap.add_argument("--no-scan", action="store_true",
                  help="unrolled layers (config.scan_layers=False) instead of one lax.scan")
  ap.add_argument("--profile", type=int, default=0,
                  help="trace one step after timing and print its N most expensive kernels")
  ap.add_argument("--out", default=None)
  args = ap.parse_args()
  given = {key: (typ, getattr(args, flag[2:].replace("-", "_")))
           for flag, (key, typ, _, _) in KERNEL_OPTIONS.items()}
  kernel_opts = {key: typ(val) for key, (typ, val) in given.items() if val is not None}
  dev = jax.devices()[0]
  print(f"{jax.device_count()} x {getattr(dev, 'device_kind', dev.platform)}, jax {jax.__version__}"
        f", mesh {args.mesh}, remat {args.remat_policy if args.remat else False}")
  hdr = (f"{'model':<6} {'attn':<8} {'batch':>5} {'step ms':>8} {'tok/s':>10} {'img/s':>7} "
         f"{'MFU':>6} {'pipelined ms':>12} {'MFU':>6} {'peak GiB':>8} {'compile s':>9}")
  print(hdr)
  records = []
  for variant in args.variants.split(","):
    for attention in args.attention.split(","):
      for batch in [int(b) for b in args.batches.split(",")]:
        try:
          r = run_one(variant, attention, batch, args.mesh, args.iters, args.remat,
                      args.remat_policy, args.kernel_sub, args.profile,
                      args.kernel_forward, args.kernel_dots, not args.no_scan,
                      args.kernel_cumsum, args.kernel_gate, args.fused_norm,
                      bool(args.norm_copies), bool(args.kernel_head_norm),
                      bool(args.kernel_save_states), args.kernel_chunk, args.kernel_backward,
                      kernel_opts)
        except Exception as e:  # noqa: BLE001  (out of memory: try the next smaller batch)
          msg = str(e).splitlines()[0][:120]
          if "RESOURCE_EXHAUSTED" in str(e) or "out of memory" in str(e).lower():
            print(f"{variant:<6} {attention:<8} {batch:>5} does not fit: {msg}")
            continue
          raise
        records.append(r)
        mfu, mfu_p = (f"{100 * r[k]:.1f}%" if r[k] is not None else "-"
                      for k in ("mfu", "mfu_pipelined"))
        print(f"{variant:<6} {attention:<8} {batch:>5} {r['step_ms']:>8.1f} "
              f"{r['tokens_per_s']:>10,} {r['images_per_s']:>7.1f} {mfu:>6} "
              f"{r['step_ms_pipelined']:>12.1f} {mfu_p:>6} "
              f"{r['peak_gib']:>8.2f} {r['compile_s']:>9.1f}", flush=True)
        break
  if args.out:
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
      json.dump({"date": datetime.date.today().isoformat(),
                 "device": getattr(dev, "device_kind", dev.platform),
                 "devices": jax.device_count(), "jax": jax.__version__, "dtype": "bfloat16",
                 "command": "python benchmarks/train.py " + " ".join(
                     f"--{k}={v}" for k, v in vars(args).items() if k != "out"),
                 "xla_flags": os.environ.get("XLA_FLAGS", ""),
                 "records": records}, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
