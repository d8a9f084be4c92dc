"""Class-conditional sampling with the O(1)-memory recurrent decoder (DESIGN.md §3).

One ``jax.jit``-compiled ``lax.scan`` over sequence positions. Each LASAD layer carries only its
[B, H, K, V] float32 state: memory does not depend on the resolution (the softmax baseline carries
a KV cache instead). Classifier-free guidance runs
the conditional and the null-class rows in one batch: ``logits = u + s * (c - u)``.
"""

import functools
import os

import jax
import jax.numpy as jnp

from lasad_jax import model as M


TOP_K_IMPLS = ("auto", "sort", "select")

# Tokens per iteration of the token loop's compiled while loop (``lax.scan``'s ``unroll``). A
# module value read when the sampler is traced, so that benchmarks/sampling.py --scan-unroll can
# time others; set it before the first ``sample`` call of the process (compiled samplers are
# cached by their arguments, not by this value).
SCAN_UNROLL = 1


def _check_top_k_impl(top_k_impl):
  if top_k_impl not in TOP_K_IMPLS:
    raise ValueError(f"`top_k_impl` must be one of {TOP_K_IMPLS}, got {top_k_impl!r}.")


def filter_logits(logits, temperature=1.0, top_k=0, top_p=1.0, top_k_impl="auto"):
  """Temperature, then top-k (0: off), then nucleus top-p (1.0: off) on [B, V] logits.

  ``top_k_impl``: "sort" (``lax.top_k``), "select" (``kernels.sampling.kth``: the k-th largest
  value by a digit search in one Pallas program per row, the same threshold: on an H100 ~29 us
  per token inside L's sampler instead of the sort's ~51 us, BENCHMARKS.md session 12) or "auto"
  (select on a GPU, sort elsewhere). The kept set, hence the tokens, are the same."""
  _check_top_k_impl(top_k_impl)
  if top_k_impl == "auto":
    top_k_impl = "select" if jax.default_backend() == "gpu" else "sort"
  logits = logits / jnp.maximum(temperature, 1e-6)
  if top_k and top_k_impl == "select":
    from kernels.sampling.kth import kth_largest
    kth = kth_largest(logits, top_k)
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  elif top_k:
    kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if top_p < 1.0:
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, -1)
    cum = jnp.cumsum(jax.nn.softmax(sorted_logits, -1), -1)
    # Keep the smallest prefix whose mass reaches top_p (the first token is always kept).
    drop_sorted = (cum - jax.nn.softmax(sorted_logits, -1)) >= top_p
    drop = jnp.zeros_like(drop_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(
        drop_sorted)
    logits = jnp.where(drop, -jnp.inf, logits)
  return logits


def check_sample_args(cfg, labels, height, width, cfg_scale, temperature, top_k, top_p,
                      top_k_impl="auto"):
  """``sample``'s argument checks (ValueError naming the argument), for callers that compile a
  sampler themselves (scripts/autotune_sampler.py). Returns the labels as int32."""
  _check_top_k_impl(top_k_impl)   # before compiling (filter_logits checks it again, traced)
  if height <= 0 or width <= 0:
    raise ValueError(f"`height` and `width` must be positive token counts, got {height}x{width}.")
  if cfg_scale < 0:
    raise ValueError(f"`cfg_scale` must be >= 0 (1.0 = no guidance), got {cfg_scale}.")
  if temperature <= 0:
    raise ValueError(f"`temperature` must be > 0, got {temperature}.")
  if not 0 <= top_k <= cfg.vocab_size:
    raise ValueError(f"`top_k` must be in [0, {cfg.vocab_size}] (0 = off), got {top_k}.")
  if not 0 < top_p <= 1:
    raise ValueError(f"`top_p` must be in (0, 1], got {top_p}.")
  M.check_inputs(cfg, None, labels, width)
  return jnp.asarray(labels, jnp.int32)


def sample(model, labels, *, height, width, rng, cfg_scale=1.0, temperature=1.0, top_k=0,
           top_p=1.0, top_k_impl="auto", autotune_dir=None):
  """Sample image tokens [B, height*width] int32 for class ``labels`` [B] (num_classes = null).
  ``top_k_impl``: see ``filter_logits``. ``autotune_dir``: a directory of XLA's GPU autotuning
  results that the sampler's compilation reads (``autotune_options``); make one for your model,
  batch and guidance with ``python scripts/autotune_sampler.py``. Only the GEMMs' tilings change;
  a tiling that splits a sum differently rounds differently, so tokens can differ where two
  logits nearly tie."""
  cfg = model.config
  labels = check_sample_args(cfg, labels, height, width, cfg_scale, temperature, top_k, top_p,
                             top_k_impl)
  fn = _sample if autotune_dir is None else sampler_with(autotune_options(autotune_dir))
  toks, fails = fn(cfg, model.params(), labels, rng, height * width, width,
                   float(cfg_scale), float(temperature), int(top_k), float(top_p), top_k_impl)
  _check_timeouts(fails)
  return toks


def autotune_options(directory, *, search=False):
  """XLA compiler options (a hashable tuple of pairs, for ``sampler_with``) that make the GPU
  compiler take each fusion's GEMM tiling from ``directory`` (XLA's per-fusion autotuning cache,
  ``xla_gpu_per_fusion_autotune_cache_dir``), only reading it; fusions it has no entry for are
  autotuned as usual. With ``search``, XLA instead runs its exhaustive tiling search (a first
  call of ~60 s instead of ~6 s for LASADGen-L) and writes what it found there. Entries are
  keyed by the GPU model (compute capability, cores, clock, bandwidth, L2) and each fusion's HLO,
  so one directory serves one model size, batch and guidance setting on one kind of GPU, and is
  ignored elsewhere. XLA looks there only for fusions it has not autotuned yet in this process
  (its in-memory cache comes first): pass the directory from the process's first sampler
  compile. On LASADGen-L's sampler the exhaustive tilings took 8 images from ~0.189 to ~0.186 s
  on an H100 (BENCHMARKS.md session 32). On a CPU the options change nothing."""
  directory = os.path.abspath(os.fspath(directory))
  if search and not os.path.exists(directory):
    os.makedirs(directory)
  if not os.path.isdir(directory):
    fix = ("give a new or existing directory" if search else "make one with `python "
           "scripts/autotune_sampler.py --out DIR` (on the GPU you sample on)")
    raise ValueError(f"`autotune_dir` {directory!r} is not a directory; {fix}")
  mode = "AUTOTUNE_CACHE_MODE_UPDATE" if search else "AUTOTUNE_CACHE_MODE_READ"
  opts = {"xla_gpu_per_fusion_autotune_cache_dir": directory,
          "xla_gpu_experimental_autotune_cache_mode": mode}
  if search:
    opts["xla_gpu_exhaustive_tiling_search"] = True
  return tuple(sorted(opts.items()))


_SAMPLE_STATIC = (0, 4, 5, 6, 7, 8, 9, 10)


@functools.lru_cache(maxsize=None)
def sampler_with(options):
  """The jitted sampler (``_sample``'s arguments) compiled with XLA ``options``, a tuple of
  (name, value) pairs such as ``autotune_options``' (one jit, hence one compile cache, each)."""
  return jax.jit(_sample_fn, static_argnums=_SAMPLE_STATIC, compiler_options=dict(options))


def _sample_fn(cfg, params, labels, rng, n, width, cfg_scale, temperature, top_k, top_p,
               top_k_impl="auto"):
  b = labels.shape[0]
  guided = cfg_scale != 1.0
  params = M.cast_for_compute(cfg, params)
  rows = jnp.concatenate([labels, jnp.full_like(labels, cfg.num_classes)]) if guided else labels
  params, state, decode = _decoder(cfg, params, rows.shape[0], n)

  def step(carry, pos):
    state, prev, key, fails = carry
    x = M.embed(params, pos, rows, jnp.concatenate([prev, prev]) if guided else prev)
    state, logits, f = decode(state, x, pos, width)
    if guided:
      c, u = logits[:b], logits[b:]
      logits = u + cfg_scale * (c - u)
    key, sub = jax.random.split(key)
    tok = jax.random.categorical(sub, filter_logits(logits, temperature, top_k, top_p,
                                                    top_k_impl))
    return (state, tok.astype(jnp.int32), key, fails + f), tok.astype(jnp.int32)

  init = (state, jnp.zeros((b,), jnp.int32), rng, jnp.int32(0))
  (*_, fails), toks = jax.lax.scan(step, init, jnp.arange(n, dtype=jnp.int32),
                                    unroll=SCAN_UNROLL)
  return toks.T, fails


_sample = jax.jit(_sample_fn, static_argnums=_SAMPLE_STATIC)


def _decoder(cfg, params, batch, n):
  """(params, initial state, step(state, x, pos, width) -> (state, logits, barrier timeouts)) for
  ``config.decode_impl``, from compute-dtype params (``cast_for_compute``): the persistent
  kernel's stacked arrays, or ``unstack_for_decode``'s per-layer lists (made once, outside the
  token loop)."""
  state = M.init_state(cfg, batch, n)
  if M.decode_impl(cfg) in ("persistent", "mosaic"):   # (LASAD only: decode_impl refuses softmax)
    kp = M.persistent_params(cfg, params)
    return kp, state, functools.partial(M.decode_step_persistent, cfg, kp)
  params, state = M.unstack_for_decode(cfg, params, state)

  def step(state, x, pos, width):
    return M.decode_step(cfg, params, state, x, pos, width) + (jnp.int32(0),)
  return params, state, step


def _check_timeouts(fails):
  if int(fails):
    raise RuntimeError(
        f"the persistent decode kernel's grid barrier timed out {int(fails)} times: its programs "
        "were not all resident on the GPU (another job sharing it?), so the result is wrong. "
        "Set config.decode_impl='pallas' or 'xla'.")


def decode_logits(model, tokens, labels, *, width=None):
  """Teacher-forced logits [B, N, vocab] through the recurrent decode path (same steps as
  ``sample``): for checking it against the parallel forward ``model(tokens, labels)``."""
  cfg = model.config
  width = cfg.grid[1] if width is None else width
  M.check_inputs(cfg, tokens, labels, width)
  logits, fails = _decode_logits(cfg, model.params(), jnp.asarray(tokens, jnp.int32),
                                 jnp.asarray(labels, jnp.int32), jnp.asarray(width, jnp.int32))
  _check_timeouts(fails)
  return logits


@functools.partial(jax.jit, static_argnums=(0,))
def _decode_logits(cfg, params, tokens, labels, width):
  b, n = tokens.shape
  prev = jnp.concatenate([jnp.zeros((b, 1), jnp.int32), tokens[:, :-1]], 1)
  # compute-dtype weights, as the sampler's (matmuls cast them anyway: bit-identical logits)
  params, state, decode = _decoder(cfg, M.cast_for_compute(cfg, params), b, n)

  def step(carry, xs):
    state, fails = carry
    pos, prev_t = xs
    state, logits, f = decode(state, M.embed(params, pos, labels, prev_t), pos, width)
    return (state, fails + f), logits

  (_, fails), logits = jax.lax.scan(step, (state, jnp.int32(0)),
                                    (jnp.arange(n, dtype=jnp.int32), prev.T))
  return jnp.swapaxes(logits, 0, 1), fails
