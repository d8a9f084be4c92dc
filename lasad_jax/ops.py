"""``lasad_attention``: the one public entry point of the LASAD operator (DESIGN.md §1).

    S_t = diag(exp(g~_t)) S_{t-1} + k_t^T v_t,     o_t = scale * q_t S_t

where ``g~`` is ``g`` with the Spatial-Aware Decay row mask applied: at every row start
(``t >= prefix + width`` and ``(t - prefix) % width == 0``) the log decay becomes ``boundary``.
"""

import numbers

import jax
import jax.numpy as jnp
import numpy as np

from kernels.lasad.chunk import lasad_chunk
from kernels.lasad.reference import hgrn2_gates, lasad_reference
from kernels.norm.add_rms import rms_norm
from lasad_jax.lina.attention import lina_attention  # noqa: F401  (LINA's operator, beside ours)
from lasad_jax.sharding import over_batch

IMPLS = ("auto", "reference", "chunk", "pallas")


def _is_concrete(x):
  return not isinstance(x, jax.core.Tracer)


def _int_arg(name, x, batch, minimum):
  """Scalar or [B] int32 array -> int32 [1] (one value for every row) or [B]; concrete values
  must be >= minimum."""
  if isinstance(x, bool) or (isinstance(x, numbers.Number) and not isinstance(x, numbers.Integral)):
    raise ValueError(f"`{name}` must be an int or an int32 array of shape [B], got {x!r}.")
  arr = jnp.asarray(x)
  if not jnp.issubdtype(arr.dtype, jnp.integer):
    raise ValueError(f"`{name}` must have an integer dtype, got {arr.dtype}.")
  if arr.ndim not in (0, 1) or (arr.ndim == 1 and arr.shape[0] not in (1, batch)):
    raise ValueError(f"`{name}` must be a scalar or have shape [B] = [{batch}], got shape "
                     f"{arr.shape}.")
  if _is_concrete(arr) and arr.size and int(np.min(np.asarray(arr))) < minimum:
    what = "positive (the number of tokens per image row)" if minimum == 1 else (
        "non-negative (the number of condition tokens before the image)")
    raise ValueError(f"`{name}` must be {what}, got {np.asarray(arr).tolist()}.")
  return arr.astype(jnp.int32).reshape(-1)


def _validate(q, k, v, g, boundary, initial_state):
  for name, x in (("q", q), ("k", k), ("v", v), ("g", g)):
    if not hasattr(x, "ndim") or x.ndim != 4:
      raise ValueError(f"`{name}` must have rank 4 ([B, T, H, D]), got shape "
                       f"{getattr(x, 'shape', type(x).__name__)}.")
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise ValueError(f"`{name}` must be a floating dtype (float32 or bfloat16), got {x.dtype}; "
                       "cast it with .astype(jnp.float32).")
  if k.shape != q.shape:
    raise ValueError(f"`k` must have the shape of `q` [B, T, H, K] = {q.shape}, got {k.shape} "
                     "(the key dim K of q and k must match).")
  if g.shape != q.shape:
    raise ValueError(f"`g` (per-channel log forget gate) must have the shape of `q` {q.shape}, "
                     f"got {g.shape}.")
  if v.shape[:3] != q.shape[:3]:
    raise ValueError(f"`v` must share [B, T, H] = {q.shape[:3]} with `q`, got {v.shape}.")
  batch, _, heads, dk = q.shape
  dv = v.shape[-1]
  if initial_state is not None:
    if not hasattr(initial_state, "shape") or tuple(initial_state.shape) != (batch, heads, dk, dv):
      raise ValueError(f"`initial_state` must have shape [B, H, K, V] = {(batch, heads, dk, dv)}, "
                       f"got {getattr(initial_state, 'shape', None)}.")
    if not jnp.issubdtype(initial_state.dtype, jnp.floating):
      raise ValueError(f"`initial_state` must be floating (float32), got {initial_state.dtype}.")
  b = jnp.asarray(boundary)
  if not jnp.issubdtype(b.dtype, jnp.floating) and not jnp.issubdtype(b.dtype, jnp.integer):
    raise ValueError(f"`boundary` must be a float or a float array of shape [H], got {b.dtype}.")
  if b.ndim not in (0, 1) or (b.ndim == 1 and b.shape[0] not in (1, heads)):
    raise ValueError(f"`boundary` must be a scalar or have shape [H] = [{heads}], got {b.shape}.")
  if _is_concrete(b) and b.size and bool(np.any(np.asarray(b, np.float32) > 0)):
    raise ValueError(f"`boundary` is a log decay and must be <= 0 (0 = carry, -inf = reset), got "
                     f"{np.asarray(b).tolist()}.")
  if _is_concrete(b) and b.size and bool(np.any(np.isnan(np.asarray(b, np.float32)))):
    raise ValueError("`boundary` contains NaN.")
  return b.astype(jnp.float32).reshape(-1)


