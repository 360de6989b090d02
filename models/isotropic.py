"""Isotropic encoder and decoder of DC-DiT (paper §3.2).

They run on the full L = H*W token grid, so they are kept cheap: width E = D/4 and, by default (the paper,
the release), two LDM-style residual conv blocks per side, the width change D <-> E happening inside the
last encoder / first decoder conv block with its inner conv at the smaller width (about 2.8M parameters
per side at B scale; docs/architecture.md). The condition vector c (timestep + class) is added after the
first conv.

`model.encoder_layout` / `model.decoder_layout` describe each side as the release's layout strings do:
runs of block kinds with counts, "c2", "c3", "c1D1", ... where "c" is a conv ResBlock, "D" a DiT block
(adaLN-Zero attention + MLP on all L tokens of a sample, dense) and "d" a DiT block without MLP. The width
change happens in the last conv block of the encoder and the first of the decoder; a DiT block runs at the
width where it sits (E before the change, D after), so a side that changes width needs a conv block.
"""
import re
from typing import List

import torch
import torch.nn as nn
import torch.nn.functional as F

from .dit import DiTBlock

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


BLOCK_KINDS = {"c": "conv ResBlock", "D": "DiT block", "d": "DiT block without MLP"}


def parse_layout(layout: str, side: str) -> List[str]:
    """"c1D2" -> ["c", "D", "D"]; a one-line error naming the side and the grammar otherwise."""
    runs = re.findall(r"([A-Za-z])(\d+)", layout)
    kinds = [kind for kind, n in runs for _ in range(int(n))]
    if not kinds or "".join(f"{k}{n}" for k, n in runs) != layout or any(k not in BLOCK_KINDS for k in kinds):
        raise ValueError(f"model.{side}_layout {layout!r}: expected runs of block kinds with counts such as 'c2' or "
                         f"'c1D1' (kinds: " + ", ".join(f"{k} = {v}" for k, v in BLOCK_KINDS.items()) + ")")
    return kinds


def scaffold_heads(width: int) -> int:
    """Heads of a scaffold DiT block at `width`: 64-wide heads as DiT's, fewer for narrow widths."""
    for head_dim in (64, 32, 16):
        if width % head_dim == 0 and width >= head_dim:
            return width // head_dim
    return 1


class GridDiTBlock(nn.Module):
    """A DiT block on a (B, C, H, W) channels-last feature map: its pixels as (B, L, C) tokens, dense attention
    over the sample's whole grid, adaLN from c (B, D)."""

    def __init__(self, width: int, cond_size: int, has_mlp: bool):
        super().__init__()
        self.block = DiTBlock(width, scaffold_heads(width), cond_size=cond_size, has_mlp=has_mlp)

    def forward(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        B, C, H, W = h.shape
        tokens = h.permute(0, 2, 3, 1).reshape(B, H * W, C)            # (B, L, C)
        tokens = self.block(tokens, c)                                 # (B, L, C)
        return tokens.view(B, H, W, C).permute(0, 3, 1, 2)             # (B, C, H, W) channels-last


def build_side(layout: str, wide: int, narrow: int, cond_size: int, norm_groups: int, side: str) -> nn.ModuleList:
    """The blocks of one side. Encoder: narrow -> wide in its last conv block; decoder: wide -> narrow in its first."""
    kinds = parse_layout(layout, side)
    convs = [i for i, k in enumerate(kinds) if k == "c"]
    if wide != narrow and not convs:
        raise ValueError(f"model.{side}_layout {layout!r}: changing width {narrow} <-> {wide} needs a conv block ('c')")
    change = (convs[-1] if side == "encoder" else convs[0]) if convs else -1
    blocks, width = [], narrow if side == "encoder" else wide
    for i, kind in enumerate(kinds):
        if i == change:
            out = wide if side == "encoder" else narrow
            blocks.append(ResBlock(width, out, cond_size, norm_groups))
            width = out
        elif kind == "c":
            blocks.append(ResBlock(width, width, cond_size, norm_groups))
        else:
            blocks.append(GridDiTBlock(width, cond_size, has_mlp=kind == "D"))
    return nn.ModuleList(blocks)


class Encoder(nn.Module):
    """(B, C, H, W) latents -> (B, L, D) tokens: conv3x3 patch embed (P=1) at width E, the layout's blocks
    (default ResBlock(E->E), ResBlock(E->D)), RMSNorm(D)."""

    def __init__(self, in_channels: int, width: int, hidden_size: int, norm_groups: int = 32,
                 cond_adaptor: bool = False, layout: str = "c2"):
        super().__init__()
        self.adaptor = CondAdaptor(hidden_size, cond_adaptor)
        self.patch_embed = nn.Conv2d(in_channels, width, 3, padding=1)
        self.blocks = build_side(layout, hidden_size, width, hidden_size, norm_groups, "encoder")
        self.norm = nn.RMSNorm(hidden_size, eps=RMS_EPS)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        c = self.adaptor(c)                                            # (B, D)
        # Channels-last throughout: oneDNN's convolutions run faster on it (docs/performance.md), and the
        # (B, D, H, W) output then flattens into (B, L, D) without a transposed copy. The decoder's input is
        # channels-last as it comes.
        h = self.patch_embed(x.contiguous(memory_format=torch.channels_last))  # (B, E, H, W)
        for block in self.blocks:
            h = block(h, c)                                            # (B, E, H, W) ... (B, D, H, W)
        return self.norm(h.flatten(2).transpose(1, 2))                 # (B, L, D)


class Decoder(nn.Module):
    """(B, L, D) tokens on an H x W grid -> (B, L, E): the layout's blocks (default ResBlock(D->E),
    ResBlock(E->E)), RMSNorm(E)."""

    def __init__(self, width: int, hidden_size: int, norm_groups: int = 32, cond_adaptor: bool = False,
                 layout: str = "c2"):
        super().__init__()
        self.adaptor = CondAdaptor(hidden_size, cond_adaptor)
        self.blocks = build_side(layout, hidden_size, width, hidden_size, norm_groups, "decoder")
        self.norm = nn.RMSNorm(width, eps=RMS_EPS)

    def forward(self, u: torch.Tensor, c: torch.Tensor, grid: tuple) -> torch.Tensor:
        c = self.adaptor(c)                                            # (B, D)
        B, L, D = u.shape
        h = u.transpose(1, 2).reshape(B, D, *grid)                     # (B, D, H, W)
        for block in self.blocks:
            h = block(h, c)                                            # (B, D, H, W) ... (B, E, H, W)
        return self.norm(h.flatten(2).transpose(1, 2))                 # (B, L, E)
