"""A minimal PyTorch VQ tokenizer with LlamaGen's parameter names, to freeze parity fixtures.

    python scripts/torch_vq_reference.py [--out tests/fixtures]     # needs torch (CPU is fine)

Written from the architecture of LlamaGen's ``tokenizer/tokenizer_image/vq_model.py`` (not copied):
GroupNorm(32, eps 1e-6) + swish ResNet blocks, one-head attention at the lowest resolution and in
the middle, (0, 1)-padded stride-2 downsampling, nearest x2 upsampling, l2-normalised codebook.
Module names reproduce the state-dict keys of LlamaGen's checkpoints (``encoder.conv_blocks.0.res.0
.norm1.weight``, ``quantize.embedding.weight``, ...), so ``lasad_jax.tokenizer.vq.convert_state_dict``
reads both. Writes ``vq_tiny.pt`` ({"model": state_dict}, random weights of a tiny config) and
``vq_tiny.npz`` (input images, pre-quantisation latents, codes, reconstructions).
"""

import argparse
import os

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

TINY = dict(ch=32, ch_mult=(1, 2), num_res_blocks=2, z_channels=32, codebook_size=64,
            codebook_dim=8)


def gn(c):
  return nn.GroupNorm(32, c, eps=1e-6)


class Res(nn.Module):
  def __init__(self, cin, cout):
    super().__init__()
    self.norm1, self.conv1 = gn(cin), nn.Conv2d(cin, cout, 3, padding=1)
    self.norm2, self.conv2 = gn(cout), nn.Conv2d(cout, cout, 3, padding=1)
    if cin != cout:
      self.nin_shortcut = nn.Conv2d(cin, cout, 1)

  def forward(self, x):
    h = self.conv1(F.silu(self.norm1(x)))
    h = self.conv2(F.silu(self.norm2(h)))
    return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class Attn(nn.Module):
  def __init__(self, c):
    super().__init__()
    self.norm = gn(c)
    self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1) for _ in range(4))

  def forward(self, x):
    b, c, hh, ww = x.shape
    h = self.norm(x)
    q, k, v = (m(h).flatten(2).transpose(1, 2) for m in (self.q, self.k, self.v))   # b, hw, c
    a = torch.softmax(q @ k.transpose(1, 2) * c ** -0.5, dim=-1)
    o = (a @ v).transpose(1, 2).reshape(b, c, hh, ww)
    return x + self.proj_out(o)


class Down(nn.Module):
  def __init__(self, c):
    super().__init__()
    self.conv = nn.Conv2d(c, c, 3, stride=2)

  def forward(self, x):
    return self.conv(F.pad(x, (0, 1, 0, 1)))


class Up(nn.Module):
  def __init__(self, c):
    super().__init__()
    self.conv = nn.Conv2d(c, c, 3, padding=1)

  def forward(self, x):
    return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
  pass