def _operator_args(q, k, v, g, width, prefix, boundary, scale, initial_state):
  """Checked operator inputs: ((q, k, v, g, width [B] or [1], prefix [B] or [1], boundary [H] or
  [1], float32 initial state or None), use_mask, scale as a float (None: K**-0.5)). The Pallas
  kernels take the [1] forms and a missing state as they are (no broadcast or zero array is
  written for them); ``_full`` makes the arrays the other implementations take."""
  bnd = _validate(q, k, v, g, boundary, initial_state)
  batch, _, heads, dk = q.shape
  use_mask = width is not None
  width = _int_arg("width", width if use_mask else 1, batch, 1)
  prefix = _int_arg("prefix", prefix, batch, 0)
  if scale is None:
    scale = dk ** -0.5
  if not isinstance(scale, numbers.Real):
    raise ValueError(f"`scale` must be a Python float, got {type(scale).__name__}.")
  if initial_state is not None:
    initial_state = initial_state.astype(jnp.float32)
  return (q, k, v, g, width, prefix, bnd, initial_state), use_mask, float(scale)


def _full(args):
  """``_operator_args``' arguments as the reference and chunk forms take them: width and prefix
  [B], boundary [H], a (zero) initial state array."""
  q, k, v, g, width, prefix, bnd, h0 = args
  batch, _, heads, dk = q.shape
  if h0 is None:
    h0 = jnp.zeros((batch, heads, dk, v.shape[-1]), jnp.float32)
  return (q, k, v, g, jnp.broadcast_to(width, (batch,)), jnp.broadcast_to(prefix, (batch,)),
          jnp.broadcast_to(bnd, (heads,)), h0)


def _batched(args):
  """``over_batch``'s flags for ``_operator_args``' arguments (a [1] width or prefix is shared
  by every row: replicated)."""
  batch = args[0].shape[0]
  w, p = args[4], args[5]
  return (True, True, True, True, w.shape[0] == batch, p.shape[0] == batch, False, True)


def default_impl():
  """'pallas' on GPU once it is available there, else 'chunk'."""
  if jax.default_backend() == "gpu":
    try:
      from kernels.lasad import pallas  # noqa: F401
      return "pallas"
    except ImportError:
      return "chunk"
  return "chunk"


