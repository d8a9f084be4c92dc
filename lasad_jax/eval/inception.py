"""The FID Inception-v3 in JAX: pool features [B, 2048] and logits [B, 1008] for FID / IS.

The network of pytorch-fid's ``InceptionV3`` with the FID weights
(``pt_inception-2015-12-05-6726825d.pth``, a port of the TF graph the ADM evaluator and TTUR use):
torchvision's Inception-v3 layout with the FID variants of the A/C/E blocks (average pools that
exclude padding, max pool in the last E block). Input uint8 or [0, 1] images of any size, resized
bilinearly to 299 (half-pixel centres, no antialiasing, as ``F.interpolate(align_corners=False)``),
scaled to [-1, 1]. BatchNorm runs in inference form (eps 1e-3).

Parameters are a flat dict keyed by the PyTorch names (``Mixed_5b.branch1x1.conv.weight``, ...;
kernels HWIO): :func:`convert_state_dict` transposes a state dict read by
``lasad_jax.torch_io.load_state_dict`` (no pickled code runs) and lists unmatched keys.
"""

import jax
import jax.numpy as jnp
import numpy as np

# (name, in, out, kernel (h, w), stride, padding (h, w)) of every BasicConv2d, in forward order.
_VALID = (0, 0)


def _spec():
  s = [("Conv2d_1a_3x3", 3, 32, (3, 3), 2, _VALID), ("Conv2d_2a_3x3", 32, 32, (3, 3), 1, _VALID),
       ("Conv2d_2b_3x3", 32, 64, (3, 3), 1, (1, 1)), ("Conv2d_3b_1x1", 64, 80, (1, 1), 1, _VALID),
       ("Conv2d_4a_3x3", 80, 192, (3, 3), 1, _VALID)]

  def a(m, cin, pool):
    s.extend([(f"{m}.branch1x1", cin, 64, (1, 1), 1, _VALID),
              (f"{m}.branch5x5_1", cin, 48, (1, 1), 1, _VALID),
              (f"{m}.branch5x5_2", 48, 64, (5, 5), 1, (2, 2)),
              (f"{m}.branch3x3dbl_1", cin, 64, (1, 1), 1, _VALID),
              (f"{m}.branch3x3dbl_2", 64, 96, (3, 3), 1, (1, 1)),
              (f"{m}.branch3x3dbl_3", 96, 96, (3, 3), 1, (1, 1)),
              (f"{m}.branch_pool", cin, pool, (1, 1), 1, _VALID)])

  def c(m, c7):
    s.extend([(f"{m}.branch1x1", 768, 192, (1, 1), 1, _VALID),
              (f"{m}.branch7x7_1", 768, c7, (1, 1), 1, _VALID),
              (f"{m}.branch7x7_2", c7, c7, (1, 7), 1, (0, 3)),
              (f"{m}.branch7x7_3", c7, 192, (7, 1), 1, (3, 0)),
              (f"{m}.branch7x7dbl_1", 768, c7, (1, 1), 1, _VALID),
              (f"{m}.branch7x7dbl_2", c7, c7, (7, 1), 1, (3, 0)),
              (f"{m}.branch7x7dbl_3", c7, c7, (1, 7), 1, (0, 3)),
              (f"{m}.branch7x7dbl_4", c7, c7, (7, 1), 1, (3, 0)),
              (f"{m}.branch7x7dbl_5", c7, 192, (1, 7), 1, (0, 3)),
              (f"{m}.branch_pool", 768, 192, (1, 1), 1, _VALID)])

  def e(m, cin):
    s.extend([(f"{m}.branch1x1", cin, 320, (1, 1), 1, _VALID),
              (f"{m}.branch3x3_1", cin, 384, (1, 1), 1, _VALID),
              (f"{m}.branch3x3_2a", 384, 384, (1, 3), 1, (0, 1)),
              (f"{m}.branch3x3_2b", 384, 384, (3, 1), 1, (1, 0)),
              (f"{m}.branch3x3dbl_1", cin, 448, (1, 1), 1, _VALID),
              (f"{m}.branch3x3dbl_2", 448, 384, (3, 3), 1, (1, 1)),
              (f"{m}.branch3x3dbl_3a", 384, 384, (1, 3), 1, (0, 1)),
              (f"{m}.branch3x3dbl_3b", 384, 384, (3, 1), 1, (1, 0)),
              (f"{m}.branch_pool", cin, 192, (1, 1), 1, _VALID)])

  a("Mixed_5b", 192, 32)
  a("Mixed_5c", 256, 64)
  a("Mixed_5d", 288, 64)
  s.extend([("Mixed_6a.branch3x3", 288, 384, (3, 3), 2, _VALID),
            ("Mixed_6a.branch3x3dbl_1", 288, 64, (1, 1), 1, _VALID),
            ("Mixed_6a.branch3x3dbl_2", 64, 96, (3, 3), 1, (1, 1)),
            ("Mixed_6a.branch3x3dbl_3", 96, 96, (3, 3), 2, _VALID)])
  for m, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
    c(m, c7)
  s.extend([("Mixed_7a.branch3x3_1", 768, 192, (1, 1), 1, _VALID),
            ("Mixed_7a.branch3x3_2", 192, 320, (3, 3), 2, _VALID),
            ("Mixed_7a.branch7x7x3_1", 768, 192, (1, 1), 1, _VALID),
            ("Mixed_7a.branch7x7x3_2", 192, 192, (1, 7), 1, (0, 3)),
            ("Mixed_7a.branch7x7x3_3", 192, 192, (7, 1), 1, (3, 0)),
            ("Mixed_7a.branch7x7x3_4", 192, 192, (3, 3), 2, _VALID)])
  e("Mixed_7b", 1280)
  e("Mixed_7c", 2048)
  return {name: (cin, cout, k, stride, pad) for name, cin, cout, k, stride, pad in s}