class Encoder(nn.Module):
  def __init__(self, ch, ch_mult, num_res_blocks, z_channels):
    super().__init__()
    n = len(ch_mult)
    self.conv_in = nn.Conv2d(3, ch, 3, padding=1)
    self.conv_blocks = nn.ModuleList()
    c = ch
    for i in range(n):
      lvl = Level()
      lvl.res, lvl.attn = nn.ModuleList(), nn.ModuleList()
      for _ in range(num_res_blocks):
        lvl.res.append(Res(c, ch * ch_mult[i]))
        c = ch * ch_mult[i]
        if i == n - 1:
          lvl.attn.append(Attn(c))
      if i != n - 1:
        lvl.downsample = Down(c)
      self.conv_blocks.append(lvl)
    self.mid = nn.ModuleList([Res(c, c), Attn(c), Res(c, c)])
    self.norm_out, self.conv_out = gn(c), nn.Conv2d(c, z_channels, 3, padding=1)

  def forward(self, x):
    h = self.conv_in(x)
    for lvl in self.conv_blocks:
      for j, r in enumerate(lvl.res):
        h = r(h)
        if len(lvl.attn):
          h = lvl.attn[j](h)
      if hasattr(lvl, "downsample"):
        h = lvl.downsample(h)
    for m in self.mid:
      h = m(h)
    return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
  def __init__(self, ch, ch_mult, num_res_blocks, z_channels):
    super().__init__()
    n = len(ch_mult)
    c = ch * ch_mult[-1]
    self.conv_in = nn.Conv2d(z_channels, c, 3, padding=1)
    self.mid = nn.ModuleList([Res(c, c), Attn(c), Res(c, c)])
    self.conv_blocks = nn.ModuleList()
    for i in reversed(range(n)):
      lvl = Level()
      lvl.res, lvl.attn = nn.ModuleList(), nn.ModuleList()
      for _ in range(num_res_blocks + 1):
        lvl.res.append(Res(c, ch * ch_mult[i]))
        c = ch * ch_mult[i]
        if i == n - 1:
          lvl.attn.append(Attn(c))
      if i != 0:
        lvl.upsample = Up(c)
      self.conv_blocks.append(lvl)
    self.norm_out, self.conv_out = gn(c), nn.Conv2d(c, 3, 3, padding=1)

  def forward(self, z):
    h = self.conv_in(z)
    for m in self.mid:
      h = m(h)
    for lvl in self.conv_blocks:
      for j, r in enumerate(lvl.res):
        h = r(h)
        if len(lvl.attn):
          h = lvl.attn[j](h)
      if hasattr(lvl, "upsample"):
        h = lvl.upsample(h)
    return self.conv_out(F.silu(self.norm_out(h)))


class Quantizer(nn.Module):
  def __init__(self, n, d):
    super().__init__()
    self.embedding = nn.Embedding(n, d)
    self.register_buffer("codebook_used", torch.zeros(65536))   # as in LlamaGen's checkpoints


class VQ(nn.Module):
  def __init__(self, ch, ch_mult, num_res_blocks, z_channels, codebook_size, codebook_dim):
    super().__init__()
    self.encoder = Encoder(ch, ch_mult, num_res_blocks, z_channels)
    self.decoder = Decoder(ch, ch_mult, num_res_blocks, z_channels)
    self.quantize = Quantizer(codebook_size, codebook_dim)
    self.quant_conv = nn.Conv2d(z_channels, codebook_dim, 1)
    self.post_quant_conv = nn.Conv2d(codebook_dim, z_channels, 1)

  def latents(self, x):
    return F.normalize(self.quant_conv(self.encoder(x)), dim=1)

  def encode(self, x):
    z = self.latents(x).permute(0, 2, 3, 1)                       # b, h, w, d
    e = F.normalize(self.quantize.embedding.weight, dim=-1)
    d = (z * z).sum(-1, keepdim=True) + (e * e).sum(-1) - 2 * z @ e.T
    return d.argmin(-1)

  def decode(self, codes):
    e = F.normalize(self.quantize.embedding.weight, dim=-1)
    return self.decoder(self.post_quant_conv(e[codes].permute(0, 3, 1, 2)))


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--out", default="tests/fixtures")
  args = ap.parse_args()
  torch.manual_seed(0)
  vq = VQ(**TINY).eval()
  with torch.no_grad():
    for name, p in vq.named_parameters():   # non-trivial norms and biases
      if p.ndim == 1:
        p.add_(0.1 * torch.randn_like(p))
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    z = vq.latents(x)
    codes = vq.encode(x)
    rec = vq.decode(codes)
  os.makedirs(args.out, exist_ok=True)
  torch.save({"model": vq.state_dict()}, os.path.join(args.out, "vq_tiny.pt"))
  np.savez(os.path.join(args.out, "vq_tiny.npz"), images=x.permute(0, 2, 3, 1).numpy(),
           latents=z.permute(0, 2, 3, 1).numpy(), codes=codes.numpy().astype(np.int32),
           reconstructions=rec.permute(0, 2, 3, 1).numpy(), torch_version=torch.__version__,
           config=np.array(repr(TINY)))
  print(f"wrote {args.out}/vq_tiny.pt, vq_tiny.npz (torch {torch.__version__}); "
        f"codes {codes.shape}, {len(vq.state_dict())} tensors")


if __name__ == "__main__":
  main()
