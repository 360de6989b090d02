"""DC-DiT wiring: parameter counts, batch independence, packed == padded, STE gradients, CFG, Lite-CFG."""
import math

import pytest
import torch

from diffusion import create_diffusion
from models.dc_dit import DCDiT, DCDiT_models, ste_gate
from models.routing import tail_drop


def tiny(**kw):
    args = dict(input_size=8, in_channels=4, hidden_size=64, depth=2, num_heads=4, num_classes=10, norm_groups=4,
                encoder_width=16)
    args.update(kw)
    torch.manual_seed(0)  # the random router's draws and any unseeded init must not depend on test order
    return DCDiT(**args)


def randomize(model, std=0.1, seed=0):
    """Trained-looking weights: zero inits (adaLN, final layer, residual_proj) would hide bugs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return model.eval()


@pytest.mark.parametrize("name,paper_m", [("DCDiT-B", 138.0), ("DCDiT-XL", 690.0)])
@pytest.mark.parametrize("router", ["cosine", "predictability"])
def test_parameter_counts_within_2_percent_of_paper(name, paper_m, router):
    with torch.device("meta"):
        model = DCDiT_models[name](router=router)
    n = sum(p.numel() for p in model.parameters()) / 1e6
    assert abs(n - paper_m) / paper_m < 0.02, n


def test_scaffold_is_small_at_b_scale():
    # docs/architecture.md: about 2.8M parameters per side at B scale; inner width D/4 = 192.
    with torch.device("meta"):
        m = DCDiT_models["DCDiT-B"]()
    enc = sum(p.numel() for p in m.encoder.parameters()) / 1e6
    dec = sum(p.numel() for p in m.decoder.parameters()) / 1e6
    assert 2.6 < enc < 3.0 and 2.6 < dec < 3.0
    assert m.encoder.patch_embed.out_channels == 192


def test_output_shape_and_info():
    m = randomize(tiny())
    x = torch.randn(3, 4, 8, 8)
    out, info = m(x, torch.tensor([5, 500, 900]), torch.tensor([1, 2, 3]), return_info=True)
    assert out.shape == (3, 8, 8, 8)
    assert info.router.prob.shape == (3, 64) and info.kept.shape == (3,)
    assert torch.equal(info.kept, info.router.mask.sum(1))
    assert bool((info.router.prob[:, 0] == 1).all() and (info.router.prob[:, -1] == 1).all())


class ContentRouter(torch.nn.Module):
    """A deterministic per-token router for tests: p = sigmoid(<enc, w>). Its decisions depend only on
    each sample's own content, so a batch mixing very different images mixes very different M."""

    def __init__(self, dim):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(dim, generator=torch.Generator().manual_seed(3)))

    def forward(self, x, grid):
        from models.routing import finish_routing
        return finish_routing(torch.sigmoid(x.float() @ self.w))


def _batch_with_varied_m(model):
    """Use the content router and inputs whose kept counts differ a lot within the batch."""
    model.router = ContentRouter(model.hidden_size)
    torch.manual_seed(1)
    x = torch.randn(4, 4, 8, 8)
    x[1] = 0.3
    x[3, :, :4] = -1.0
    return x, torch.tensor([10, 10, 700, 300]), torch.tensor([0, 1, 2, 3])


@pytest.mark.parametrize("attention", ["packed", "padded"])
def test_sample_output_does_not_depend_on_its_batch(attention):
    m = randomize(tiny(attention=attention))
    x, t, y = _batch_with_varied_m(m)
    with torch.no_grad():
        full, info = m(x, t, y, return_info=True)
        assert info.kept.max() - info.kept.min() >= 8, info.kept  # the batch really mixes different M
        for i in range(4):
            alone = m(x[i:i + 1], t[i:i + 1], y[i:i + 1])
            torch.testing.assert_close(alone, full[i:i + 1], atol=2e-5, rtol=1e-4)