SPEC = _spec()
NUM_CLASSES = 1008


def param_shapes():
  """{PyTorch name: PyTorch shape} (conv kernels OIHW as in the checkpoint)."""
  out = {}
  for name, (cin, cout, (kh, kw), _, _) in SPEC.items():
    out[f"{name}.conv.weight"] = (cout, cin, kh, kw)
    for b in ("weight", "bias", "running_mean", "running_var"):
      out[f"{name}.bn.{b}"] = (cout,)
  out["fc.weight"] = (NUM_CLASSES, 2048)
  out["fc.bias"] = (NUM_CLASSES,)
  return out


def convert_state_dict(state_dict):
  """FID Inception state dict (torch names -> numpy) -> JAX params. ``num_batches_tracked``
  buffers are dropped; a ValueError lists missing, unexpected or mis-shaped keys."""
  want = param_shapes()
  sd = {k: np.asarray(v, np.float32) for k, v in state_dict.items()
        if not k.endswith("num_batches_tracked") and not k.startswith("AuxLogits.")}
  missing, extra = sorted(set(want) - set(sd)), sorted(set(sd) - set(want))
  bad = sorted(k for k in set(want) & set(sd) if sd[k].shape != want[k])
  if missing or extra or bad:
    raise ValueError(f"Inception state dict does not match: missing {missing[:6]}, unexpected "
                     f"{extra[:6]}, wrong shape {[(k, sd[k].shape, want[k]) for k in bad[:4]]}")
  return {k: (np.transpose(v, (2, 3, 1, 0)) if v.ndim == 4 else v) for k, v in sd.items()}


def _basic(p, name, x):
  _, _, _, stride, pad = SPEC[name]
  y = jax.lax.conv_general_dilated(x, p[f"{name}.conv.weight"], (stride, stride),
                                   ((pad[0], pad[0]), (pad[1], pad[1])),
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                   precision=jax.lax.Precision.HIGHEST)
  scale = p[f"{name}.bn.weight"] * jax.lax.rsqrt(p[f"{name}.bn.running_var"] + 1e-3)
  return jax.nn.relu((y - p[f"{name}.bn.running_mean"]) * scale + p[f"{name}.bn.bias"])


def _max_pool(x, stride, pad):
  padding = ((0, 0), (pad, pad), (pad, pad), (0, 0))
  return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, stride, stride, 1),
                               padding)


def _avg_pool_exclude_pad(x):
  padding = ((0, 0), (1, 1), (1, 1), (0, 0))
  s = jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, 3, 3, 1), (1, 1, 1, 1), padding)
  n = jax.lax.reduce_window(jnp.ones(x.shape[:3] + (1,), x.dtype), 0.0, jax.lax.add,
                            (1, 3, 3, 1), (1, 1, 1, 1), padding)
  return s / n