def lasad_attention(q, k, v, g, *, width=None, prefix=0, boundary=0.0, scale=None,
                    initial_state=None, return_final_state=False, impl="auto", chunk_size=64,
                    block_sizes=None):
  """Gated linear attention with the Spatial-Aware Decay row mask.

  Args:
    q, k: [B, T, H, K] queries and keys; v: [B, T, H, V] values (float32 or bfloat16).
    g: [B, T, H, K] per-channel log forget gate (<= 0, finite; use ``boundary=-inf`` for resets).
    width: tokens per image row (int or int32 [B]; traced values are fine). ``None``: no row mask,
      i.e. plain gated linear attention.
    prefix: number of condition tokens before the image tokens (int or int32 [B]).
    boundary: log decay at row starts, float or [H]: 0.0 carries the state across the row break,
      ``-inf`` resets it exactly, a finite negative value decays it partially.
    scale: query scale; defaults to K**-0.5 (HGRN2 / LASADGen use 1.0).
    initial_state: optional [B, H, K, V] state (kept in float32). None: zeros, which the Pallas
      kernels start from without any array (no memset, no read).
    return_final_state: also return the [B, H, K, V] float32 state after the last token (without
      it the Pallas kernels write none, and their backward no initial-state gradient).
    impl: "auto" | "reference" (lax.scan, exact) | "chunk" (XLA chunked) | "pallas" (GPU kernel).
    chunk_size: chunk length for "chunk" (a multiple of 16, or any size <= 16).
    block_sizes: ``kernels.lasad.pallas.BlockSizes`` tuning knobs for "pallas" (None: defaults).

  Returns:
    ``o`` [B, T, H, V] in the input dtype, or ``(o, final_state)`` if ``return_final_state``.
  """
  if impl not in IMPLS:
    raise ValueError(f"`impl` must be one of {IMPLS}, got {impl!r}.")
  args, use_mask, scale = _operator_args(q, k, v, g, width, prefix, boundary, scale,
                                         initial_state)
  if not isinstance(chunk_size, int) or chunk_size <= 0 or (chunk_size > 16 and chunk_size % 16):
    raise ValueError(f"`chunk_size` must be a positive multiple of 16 (or <= 16), got "
                     f"{chunk_size!r}.")
  out_dtype = jnp.result_type(q.dtype, k.dtype, v.dtype)

  if impl == "auto":
    impl = default_impl()
  if impl == "reference":
    o, final = _reference_jit(*_full(args), scale=scale, use_mask=use_mask)
  elif impl == "chunk":
    o, final = lasad_chunk(*_full(args), scale=scale, use_mask=use_mask, chunk_size=chunk_size)
  else:
    try:
      from kernels.lasad.pallas import lasad_pallas
    except ImportError as e:
      raise ValueError(f"impl='pallas' is not available in this build: {e}") from e
    kw = {} if block_sizes is None else dict(block_sizes=block_sizes)
    # per device on its batch rows under a sharded train step (XLA cannot partition the kernel)
    o, final = over_batch(
        lambda *a: lasad_pallas(*a, scale=scale, use_mask=use_mask,
                                final_state=return_final_state, **kw), args,
        batched=_batched(args))
  o = o.astype(out_dtype)
  return (o, final) if return_final_state else o


_reference_jit = jax.jit(lasad_reference, static_argnames=("scale", "use_mask"))

GATES = ("auto", "kernel", "xla")


