"""FLOPs accounting (models/flops.py, tools/flops.py): paper Table 1, closed forms, the exact quadratic in M, Lite-CFG pricing, CLI."""
import json

import pytest
import torch

from conftest import run_script
from config import load_config
from models import create_model
from models.chunking import dechunk
from models.dc_dit import DCDiT
from models.dit import DiT
from models.flops import (count_params, dcdit_flops_coeffs, flop_counter, forward_flops, quadratic, tflops_from_counts,
                          tflops_per_image)
from tools.flops import main as flops_main
from tools.flops import table1_dit_rows

TINY = dict(input_size=8, in_channels=4, hidden_size=64, depth=2, num_heads=4, num_classes=10)


def tiny_dcdit(**kw):
    return DCDiT(**TINY, norm_groups=4, encoder_width=16, **kw)


def counted(fn, *args) -> int:
    with torch.no_grad(), flop_counter() as counter:
        fn(*args)
    return counter.get_total_flops()


def test_table1_dit_rows_match_paper():
    rows = table1_dit_rows()
    assert len(rows) == 8
    for r in rows:
        assert abs(r["tflops"] / r["paper_tflops"] - 1) < 0.01, r
        assert abs(r["params"] / r["paper_params"] - 1) < 0.03, r


def dit_closed_form(input_size, patch, in_ch, D, depth, learn_sigma=True, freq=256):
    """2 FLOPs per multiply-add of every matmul, conv and attention product of DiT (batch 1)."""
    T = (input_size // patch) ** 2
    out = in_ch * (2 if learn_sigma else 1)
    patch_embed = 2 * T * (in_ch * patch * patch) * D
    t_embed = 2 * freq * D + 2 * D * D
    block = (2 * D * 6 * D            # adaLN modulation, once per sample
             + 2 * T * D * 3 * D      # qkv
             + 4 * T * T * D          # QK^T and AV over all heads
             + 2 * T * D * D          # attention output projection
             + 2 * 2 * T * D * 4 * D)  # MLP fc1, fc2
    final = 2 * D * 2 * D + 2 * T * D * patch * patch * out
    return patch_embed + t_embed + depth * block + final


@pytest.mark.parametrize("device", ["cpu", "meta"])
@pytest.mark.parametrize("patch", [1, 2])
def test_dit_flops_equal_closed_form(device, patch):
    with torch.device(device):
        model = DiT(patch_size=patch, **TINY)
    assert forward_flops(model) == dit_closed_form(8, patch, 4, 64, 2)
    assert tflops_per_image(model, steps=10, cfg=True) == pytest.approx(forward_flops(model) * 20 / 1e12)


def test_dcdit_quadratic_fit_exact_on_a_fourth_point():
    model = tiny_dcdit()
    a, b, c = dcdit_flops_coeffs(model)   # fits at M = 2, 16, 32; checks M = 64 internally
    for m in (5, 47):
        assert forward_flops(model, m) == a + b * m + c * m * m
    # The quadratic term is attention (4 M^2 D per block) plus the de-chunking kernel products:
    # K (p z) and K p, 2 M^2 D + 2 M^2.
    assert c == 4 * 64 * 2 + 2 * (64 + 1)


def test_flops_strictly_increase_with_kept_tokens():
    model = tiny_dcdit()
    counts = [forward_flops(model, m) for m in (1, 2, 3, 9, 31, 32, 63, 64)]
    assert all(x < y for x, y in zip(counts, counts[1:])), counts


def test_dcdit_at_full_L_equals_dit_patch1_blocks_plus_scaffold():
    """At M = L the inner blocks see every token, as a DiT with patch 1 does: same blocks, same attention."""
    dc = tiny_dcdit(attention="packed")
    dit = DiT(patch_size=1, **TINY)
    L = 64
    x = torch.zeros(1, 4, 8, 8)
    c = torch.zeros(1, 64)
    enc = torch.zeros(1, L, 64)
    # DiT patch 1 without its patch embedding and final layer = t_embedder + the blocks on L tokens.
    dit_core = forward_flops(dit) - counted(dit.x_embedder, x) - counted(dit.final_layer, enc, c)
    idx, valid = torch.arange(L)[None], torch.ones(1, L, dtype=torch.bool)
    scaffold = (counted(dc.encoder, x, c) + counted(dc.router, enc, (8, 8)) + counted(dc.residual_proj, enc)
                + counted(dechunk, enc, torch.full((1, L), 0.7), idx, valid, (8, 8), 1.0)
                + counted(dc.decoder, enc, c, (8, 8)) + counted(dc.final_layer, torch.zeros(1, L, 16), c))
    assert scaffold > 0 and dit_core > 0
    assert forward_flops(dc, L) == dit_core + scaffold
    # Counting switched the layout and router only temporarily.
    assert dc.packed and type(dc.router).__name__ == "CosineRouter"


def test_dcdit_needs_kept_and_checks_range():
    model = tiny_dcdit()
    with pytest.raises(ValueError, match="kept"):
        forward_flops(model)
    with pytest.raises(ValueError, match=r"\[1, L=64\]"):
        forward_flops(model, 65)


def test_tflops_from_counts_prices_lite_cfg_below_plain_cfg():
    coeffs = (1_000_000, 5_000, 30)
    cond = [[40, 50]] * 3                           # 3 steps, 2 images: cond rows
    plain = [row + row for row in cond]             # plain CFG: uncond rows as many tokens as cond rows
    lite = [row + [10, 12] for row in cond]         # Lite-CFG: cheaper uncond rows
    got_plain = tflops_from_counts(coeffs, plain, cfg=True)
    assert got_plain == pytest.approx(3 * 2 * (quadratic(coeffs, 40) + quadratic(coeffs, 50)) / 2 / 1e12)
    assert tflops_from_counts(coeffs, lite, cfg=True) < got_plain
    # Without CFG every row is an image.
    assert tflops_from_counts(coeffs, cond, cfg=False) == pytest.approx(got_plain / 2)
    with pytest.raises(ValueError, match="even"):
        tflops_from_counts(coeffs, [[1, 2, 3]], cfg=True)


def test_table1_json_cli_has_the_keys():
    proc = run_script(["tools/flops.py", "--table1", "--json"], timeout=600)
    rows = json.loads(proc.stdout)
    assert len(rows) == 12
    for r in rows:
        assert {"name", "params", "tflops", "paper_params", "paper_tflops"} <= set(r), r
    dcdit = [r for r in rows if r["kind"] == "dcdit"]
    # The M that reproduces the paper's TFLOPs/img lies between the ratio-loss targets L/N and L/2.
    assert [r["name"] for r in dcdit] == ["DC-DiT-B N=4", "DC-DiT-B N=16", "DC-DiT-XL N=4", "DC-DiT-XL N=16"]
    for r, n in zip(dcdit, (4, 16, 4, 16)):
        assert 1024 / n < r["kept_for_paper_tflops"] < 1024 / 2


def test_cli_kept_tokens_and_from_json_agree_with_the_api(tmp_path, capsys):
    cfg = "configs/tiny/test-dcdit.yaml"
    kept = [[20, 30, 8, 9], [22, 31, 9, 9]]  # 2 steps, 2 images with CFG (cond rows, then uncond rows)
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"kept_tokens": kept}))

    def cli(*argv):
        flops_main(list(argv))
        return capsys.readouterr()

    single = json.loads(cli("--config", cfg, "--kept-tokens", "20", "--steps", "5", "--json").out)
    from_json = json.loads(cli("--config", cfg, "--from-json", str(path), "--json").out)
    coeffs = single["coeffs"]
    assert single["tflops"] == pytest.approx(quadratic(coeffs, 20) * 5 * 2 / 1e12)
    assert from_json["tflops"] == pytest.approx(tflops_from_counts(coeffs, kept, cfg=True))
    assert single["params"] == pytest.approx(count_params(tiny_dcdit()) / 1e6)
    with pytest.raises(SystemExit) as bad:
        cli("--config", "configs/tiny/test-dit.yaml", "--kept-tokens", "4")
    assert bad.value.code == 2 and "DC-DiT" in capsys.readouterr().err


