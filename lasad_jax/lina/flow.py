"""LINA's objective and sampler (LINA.md "Training", "Sampling").

Training: one mask ratio r per batch from a normal (mean 1, std 0.25) truncated to [0.7, 1],
round((1 - r) N) visible tokens per image in a random order; flow matching on the masked tokens
(x_s = s eps + (1 - s) x, target eps - x, s = sigmoid(N(0, 1)), timestep 1000 s), each image's
tokens repeated ``loss_repeat`` times for the head.

Sampling: a cosine schedule of ``ar_steps`` steps (masked count after step i =
round(N cos(pi/2 i/steps)); steps that reveal nothing are skipped: 61 of 64 at N = 256), one random
order per image; at each step the image transformer sees the tokens revealed so far, and the head
integrates the new ones from noise with ``euler_steps`` Euler steps, guided on its velocity with a
scale rising linearly from 1 to ``cfg_scale`` over the steps. All compiled as one program.
"""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from lasad_jax.lina import model as M


def ar_schedule(num_tokens, steps):
  """Tokens revealed at each real step (steps revealing none are dropped); sums to num_tokens."""
  if steps < 1:
    raise ValueError(f"the number of AR steps must be >= 1, got {steps}")
  masked = [int(np.round(num_tokens * np.cos(np.pi / 2 * i / steps))) for i in range(steps + 1)]
  preds = [a - b for a, b in zip(masked[:-1], masked[1:])]
  return [p for p in preds if p > 0]


def euler_sigmas(steps):
  """Noise levels s from 1 down to 0: diffusers' flow-matching Euler schedule with shift 1
  (linspace(1, 1/1000, steps), then 0). LINA.md marks the shift as a guess."""
  return np.concatenate([np.linspace(1.0, 1.0 / 1000, steps), [0.0]]).astype(np.float32)


def sample_mask_ratio(cfg, key):
  m = cfg.mask_ratio
  lo, hi = (m.min - m.mean) / m.std, (m.max - m.mean) / m.std
  return m.mean + m.std * jax.random.truncated_normal(key, lo, hi)


def random_visible(key, batch, n, num_visible):
  """[B, N] bool: ``num_visible`` (traced ok) positions per row, in a random order per row."""
  rank = jnp.argsort(jnp.argsort(jax.random.uniform(key, (batch, n)), axis=1), axis=1)
  return rank < num_visible


def loss_fn(cfg, params, latents, labels, key, label_dropout=0.1, remat=False):
  """Flow-matching loss of a batch: latents [B, N, C] (scaled VAE latents, raster order), labels
  [B]. Returns the mean over masked tokens and channels."""
  b, n, ch = latents.shape
  if ch != cfg.latent_channels or n != int(np.prod(cfg.grid)):
    raise ValueError(f"latents must have shape [B, {int(np.prod(cfg.grid))}, "
                     f"{cfg.latent_channels}] (config.grid {tuple(cfg.grid)}, "
                     f"config.latent_channels), got {latents.shape}")
  k_drop, k_ratio, k_perm, k_noise, k_s = jax.random.split(key, 5)
  labels = jnp.where(jax.random.bernoulli(k_drop, label_dropout, labels.shape),
                     cfg.num_classes, labels)
  ratio = sample_mask_ratio(cfg, k_ratio)
  visible = random_visible(k_perm, b, n, jnp.round((1.0 - ratio) * n).astype(jnp.int32))
  c = M.class_encoder(cfg, params, labels, remat)
  z = M.image_transformer(cfg, params, latents, visible, c, remat)
  r = cfg.loss_repeat
  x = jnp.tile(latents.astype(jnp.float32), (r, 1, 1))
  z = jnp.tile(z, (r, 1, 1))
  weight = jnp.tile((~visible).astype(jnp.float32), (r, 1))
  eps = jax.random.normal(k_noise, x.shape)
  s = jax.nn.sigmoid(jax.random.normal(k_s, x.shape[:2]))
  x_s = s[..., None] * eps + (1 - s[..., None]) * x
  pred = M.head(cfg, params, x_s, 1000.0 * s, z)
  err = jnp.mean(jnp.square(pred - (eps - x)), axis=-1)
  return jnp.sum(err * weight) / (jnp.sum(weight) + 1e-5)


@functools.partial(jax.jit, static_argnums=(0,))
def class_condition(cfg, params, labels):
  """The class encoder's output for ``labels`` (depends on nothing else: compute once per class)."""
  return M.class_encoder(cfg, params, labels)


