"""What every router of the chunking layer shares (paper §3.3), tail dropping, the ratio loss (§3.5), statistics.

A router scores each of the L = H * W encoder tokens with a boundary probability p; tokens with p > 0.5
are boundary tokens and go through the inner DiT blocks, the rest are rebuilt by the de-chunking layer
(models/chunking.py). The routers themselves live in models/routers/, one file each, and all end in
`finish_routing`: the first and last raster tokens are forced to p = 1 so every sample keeps at least two
tokens, the hard mask is p > 0.5 (ties go to "not a boundary", as in H-Net), and `selected` is the
probability of the decision actually taken, which the straight-through gate of §3.1 multiplies into the
de-chunked output so the diffusion loss reaches p.

Router arithmetic runs in float32 with autocast off: under bf16 training a probability near 0.5 could
otherwise round across the threshold and change which tokens the inner network sees.
"""

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from torch import Tensor


@dataclass
class RouterOutput:
    prob: Tensor          # (B, L) float32 boundary probability p; first/last raster tokens are 1
    mask: Tensor          # (B, L) bool, boundary tokens actually kept (after tail dropping)
    natural_mask: Tensor  # (B, L) bool, p > 0.5 before tail dropping (ratio loss, statistics)
    selected: Tensor      # (B, L) float32, p where natural_mask else 1 - p (STE gate, §3.1)


def check_grid(x: Tensor, grid: Tuple[int, int]) -> Tuple[int, int]:
    """Validates a router's input x (B, L, D) against grid = (H, W) and returns (H, W)."""
    if x.dim() != 3:
        raise ValueError(f"router input x must be (B, L, D), got shape {tuple(x.shape)}")
    H, W = int(grid[0]), int(grid[1])
    if H * W != x.shape[1]:
        raise ValueError(f"grid {tuple(grid)} has {H * W} cells but x has L = {x.shape[1]} tokens")
    return H, W


def check_downsample_factor(downsample_factor: float) -> float:
    if not downsample_factor > 1:
        raise ValueError(f"downsample_factor N must be > 1 (target compression), got {downsample_factor}")
    return float(downsample_factor)


def finish_routing(prob: Tensor) -> RouterOutput:
    """Every router's last step: force the endpoints, threshold at 0.5, build the STE gate. prob (B, L) fp32.

    Forcing the first and last raster tokens keeps M >= 2 for every sample (the authors' release
    does the same), so chunking never sees an empty sample.
    """
    L = prob.shape[1]
    ends = torch.zeros(L, dtype=torch.bool, device=prob.device)  # (L,)
    ends[0] = True
    ends[-1] = True
    prob = prob.masked_fill(ends, 1.0)  # (B, L)
    natural_mask = prob > 0.5  # (B, L)
    selected = torch.where(natural_mask, prob, 1.0 - prob)  # (B, L)
    return RouterOutput(prob=prob, mask=natural_mask, natural_mask=natural_mask, selected=selected)


class KeepExactly(nn.Module):
    """Runs a router, then keeps exactly `kept` tokens per sample: the highest-p ones.

    For measuring cost at a chosen M (FLOP counting, benchmarks): the real router's work, and in training
    its gradient path through `selected`, stays in the step; only the decision is overridden. `kept` is one
    M for every sample, or B counts (a list or a (B,) tensor), sample b keeping its top kept[b], so a
    benchmark can give a batch any spread of kept counts. Ties in p go to topk's order; the first and last
    raster tokens carry p = 1, so they are kept whenever M >= 2.
    """

    def __init__(self, router: nn.Module, kept: Union[int, Sequence[int], Tensor]):
        super().__init__()
        self.router = router
        per_sample = isinstance(kept, (list, tuple)) or (isinstance(kept, Tensor) and kept.dim() == 1)
        # Counts live on the host: they are checked against L once per call without a device sync.
        self.kept: Union[int, List[int]] = [int(m) for m in kept] if per_sample else int(kept)

    def forward(self, x: Tensor, grid: Tuple[int, int]) -> RouterOutput:
        r = self.router(x, grid)
        B, L = r.prob.shape
        counts = [self.kept] if isinstance(self.kept, int) else self.kept
        if not all(1 <= m <= L for m in counts) or (isinstance(self.kept, list) and len(counts) != B):
            raise ValueError(f"kept tokens M must be one count or {B} counts, each in [1, L={L}], got {self.kept}")
        k = max(counts)
        top = r.prob.detach().topk(k, dim=1).indices  # (B, k), highest p first
        keep: Union[bool, Tensor] = True
        if isinstance(self.kept, list):  # sample b keeps the first kept[b] of its top k
            rank = torch.arange(k, device=top.device)  # (k,)
            keep = rank < torch.tensor(counts, device=top.device).unsqueeze(1)  # (B, k)
        mask = torch.zeros_like(r.mask).scatter(1, top, keep)  # (B, L)
        selected = torch.where(mask, r.prob, 1.0 - r.prob)  # (B, L)
        return RouterOutput(prob=r.prob, mask=mask, natural_mask=mask, selected=selected)


@contextmanager
def keep_exactly(model: nn.Module, kept: Union[int, Sequence[int], Tensor], packed: Optional[bool] = None):
    """Temporarily route exactly `kept` tokens per sample in a DC-DiT (one count, or one per sample: see
    KeepExactly), and optionally switch its token layout."""
    router, layout = model.router, model.packed
    model.router = KeepExactly(router, kept)
    if packed is not None:
        model.packed = packed
    try:
        yield model
    finally:
        model.router, model.packed = router, layout


