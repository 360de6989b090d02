"""The paper's cosine router (§3.3): a token is a boundary when it is unlike its 3x3 neighbourhood."""
from typing import Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..routing import RouterOutput, check_downsample_factor, check_grid, finish_routing


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
    detector; `reset_parameters` restores exactly that, and the model's generic init leaves routers alone.
    downsample_factor is not used: the cosine needs no prior on N (the ratio loss sets the budget).
    """

    def __init__(self, dim: int, downsample_factor: float):
        super().__init__()
        check_downsample_factor(downsample_factor)
        self.dim = dim
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.k_avg = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim, bias=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """W_Q = W_K = I and a uniform 3x3 average (§3.3)."""
        self.q_proj.weight.copy_(torch.eye(self.dim))
        self.k_proj.weight.copy_(torch.eye(self.dim))
        self.k_avg.weight.fill_(1.0 / 9.0)

    def forward(self, x: Tensor, grid: Tuple[int, int]) -> RouterOutput:
        H, W = check_grid(x, grid)
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
            return finish_routing(prob)
