"""Routers, tail dropping, ratio loss and statistics (models/routing.py), on tiny CPU tensors."""

import math

import pytest
import torch

from models.routers import (ROUTERS, CosineRouter, PredictabilityRouter, RandomRouter, RouterArgsError,
                            build_router)
from models.routing import KeepExactly, RouterOutput, compression_stats, keep_exactly, ratio_loss, tail_drop


def _check_common(out: RouterOutput):
    """The post-processing shared by all routers."""
    assert out.prob.dtype == torch.float32 and out.selected.dtype == torch.float32
    assert torch.all(out.prob[:, 0] == 1) and torch.all(out.prob[:, -1] == 1)
    assert torch.equal(out.natural_mask, out.prob > 0.5)
    assert torch.equal(out.mask, out.natural_mask)
    expected = torch.where(out.natural_mask, out.prob, 1 - out.prob)
    assert torch.equal(out.selected, expected)


# ---------------------------------------------------------------- fixed budgets (KeepExactly)

class _FixedProb(torch.nn.Module):
    """A router stub returning the given p, whatever the input."""

    def __init__(self, prob):
        super().__init__()
        self.prob = prob

    def forward(self, x, grid):
        mask = self.prob > 0.5
        return RouterOutput(self.prob, mask, mask, torch.where(mask, self.prob, 1 - self.prob))


@pytest.mark.parametrize("as_tensor", [False, True])
def test_keep_exactly_per_sample_counts_keep_the_top_p(as_tensor):
    prob = torch.tensor([[0.9, 0.1, 0.8, 0.2, 0.7, 0.3],
                         [0.1, 0.2, 0.3, 0.4, 0.5, 0.6],
                         [0.5, 0.5, 0.5, 0.5, 0.5, 0.5]])
    counts = torch.tensor([3, 1, 4]) if as_tensor else [3, 1, 4]
    r = KeepExactly(_FixedProb(prob), counts)(torch.zeros(3, 6, 2), (2, 3))
    assert r.mask.sum(1).tolist() == [3, 1, 4]                             # ties (row 3): any 4, exactly 4
    assert r.mask[0].tolist() == [True, False, True, False, True, False]   # the three highest p
    assert r.mask[1].tolist() == [False] * 5 + [True]
    assert torch.equal(r.natural_mask, r.mask) and torch.equal(r.prob, prob)
    assert torch.equal(r.selected, torch.where(r.mask, prob, 1 - prob))
    # One count for every sample is the same as that count repeated.
    same = KeepExactly(_FixedProb(prob[:2]), 2)(torch.zeros(2, 6, 2), (2, 3))
    assert torch.equal(same.mask, KeepExactly(_FixedProb(prob[:2]), [2, 2])(torch.zeros(2, 6, 2), (2, 3)).mask)


@pytest.mark.parametrize("kept", [[3, 1], [0, 1, 1], [7, 1, 1], 0, 7])
def test_keep_exactly_rejects_bad_counts(kept):
    with pytest.raises(ValueError, match=r"kept tokens M must be one count or 3 counts, each in \[1, L=6\]"):
        KeepExactly(_FixedProb(torch.full((3, 6), 0.5)), kept)(torch.zeros(3, 6, 2), (2, 3))


def test_keep_exactly_context_reaches_the_inner_blocks_and_restores_the_model():
    from models.dc_dit import DCDiT
    torch.manual_seed(0)
    dc = DCDiT(input_size=8, hidden_size=32, depth=1, num_heads=2, num_classes=4, encoder_width=8,
               norm_groups=4).eval()
    router, packed = dc.router, dc.packed
    x, t, y = torch.randn(3, 4, 8, 8), torch.tensor([1, 500, 999]), torch.tensor([0, 1, 2])
    for layout in (True, False):
        with torch.no_grad(), keep_exactly(dc, [4, 28, 16], packed=layout):
            assert dc.packed is layout
            _, info = dc(x, t, y, return_info=True)
        assert info.kept.tolist() == [4, 28, 16]
    assert dc.router is router and dc.packed == packed


