"""Chunk and de-chunk (paper §3.3 "Batched chunking and padding", §3.4).

chunk gathers each sample's boundary tokens, in raster order, into a batch padded to Mmax;
dechunk blends the processed boundary tokens with a confidence-weighted Gaussian kernel on the
(row, col) grid and plugs every one of the L positions back from its nearest kept token.
De-chunkers are modules in the DECHUNKERS registry (`model.dechunker`), built as `Dechunker(sigma)`
with forward(z (B, Mmax, D), prob (B, L), idx, valid (B, Mmax), grid) -> (B, L, D) float32.

Padding slots exist only to give the batch a rectangular shape. They are masked out of smoothing
and plug-back here (and out of attention by the caller), so a sample's output never depends on
what else is in its batch. Memory stays O(B * L * Mmax): no (L, L) tensor is ever built.
"""

from typing import Optional, Tuple

import torch
import torch.nn as nn
from torch import Tensor

_P_MIN = 1e-4  # p clamp of §3.4 (authors' release): keeps (1 - p) and the kernel weights non-zero
_NORM_EPS = 1e-8  # guard of the kernel normalisation (authors' release)
# Kernel weights below exp(-69) ~ 1e-30 are set to exactly 0. Against the self weight K_ii p_i >= 1e-4 of every
# normaliser they are 1e-26 relative, far below float32 (and float64) resolution, so no result changes; left in,
# weights under 1.2e-38 are denormal floats, which x86 multiplies many times slower (docs/performance.md).
_KERNEL_LOG_FLOOR = -69.0


def grid_coords(idx: Tensor, grid: Tuple[int, int]) -> Tensor:
    """(row, col) of raster positions idx (any shape) on grid = (H, W), as float32 (..., 2).

    Used for the Gaussian kernel, for plug-back and for the positional embedding of kept tokens.
    """
    W = int(grid[1])
    return torch.stack([torch.div(idx, W, rounding_mode="floor"), idx % W], dim=-1).float()


def gather_rows(x: Tensor, idx: Tensor) -> Tensor:
    """out[b, i] = x[b, idx[b, i]]: x (B, N, D), idx (B, K) long -> (B, K, D).

    One row lookup per index over the flattened batch (index_select), not gather's lookup per element:
    its backward is a row-wise index_add, several times cheaper (docs/performance.md).
    """
    B, N, D = x.shape
    offsets = torch.arange(B, device=idx.device).unsqueeze(1) * N  # (B, 1)
    flat = x.reshape(B * N, D).index_select(0, (idx + offsets).reshape(-1))  # (B*K, D)
    return flat.view(B, idx.shape[1], D)  # (B, K, D)


def chunk(x: Tensor, mask: Tensor, prob: Tensor, return_counts: bool = False, counts: Optional[list] = None):
    """Gather the kept tokens of every sample into a padded batch.

    x (B, L, D) any dtype, mask (B, L) bool (kept tokens), prob (B, L) boundary probabilities.
    Returns z (B, Mmax, D) in x's dtype (differentiable w.r.t. x), valid (B, Mmax) bool and
    idx (B, Mmax) long raster positions. Slots [0, M_b) hold sample b's kept tokens in raster order;
    slots [M_b, Mmax) hold its highest-p non-boundary tokens in decreasing p (the paper's padding;
    ties among equal p are in topk's order), marked invalid.

    One host sync: the kept counts M_b must be on the host to allocate the batch (Mmax) and, for the
    packed attention layout, to size the packed axis; return_counts=True also returns them (a list of B
    ints) so the caller needs no second sync. A caller that already read them passes `counts`.
    """
    if x.dim() != 3 or mask.shape != x.shape[:2] or prob.shape != x.shape[:2]:
        raise ValueError(f"chunk expects x (B, L, D), mask and prob (B, L); got x {tuple(x.shape)}, "
                         f"mask {tuple(mask.shape)}, prob {tuple(prob.shape)}")
    if mask.dtype != torch.bool:
        raise ValueError(f"chunk expects a bool mask, got {mask.dtype}")
    B, L, _ = x.shape
    count = mask.sum(1)  # (B,) M_b
    if counts is None:
        counts = count.tolist()  # the one host sync
    m_max, m_min = max(counts), min(counts)
    if m_min < 1:
        raise ValueError("chunk: every sample needs at least one kept token (routers force the first "
                         "and last raster tokens); got a sample with none")
    slots = torch.arange(m_max, device=x.device)  # (Mmax,)
    valid = slots.unsqueeze(0) < count.unsqueeze(1)  # (B, Mmax)

    # Kept tokens: slot = running count - 1 (raster order, no sort); others go to a spare column.
    slot_of = torch.where(mask, mask.long().cumsum(1) - 1, m_max)  # (B, L)
    positions = torch.arange(L, device=x.device).expand(B, L)  # (B, L)
    kept_idx = torch.zeros(B, m_max + 1, dtype=torch.long, device=x.device)  # (B, Mmax + 1)
    kept_idx.scatter_(1, slot_of, positions)
    idx = kept_idx[:, :m_max]  # (B, Mmax)

    n_pad = m_max - m_min  # most padding any sample needs
    if n_pad > 0:
        # Sample b needs Mmax - M_b <= L - M_b pads, so its picks are all finite (non-boundary).
        score = prob.detach().masked_fill(mask, float("-inf"))  # (B, L)
        pad_pos = score.topk(n_pad, dim=1, sorted=True).indices  # (B, n_pad) decreasing p
        rank = (slots.unsqueeze(0) - count.unsqueeze(1)).clamp(0, n_pad - 1)  # (B, Mmax)
        idx = torch.where(valid, idx, pad_pos.gather(1, rank))  # (B, Mmax)

    z = gather_rows(x, idx)  # (B, Mmax, D)
    return (z, valid, idx, counts) if return_counts else (z, valid, idx)


