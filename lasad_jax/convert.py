"""PyTorch state dict -> LASADGen / LlamaGen parameters (``model.params()`` structure).

    params = convert_state_dict(torch_io.load_state_dict("ckpt.pt"), config)
    load_params(model, params)

A table of name mappings plus transposes (torch Linear stores [out, in]; we store [in, out]).
Source names: LlamaGen's gpt.py (``tok_embeddings``, ``cls_embedding.embedding_table``,
``layers.N.attention_norm`` ...) with fla's HGRN2 projections for LASAD attention
(``q_proj, f_proj, i_proj, g_norm, o_proj``, model-level ``lower_bounds``), or LlamaGen's own
``wqkv``/``wo`` for ``attention="softmax"``. Unmatched or missing keys and wrong shapes raise a
``ValueError`` that lists them all.
"""

import numpy as np
from flax import nnx

from lasad_jax import model as M

BOUNDARY_INIT = 3.0  # LASADGen's init of the learned boundary logits (log-sigmoid: -0.05)


def _table(cfg):
  """[(torch name, (path in params), layer index or None, transform)]."""
  T = lambda w: w.T
  same = lambda w: w
  rows = [("tok_embeddings.weight", ("tok_emb",), None, same),
          ("cls_embedding.embedding_table.weight", ("cls_emb",), None, same),
          ("norm.weight", ("norm",), None, same),
          ("output.weight", ("head",), None, T)]
  for i in range(cfg.num_layers):
    p = f"layers.{i}."
    rows += [(p + "attention_norm.weight", ("blocks", "attn_norm"), i, same),
             (p + "ffn_norm.weight", ("blocks", "ffn_norm"), i, same),
             (p + "feed_forward.w1.weight", ("blocks", "w1"), i, T),
             (p + "feed_forward.w3.weight", ("blocks", "w3"), i, T),
             (p + "feed_forward.w2.weight", ("blocks", "w2"), i, T)]
    if cfg.attention == "softmax":
      rows += [(p + "attention.wo.weight", ("blocks", "wo"), i, T)]
    else:
      rows += [(p + "attention.q_proj.weight", ("blocks", "wq"), i, T),
               (p + "attention.f_proj.weight", ("blocks", "wf"), i, T),
               (p + "attention.i_proj.weight", ("blocks", "wv"), i, T),
               (p + "attention.o_proj.weight", ("blocks", "wo"), i, T),
               (p + "attention.g_norm.weight", ("blocks", "head_norm"), i, same)]
      if cfg.boundary == "learned":
        rows += [(p + "attention.boundary_logit", ("blocks", "boundary"), i, same)]
  if cfg.attention != "softmax":
    rows += [("lower_bounds", ("blocks", "lower_bound"), None, same)]
  return rows


def convert_state_dict(state_dict, config, reference_params=None):
  """Map a torch state dict ({name: np.ndarray}) onto the parameter dict of ``LASADGen(config)``.

  ``reference_params`` (default: a fresh model's, from abstract shapes) gives the target shapes.
  The one parameter a source may lack, the boundary logits of a non-learned model (unused
  there), gets its init value ``BOUNDARY_INIT``.
  """
  cfg = config
  if reference_params is None:
    abstract = nnx.eval_shape(lambda: M.LASADGen(cfg, rngs=nnx.Rngs(0)))
    reference_params = nnx.to_pure_dict(nnx.state(abstract, nnx.Param))
  out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in reference_params.items()}
  blocks = {k: np.zeros(v.shape, np.float32) for k, v in out["blocks"].items()}
  filled = {k: np.zeros(v.shape[0], bool) for k, v in blocks.items()}
  errors, used = [], set()
  sd = {k: np.asarray(v, np.float32) for k, v in state_dict.items()}
  if cfg.attention == "softmax":  # LlamaGen packs q, k, v in one matrix
    for i in range(cfg.num_layers):
      name = f"layers.{i}.attention.wqkv.weight"
      if name in sd:
        used.add(name)
        for part, key in zip(np.split(sd[name], 3, axis=0), ("wq", "wk", "wv")):
          _put(blocks, filled, key, i, part.T, name, errors)
  for name, path, layer, fn in _table(cfg):
    if name not in sd:
      continue
    used.add(name)
    val = fn(sd[name])
    if path[0] == "blocks":
      _put(blocks, filled, path[1], layer, val, name, errors)
    else:
      want = tuple(out[path[0]].shape)
      if val.shape != want:
        errors.append(f"{name}: shape {val.shape} (after transpose) but {path[0]} needs {want}")
      else:
        out[path[0]] = val
  missing = [n for n, path, _, _ in _table(cfg) if n not in sd]
  if cfg.attention == "softmax":
    missing += [f"layers.{i}.attention.wqkv.weight" for i in range(cfg.num_layers)
                if f"layers.{i}.attention.wqkv.weight" not in sd]
  unused = sorted(k for k in state_dict if k not in used)
  if errors or missing or unused:
    msg = [f"cannot convert the state dict to LASADGen({cfg.variant}, attention={cfg.attention},"
           f" boundary={cfg.boundary}):"]
    msg += [f"  shape: {e}" for e in errors]
    msg += [f"  missing in the checkpoint: {m}" for m in missing[:50]]
    msg += [f"  not used (unknown name): {u}" for u in unused[:50]]
    raise ValueError("\n".join(msg))
  for k, arr in blocks.items():
    if not filled[k].all():
      # Only the boundary logits of a non-learned model can be absent (they are unused there):
      # give them their init value.
      arr[~filled[k]] = BOUNDARY_INIT
  out["blocks"] = blocks
  return out


def _put(blocks, filled, key, layer, val, name, errors):
  want = blocks[key].shape if layer is None else blocks[key].shape[1:]
  if tuple(val.shape) != tuple(want):
    errors.append(f"{name}: shape {tuple(val.shape)} (after transpose) but blocks.{key} needs "
                  f"{tuple(want)}")
    return
  if layer is None:
    blocks[key][...] = val
    filled[key][:] = True
  else:
    blocks[key][layer] = val
    filled[key][layer] = True


def load_params(model, params):
  """Write a converted parameter dict into an NNX model in place."""
  state = nnx.state(model, nnx.Param)
  nnx.replace_by_pure_dict(state, params)
  nnx.update(model, state)
  return model