def test_flops_by_component_sum_to_the_total_and_match_closed_forms():
    """Each part's FLOPs: attention is 6 M D^2 (qkv) + 2 M D^2 (proj) + 4 M^2 D (QK^T, AV) per block, MLP
    16 M D^2 per block (mlp_ratio 4), and the parts add up to forward_flops exactly, for DiT and DC-DiT."""
    from models.flops import component_coeffs, component_flops, stage_flops
    cfg = load_config("configs/tiny/test-dcdit.yaml")
    dc = create_model(cfg.model)
    D, depth = cfg.model.hidden_size, cfg.model.depth
    for M in (2, 17, 64):
        parts = component_flops(dc, M)
        assert sum(parts.values()) == forward_flops(dc, M)
        assert parts["attention"] == depth * (8 * M * D * D + 4 * M * M * D)
        assert parts["mlp"] == depth * 16 * M * D * D
        assert parts["chunk"] == 0 and parts["inner_norm"] == 0  # gathers and norms carry no FLOPs
        assert min(parts[k] for k in ("encoder", "router", "dechunk", "residual", "decoder")) > 0
        stages = stage_flops(parts)  # the same FLOPs by the DCDiT method that runs them, in forward's order
        assert list(stages) == ["condition", "encode", "route", "chunk", "process", "dechunk", "decode"]
        assert all(callable(getattr(dc, name)) for name in stages) and sum(stages.values()) == sum(parts.values())
        assert stages["process"] == parts["attention"] + parts["mlp"] + parts["modulation"]
    coeffs = component_coeffs(dc)
    assert tuple(sum(c[i] for c in coeffs.values()) for i in range(3)) == dcdit_flops_coeffs(dc)
    dit = create_model(load_config("configs/tiny/test-dit.yaml").model)
    parts = component_flops(dit)
    assert sum(parts.values()) == forward_flops(dit) and parts["other"] == 0
    T = (8 // 2) ** 2  # patch-2 tokens of an 8 x 8 latent
    assert parts["attention"] == depth * (8 * T * D * D + 4 * T * T * D)


def test_cli_components_sum_to_the_total(tmp_path, capsys):
    """--components: TFLOPs/img by part, priced as the total (measured counts, a fixed M, a DiT), summing to it."""
    import math
    kept = [[20, 30, 8, 9], [22, 31, 9, 9]]  # 2 steps, 2 images with CFG (cond rows, then uncond rows)
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"kept_tokens": kept}))
    for argv in (["--config", "configs/tiny/test-dcdit.yaml", "--from-json", str(path)],
                 ["--config", "configs/tiny/test-dcdit.yaml", "--kept-tokens", "20", "--steps", "5", "--no-cfg"],
                 ["--config", "configs/tiny/test-dit.yaml", "--steps", "5"]):
        flops_main(argv + ["--components", "--json"])
        r = json.loads(capsys.readouterr().out)
        parts = r["tflops_by_component"]
        assert math.isclose(sum(parts.values()), r["tflops"], rel_tol=1e-9), argv
        assert parts["attention"] > 0 and parts["mlp"] > 0 and all(v >= 0 for v in parts.values())
        flops_main(argv + ["--components"])
        text = capsys.readouterr().out
        assert "attention" in text and text.strip().splitlines()[-1].split()[-1] == "100.00%"  # the sum row
    assert set(parts) == {"condition", "patchify", "attention", "mlp", "modulation", "final_layer", "other"}


def test_tflops_per_step_adds_up_to_the_run():
    from models.flops import tflops_per_step
    coeffs = (1_000_000, 5_000, 30)
    counts = [[40, 50, 10, 12], [30, 44, 9, 9], [20, 21, 3, 4]]  # 3 steps, 2 images under CFG
    per_step = tflops_per_step(coeffs, counts, cfg=True)
    assert per_step.shape == (3,) and per_step[0] > per_step[1] > per_step[2]
    assert per_step.sum() == pytest.approx(tflops_from_counts(coeffs, counts, cfg=True), rel=1e-12)
    assert per_step[2] == pytest.approx(sum(quadratic(coeffs, m) for m in counts[2]) / 2 / 1e12)
