"""The inner stage of a two-stage (hierarchical) DC-DiT: chunk, process, chunk again (H-Net's point).

Stage 0 is DCDiT itself: its router keeps M0 of the L grid tokens. With `model.stage1_downsample_factor` set, the
kept tokens then go through a second chunking stage before the inner DiT blocks:

    stage-0 kept tokens (T0, D) -> stage-1 encoder (DiT blocks, RMSNorm)           (T0, D)
    -> stage-1 router on the kept tokens' grid positions -> chunk                   (B, M1max, D) -> packed (T1, D)
    -> the inner DiT blocks, inner_norm (DCDiT.process)                             (T1, D)
    -> de-chunk onto the stage-0 kept tokens, STE gate + residual_proj (§3.1)       (B, M0max, D)
    -> stage-1 decoder (DiT blocks, RMSNorm)                                        (T0, D)

Decisions (docs/architecture.md, "Two stages"):
- Router: the paper's cosine rule (§3.3) on the sparse set. Each kept token's key is compared with the Gaussian-
  weighted mean of the other kept tokens' keys of its sample, weights from their grid distance (width `router_sigma`
  grid cells), so the router reads the 2D layout the kept tokens still have instead of a raster order that wraps
  at every row (H-Net's 1D rule). The first and last kept token of each sample are forced boundaries (M1 >= 2).
- De-chunking: the Gaussian kernel of §3.4 over the stage-1 kept tokens' grid positions, then each stage-0 token
  takes the output of its nearest stage-1 token (`dechunk_points`); "nearest" skips the smoothing.
- Encoder and decoder: DiT blocks on the packed stage-0 tokens, attention within each sample. Nothing mixes tokens
  of different samples (the release's nested layout ran convolutions over the packed batch), so a sample's output
  does not depend on its batch. Depth 0 leaves a side out, norm included.
- Tail dropping (elastic inference) happens at the innermost stage only: the inner blocks are where the FLOPs
  are, and stage 0 then keeps the whole budget it was trained for; each stage has its own ratio loss and N.
"""
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from .attention import TokenLayout
from .chunking import chunk as chunk_tokens
from .chunking import dechunk_points, gather_rows, nearest_slot, position_kernel
from .dit import DiTBlock
from .isotropic import RMS_EPS
from .routing import RouterOutput, check_downsample_factor
from .routing import tail_drop as drop_lowest_boundaries

Fraction = Union[float, Tensor]
STAGE1_DECHUNKERS = ("gaussian", "nearest")


def finish_sparse_routing(prob: Tensor, valid: Tensor) -> RouterOutput:
    """finish_routing for a padded set of tokens: the first and last valid slot of each sample are forced to
    p = 1, padding slots get p = 0 and no decision. prob, valid (B, M) with each sample's valid slots first."""
    B, M = prob.shape
    counts = valid.sum(1)                                                          # (B,)
    slots = torch.arange(M, device=prob.device)                                    # (M,)
    ends = (slots == 0) | (slots == (counts - 1).unsqueeze(1))                     # (B, M)
    prob = prob.masked_fill(ends & valid, 1.0).masked_fill(~valid, 0.0)            # (B, M)
    natural_mask = (prob > 0.5) & valid                                            # (B, M)
    selected = torch.where(natural_mask, prob, 1.0 - prob)                         # (B, M)
    return RouterOutput(prob=prob, mask=natural_mask, natural_mask=natural_mask, selected=selected)


