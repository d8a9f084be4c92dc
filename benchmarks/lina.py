"""LINA on one GPU: (a) the attention module vs cuDNN softmax attention, (b) the whole sampler vs
the same network with softmax attention. Random weights; bf16 matmuls.

    python benchmarks/lina.py [--out benchmarks/results/lina_h100.json] [--skip attn,256,1024,w1536]
        [--linear xla/shift,pallas/shift,pallas/xla]

(a) (B, N, H, D) = (32, 320, 16, 96), (8, 1280, 16, 96), (2, 5120, 16, 96) (width 1536): LINA's
    operator (float32 inside, as LINA; as XLA einsums, ``impl="xla"``, and as the fused Pallas
    kernel, ``impl="pallas"``, whose backward is the XLA one) with bf16 inputs, forward and
    forward+backward, against
    ``jax.nn.dot_product_attention(implementation="cudnn")`` (bidirectional); median ms.
(b) 8 images at 256 px (16 x 16 latents: 61 AR steps x 25 Euler steps, CFG 2.4) for d48w768 (and
    d48w1536), linear vs softmax; and 1024 px (64 x 64 latents, N = 1024 + 4096 = 5120 tokens per
    transformer pass), 1 image, d48w768, linear vs softmax. Seconds per call (median of 3 after a
    warm-up call), compile time of the first call. ``--linear`` lists the linear variants timed
    (``config.attn_impl/config.conv_impl``; default: the config's defaults). JSON after every
    record (a time limit keeps what was measured).
"""

import argparse
import datetime
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks_common import fwd_bwd, time_jax  # noqa: E402
from configs.lina import get_config  # noqa: E402
from lasad_jax.lina import flow as F  # noqa: E402
from lasad_jax.lina import model as M  # noqa: E402
from lasad_jax.lina.attention import lina_attention  # noqa: E402

ATTN_SHAPES = [(32, 320, 16, 96), (8, 1280, 16, 96), (2, 5120, 16, 96)]


def attn_fns(kind):
  if kind.startswith("lina"):
    impl = kind.split()[1]
    f = lambda q, k, v: lina_attention(q, k, v, impl=impl, out_dtype=q.dtype)
  else:
    f = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
  fwd = jax.jit(f)

  fb = jax.jit(lambda q, k, v, do: fwd_bwd(f, (q, k, v), do))
  return fwd, fb


def random_params(cfg, seed=0):
  """Random weights with a non-zero head (LINA zero-inits its AdaLN / output layers)."""
  params = M.init_params(cfg, jax.random.key(seed))
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  return jax.tree.unflatten(tree, [x + 0.02 * jax.random.normal(k, x.shape)
                                   for x, k in zip(leaves, keys)])


