"""Routers of the chunking layer (paper §3.3), tail dropping, the ratio loss (§3.5), statistics.

A router scores every one of the L = H * W encoder tokens with a boundary probability p; tokens with
p > 0.5 are boundary tokens and go through the inner DiT blocks, the rest are reconstructed by the
de-chunking layer (models/chunking.py). Three routers share one post-processing step
(`_finish_routing`): the first and last raster tokens are forced to p = 1 so every sample keeps at
least two tokens, the hard mask is p > 0.5 (ties go to "not a boundary", as in H-Net), and
`selected` is the probability of the decision actually taken, which the straight-through gate of
§3.1 multiplies into the de-chunked output so the diffusion loss reaches p.

All router arithmetic runs in float32 with autocast off: under bf16 training a probability near 0.5
could otherwise round across the threshold and change which tokens the inner network sees.
"""

import math
from dataclasses import dataclass
from typing import Dict, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


# Initial output bias of the predictability router: the release's constant, or logit(1/N).
ROUTER_BIAS_INITS = ("release", "target")
RELEASE_ROUTER_BIAS = -1.1


@dataclass
class RouterOutput:
    prob: Tensor          # (B, L) float32 boundary probability p; first/last raster tokens are 1
    mask: Tensor          # (B, L) bool, boundary tokens actually kept (after tail dropping)
    natural_mask: Tensor  # (B, L) bool, p > 0.5 before tail dropping (ratio loss, statistics)
    selected: Tensor      # (B, L) float32, p where natural_mask else 1 - p (STE gate, §3.1)


def _check_grid(x: Tensor, grid: Tuple[int, int]) -> Tuple[int, int]:
    """Validates x (B, L, D) against grid = (H, W) and returns (H, W)."""
    if x.dim() != 3:
        raise ValueError(f"router input x must be (B, L, D), got shape {tuple(x.shape)}")
    H, W = int(grid[0]), int(grid[1])
    if H * W != x.shape[1]:
        raise ValueError(f"grid {tuple(grid)} has {H * W} cells but x has L = {x.shape[1]} tokens")
    return H, W


def _check_downsample_factor(downsample_factor: float) -> float:
    if not downsample_factor > 1:
        raise ValueError(f"downsample_factor N must be > 1 (target compression), got {downsample_factor}")
    return float(downsample_factor)


