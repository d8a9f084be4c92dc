"""LASADGen: LlamaGen's class-conditional backbone with LASAD (HGRN2-style gated linear) attention.

``config.attention = "softmax"`` builds LlamaGen itself (causal softmax attention with 2D RoPE and a
KV cache when decoding) in the same code, as the speed and quality baseline.

    model = LASADGen(get_config("B"), rngs=nnx.Rngs(0))
    logits = model(tokens, labels)             # [B, N, vocab]; logits[:, i] predicts tokens[:, i]

Input sequence: ``[class token] + tokens[:, :-1]`` (prefix 1). Layer parameters are stacked on a
leading layer axis and run with ``lax.scan``, so compile time does not grow with depth. The same
block code serves the parallel forward (``forward``) and the one-token decode step
(``decode_step``), which keeps only a [B, H, K, V] float32 state per layer.
"""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from kernels.lasad import decode as decode_kernel
from kernels.lasad import decode_mgpu
from kernels.lasad import decode_persistent
from kernels.lasad import reference
from kernels.norm import add_rms
from lasad_jax.ops import GATES, default_impl, hgrn2_attention
from lasad_jax import remat

PREFIX = 1  # one class token before the image tokens


def mlp_hidden(dim):
  """LlamaGen's SwiGLU width: 2/3 of 4*dim, rounded up to a multiple of 256."""
  hidden = int(2 * 4 * dim / 3)
  return 256 * -(-hidden // 256)


_rms = add_rms.rms_norm


def _lower_bounds(lb_param):
  """HGRN2's per-layer, per-channel forget-gate lower bound: 0 in layer 0, rising with depth."""
  sm = jax.nn.softmax(lb_param.astype(jnp.float32), axis=0)
  return jnp.cumsum(sm, axis=0) - sm[0]


def _boundary(cfg, p):
  mode = cfg.boundary
  if mode in ("carry", "none"):
    return jnp.zeros((cfg.num_heads,), jnp.float32)
  if mode == "reset":
    return jnp.full((cfg.num_heads,), -jnp.inf, jnp.float32)
  return jax.nn.log_sigmoid(p["boundary"].astype(jnp.float32))   # learned, <= 0


def _in_proj(p, h, names, dt):
  """h @ p[name] for each name; one matmul against ``p["w_in"]`` (the names' weights side by side,
  made by ``unstack_for_decode``) when present. h: one array, or a tuple of one copy per name
  (``add_rms``'s ``copies``: the norm's backward kernel sums their gradients itself)."""
  if "w_in" in p:
    return jnp.split(h @ p["w_in"].astype(dt), len(names), axis=-1)
  hs = h if isinstance(h, tuple) else (h,) * len(names)
  return [x @ p[n].astype(dt) for x, n in zip(hs, names)]


def _heads(cfg, x):
  return x.reshape(x.shape[:-1] + (cfg.num_heads, cfg.head_dim))


def _qkvg(cfg, p, lb, h):
  """HGRN2 projections for x [..., d] -> q, k, v, g [..., H, Dh] (g float32, unmasked)."""
  dt = jnp.dtype(cfg.dtype)
  q, f, v = _in_proj(p, h.astype(dt), ("wq", "wf", "wv"), dt)
  q, k, g = reference.hgrn2_gates(q, f, lb)
  return _heads(cfg, q), _heads(cfg, k), _heads(cfg, v), _heads(cfg, g)


def _attn_out(cfg, p, o, normed=False):
  """Per-head RMSNorm (unless ``normed``: the attention op normalised already), then the output
  projection. o [..., H, Dh]."""
  dt = jnp.dtype(cfg.dtype)
  # The norm runs on a [rows, Dh] view: on [B, T, H, Dh] XLA's GPU fusion tiled it [1, T, 1, Dh]
  # and moved 1.2 TB/s (LASADGen-L training, H100, session 11 profile).
  rows = o if normed else _rms(o.reshape(-1, o.shape[-1]), 1.0, cfg.norm_eps)
  # The norm's weight goes into the projection: (n * w) @ wo = n @ (w[:, None] * wo), so the
  # weight's gradient comes from wo's [d, d] gradient matmul (n^T g, computed anyway) instead of a
  # column sum over every row inside the norm's backward pass (LASADGen-L on an H100: that fusion
  # ran at 218 us per layer, 1.8 TB/s, session 21's profile).
  w_o = (p["head_norm"][:, None] * p["wo"]).astype(dt)
  return rows.reshape(o.shape[:-2] + (cfg.dim,)).astype(dt) @ w_o


def _mlp(cfg, p, x):
  """RMSNorm, then SwiGLU."""
  return _swiglu(cfg, p, _rms(x, p["ffn_norm"], cfg.norm_eps).astype(jnp.dtype(cfg.dtype)))


def _swiglu(cfg, p, h):
  """SwiGLU of the normed input h (one array, or a copy for w1 and one for w3); its two matmul
  operands are named for remat "dots_attn_acts" (identity elsewhere)."""
  dt = jnp.dtype(cfg.dtype)
  if isinstance(h, tuple):
    h1, h3 = (remat.checkpoint_name(x, "mlp_in") for x in h)
  else:
    h1 = h3 = remat.checkpoint_name(h, "mlp_in")
  if "w13" in p:
    a, b = jnp.split(h1 @ p["w13"].astype(dt), 2, axis=-1)
  else:
    a, b = h1 @ p["w1"].astype(dt), h3 @ p["w3"].astype(dt)
  return _swiglu_out(cfg, p, a, b)


def _swiglu_out(cfg, p, a, b):
  """silu(a) * b (named "mlp_act" for remat), then w2."""
  dt = jnp.dtype(cfg.dtype)
  return remat.checkpoint_name((jax.nn.silu(a) * b).astype(dt), "mlp_act") @ p["w2"].astype(dt)


def _mlp_split(cfg, p, x, splits):
  """``_mlp`` for one decode token with [w1 | w3] (``unstack_for_decode``'s ``w13``) as
  ``splits`` float32 partial products along the input, added in the same XLA fusion as
  ``silu(a) * b`` (config.decode_mlp_splits)."""
  dt = jnp.dtype(cfg.dtype)
  h = _rms(x, p["ffn_norm"], cfg.norm_eps).astype(dt)
  k = h.shape[-1] // splits
  parts = jnp.einsum("bsk,skn->sbn", h.reshape(-1, splits, k),
                     p["w13"].astype(dt).reshape(splits, k, -1),
                     preferred_element_type=jnp.float32)
  return _swiglu_out(cfg, p, *jnp.split(parts.sum(0), 2, axis=-1))


def rope_2d(pos, width, head_dim, base=10000.0):
  """LlamaGen's 2D rotary table for sequence positions ``pos`` [N] (int), as (cos, sin) [N, Dh/2].

  Image token p - 1 sits at (row, col) = divmod(p - 1, width); half the rotary pairs turn with the
  row, half with the column. Like LlamaGen, the class token (pos < PREFIX) gets cos = sin = 0.
  """
  half = head_dim // 2
  freqs = 1.0 / (base ** (jnp.arange(0, half, 2, dtype=jnp.float32)[: half // 2] / half))
  rel = pos - PREFIX
  row, col = rel // width, rel % width
  ang = jnp.concatenate([row[:, None] * freqs, col[:, None] * freqs], -1).astype(jnp.float32)
  live = (rel >= 0)[:, None]
  return jnp.where(live, jnp.cos(ang), 0.0), jnp.where(live, jnp.sin(ang), 0.0)


def _rotate(x, cos, sin):
  """Rotate pairs (x[2i], x[2i+1]) of x [..., N, H, Dh] by the table [N, Dh/2]."""
  xs = x.astype(jnp.float32).reshape(x.shape[:-1] + (-1, 2))
  c, s_ = cos[:, None, :], sin[:, None, :]
  out = jnp.stack([xs[..., 0] * c - xs[..., 1] * s_, xs[..., 1] * c + xs[..., 0] * s_], -1)
  return out.reshape(x.shape).astype(x.dtype)


def _softmax_qkv(cfg, p, h):
  dt = jnp.dtype(cfg.dtype)
  split = lambda x: x.reshape(x.shape[:-1] + (cfg.num_heads, cfg.head_dim))
  h = h if isinstance(h, tuple) else h.astype(dt)
  return tuple(split(y) for y in _in_proj(p, h, ("wq", "wk", "wv"), dt))


def _softmax_out(cfg, p, o):
  dt = jnp.dtype(cfg.dtype)
  return o.reshape(o.shape[:-2] + (cfg.dim,)).astype(dt) @ p["wo"].astype(dt)


# config.kernel_backward -> BlockSizes.fused_backward
KERNEL_BACKWARDS = {"auto": None, "fused": True, "unfused": False}


def _kernel_kw(cfg):
  """Pallas block sizes from config.kernel_chunk / kernel_sub / kernel_forward / kernel_dots /
  kernel_cumsum / kernel_save_states / kernel_backward / kernel_bwd_prefetch_qdq /
  kernel_bwd_dq_raw / kernel_bwd_norm / kernel_bwd_sub / kernel_{fwd,bwd}_{warps,maxnreg} ({} =
  the defaults)."""
  fields = {}
  chunk = cfg.get("kernel_chunk", 64)
  if chunk not in (32, 64, 128):
    raise ValueError(f"config.kernel_chunk must be 32, 64 or 128, got {chunk!r}")
  fields["chunk"] = chunk
  if "kernel_sub" in cfg:
    if cfg.kernel_sub not in (16, 32):
      raise ValueError(f"config.kernel_sub must be 16 or 32, got {cfg.kernel_sub}")
    fields["sub"] = cfg.kernel_sub
  mode = cfg.get("kernel_forward", "auto")
  if mode not in ("auto", "one_pass", "two_pass"):
    raise ValueError(f"config.kernel_forward must be 'auto', 'one_pass' or 'two_pass', got "
                     f"{mode!r}")
  if mode != "auto":
    fields["fused_forward"] = mode == "one_pass"
  dots = cfg.get("kernel_dots", "split")
  if dots not in ("split", "bf16"):
    raise ValueError(f"config.kernel_dots must be 'split' or 'bf16', got {dots!r}")
  fields["split_dots"] = dots == "split"
  from kernels.lasad.pallas import CUMSUM_MODES, MAXNREG_RANGE, BlockSizes
  cumsum = cfg.get("kernel_cumsum", "auto")
  if cumsum not in CUMSUM_MODES:
    raise ValueError(f"config.kernel_cumsum must be one of {CUMSUM_MODES}, got {cumsum!r}")
  fields["cumsum"] = cumsum
  if cfg.get("kernel_save_states", False):
    fields["save_states"] = True
  bwd = cfg.get("kernel_backward", "auto")
  if bwd not in KERNEL_BACKWARDS:
    raise ValueError(f"config.kernel_backward must be one of {tuple(KERNEL_BACKWARDS)}, got "
                     f"{bwd!r}")
  if bwd != "auto":
    fields["fused_backward"] = KERNEL_BACKWARDS[bwd]
  # the fused backward's options (BlockSizes.bwd_prefetch_qdq / bwd_dq_raw / bwd_norm); absent:
  # the defaults
  for key, field in (("kernel_bwd_prefetch_qdq", "bwd_prefetch_qdq"),
                     ("kernel_bwd_dq_raw", "bwd_dq_raw"), ("kernel_bwd_norm", "bwd_norm")):
    if key in cfg:
      if not isinstance(cfg[key], bool):
        raise ValueError(f"config.{key} must be True or False, got {cfg[key]!r}")
      fields[field] = cfg[key]
  if cfg.get("kernel_bwd_sub") is not None:   # the fused backward's rows per step
    if cfg.kernel_bwd_sub not in (16, 32):
      raise ValueError(f"config.kernel_bwd_sub must be None, 16 or 32, got {cfg.kernel_bwd_sub!r}")
    fields["bwd_sub"] = cfg.kernel_bwd_sub
  # warps and register caps of the one-pass forward and the fused backward (BlockSizes.
  # fused_num_warps / fused_maxnreg / grads_num_warps / bwd_maxnreg); None: BlockSizes' choice
  for key, field, allowed in (("kernel_fwd_warps", "fused_num_warps", (2, 4, 8)),
                              ("kernel_fwd_maxnreg", "fused_maxnreg", MAXNREG_RANGE),
                              ("kernel_bwd_warps", "grads_num_warps", (2, 4, 8)),
                              ("kernel_bwd_maxnreg", "bwd_maxnreg", MAXNREG_RANGE)):
    val = cfg.get(key)
    if val is None:
      continue
    if not isinstance(val, int) or val not in allowed:
      span = (f"{allowed.start}..{allowed.stop - 1}" if isinstance(allowed, range)
              else " or ".join(map(str, allowed)))
      raise ValueError(f"config.{key} must be None or {span}, got {val!r}")
    fields[field] = val
  if all(getattr(BlockSizes, k) == v for k, v in fields.items()):
    return {}
  return dict(block_sizes=BlockSizes(**fields))


def _kernel_gate(cfg):
  """config.kernel_gate: where the HGRN2 gates are computed (``ops.hgrn2_attention``'s gate)."""
  gate = cfg.get("kernel_gate", "auto")
  if gate not in GATES:
    raise ValueError(f"config.kernel_gate must be one of {GATES}, got {gate!r}")
  return gate


def kernel_head_norm(cfg):
  """Whether the Pallas forward kernel writes the attention output RMS-normalised per head
  (config.kernel_head_norm, default True; only where the gates run in the kernels, so on the
  jnp paths the model keeps its own norm and remat's saved values are unchanged there)."""
  if not cfg.get("kernel_head_norm", True) or cfg.attention != "lasad":
    return False
  gate = _kernel_gate(cfg)
  impl = default_impl() if cfg.get("impl", "auto") == "auto" else cfg.impl
  return gate == "kernel" or (gate == "auto" and impl == "pallas")


def forward(cfg, params, tokens, labels, width=None):
  """Parallel (teacher-forced) logits [B, N, vocab] float32 for image tokens [B, N]."""
  tokens = jnp.asarray(tokens, jnp.int32)
  x = jnp.concatenate([params["cls_emb"][labels][:, None], params["tok_emb"][tokens[:, :-1]]], 1)
  x = x.astype(jnp.float32)
  width = cfg.grid[1] if width is None else width
  lbs = _layer_bounds(cfg, params)

  if cfg.attention == "softmax":
    cos, sin = rope_2d(jnp.arange(x.shape[1]), width, cfg.head_dim)
  kernel_kw = _kernel_kw(cfg)

  # A residual add and the RMSNorm after it run as one op (config.fused_norm): always the FFN
  # norm after the attention's add; with the layers unrolled also the next block's attention norm
  # (the final norm after the last block) after the FFN's add, so the layers pass (x, h), h the
  # next block's normed input. Its gradient reads the block output, named "block_out", which
  # remat keeps anyway as the next block's input. In a lax.scan that saving would be a second
  # stacked copy of the carry (+6.4 GB for L at batch 256), so there the block ends with a plain
  # add and the next block starts with its norm, as before.
  add_norm = add_rms_impl(cfg)
  dt = jnp.dtype(cfg.dtype)
  eps = cfg.norm_eps
  blocks = params["blocks"]
  scan = cfg.get("scan_layers", True)

  # With the layers unrolled, each normed h goes to its matmuls as one copy per matmul (three for
  # the input projections, two for w1 / w3): the norm's backward kernel sums their gradients as it
  # reads them, instead of an XLA pass (add_rms's ``copies``; config.norm_copies, default True).
  # Only for the kernels (XLA's jnp path sums them inside its own fusion anyway) and not in a scan,
  # where remat would stack each copy it keeps.
  copies = (add_norm is add_rms.add_rms_pallas and not scan and cfg.get("norm_copies", True))
  n_attn, n_ffn = (3, 2) if copies else (1, 1)
  # The per-head norm of the attention output inside the forward kernel (its gradient reads the
  # normalised output and inverse rms, both kept under the name "attn_out").
  head_norm = kernel_head_norm(cfg)

  def layer(carry, xs, n_next):
    if scan:
      x, (p, lb) = carry, xs
      h = _rms(x, p["attn_norm"], eps).astype(dt)
    else:
      (x, h), (p, lb, w_next) = carry, xs
    # Only ever used as the input projections' bf16 operand; named for remat "dots_attn_acts".
    h = (tuple(remat.checkpoint_name(a, "attn_in") for a in h) if isinstance(h, tuple)
         else remat.checkpoint_name(h, "attn_in"))
    if cfg.attention == "softmax":
      q, k, v = _softmax_qkv(cfg, p, h)
      o = jax.nn.dot_product_attention(_rotate(q, cos, sin), _rotate(k, cos, sin), v,
                                       is_causal=True)
      o = remat.checkpoint_name(o, "attn_out")
      d_attn = _softmax_out(cfg, p, o)
    else:
      # The gates (reference.hgrn2_gates) run inside the Pallas kernels, or in XLA (config.
      # kernel_gate; hgrn2_attention).
      q_raw, f, v = _in_proj(p, h, ("wq", "wf", "wv"), dt)
      o = hgrn2_attention(_heads(cfg, q_raw), _heads(cfg, f), _heads(cfg, v),
                          lb.reshape(cfg.num_heads, cfg.head_dim),
                          width=None if cfg.boundary == "none" else width, prefix=PREFIX,
                          boundary=_boundary(cfg, p), scale=1.0, impl=cfg.impl,
                          gate=_kernel_gate(cfg), norm_eps=eps if head_norm else None,
                          norm_save="attn_out", **kernel_kw)
      if not head_norm:   # else the op's output is named "attn_out" already (naming it again
        o = remat.checkpoint_name(o, "attn_out")   # would stack it twice in a lax.scan)
      d_attn = _attn_out(cfg, p, o, normed=head_norm)
    x, h_ffn = add_norm(x, (d_attn,), p["ffn_norm"], eps, dt, None, n_ffn)
    d_ffn = _swiglu(cfg, p, h_ffn)
    if scan:
      return x + d_ffn.astype(jnp.float32), None
    # Naming the output keeps neither the mid-block x nor d_ffn for the norm's gradient (keeping
    # d_ffn: +3.2 GB for L at batch 256, out of memory on an H100, session 21).
    return add_norm(x, (d_ffn,), w_next, eps, dt, "block_out", n_next), None

  # config.remat / remat_policy (lasad_jax/remat.py); the last block's h goes to the head alone
  mid, last = (remat.wrap(functools.partial(layer, n_next=n), cfg) for n in (n_attn, 1))
  if scan:
    x, _ = jax.lax.scan(last, x, (blocks, lbs))
    return _logits(cfg, params, x)
  # Unrolled: one split per stacked array, not L slices: the gradient of L slices is a sum of L
  # padded slices, which XLA fused into a select chain at 0.35-0.95 TB/s (4.7 ms of LASADGen-L's
  # step on the H100); a split's gradient is one concatenation (BENCHMARKS.md session 13).
  next_norm = jnp.concatenate([blocks["attn_norm"][1:], params["norm"][None]], 0)
  leaves, tree = jax.tree.flatten((blocks, lbs, next_norm))
  parts = [jnp.split(a, cfg.num_layers) for a in leaves]
  carry = (x, _rms(x, blocks["attn_norm"][0], eps).astype(dt))
  for i in range(cfg.num_layers):
    fn = last if i == cfg.num_layers - 1 else mid
    carry, _ = fn(carry, tree.unflatten([p[i].reshape(a.shape[1:])
                                         for p, a in zip(parts, leaves)]))
  return _head(cfg, params, carry[1])


def add_rms_impl(cfg):
  """config.fused_norm -> the residual-add + RMSNorm op (kernels/norm/add_rms.py): "pallas" (one
  pass each way), "xla" (the same math in jnp), "auto" (pallas when config.impl resolves to the
  Pallas attention kernels, i.e. on a GPU, the layers are unrolled and the model dim has a
  power-of-two divisor >= 64). H100, batch 256, step ms xla -> pallas in one call each
  (BENCHMARKS.md session 21): L unrolled 361.8 -> 354.2; L in a scan, where only the FFN norm is
  fused, 426.2 -> 430.0 (so auto keeps xla there); B unrolled 129.7 -> 130.1."""
  mode = cfg.get("fused_norm", "auto")
  if mode not in add_rms.MODES:
    raise ValueError(f"config.fused_norm must be one of {add_rms.MODES}, got {mode!r}")
  if mode == "auto":
    impl = default_impl() if cfg.get("impl", "auto") == "auto" else cfg.impl
    unrolled = not cfg.get("scan_layers", True)
    mode = "pallas" if impl == "pallas" and unrolled and add_rms.supported(cfg.dim) else "xla"
  if mode == "xla":
    return add_rms.add_rms_reference
  if not add_rms.supported(cfg.dim):
    raise ValueError(f"config.fused_norm='pallas' needs a model dim with a power-of-two divisor "
                     f">= 64, got dim={cfg.dim}; use 'xla' or 'auto'")
  return add_rms.add_rms_pallas


def _logits(cfg, params, x):
  return _head(cfg, params, _rms(x, params["norm"], cfg.norm_eps).astype(jnp.dtype(cfg.dtype)))


def _head(cfg, params, h):
  """Logits [..., vocab] float32 from the final-normed h."""
  dt = jnp.dtype(cfg.dtype)
  return (h @ params["head"].astype(dt)).astype(jnp.float32)


def init_state(cfg, batch, max_len=None):
  """Decoder state. LASAD: one [B, H, K, V] float32 matrix per layer, independent of resolution.
  Softmax baseline: a KV cache [L, B, max_len, H, Dh] (x2), growing with the sequence."""
  if cfg.attention == "softmax":
    if max_len is None:
      raise ValueError("the softmax baseline's KV cache needs max_len (prefix + image tokens)")
    shape = (cfg.num_layers, batch, max_len, cfg.num_heads, cfg.head_dim)
    return (jnp.zeros(shape, jnp.dtype(cfg.dtype)), jnp.zeros(shape, jnp.dtype(cfg.dtype)))
  return jnp.zeros((cfg.num_layers, batch, cfg.num_heads, cfg.head_dim, cfg.head_dim), jnp.float32)


def _layer_bounds(cfg, params):
  if cfg.attention == "softmax":
    return jnp.zeros((cfg.num_layers,), jnp.float32)  # unused placeholder scanned with the layers
  return _lower_bounds(params["blocks"]["lower_bound"])


def embed(params, pos, labels, prev_tokens):
  """Input of position ``pos``: the class token at 0, else the previous image token."""
  cls = params["cls_emb"][labels]
  tok = params["tok_emb"][jnp.maximum(prev_tokens, 0)]
  return jnp.where(pos == 0, cls, tok).astype(jnp.float32)


DECODE_IMPLS = ("auto", "xla", "pallas", "persistent", "mosaic")


def decode_impl(cfg):
  """How the LASAD decode step runs (``config.decode_impl``): "xla"; "pallas", the attention core
  of each layer as one Pallas kernel (``kernels.lasad.decode``); "persistent", every layer of a
  token as one persistent Pallas kernel (``kernels.lasad.decode_persistent``; GPU, or one program
  in the interpreter); "mosaic", the same as one Mosaic GPU kernel (``kernels.lasad.decode_mgpu``;
  bf16, head_dim 64); "auto": "pallas" on a GPU, else "xla"."""
  impl = cfg.get("decode_impl", "auto")
  if impl not in DECODE_IMPLS:
    raise ValueError(f"config.decode_impl must be one of {' | '.join(DECODE_IMPLS)}, got {impl!r}")
  if impl == "auto":
    return "pallas" if jax.default_backend() == "gpu" and decode_kernel.supported(cfg.head_dim) \
        else "xla"
  if impl in ("pallas", "persistent") and not decode_kernel.supported(cfg.head_dim):
    raise ValueError(f"config.decode_impl={impl!r} needs head_dim a power of two >= 16, got "
                     f"{cfg.head_dim}; use 'xla'")
  if impl in ("persistent", "mosaic") and cfg.attention != "lasad":
    raise ValueError(f"config.decode_impl={impl!r} runs LASAD attention only; the softmax "
                     "baseline decodes with 'auto' or 'xla'")
  if impl == "mosaic":
    decode_mgpu.make_plan(layers=cfg.num_layers, batch=1, dim=cfg.dim, hidden=mlp_hidden(cfg.dim),
                          heads=cfg.num_heads, eps=cfg.norm_eps, nprog=1)   # raises if unfit
    if jnp.dtype(cfg.dtype) != jnp.bfloat16:
      raise ValueError(f"config.decode_impl='mosaic' computes in bfloat16; got config.dtype="
                       f"{cfg.dtype!r}")
    if jax.default_backend() == "gpu":
      decode_mgpu.check_device(jax.devices()[0])
  return impl


DECODE_NORMS = ("auto", "xla", "kernel")


def decode_norm_in_kernel(cfg):
  """Whether the Pallas decode kernel (decode_impl "pallas") applies its layer's attention
  RMSNorm scale itself (``config.decode_norm``): "kernel" (RMSNorm(x) @ W as
  rsqrt(mean(x^2) + eps) * ((x * w) @ W): the multiply fuses into the residual add before it, one
  XLA kernel fewer per layer; LASADGen-L's sampler 0.2121 -> 0.2059 s per 8 images on an H100,
  medians of 5 alternating runs, BENCHMARKS.md session 31); "xla", the norm before the projection
  as in the parallel forward; "auto" (the default): "kernel"."""
  mode = cfg.get("decode_norm", "auto")
  if mode not in DECODE_NORMS:
    raise ValueError(f"config.decode_norm must be one of {' | '.join(DECODE_NORMS)}, got {mode!r}")
  return mode in ("auto", "kernel")


def decode_in_splits(cfg):
  """``config.decode_in_splits``: 0, the decode kernel path's q | f | v projection is one matmul
  whose split XLA chooses (it adds the parts in a kernel of its own); S (a power of two dividing
  the model width), the projection is written as S partial products along its input, which the
  decode kernel adds: one XLA kernel fewer per layer. None (the default): 4 where it divides
  the width, else 0 (LASADGen-L's sampler on an H100: 0.205 / 0.197 / 0.198 s per 8 images for
  0 / 4 / 8, BENCHMARKS.md session 31; XLA splits that projection 4 ways itself)."""
  return _splits_option(cfg, "decode_in_splits")


def _splits_option(cfg, key):
  """A decode split count from config ``key``: None -> 4 where it divides the width, else 0;
  otherwise 0 or a power of two dividing the width."""
  n = cfg.get(key, None)
  if n is None:
    return 4 if cfg.dim % 4 == 0 else 0
  if not isinstance(n, int) or n < 0 or (n and (n & (n - 1) or cfg.dim % n)):
    raise ValueError(f"config.{key} must be None (auto), 0 or a power of two dividing dim "
                     f"{cfg.dim}, got {n!r}")
  return n


def decode_mlp_splits(cfg):
  """``config.decode_mlp_splits``: 0, the decode kernel path's [w1 | w3] matmul is one XLA GEMM
  with a bf16 result and ``silu(a) * b`` a kernel after it; S (a power of two dividing the model
  width), that matmul is written as S partial products along its input (float32), which the
  SwiGLU kernel adds before ``silu(a) * b``: XLA's GEMM gets S times the programs and no kernel
  is added. None (the default): 4 where it divides the width, else 0 (LASADGen-L's sampler on an
  H100: 0.196 / 0.199 / 0.196 s per 8 images for 0, 0.190 / 0.194 for 2, 0.191 / 0.192 for 4;
  BENCHMARKS.md session 32)."""
  return _splits_option(cfg, "decode_mlp_splits")


def use_decode_kernel(cfg):
  """Whether the LASAD decode step runs its attention core as one Pallas kernel per layer."""
  return decode_impl(cfg) == "pallas"


def _row_start(cfg, pos, width, batch):
  """[B] bool: position ``pos`` starts an image row (never with boundary "none")."""
  width = jnp.broadcast_to(jnp.asarray(width, jnp.int32), (batch,))
  rel = pos - PREFIX
  start = (rel >= width) & (jnp.remainder(rel, jnp.maximum(width, 1)) == 0)
  return jnp.zeros_like(start) if cfg.boundary == "none" else start


def decode_step(cfg, params, state, x, pos, width):
  """One token through every layer. x [B, d] input embedding at sequence position ``pos``.

  Returns (new state, logits [B, vocab] predicting image token ``pos``). With stacked params and
  state the layers run as a scan; with the per-layer lists of ``unstack_for_decode`` (the
  sampler) as one unrolled program per token.
  """
  width = jnp.broadcast_to(jnp.asarray(width, jnp.int32), (x.shape[0],))
  start = _row_start(cfg, pos, width, x.shape[0])
  lbs = None if "layers" in params else _layer_bounds(cfg, params)
  fused_kernel = cfg.attention == "lasad" and use_decode_kernel(cfg)
  if cfg.attention == "softmax":
    # One position for the whole batch: the width is the same for every row while sampling.
    cos, sin = rope_2d(jnp.reshape(pos, (1,)), width[0], cfg.head_dim)

  norm_in_kernel = decode_norm_in_kernel(cfg) and fused_kernel
  in_splits = decode_in_splits(cfg)   # (checked on every path)
  mlp_splits = decode_mlp_splits(cfg)
  if not fused_kernel:
    in_splits = mlp_splits = 0

  def layer(x, xs):
    p, lb, s = xs
    # (with norm_in_kernel, the decode kernel applies the norm's per-row scale itself)
    h = x * p["attn_norm"] if norm_in_kernel else _rms(x, p["attn_norm"], cfg.norm_eps)
    if cfg.attention == "softmax":
      kc, vc = s
      q, k, v = _softmax_qkv(cfg, p, h[:, None])
      q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
      kc = jax.lax.dynamic_update_slice_in_dim(kc, k.astype(kc.dtype), pos, axis=1)
      vc = jax.lax.dynamic_update_slice_in_dim(vc, v.astype(vc.dtype), pos, axis=1)
      seen = jnp.arange(kc.shape[1]) <= pos
      o = jax.nn.dot_product_attention(q, kc, vc, mask=seen[None, None, None, :])
      x = x + _softmax_out(cfg, p, o[:, 0]).astype(jnp.float32)
      s = (kc, vc)
    elif fused_kernel:   # one Pallas kernel from the projections to the normalised o
      dt = jnp.dtype(cfg.dtype)
      nh, hd = cfg.num_heads, cfg.head_dim
      if in_splits and "w_in" in p:   # S partial sums of the projection, added in the kernel
        k = x.shape[-1] // in_splits
        y = jnp.einsum("bsk,skn->sbn", h.astype(dt).reshape(-1, in_splits, k),
                       p["w_in"].astype(dt).reshape(in_splits, k, -1),
                       preferred_element_type=jnp.float32).reshape(in_splits, -1, 3, nh, hd)
      else:
        y = jnp.concatenate(_in_proj(p, h.astype(dt), ("wq", "wf", "wv"), dt), axis=-1)
        y = y.reshape(-1, 3, nh, hd)
      norm = dict(x=x, norm_eps=cfg.norm_eps) if norm_in_kernel else {}
      o, s = decode_kernel.decode_attention(
          y, s, lb.reshape(nh, hd), start, _boundary(cfg, p), p["head_norm"].reshape(nh, hd),
          eps=cfg.norm_eps, dtype=dt, **norm)
      x = x + (o.reshape(-1, cfg.dim) @ p["wo"].astype(dt)).astype(jnp.float32)
    else:
      q, k, v, g = _qkvg(cfg, p, lb, h)
      bnd = _boundary(cfg, p)[None, :, None]
      g = jnp.where(start[:, None, None], bnd, g)
      s, o = reference.recurrent_step(s, q, k, v, g, 1.0)
      x = x + _attn_out(cfg, p, o).astype(jnp.float32)
    if mlp_splits and "w13" in p:
      return x + _mlp_split(cfg, p, x, mlp_splits).astype(jnp.float32), s
    return x + _mlp(cfg, p, x).astype(jnp.float32), s

  if "layers" in params:   # per-layer weights and states (see unstack_for_decode)
    new = []
    for (p, lb), s in zip(params["layers"], state):
      x, s = layer(x, (p, lb, s))
      new.append(s)
    return new, _logits(cfg, params, x)
  x, state = jax.lax.scan(layer, x, (params["blocks"], lbs, state))
  return state, _logits(cfg, params, x)


def unstack_for_decode(cfg, params, state, fuse=True):
  """Per-layer copies of the stacked weights, layer bounds and decoder state, made once per
  sampling call: inside the token loop, slicing layer i out of the stacked [L, ...] arrays is a
  copy of its weights per token (XLA:CPU's compiled sampler showed these slice fusions in the loop
  body). ``decode_step`` walks the lists instead. With ``fuse`` each layer's input projections
  (q|f|v, or q|k|v for softmax) and the MLP's w1|w3 are also laid side by side once, so a token
  runs one matmul for each group instead of three and two. Returns (params, state as a list)."""
  L = cfg.num_layers
  lbs = _layer_bounds(cfg, params)
  names = ("wq", "wk", "wv") if cfg.attention == "softmax" else ("wq", "wf", "wv")

  def one(i):
    p = jax.tree.map(lambda a: a[i], params["blocks"])
    if fuse:
      p["w_in"] = jnp.concatenate([p.pop(n) for n in names], axis=-1)
      p["w13"] = jnp.concatenate([p.pop("w1"), p.pop("w3")], axis=-1)
    return p

  layers = [(one(i), lbs[i]) for i in range(L)]
  rest = {k: v for k, v in params.items() if k != "blocks"}
  return {**rest, "layers": layers}, [jax.tree.map(lambda a, i=i: a[i], state) for i in range(L)]


def persistent_params(cfg, params):
  """The stacked per-layer arrays ``decode_step_persistent`` takes, made once per sampling call
  from compute-dtype params (``cast_for_compute``): [wq | wf | wv] and [w1 | w3] side by side,
  each layer's forget-gate lower bounds and row-start boundary decays. For "mosaic", w1 | w3 in
  ``decode_mgpu.interleave_w13``'s column order."""
  blk = params["blocks"]
  lbs = _layer_bounds(cfg, params)
  bnd = jax.vmap(lambda b: _boundary(cfg, {"boundary": b}))(blk["boundary"])
  w13 = jnp.concatenate([blk["w1"], blk["w3"]], axis=-1)
  if decode_impl(cfg) == "mosaic":
    w13 = decode_mgpu.interleave_w13(w13, mlp_hidden(cfg.dim))
  return {**{k: v for k, v in params.items() if k != "blocks"},
          "w_in": jnp.concatenate([blk["wq"], blk["wf"], blk["wv"]], axis=-1), "w13": w13,
          "wo": blk["wo"], "w2": blk["w2"], "attn_norm": blk["attn_norm"],
          "ffn_norm": blk["ffn_norm"], "head_norm": blk["head_norm"], "lb": lbs, "bnd": bnd}


def decode_step_persistent(cfg, kp, state, x, pos, width):
  """``decode_step`` for LASAD with every layer in one persistent kernel. kp from
  ``persistent_params``, state [L, B, H, K, V] ([L, B, H, V, K] for "mosaic", whose kernel keeps
  each state transposed; both start at zero). Returns (state, logits, barrier timeouts: nonzero
  means the kernel's programs were not all resident and the step is wrong)."""
  b = x.shape[0]
  interpret = jax.default_backend() != "gpu"
  nprog = 1 if interpret else getattr(jax.devices()[0], "core_count", 132)
  if decode_impl(cfg) == "mosaic":
    plan = decode_mgpu.make_plan(layers=cfg.num_layers, batch=b, dim=cfg.dim,
                                 hidden=mlp_hidden(cfg.dim), heads=cfg.num_heads,
                                 eps=cfg.norm_eps, nprog=nprog)
    x, state = decode_mgpu.decode_layers(
        x, state, kp["w_in"], kp["wo"], kp["w13"], kp["w2"], kp["attn_norm"], kp["ffn_norm"], kp["head_norm"], kp["lb"], kp["bnd"],
        _row_start(cfg, pos, width, b), plan=plan, interpret=interpret)
    return state, _logits(cfg, kp, x), jnp.int32(0)   # (its waits have no time limit)
  plan = decode_persistent.make_plan(layers=cfg.num_layers, batch=b, dim=cfg.dim,
                                     hidden=mlp_hidden(cfg.dim), heads=cfg.num_heads,
                                     head_dim=cfg.head_dim, eps=cfg.norm_eps, nprog=nprog)
  x, state, fails = decode_persistent.decode_layers(
      x, state, kp["w_in"], kp["wo"], kp["w13"], kp["w2"], kp["attn_norm"], kp["ffn_norm"],
      kp["head_norm"], kp["lb"], kp["bnd"], _row_start(cfg, pos, width, b), plan=plan,
      interpret=interpret)
  return state, _logits(cfg, kp, x), fails


MATMUL_WEIGHTS = ("wq", "wk", "wv", "wf", "wo", "w1", "w2", "w3")


def cast_for_compute(cfg, params):
  """Matmul weights in the compute dtype (they are only ever used cast to it, so results are
  bit-identical); norms, gates, boundaries and embeddings stay float32. For decoding, where
  reading float32 weights for every token would double the bytes moved."""
  dt = jnp.dtype(cfg.dtype)
  blocks = {k: (v.astype(dt) if k in MATMUL_WEIGHTS else v) for k, v in params["blocks"].items()}
  return {**params, "blocks": blocks, "head": params["head"].astype(dt)}


class LASADGen(nnx.Module):
  """Holds the parameters; ``__call__`` is the parallel forward. See module docstring."""

  def __init__(self, config, *, rngs: nnx.Rngs):
    if config.attention not in ("lasad", "softmax"):
      raise ValueError(f"config.attention must be 'lasad' or 'softmax', got {config.attention!r}")
    if config.boundary not in ("carry", "reset", "none", "learned"):
      raise ValueError(f"config.boundary must be carry | reset | none | learned, got "
                       f"{config.boundary!r}")
    self.config = ml_collections.FrozenConfigDict(config)  # hashable: a static jit argument
    c = self.config
    L, d, hid = c.num_layers, c.dim, mlp_hidden(c.dim)
    init = nnx.initializers.normal(0.02)

    def w(*shape):
      return nnx.Param(init(rngs.params(), shape, jnp.float32))

    self.tok_emb = w(c.vocab_size, d)
    self.cls_emb = w(c.num_classes + 1, d)      # last row: the null class for CFG
    self.norm = nnx.Param(jnp.ones((d,), jnp.float32))
    self.head = w(d, c.vocab_size)
    common = dict(attn_norm=nnx.Param(jnp.ones((L, d), jnp.float32)),
                  wq=w(L, d, d), wv=w(L, d, d), wo=w(L, d, d),
                  ffn_norm=nnx.Param(jnp.ones((L, d), jnp.float32)),
                  w1=w(L, d, hid), w3=w(L, d, hid), w2=w(L, hid, d))
    if c.attention == "softmax":   # LlamaGen: causal softmax attention with 2D RoPE
      self.blocks = nnx.Dict(wk=w(L, d, d), **common)
    else:                          # HGRN2-style LASAD attention
      self.blocks = nnx.Dict(
          wf=w(L, d, d), head_norm=nnx.Param(jnp.ones((L, d), jnp.float32)),
          lower_bound=nnx.Param(jnp.ones((L, d), jnp.float32)),
          boundary=nnx.Param(jnp.full((L, c.num_heads), 3.0, jnp.float32)),  # log-sigmoid -0.05
          **common)

  def params(self):
    """Plain dict of arrays for the pure functions above."""
    return nnx.to_pure_dict(nnx.state(self, nnx.Param))

  def __call__(self, tokens, labels, width=None):
    check_inputs(self.config, tokens, labels, width)
    return forward(self.config, self.params(), tokens, labels, width)


def check_inputs(cfg, tokens, labels, width):
  """Clear errors for concrete bad input (traced values pass through unchecked)."""
  if tokens is not None:
    t = jnp.asarray(tokens)
    if t.ndim != 2 or not jnp.issubdtype(t.dtype, jnp.integer):
      raise ValueError(f"`tokens` must be int [B, N] image tokens, got {t.dtype} {t.shape}.")
    if not isinstance(t, jax.core.Tracer) and t.size and (
        int(np.min(t)) < 0 or int(np.max(t)) >= cfg.vocab_size):
      raise ValueError(f"`tokens` must be in [0, {cfg.vocab_size}) (the codebook size), got "
                       f"values in [{int(np.min(t))}, {int(np.max(t))}].")
  lab = jnp.asarray(labels)
  if lab.ndim != 1 or not jnp.issubdtype(lab.dtype, jnp.integer):
    raise ValueError(f"`labels` must be int [B], got {lab.dtype} {lab.shape}.")
  if not isinstance(lab, jax.core.Tracer) and lab.size and (
      int(np.min(lab)) < 0 or int(np.max(lab)) > cfg.num_classes):
    raise ValueError(f"`labels` must be in [0, {cfg.num_classes}] ({cfg.num_classes} = the null "
                     f"class for guidance), got {np.asarray(lab).tolist()}.")
  if tokens is not None and lab.shape[0] != jnp.shape(tokens)[0]:
    raise ValueError(f"`labels` has {lab.shape[0]} rows but `tokens` has {jnp.shape(tokens)[0]}.")
  if width is not None and not isinstance(width, jax.core.Tracer):
    w = np.asarray(width)
    if w.size and int(w.min()) <= 0:
      raise ValueError(f"`width` (tokens per image row) must be positive, got {w.tolist()}.")


def count_params(config):
  """Parameter count from abstract shapes (nothing is allocated)."""
  abstract = nnx.eval_shape(lambda: LASADGen(config, rngs=nnx.Rngs(0)))
  leaves = jax.tree.leaves(nnx.state(abstract, nnx.Param))
  total = sum(int(x.size) for x in leaves)
  # The learned boundary logits exist in every config but are used only by boundary="learned".
  if config.attention == "lasad" and config.boundary != "learned":
    total -= config.num_layers * config.num_heads
  return total
