"""A minimal PyTorch KL-16 VAE with MAR's (LDM's) parameter names, to freeze parity fixtures.

    python scripts/torch_kl_reference.py [--out tests/fixtures]     # needs torch (CPU is fine)

Written from MAR's ``models/vae.py`` (read, not copied): the same ResNet / attention / resampling
blocks as ``torch_vq_reference.py`` (imported from it), arranged under LDM's names
(``encoder.down.{i}.block.{j}``, ``encoder.mid.block_1``, ``decoder.up.{i}.upsample.conv``,
``quant_conv`` giving mean and log-variance). Writes ``kl_tiny.pt`` ({"model": state_dict}, random
weights of a tiny config) and ``kl_tiny.npz`` (images, posterior mean / log-variance, and the
decoding of given latents).
"""

import argparse
import os
import sys

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from torch_vq_reference import Attn, Down, Res, Up, gn  # noqa: E402

TINY = dict(ch=32, ch_mult=(1, 1), num_res_blocks=1, embed_dim=4)   # shortcut convs: vq_tiny


class Level(nn.Module):
  pass


class KL(nn.Module):
  def __init__(self, ch, ch_mult, num_res_blocks, embed_dim):
    super().__init__()
    n = len(ch_mult)
    enc, dec = nn.Module(), nn.Module()
    enc.conv_in, c = nn.Conv2d(3, ch, 3, padding=1), ch
    enc.down = nn.ModuleList()
    for i in range(n):
      lvl = Level()
      lvl.block, lvl.attn = nn.ModuleList(), nn.ModuleList()
      for _ in range(num_res_blocks):
        lvl.block.append(Res(c, ch * ch_mult[i]))
        c = ch * ch_mult[i]
        if i == n - 1:
          lvl.attn.append(Attn(c))
      if i != n - 1:
        lvl.downsample = Down(c)
      enc.down.append(lvl)
    for m in (enc, dec):
      m.mid = nn.Module()
      top = ch * ch_mult[-1]
      m.mid.block_1, m.mid.attn_1, m.mid.block_2 = Res(top, top), Attn(top), Res(top, top)
    enc.norm_out, enc.conv_out = gn(c), nn.Conv2d(c, 2 * embed_dim, 3, padding=1)
    c = ch * ch_mult[-1]
    dec.conv_in = nn.Conv2d(embed_dim, c, 3, padding=1)
    ups = [None] * n
    for i in reversed(range(n)):
      lvl = Level()
      lvl.block = nn.ModuleList()
      for _ in range(num_res_blocks + 1):
        lvl.block.append(Res(c, ch * ch_mult[i]))
        c = ch * ch_mult[i]
      if i != 0:
        lvl.upsample = Up(c)
      ups[i] = lvl
    dec.up = nn.ModuleList(ups)
    dec.norm_out, dec.conv_out = gn(c), nn.Conv2d(c, 3, 3, padding=1)
    self.encoder, self.decoder, self.n = enc, dec, n
    self.quant_conv = nn.Conv2d(2 * embed_dim, 2 * embed_dim, 1)
    self.post_quant_conv = nn.Conv2d(embed_dim, embed_dim, 1)

  def encode(self, x):
    e = self.encoder
    h = e.conv_in(x)
    for lvl in e.down:
      for j, r in enumerate(lvl.block):
        h = r(h)
        if len(lvl.attn):
          h = lvl.attn[j](h)
      if hasattr(lvl, "downsample"):
        h = lvl.downsample(h)
    h = e.mid.block_2(e.mid.attn_1(e.mid.block_1(h)))
    moments = self.quant_conv(e.conv_out(F.silu(e.norm_out(h))))
    mean, logvar = moments.chunk(2, dim=1)
    return mean, logvar.clamp(-30.0, 20.0)

  def decode(self, z):
    d = self.decoder
    h = d.conv_in(self.post_quant_conv(z))
    h = d.mid.block_2(d.mid.attn_1(d.mid.block_1(h)))
    for i in reversed(range(self.n)):
      for r in d.up[i].block:
        h = r(h)
      if i != 0:
        h = d.up[i].upsample(h)
    return d.conv_out(F.silu(d.norm_out(h)))


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--out", default="tests/fixtures")
  args = ap.parse_args()
  torch.manual_seed(0)
  m = KL(**TINY).eval()
  with torch.no_grad():
    for _, p in m.named_parameters():   # non-trivial norms and biases
      if p.ndim == 1:
        p.add_(0.1 * torch.randn_like(p))
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    mean, logvar = m.encode(x)
    z = torch.randn(2, TINY["embed_dim"], 8, 8)
    rec = m.decode(z)
  os.makedirs(args.out, exist_ok=True)
  torch.save({"model": m.state_dict()}, os.path.join(args.out, "kl_tiny.pt"))
  t = lambda a: a.permute(0, 2, 3, 1).numpy()
  np.savez(os.path.join(args.out, "kl_tiny.npz"), images=t(x), mean=t(mean), logvar=t(logvar),
           latents=t(z), decoded=t(rec), torch_version=torch.__version__,
           config=np.array(repr(TINY)))
  print(f"wrote {args.out}/kl_tiny.pt, kl_tiny.npz")


if __name__ == "__main__":
  main()