# ---------------------------------------------------------------- cosine router (§3.3)

def test_cosine_router_identity_init_is_a_novelty_detector():
    H, W, D = 5, 6, 8
    router = CosineRouter(D, 4)
    assert torch.equal(router.q_proj.weight, torch.eye(D)) and torch.equal(router.k_proj.weight, torch.eye(D))
    assert torch.allclose(router.k_avg.weight, torch.full_like(router.k_avg.weight, 1 / 9))
    v = torch.randn(D)
    x = v.expand(2, H * W, D).clone()  # a constant image
    out = router(x, (H, W))
    _check_common(out)
    interior = out.prob[:, 1:-1]
    assert torch.allclose(interior, torch.zeros_like(interior), atol=1e-6)  # zero padding included
    k = 2 * W + 3  # an isolated token opposite to its surroundings
    x[1, k] = -v
    out = router(x, (H, W))
    assert out.prob[1, k] > 0.99 and out.mask[1, k]
    others = torch.cat([out.prob[1, 1:k], out.prob[1, k + 1:-1]])
    assert torch.all(others < 0.5)  # neighbours still see mostly their own kind
    assert torch.allclose(out.prob[0, 1:-1], torch.zeros(H * W - 2), atol=1e-6)  # sample 0 untouched
    x[0, 7] = 0.0  # a zero feature has cosine 0 with everything: p = 0.5 exactly, not a boundary
    out = router(x, (H, W))
    assert out.prob[0, 7] == 0.5 and not out.natural_mask[0, 7]


def test_cosine_router_gradients_reach_all_weights():
    torch.manual_seed(0)
    router = CosineRouter(8, 4)
    x = torch.randn(2, 20, 8)
    out = router(x, (4, 5))
    (out.prob * torch.randn_like(out.prob)).sum().backward()
    for name, p in router.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_cosine_router_rejects_bad_grid():
    with pytest.raises(ValueError, match="grid"):
        CosineRouter(4, 4)(torch.randn(1, 12, 4), (3, 5))


def test_router_is_fp32_under_bf16_autocast():
    torch.manual_seed(0)
    for router in (CosineRouter(16, 4), PredictabilityRouter(16, 4, norm_groups=2)):
        x = torch.randn(2, 36, 16)
        ref = router(x, (6, 6))
        with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
            out = router(x.bfloat16(), (6, 6))
        assert out.prob.dtype == torch.float32 and out.selected.dtype == torch.float32
        # Same input values (x was rounded to bf16 only at the boundary) -> fp32 math matches.
        ref_b = router(x.bfloat16().float(), (6, 6))
        assert torch.allclose(out.prob, ref_b.prob, atol=1e-6)
        assert torch.equal(out.mask, ref_b.mask)
        assert ref.prob.dtype == torch.float32


# ---------------------------------------------------------------- predictability router (release)

def test_predictability_router_starts_near_one_over_n():
    torch.manual_seed(0)
    N = 4
    router = PredictabilityRouter(32, N, norm_groups=8, bias_init="target")
    assert math.isclose(router.out.bias.item(), -math.log(N - 1), rel_tol=1e-6)
    x = torch.randn(4, 64, 32)
    out = router(x, (8, 8))
    _check_common(out)
    assert abs(out.prob[:, 1:-1].mean().item() - 1 / N) < 0.1  # default weights: near logit(1/N)
    with torch.no_grad():
        router.out.weight.zero_()
    out = router(x, (8, 8))
    assert torch.allclose(out.prob[:, 1:-1], torch.full((4, 62), 1 / N), atol=1e-6)
    out.prob.sum().backward()
    assert router.out.bias.grad.abs() > 0


def test_predictability_router_validates_widths():
    with pytest.raises(ValueError, match="norm_groups"):
        PredictabilityRouter(32, 4, norm_groups=3)
    with pytest.raises(ValueError, match="downsample_factor"):
        PredictabilityRouter(32, 1.0)