def hgrn2_attention(q_raw, f, v, lb, *, width=None, prefix=0, boundary=0.0, scale=1.0,
                    initial_state=None, return_final_state=False, impl="auto", chunk_size=64,
                    block_sizes=None, gate="auto", norm_eps=None, norm_save=None):
  """``lasad_attention`` on HGRN2's gates (LASADGen's attention layer), from its projections.

  q = silu(q_raw), k = (1 - lb)(1 - sigmoid(f)), g = log(lb + (1 - lb) sigmoid(f))
  (``kernels.lasad.reference.hgrn2_gates``), then the LASAD operator with every argument as in
  :func:`lasad_attention`.

  Args:
    q_raw, f: [B, T, H, K] query and forget-gate projections; v: [B, T, H, V].
    lb: [H, K] the layer's forget-gate lower bound (0 <= lb < 1; 0 in LASADGen's first layer).
    gate: where the gates are computed. "kernel": inside the Pallas kernels (they read q_raw and f
      in place of q, k and a float32 g; needs impl "pallas"); "xla": ``hgrn2_gates`` in XLA, then
      ``lasad_attention``; "auto": "kernel" when impl resolves to "pallas", else "xla".
    norm_eps: if given, each head's output RMS-normalised, o / sqrt(mean(o^2, -1) + norm_eps) (no
      weight; HGRN2's output norm before its weight). With gate "kernel" the one-pass forward
      kernel writes it from its float32 o where a program holds whole heads, and the gradient
      reads it and the inverse rms instead of o; elsewhere jnp after the operator.
    norm_save: with gate "kernel" and ``norm_eps``, a ``checkpoint_name`` for what that gradient
      reads (the normalised output and the inverse rms), so a remat policy saving the name does not
      rerun the forward kernel.
    other arguments: see :func:`lasad_attention` (``scale`` defaults to 1.0 here, as in HGRN2).
  """
  if gate not in GATES:
    raise ValueError(f"`gate` must be one of {GATES}, got {gate!r}.")
  if impl not in IMPLS:
    raise ValueError(f"`impl` must be one of {IMPLS}, got {impl!r}.")
  for name, x in (("q_raw", q_raw), ("f", f)):
    if not hasattr(x, "ndim") or x.ndim != 4:
      raise ValueError(f"`{name}` must have rank 4 ([B, T, H, K]), got shape "
                       f"{getattr(x, 'shape', type(x).__name__)}.")
  if f.shape != q_raw.shape:
    raise ValueError(f"`f` must have the shape of `q_raw` {q_raw.shape}, got {f.shape}.")
  heads, dk = q_raw.shape[2:]
  if not hasattr(lb, "shape") or tuple(lb.shape) != (heads, dk):
    raise ValueError(f"`lb` (forget-gate lower bound) must have shape [H, K] = {(heads, dk)}, got "
                     f"{getattr(lb, 'shape', type(lb).__name__)}.")
  resolved = default_impl() if impl == "auto" else impl
  if gate == "kernel" and resolved != "pallas":
    raise ValueError(f"gate='kernel' runs inside the Pallas kernels: it needs impl='pallas' (or "
                     f"'auto' on a GPU), got impl={impl!r}; use gate='xla' or 'auto'.")
  kw = dict(width=width, prefix=prefix, boundary=boundary, scale=scale,
            initial_state=initial_state, return_final_state=return_final_state,
            chunk_size=chunk_size, block_sizes=block_sizes)
  if norm_eps is not None and not norm_eps > 0:
    raise ValueError(f"`norm_eps` must be a positive float, got {norm_eps!r}.")
  if gate == "xla" or resolved != "pallas":
    q, k, g = hgrn2_gates(q_raw, f, lb)
    out = lasad_attention(q, k, v, g, impl=resolved, **kw)
    if norm_eps is None:
      return out
    o, final = out if return_final_state else (out, None)
    # the model's per-head norm, unweighted, on a [rows, V] view (see pallas._with_norm)
    o = rms_norm(o.reshape(-1, o.shape[-1]), 1.0, norm_eps).reshape(o.shape).astype(o.dtype)
    return (o, final) if return_final_state else o
  # lasad_attention's checks on the gates' shapes (f stands in for k and g)
  args, use_mask, scale = _operator_args(q_raw, f, v, f, width, prefix, boundary, scale,
                                         initial_state)
  from kernels.lasad.pallas import hgrn2_pallas
  bkw = {} if block_sizes is None else dict(block_sizes=block_sizes)
  batched = _batched(args)   # lb [H, K] in g's place: replicated
  o, final = over_batch(
      lambda *a: hgrn2_pallas(*a, scale=scale, use_mask=use_mask, norm_eps=norm_eps,
                              norm_save=norm_save, final_state=return_final_state, **bkw),
      (q_raw, f, v, lb, *args[4:]), batched=batched[:3] + (False,) + batched[4:])
  o = o.astype(jnp.result_type(q_raw.dtype, v.dtype))
  return (o, final) if return_final_state else o
