"""A minimal PyTorch LINA network with the parameter names of LINA's code, to freeze parity fixtures.

    python scripts/torch_lina_reference.py [--out tests/fixtures]     # needs torch (CPU is fine)

Written from LINA's ``transformer_nova_linear_decouple1_kvscale1.py``,
``vision_transformer_linear_decouple1_kvscale1.py``, ``embeddings.py``, ``normalization.py`` and
NOVA's ``diffusion_mlp.py`` (read, not copied): the state-dict keys match a LINA checkpoint
(``video_encoder.blocks.0.attn.qkv.weight``, ``image_encoder.blocks.N.attn.key_scale``,
``image_decoder.blocks.0.norm1.proj.weight``, ``mask_embed.bos_token``, ...), so
``lasad_jax.lina.convert.convert_state_dict`` reads both. float32 throughout, class-conditional
image path only (LINA's video/motion branches are not built).

Writes ``lina_tiny.npz``: the state dict (``sd/<key>``) of a tiny random model, the inputs
(labels, latents in LINA's [B, C, h, w] layout, visible ids, x_t, timesteps) and the outputs
(condition tokens c, transformer output z, head velocity v).
"""

import argparse
import math
import os

import numpy as np
import torch
from torch import nn

TINY = dict(dim=32, heads=2, class_depth=2, image_depth=4, encoder_depth=2, head_depth=2,
            channels=3, grid=8, num_classes=10)


def sincos_2d(dim, h, w):
  freq = 1 / (10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4)))
  gw, gh = torch.meshgrid(torch.arange(w, dtype=torch.float64), torch.arange(h, dtype=torch.float64),
                          indexing="xy")
  fw, fh = [g.reshape(-1, 1) * freq[None] for g in (gw, gh)]
  return torch.cat([fw.sin(), fw.cos(), fh.sin(), fh.cos()], -1).float()


class MLP(nn.Module):
  def __init__(self, d):
    super().__init__()
    self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

  def forward(self, x):
    return self.fc2(nn.functional.gelu(self.fc1(x)))


class Attn(nn.Module):
  def __init__(self, d, heads, n=None, grid=None):
    super().__init__()
    self.heads, self.grid = heads, grid
    self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
    if n is not None:   # decoder: KV gate and depthwise conv
      self.dw_conv = nn.Conv2d(d, d, 5, padding=2, groups=d)
      self.key_scale = nn.Parameter(torch.ones(1, heads, n, 1))
      self.value_scale = nn.Parameter(torch.ones(1, heads, n, 1))

  def forward(self, x):
    b, n, c = x.shape
    q, k, v = self.qkv(x).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
    q, k = torch.relu(q) + 1e-6, torch.relu(k) + 1e-6
    if self.grid is not None:
      k, v = k * self.key_scale, v * self.value_scale
    z = 1 / (q @ k.mean(dim=-2, keepdim=True).transpose(-2, -1) + 1e-6)
    kv = (k.transpose(-2, -1) * n ** -0.5) @ (v * n ** -0.5)
    out = (q @ kv * z).transpose(1, 2).flatten(2)
    if self.grid is not None:
      g = self.grid
      nc = n - g * g
      conv = self.dw_conv(x[:, nc:].reshape(b, g, g, c).permute(0, 3, 1, 2))
      conv = conv.reshape(b, c, -1).permute(0, 2, 1)
      out = out + torch.cat([torch.zeros(b, nc, c), conv], 1)
    return self.proj(out)


class Block(nn.Module):
  def __init__(self, d, heads, n=None, grid=None):
    super().__init__()
    self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
    self.attn, self.mlp = Attn(d, heads, n, grid), MLP(d)

  def forward(self, x):
    x = self.norm1(self.attn(x)) + x
    return self.norm2(self.mlp(x)) + x


class ViT(nn.Module):
  def __init__(self, d, heads, depth, patch, channels, encoder_depth=None, n=None, grid=None):
    super().__init__()
    self.patch_embed = nn.Module()
    self.patch_embed.proj = nn.Conv2d(channels, d, patch, patch)
    enc = depth if encoder_depth is None else encoder_depth
    self.blocks = nn.ModuleList(Block(d, heads) if i < enc else Block(d, heads, n, grid)
                                for i in range(depth))
    self.norm, self.encoder_depth = nn.LayerNorm(d), enc


class Projector(nn.Module):
  def __init__(self, i, d):
    super().__init__()
    self.fc1, self.fc2 = nn.Linear(i, d), nn.Linear(d, d)

  def forward(self, x):
    return self.fc2(nn.functional.silu(self.fc1(x)))


class AdaLNZero(nn.Module):
  def __init__(self, d, stats):
    super().__init__()
    self.proj, self.stats = nn.Linear(d, stats * d), stats

  def forward(self, x, z):
    s = self.proj(nn.functional.silu(z)).chunk(self.stats, -1)
    return nn.functional.layer_norm(x, x.shape[-1:], eps=1e-6) * (1 + s[0]) + s[1], s[2:]


class DiffBlock(nn.Module):
  def __init__(self, d):
    super().__init__()
    self.norm1, self.proj, self.norm2 = AdaLNZero(d, 3), Projector(d, d), nn.LayerNorm(d)

  def forward(self, x, z):
    h, (gate,) = self.norm1(x, z)
    return self.norm2(self.proj(h)) * gate + x


