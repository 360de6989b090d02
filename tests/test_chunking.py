"""chunk / dechunk (models/chunking.py) against brute-force per-sample references, on tiny CPU tensors."""

import math
import time

import pytest
import torch
from torch.overrides import TorchFunctionMode

from models.chunking import _masked_kernel, chunk, dechunk, gather_rows, grid_coords, plug_back_index


def _random_case(B, H, W, D, keep=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    L = H * W
    prob = torch.rand(B, L, generator=g)  # distinct values (ties have probability ~0)
    mask = torch.rand(B, L, generator=g) < keep
    mask[:, 0] = True  # at least one kept token per sample
    x = torch.randn(B, L, D, generator=g)
    return x, mask, prob


def _chunk_reference(x, mask, prob):
    """Per sample: kept positions in raster order, then non-boundary positions by decreasing p."""
    B, L, _ = x.shape
    m_max = int(mask.sum(1).max())
    rows = []
    for b in range(B):
        kept = [i for i in range(L) if mask[b, i]]
        rest = sorted((i for i in range(L) if not mask[b, i]), key=lambda i: -prob[b, i].item())
        rows.append(kept + rest[: m_max - len(kept)])
    return torch.tensor(rows)


def _dechunk_reference(z, prob, idx, valid, grid, sigma):
    """O(L^2) python loops in float64: Gaussian smoothing over valid slots, nearest-kept plug-back."""
    B, m_max, D = z.shape
    H, W = grid
    out = torch.zeros(B, H * W, D, dtype=torch.float64)
    for b in range(B):
        slots = [j for j in range(m_max) if valid[b, j]]
        pos = {j: divmod(int(idx[b, j]), W) for j in slots}
        p = {j: min(max(float(prob[b, idx[b, j]]), 1e-4), 1 - 1e-4) for j in slots}
        o = {}
        for i in slots:
            w = {j: math.exp(-((pos[i][0] - pos[j][0]) ** 2 + (pos[i][1] - pos[j][1]) ** 2) / (2 * sigma ** 2))
                 * p[j] for j in slots}
            total = sum(w.values()) + 1e-8
            s = sum(w[j] * z[b, j].double() for j in slots) / total
            o[i] = p[i] * z[b, i].double() + (1 - p[i]) * s
        for l in range(H * W):
            r, c = divmod(l, W)
            # nearest kept token, ties to the lower raster index
            best = min(slots, key=lambda j: ((r - pos[j][0]) ** 2 + (c - pos[j][1]) ** 2, int(idx[b, j])))
            out[b, l] = o[best]
    return out


def test_chunk_matches_brute_force():
    x, mask, prob = _random_case(4, 6, 7, 5, seed=1)
    z, valid, idx = chunk(x, mask, prob)
    M = mask.sum(1)
    assert torch.equal(idx, _chunk_reference(x, mask, prob))
    assert torch.equal(valid, torch.arange(int(M.max()))[None] < M[:, None])
    assert torch.equal(z, x[torch.arange(4)[:, None], idx])
    for b in range(4):  # kept tokens in raster order, padding non-boundary
        kept = idx[b, valid[b]]
        assert torch.all(kept[1:] > kept[:-1]) and torch.all(mask[b, kept])
        assert not torch.any(mask[b, idx[b, ~valid[b]]])


def test_chunk_dtype_and_gradient():
    x, mask, prob = _random_case(2, 4, 4, 3, seed=2)
    xb = x.bfloat16().requires_grad_()
    z, valid, idx = chunk(xb, mask, prob)
    assert z.dtype == torch.bfloat16
    z.float().sum().backward()
    counts = torch.zeros(2, 16).scatter_add(1, idx, torch.ones_like(idx, dtype=torch.float))
    assert torch.equal(xb.grad.float()[..., 0], counts)  # one unit of gradient per gathered slot


def test_chunk_dechunk_identity_when_everything_is_kept():
    H, W, D = 4, 5, 6
    x = torch.randn(2, H * W, D)
    mask = torch.ones(2, H * W, dtype=torch.bool)
    prob = torch.ones(2, H * W)
    z, valid, idx = chunk(x, mask, prob)
    assert torch.equal(idx, torch.arange(H * W).expand(2, -1)) and bool(valid.all())
    assert torch.equal(plug_back_index(idx, valid, (H, W)), torch.arange(H * W).expand(2, -1))
    out = dechunk(z, prob, idx, valid, (H, W), sigma=1.0)
    # p is clamped to 1 - 1e-4, so the identity holds to ~1e-4 of the feature scale.
    assert out.dtype == torch.float32 and torch.allclose(out, x, atol=1e-3)


def test_single_kept_token_fills_the_grid():
    H, W, D, k = 5, 5, 3, 12
    x = torch.randn(1, H * W, D)
    prob = torch.rand(1, H * W) * 0.4
    prob[0, k] = 1.0
    mask = torch.zeros(1, H * W, dtype=torch.bool)
    mask[0, k] = True
    z, valid, idx = chunk(x, mask, prob)
    out = dechunk(z, prob, idx, valid, (H, W), sigma=1.0)
    assert torch.allclose(out, x[:, k : k + 1].expand(1, H * W, D), atol=1e-5)


def test_dechunk_matches_brute_force_with_ties():
    H, W, D, sigma = 6, 7, 4, 1.3
    x, mask, prob = _random_case(3, H, W, D, keep=0.25, seed=3)
    # Sample 2: a deliberate tie pattern on a 2x2 lattice of kept tokens: (0, 1), (1, 0), (1, 2)
    # sit at distance 1 from two kept tokens and (1, 1) at distance^2 2 from all four.
    mask[2] = False
    for r, c in [(0, 0), (0, 2), (2, 0), (2, 2), (5, 6)]:
        mask[2, r * W + c] = True
    z, valid, idx = chunk(x, mask, prob)
    z = torch.randn_like(z)  # "processed" tokens
    # Exact 0 / 1 probabilities exercise the [1e-4, 1 - 1e-4] clamp (all-zero p would give s = 0).
    prob[1, mask[1]] = 0.0
    prob[0, mask[0].nonzero()[::2, 0]] = 1.0
    out = dechunk(z, prob, idx, valid, (H, W), sigma)
    ref = _dechunk_reference(z, prob, idx, valid, (H, W), sigma)
    assert torch.allclose(out.double(), ref, atol=1e-5)
    slot = plug_back_index(idx, valid, (H, W))
    # (1, 1) ties four kept tokens at distance 2 -> the lowest raster index, (0, 0), slot 0.
    assert slot[2, 1 * W + 1] == 0 and slot[2, 0 * W + 1] == 0 and slot[2, 1 * W + 0] == 0
    assert idx[2, slot[2, 1 * W + 2]] == 2  # (1, 2): tie (0, 2) vs (2, 2) -> (0, 2)


def _nearest_by_every_pair(idx, valid, grid):
    """Plug-back written out: for every position, the valid slot of least squared distance, then least raster
    index, found by looping over all (position, slot) pairs in integers."""
    H, W = grid
    out = torch.zeros(idx.shape[0], H * W, dtype=torch.long)
    for b in range(idx.shape[0]):
        slots = [(int(idx[b, j]), j) for j in range(idx.shape[1]) if valid[b, j]]
        for pos in range(H * W):
            r, c = divmod(pos, W)
            out[b, pos] = min(slots, key=lambda s: ((r - s[0] // W) ** 2 + (c - s[0] % W) ** 2, s[0]))[1]
    return out


@pytest.mark.parametrize("H, W", [(1, 1), (1, 9), (9, 1), (6, 7), (8, 8), (5, 11)])
def test_plug_back_index_is_the_nearest_kept_token_with_lowest_raster_ties(H, W):
    """The two-pass distance transform equals the argmin over every pair: sparse and dense masks, rows and whole
    columns without a kept token, lattice ties, and padding slots whose idx points anywhere."""
    g = torch.Generator().manual_seed(H * 31 + W)
    for keep in (0.05, 0.3, 0.8):
        mask = torch.rand(4, H * W, generator=g) < keep
        mask[:, int(torch.randint(0, H * W, (1,), generator=g))] = True
        mask[3] = False
        mask[3, ::2] = True  # every other position: many exact ties
        mask[2] = True if keep == 0.8 else mask[2]  # the others get padding slots
        z, valid, idx = chunk(torch.randn(4, H * W, 2, generator=g), mask, torch.rand(4, H * W, generator=g))
        assert torch.equal(plug_back_index(idx, valid, (H, W)), _nearest_by_every_pair(idx, valid, (H, W)))


def test_padding_tie_cannot_win():
    """A padding slot at distance 0 of a position (its own token) never takes it over."""
    H, W = 3, 3
    mask = torch.zeros(2, 9, dtype=torch.bool)
    mask[0, [0, 8]] = True
    mask[1, :] = True  # forces 7 padding slots on sample 0
    prob = torch.linspace(0, 1, 9).expand(2, 9).contiguous()
    z, valid, idx = chunk(torch.randn(2, 9, 2), mask, prob)
    slot = plug_back_index(idx, valid, (H, W))
    assert torch.all(slot[0] <= 1)  # only the two valid slots are ever used


def test_padding_slots_change_nothing():
    H, W, D = 5, 6, 4
    x, mask, prob = _random_case(3, H, W, D, keep=0.2, seed=4)
    mask[1] = True  # sample 1 keeps everything, so the others get many padding slots
    z, valid, idx = chunk(x, mask, prob)
    assert not bool(valid.all())
    out = dechunk(z, prob, idx, valid, (H, W), 1.0)
    garbage = z.clone()
    garbage[~valid] = torch.tensor([1e6, float("nan"), float("inf"), -3.0])
    out2 = dechunk(garbage, prob, idx, valid, (H, W), 1.0)
    assert torch.equal(out, out2)


def test_batch_independence():
    H, W, D = 6, 6, 5
    x, mask, prob = _random_case(2, H, W, D, keep=0.1, seed=5)
    mask[1] = torch.rand(H * W) < 0.9  # very different M
    z, valid, idx = chunk(x, mask, prob)
    z_alone, valid_alone, idx_alone = chunk(x[:1], mask[:1], prob[:1])
    m0 = int(mask[0].sum())
    assert z.shape[1] > z_alone.shape[1] == m0
    assert torch.equal(z[0, :m0], z_alone[0]) and torch.equal(idx[0, :m0], idx_alone[0])
    out = dechunk(z, prob, idx, valid, (H, W), 1.0)
    out_alone = dechunk(z_alone, prob[:1], idx_alone, valid_alone, (H, W), 1.0)
    assert torch.allclose(out[:1], out_alone, atol=1e-6)


def test_dechunk_gradients_and_bf16_input():
    H, W, D = 4, 4, 3
    x, mask, prob = _random_case(2, H, W, D, keep=0.5, seed=6)
    prob = prob.requires_grad_()
    z, valid, idx = chunk(x, mask, prob)
    z = z.bfloat16().requires_grad_()
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        out = dechunk(z, prob, idx, valid, (H, W), 1.0)
    assert out.dtype == torch.float32
    (out * torch.randn_like(out)).sum().backward()
    assert z.grad.abs()[valid].sum() > 0 and torch.all(z.grad[~valid] == 0)
    assert prob.grad.abs().sum() > 0


def test_grid_coords():
    idx = torch.tensor([[0, 4, 5, 11]])
    assert grid_coords(idx, (3, 5)).tolist() == [[[0.0, 0.0], [0.0, 4.0], [1.0, 0.0], [2.0, 1.0]]]


class _LargestTensor(TorchFunctionMode):
    """Records the element count of the largest tensor any torch call returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        for t in result if isinstance(result, (tuple, list)) else (result,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return result


def test_no_quadratic_memory_at_128x128():
    H = W = 128
    B, L, D = 2, H * W, 4
    x = torch.randn(B, L, D)
    prob = torch.rand(B, L)
    mask = torch.zeros(B, L, dtype=torch.bool)
    mask[0, torch.randperm(L)[:8]] = True
    mask[1, torch.randperm(L)[:3]] = True
    start = time.perf_counter()
    with _LargestTensor() as probe:
        z, valid, idx = chunk(x, mask, prob)
        out = dechunk(z, prob, idx, valid, (H, W), 1.0)
    elapsed = time.perf_counter() - start
    assert out.shape == (B, L, D)
    # An (L, L) intermediate would hold 268M elements; allow only O(B * L * max(Mmax, D)).
    assert probe.largest <= B * L * max(8, D), probe.largest
    assert elapsed < 2.0, elapsed


def test_kernel_floor_removes_denormals_and_changes_no_result():
    """Far pairs (weight < exp(-69)) are exact zeros, not denormals (13x slower matmuls on x86); the
    smoothing equals the one with the unfloored fp32 kernel bit for bit, and a float64 reference."""
    H, W, D, sigma = 24, 24, 8, 1.0
    x, mask, prob = _random_case(2, H, W, D, keep=0.3, seed=5)
    z, valid, idx = chunk(x, mask, prob)
    z = torch.randn_like(z)
    kernel = _masked_kernel(idx, valid, (H, W), sigma)
    tiny = torch.finfo(torch.float32).tiny
    assert not ((kernel > 0) & (kernel < tiny)).any()
    pos = grid_coords(idx, (H, W))  # (B, Mmax, 2)
    d2 = ((pos[:, :, None] - pos[:, None]) ** 2).sum(-1)  # (B, Mmax, Mmax)
    pair = valid[:, :, None] & valid[:, None]
    full = torch.exp(-d2 / (2 * sigma ** 2)) * pair  # unfloored: holds denormals
    assert ((full > 0) & (full < tiny)).any()  # the case really has far pairs to floor
    assert torch.equal(kernel == 0, (d2 > 138) | ~pair)

    p = prob.gather(1, idx).clamp(1e-4, 1 - 1e-4).unsqueeze(-1)  # (B, Mmax, 1)
    zm = z.masked_fill(~valid.unsqueeze(-1), 0.0)

    slot = plug_back_index(idx, valid, (H, W)).unsqueeze(-1).expand(-1, -1, D)  # (B, L, D)

    def smooth_and_plug(k, p, zm):  # dechunk's formula with a given kernel
        s = torch.bmm(k, p * zm) / (torch.bmm(k, p) + 1e-8)
        return (p * zm + (1 - p) * s).gather(1, slot)

    out = dechunk(z, prob, idx, valid, (H, W), sigma)
    assert torch.equal(out, smooth_and_plug(full, p, zm))
    ref = smooth_and_plug(torch.exp(-d2.double() / (2 * sigma ** 2)) * pair, p.double(), zm.double())
    torch.testing.assert_close(out.double(), ref, atol=1e-6, rtol=1e-5)


def test_gather_rows_matches_gather_forward_and_backward():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 10, 5, generator=g, requires_grad=True)
    idx = torch.randint(0, 10, (3, 7), generator=g)  # repeats: the backward must sum them
    out = gather_rows(x, idx)
    ref = x.gather(1, idx.unsqueeze(-1).expand(3, 7, 5))
    assert torch.equal(out, ref)
    grad = torch.randn(3, 7, 5, generator=g)
    (gx,) = torch.autograd.grad(out, x, grad)
    (rx,) = torch.autograd.grad(ref, x, grad)
    torch.testing.assert_close(gx, rx)


def test_dechunker_registry():
    """gaussian is dechunk(); nearest copies each position's nearest kept token, unsmoothed (an ablation)."""
    from models.chunking import DECHUNKERS, build_dechunker
    assert set(DECHUNKERS) == {"gaussian", "nearest"}
    torch.manual_seed(0)
    grid = (4, 5)
    L = grid[0] * grid[1]
    mask = torch.zeros(2, L, dtype=torch.bool)
    mask[:, [0, 7, 13, L - 1]] = True
    mask[1, 3] = True
    prob = torch.rand(2, L)
    x = torch.randn(2, L, 6)
    z, valid, idx = chunk(x, mask, prob)
    torch.testing.assert_close(build_dechunker("gaussian", 1.5)(z, prob, idx, valid, grid),
                               dechunk(z, prob, idx, valid, grid, 1.5))
    out = build_dechunker("nearest", 1.0)(z, prob, idx, valid, grid)  # (B, L, D)
    slot = plug_back_index(idx, valid, grid)
    assert torch.equal(out, torch.stack([z[b, slot[b]] for b in range(2)]))
    assert torch.equal(out[mask], x[mask])  # a kept token is its own nearest
    with pytest.raises(ValueError, match="model.dechunker: unknown de-chunker 'ema'"):
        build_dechunker("ema", 1.0)