def nearest_slot(targets: Tensor, pos: Tensor, valid: Tensor) -> Tensor:
    """For each target point (B, T, 2), the slot of its nearest valid point among pos (B, M, 2): (B, T) long.

    Invalid slots are moved 1e6 cells away, out of reach of any target; ties go to the lower slot (argmin returns
    the first minimum). Coordinates are integers, so squared distances are exact in float32 and both forms below
    give the same argmin, ties included. On a CPU `torch.cdist` in its elementwise mode is one fused (B, T, M) pass
    (its matmul expansion would round under TF32); on CUDA its kernel spends a thread block on every output
    element, so the (B, T, M) squared distances are built from the two coordinate differences instead.
    """
    kept = pos.masked_fill(~valid.unsqueeze(-1), 1e6)  # (B, M, 2)
    if targets.is_cuda:
        d_row = targets[:, :, None, 0] - kept[:, None, :, 0]  # (B, T, M)
        d_col = targets[:, :, None, 1] - kept[:, None, :, 1]  # (B, T, M)
        return (d_row * d_row + d_col * d_col).argmin(dim=2)  # (B, T)
    dist = torch.cdist(targets, kept, compute_mode="donot_use_mm_for_euclid_dist")  # (B, T, M)
    return dist.argmin(dim=2)  # (B, T)


