"""Random boundaries: the ablation of paper §4.3 (Table 2)."""
from typing import Optional, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from ..routing import RouterOutput, check_downsample_factor, check_grid, finish_routing


class RandomRouter(nn.Module):
    """Random boundaries for the ablation of §4.3 (Table 2).

    Exactly round(L / N) tokens per sample (at least 2, at most L): the first and last raster tokens
    plus a uniformly random subset of the interior drawn without replacement (the first k entries
    of a random permutation, vectorised over the batch). p = the 0/1 decision, so the STE gate is 1
    and no gradient reaches the (parameter-free) router.
    """

    def __init__(self, dim: int, downsample_factor: float):
        super().__init__()
        self.downsample_factor = check_downsample_factor(downsample_factor)

    def reset_parameters(self) -> None:
        """Nothing to initialise: the router has no parameters."""

    def forward(self, x: Tensor, grid: Tuple[int, int],
                generator: Optional[torch.Generator] = None) -> RouterOutput:
        check_grid(x, grid)
        B, L, _ = x.shape
        keep = min(L, max(2, round(L / self.downsample_factor)))
        interior = max(L - 2, 0)
        picks = min(max(keep - 2, 0), interior)
        # generator must live on x's device (torch.rand's rule); None uses the global RNG.
        noise = torch.rand(B, interior, generator=generator, device=x.device)  # (B, L-2)
        chosen = noise.argsort(dim=1)[:, :picks] + 1  # (B, picks) raster positions in [1, L-2]
        mask = torch.zeros(B, L, dtype=torch.bool, device=x.device)  # (B, L)
        mask.scatter_(1, chosen, True)
        return finish_routing(mask.float())