def time_sampler(cfg, batch, seed=0, params=None):
  """(first call s, median of 3 further calls s) for ``flow.sample`` on ``batch`` images."""
  if params is None:
    params = random_params(cfg, seed)
  labels = np.arange(batch) % cfg.num_classes
  t0 = time.perf_counter()
  jax.block_until_ready(F.sample(cfg, params, labels, rng=jax.random.key(0)))
  first = time.perf_counter() - t0
  ts = []
  for i in range(3):
    t0 = time.perf_counter()
    jax.block_until_ready(F.sample(cfg, params, labels, rng=jax.random.key(i + 1)))
    ts.append(time.perf_counter() - t0)
  return first, statistics.median(ts)


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--out", default="benchmarks/results/lina_h100.json")
  ap.add_argument("--skip", default="")
  ap.add_argument("--kernel-variants", default="",
                  help="also time kernels/lina/pallas.py lina_forward at block_n/num_warps/"
                       "value_pieces[/defer_sums] settings, e.g. 64/4/1,64/8/3,64/4/1/1 (bf16 out)")
  ap.add_argument("--linear", default="auto/auto",
                  help="comma-separated attn_impl/conv_impl[/conv_dtype] for the linear sampler runs")
  args = ap.parse_args()
  skip = set(args.skip.split(","))
  dev = jax.devices()[0]
  print(f"device {dev.device_kind}, jax {jax.__version__}", flush=True)
  records = []

  def save():
    meta = dict(date=datetime.date.today().isoformat(), device=dev.device_kind, jax=jax.__version__,
                command="python " + " ".join(sys.argv))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
      json.dump(dict(meta=meta, records=records), f, indent=1)

  if "attn" not in skip:
    for shape in ATTN_SHAPES:
      ks = jax.random.split(jax.random.key(0), 4)
      q, k, v, do = (jax.random.normal(kk, shape, jnp.bfloat16) for kk in ks)
      for kind in ("lina xla", "lina split", "lina pallas", "cudnn softmax"):
        try:
          fwd, fb = attn_fns(kind)
          rec = dict(part="attention", impl=kind, shape=list(shape), dtype="bfloat16",
                     fwd_ms=time_jax(fwd, q, k, v), fb_ms=time_jax(fb, q, k, v, do))
        except Exception as e:  # noqa: BLE001
          print(f"  {kind} {shape}: failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
          continue
        records.append(rec)
        print(f"  attention {kind:<14} {shape}: fwd {rec['fwd_ms']:.3f} ms  fwd+bwd "
              f"{rec['fb_ms']:.3f} ms", flush=True)
        save()

  if args.kernel_variants and "attn" not in skip:
    from kernels.lina.pallas import lina_forward
    for shape in ATTN_SHAPES:
      ks = jax.random.split(jax.random.key(0), 3)
      q, k, v = (jax.random.normal(kk, shape, jnp.bfloat16) for kk in ks)
      for spec in args.kernel_variants.split(","):
        bn, nw, vp, *df = (int(x) for x in spec.split("/"))
        if shape[-1] // 32 % vp:
          continue
        fwd = jax.jit(lambda q, k, v, bn=bn, nw=nw, vp=vp: lina_forward(
            q, k, v, None, None, None, out_dtype=q.dtype, block_n=bn, num_warps=nw,
            value_pieces=vp, defer_sums=bool(df and df[0])))
        try:
          ms = time_jax(fwd, q, k, v)
        except Exception as e:  # noqa: BLE001
          print(f"  kernel {spec} {shape}: failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
          continue
        records.append(dict(part="kernel", impl=f"lina pallas {spec}", shape=list(shape),
                            dtype="bfloat16", fwd_ms=ms))
        print(f"  kernel block_n/warps/value_pieces {spec:<8} {shape}: fwd {ms:.3f} ms", flush=True)
        save()

  runs = []
  if "256" not in skip:
    runs += [("d48w768", 16, 8)]
  if "1024" not in skip:
    runs += [("d48w768", 64, 1)]
  if "w1536" not in skip:
    runs += [("d48w1536", 16, 8)]
  options = [tuple(o.split("/")) for o in args.linear.split(",")]
  for variant, side, batch in runs:
    for attention, opt in [("linear", o) for o in options] + [("softmax", None)]:
      c = get_config(variant)
      c.grid, c.attention = (side, side), attention
      if opt is not None:   # "auto" keeps the config's attn_impl
        c.attn_impl = c.attn_impl if opt[0] == "auto" else opt[0]
        c.conv_impl = opt[1]
        if len(opt) > 2:
          c.conv_dtype = opt[2]
      cfg = ml_collections.FrozenConfigDict(c)
      try:
        first, sec = time_sampler(cfg, batch)
      except Exception as e:  # noqa: BLE001
        print(f"  sampler {variant} {side}x{side} {attention} {opt}: failed: {type(e).__name__}: "
              f"{str(e)[:200]}", flush=True)
        continue
      n = side * side
      rec = dict(part="sampler", variant=variant, attention=attention, grid=[side, side],
                 options=None if opt is None else "/".join(opt),
                 tokens=n + M.num_cond(cfg), images=batch, ar_steps=len(F.ar_schedule(n, 64)),
                 euler_steps=25, cfg_scale=cfg.sample.cfg_scale, first_call_s=first,
                 s_per_call=sec, s_per_image=sec / batch)
      records.append(rec)
      name = attention if opt is None else f"{attention} {'/'.join(opt)}"
      print(f"  sampler {variant} {side * 16}px {name:<22}: {sec:.2f} s per {batch} image(s) "
            f"({sec / batch:.3f} s/image), first call {first:.1f} s", flush=True)
      save()
  save()
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
