"""The LINA network (LINA.md "Network"): class encoder, image transformer, diffusion head.

    c = class_encoder(labels)                 [B, Nc, D]    Nc = (h/2)(w/2): 64 at 16 x 16
    z = image_transformer(x, visible, c)      [B, N, D]     x [B, N, C] latent tokens, raster order
    v = head(x_t, 1000 s, z)                  [..., C]      flow velocity eps - x

Blocks are post-norm on the branches (``x += LN(attn(x)); x += LN(mlp(x))``), attention is
:func:`lina_attention` (float32), image blocks >= ``encoder_depth`` add the KV gate and a 5 x 5
depthwise conv of the block input over the image tokens. Blocks of one kind are stacked on a
leading layer axis and run with ``lax.scan``. Matmuls run in ``cfg.dtype`` (bf16) with float32
parameters; LayerNorm statistics and the attention are float32.

The encoder blocks see only [condition ; visible tokens] in LINA (a gather); here they run on all
tokens with the visible ones marked, which gives the same outputs at visible positions
(``lina_attention``'s ``mask``) with static shapes.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lasad_jax import remat as R
from lasad_jax.lina.attention import lina_attention_qkv

FREQ_DIM = 256   # sinusoid width of the time embeddings


# --------------------------------------------------------------------------- pieces
def layer_norm(x, w=None, b=None, eps=1e-5):
  x = x.astype(jnp.float32)
  mu = jnp.mean(x, -1, keepdims=True)
  var = jnp.mean(jnp.square(x - mu), -1, keepdims=True)
  y = (x - mu) * jax.lax.rsqrt(var + eps)
  if w is not None:
    y = y * w + b
  return y


def dense(cfg, x, p, name):
  dt = jnp.dtype(cfg.dtype)
  return (x.astype(dt) @ p[name + "_w"].astype(dt)).astype(jnp.float32) + p[name + "_b"]


# Every weight that only ever enters ``dense`` (so only ever in the compute dtype).
DENSE = ("qkv", "proj", "fc1", "fc2", "time_fc1", "time_fc2", "patch", "t_fc1", "t_fc2", "z_fc1",
         "z_fc2", "in", "ada", "final_ada", "out")


def cast_dense_weights(cfg, params):
  """The ``dense`` weights in the compute dtype, once: ``dense`` casts them anyway, so results are
  bit-identical, and the sampler's loops (64 AR steps x 25 Euler steps of the head) then read
  bf16 weights instead of converting float32 ones inside every step. Norms, biases, the conv,
  tables and gates stay float32."""
  dt = jnp.dtype(cfg.dtype)
  names = {n + "_w" for n in DENSE}

  def cast(path, a):
    key = getattr(path[-1], "key", None)
    return a.astype(dt) if key in names else a
  return jax.tree_util.tree_map_with_path(cast, params)


def sincos_2d(dim, h, w):
  """LINA's fixed 2D position embedding [h*w, dim]: (sin, cos) of the column, then of the row."""
  freq = 1.0 / (10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim // 4)))
  rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
  fw, fh = cols.reshape(-1, 1) * freq, rows.reshape(-1, 1) * freq
  emb = np.concatenate([np.sin(fw), np.cos(fw), np.sin(fh), np.cos(fh)], axis=-1)
  return jnp.asarray(emb, jnp.float32)


def timestep_embedding(t):
  """[cos, sin] of t * 10000^(-i/128), i < 128 (the head's time input; t = 1000 s)."""
  half = FREQ_DIM // 2
  freq = jnp.exp(-math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / half)
  e = t.astype(jnp.float32)[..., None] * freq
  return jnp.concatenate([jnp.cos(e), jnp.sin(e)], axis=-1)


def cond_grid(cfg):
  h, w = cfg.grid
  return h // 2, w // 2


def num_cond(cfg):
  gh, gw = cond_grid(cfg)
  return gh * gw


# --------------------------------------------------------------------------- blocks
def depthwise_conv5(img, w, impl="shift", dtype=jnp.float32):
  """5 x 5 depthwise conv, zero padding 2: img [B, h, w, D], w [5, 5, D] -> float32. Inputs and
  weights are rounded to ``dtype`` (float32 by default; bfloat16 is what LINA's autocast conv
  sees), products are summed in float32. ``impl="shift"``: 25 shifted multiply-adds (XLA's
  grouped-conv gradient is very slow on CPU); ``"xla"``: ``lax.conv_general_dilated`` with one
  group per channel; ``"flat"``: the 25 taps as shifts of the raster-order token axis (channels stay
  the minor axis, so XLA fuses it into one pass without transposes), with a column mask where a
  shift would wrap into the next row."""
  dtype = jnp.dtype(dtype)
  if impl == "xla":
    return jax.lax.conv_general_dilated(
        img.astype(dtype), w.astype(dtype)[:, :, None, :], (1, 1), ((2, 2), (2, 2)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=img.shape[-1],
        precision=jax.lax.Precision.HIGHEST, preferred_element_type=jnp.float32)
  if impl == "flat":
    return _conv5_flat(img, w, dtype)
  if impl != "shift":
    raise ValueError(f"config.conv_impl must be 'shift', 'flat' or 'xla', got {impl!r}")
  hh, ww = img.shape[1:3]
  xp = jnp.pad(img.astype(dtype), ((0, 0), (2, 2), (2, 2), (0, 0)))
  w = w.astype(dtype).astype(jnp.float32)
  out = jnp.zeros(img.shape, jnp.float32)
  for i in range(5):
    for j in range(5):
      out = out + xp[:, i:i + hh, j:j + ww].astype(jnp.float32) * w[i, j]
  return out


def _conv5_flat(img, w, dtype):
  b, hh, ww, d = img.shape
  n = hh * ww
  pad = 2 * ww + 2                      # the largest |shift|: rows above/below read zeros
  xp = jnp.pad(img.astype(dtype).reshape(b, n, d), ((0, 0), (pad, pad), (0, 0)))
  w = w.astype(dtype).astype(jnp.float32)
  col = np.arange(n) % ww
  out = jnp.zeros((b, n, d), jnp.float32)
  for i in range(5):
    for j in range(5):
      s = pad + (i - 2) * ww + (j - 2)
      tap = xp[:, s:s + n].astype(jnp.float32) * w[i, j]
      valid = (col + j - 2 >= 0) & (col + j - 2 < ww)
      out = out + (tap if valid.all() else jnp.where(valid[None, :, None], tap, 0.0))
  return out.reshape(b, hh, ww, d)


def _impl(cfg, field, gpu, other):
  """config.<field>, where "auto" (the default) means ``gpu`` on a GPU backend, else ``other``."""
  impl = cfg.get(field, "auto")
  if impl == "auto":
    return gpu if jax.default_backend() == "gpu" else other
  return impl


def _block(cfg, p, x, *, mask=None, decoder=False):
  """One transformer block on x [B, N, D] float32."""
  b, n, d = x.shape
  nh = cfg.num_heads
  qkv = dense(cfg, x, p, "qkv").reshape(b, n, 3, nh, d // nh)
  if cfg.get("attention", "linear") == "softmax":
    # The baseline: softmax attention in place of LINA's (no KV gate, no conv), as in LINA's
    # softmax ablation; for speed comparisons.
    dt = jnp.dtype(cfg.dtype)
    q, k, v = (qkv[:, :, i].astype(dt) for i in range(3))
    o = jax.nn.dot_product_attention(q, k, v, mask=None if mask is None else
                                     mask[:, None, None, :])
    o = o.reshape(b, n, d).astype(jnp.float32)
    decoder = False
  else:
    ks, vs = (p["key_scale"], p["value_scale"]) if decoder else (None, None)
    # q, k, v in the compute dtype, as LINA's autocast Linear returns them; the operator then
    # computes in float32.
    o = lina_attention_qkv(qkv.astype(cfg.dtype), ks, vs, mask=mask,
                           impl=_impl(cfg, "attn_impl", "pallas" if n <= 2048 else "xla", "xla"),
                           out_dtype=cfg.dtype)
    o = R.checkpoint_name(o, "attn_out")
    o = o.reshape(b, n, d).astype(jnp.float32)
  if decoder:
    h, w = cfg.grid
    nc = n - h * w
    img = x[:, nc:].reshape(b, h, w, d)
    conv_dtype = cfg.get("conv_dtype", "auto")
    conv = depthwise_conv5(img, p["conv_w"], _impl(cfg, "conv_impl", "xla", "shift"),
                           cfg.dtype if conv_dtype == "auto" else conv_dtype) + p["conv_b"]
    o = o + jnp.concatenate([jnp.zeros((b, nc, d), jnp.float32), conv.reshape(b, h * w, d)], 1)
  x = x + layer_norm(dense(cfg, o, p, "proj"), p["norm1_w"], p["norm1_b"])
  hid = jax.nn.gelu(dense(cfg, x, p, "fc1"), approximate=False)
  return x + layer_norm(dense(cfg, hid, p, "fc2"), p["norm2_w"], p["norm2_b"])


def _stack(cfg, blocks, x, remat=False, **kw):
  def body(x, p):
    return _block(cfg, p, x, **kw), None
  if remat:   # config.remat_policy as LASADGen's (lasad_jax/remat.py)
    body = R.wrap(body, dict(remat=True, remat_policy=cfg.get("remat_policy", "full")))
  return jax.lax.scan(body, x, blocks)[0]


# --------------------------------------------------------------------------- the three parts
def class_encoder(cfg, params, labels, remat=False):
  """labels [B] (num_classes = null) -> condition tokens c [B, Nc, D]."""
  p = params
  d = cfg.dim
  lab = layer_norm(p["label_table"][labels], p["label_norm_w"], p["label_norm_b"])[:, None]
  t0 = jnp.concatenate([jnp.zeros((FREQ_DIM // 2,)), jnp.ones((FREQ_DIM // 2,))])  # sincos(0)
  t0 = dense(cfg, jax.nn.silu(dense(cfg, t0[None], p, "time_fc1")), p, "time_fc2")
  t0 = layer_norm(t0, p["time_norm_w"], p["time_norm_b"])
  bos = p["bos"][None] + t0 + sincos_2d(d, *cond_grid(cfg))                    # [Nc, D]
  x = jnp.concatenate([lab, jnp.broadcast_to(bos, (labels.shape[0],) + bos.shape)], axis=1)
  x = _stack(cfg, p["class_blocks"], x, remat)
  return layer_norm(x[:, 1:], p["class_norm_w"], p["class_norm_b"])


def image_transformer(cfg, params, x, visible, c, remat=False):
  """x [B, N, C] latent tokens (values at invisible positions are ignored), visible [B, N] bool,
  c [B, Nc, D] -> z [B, N, D]."""
  p = params
  b, n, _ = x.shape
  emb = dense(cfg, x, p, "patch")
  pos = sincos_2d(cfg.dim, *cfg.grid)
  masked = jnp.where(visible[..., None], emb, p["mask_token"]) + pos          # LINA's x_masked
  nc = c.shape[1]
  seq = jnp.concatenate([c, masked], axis=1)
  weight = jnp.concatenate([jnp.ones((b, nc), bool), visible], axis=1)
  seq = _stack(cfg, p["enc_blocks"], seq, remat, mask=weight)
  seq = jnp.concatenate([seq[:, :nc], jnp.where(visible[..., None], seq[:, nc:], masked)], 1)
  seq = _stack(cfg, p["dec_blocks"], seq, remat, decoder=True)
  return layer_norm(seq[:, nc:], p["norm_w"], p["norm_b"])


def head(cfg, params, x_t, t, z):
  """Diffusion head: x_t [..., C], t [...] (= 1000 s), z [..., D] -> velocity [..., C] float32."""
  p = params["head"]
  cond = dense(cfg, jax.nn.silu(dense(cfg, timestep_embedding(t), p, "t_fc1")), p, "t_fc2")
  cond = cond + dense(cfg, jax.nn.silu(dense(cfg, z, p, "z_fc1")), p, "z_fc2")
  act = jax.nn.silu(cond)
  x = dense(cfg, x_t, p, "in")

  def body(x, q):
    scale, shift, gate = jnp.split(dense(cfg, act, q, "ada"), 3, axis=-1)
    h = layer_norm(x, eps=1e-6) * (1 + scale) + shift
    h = dense(cfg, jax.nn.silu(dense(cfg, h, q, "fc1")), q, "fc2")
    return x + layer_norm(h, q["norm_w"], q["norm_b"]) * gate, None

  x = jax.lax.scan(body, x, p["blocks"])[0]
  scale, shift = jnp.split(dense(cfg, act, p, "final_ada"), 2, axis=-1)
  x = layer_norm(x, eps=1e-6) * (1 + scale) + shift
  return dense(cfg, x, p, "out")


# --------------------------------------------------------------------------- parameters
def param_shapes(cfg):
  """{name: shape} of every parameter (nested dicts; stacked blocks carry a leading layer axis)."""
  d, c, nh = cfg.dim, cfg.latent_channels, cfg.num_heads
  n = num_cond(cfg) + int(np.prod(cfg.grid))

  def lin(name, i, o, lead=()):
    return {name + "_w": lead + (i, o), name + "_b": lead + (o,)}

  def block(L, decoder):
    s = {**lin("qkv", d, 3 * d, (L,)), **lin("proj", d, d, (L,)), **lin("fc1", d, 4 * d, (L,)),
         **lin("fc2", 4 * d, d, (L,)), "norm1_w": (L, d), "norm1_b": (L, d), "norm2_w": (L, d),
         "norm2_b": (L, d)}
    if decoder:
      s.update(conv_w=(L, 5, 5, d), conv_b=(L, d), key_scale=(L, nh, n), value_scale=(L, nh, n))
    return s

  hl = cfg.head_depth
  head = {**lin("in", c, d), **lin("t_fc1", FREQ_DIM, d), **lin("t_fc2", d, d),
          **lin("z_fc1", d, d), **lin("z_fc2", d, d), **lin("final_ada", d, 2 * d),
          **lin("out", d, c),
          "blocks": {**lin("ada", d, 3 * d, (hl,)), **lin("fc1", d, d, (hl,)),
                     **lin("fc2", d, d, (hl,)), "norm_w": (hl, d), "norm_b": (hl, d)}}
  return {"label_table": (cfg.num_classes + 1, d), "label_norm_w": (d,), "label_norm_b": (d,),
          "bos": (d,), "mask_token": (d,), **lin("time_fc1", FREQ_DIM, d), **lin("time_fc2", d, d),
          "time_norm_w": (d,), "time_norm_b": (d,),
          "class_blocks": block(cfg.class_depth, False), "class_norm_w": (d,),
          "class_norm_b": (d,), **lin("patch", c, d),
          "enc_blocks": block(cfg.encoder_depth, False),
          "dec_blocks": block(cfg.image_depth - cfg.encoder_depth, True),
          "norm_w": (d,), "norm_b": (d,), "head": head}


def _init_leaf(path, shape, key):
  """Initialisation (LINA.md: AdaLN projections and the head output zero; KV gates 1; norms 1/0;
  embeddings and matrices normal 0.02 (a guess for the rest))."""
  name = path[-1]
  head = path[0] == "head"
  if name in ("key_scale", "value_scale", "norm1_w", "norm2_w") or name.endswith("norm_w"):
    return jnp.ones(shape, jnp.float32)
  if name.endswith("_b") or (head and (name.startswith("ada") or name.startswith("final_ada")
                                      or name.startswith("out"))):
    return jnp.zeros(shape, jnp.float32)
  if name == "conv_w":
    return jax.random.normal(key, shape, jnp.float32) * (1.0 / 5.0)
  return jax.random.normal(key, shape, jnp.float32) * 0.02


def init_params(cfg, key):
  shapes = param_shapes(cfg)
  flat = jax.tree_util.tree_flatten_with_path(shapes, is_leaf=lambda x: isinstance(x, tuple))[0]
  keys = jax.random.split(key, len(flat))
  leaves = [_init_leaf(tuple(k.key for k in path), shape, kk)
            for (path, shape), kk in zip(flat, keys)]
  treedef = jax.tree.structure(shapes, is_leaf=lambda x: isinstance(x, tuple))
  return jax.tree.unflatten(treedef, leaves)


def check_config(cfg):
  h, w = cfg.grid
  if h % 2 or w % 2:
    raise ValueError(f"config.grid must be even (the class encoder runs on a (h/2, w/2) grid), "
                     f"got {tuple(cfg.grid)}")
  if cfg.dim % cfg.num_heads or cfg.dim % 4:
    raise ValueError(f"config.dim={cfg.dim} must divide into config.num_heads={cfg.num_heads} "
                     f"heads and by 4 (sin-cos position embedding)")
  if not 0 <= cfg.encoder_depth <= cfg.image_depth:
    raise ValueError(f"config.encoder_depth={cfg.encoder_depth} must lie in [0, image_depth="
                     f"{cfg.image_depth}]")


class LINA(nnx.Module):
  """Holds the parameters (``.params()`` gives the plain dict the functions above take)."""

  def __init__(self, config, *, rngs: nnx.Rngs):
    check_config(config)
    self.config = config
    self.p = nnx.data(jax.tree.map(nnx.Param, init_params(config, rngs.params())))

  def params(self):
    return jax.tree.map(lambda x: x[...], self.p, is_leaf=lambda x: isinstance(x, nnx.Param))


def count_params(cfg):
  """Parameter count from the shapes alone (nothing is allocated)."""
  shapes = jax.tree.leaves(param_shapes(cfg), is_leaf=lambda x: isinstance(x, tuple))
  return int(sum(np.prod(s) for s in shapes))