# ---------------------------------------------------------------- random router (§4.3)

def test_random_router_exact_count_and_randomness():
    B, H, W, N = 6, 5, 7, 4
    x = torch.zeros(B, H * W, 3)
    router = RandomRouter(3, N)
    out = router(x, (H, W), generator=torch.Generator().manual_seed(1))
    _check_common(out)
    assert torch.all(out.mask.sum(1) == round(H * W / N))
    assert torch.all(out.mask[:, 0]) and torch.all(out.mask[:, -1])
    assert torch.equal(out.prob, out.mask.float())
    assert len({tuple(m.tolist()) for m in out.mask}) > 1  # samples differ
    again = router(x, (H, W), generator=torch.Generator().manual_seed(1))
    assert torch.equal(again.mask, out.mask)  # reproducible with a seeded generator


def test_build_router_reads_the_registry_and_checks_options():
    assert isinstance(build_router("cosine", 8, 4), CosineRouter)
    assert isinstance(build_router("predictability", 32, 4), PredictabilityRouter)
    assert isinstance(build_router("random", 8, 4), RandomRouter)
    assert build_router("predictability", 32, 16, bias_init="target").out.bias.item() == pytest.approx(-math.log(15))
    with pytest.raises(RouterArgsError, match="'learned'.*cosine, predictability, random"):
        build_router("learned", 8, 4)
    with pytest.raises(RouterArgsError, match=r"model\.router_args\.bias: not an option.*norm_groups, bias_init"):
        build_router("predictability", 32, 4, bias=0.0)
    with pytest.raises(RouterArgsError, match=r"router_args\.norm_groups: expected int"):
        build_router("predictability", 32, 4, norm_groups="8")


@pytest.mark.parametrize("name", list(ROUTERS))
def test_every_registered_router_keeps_the_contract(name):
    """What DCDiT relies on from any router: fp32 p and selected under bf16 autocast, forced endpoints, the
    0.5 threshold, selected = p or 1 - p, gradients to every parameter, and reset_parameters restoring a
    deterministic init (the model's generic init never touches a router)."""
    torch.manual_seed(0)
    H, W, D = 6, 6, 32
    router = build_router(name, D, 4)
    with torch.no_grad():
        for p in router.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    x = torch.randn(3, H * W, D)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        out = router(x.bfloat16(), (H, W))
    _check_common(out)
    out = router(x, (H, W))
    if list(router.parameters()):  # the random router has none: nothing to learn
        (out.selected * torch.randn_like(out.selected)).sum().backward()
        for pname, p in router.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, (name, pname)
    torch.manual_seed(1)
    a = build_router(name, D, 4).state_dict()
    router.reset_parameters()
    b = router.state_dict()
    fixed = {k for k in a if torch.equal(a[k], b[k])}
    torch.manual_seed(2)
    c = build_router(name, D, 4).state_dict()
    # What reset_parameters restores is seed-independent (a fixed init such as the identity or -1.1).
    assert fixed <= {k for k in a if torch.equal(a[k], c[k])}
    assert bool(fixed) == bool(a)  # and a router with parameters restores some


# ---------------------------------------------------------------- tail dropping (README)

def _tail_drop_reference(prob, mask, fractions):
    """Per-sample python loop: drop floor(f M) boundaries by (p, endpoint last, higher index first)."""
    B, L = mask.shape
    out = mask.clone()
    for b in range(B):
        kept = [i for i in range(L) if mask[b, i]]
        n = math.floor(fractions[b] * len(kept))
        order = sorted(kept, key=lambda i: (prob[b, i].item(), i in (0, L - 1), -i))
        for i in order[:n]:
            out[b, i] = False
    return out