def check_sampling(cfg, labels, cfg_scale):
  lab = np.asarray(labels)
  if lab.ndim != 1 or lab.size == 0:
    raise ValueError(f"labels must be a non-empty [B] int array, got shape {lab.shape}")
  if lab.min() < 0 or lab.max() >= cfg.num_classes:
    raise ValueError(f"labels must lie in [0, {cfg.num_classes}) (config.num_classes), got "
                     f"{sorted(set(lab.tolist()))[:8]}")
  if cfg_scale < 1:
    raise ValueError(f"cfg_scale must be >= 1 (1 = no guidance; LINA uses 2.4 at 1.4B), got "
                     f"{cfg_scale}")


def sample(cfg, params, labels, *, rng, cfg_scale=None, ar_steps=None, euler_steps=None):
  """Latents [B, N, C] float32 for class ``labels`` [B]. Same rng -> same latents."""
  if not isinstance(cfg, ml_collections.FrozenConfigDict):
    cfg = ml_collections.FrozenConfigDict(cfg)
  s = cfg.sample
  cfg_scale = s.cfg_scale if cfg_scale is None else float(cfg_scale)
  check_sampling(cfg, labels, cfg_scale)
  ar_steps = s.ar_steps if ar_steps is None else ar_steps
  euler_steps = s.euler_steps if euler_steps is None else euler_steps
  return _sample(cfg, params, jnp.asarray(labels, jnp.int32), rng, cfg_scale, ar_steps,
                 euler_steps)


@functools.partial(jax.jit, static_argnums=(0, 4, 5, 6))
def _sample(cfg, params, labels, rng, cfg_scale, ar_steps, euler_steps):
  b = labels.shape[0]
  n = int(np.prod(cfg.grid))
  ch = cfg.latent_channels
  sched = ar_schedule(n, ar_steps)
  width = max(sched)
  starts = np.concatenate([[0], np.cumsum(sched)[:-1]]).astype(np.int32)
  guided = cfg_scale > 1
  ramp = jnp.asarray([1.0 + (cfg_scale - 1.0) * (i + 1) / len(sched) for i in range(len(sched))],
                     jnp.float32)
  sig = jnp.asarray(euler_sigmas(euler_steps))

  k_order, k_steps = jax.random.split(rng)
  order = jnp.argsort(jax.random.uniform(k_order, (b, n)), axis=1)         # reveal order per image
  rank = jnp.argsort(order, axis=1)
  order = jnp.pad(order, ((0, 0), (0, width)), constant_values=n)           # n = no token
  lab2 = jnp.concatenate([labels, jnp.full_like(labels, cfg.num_classes)]) if guided else labels
  params = M.cast_dense_weights(cfg, params)                                 # once per call
  c = M.class_encoder(cfg, params, lab2)                                     # once per call

  def step(x, xs):
    i, start, count, g = xs
    visible = rank < start
    xv = jnp.concatenate([x, x]) if guided else x
    vis2 = jnp.concatenate([visible, visible]) if guided else visible
    z = M.image_transformer(cfg, params, xv, vis2, c)
    live = jnp.arange(width) < count
    idx = jnp.where(live, jax.lax.dynamic_slice_in_dim(order, start, width, axis=1), n)
    safe = jnp.minimum(idx, n - 1)                                           # [B, width]
    idx2 = jnp.concatenate([safe, safe]) if guided else safe
    zt = jnp.take_along_axis(z, idx2[..., None], axis=1)                     # [B(2), width, D]
    noise = jax.random.normal(jax.random.fold_in(k_steps, i), (b, width, ch))

    def euler(j, xt):
      t = jnp.full(xt.shape[:2], 1000.0 * sig[j])
      xin = jnp.concatenate([xt, xt]) if guided else xt
      v = M.head(cfg, params, xin, jnp.concatenate([t, t]) if guided else t, zt)
      if guided:
        cond, unc = v[:b], v[b:]
        v = unc + g * (cond - unc)
      return xt + (sig[j + 1] - sig[j]) * v

    new = jax.lax.fori_loop(0, euler_steps, euler, noise)
    x = x.at[jnp.arange(b)[:, None], idx].set(new, mode="drop")               # n: dropped
    return x, None

  xs = (jnp.arange(len(sched)), jnp.asarray(starts), jnp.asarray(sched, jnp.int32), ramp)
  x, _ = jax.lax.scan(step, jnp.zeros((b, n, ch), jnp.float32), xs)
  return x