def test_packed_and_padded_paths_agree_forward_and_backward():
    packed = randomize(tiny(attention="packed"))
    x, t, y = _batch_with_varied_m(packed)
    padded = tiny(attention="padded")
    padded.router = ContentRouter(padded.hidden_size)
    padded.load_state_dict(packed.state_dict())
    padded.eval()
    out_a = packed(x, t, y)
    out_b = padded(x, t, y)
    torch.testing.assert_close(out_a, out_b, atol=2e-5, rtol=1e-4)
    out_a.square().mean().backward()
    out_b.square().mean().backward()
    for (name, pa), (_, pb) in zip(packed.named_parameters(), padded.named_parameters()):
        if pa.grad is not None:
            torch.testing.assert_close(pa.grad, pb.grad, atol=1e-5, rtol=1e-3, msg=name)


def test_padding_tokens_are_never_attended():
    from models.attention import Attention, TokenLayout
    attn = Attention(16, 2)
    valid = torch.tensor([[True, True, True, False, False], [True, True, True, True, True]])
    z = torch.randn(2, 5, 16)
    z2 = z.clone()
    z2[0, 3:] = 1e3  # garbage in padding slots
    for packed in (False, True):
        layout = TokenLayout.build(valid, packed)
        a = layout.unpack(attn(layout.pack(z), layout))
        b = layout.unpack(attn(layout.pack(z2), layout))
        torch.testing.assert_close(a[valid], b[valid])
        ref = attn(z[:1, :3])  # sample 0 alone, no padding at all
        torch.testing.assert_close(a[0, :3], ref[0], atol=1e-6, rtol=1e-5)


def test_router_gets_gradients_from_diffusion_loss_alone():
    for router in ("cosine", "predictability"):
        m = tiny(router=router)
        m.train()
        with torch.no_grad():  # break adaLN-Zero / zero residual so the graph carries signal
            for p in m.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        diffusion = create_diffusion("")
        x = torch.randn(4, 4, 8, 8)
        t = torch.randint(0, 1000, (4,))
        loss = diffusion.training_losses(m, x, t, dict(y=torch.tensor([1, 2, 3, 4])))["loss"].mean()
        loss.backward()
        grads = [p.grad for p in m.router.parameters()]
        assert grads and all(g is not None for g in grads)
        assert sum(g.abs().sum() for g in grads) > 0, router


def _xavier_bound(weight):
    fan_out, fan_in = weight.shape[0], weight[0].numel()
    return math.sqrt(6.0 / (fan_in + fan_out))


def test_initialisation_follows_the_release_where_the_paper_is_silent():
    """residual_proj and the 3x3 patch-embed conv are xavier-uniform with zero bias (the release's init pass);
    the cosine router's projections stay the identity and its averaging kernel 1/9 (§3.3)."""
    m = tiny()
    for w, b in ((m.residual_proj.weight, m.residual_proj.bias),
                 (m.encoder.patch_embed.weight, m.encoder.patch_embed.bias)):
        bound = _xavier_bound(w)
        assert torch.count_nonzero(b) == 0
        assert w.abs().max() <= bound and w.abs().max() > 0.8 * bound  # uniform over the whole xavier range
    assert torch.equal(m.router.q_proj.weight, torch.eye(64)) and torch.equal(m.router.k_proj.weight, torch.eye(64))
    assert torch.all(m.router.k_avg.weight == 1.0 / 9.0)
    assert torch.count_nonzero(tiny(residual_init="zero").residual_proj.weight) == 0  # H-Net's option


@pytest.mark.parametrize("bias_init,n,expected", [("release", 4.0, -1.1), ("release", 16.0, -1.1),
                                                  ("target", 4.0, -math.log(3.0)), ("target", 16.0, -math.log(15.0))])
def test_predictability_router_output_bias(bias_init, n, expected):
    m = tiny(router="predictability", downsample_factor=n, router_args={"bias_init": bias_init})
    assert torch.allclose(m.router.out.bias, torch.tensor([expected]))


