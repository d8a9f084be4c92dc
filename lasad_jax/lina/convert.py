"""LINA PyTorch state dict -> parameters of :mod:`lasad_jax.lina.model`.

    from lasad_jax import torch_io
    params = convert_state_dict(torch_io.load_state_dict("lina.pt"), config)

Source names: LINA's ``NOVATransformer3DModel`` (``video_encoder`` = class encoder, ``image_encoder``
= image transformer, ``image_decoder`` = diffusion head, ``mask_embed``, ``label_embed``,
``video_pos_embed``). Linear weights are transposed ([out, in] -> [in, out]); 1x1 patch convs
become matrices, the depthwise 5x5 conv [D, 1, 5, 5] -> [5, 5, D], the KV gates [1, H, N, 1] ->
[H, N]. Parts the class-conditional image model never runs (the class encoder's patch embedding,
motion/text embeddings, image_pos_embed) are skipped and named in ``IGNORED_PREFIXES``. Missing,
unexpected or mis-shaped keys raise one ``ValueError`` that lists them all.
"""

import numpy as np

from lasad_jax.lina import model as M

IGNORED_PREFIXES = ("video_encoder.patch_embed.", "motion_embed.", "text_embed.",
                    "image_pos_embed.", "video_encoder.mixer.")

T = lambda w: w.T
same = lambda w: w
flat = lambda w: w.reshape(-1)
conv1x1 = lambda w: w[:, :, 0, 0].T
dwconv = lambda w: np.transpose(w[:, 0], (1, 2, 0))
gate = lambda w: w[0, :, :, 0]


def _linear(src, dst, layer=None):
  return [(src + ".weight", dst + ("_w",), layer, T), (src + ".bias", dst + ("_b",), layer, same)]


def _norm(src, dst, layer=None):
  return [(src + ".weight", dst + ("_w",), layer, same), (src + ".bias", dst + ("_b",), layer, same)]


def _block(src, group, i, decoder):
  rows = (_norm(src + "norm1", (group, "norm1"), i) + _norm(src + "norm2", (group, "norm2"), i)
          + _linear(src + "attn.qkv", (group, "qkv"), i) + _linear(src + "attn.proj", (group, "proj"), i)
          + _linear(src + "mlp.fc1", (group, "fc1"), i) + _linear(src + "mlp.fc2", (group, "fc2"), i))
  if decoder:
    rows += [(src + "attn.dw_conv.weight", (group, "conv_w"), i, dwconv),
             (src + "attn.dw_conv.bias", (group, "conv_b"), i, same),
             (src + "attn.key_scale", (group, "key_scale"), i, gate),
             (src + "attn.value_scale", (group, "value_scale"), i, gate)]
  return rows


def table(cfg):
  """[(torch key, path in params (last part joined with '_'), layer or None, transform)]."""
  rows = [("label_embed.weight", ("label_table",), None, same),
          ("mask_embed.bos_token", ("bos",), None, flat),
          ("mask_embed.mask_token", ("mask_token",), None, flat),
          ("image_encoder.patch_embed.proj.weight", ("patch_w",), None, conv1x1),
          ("image_encoder.patch_embed.proj.bias", ("patch_b",), None, same)]
  rows += _norm("label_embed.norm", ("label_norm",)) + _norm("video_pos_embed.norm", ("time_norm",))
  rows += _linear("video_pos_embed.time_proj.0", ("time_fc1",))
  rows += _linear("video_pos_embed.time_proj.2", ("time_fc2",))
  rows += _norm("video_encoder.norm", ("class_norm",)) + _norm("image_encoder.norm", ("norm",))
  for i in range(cfg.class_depth):
    rows += _block(f"video_encoder.blocks.{i}.", "class_blocks", i, False)
  for i in range(cfg.image_depth):
    dec = i >= cfg.encoder_depth
    rows += _block(f"image_encoder.blocks.{i}.", "dec_blocks" if dec else "enc_blocks",
                   i - cfg.encoder_depth if dec else i, dec)
  h = "image_decoder."
  rows += [(h + "patch_embed.proj.weight", ("head", "in_w"), None, conv1x1),
           (h + "patch_embed.proj.bias", ("head", "in_b"), None, same)]
  tc = h + "time_cond_embed."
  rows += (_linear(tc + "timestep_proj.fc1", ("head", "t_fc1")) + _linear(tc + "timestep_proj.fc2", ("head", "t_fc2"))
           + _linear(tc + "condition_proj.fc1", ("head", "z_fc1"))
           + _linear(tc + "condition_proj.fc2", ("head", "z_fc2"))
           + _linear(h + "norm.proj", ("head", "final_ada")) + _linear(h + "head", ("head", "out")))
  for i in range(cfg.head_depth):
    b = f"{h}blocks.{i}."
    rows += (_linear(b + "norm1.proj", ("head", "blocks", "ada"), i)
             + _linear(b + "proj.fc1", ("head", "blocks", "fc1"), i)
             + _linear(b + "proj.fc2", ("head", "blocks", "fc2"), i)
             + _norm(b + "norm2", ("head", "blocks", "norm"), i))
  return rows


def _resolve(path):
  """('class_blocks', 'norm1', '_w') -> ('class_blocks', 'norm1_w'); ('patch_w',) stays."""
  if path[-1] in ("_w", "_b"):
    return path[:-2] + (path[-2] + path[-1],)
  return path


def convert_state_dict(state_dict, config):
  """Map ``state_dict`` ({key: array}) onto LINA(config)'s parameter dict (float32 numpy)."""
  shapes = M.param_shapes(config)
  out = {}

  def slot(path):
    node_s, node_o = shapes, out
    for k in path[:-1]:
      node_s = node_s[k]
      node_o = node_o.setdefault(k, {})
    return node_s[path[-1]], node_o, path[-1]

  errors, filled, seen = [], {}, set()
  for key, path, layer, fn in table(config):
    path = _resolve(path)
    if key not in state_dict:
      errors.append(f"missing {key}")
      continue
    seen.add(key)
    val = np.asarray(fn(np.asarray(state_dict[key], np.float32)), np.float32)
    shape, node, name = slot(path)
    want = shape if layer is None else shape[1:]
    if tuple(val.shape) != tuple(want):
      errors.append(f"{key}: shape {tuple(val.shape)} does not fit {'.'.join(path)} {tuple(want)}")
      continue
    if layer is None:
      node[name] = val
    else:
      if name not in node:
        node[name] = np.zeros(shape, np.float32)
        filled[path] = set()
      node[name][layer] = val
      filled[path].add(layer)
  unexpected = sorted(k for k in state_dict if k not in seen and not k.startswith(IGNORED_PREFIXES))
  errors += [f"unexpected {k}" for k in unexpected]
  if errors:
    raise ValueError(f"LINA state dict does not match config {getattr(config, 'variant', '')!r} "
                     f"({len(errors)} problems):\n  " + "\n  ".join(errors))
  return out
