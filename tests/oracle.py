"""Float64 NumPy oracle of the LASAD recurrence (forward and hand-written backward).

Independent of every implementation under test: plain loops over tokens, float64.
"""

import numpy as np


def row_starts(seq_len, width, prefix, batch):
  if width is None:
    return np.zeros((batch, seq_len), bool)
  w = np.broadcast_to(np.asarray(width), (batch,))[:, None]
  p = np.broadcast_to(np.asarray(prefix), (batch,))[:, None]
  rel = np.arange(seq_len)[None] - p
  return (rel >= w) & (rel % w == 0)


def masked_gate(g, width, prefix, boundary):
  b, t, h, _ = g.shape
  starts = row_starts(t, width, prefix, b)
  bnd = np.broadcast_to(np.asarray(boundary, np.float64), (h,))
  return np.where(starts[:, :, None, None], bnd[None, None, :, None], g), starts


def forward(q, k, v, g, width=None, prefix=0, boundary=0.0, scale=None, h0=None):
  """Returns o [B,T,H,V], final state [B,H,K,V], and the states [T+1, B,H,K,V] for backward."""
  q, k, v, g = (np.asarray(x, np.float64) for x in (q, k, v, g))
  b, t, h, dk = q.shape
  scale = dk ** -0.5 if scale is None else scale
  gt, _ = masked_gate(g, width, prefix, boundary)
  s = np.zeros((b, h, dk, v.shape[-1])) if h0 is None else np.asarray(h0, np.float64).copy()
  states = [s]
  o = np.zeros(v.shape)
  for i in range(t):
    s = np.exp(gt[:, i])[..., None] * s + k[:, i, :, :, None] * v[:, i, :, None, :]
    states.append(s)
    o[:, i] = scale * np.einsum("bhk,bhkv->bhv", q[:, i], s)
  return o, s, np.stack(states)


def backward(q, k, v, g, do, dsT, width=None, prefix=0, boundary=0.0, scale=None, h0=None):
  """Gradients of sum(o*do) + sum(S_T*dsT): dict of dq, dk, dv, dg, dh0, dboundary [H]."""
  q, k, v, g = (np.asarray(x, np.float64) for x in (q, k, v, g))
  b, t, h, dk = q.shape
  scale = dk ** -0.5 if scale is None else scale
  gt, starts = masked_gate(g, width, prefix, boundary)
  _, _, states = forward(q, k, v, g, width, prefix, boundary, scale, h0)
  dq, dkk, dv, dgt = (np.zeros(x.shape) for x in (q, k, v, g))
  ds = np.asarray(dsT, np.float64).copy()
  for i in reversed(range(t)):
    ds = ds + scale * q[:, i, :, :, None] * do[:, i, :, None, :]
    s_i, s_prev = states[i + 1], states[i]
    dq[:, i] = scale * np.einsum("bhv,bhkv->bhk", do[:, i], s_i)
    dkk[:, i] = np.einsum("bhkv,bhv->bhk", ds, v[:, i])
    dv[:, i] = np.einsum("bhkv,bhk->bhv", ds, k[:, i])
    a = np.exp(gt[:, i])
    dgt[:, i] = a * np.einsum("bhkv,bhkv->bhk", s_prev, ds)
    ds = a[..., None] * ds
  m = starts[:, :, None, None]
  return dict(dq=dq, dk=dkk, dv=dv, dg=np.where(m, 0.0, dgt), dh0=ds,
              dboundary=np.where(m, dgt, 0.0).sum(axis=(0, 1, 3)))


def rel_rms(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.sqrt(np.mean((a - b) ** 2)) / (np.sqrt(np.mean(b ** 2)) + 1e-30))
