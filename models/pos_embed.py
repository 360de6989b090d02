"""Fixed 2D sin-cos positional embeddings (MAE / DiT formula).

DiT stores the table for its fixed patch grid as a frozen parameter; DC-DiT instead evaluates the
same formula at each kept token's own (row, col) (paper §3.1: "indexed by each retained token's
original 2D grid position"), possibly scaled so positions land on a pretrained DiT's patch grid.
Both go through `sincos_2d`, so a DC-DiT token at (r, c) with pos_scale 1/p gets exactly the
embedding DiT gives the patch containing it when r, c are multiples of p.
"""

import torch

def sincos_1d(pos: torch.Tensor, dim: int) -> torch.Tensor:
    """(...,) positions -> (..., dim) as cat[sin(pos * w), cos(pos * w)], w_i = 10000^(-i / (dim/2))."""
    if dim % 2:
        raise ValueError(f"sin-cos embedding needs an even dim, got {dim}")
    half = dim // 2
    omega = torch.arange(half, dtype=torch.float64, device=pos.device) / half
    omega = 1.0 / (10000.0 ** omega)                                # (dim/2,)
    angles = pos.to(torch.float64)[..., None] * omega               # (..., dim/2)
    return torch.cat([angles.sin(), angles.cos()], dim=-1).float()  # (..., dim)

def sincos_2d(coords: torch.Tensor, dim: int) -> torch.Tensor:
    """(..., 2) (row, col) coordinates -> (..., dim) embeddings.

    MAE's layout, which DiT inherits: the first half of the channels encodes the column and the
    second half the row (MAE builds its grid with meshgrid(w, h), whose first plane is the column).
    """
    if dim % 4:
        raise ValueError(f"2D sin-cos embedding needs dim divisible by 4, got {dim}")
    col = sincos_1d(coords[..., 1], dim // 2)                       # (..., dim/2)
    row = sincos_1d(coords[..., 0], dim // 2)                       # (..., dim/2)
    return torch.cat([col, row], dim=-1)                            # (..., dim)

def grid_coords(grid_size: int) -> torch.Tensor:
    """(grid_size**2, 2) float (row, col) of every cell in raster order."""
    r = torch.arange(grid_size, dtype=torch.float32)
    rows, cols = torch.meshgrid(r, r, indexing="ij")
    return torch.stack([rows.flatten(), cols.flatten()], dim=-1)

def sincos_2d_grid(dim: int, grid_size: int) -> torch.Tensor:
    """(grid_size**2, dim) table for a square grid in raster order (DiT's `pos_embed`)."""
    return sincos_2d(grid_coords(grid_size), dim)