def test_tail_drop_zero_is_identity_and_bad_fraction_raises():
    prob = torch.rand(3, 10)
    mask = prob > 0.3
    assert tail_drop(prob, mask, 0.0) is mask
    for bad in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError, match="fraction"):
            tail_drop(prob, mask, bad)
    with pytest.raises(ValueError, match="fraction"):
        tail_drop(prob, mask, torch.tensor([0.1, 1.0, 0.2]))
    with pytest.raises(ValueError, match="fraction"):
        tail_drop(prob, mask, torch.tensor([0.1, 0.2]))


def test_tail_drop_half_counts_and_matches_brute_force():
    torch.manual_seed(0)
    B, L = 5, 40
    prob = torch.rand(B, L)
    prob[:, 0] = 1
    prob[:, -1] = 1
    mask = prob > 0.5
    new = tail_drop(prob, mask, 0.5)
    M = mask.sum(1)
    assert torch.equal(new.sum(1), M - torch.div(M, 2, rounding_mode="floor"))
    assert not torch.any(new & ~mask)  # only boundary tokens can be dropped
    assert torch.equal(new, _tail_drop_reference(prob, mask, [0.5] * B))


def test_tail_drop_per_sample_fractions_and_ties():
    torch.manual_seed(1)
    B, L = 4, 30
    # Quantised p creates many ties; endpoints share p with interior tokens in sample 3.
    prob = (torch.rand(B, L) * 4).floor() / 4 + 0.25
    prob[:, 0] = 1
    prob[:, -1] = 1
    mask = prob > 0.5
    fractions = torch.tensor([0.0, 0.3, 0.7, 0.95])
    new = tail_drop(prob, mask, fractions)
    assert torch.equal(new, _tail_drop_reference(prob, mask, fractions.tolist()))
    assert torch.equal(new[0], mask[0])
    # Endpoints (p = 1) outlive interior tokens with the same p = 1; the higher index goes first.
    p = torch.full((1, 6), 1.0)
    m = torch.ones(1, 6, dtype=torch.bool)
    assert tail_drop(p, m, 0.5).tolist() == [[True, True, False, False, False, True]]
    assert tail_drop(p, m, 0.8).tolist() == [[True, False, False, False, False, True]]
    ends_only = torch.tensor([[True, False, False, True]])
    assert tail_drop(torch.ones(1, 4), ends_only, 0.5).tolist() == [[True, False, False, False]]


# ---------------------------------------------------------------- ratio loss (§3.5)

def _mask_with_share(B, L, share):
    mask = torch.zeros(B, L, dtype=torch.bool)
    mask[:, : round(share * L)] = True
    return mask


def test_ratio_loss_minimum_on_the_diagonal():
    N, B, L = 4, 16, 64
    for share_f in (0.0, 0.125, 0.25, 0.5, 0.75, 1.0):
        for g in (0.0, 0.1, 0.25, 0.6, 1.0):
            loss = ratio_loss(_mask_with_share(B, L, share_f), torch.full((B, L), g), N)
            expected = N / (N - 1) * ((N - 1) * share_f * g + (1 - share_f) * (1 - g))
            assert math.isclose(loss.item(), expected, abs_tol=1e-6)
            if share_f == g:  # F = G (the router's regime): 1 only at 1/N, above 1 elsewhere
                assert (loss.item() > 1 + 1e-3) == (share_f != 1 / N)
    at_target = ratio_loss(_mask_with_share(B, L, 0.25), torch.full((B, L), 0.25), N)
    assert math.isclose(at_target.item(), 1.0, abs_tol=1e-6)


def test_ratio_loss_remainder_group_and_gradient():
    torch.manual_seed(0)
    N, B, L = 4, 20, 16
    prob = torch.rand(B, L, requires_grad=True)
    mask = torch.rand(B, L) > 0.7
    loss = ratio_loss(mask, prob, N, group_size=16)
    groups = [(0, 16), (16, 20)]
    ref = 0.0
    for s, e in groups:
        Fg = mask[s:e].float().mean()
        Gg = prob[s:e].mean()
        ref = ref + N / (N - 1) * ((N - 1) * Fg * Gg + (1 - Fg) * (1 - Gg)) / len(groups)
    assert loss.shape == () and torch.allclose(loss, ref)
    loss.backward()
    assert prob.grad is not None and prob.grad.abs().sum() > 0
    assert not mask.requires_grad
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        assert ratio_loss(mask, prob.bfloat16(), N).dtype == torch.float32