class SparseCosineRouter(nn.Module):
    """§3.3's cosine router on a sparse set of grid points: p_i = (1 - <q_i, k_bar_i>) / 2 with k_bar_i the
    l2-normalised, Gaussian-weighted mean of the other points' normalised keys (weights from grid distance)."""

    def __init__(self, dim: int, downsample_factor: float, sigma: float = 2.0):
        super().__init__()
        check_downsample_factor(downsample_factor)
        if not sigma > 0:
            raise ValueError(f"stage-1 router sigma must be > 0, got {sigma}")
        self.dim, self.sigma = dim, float(sigma)
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """W_Q = W_K = I: a pure local-novelty detector at initialisation, as §3.3's."""
        self.q_proj.weight.copy_(torch.eye(self.dim))
        self.k_proj.weight.copy_(torch.eye(self.dim))

    def forward(self, x: Tensor, pos: Tensor, valid: Tensor) -> RouterOutput:
        """x (B, M, D) tokens, pos (B, M, 2) their grid positions, valid (B, M) -> RouterOutput over the M slots."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            q = F.normalize(F.linear(x.float(), self.q_proj.weight.float()), dim=-1)  # (B, M, D)
            k = F.normalize(F.linear(x.float(), self.k_proj.weight.float()), dim=-1)  # (B, M, D)
            kernel = position_kernel(pos, valid, self.sigma)                         # (B, M, M)
            kernel = kernel * (1.0 - torch.eye(kernel.shape[-1], device=x.device))   # the others only
            k_bar = F.normalize(torch.bmm(kernel, k), dim=-1)                        # (B, M, D)
            s = (q * k_bar).sum(-1)                                                  # (B, M)
            return finish_sparse_routing(((1.0 - s) / 2.0).clamp(0.0, 1.0), valid)


class PointDechunk(nn.Module):
    """De-chunking between point sets (a module, so FLOP counting charges it to the inner stage): "gaussian" is §3.4's
    smoothing over the stage-1 tokens' grid positions then nearest plug-back; "nearest" plugs back only."""

    def __init__(self, kind: str, sigma: float):
        super().__init__()
        self.kind, self.sigma = kind, float(sigma)

    def forward(self, z: Tensor, p: Tensor, pos1: Tensor, ok: Tensor, pos0: Tensor) -> Tensor:
        """z (B, M1, D), p (B, M1) at pos1 (B, M1, 2) -> the stage-0 points pos0 (B, M0, 2): (B, M0, D) fp32."""
        if self.kind == "nearest":  # each stage-0 token copies its nearest stage-1 token
            with torch.autocast(device_type=z.device.type, enabled=False):
                return gather_rows(z.float(), nearest_slot(pos0, pos1, ok))         # (B, M0, D)
        return dechunk_points(z, p, pos1, ok, pos0, self.sigma)                      # (B, M0, D)


@dataclass
class StageInfo:
    """Statistics of the inner stage of one forward (ChunkInfo.stage1)."""
    router: RouterOutput    # over the stage-0 kept slots: prob, mask (after tail dropping), natural_mask (B, M0max)
    valid: Tensor           # (B, M0max) bool, the stage-0 kept slots
    kept: Tensor            # (B,) long, tokens the inner blocks ran (M1 after tail dropping)
    idx: Tensor             # (B, M1max) long, stage-0 slot of each stage-1 slot
    ok: Tensor              # (B, M1max) bool, real stage-1 tokens