def plug_back_index(idx: Tensor, valid: Tensor, grid: Tuple[int, int]) -> Tensor:
    """For each of the L grid positions, the slot of its nearest valid kept token: (B, L) long.

    Ties go to the lower raster index (valid slots are in raster order, before the padding slots). Exact
    Euclidean nearest neighbour in two separable passes, as a distance transform, in integers; work and memory
    O(B L R) with R = min(H, Mmax) rows that can hold a kept token, never an (L, Mmax) distance table:
      1. Along each row, the nearest kept column of every column, ties to the left: g(r', c) = its distance.
      2. For every position (r, c), the row r' minimising (r - r')^2 + g(r', c)^2 among the rows with a kept
         token (listed in ascending order), ties to the upper row.
    Among all kept tokens at the minimal distance, the upper row and then the left column is the lowest raster
    index, so this is the same token as an argmin over every (position, kept token) pair.
    """
    H, W = int(grid[0]), int(grid[1])
    B, M = idx.shape
    dev = idx.device
    # Slot of every kept grid position (-1 elsewhere); padding slots write into a spare column L.
    where = torch.where(valid, idx, H * W)  # (B, Mmax)
    slot_of = torch.full((B, H * W + 1), -1, dtype=torch.long, device=dev)
    slot_of.scatter_(1, where, torch.arange(M, device=dev).expand(B, -1))
    slot_of = slot_of[:, :H * W]  # (B, L)
    kept = (slot_of >= 0).view(B, H, W)  # (B, H, W)
    far = H + W  # farther than any real distance on the grid: rows without a kept token lose every comparison
    col = torch.arange(W, device=dev)  # (W,)
    left = torch.where(kept, col, -far).cummax(dim=2).values  # (B, H, W) nearest kept column <= c
    right = torch.where(kept, col, 2 * far).flip(2).cummin(dim=2).values.flip(2)  # (B, H, W) nearest >= c
    to_left, to_right = col - left, right - col  # (B, H, W) each
    near_col = torch.where(to_right < to_left, right, left)  # (B, H, W) ties to the left
    g = torch.minimum(to_left, to_right)  # (B, H, W)
    # The candidate rows r': every row with a kept token, ascending (at most Mmax of them), then empty rows.
    rows = torch.arange(H, device=dev)
    R = min(H, M)  # under torch.compile: one graph for Mmax >= H, one more if a batch ever keeps fewer
    src = torch.where(kept.any(2), rows, H + rows).sort(dim=1).indices[:, :R]  # (B, R)
    g_src = g.gather(1, src.unsqueeze(-1).expand(-1, -1, W))  # (B, R, W)
    dr2 = (rows[None, :, None] - src[:, None, :]) ** 2  # (B, H, R) target row r, candidate row r'
    cost = dr2.unsqueeze(-1) + (g_src * g_src).unsqueeze(1)  # (B, H, R, W)
    pick = cost.argmin(dim=2)  # (B, H, W) first minimum: the upper row
    best_row = src.gather(1, pick.view(B, H * W)).view(B, H, W)  # (B, H, W)
    best_col = near_col.gather(1, best_row)  # (B, H, W)
    slot = slot_of.gather(1, (best_row * W + best_col).view(B, H * W))  # (B, L)
    return slot.clamp_min(0)  # a sample without any valid slot takes slot 0, as an argmin over no candidates


@torch.no_grad()
def position_kernel(pos: Tensor, valid: Tensor, sigma: float) -> Tensor:
    """Gaussian kernel between points pos (B, M, 2) in grid units, zero wherever either point is padding or the
    weight is below exp(_KERNEL_LOG_FLOOR): (B, M, M) float32. Positions are integers, so it needs no gradient."""
    d_row = pos[:, :, None, 0] - pos[:, None, :, 0]  # (B, M, M)
    d_col = pos[:, :, None, 1] - pos[:, None, :, 1]  # (B, M, M)
    log_k = (d_row * d_row + d_col * d_col) * (-0.5 / (sigma * sigma))  # (B, M, M)
    keep = (log_k >= _KERNEL_LOG_FLOOR) & valid.unsqueeze(2) & valid.unsqueeze(1)  # (B, M, M)
    return torch.exp(log_k.masked_fill_(~keep, float("-inf")))  # (B, M, M), exp(-inf) = 0


def _masked_kernel(idx: Tensor, valid: Tensor, grid: Tuple[int, int], sigma: float) -> Tensor:
    """position_kernel at the slots' grid positions: (B, Mmax, Mmax) float32."""
    return position_kernel(grid_coords(idx, grid), valid, sigma)


def _smooth(z: Tensor, p: Tensor, kernel: Tensor, valid: Tensor) -> Tensor:
    """o_i = p_i z_i + (1 - p_i) sum_j K_ij p_j z_j / (sum_j K_ij p_j + eps) for z (B, M, D), p (B, M) in fp32."""
    # Zero the padding so nothing there (even inf/nan) can reach a valid token through 0 * z.
    z = z.float().masked_fill(~valid.unsqueeze(-1), 0.0)  # (B, M, D)
    p = p.clamp(_P_MIN, 1.0 - _P_MIN)  # (B, M)
    # W_ij = K_ij p_j factorises, so s = K (p z) / (K p): two batched matmuls, and autograd never keeps or
    # differentiates an (M, M) weight tensor (p's gradient flows through p z and K p).
    p = p.unsqueeze(-1)  # (B, M, 1)
    smoothed = torch.bmm(kernel, p * z) / (torch.bmm(kernel, p) + _NORM_EPS)  # (B, M, D)
    return p * z + (1.0 - p) * smoothed  # (B, M, D)