# ---------------------------------------------------------------- statistics

def test_compression_stats():
    mask = torch.zeros(3, 16, dtype=torch.bool)
    mask[0, :2] = True
    mask[1, :4] = True
    mask[2, :8] = True
    stats = compression_stats(mask)
    assert torch.equal(stats["compression"], torch.tensor([8.0, 4.0, 2.0]))
    assert math.isclose(stats["compression_geomean"].item(), 4.0, rel_tol=1e-6)
    assert stats["compression_min"].item() == 2.0 and stats["compression_max"].item() == 8.0
    assert math.isclose(stats["compression_std"].item(), torch.tensor([8.0, 4, 2]).std(correction=0).item())


def test_cosine_router_matches_the_normalised_formula():
    """The router computes <q/|q|, k_bar/|k_bar|> from norms, with q and k in one matmul and the conv on a
    channels-last view; it must equal §3.3's formula written out, in value and in every gradient."""
    torch.manual_seed(0)
    H, W, D = 4, 5, 8
    router = CosineRouter(D, 4)
    with torch.no_grad():
        for w in (router.q_proj.weight, router.k_proj.weight, router.k_avg.weight):
            w.add_(torch.randn_like(w) * 0.3)
    x = torch.randn(2, H * W, D, requires_grad=True)
    weight = torch.randn(2, H * W)

    def literal(x):
        q = torch.nn.functional.normalize(x @ router.q_proj.weight.T, dim=-1)
        k = torch.nn.functional.normalize(x @ router.k_proj.weight.T, dim=-1)
        k_img = k.transpose(1, 2).reshape(2, D, H, W).contiguous()
        k_bar = torch.nn.functional.conv2d(k_img, router.k_avg.weight, padding=1, groups=D)
        k_bar = torch.nn.functional.normalize(k_bar.flatten(2).transpose(1, 2), dim=-1)
        prob = ((1 - (q * k_bar).sum(-1)) / 2).clamp(0, 1)
        prob[:, 0] = 1.0
        prob[:, -1] = 1.0
        return prob

    params = [x] + list(router.parameters())
    got = router(x, (H, W)).prob
    ref = literal(x)
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-5)
    for g, r in zip(torch.autograd.grad((got * weight).sum(), params),
                    torch.autograd.grad((ref * weight).sum(), params)):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-4)


def test_router_hand_written_backwards_pass_gradcheck():
    """_Normalize and _Cosine against finite differences in float64, and against F.normalize's own
    autograd at a zero vector (inside the eps clamp, where finite differences do not apply)."""
    from models.routers.cosine import _Cosine, _Normalize
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 6, dtype=torch.float64, generator=g, requires_grad=True)
    k = torch.randn(2, 5, 6, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(_Normalize.apply, (x,))
    assert torch.autograd.gradcheck(_Cosine.apply, (x, k))
    z = x.detach().clone()
    z[0, 2] = 0.0  # F.normalize gives 0 there and a gradient of 1 / eps, not the radial projection
    z.requires_grad_(True)
    weight = torch.randn(2, 5, 6, dtype=torch.float64, generator=g)
    (ref,) = torch.autograd.grad((torch.nn.functional.normalize(z, dim=-1) * weight).sum(), z)
    (got,) = torch.autograd.grad((_Normalize.apply(z) * weight).sum(), z)
    torch.testing.assert_close(got, ref)
    cosine = (torch.nn.functional.normalize(z, dim=-1) * torch.nn.functional.normalize(k, dim=-1)).sum(-1)
    ref = torch.autograd.grad((cosine * weight[..., 0]).sum(), (z, k))
    got = torch.autograd.grad((_Cosine.apply(z, k) * weight[..., 0]).sum(), (z, k))
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b)