class InnerStage(nn.Module):
    """The modules of stage 1 (the inner blocks themselves stay DCDiT.blocks, so their names do not change)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, downsample_factor: float,
                 encoder_depth: int = 1, decoder_depth: int = 1, dechunker: str = "gaussian",
                 dechunk_sigma: float = 2.0, router_sigma: float = 2.0):
        super().__init__()
        if dechunker not in STAGE1_DECHUNKERS:
            raise ValueError(f"model.stage1_dechunker: expected one of {STAGE1_DECHUNKERS}, got {dechunker!r}")
        if encoder_depth < 0 or decoder_depth < 0:
            raise ValueError(f"stage-1 encoder/decoder depths must be >= 0, got {encoder_depth}, {decoder_depth}")
        self.downsample_factor = check_downsample_factor(downsample_factor)
        self.encoder = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(encoder_depth)])
        self.encoder_norm = nn.RMSNorm(hidden_size, eps=RMS_EPS) if encoder_depth else None
        self.router = SparseCosineRouter(hidden_size, downsample_factor, router_sigma)
        self.dechunk_layer = PointDechunk(dechunker, dechunk_sigma)
        self.residual_proj = nn.Linear(hidden_size, hidden_size)
        self.decoder = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(decoder_depth)])
        self.decoder_norm = nn.RMSNorm(hidden_size, eps=RMS_EPS) if decoder_depth else None

    def _blocks(self, blocks, h, c, layout, grad_checkpointing):
        for block in blocks:
            h = checkpoint(block, h, c, layout, use_reentrant=False) if grad_checkpointing and \
                torch.is_grad_enabled() else block(h, c, layout)                     # same shape
        return h

    def encode(self, h: Tensor, c: Tensor, layout: TokenLayout, grad_checkpointing: bool = False) -> Tensor:
        """Stage-0 kept tokens -> stage-1 encoder output, same layout: (T0, D) | (B, M0max, D)."""
        h = self._blocks(self.encoder, h, c, layout, grad_checkpointing)
        return self.encoder_norm(h) if self.encoder_norm is not None else h

    def route(self, enc: Tensor, pos: Tensor, valid: Tensor, tail_drop: Fraction = 0.0) -> RouterOutput:
        """enc (B, M0max, D) at grid positions pos (B, M0max, 2) -> decisions over the M0max slots."""
        r = self.router(enc, pos, valid)                                             # each (B, M0max)
        if torch.is_tensor(tail_drop) or tail_drop > 0:
            r.mask = drop_lowest_boundaries(r.prob, r.natural_mask, tail_drop)      # (B, M0max)
        return r

    def chunk(self, enc: Tensor, r: RouterOutput, packed: bool):
        """-> (stage-1 tokens (T1, D) | (B, M1max, D), their layout, stage-0 slot idx (B, M1max), valid (B, M1max))."""
        counts = r.mask.sum(1).tolist()                                              # B ints M1_b (host sync)
        z, ok, idx = chunk_tokens(enc, r.mask, r.prob, counts=counts)                # (B, M1max, D), (B, M1max) x2
        layout = TokenLayout.build(ok, packed, counts)
        return layout.pack(z), layout, idx, ok

    def dechunk(self, z: Tensor, r: RouterOutput, idx: Tensor, ok: Tensor, pos: Tensor) -> Tensor:
        """Stage-1 outputs (B, M1max, D) -> every stage-0 slot (B, M0max, D), fp32."""
        return self.dechunk_layer(z, r.prob.float().gather(1, idx), gather_rows(pos, idx), ok, pos)  # (B, M0max, D)

    def decode(self, u: Tensor, enc: Tensor, r: RouterOutput, c: Tensor, layout: TokenLayout,
               grad_checkpointing: bool = False) -> Tensor:
        """u * STE(selected) + residual_proj(enc) on the stage-0 slots, then the stage-1 decoder: (T0, D) | (B, M0max, D)."""
        from .dc_dit import ste_gate
        u = ste_gate(u, r.selected).to(enc.dtype)                                    # (B, M0max, D)
        h = layout.pack(u + self.residual_proj(enc))                                 # (T0, D) | (B, M0max, D)
        h = self._blocks(self.decoder, h, c, layout, grad_checkpointing)
        return self.decoder_norm(h) if self.decoder_norm is not None else h


@contextmanager
def keep_exactly_inner(model: nn.Module, kept: int):
    """Temporarily make a two-stage DC-DiT's inner stage keep exactly `kept` tokens per sample, its highest-p
    ones (FLOP counting and benchmarks at a chosen M1; the router itself still runs)."""
    stage, router = model.stage1, model.stage1.router

    def fixed(x, pos, valid):
        r = router(x, pos, valid)
        if int(valid.sum(1).min()) < kept:
            raise ValueError(f"the inner stage cannot keep {kept} of the {int(valid.sum(1).min())} stage-0 tokens")
        top = r.prob.detach().masked_fill(~valid, -1.0).topk(kept, dim=1).indices  # (B, M1)
        mask = torch.zeros_like(r.mask).scatter(1, top, True)                       # (B, M0max)
        return RouterOutput(prob=r.prob, mask=mask, natural_mask=mask,
                            selected=torch.where(mask, r.prob, 1.0 - r.prob))

    stage.router = _Wrapped(router, fixed)
    try:
        yield model
    finally:
        stage.router = router


class _Wrapped(nn.Module):
    """A router module whose forward is replaced (the original stays a child, so its FLOPs count as the router's)."""

    def __init__(self, router: nn.Module, forward):
        super().__init__()
        self.router, self._forward = router, forward

    def forward(self, *args):
        return self._forward(*args)


def inner_kept_grid(info) -> Tensor:
    """(B, L) bool: the grid positions whose tokens the inner stage kept (for visualisations), from a ChunkInfo.

    Stage 0's kept slots are its kept tokens in raster order, so slot j of sample b is the j-th True of
    info.router.mask[b]; the inner stage's real slots point at those slots."""
    mask0, s1 = info.router.mask, info.stage1
    B, L = mask0.shape
    order = torch.sort((~mask0).to(torch.int8), dim=1, stable=True).indices       # (B, L) kept positions first
    positions = order.gather(1, s1.idx)                                            # (B, M1max) raster positions
    grid = torch.zeros(B, L, dtype=torch.bool, device=mask0.device)
    return grid.scatter(1, positions, s1.ok & s1.router.mask.gather(1, s1.idx))    # (B, L)
