"""Isotropic conv encoder and decoder of DC-DiT (paper §3.2).

They run on the full L = H*W token grid, so they are kept cheap: width E = D/4, two LDM-style
residual conv blocks per side, and the width change D <-> E happens inside the last encoder / first
decoder block with its inner conv at the smaller width (about 2.8M parameters per side at B
scale; docs/architecture.md). The condition vector c (timestep + class) is added after the first conv.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

# eps of every RMSNorm in DC-DiT (encoder, inner stack, decoder), as the authors' release (H-Net's default).
RMS_EPS = 1e-5


class ResBlock(nn.Module):
    """GroupNorm -> SiLU -> conv3x3 -> + Linear(SiLU(c)) -> GroupNorm -> SiLU -> conv3x3, plus skip.

    A width-changing block runs its inner conv at min(in, out) channels and uses a 1x1 skip.
    """

    def __init__(self, in_channels: int, out_channels: int, cond_size: int, norm_groups: int = 32):
        super().__init__()
        mid = min(in_channels, out_channels)
        for name, ch in (("in_channels", in_channels), ("inner width", mid)):
            if ch % norm_groups:
                raise ValueError(f"ResBlock {name} {ch} is not divisible by norm_groups {norm_groups}")
        self.norm1 = nn.GroupNorm(norm_groups, in_channels)
        self.conv1 = nn.Conv2d(in_channels, mid, 3, padding=1)
        self.cond = nn.Sequential(nn.SiLU(), nn.Linear(cond_size, mid))
        self.norm2 = nn.GroupNorm(norm_groups, mid)
        self.conv2 = nn.Conv2d(mid, out_channels, 3, padding=1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))                          # (B, mid, H, W)
        h = h + self.cond(c)[:, :, None, None]                         # (B, mid, H, W)
        h = self.conv2(F.silu(self.norm2(h)))                          # (B, out, H, W)
        return self.skip(x) + h                                        # (B, out, H, W)


class CondAdaptor(nn.Module):
    """Trainable LayerNorm on c (paper §4.4): keeps frozen, upcycled embedders' scale out of the new
    conv blocks. Off (identity) unless enabled."""

    def __init__(self, cond_size: int, enabled: bool):
        super().__init__()
        self.norm = nn.LayerNorm(cond_size) if enabled else None

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        return c if self.norm is None else self.norm(c)


class Encoder(nn.Module):
    """(B, C, H, W) latents -> (B, L, D) tokens: conv3x3 patch embed (P=1) at width E, ResBlock(E->E),
    ResBlock(E->D), RMSNorm(D)."""

    def __init__(self, in_channels: int, width: int, hidden_size: int, norm_groups: int = 32,
                 cond_adaptor: bool = False):
        super().__init__()
        self.adaptor = CondAdaptor(hidden_size, cond_adaptor)
        self.patch_embed = nn.Conv2d(in_channels, width, 3, padding=1)
        self.blocks = nn.ModuleList([
            ResBlock(width, width, hidden_size, norm_groups),
            ResBlock(width, hidden_size, hidden_size, norm_groups),
        ])
        self.norm = nn.RMSNorm(hidden_size, eps=RMS_EPS)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        c = self.adaptor(c)                                            # (B, D)
        # Channels-last throughout: oneDNN's convolutions run faster on it (docs/performance.md), and the
        # (B, D, H, W) output then flattens into (B, L, D) without a transposed copy. The decoder's input is
        # channels-last as it comes.
        h = self.patch_embed(x.contiguous(memory_format=torch.channels_last))  # (B, E, H, W)
        for block in self.blocks:
            h = block(h, c)                                            # (B, E, H, W) then (B, D, H, W)
        return self.norm(h.flatten(2).transpose(1, 2))                 # (B, L, D)


class Decoder(nn.Module):
    """(B, L, D) tokens on an H x W grid -> (B, L, E): ResBlock(D->E), ResBlock(E->E), RMSNorm(E)."""

    def __init__(self, width: int, hidden_size: int, norm_groups: int = 32, cond_adaptor: bool = False):
        super().__init__()
        self.adaptor = CondAdaptor(hidden_size, cond_adaptor)
        self.blocks = nn.ModuleList([
            ResBlock(hidden_size, width, hidden_size, norm_groups),
            ResBlock(width, width, hidden_size, norm_groups),
        ])
        self.norm = nn.RMSNorm(width, eps=RMS_EPS)

    def forward(self, u: torch.Tensor, c: torch.Tensor, grid: tuple) -> torch.Tensor:
        c = self.adaptor(c)                                            # (B, D)
        B, L, D = u.shape
        h = u.transpose(1, 2).reshape(B, D, *grid)                     # (B, D, H, W)
        for block in self.blocks:
            h = block(h, c)                                            # (B, E, H, W)
        return self.norm(h.flatten(2).transpose(1, 2))                 # (B, L, E)