def _mixed_a(p, m, x):
  b = lambda n, h: _basic(p, f"{m}.{n}", h)
  return jnp.concatenate([
      b("branch1x1", x), b("branch5x5_2", b("branch5x5_1", x)),
      b("branch3x3dbl_3", b("branch3x3dbl_2", b("branch3x3dbl_1", x))),
      b("branch_pool", _avg_pool_exclude_pad(x))], -1)


def _mixed_c(p, m, x):
  b = lambda n, h: _basic(p, f"{m}.{n}", h)
  y = b("branch7x7_3", b("branch7x7_2", b("branch7x7_1", x)))
  z = x
  for i in range(1, 6):
    z = b(f"branch7x7dbl_{i}", z)
  return jnp.concatenate([b("branch1x1", x), y, z, b("branch_pool", _avg_pool_exclude_pad(x))], -1)


def _mixed_e(p, m, x, max_pool):
  b = lambda n, h: _basic(p, f"{m}.{n}", h)
  y = b("branch3x3_1", x)
  z = b("branch3x3dbl_2", b("branch3x3dbl_1", x))
  pool = _max_pool(x, 1, 1) if max_pool else _avg_pool_exclude_pad(x)
  return jnp.concatenate([b("branch1x1", x), b("branch3x3_2a", y), b("branch3x3_2b", y),
                          b("branch3x3dbl_3a", z), b("branch3x3dbl_3b", z),
                          b("branch_pool", pool)], -1)


def features(p, images):
  """images [B, H, W, 3] (uint8 0..255, or float in [0, 1]) -> (pool3 [B, 2048], logits [B, 1008])."""
  x = jnp.asarray(images)
  x = x.astype(jnp.float32) / 255.0 if x.dtype == jnp.uint8 else x.astype(jnp.float32)
  x = jax.image.resize(x, (x.shape[0], 299, 299, 3), "bilinear", antialias=False)
  x = 2 * x - 1
  for name in ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3"):
    x = _basic(p, name, x)
  x = _max_pool(x, 2, 0)
  x = _basic(p, "Conv2d_4a_3x3", _basic(p, "Conv2d_3b_1x1", x))
  x = _max_pool(x, 2, 0)
  for m in ("Mixed_5b", "Mixed_5c", "Mixed_5d"):
    x = _mixed_a(p, m, x)
  x = jnp.concatenate([
      _basic(p, "Mixed_6a.branch3x3", x),
      _basic(p, "Mixed_6a.branch3x3dbl_3",
             _basic(p, "Mixed_6a.branch3x3dbl_2", _basic(p, "Mixed_6a.branch3x3dbl_1", x))),
      _max_pool(x, 2, 0)], -1)
  for m in ("Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e"):
    x = _mixed_c(p, m, x)
  b = lambda n, h: _basic(p, f"Mixed_7a.{n}", h)
  x = jnp.concatenate([
      b("branch3x3_2", b("branch3x3_1", x)),
      b("branch7x7x3_4", b("branch7x7x3_3", b("branch7x7x3_2", b("branch7x7x3_1", x)))),
      _max_pool(x, 2, 0)], -1)
  x = _mixed_e(p, "Mixed_7b", x, max_pool=False)
  x = _mixed_e(p, "Mixed_7c", x, max_pool=True)
  pool = jnp.mean(x, axis=(1, 2))
  logits = jnp.dot(pool, p["fc.weight"].T, precision="highest") + p["fc.bias"]
  return pool, logits


features_jit = jax.jit(features)


def extract(params, images, batch_size=100, progress=True):
  """Pool features and logits for uint8 images [N, H, W, 3] in batches (the last one padded)."""
  import sys
  images = np.asarray(images)
  feats, logits = [], []
  for i in range(0, len(images), batch_size):
    chunk = images[i:i + batch_size]
    pad = batch_size - len(chunk) if len(images) > batch_size else 0
    if pad:
      chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, 0)])
    f, l = features_jit(params, chunk)
    feats.append(np.asarray(f)[:len(chunk) - pad])
    logits.append(np.asarray(l)[:len(chunk) - pad])
    if progress:
      print(f"\rinception features {min(i + batch_size, len(images))}/{len(images)}", end="",
            file=sys.stderr, flush=True)
  if progress:
    print(file=sys.stderr)
  return np.concatenate(feats), np.concatenate(logits)