def test_inner_norm_is_an_rmsnorm_before_dechunking():
    """With inner_norm the inner stack ends in RMSNorm(D) (eps 1e-5, as the release): scaling the last block's
    output leaves the de-chunked path unchanged; without it the output changes."""
    m = randomize(tiny())
    assert isinstance(m.inner_norm, torch.nn.RMSNorm) and m.inner_norm.eps == 1e-5
    assert "inner_norm.weight" in m.state_dict()
    assert "inner_norm.weight" not in tiny(inner_norm=False).state_dict()
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.tensor([1, 2])
    last = m.blocks[-1]
    with torch.no_grad():
        ref = m(x, t, y)
        handle = last.register_forward_hook(lambda mod, inp, out: 7.0 * out)
        scaled = m(x, t, y)
        handle.remove()
        m.inner_norm = None
        handle = last.register_forward_hook(lambda mod, inp, out: 7.0 * out)
        unnormed_scaled = m(x, t, y)
        handle.remove()
        unnormed = m(x, t, y)
    assert torch.allclose(scaled, ref, atol=1e-5)  # RMSNorm(7 h) = RMSNorm(h) up to eps
    assert not torch.allclose(unnormed_scaled, unnormed, atol=1e-3)
    assert not torch.allclose(unnormed, ref, atol=1e-3)


def test_tail_drop_reduces_tokens_monotonically_with_floor_arithmetic():
    m = randomize(tiny())
    x = torch.randn(2, 4, 8, 8)
    t, y = torch.tensor([100, 100]), torch.tensor([1, 2])
    with torch.no_grad():
        _, base = m(x, t, y, return_info=True)
        m_nat = base.router.natural_mask.sum(1)
        prev = None
        for f in (0.0, 0.3, 0.6, 0.9):
            _, info = m(x, t, y, return_info=True, tail_drop=f)
            expect = m_nat - torch.floor(f * m_nat.double()).long()
            assert torch.equal(info.kept, expect)
            assert torch.equal(info.router.natural_mask, base.router.natural_mask)
            if prev is not None:
                assert bool((info.kept <= prev).all())
            prev = info.kept
        # Per-sample fractions.
        _, info = m(x, t, y, return_info=True, tail_drop=torch.tensor([0.0, 0.5]))
        assert info.kept[0] == m_nat[0] and info.kept[1] == m_nat[1] - m_nat[1] // 2


def test_lite_cfg_uncond_branch_runs_fewer_tokens():
    m = randomize(tiny())
    x = torch.randn(2, 4, 8, 8)
    xx = torch.cat([x, x])
    t = torch.tensor([50, 50, 50, 50])
    y = torch.tensor([1, 2, 10, 10])
    with torch.no_grad():
        plain, info_plain = m.forward_with_cfg(xx, t, y, 2.0, return_info=True)
        lite, info = m.forward_with_cfg(xx, t, y, 2.0, tail_drop=0.0, uncond_tail_drop=0.9, return_info=True)
    assert bool((info.kept[2:] < info.kept[:2]).all()), info.kept
    assert torch.equal(info.kept[:2], info_plain.kept[:2])
    assert plain.shape == lite.shape == (4, 8, 8, 8)
    assert torch.equal(lite[:2, :3], lite[2:, :3])  # guided channels are shared by both halves


def test_random_router_ablation_keeps_round_l_over_n():
    m = randomize(tiny(router="random", downsample_factor=4.0))
    _, info = m(torch.randn(3, 4, 8, 8), torch.tensor([1, 2, 3]), torch.tensor([0, 0, 0]), return_info=True)
    assert info.kept.tolist() == [16, 16, 16]


def test_tail_drop_function_is_used_by_model():
    prob = torch.tensor([[1.0, 0.9, 0.6, 0.7, 1.0]])
    mask = prob > 0.5
    assert tail_drop(prob, mask, 0.5).tolist() == [[True, True, False, False, True]]


