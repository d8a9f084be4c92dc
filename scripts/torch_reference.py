"""A minimal PyTorch LASADGen, for parity: LlamaGen's GPT naming + fla's HGRN2 projection names.

    python scripts/torch_reference.py --out tests/fixtures/torch_lasadgen_tiny   # writes .pt + .npz

Layout (the authors' code most likely builds on LlamaGen's gpt.py and fla's layers/hgrn2.py):
``tok_embeddings``, ``cls_embedding.embedding_table``, ``layers.N.attention_norm``,
``layers.N.attention.{q_proj,f_proj,i_proj,g_norm,o_proj}``, ``layers.N.ffn_norm``,
``layers.N.feed_forward.{w1,w2,w3}``, ``norm``, ``output``, and fla's model-level ``lower_bounds``.
Gate math as fla's HGRN2: g = logsigmoid(f), then log(lb + (1 - lb) sigmoid(f)) after layer 0,
k = 1 - exp(g). The recurrence is fla's ``naive_recurrent_gla`` on the masked gate g~.
Where fla's HGRN2Attention and DESIGN.md §2 differ, this follows DESIGN (what lasad_jax builds):
attention scale 1 (fla 0.6.0's layer leaves chunk_gla's default K**-0.5) and an RMSNorm per head
with a [d] weight (fla's g_norm normalises the full width).
"""

import argparse
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fla.ops.gla.naive import naive_recurrent_gla


class RMSNorm(nn.Module):
  def __init__(self, dim, eps=1e-5):
    super().__init__()
    self.eps = eps
    self.weight = nn.Parameter(torch.ones(dim))

  def forward(self, x):
    x = x.float()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class FeedForward(nn.Module):
  def __init__(self, dim, hidden):
    super().__init__()
    self.w1 = nn.Linear(dim, hidden, bias=False)
    self.w3 = nn.Linear(dim, hidden, bias=False)
    self.w2 = nn.Linear(hidden, dim, bias=False)

  def forward(self, x):
    return self.w2(F.silu(self.w1(x)) * self.w3(x))


class HGRN2Attention(nn.Module):
  def __init__(self, dim, head_dim, layer_idx, eps=1e-5):
    super().__init__()
    self.h, self.dh, self.layer_idx, self.eps = dim // head_dim, head_dim, layer_idx, eps
    self.q_proj = nn.Linear(dim, dim, bias=False)
    self.f_proj = nn.Linear(dim, dim, bias=False)
    self.i_proj = nn.Linear(dim, dim, bias=False)
    self.g_norm = RMSNorm(dim, eps)
    self.o_proj = nn.Linear(dim, dim, bias=False)

  def forward(self, x, lower_bound, row_start, boundary):
    b, n, d = x.shape
    q = F.silu(self.q_proj(x))
    g = F.logsigmoid(self.f_proj(x).float())
    if self.layer_idx > 0:
      g = torch.logaddexp(lower_bound.log(), torch.log1p(-lower_bound) + g)
    k = 1 - g.exp()
    v = self.i_proj(x)
    split = lambda t: t.reshape(b, n, self.h, self.dh)
    q, k, v, g = map(split, (q, k, v, g))
    g = torch.where(row_start[:, :, None, None], boundary[None, None, :, None], g)
    # naive_recurrent_gla fixes scale = K**-0.5; undo it for scale 1.
    o, _ = naive_recurrent_gla(q * math.sqrt(self.dh), k, v, g)
    o = o.float()
    o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + self.eps)   # per-head RMSNorm
    return self.o_proj(o.reshape(b, n, d) * self.g_norm.weight)


class Block(nn.Module):
  def __init__(self, dim, head_dim, hidden, layer_idx):
    super().__init__()
    self.attention_norm = RMSNorm(dim)
    self.attention = HGRN2Attention(dim, head_dim, layer_idx)
    self.ffn_norm = RMSNorm(dim)
    self.feed_forward = FeedForward(dim, hidden)


class LabelEmbedder(nn.Module):
  def __init__(self, num_classes, dim):
    super().__init__()
    self.embedding_table = nn.Embedding(num_classes + 1, dim)


class TorchLASADGen(nn.Module):
  def __init__(self, num_layers, dim, head_dim, vocab, num_classes, hidden):
    super().__init__()
    self.tok_embeddings = nn.Embedding(vocab, dim)
    self.cls_embedding = LabelEmbedder(num_classes, dim)
    self.layers = nn.ModuleList(Block(dim, head_dim, hidden, i) for i in range(num_layers))
    self.norm = RMSNorm(dim)
    self.output = nn.Linear(dim, vocab, bias=False)
    self.lower_bounds = nn.Parameter(torch.zeros(num_layers, dim))

  def forward(self, tokens, labels, width, boundary):
    x = torch.cat([self.cls_embedding.embedding_table(labels)[:, None],
                   self.tok_embeddings(tokens[:, :-1])], 1)
    n = x.shape[1]
    rel = torch.arange(n) - 1
    row_start = ((rel >= width) & (rel % width == 0))[None].expand(x.shape[0], n)
    lbs = self.lower_bounds.softmax(0)
    lbs = lbs.cumsum(0) - lbs[0]
    for i, blk in enumerate(self.layers):
      bnd = torch.full((blk.attention.h,), boundary)
      x = x + blk.attention(blk.attention_norm(x), lbs[i], row_start, bnd)
      x = x + blk.feed_forward(blk.ffn_norm(x))
    return self.output(self.norm(x))


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--out", default="tests/fixtures/torch_lasadgen_tiny")
  args = ap.parse_args()
  torch.manual_seed(0)
  # configs/lasad.py:tiny: 2 layers x 64, head dim 16, vocab 17, 10 classes, SwiGLU 256.
  model = TorchLASADGen(2, 64, 16, 17, 10, 256)
  with torch.no_grad():
    for p in model.parameters():
      if p.dim() == 2 and p.shape != model.lower_bounds.shape:
        p.normal_(0, 0.1)
    model.lower_bounds.normal_(0, 1.0)
    for blk in model.layers:
      blk.attention.g_norm.weight.uniform_(0.5, 1.5)
  gen = torch.Generator().manual_seed(1)
  tokens = torch.randint(0, 17, (3, 40), generator=gen)
  labels = torch.tensor([0, 4, 10])                  # 10 = the null class
  out = {"tokens": tokens.numpy(), "labels": labels.numpy(), "width": np.asarray(8)}
  for mode, bnd in (("carry", 0.0), ("reset", float("-inf"))):
    with torch.no_grad():
      out[f"logits_{mode}"] = model(tokens, labels, 8, bnd).float().numpy()
  torch.save(model.state_dict(), args.out + ".pt")
  np.savez_compressed(args.out + ".npz", **out)
  print(f"wrote {args.out}.pt and {args.out}.npz (torch {torch.__version__})")


if __name__ == "__main__":
  main()
