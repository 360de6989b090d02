"""DiT backbone: public checkpoint layout, shapes, CFG batching, label dropout, positional embedding."""
import numpy as np
import pytest
import torch

from models.dit import DIT_SIZES, DiT, DiT_models, LabelEmbedder, TimestepEmbedder
from models.pos_embed import sincos_2d, sincos_2d_grid


def expected_layout(depth, hidden, patch, in_ch=4, input_size=32, num_classes=1000, learn_sigma=True):
    """The public DiT state dict, written out from the architecture (not from our code)."""
    out_ch = in_ch * 2 if learn_sigma else in_ch
    d = {
        "pos_embed": (1, (input_size // patch) ** 2, hidden),
        "x_embedder.proj.weight": (hidden, in_ch, patch, patch), "x_embedder.proj.bias": (hidden,),
        "t_embedder.mlp.0.weight": (hidden, 256), "t_embedder.mlp.0.bias": (hidden,),
        "t_embedder.mlp.2.weight": (hidden, hidden), "t_embedder.mlp.2.bias": (hidden,),
        "y_embedder.embedding_table.weight": (num_classes + 1, hidden),
        "final_layer.linear.weight": (patch * patch * out_ch, hidden), "final_layer.linear.bias": (patch * patch * out_ch,),
        "final_layer.adaLN_modulation.1.weight": (2 * hidden, hidden), "final_layer.adaLN_modulation.1.bias": (2 * hidden,),
    }
    for i in range(depth):
        b = f"blocks.{i}."
        d.update({b + "attn.qkv.weight": (3 * hidden, hidden), b + "attn.qkv.bias": (3 * hidden,),
                  b + "attn.proj.weight": (hidden, hidden), b + "attn.proj.bias": (hidden,),
                  b + "mlp.fc1.weight": (4 * hidden, hidden), b + "mlp.fc1.bias": (4 * hidden,),
                  b + "mlp.fc2.weight": (hidden, 4 * hidden), b + "mlp.fc2.bias": (hidden,),
                  b + "adaLN_modulation.1.weight": (6 * hidden, hidden), b + "adaLN_modulation.1.bias": (6 * hidden,)})
    return d


@pytest.mark.parametrize("name", list(DiT_models))
def test_registry_state_dict_matches_public_layout(name):
    size, patch = name[len("DiT-"):].split("/")
    depth, hidden, _ = DIT_SIZES[size]
    with torch.device("meta"):
        model = DiT_models[name](input_size=32, num_classes=1000)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == expected_layout(depth, hidden, int(patch))


def test_public_parameter_counts():
    # The public DiT code counts DiT-XL/2 675.13M, DiT-B/2 130.51M (pos_embed included).
    with torch.device("meta"):
        xl, b = DiT_models["DiT-XL/2"](), DiT_models["DiT-B/2"]()
    assert sum(p.numel() for p in xl.parameters()) == 675_129_632
    assert round(sum(p.numel() for p in b.parameters()) / 1e6, 2) == 130.51


def test_strict_load_round_trip_and_pos_embed_frozen(tmp_path):
    m = DiT(input_size=8, patch_size=2, hidden_size=64, depth=2, num_heads=4, num_classes=10)
    path = tmp_path / "dit.pt"
    torch.save(m.state_dict(), path)
    m2 = DiT(input_size=8, patch_size=2, hidden_size=64, depth=2, num_heads=4, num_classes=10)
    m2.load_state_dict(torch.load(path, weights_only=True), strict=True)
    assert not m2.pos_embed.requires_grad and "pos_embed" in m2.state_dict()


def _mae_pos_embed(dim, grid):
    """The MAE numpy recipe DiT uses, written independently here."""
    gh = np.arange(grid, dtype=np.float32)
    gw = np.arange(grid, dtype=np.float32)
    g = np.stack(np.meshgrid(gw, gh), axis=0).reshape(2, 1, grid, grid)

    def one(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    return np.concatenate([one(dim // 2, g[0]), one(dim // 2, g[1])], axis=1)


def test_pos_embed_matches_mae_formula_and_arbitrary_coords():
    table = sincos_2d_grid(64, 6)
    np.testing.assert_allclose(table.numpy(), _mae_pos_embed(64, 6), atol=1e-6)
    # DC-DiT evaluates the same formula at a token's own (row, col): raster index r*6+c.
    coords = torch.tensor([[2.0, 5.0], [4.0, 1.0]])
    np.testing.assert_allclose(sincos_2d(coords, 64).numpy(), table[[2 * 6 + 5, 4 * 6 + 1]].numpy(), atol=1e-6)


def test_timestep_embedding_order_cos_then_sin():
    e = TimestepEmbedder.timestep_embedding(torch.tensor([0.0, 3.0]), 8)
    assert torch.allclose(e[0], torch.tensor([1.0] * 4 + [0.0] * 4))
    assert torch.allclose(e[1, 0], torch.cos(torch.tensor(3.0)))


@pytest.mark.parametrize("patch", [1, 2, 4])
def test_forward_shapes_and_zero_init_output(patch):
    m = DiT(input_size=8, patch_size=patch, in_channels=4, hidden_size=64, depth=2, num_heads=4, num_classes=10)
    x = torch.randn(3, 4, 8, 8)
    out = m(x, torch.tensor([1, 500, 999]), torch.tensor([0, 3, 9]))
    assert out.shape == (3, 8, 8, 8)
    assert torch.count_nonzero(out) == 0  # adaLN-Zero: final layer starts at zero


def test_unpatchify_inverts_patch_order():
    m = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=1, num_heads=4, num_classes=10,
            learn_sigma=False)
    img = torch.randn(2, 4, 8, 8)
    # Patchify by hand in DiT's token layout (p, q, c) and check unpatchify inverts it.
    tokens = img.reshape(2, 4, 4, 2, 4, 2).permute(0, 2, 4, 3, 5, 1).reshape(2, 16, 16)
    assert torch.equal(m.unpatchify(tokens), img)


def test_forward_with_cfg_guides_first_three_channels():
    torch.manual_seed(0)
    m = DiT(input_size=8, patch_size=2, hidden_size=32, depth=1, num_heads=4, num_classes=10)
    for p in m.parameters():  # leave zero init so the output depends on the inputs
        torch.nn.init.normal_(p, std=0.05)
    x = torch.randn(2, 4, 8, 8)
    xx = torch.cat([x, x])
    t = torch.tensor([10, 20, 10, 20])
    y = torch.tensor([1, 2, 10, 10])
    m.eval()
    out = m.forward_with_cfg(xx, t, y, cfg_scale=4.0)
    raw = m(xx, t, y)
    cond, uncond = raw[:2], raw[2:]
    expect = uncond[:, :3] + 4.0 * (cond[:, :3] - uncond[:, :3])
    assert torch.allclose(out[:2, :3], expect, atol=1e-5) and torch.allclose(out[2:, :3], expect, atol=1e-5)
    assert torch.equal(out[:, 3:], raw[:, 3:])  # 4th eps channel and variance pass through
    all_ch = m.forward_with_cfg(xx, t, y, cfg_scale=4.0, guide_channels=0)
    assert torch.allclose(all_ch[:2, :4], uncond[:, :4] + 4.0 * (cond[:, :4] - uncond[:, :4]), atol=1e-5)
    assert torch.equal(all_ch[:, 4:], raw[:, 4:])


def test_label_dropout_uses_null_class():
    emb = LabelEmbedder(num_classes=10, hidden_size=8, dropout_prob=0.5)
    assert emb.embedding_table.num_embeddings == 11
    labels = torch.arange(10).repeat(100)
    torch.manual_seed(0)
    dropped = emb.token_drop(labels)
    frac = (dropped == 10).float().mean().item()
    assert 0.45 < frac < 0.55
    assert torch.equal(dropped[dropped != 10], labels[dropped != 10])
    forced = emb.token_drop(labels[:4], force_drop_ids=torch.tensor([1, 0, 1, 0]))
    assert forced.tolist() == [10, 1, 10, 3]
    # Eval without forcing: no dropout.
    assert torch.equal(emb(labels[:5], train=False), emb.embedding_table(labels[:5]))
