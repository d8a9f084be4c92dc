"""Why does ``kth_largest`` take ~29 us per token inside L's sampler but ~14 us alone? Its kernel
time in growing contexts, down to the sampler's own logits.

    PYTHONPATH=.:benchmarks python benchmarks/kth_context.py

Prints {kernel: (calls per call, us per launch)} for each context (BENCHMARKS.md session 12).
"""
import jax
import jax.numpy as jnp
from flax import nnx

from benchmarks_common import trace_kernels
from configs.lasad import get_config
from kernels.sampling.kth import kth_largest
from lasad_jax import model as M
from lasad_jax import sampling as S


def per_kernel(f, *a, iters=5):
  """{kth kernel: (launches per call, us per launch)}."""
  stats = trace_kernels(f, *a, iters=iters)
  return {k: (c / iters, t / c / 1e3) for k, (c, t) in stats.items() if "kth" in k}


def main():
  x = 3 * jax.random.normal(jax.random.key(0), (8, 16384), jnp.float32)
  w = 0.02 * jax.random.normal(jax.random.key(1), (1024, 16384), jnp.bfloat16)
  h = jax.random.normal(jax.random.key(2), (16, 1024), jnp.bfloat16)
  K = 2000
  print("alone", per_kernel(jax.jit(lambda x: kth_largest(x, K)), x))
  print("after producer", per_kernel(jax.jit(lambda x: kth_largest(x * 1.001 + 0.5, K)), x))
  def logits(h):
    l = (h @ w).astype(jnp.float32)
    c, u = l[:8], l[8:]
    return u + 4.0 * (c - u)
  print("after gemm+cfg", per_kernel(jax.jit(lambda h: kth_largest(logits(h), K)), h))
  lg = jax.jit(logits)(h)
  print("gemm+cfg logits, alone", per_kernel(jax.jit(lambda x: kth_largest(x, K)), lg))
  def loop(h):
    def step(c, _):
      t = kth_largest(logits(c), K)
      return c + (t[:1, :1] * 1e-6).astype(c.dtype), t
    return jax.lax.scan(step, h, None, length=64)[1]
  print("in a 64-step scan after gemm+cfg", per_kernel(jax.jit(loop), h, iters=2))
  for nw in (8, 32):
    f = jax.jit(lambda x, nw=nw: kth_largest(x, K, num_warps=nw))
    print(f"gemm+cfg logits alone, warps {nw}", per_kernel(f, lg))

  # The sampler's own logits (LASADGen-L, random init, CFG 4) for a few positions
  cfg = get_config("L")
  m = M.LASADGen(cfg, rngs=nnx.Rngs(0))
  toks = S.sample(m, jnp.arange(8) % 1000, height=16, width=16, rng=jax.random.key(0),
                  cfg_scale=4.0, top_k=2000)
  lab = jnp.concatenate([jnp.arange(8) % 1000, jnp.full((8,), 1000)])
  lg = S.decode_logits(m, jnp.concatenate([toks, toks])[:, :8], lab, width=16)   # [16, 8, V]
  for pos in (0, 1, 7):
    c, u = lg[:8, pos], lg[8:, pos]
    cl = (u + 4.0 * (c - u)).astype(jnp.float32)
    t = per_kernel(jax.jit(lambda x: kth_largest(x, K)), cl)
    print(f"sampler logits pos {pos}: min {float(cl.min()):.3f} max {float(cl.max()):.3f} "
          f"distinct {len(set(cl[0].tolist()))}", t)


if __name__ == "__main__":
  main()