def test_layout_from_host_counts_matches_the_mask():
    from models.attention import TokenLayout
    from models.chunking import chunk
    mask = torch.zeros(3, 20, dtype=torch.bool)
    mask[0, [0, 5, 19]] = True
    mask[1, :] = True
    mask[2, [0, 19]] = True
    prob = torch.rand(3, 20)
    z, valid, idx, counts = chunk(torch.randn(3, 20, 8), mask, prob, return_counts=True)
    assert counts == [3, 20, 2]
    layout = TokenLayout.build(valid, True, counts)
    flat = valid.flatten().nonzero().squeeze(1)  # the reference: positions of real slots
    assert torch.equal(layout.flat_idx, flat)
    assert torch.equal(layout.batch_idx, flat // valid.shape[1])
    assert layout.cu_seqlens.tolist() == [0, 3, 23, 25] and layout.cu_seqlens.diff().tolist() == counts
    rebuilt = TokenLayout.build(valid, True)  # counts read from the mask instead
    assert torch.equal(rebuilt.flat_idx, layout.flat_idx) and torch.equal(rebuilt.cu_seqlens, layout.cu_seqlens)
    torch.testing.assert_close(layout.unpack(layout.pack(z)), z * valid.unsqueeze(-1))


def test_ste_gate_is_identity_forward_and_product_gradient():
    """ste_gate(u, s) = u in value; gradients as u * s evaluated at s = 1: grad to u unchanged, grad to s
    the per-token <grad, u>."""
    g = torch.Generator().manual_seed(0)
    u = torch.randn(2, 6, 4, generator=g, requires_grad=True)
    s = torch.rand(2, 6, generator=g, requires_grad=True)
    out = ste_gate(u, s)
    assert torch.equal(out, u)
    grad = torch.randn(2, 6, 4, generator=g)
    gu, gs = torch.autograd.grad(out, (u, s), grad)
    assert torch.equal(gu, grad)
    ones = torch.ones(2, 6, requires_grad=True)
    (ref,) = torch.autograd.grad(u * ones.unsqueeze(-1), ones, grad)
    torch.testing.assert_close(gs, ref)


def test_pos_embed_table_is_the_formula_at_each_kept_position_and_not_saved():
    from models.chunking import grid_coords
    from models.pos_embed import sincos_2d
    m = DCDiT(input_size=6, hidden_size=32, depth=1, num_heads=4, num_classes=10, norm_groups=8, pos_scale=0.5)
    idx = torch.tensor([[0, 7, 35], [3, 20, 29]])
    ref = sincos_2d(grid_coords(idx, (6, 6)) * 0.5, 32)
    torch.testing.assert_close(m.pos_embed(idx), ref, atol=0, rtol=0)
    assert "pos_table" not in m.state_dict()  # derived from the config: checkpoints keep their keys


def test_scaffold_layouts():
    """c3 adds a conv block per side; c1D1 puts a DiT block (dense attention over the grid) in the encoder after
    the width change and one before it in the decoder; parameters and FLOPs follow; a sample still ignores its
    batch; a side that must change width without a conv block is a one-line error."""
    from models.flops import component_flops
    from models.isotropic import GridDiTBlock, ResBlock
    base = tiny()
    deeper = tiny(encoder_layout="c3", decoder_layout="c3")
    mixed = randomize(tiny(encoder_layout="c1D1", decoder_layout="d1c1"))
    assert [type(b) for b in deeper.encoder.blocks] == [ResBlock] * 3
    assert [type(b) for b in mixed.encoder.blocks] == [ResBlock, GridDiTBlock]
    assert mixed.encoder.blocks[1].block.attn.qkv.in_features == 64          # after the change: width D
    assert [type(b) for b in mixed.decoder.blocks] == [GridDiTBlock, ResBlock]
    assert mixed.decoder.blocks[0].block.mlp is None and mixed.decoder.blocks[0].block.attn.qkv.in_features == 64
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(deeper) > count(base) and count(mixed) != count(base)
    f_base, f_mixed = component_flops(base, 20), component_flops(mixed, 20)
    assert f_mixed["encoder"] != f_base["encoder"] and f_mixed["attention"] == f_base["attention"]
    x, t, y = torch.randn(3, 4, 8, 8), torch.tensor([3, 500, 900]), torch.tensor([1, 2, 3])
    with torch.no_grad():
        out = mixed(x, t, y)
        alone = mixed(x[1:2], t[1:2], y[1:2])
    torch.testing.assert_close(alone, out[1:2], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"model.encoder_layout 'D2': changing width 16 <-> 64 needs a conv block"):
        tiny(encoder_layout="D2")
    with pytest.raises(ValueError, match=r"model.decoder_layout 'x2'"):
        tiny(decoder_layout="x2")
