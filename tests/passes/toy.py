"""A hand-written DiT-shaped model whose roles and chains are known by construction."""

import torch
import torch.nn.functional as F
from torch import nn

D, H = 32, 2


class Attention(nn.Module):
    def __init__(self, cross: bool = False):
        super().__init__()
        self.to_q, self.to_k, self.to_v = nn.Linear(D, D), nn.Linear(D, D), nn.Linear(D, D)
        self.to_out = nn.Linear(D, D)
        self.cross = cross

    def forward(self, x, ctx):
        src = ctx if self.cross else x
        b = x.shape[0]

        def heads(t):
            return t.view(b, -1, H, D // H).transpose(1, 2)

        o = F.scaled_dot_product_attention(
            heads(self.to_q(x)), heads(self.to_k(src)), heads(self.to_v(src))
        )
        return self.to_out(o.transpose(1, 2).reshape(b, -1, D))


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.mod = nn.Linear(D, 2 * D)  # adaLN modulation on a per-sample vector
        self.norm = nn.LayerNorm(D, elementwise_affine=False)
        self.attn = Attention()
        self.cross = Attention(cross=True)
        self.up, self.down = nn.Linear(D, 4 * D), nn.Linear(4 * D, D)

    def forward(self, x, ctx, temb):
        scale, shift = self.mod(F.silu(temb)).unsqueeze(1).chunk(2, dim=-1)
        h = self.norm(x) * (1 + scale) + shift
        x = x + self.attn(h, ctx)
        x = x + self.cross(x, ctx)
        return x + self.down(F.gelu(self.up(x)))


class ToyDiT(nn.Module):
    def __init__(self, depth: int = 3):
        super().__init__()
        self.embed = nn.Linear(8, D)
        self.t_embed = nn.Linear(16, D)
        self.blocks = nn.ModuleList(Block() for _ in range(depth))
        self.proj_out = nn.Linear(D, 8)

    def forward(self, x, ctx, t):
        x, temb = self.embed(x), self.t_embed(t)
        for blk in self.blocks:
            x = blk(x, ctx, temb)
        return self.proj_out(x)


def toy_inputs(b: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return dict(x=torch.randn(b, 6, 8, generator=g), ctx=torch.randn(b, 5, D, generator=g),
                t=torch.randn(b, 16, generator=g))
