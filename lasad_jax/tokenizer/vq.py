"""LlamaGen's VQ tokenizer (VQ-16: downsample 16, codebook 16384 x 8, l2-normalised codes) in JAX.

Architecture as LlamaGen's ``tokenizer/tokenizer_image/vq_model.py`` (taming-style conv encoder
and decoder: GroupNorm(32, eps 1e-6) + swish ResNet blocks, single-head self-attention blocks at the
lowest resolution and in the middle, stride-2 conv downsampling with (0, 1) padding, nearest x2
upsampling + conv). Parameters live in a flat dict keyed by the PyTorch state-dict names, with
convolution kernels in JAX's HWIO layout, so :func:`convert_state_dict` is a transpose and a name
check. Images are NHWC float in [-1, 1]; codes are int32 [B, h, w].

    vq = load("vq_ds16_c2i.pt")        # LlamaGen's checkpoint; never runs pickled code
    codes = vq.encode(images)          # [B, 16, 16] for 256x256 images
    images = vq.decode(codes)          # [B, 256, 256, 3]
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


@dataclasses.dataclass(frozen=True)
class VQConfig:
  ch: int = 128
  ch_mult: tuple = (1, 1, 2, 2, 4)     # VQ-16; (1, 2, 2, 4) is VQ-8
  num_res_blocks: int = 2
  z_channels: int = 256
  codebook_size: int = 16384
  codebook_dim: int = 8
  in_channels: int = 3

  @property
  def downsample(self):
    return 2 ** (len(self.ch_mult) - 1)


class ShapeTable(dict):
  """{PyTorch name: JAX shape} built block by block (conv kernels HWIO); shared with kl.py."""

  def conv(self, name, cin, cout, k):
    self[f"{name}.weight"] = (k, k, cin, cout)
    self[f"{name}.bias"] = (cout,)

  def norm(self, name, c):
    self[f"{name}.weight"] = (c,)
    self[f"{name}.bias"] = (c,)

  def res(self, name, cin, cout):
    self.norm(f"{name}.norm1", cin)
    self.conv(f"{name}.conv1", cin, cout, 3)
    self.norm(f"{name}.norm2", cout)
    self.conv(f"{name}.conv2", cout, cout, 3)
    if cin != cout:
      self.conv(f"{name}.nin_shortcut", cin, cout, 1)

  def attn(self, name, c):
    self.norm(f"{name}.norm", c)
    for part in ("q", "k", "v", "proj_out"):
      self.conv(f"{name}.{part}", c, c, 1)


def param_shapes(cfg):
  """{PyTorch name: JAX shape} of every parameter (conv kernels HWIO)."""
  t = ShapeTable()
  conv, norm, res, attn = t.conv, t.norm, t.res, t.attn
  n, ch, m = len(cfg.ch_mult), cfg.ch, cfg.ch_mult
  conv("encoder.conv_in", cfg.in_channels, ch, 3)
  block_in = ch
  for i in range(n):
    for j in range(cfg.num_res_blocks):
      res(f"encoder.conv_blocks.{i}.res.{j}", block_in, ch * m[i])
      block_in = ch * m[i]
      if i == n - 1:
        attn(f"encoder.conv_blocks.{i}.attn.{j}", block_in)
    if i != n - 1:
      conv(f"encoder.conv_blocks.{i}.downsample.conv", block_in, block_in, 3)
  for prefix in ("encoder", "decoder"):
    c = ch * m[-1]
    res(f"{prefix}.mid.0", c, c)
    attn(f"{prefix}.mid.1", c)
    res(f"{prefix}.mid.2", c, c)
  norm("encoder.norm_out", block_in)
  conv("encoder.conv_out", block_in, cfg.z_channels, 3)
  conv("quant_conv", cfg.z_channels, cfg.codebook_dim, 1)
  t["quantize.embedding.weight"] = (cfg.codebook_size, cfg.codebook_dim)
  conv("post_quant_conv", cfg.codebook_dim, cfg.z_channels, 1)
  block_in = ch * m[-1]
  conv("decoder.conv_in", cfg.z_channels, block_in, 3)
  for idx, i in enumerate(reversed(range(n))):
    for j in range(cfg.num_res_blocks + 1):
      res(f"decoder.conv_blocks.{idx}.res.{j}", block_in, ch * m[i])
      block_in = ch * m[i]
      if i == n - 1:
        attn(f"decoder.conv_blocks.{idx}.attn.{j}", block_in)
    if i != 0:
      conv(f"decoder.conv_blocks.{idx}.upsample.conv", block_in, block_in, 3)
  norm("decoder.norm_out", block_in)
  conv("decoder.conv_out", block_in, cfg.in_channels, 3)
  return dict(t)


def init_params(cfg, key):
  """Random parameters (for tests and smoke runs): normal(0.02) kernels, zero biases, unit norms."""
  out = {}
  for i, (name, shape) in enumerate(sorted(param_shapes(cfg).items())):
    if name.endswith("bias"):
      out[name] = jnp.zeros(shape, jnp.float32)
    elif len(shape) == 1:
      out[name] = jnp.ones(shape, jnp.float32)
    else:
      out[name] = 0.02 * jax.random.normal(jax.random.fold_in(key, i), shape, jnp.float32)
  return out


# ------------------------------------------------------------------------------------ layers
def _conv(p, name, x, stride=1, padding=None):
  w = p[f"{name}.weight"]
  k = w.shape[0]
  if padding is None:
    padding = ((k // 2, k // 2),) * 2
  y = jax.lax.conv_general_dilated(x, w.astype(x.dtype), (stride, stride), padding,
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                   precision=jax.lax.Precision.HIGHEST)
  return y + p[f"{name}.bias"].astype(x.dtype)


def _norm(p, name, x, groups=32, eps=1e-6):
  b, h, w, c = x.shape
  g = x.reshape(b, h, w, groups, c // groups)
  mean = jnp.mean(g, axis=(1, 2, 4), keepdims=True)
  var = jnp.mean(jnp.square(g - mean), axis=(1, 2, 4), keepdims=True)
  g = (g - mean) * jax.lax.rsqrt(var + eps)
  return g.reshape(b, h, w, c) * p[f"{name}.weight"] + p[f"{name}.bias"]


def _swish(x):
  return x * jax.nn.sigmoid(x)


def _res(p, name, x):
  h = _conv(p, f"{name}.conv1", _swish(_norm(p, f"{name}.norm1", x)))
  h = _conv(p, f"{name}.conv2", _swish(_norm(p, f"{name}.norm2", h)))
  if f"{name}.nin_shortcut.weight" in p:
    x = _conv(p, f"{name}.nin_shortcut", x)
  return x + h


def _attn(p, name, x):
  b, hh, ww, c = x.shape
  h = _norm(p, f"{name}.norm", x)
  q, k, v = (_conv(p, f"{name}.{s}", h).reshape(b, hh * ww, c) for s in ("q", "k", "v"))
  a = jax.nn.softmax(jnp.einsum("bic,bjc->bij", q, k, precision="highest") * c ** -0.5, axis=-1)
  o = jnp.einsum("bij,bjc->bic", a, v, precision="highest").reshape(b, hh, ww, c)
  return x + _conv(p, f"{name}.proj_out", o)


def _l2norm(x, eps=1e-12):
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


# ----------------------------------------------------------------------------------- network
def encoder(cfg, p, x):
  n = len(cfg.ch_mult)
  h = _conv(p, "encoder.conv_in", x)
  for i in range(n):
    for j in range(cfg.num_res_blocks):
      h = _res(p, f"encoder.conv_blocks.{i}.res.{j}", h)
      if i == n - 1:
        h = _attn(p, f"encoder.conv_blocks.{i}.attn.{j}", h)
    if i != n - 1:   # asymmetric (0, 1) padding, then a stride-2 3x3 conv
      h = _conv(p, f"encoder.conv_blocks.{i}.downsample.conv", h, 2, ((0, 1), (0, 1)))
  h = _res(p, "encoder.mid.0", h)
  h = _attn(p, "encoder.mid.1", h)
  h = _res(p, "encoder.mid.2", h)
  return _conv(p, "encoder.conv_out", _swish(_norm(p, "encoder.norm_out", h)))


def decoder(cfg, p, z):
  n = len(cfg.ch_mult)
  h = _conv(p, "decoder.conv_in", z)
  h = _res(p, "decoder.mid.0", h)
  h = _attn(p, "decoder.mid.1", h)
  h = _res(p, "decoder.mid.2", h)
  for idx, i in enumerate(reversed(range(n))):
    for j in range(cfg.num_res_blocks + 1):
      h = _res(p, f"decoder.conv_blocks.{idx}.res.{j}", h)
      if i == n - 1:
        h = _attn(p, f"decoder.conv_blocks.{idx}.attn.{j}", h)
    if i != 0:
      h = jnp.repeat(jnp.repeat(h, 2, axis=1), 2, axis=2)   # nearest x2
      h = _conv(p, f"decoder.conv_blocks.{idx}.upsample.conv", h)
  return _conv(p, "decoder.conv_out", _swish(_norm(p, "decoder.norm_out", h)))


def codebook(p):
  return _l2norm(p["quantize.embedding.weight"])


def encode(cfg, p, images):
  """images [B, H, W, 3] in [-1, 1] -> codes int32 [B, H/ds, W/ds] (nearest l2-normalised code)."""
  z = _l2norm(_conv(p, "quant_conv", encoder(cfg, p, images)))
  e = codebook(p)
  d = (jnp.sum(z * z, -1, keepdims=True) + jnp.sum(e * e, -1)
       - 2 * jnp.einsum("bhwc,nc->bhwn", z, e, precision="highest"))
  return jnp.argmin(d, axis=-1).astype(jnp.int32)


def decode(cfg, p, codes):
  """codes int [B, h, w] -> images [B, h*ds, w*ds, 3] (not clipped; LlamaGen clips to [-1, 1])."""
  z = codebook(p)[codes]
  return decoder(cfg, p, _conv(p, "post_quant_conv", z))


_encode = jax.jit(encode, static_argnums=0)
_decode = jax.jit(decode, static_argnums=0)


class VQTokenizer(nnx.Module):
  """Holds the parameters (``nnx.Param`` per PyTorch name); ``encode``/``decode`` are jitted."""

  def __init__(self, config=VQConfig(), *, params=None, rngs=None):
    self.config = config
    if params is None:
      params = init_params(config, (rngs or nnx.Rngs(0)).params())
    want = param_shapes(config)
    check_params(want, params)
    self.params_ = nnx.Dict({k.replace(".", "/"): nnx.Param(jnp.asarray(v))
                             for k, v in params.items()})

  def params(self):
    return {k.replace("/", "."): v.get_value() for k, v in self.params_.items()}

  def encode(self, images):
    images = jnp.asarray(images)
    if images.ndim != 4 or images.shape[-1] != self.config.in_channels:
      raise ValueError(f"`images` must be [B, H, W, {self.config.in_channels}] in [-1, 1], got "
                       f"{images.shape}")
    ds = self.config.downsample
    if images.shape[1] % ds or images.shape[2] % ds:
      raise ValueError(f"image height and width must be multiples of {ds}, got {images.shape[1:3]}")
    return _encode(self.config, self.params(), images.astype(jnp.float32))

  def decode(self, codes):
    codes = jnp.asarray(codes)
    if codes.ndim != 3 or not jnp.issubdtype(codes.dtype, jnp.integer):
      raise ValueError(f"`codes` must be int [B, h, w], got {codes.dtype} {codes.shape}")
    return _decode(self.config, self.params(), codes)


def load(path, config=None):
  """A VQTokenizer from a LlamaGen checkpoint (its ``"model"`` entry; ``.pt`` read without running
  pickled code, or ``.safetensors``). ``config``: a VQConfig or a dict of its fields (lists, e.g.
  from JSON, become tuples); default VQ-16."""
  from lasad_jax import torch_io
  if not isinstance(config, VQConfig):
    config = VQConfig(**{k: tuple(v) if isinstance(v, (list, tuple)) else v
                         for k, v in dict(config or {}).items()})
  sd = torch_io.load_state_dict(path, key="model")
  return VQTokenizer(config, params=convert_state_dict(sd, config))


def check_params(want, params, what="VQ"):
  missing = sorted(set(want) - set(params))
  extra = sorted(set(params) - set(want))
  bad = sorted(k for k in set(want) & set(params) if tuple(np.shape(params[k])) != want[k])
  if missing or extra or bad:
    raise ValueError(
        f"{what} parameters do not match the config: " +
        (f"missing {missing[:8]}{'...' if len(missing) > 8 else ''}; " if missing else "") +
        (f"unexpected {extra[:8]}{'...' if len(extra) > 8 else ''}; " if extra else "") +
        (f"wrong shape {[(k, tuple(np.shape(params[k])), want[k]) for k in bad[:4]]}"
         if bad else ""))


def convert_state_dict(state_dict, config=VQConfig()):
  """LlamaGen VQ state dict (names -> numpy arrays, from
  ``lasad_jax.torch_io.load_state_dict(path, key="model")``) -> JAX parameter dict. Conv kernels OIHW -> HWIO;
  the ``quantize.codebook_used`` buffer (training statistics) is dropped. Raises a ValueError
  listing unmatched keys."""
  out = {}
  for k, v in state_dict.items():
    if k == "quantize.codebook_used":
      continue
    v = np.asarray(v, np.float32)
    out[k] = np.transpose(v, (2, 3, 1, 0)) if v.ndim == 4 else v
  check_params(param_shapes(config), out)
  return out