def _finish_routing(prob: Tensor) -> RouterOutput:
    """Shared by every router: force the endpoints, threshold at 0.5, build the STE gate.

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


def _safe_norm(x: Tensor) -> Tuple[Tensor, Tensor]:
    """max(|x|, 1e-12) over the last dim (F.normalize's eps: a zero vector has cosine 0 with everything)
    and whether the clamp was inactive (the norm's gradient flows).

    eps is a literal: torch.compile (2.14) fails on a module global or a default argument read inside an
    autograd.Function's forward ("lift_tracked_freevar_to_input should not be called on root SubgraphTracer").
    """
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)  # (..., 1)
    return norm.clamp_min(1e-12), norm >= 1e-12


class _Normalize(torch.autograd.Function):
    """F.normalize(x, dim=-1) with a hand-written backward: (g - x_hat <g, x_hat>) / |x| in two passes
    over (B, L, D) instead of autograd's chain through the division and the norm."""

    @staticmethod
    def forward(ctx, x):
        norm, live = _safe_norm(x)  # (..., 1) x2
        x_hat = x / norm  # (..., D)
        ctx.save_for_backward(x_hat, norm, live)
        return x_hat

    @staticmethod
    def backward(ctx, g):
        x_hat, norm, live = ctx.saved_tensors
        radial = torch.linalg.vecdot(g, x_hat).unsqueeze(-1) * live  # (..., 1), 0 where the clamp held
        return torch.addcmul(g, x_hat, radial, value=-1.0).div_(norm)  # (..., D)


class _Cosine(torch.autograd.Function):
    """<q / |q|, k / |k|> over the last dim (F.normalize's eps) from the norms, without normalised copies;
    hand-written backward, two passes per input: dq = g / (|q||k|) k - g s / |q|^2 q, and symmetrically."""

    @staticmethod
    def forward(ctx, q, k):
        q_norm, q_live = _safe_norm(q)  # (..., 1) x2
        k_norm, k_live = _safe_norm(k)  # (..., 1) x2
        s = torch.linalg.vecdot(q, k).unsqueeze(-1) / (q_norm * k_norm)  # (..., 1)
        ctx.save_for_backward(q, k, q_norm, k_norm, q_live, k_live, s)
        return s.squeeze(-1)  # (...)

    @staticmethod
    def backward(ctx, g):
        q, k, q_norm, k_norm, q_live, k_live, s = ctx.saved_tensors
        g = g.unsqueeze(-1)  # (..., 1)
        cross = g / (q_norm * k_norm)  # (..., 1)
        gs = g * s  # (..., 1)
        dq = torch.addcmul(cross * k, q, gs * q_live / (q_norm * q_norm), value=-1.0)  # (..., D)
        dk = torch.addcmul(cross * q, k, gs * k_live / (k_norm * k_norm), value=-1.0)  # (..., D)
        return dq, dk


class CosineRouter(nn.Module):
    """The paper's router (§3.3): p_i = (1 - <q_i, k_bar_i>) / 2.

    q and k are identity-initialised projections of the encoder output, l2-normalised; k_bar is the
    l2-normalised 3x3 neighbourhood average of the keys (a depthwise conv initialised to 1/9, zero
    padding), so s_i approximates the mean cosine similarity between a token and its neighbours.
    A token unlike its neighbourhood gets p near 1 and is kept; a token like it is dropped.
    At initialisation (identity projections, uniform average) the router is a pure local-novelty
    detector, which is why those three weights are flagged `_no_reinit` for the model's init pass.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.k_avg = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim, bias=False)
        with torch.no_grad():
            self.q_proj.weight.copy_(torch.eye(dim))
            self.k_proj.weight.copy_(torch.eye(dim))
            self.k_avg.weight.fill_(1.0 / 9.0)
        for weight in (self.q_proj.weight, self.k_proj.weight, self.k_avg.weight):
            weight._no_reinit = True

    def forward(self, x: Tensor, grid: Tuple[int, int]) -> RouterOutput:
        H, W = _check_grid(x, grid)
        B, L, D = x.shape
        with torch.autocast(device_type=x.device.type, enabled=False):
            # q and k in one matmul (one GEMM and no gradient sum for x in the backward pass).
            w = torch.cat([self.q_proj.weight, self.k_proj.weight]).float()  # (2D, D)
            q, k = F.linear(x.float(), w).chunk(2, dim=-1)  # 2 x (B, L, D)
            k = _Normalize.apply(k)  # (B, L, D)
            # The (B, L, D) tokens are a channels-last (B, D, H, W) image as they are: no transposed copies,
            # and the conv's channels-last output reads back as a contiguous (B, L, D).
            k = k.view(B, H, W, D).permute(0, 3, 1, 2)  # (B, D, H, W) channels-last view
            k_bar = F.conv2d(k, self.k_avg.weight.float(), padding=1, groups=D)  # (B, D, H, W)
            k_bar = k_bar.permute(0, 2, 3, 1).reshape(B, L, D)  # (B, L, D)
            s = _Cosine.apply(q, k_bar)  # (B, L)
            prob = ((1.0 - s) / 2.0).clamp(0.0, 1.0)  # (B, L)
            return _finish_routing(prob)


class PredictabilityRouter(nn.Module):
    """The router of the authors' public release: how badly a token is predicted by its context.

    z = Conv1x1(D -> D/4)(x); r = z - Conv3x3(z) is the residual of predicting each token from its
    3x3 neighbourhood; logit = Conv1x1(D/4 -> 1)(SiLU(GroupNorm(Conv3x3(r)))); p = sigmoid(logit).
    The last bias starts at `bias_init`: "release" = -1.1 for every N, as the authors' code (the
    value that produced the paper's numbers; sigmoid(-1.1) = 0.25 = 1/N only at N = 4), or "target" =
    logit(1/N) = -ln(N - 1), so the mean p starts at the ratio loss's optimum for any N (at N = 16 the
    release's bias starts p four times above it and leaves the ratio loss to pull it down).
    """

    def __init__(self, dim: int, downsample_factor: float, norm_groups: int = 8, bias_init: str = "release"):
        super().__init__()
        N = _check_downsample_factor(downsample_factor)
        if bias_init not in ROUTER_BIAS_INITS:
            raise ValueError(f"PredictabilityRouter bias_init must be one of {ROUTER_BIAS_INITS}, got {bias_init!r}")
        if dim % 4 != 0:
            raise ValueError(f"PredictabilityRouter needs dim divisible by 4 (width D/4), got dim={dim}")
        hidden = dim // 4
        if hidden % norm_groups != 0:
            raise ValueError(
                f"PredictabilityRouter: norm_groups={norm_groups} must divide the width dim/4={hidden}")
        self.reduce = nn.Conv2d(dim, hidden, kernel_size=1)
        self.context = nn.Conv2d(hidden, hidden, kernel_size=3, padding=1)
        self.score = nn.Conv2d(hidden, hidden, kernel_size=3, padding=1)
        self.norm = nn.GroupNorm(norm_groups, hidden)
        self.out = nn.Conv2d(hidden, 1, kernel_size=1)
        with torch.no_grad():
            self.out.bias.fill_(RELEASE_ROUTER_BIAS if bias_init == "release" else -math.log(N - 1.0))

    @staticmethod
    def _conv(conv: nn.Conv2d, x: Tensor) -> Tensor:
        # Weights cast to fp32 so a bf16 copy of the model still routes in fp32.
        return F.conv2d(x, conv.weight.float(), conv.bias.float(), padding=conv.padding)

    def forward(self, x: Tensor, grid: Tuple[int, int]) -> RouterOutput:
        H, W = _check_grid(x, grid)
        B, L, D = x.shape
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = x.float().transpose(1, 2).reshape(B, D, H, W)  # (B, D, H, W)
            z = self._conv(self.reduce, x)  # (B, D/4, H, W)
            r = z - self._conv(self.context, z)  # (B, D/4, H, W)
            h = self._conv(self.score, r)  # (B, D/4, H, W)
            h = F.group_norm(h, self.norm.num_groups, self.norm.weight.float(), self.norm.bias.float(),
                             self.norm.eps)
            logit = self._conv(self.out, F.silu(h))  # (B, 1, H, W)
            prob = torch.sigmoid(logit.reshape(B, L))  # (B, L)
            return _finish_routing(prob)


class RandomRouter(nn.Module):
    """Random boundaries for the ablation of §4.3 (Table 2).

    Exactly round(L / N) tokens per sample (at least 2, at most L): the first and last raster tokens
    plus a uniformly random subset of the interior drawn without replacement (the first k entries
    of a random permutation, vectorised over the batch). p = the 0/1 decision, so the STE gate is 1
    and no gradient reaches the (parameter-free) router.
    """

    def __init__(self, downsample_factor: float):
        super().__init__()
        self.downsample_factor = _check_downsample_factor(downsample_factor)

    def forward(self, x: Tensor, grid: Tuple[int, int],
                generator: Optional[torch.Generator] = None) -> RouterOutput:
        _check_grid(x, grid)
        B, L, _ = x.shape
        keep = min(L, max(2, round(L / self.downsample_factor)))
        interior = max(L - 2, 0)
        picks = min(max(keep - 2, 0), interior)
        # generator must live on x's device (torch.rand's rule); None uses the global RNG.
        noise = torch.rand(B, interior, generator=generator, device=x.device)  # (B, L-2)
        chosen = noise.argsort(dim=1)[:, :picks] + 1  # (B, picks) raster positions in [1, L-2]
        mask = torch.zeros(B, L, dtype=torch.bool, device=x.device)  # (B, L)
        mask.scatter_(1, chosen, True)
        return _finish_routing(mask.float())


def build_router(kind: str, dim: int, downsample_factor: float, norm_groups: int = 8,
                 bias_init: str = "release") -> nn.Module:
    """Router factory for the config key `router`."""
    if kind == "cosine":
        return CosineRouter(dim)
    if kind == "predictability":
        return PredictabilityRouter(dim, downsample_factor, norm_groups=norm_groups, bias_init=bias_init)
    if kind == "random":
        return RandomRouter(downsample_factor)
    raise ValueError(f"unknown router kind {kind!r}; choices: 'cosine', 'predictability', 'random'")


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
               group_size: int = 16) -> Tensor:
    """Compression regulariser (paper §3.5, H-Net): N/(N-1) ((N-1) F G + (1-F)(1-G)).

    F = share of boundary tokens (from the pre-drop mask, no gradient), G = mean p (gradient), both
    over groups of `group_size` consecutive samples; the loss is averaged over groups, each group
    weighted equally. A batch that is not a multiple of group_size ends with a smaller group (the
    authors' release crashes there). Its minimum over F = G is 1, at F = G = 1/N.
    """
    N = _check_downsample_factor(downsample_factor)
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    B = prob.shape[0]
    with torch.autocast(device_type=prob.device.type, enabled=False):
        f_sample = natural_mask.float().mean(1)  # (B,)
        g_sample = prob.float().mean(1)  # (B,)
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