class Head(nn.Module):
  def __init__(self, d, depth, channels):
    super().__init__()
    self.patch_embed = nn.Module()
    self.patch_embed.proj = nn.Conv2d(channels, d, 1, 1)
    self.time_cond_embed = nn.Module()
    self.time_cond_embed.timestep_proj = Projector(256, d)
    self.time_cond_embed.condition_proj = Projector(d, d)
    self.blocks = nn.ModuleList(DiffBlock(d) for _ in range(depth))
    self.norm, self.head = AdaLNZero(d, 2), nn.Linear(d, channels)

  def forward(self, x_t, t, z):
    """x_t [B, C, h, w], t [B, N], z [B, N, D] -> velocity [B, N, C]."""
    x = self.patch_embed.proj(x_t).flatten(2).transpose(1, 2)
    freq = torch.exp(torch.arange(128, dtype=torch.float32) * (-math.log(10000) / 128))
    e = t[..., None].float() * freq
    tc = self.time_cond_embed
    z = tc.condition_proj(z) + tc.timestep_proj(torch.cat([e.cos(), e.sin()], -1))
    for blk in self.blocks:
      x = blk(x, z)
    return self.head(self.norm(x, z)[0])


class LINA(nn.Module):
  def __init__(self, dim, heads, class_depth, image_depth, encoder_depth, head_depth, channels,
               grid, num_classes):
    super().__init__()
    self.grid, self.nc = grid, (grid // 2) ** 2
    n = self.nc + grid * grid
    self.video_encoder = ViT(dim, heads, class_depth, 2, channels)
    self.image_encoder = ViT(dim, heads, image_depth, 1, channels, encoder_depth, n, grid)
    self.image_decoder = Head(dim, head_depth, channels)
    self.mask_embed = nn.Module()
    self.mask_embed.bos_token = nn.Parameter(torch.randn(1, dim) * 0.02)
    self.mask_embed.mask_token = nn.Parameter(torch.randn(1, dim) * 0.02)
    self.label_embed = nn.Module()
    self.label_embed.weight = nn.Parameter(torch.randn(num_classes + 1, dim) * 0.02)
    self.label_embed.norm = nn.LayerNorm(dim)
    self.video_pos_embed = nn.Module()
    self.video_pos_embed.time_proj = nn.Sequential(nn.Linear(256, dim), nn.SiLU(),
                                                   nn.Linear(dim, dim))
    self.video_pos_embed.norm = nn.LayerNorm(dim)

  def condition(self, labels):
    d = self.label_embed.weight.shape[1]
    lab = self.label_embed.norm(self.label_embed.weight[labels[:, None]])
    sincos0 = torch.cat([torch.zeros(128), torch.ones(128)])[None]
    pe = self.video_pos_embed
    t0 = pe.norm(pe.time_proj(sincos0))
    g = self.grid // 2
    c = self.mask_embed.bos_token.expand(len(labels), g * g, d) + t0 + sincos_2d(d, g, g)
    x = torch.cat([lab, c], 1)
    for blk in self.video_encoder.blocks:
      x = blk(x)
    return self.video_encoder.norm(x[:, 1:])

  def transform(self, latents, visible_ids, c):
    """latents [B, C, h, w], visible_ids [B, n_vis] -> z [B, N, D] (LINA's gather / scatter)."""
    enc = self.image_encoder
    d = c.shape[-1]
    x = enc.patch_embed.proj(latents).flatten(2).transpose(1, 2)
    mask = torch.ones(x.shape[:2] + (1,))
    mask.scatter_(1, visible_ids[..., None], 0)
    x = x * (1 - mask) + self.mask_embed.mask_token * mask
    x = x_masked = x + sincos_2d(d, self.grid, self.grid)
    ids = visible_ids[..., None].expand(-1, -1, d)
    x = torch.cat([c, x.gather(1, ids)], 1)
    for blk in enc.blocks[:enc.encoder_depth]:
      x = blk(x)
    c, x = x.split((c.shape[1], x.shape[1] - c.shape[1]), 1)
    x = torch.cat([c, x_masked.scatter(1, ids, x)], 1)
    for blk in enc.blocks[enc.encoder_depth:]:
      x = blk(x)
    return enc.norm(x[:, c.shape[1]:])


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--out", default="tests/fixtures")
  args = ap.parse_args()
  torch.manual_seed(0)
  cfg = TINY
  m = LINA(**cfg).eval()
  with torch.no_grad():   # non-trivial values where LINA initialises constants
    for name, p in m.named_parameters():
      if "scale" in name or "norm" in name or name.endswith("bias") or "ada" in name:
        p.add_(torch.randn_like(p) * 0.2)
      if "norm1.proj" in name or "norm.proj" in name or name.startswith("image_decoder.head"):
        p.normal_(0, 0.05)
  b, ch, g = 2, cfg["channels"], cfg["grid"]
  labels = torch.tensor([3, cfg["num_classes"]])          # a class and the null class
  latents = torch.randn(b, ch, g, g)
  visible = torch.stack([torch.randperm(g * g)[:20] for _ in range(b)])
  x_t = torch.randn(b, ch, g, g)
  t = torch.rand(b, g * g) * 1000
  with torch.no_grad():
    c = m.condition(labels)
    z = m.transform(latents, visible, c)
    v = m.image_decoder(x_t, t, z)
  out = {f"sd/{k}": v_.numpy() for k, v_ in m.state_dict().items()}
  out.update(labels=labels.numpy(), latents=latents.numpy(), visible_ids=visible.numpy(),
             x_t=x_t.numpy(), t=t.numpy(), c=c.numpy(), z=z.numpy(), v=v.numpy(),
             torch_version=np.array(torch.__version__))
  os.makedirs(args.out, exist_ok=True)
  path = os.path.join(args.out, "lina_tiny.npz")
  np.savez_compressed(path, **out)
  print(f"wrote {path}: {len(m.state_dict())} tensors, "
        f"{sum(p.numel() for p in m.parameters())} parameters")


if __name__ == "__main__":
  main()
