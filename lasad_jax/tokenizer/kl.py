"""MAR's KL-16 VAE (LDM's AutoencoderKL as MAR ships it, ``kl16.ckpt``) in JAX: LINA's tokenizer.

    vae = kl.load("kl16.ckpt")                       # {"model": state_dict}; no pickled code run
    mean, logvar = vae.encode(images)                # images [B, 256, 256, 3] in [-1, 1]
    latents = (mean + exp(logvar / 2) * eps) * 0.2325   # MAR's scale; LINA trains on these
    images = vae.decode(latents / 0.2325)            # [B, 256, 256, 3], not clipped

Same building blocks as the VQ-16 tokenizer (:mod:`lasad_jax.tokenizer.vq`: GroupNorm(32) + swish
ResNet blocks, one-head attention, (0, 1)-padded stride-2 downsampling, nearest x2 upsampling), with
LDM's names (``encoder.down.{i}.block.{j}``, ``encoder.mid.attn_1``, ``decoder.up.{i}.upsample``),
attention on the encoder's last level (LDM's ``attn_resolutions=(16,)`` at 256 px) and none in
the decoder's levels, a diagonal Gaussian posterior (``quant_conv`` gives mean and log-variance,
clamped to [-30, 20]) and 16 latent channels.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from lasad_jax.tokenizer import vq as V


@dataclasses.dataclass(frozen=True)
class KLConfig:
  ch: int = 128
  ch_mult: tuple = (1, 1, 2, 2, 4)
  num_res_blocks: int = 2
  embed_dim: int = 16
  in_channels: int = 3

  @property
  def downsample(self):
    return 2 ** (len(self.ch_mult) - 1)


def param_shapes(cfg):
  """{PyTorch name: JAX shape} of every parameter (conv kernels HWIO)."""
  t = V.ShapeTable()
  conv, norm, res, attn = t.conv, t.norm, t.res, t.attn
  n, ch, m, e = len(cfg.ch_mult), cfg.ch, cfg.ch_mult, cfg.embed_dim
  conv("encoder.conv_in", cfg.in_channels, ch, 3)
  c = ch
  for i in range(n):
    for j in range(cfg.num_res_blocks):
      res(f"encoder.down.{i}.block.{j}", c, ch * m[i])
      c = ch * m[i]
      if i == n - 1:
        attn(f"encoder.down.{i}.attn.{j}", c)
    if i != n - 1:
      conv(f"encoder.down.{i}.downsample.conv", c, c, 3)
  for prefix in ("encoder", "decoder"):
    top = ch * m[-1]
    res(f"{prefix}.mid.block_1", top, top)
    attn(f"{prefix}.mid.attn_1", top)
    res(f"{prefix}.mid.block_2", top, top)
  norm("encoder.norm_out", c)
  conv("encoder.conv_out", c, 2 * e, 3)
  conv("quant_conv", 2 * e, 2 * e, 1)
  conv("post_quant_conv", e, e, 1)
  c = ch * m[-1]
  conv("decoder.conv_in", e, c, 3)
  for i in reversed(range(n)):
    for j in range(cfg.num_res_blocks + 1):
      res(f"decoder.up.{i}.block.{j}", c, ch * m[i])
      c = ch * m[i]
    if i != 0:
      conv(f"decoder.up.{i}.upsample.conv", c, c, 3)
  norm("decoder.norm_out", c)
  conv("decoder.conv_out", c, cfg.in_channels, 3)
  return dict(t)


def encoder(cfg, p, x):
  n = len(cfg.ch_mult)
  h = V._conv(p, "encoder.conv_in", x)
  for i in range(n):
    for j in range(cfg.num_res_blocks):
      h = V._res(p, f"encoder.down.{i}.block.{j}", h)
      if i == n - 1:
        h = V._attn(p, f"encoder.down.{i}.attn.{j}", h)
    if i != n - 1:
      h = V._conv(p, f"encoder.down.{i}.downsample.conv", h, 2, ((0, 1), (0, 1)))
  h = V._res(p, "encoder.mid.block_1", h)
  h = V._attn(p, "encoder.mid.attn_1", h)
  h = V._res(p, "encoder.mid.block_2", h)
  return V._conv(p, "encoder.conv_out", V._swish(V._norm(p, "encoder.norm_out", h)))


def decoder(cfg, p, z):
  n = len(cfg.ch_mult)
  h = V._conv(p, "decoder.conv_in", z)
  h = V._res(p, "decoder.mid.block_1", h)
  h = V._attn(p, "decoder.mid.attn_1", h)
  h = V._res(p, "decoder.mid.block_2", h)
  for i in reversed(range(n)):
    for j in range(cfg.num_res_blocks + 1):
      h = V._res(p, f"decoder.up.{i}.block.{j}", h)
    if i != 0:
      h = jnp.repeat(jnp.repeat(h, 2, axis=1), 2, axis=2)
      h = V._conv(p, f"decoder.up.{i}.upsample.conv", h)
  return V._conv(p, "decoder.conv_out", V._swish(V._norm(p, "decoder.norm_out", h)))


def _check_images(cfg, images):
  if images.ndim != 4 or images.shape[-1] != cfg.in_channels:
    raise ValueError(f"`images` must be [B, H, W, {cfg.in_channels}] in [-1, 1], got "
                     f"{images.shape}")
  ds = cfg.downsample
  if images.shape[1] % ds or images.shape[2] % ds:
    raise ValueError(f"image height and width must be multiples of {ds}, got {images.shape[1:3]}")


@jax.jit
def _split(moments):
  mean, logvar = jnp.split(moments, 2, axis=-1)
  return mean, jnp.clip(logvar, -30.0, 20.0)


def encode(cfg, p, images):
  """images [B, H, W, 3] -> (posterior mean, log-variance), each [B, H/16, W/16, embed_dim]."""
  _check_images(cfg, images)
  return _split(_encode(cfg, p, images.astype(jnp.float32)))


def decode(cfg, p, latents):
  """Unscaled latents [B, h, w, embed_dim] -> images [B, 16h, 16w, 3] (not clipped)."""
  if latents.ndim != 4 or latents.shape[-1] != cfg.embed_dim:
    raise ValueError(f"`latents` must be [B, h, w, {cfg.embed_dim}], got {latents.shape}")
  return _decode(cfg, p, latents.astype(jnp.float32))


_encode = jax.jit(lambda cfg, p, x: V._conv(p, "quant_conv", encoder(cfg, p, x)),
                  static_argnums=0)
_decode = jax.jit(lambda cfg, p, z: decoder(cfg, p, V._conv(p, "post_quant_conv", z)),
                  static_argnums=0)


def check_params(want, params):
  V.check_params(want, params, what="KL-VAE")


def convert_state_dict(state_dict, config=KLConfig()):
  """MAR KL-16 state dict (name -> array) -> JAX parameter dict: conv kernels OIHW -> HWIO.
  LDM training leftovers (``loss.*``, e.g. the discriminator) are dropped."""
  out = {}
  for k, v in state_dict.items():
    if k.startswith("loss."):
      continue
    v = np.asarray(v, np.float32)
    out[k] = np.transpose(v, (2, 3, 1, 0)) if v.ndim == 4 else v
  check_params(param_shapes(config), out)
  return out


class KLVAE:
  """Parameters + config; ``encode`` / ``decode`` as above (jitted)."""

  def __init__(self, config=KLConfig(), params=None):
    self.config = config
    check_params(param_shapes(config), params)
    self.params = {k: jnp.asarray(v) for k, v in params.items()}

  def encode(self, images):
    return encode(self.config, self.params, jnp.asarray(images))

  def decode(self, latents):
    return decode(self.config, self.params, jnp.asarray(latents))


def load(path, config=None):
  """KLVAE from MAR's ``kl16.ckpt`` (its ``"model"`` entry) or a ``.safetensors`` file."""
  from lasad_jax import torch_io
  if not isinstance(config, KLConfig):
    config = KLConfig(**{k: tuple(v) if isinstance(v, (list, tuple)) else v
                         for k, v in dict(config or {}).items()})
  sd = torch_io.load_state_dict(path, key="model")
  return KLVAE(config, convert_state_dict(sd, config))


def decode_to_uint8(cfg, latents, batch_size):
  """LINA latents [N, h*w, C] (scaled) -> uint8 RGB [N, 16h, 16w, 3] through
  ``cfg.vae_checkpoint``; latents are divided by ``cfg.latent_scale`` first."""
  import os
  if not os.path.exists(cfg.vae_checkpoint):
    raise FileNotFoundError(f"config.vae_checkpoint={cfg.vae_checkpoint!r} does not exist (MAR's "
                            f"kl16.ckpt; nothing is fetched at run time)")
  vae = load(cfg.vae_checkpoint, cfg.get("vae_config", None))
  h, w = cfg.grid
  lat = np.asarray(latents).reshape(-1, h, w, cfg.latent_channels) / cfg.latent_scale
  out = []
  for i in range(0, len(lat), batch_size):
    x = np.asarray(vae.decode(lat[i:i + batch_size]))
    out.append(np.clip(np.rint((np.clip(x, -1, 1) + 1) * 127.5), 0, 255).astype(np.uint8))
  return np.concatenate(out)
