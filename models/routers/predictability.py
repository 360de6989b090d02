"""The router of the authors' public release: a token is a boundary when its context predicts it badly."""
import math
from typing import Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..routing import RouterOutput, check_downsample_factor, check_grid, finish_routing

BIAS_INITS = ("release", "target")  # the release's constant -1.1 | logit(1/N)
RELEASE_ROUTER_BIAS = -1.1


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
        self.downsample_factor = check_downsample_factor(downsample_factor)
        self.bias_init = bias_init
        if bias_init not in BIAS_INITS:
            raise ValueError(f"PredictabilityRouter bias_init must be one of {BIAS_INITS}, got {bias_init!r}")
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
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The convs keep PyTorch's default init from construction, as the release; only the output bias is set."""
        N = self.downsample_factor
        self.out.bias.fill_(RELEASE_ROUTER_BIAS if self.bias_init == "release" else -math.log(N - 1.0))

    @staticmethod
    def _conv(conv: nn.Conv2d, x: Tensor) -> Tensor:
        # Weights cast to fp32 so a bf16 copy of the model still routes in fp32.
        return F.conv2d(x, conv.weight.float(), conv.bias.float(), padding=conv.padding)

    def forward(self, x: Tensor, grid: Tuple[int, int]) -> RouterOutput:
        H, W = check_grid(x, grid)
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
            return finish_routing(prob)
