"""What the shared training loop (``lasad_jax.training``) calls for a config with
``model = "lina"``: parameters, loss, weight-decay mask, FLOPs per token, held-out loss, sample grid.

Discrete token datasets (digits, shapes, photos) are read as continuous one-channel latents,
``x = 2 t / (vocab_size - 1) - 1``, so LINA trains on the same grain pipelines; ImageNet uses VAE
latents (``batch["latents"]``, [B, N, C]).
"""

import jax
import jax.numpy as jnp
import numpy as np

from lasad_jax.lina import flow as F
from lasad_jax.lina import model as M


def is_lina(cfg):
  return cfg.get("model", "lasad") == "lina"


def init_params(cfg, seed):
  return M.init_params(cfg, jax.random.key(seed))


def latents_of(cfg, batch):
  x = batch["latents"] if "latents" in batch else batch["tokens"]
  if jnp.issubdtype(x.dtype, jnp.floating):   # extracted VAE latents [B, N, C]
    return x.astype(jnp.float32)
  t = x.astype(jnp.float32)
  return (2.0 * t / (cfg.vocab_size - 1) - 1.0)[..., None]


def to_tokens(cfg, latents):
  """Continuous one-channel latents back to the dataset's token levels (for rendering)."""
  t = np.rint((np.asarray(latents)[..., 0] + 1.0) / 2.0 * (cfg.vocab_size - 1))
  return np.clip(t, 0, cfg.vocab_size - 1).astype(np.int32)


def loss_fn(cfg, params, batch, key, label_dropout):
  return F.loss_fn(cfg, params, latents_of(cfg, batch), batch["label"], key, label_dropout,
                   remat=cfg.get("remat", False))


def decay_mask(params):
  """LINA decays everything but LayerNorms (and, here, biases): per-layer leaves of rank >= 2.
  Stacked block leaves carry a leading layer axis."""
  def mask(path, x):
    stacked = any(getattr(k, "key", None) in ("class_blocks", "enc_blocks", "dec_blocks", "blocks")
                  for k in path)
    return x.ndim >= (3 if stacked else 2)
  return jax.tree_util.tree_map_with_path(mask, params)


def flops_per_token(cfg):
  """Training FLOPs per image token (6 x multiply-adds): transformer blocks over Nc + N tokens,
  the class encoder over 1 + Nc, the head over ``loss_repeat`` copies of every token."""
  d = cfg.dim
  n = int(np.prod(cfg.grid))
  nc = M.num_cond(cfg)
  block = 12 * d * d
  per_image = (block * (cfg.image_depth * (n + nc) + cfg.class_depth * (nc + 1))
               + cfg.loss_repeat * n * (5 * d * d * cfg.head_depth + 4 * d * d))
  return 6 * per_image / n


def sample_grid(cfg, params, path, *, seed=0):
  from lasad_jax import data as D
  n = cfg.sample.num_per_class
  h, w = cfg.grid
  classes = min(cfg.num_classes, 16)
  labels = np.repeat(np.arange(classes), n)
  lat = F.sample(cfg, params, labels, rng=jax.random.key(seed))
  toks = to_tokens(cfg, lat).reshape(classes * n, h, w)
  pix = D.to_pixels(cfg, toks) if cfg.latent_channels == 1 else None
  if pix is not None:
    D.save_image_grid(pix, path, cols=n)
  return np.asarray(lat)