def dechunk(z: Tensor, prob: Tensor, idx: Tensor, valid: Tensor, grid: Tuple[int, int],
            sigma: float) -> Tensor:
    """De-chunking (§3.4): confidence-weighted Gaussian smoothing of kept tokens, then plug-back.

    z (B, Mmax, D) processed kept tokens, prob (B, L), idx/valid from `chunk`, grid = (H, W),
    sigma in grid cells (1.0 at 256px). With p clamped to [1e-4, 1 - 1e-4] and gathered at idx:
        K_ij = exp(-|pos_i - pos_j|^2 / (2 sigma^2)),  W_ij = K_ij p_j valid_i valid_j,
        s_i = sum_j W_ij z_j / (sum_j W_ij + 1e-8),   o_i = p_i z_i + (1 - p_i) s_i,
    the 2D analogue of H-Net's EMA: confident boundaries keep their features, uncertain ones are
    pulled towards confident neighbours. Each grid position then takes o of its nearest valid kept
    token (`plug_back_index`). K_ij below exp(-69) is stored as 0 (`_KERNEL_LOG_FLOOR`: no fp32 result
    changes, and no denormals reach the matmuls). Runs in float32 (autocast off); returns (B, L, D) float32.
    """
    if not sigma > 0:
        raise ValueError(f"dechunk sigma must be > 0, got {sigma}")
    if z.shape[:2] != idx.shape or valid.shape != idx.shape:
        raise ValueError(f"dechunk expects z (B, Mmax, D), idx and valid (B, Mmax); got z "
                         f"{tuple(z.shape)}, idx {tuple(idx.shape)}, valid {tuple(valid.shape)}")
    with torch.autocast(device_type=z.device.type, enabled=False):
        p = prob.float().gather(1, idx)  # (B, Mmax)
        kernel = _masked_kernel(idx, valid, grid, sigma)  # (B, Mmax, Mmax) K_ij valid_i valid_j, no grad
        out = _smooth(z, p, kernel, valid)  # (B, Mmax, D)
        slot = plug_back_index(idx, valid, grid)  # (B, L)
        return gather_rows(out, slot)  # (B, L, D)


def dechunk_points(z: Tensor, p: Tensor, pos: Tensor, valid: Tensor, targets: Tensor, sigma: float) -> Tensor:
    """`dechunk` between point sets: kept points at pos (B, M, 2) with z (B, M, D) and p (B, M), smoothed as §3.4,
    then every target point (B, T, 2) takes o of its nearest valid kept point -> (B, T, D) float32. The inner stage
    of a two-stage DC-DiT de-chunks its kept tokens back onto the outer stage's kept tokens with it."""
    if not sigma > 0:
        raise ValueError(f"dechunk sigma must be > 0, got {sigma}")
    with torch.autocast(device_type=z.device.type, enabled=False):
        out = _smooth(z, p.float(), position_kernel(pos, valid, sigma), valid)  # (B, M, D)
        return gather_rows(out, nearest_slot(targets, pos, valid))  # (B, T, D)


class GaussianDechunk(nn.Module):
    """The paper's de-chunking (§3.4): `dechunk` with the grid-unit kernel width sigma (1.0 at 256px)."""

    def __init__(self, sigma: float = 1.0):
        super().__init__()
        if not sigma > 0:
            raise ValueError(f"dechunk sigma must be > 0, got {sigma}")
        self.sigma = float(sigma)

    def forward(self, z: Tensor, prob: Tensor, idx: Tensor, valid: Tensor, grid: Tuple[int, int]) -> Tensor:
        return dechunk(z, prob, idx, valid, grid, self.sigma)  # (B, L, D) fp32


class NearestDechunk(nn.Module):
    """Plug-back alone (an ablation of §3.4): every position copies its nearest kept token, no smoothing and no
    confidence mixing, so p reaches the loss only through the STE gate. sigma is unused."""

    def __init__(self, sigma: float = 1.0):
        super().__init__()

    def forward(self, z: Tensor, prob: Tensor, idx: Tensor, valid: Tensor, grid: Tuple[int, int]) -> Tensor:
        with torch.autocast(device_type=z.device.type, enabled=False):
            slot = plug_back_index(idx, valid, grid)  # (B, L)
            return gather_rows(z.float(), slot)  # (B, L, D)


DECHUNKERS = {
    "gaussian": GaussianDechunk,  # §3.4: Gaussian smoothing then nearest plug-back
    "nearest": NearestDechunk,    # ablation: nearest plug-back only
}


def build_dechunker(name: str, sigma: float) -> nn.Module:
    if name not in DECHUNKERS:
        raise ValueError(f"model.dechunker: unknown de-chunker {name!r}; expected one of {', '.join(DECHUNKERS)}")
    return DECHUNKERS[name](sigma)