def _drop_counts(mask: Tensor, fraction: Union[float, Tensor]) -> Optional[Tensor]:
    """floor(f_b * M_b) per sample, or None when nothing can be dropped (f == 0 as a python float)."""
    B = mask.shape[0]
    if isinstance(fraction, Tensor):
        if fraction.dim() > 1 or (fraction.dim() == 1 and fraction.shape[0] != B):
            raise ValueError(f"fraction must be a float or a ({B},) tensor, got shape {tuple(fraction.shape)}")
        if fraction.device.type == "cpu":
            # A CPU tensor can be checked without a device sync.
            if not bool(((fraction >= 0) & (fraction < 1)).all()):
                raise ValueError(f"fraction values must lie in [0, 1), got {fraction.tolist()}")
            if not bool(fraction.any()):
                return None
        else:
            # On an accelerator a host check would sync; this assert fires asynchronously instead.
            torch._assert_async(((fraction >= 0) & (fraction < 1)).all(), "fraction must lie in [0, 1)")
        f = fraction.to(mask.device)
    else:
        f = float(fraction)
        if not 0.0 <= f < 1.0:
            raise ValueError(f"fraction must lie in [0, 1), got {fraction}")
        if f == 0.0:
            return None
    # float64 so floor(f * M) matches exact arithmetic (0.3 * 10 -> 3); MPS has no float64.
    wide = torch.float32 if mask.device.type == "mps" else torch.float64
    count = mask.sum(1).to(wide)  # (B,)
    f = f.to(wide) if isinstance(f, Tensor) else f
    return torch.floor(f * count).long()  # (B,)


def tail_drop(prob: Tensor, mask: Tensor, fraction: Union[float, Tensor]) -> Tensor:
    """Elastic inference (authors' README): each sample drops its floor(f_b * M_b) lowest-p boundaries.

    fraction: python float or (B,) tensor in [0, 1); f < 1 guarantees a sample keeps >= 1 token.
    Drop order: ascending p; at equal p the first and last raster tokens go last (they carry the
    forced p = 1), other ties drop the higher raster index first. Implemented as one stable sort
    over a fixed pre-order of positions, so it is vectorised and never syncs with the host.
    Returns the new (B, L) bool mask; `prob` is not modified.
    """
    n_drop = _drop_counts(mask, fraction)
    if n_drop is None:
        return mask
    B, L = mask.shape
    device = mask.device
    # Pre-order realising the tie rules: interior positions by descending index, then L-1, then 0.
    pre = torch.cat([torch.arange(L - 2, 0, -1, device=device),
                     torch.tensor([L - 1, 0], device=device)])[:L]  # (L,)
    # Non-boundary tokens sort after every boundary token (p <= 1 < inf) and are never dropped.
    key = prob.detach().float().masked_fill(~mask, float("inf"))[:, pre]  # (B, L) in pre-order
    order = torch.sort(key, dim=1, stable=True).indices  # (B, L) drop order, in pre-order slots
    positions = pre[order]  # (B, L) raster positions, first to drop first
    rank = torch.arange(L, device=device).expand(B, L)  # (B, L)
    dropped_sorted = rank < n_drop.unsqueeze(1)  # (B, L)
    dropped = torch.zeros_like(mask).scatter(1, positions, dropped_sorted)  # (B, L)
    return mask & ~dropped


def ratio_loss(natural_mask: Tensor, prob: Tensor, downsample_factor: float,
               group_size: int = 16, valid: Optional[Tensor] = None) -> Tensor:
    """Compression regulariser (paper §3.5, H-Net): N/(N-1) ((N-1) F G + (1-F)(1-G)).

    F = share of boundary tokens (from the pre-drop mask, no gradient), G = mean p (gradient), both
    over groups of `group_size` consecutive samples; the loss is averaged over groups, each group
    weighted equally. A batch that is not a multiple of group_size ends with a smaller group (the
    authors' release crashes there). Its minimum over F = G is 1, at F = G = 1/N.
    """
    N = check_downsample_factor(downsample_factor)
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    B = prob.shape[0]
    with torch.autocast(device_type=prob.device.type, enabled=False):
        if valid is None:
            f_sample = natural_mask.float().mean(1)  # (B,)
            g_sample = prob.float().mean(1)  # (B,)
        else:  # a padded set of tokens (a two-stage model's inner stage): means over each sample's real slots
            n = valid.float().sum(1)  # (B,)
            f_sample = (natural_mask & valid).float().sum(1) / n  # (B,)
            g_sample = (prob.float() * valid).sum(1) / n  # (B,)
        n_groups = -(-B // group_size)
        group = torch.arange(B, device=prob.device) // group_size  # (B,)
        sizes = [group_size] * (B // group_size) + ([B % group_size] if B % group_size else [])
        size = torch.tensor(sizes, dtype=torch.float32, device=prob.device)  # (G,)
        F_g = torch.zeros(n_groups, device=prob.device).index_add(0, group, f_sample) / size  # (G,)
        G_g = torch.zeros(n_groups, device=prob.device).index_add(0, group, g_sample) / size  # (G,)
        loss = N / (N - 1.0) * ((N - 1.0) * F_g * G_g + (1.0 - F_g) * (1.0 - G_g))  # (G,)
        return loss.mean()


def compression_stats(natural_mask: Tensor) -> Dict[str, Tensor]:
    """Per-sample compression L / M_b and its geometric mean, std, min, max (tensors; caller syncs).

    std is the population std (defined for B = 1). Routers force M_b >= 2; a hand-made mask with
    M_b = 0 gives an infinite ratio.
    """
    L = natural_mask.shape[1]
    ratio = L / natural_mask.sum(1).float()  # (B,)
    return {
        "compression": ratio,
        "compression_geomean": ratio.log().mean().exp(),
        "compression_std": ratio.std(correction=0),
        "compression_min": ratio.min(),
        "compression_max": ratio.max(),
    }
