"""Timing helpers shared by the benchmark scripts (median ms after warm-up)."""

import statistics
import time

import jax
import jax.numpy as jnp


def time_jax(fn, *args, iters=20, warmup=3):
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  ts = []
  for _ in range(iters):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    ts.append((time.perf_counter() - t0) * 1e3)
  return statistics.median(ts)


def inputs(shape, seed=0):
  b, t, h, d = shape
  ks = jax.random.split(jax.random.key(seed), 5)
  q, k, v = (jax.random.normal(kk, shape, jnp.bfloat16) for kk in ks[:3])
  g = jax.nn.log_sigmoid(jax.random.normal(ks[3], shape, jnp.float32)).astype(jnp.bfloat16)
  do = jax.random.normal(ks[4], shape, jnp.bfloat16)
  return q, k, v, g, do
