"""sampling.py and sample.py: grids, chunking_viz (x_t rows, per-sample files, --no-visualize), the run summary
(JSON, figure), --profile, per-image seeds (batch independence), tail dropping, Lite-CFG, flag errors."""
import argparse
import copy
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

import sample
import sampling
import visualize
from config import config_to_dict, load_config, main_guard
from data import to_uint8_images
from models import create_model

# A pixel-space DC-DiT small enough for a 2-core CPU: 1 x 8 x 8 "digits", width 32, one inner block.
TINY_DCDIT = ["data.kind=digits", "model.name=DCDiT-S", "model.input_size=8", "model.in_channels=1",
              "model.num_classes=10", "model.hidden_size=32", "model.num_heads=2", "model.depth=1",
              "model.encoder_width=8", "model.norm_groups=4", "model.router=predictability",
              "sample.num_sampling_steps=4", "sample.cfg_scale=2.0", "sample.guide_channels=0"]
TINY_DIT = ["data.kind=digits", "model.name=DiT-S/2", "model.input_size=8", "model.in_channels=1",
            "model.num_classes=10", "model.hidden_size=32", "model.num_heads=2", "model.depth=1",
            "sample.num_sampling_steps=3", "sample.cfg_scale=2.0", "sample.guide_channels=0"]


def make_checkpoint(path, overrides=TINY_DCDIT, seed=0, router_bias=0.0):
    """A training-format checkpoint ({model, ema, opt, config, step}) with trained-looking weights.

    Fresh weights hide bugs (zero-initialised adaLN and output layers make every sample alike), so all
    weights get noise; the predictability router's output bias is set to `router_bias` so the router
    keeps a realistic share of tokens (~55% at 0.0) instead of the 2 forced endpoints of a fresh model.
    """
    cfg = load_config(None, overrides)
    torch.manual_seed(seed)
    model = create_model(cfg.model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
        if hasattr(model, "router") and hasattr(model.router, "out"):
            model.router.out.bias.fill_(router_bias)
    state = model.state_dict()
    torch.save({"model": state, "ema": state, "opt": {}, "config": config_to_dict(cfg), "step": 0}, path)
    return str(path)


def load(path):
    args = argparse.Namespace(config=None, overrides=[], dry_run=False)
    return sampling.load_model_for_sampling(args, path)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = make_checkpoint(tmp_path_factory.mktemp("ckpt") / "dcdit.pt")
    model, cfg = load(path)
    return path, model, cfg


def test_grid_and_chunking_viz_written(tiny, tmp_path, capsys):
    path, _, _ = tiny
    sample.main(["--ckpt", path, "--out-dir", str(tmp_path), "--class-labels", "0", "1", "2", "0", "1", "2",
                 "--num-sampling-steps", "3", "--num-viz-samples", "2", "--device", "cpu"])
    grid = np.asarray(Image.open(tmp_path / "sample.png"))
    # One row per class (each drawn twice), the 8 px images enlarged 8x to 64 px, 2 px gutters, labels on the left.
    assert grid.shape[0] == 2 + 3 * (64 + 2) and grid.shape[1] > 2 + 2 * (64 + 2)
    assert Image.open(tmp_path / "chunking_viz.png").size[0] > 100
    out = capsys.readouterr().out
    assert "kept-token share per column" in out


def test_save_grid_enlarges_small_images_exactly_and_labels_rows(tmp_path):
    images = torch.rand(5, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1   # (B, C, H, W)
    path = str(tmp_path / "grid.png")
    k = sampling.save_grid(images, path, nrow=3, row_labels=["class 0", "class 1"])
    assert k == 4                                                                           # 16 px -> 64 px
    grid = np.asarray(Image.open(path))                                                     # (H, W, 3)
    want = to_uint8_images(images)                                                          # (5, 16, 16, 3)
    side, margin = 64 + 2, grid.shape[1] - (2 + 3 * (64 + 2))
    assert grid.shape[0] == 2 + 2 * side and margin > 0
    for i in range(5):
        r, c = divmod(i, 3)
        cell = grid[2 + r * side:2 + r * side + 64, margin + 2 + c * side:margin + 2 + c * side + 64]
        assert np.array_equal(cell[::k, ::k], want[i])                          # a k-fold downscale gives it back
        assert np.array_equal(cell, want[i].repeat(k, 0).repeat(k, 1))          # every pixel a k x k block
    assert grid[2:2 + 64, :margin].any() and grid[2 + side:2 + side + 64, :margin].any()  # a label per row
    assert not grid[2 + side:, margin + 2 + 2 * side:].any()                    # the empty sixth cell stays black

    big = str(tmp_path / "big.png")
    assert sampling.save_grid(torch.zeros(2, 3, 64, 64), big, nrow=2) == 1
    assert np.asarray(Image.open(big)).shape == (2 + 64 + 2, 2 + 2 * (64 + 2), 3)  # no label margin, no enlarging
    with pytest.raises(ValueError, match="2 row labels for 1 rows"):
        sampling.save_grid(torch.zeros(2, 3, 64, 64), big, nrow=2, row_labels=["a", "b"])


def test_class_grid_gives_each_repeated_class_a_row():
    rows = sampling.class_grid([0, 1, 2, 0, 1, 2], nrow=10)
    assert rows == ([0, 3, 1, 4, 2, 5], 2, ["class 0", "class 1", "class 2"])
    # Distinct or unevenly repeated classes keep their order, nrow per row, labelled with the row's classes.
    assert sampling.class_grid([207, 360, 387], nrow=2) == ([0, 1, 2], 2, ["207, 360", "class 387"])
    assert sampling.class_grid([1, 1, 2], nrow=4) == ([0, 1, 2], 3, ["1, 1, 2"])


def test_chunking_viz_reports_the_kept_shares_it_draws(tiny, tmp_path):
    _, model, cfg = tiny
    sampler = sampling.Sampler(model, cfg, 2.0)
    images, steps = sampling.generate(model, cfg, torch.tensor([3, 4, 5]), sampler=sampler, progressive=True)
    assert images.shape == (3, 1, 8, 8) and len(steps) == len(sampler.records) == 4
    viz = visualize.chunking_viz(steps, sampler.records, cfg, str(tmp_path / "viz.png"), num_samples=3, num_cols=4)
    assert (tmp_path / "viz.png").stat().st_size > 0
    assert viz["timesteps"] == [999, 666, 333, 0]
    for k, shares in enumerate(viz["kept_share"]):
        expected = sampler.records[k]["kept"][:3].float() / 64
        assert shares == pytest.approx(expected.tolist())
        # A realistic router: well above the 2 forced endpoints, below all 64 tokens.
        assert all(0.2 < s < 0.9 for s in shares)
    with pytest.raises(ValueError, match="one DC-DiT record"):
        visualize.chunking_viz(steps, sampler.records[:2], cfg, str(tmp_path / "bad.png"))


def short(cfg, steps=2):
    """The same config with fewer sampling steps (keeps the 2-core test budget)."""
    cfg = copy.deepcopy(cfg)
    cfg.sample.num_sampling_steps = steps
    return cfg


def _kept(model, cfg, labels, f, uncond=None, cfg_scale=2.0):
    sampler = sampling.Sampler(model, cfg, cfg_scale, f, uncond, keep_maps=False)
    sampling.generate(model, short(cfg), labels, seed=1, sampler=sampler)
    return torch.stack([r["kept"] for r in sampler.records])  # (steps, rows)


def test_tail_drop_reduces_kept_tokens_monotonically(tiny):
    _, model, cfg = tiny
    labels = torch.arange(5)
    kept = {f: _kept(model, cfg, labels, f, cfg_scale=1.0) for f in (0.0, 0.3, 0.6)}
    means = [kept[f].float().mean().item() for f in sorted(kept)]
    assert all(a > b for a, b in zip(means, means[1:])), means
    # At the first step every budget sees the same x_T, so each row keeps exactly M - floor(f M).
    m0 = kept[0.0][0].double()
    for f, k in kept.items():
        assert torch.equal(k[0].double(), m0 - torch.floor(f * m0)), f


def test_lite_cfg_uncond_rows_keep_fewer_tokens(tiny):
    _, model, cfg = tiny
    labels, n = torch.arange(5), 5
    lite = _kept(model, cfg, labels, 0.0, uncond=0.7)       # (steps, 2n)
    plain = _kept(model, cfg, labels, 0.0, uncond=None)
    assert (lite[:, n:] < lite[:, :n]).all()                  # every uncond row, every step
    assert lite[:, n:].float().mean() < 0.5 * lite[:, :n].float().mean()
    # Plain CFG gives both halves the same budget: their counts differ only through the label.
    assert abs(plain[:, n:].float().mean() - plain[:, :n].float().mean()) < 0.1 * plain.float().mean()
    # Equal conditional budget: at the first step the conditional rows are identical.
    assert torch.equal(lite[0, :n], plain[0, :n])


def test_same_image_alone_or_in_a_batch(tiny):
    """Per-image generators: image i depends on (seed, i) only. Measured max |diff| ~1e-4 on values
    of magnitude ~500 (~2e-7 relative, float noise of batched kernels); distinct indices differ by ~1e2."""
    _, model, cfg = tiny
    labels = torch.tensor([1, 2, 3, 4, 5, 6])
    batch = sampling.generate(model, cfg, labels, seed=3)                                # indices 0..5
    alone = sampling.generate(model, cfg, labels[3:4], seed=3, indices=[3])
    shuffled = sampling.generate(model, cfg, labels[[5, 3]], seed=3, indices=[5, 3])
    scale = batch.abs().max().item()
    for got, want in ((alone[0], batch[3]), (shuffled[1], batch[3]), (shuffled[0], batch[5])):
        assert (got - want).abs().max().item() <= 1e-6 * max(1.0, scale)
    assert (batch[3] - batch[4]).abs().max().item() > 1e-2 * max(1.0, scale)  # seeds really differ
    other_seed = sampling.generate(model, cfg, labels[3:4], seed=4, indices=[3])
    assert (other_seed[0] - batch[3]).abs().max().item() > 1e-2 * max(1.0, scale)


def test_generate_uses_eval_mode_and_restores_it(tiny):
    """Label dropout must be off while sampling even if the caller left the model training."""
    _, model, cfg = tiny
    labels, cfg = torch.tensor([0, 7]), short(cfg)
    ref = sampling.generate(model, cfg, labels, seed=5)
    model.train()
    try:
        got = sampling.generate(model, cfg, labels, seed=5)
        assert model.training
    finally:
        model.eval()
    assert torch.allclose(got, ref, rtol=0, atol=1e-6 * max(1.0, ref.abs().max().item()))


def test_seeds_and_labels_depend_only_on_the_image_index():
    labels = sampling.class_labels(0, range(400), 10)
    assert torch.equal(sampling.class_labels(0, [17, 3], 10), labels[[17, 3]])
    assert set(labels.tolist()) == set(range(10)) and labels.bincount().min() > 20   # uniform-ish
    assert not torch.equal(sampling.class_labels(1, range(400), 10), labels)
    seeds = {sampling.image_seed(s, i, k) for s in (0, 1, 2 ** 32 - 1) for i in (0, 1, 10 ** 6) for k in (0, 1, 2)}
    assert len(seeds) == 27 and max(seeds) < 2 ** 64
    a = torch.randn(3, generator=sampling.image_generators(0, [5])[0])
    b = torch.randn(3, generator=sampling.image_generators(0, [2, 5])[1])
    assert torch.equal(a, b)


def test_image_seed_is_its_documented_formula():
    """(stream << 56) + seed * 1_000_003 + index, with the expected seeds worked out by hand."""
    assert sampling.image_seed(0, 0) == 0
    assert sampling.image_seed(7, 3) == 7_000_024                                    # 7 * 1_000_003 + 3
    assert sampling.image_seed(2, 5, sampling.UNCOND_NOISE_STREAM) == 72_057_594_039_927_947  # 2**56 + 2_000_006 + 5
    assert sampling.image_seed(1, 0, sampling.LABEL_STREAM) == 144_115_188_076_855_875  # 2**57 + 1_000_003


def test_generator_of_image_i_is_seeded_by_seed_and_i():
    """image_generators(seed, indices)[k] draws exactly what torch.Generator().manual_seed(image_seed(seed,
    indices[k])) draws; indices out of order and with a gap, so an off-by-one or a positional index shows."""
    indices = [4, 0, 3]
    seeds = [9_000_031, 9_000_027, 9_000_030]  # 9 * 1_000_003 + i
    for g, seed in zip(sampling.image_generators(9, indices), seeds):
        want = torch.randn(5, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(torch.randn(5, generator=g), want), seed
    for g, i in zip(sampling.image_generators(9, indices, stream=sampling.LABEL_STREAM), indices):
        want = torch.randn(5, generator=torch.Generator().manual_seed(sampling.image_seed(9, i, sampling.LABEL_STREAM)))
        assert torch.equal(torch.randn(5, generator=g), want), i
    # The label of image i is the first draw of its label-stream generator.
    label = torch.randint(10, (1,), generator=torch.Generator().manual_seed(2 ** 57 + 9_000_030))
    assert sampling.class_labels(9, [3], 10).tolist() == label.tolist()


class _FirstInput(sampling.Sampler):
    """A Sampler that keeps the x_T the diffusion loop hands the model first."""

    def __call__(self, x, t, y):
        if not self.records:
            self.x_T = x.clone()
        return super().__call__(x, t, y)


def test_generate_starts_image_i_from_the_noise_of_seed_and_i(tiny):
    """x_T of image i is the first (1, C, H, W) draw of the generator seeded by (seed, i), for given indices
    and for the default 0..B-1; under CFG the unconditional rows start from the same x_T."""
    _, model, cfg = tiny
    cfg = short(cfg)

    def first_input(**kw):
        sampler = _FirstInput(model, cfg, cfg.sample.cfg_scale, keep_maps=False)
        sampling.generate(model, cfg, torch.tensor([1, 2]), seed=9, sampler=sampler, **kw)
        return sampler.x_T                                                  # (2B, C, H, W) under CFG

    for kw, seeds in ((dict(indices=[4, 3]), [9_000_031, 9_000_030]), ({}, [9_000_027, 9_000_028])):
        x_T = first_input(**kw)
        for row, seed in enumerate(seeds):
            want = torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(seed))
            assert torch.equal(x_T[row:row + 1], want), (kw, seed)
        assert torch.equal(x_T[2:], x_T[:2])


def test_dit_checkpoint_samples_a_grid_and_refuses_tail_dropping(tmp_path, capsys):
    path = make_checkpoint(tmp_path / "dit.pt", TINY_DIT)
    sample.main(["--ckpt", path, "--out-dir", str(tmp_path), "--class-labels", "1", "2", "--device", "cpu"])
    assert (tmp_path / "sample.png").exists() and not (tmp_path / "chunking_viz.png").exists()
    # The summary prices a DiT's fixed cost by component: 3 steps, two branches (CFG) of one forward each.
    from models.flops import component_flops
    summary = json.loads((tmp_path / "sample_summary.json").read_text())
    parts = component_flops(load(path)[0])
    assert summary["tflops_per_img_by_component"] == pytest.approx({k: v * 3 * 2 / 1e12 for k, v in parts.items()})
    assert summary["branches"]["cond"]["tflops_per_img"] == pytest.approx(summary["tflops_per_img"] / 2)
    assert not (tmp_path / "chunking_summary.png").exists()
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main_guard(sample.main)(["--ckpt", path, "--tail-dropping-fraction", "0.3", "--out-dir", str(tmp_path)])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "need a DC-DiT" in err[0]


@pytest.mark.parametrize("flags,message", [
    (["--lite-cfg", "--cfg-scale", "1.0"], "--lite-cfg needs --cfg-scale > 1"),
    (["--uncond-tail-dropping-fraction", "0.5"], "needs --lite-cfg"),
    (["--tail-dropping-fraction", "1.0"], "sample.tail_dropping_fraction"),
    (["--class-labels", "10"], "outside [0, 10)"),
    (["--ckpt", "/nonexistent.pt"], "no such file"),
    (["--viz-rows", "xt,q"], "--viz-rows 'xt,q'"),
    (["--profile", "--num-sampling-steps", "2"], "--profile"),
])
def test_bad_flags_are_one_line_errors(tiny, tmp_path, capsys, flags, message):
    path, _, _ = tiny
    argv = ["--ckpt", path, "--out-dir", str(tmp_path), "--device", "cpu", *flags]
    with pytest.raises(SystemExit) as e:
        main_guard(sample.main)(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and message in err[0], err


def test_no_visualize_keeps_no_steps_or_maps(tiny, tmp_path, monkeypatch):
    """--no-visualize samples without the progressive pass and without boundary maps, and writes no chunking_viz,
    while the summary (which needs neither) is still written."""
    path, _, _ = tiny
    calls = []

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return sampling.generate(*args, **kwargs)

    monkeypatch.setattr(sample, "generate", spy)
    sample.main(["--ckpt", path, "--out-dir", str(tmp_path), "--class-labels", "0", "1", "--num-sampling-steps", "2",
                 "--no-visualize", "--device", "cpu"])
    (kw,) = calls
    assert not kw["progressive"] and not kw["sampler"].keep_maps
    assert len(kw["sampler"].records) == 2 and not any("prob" in r for r in kw["sampler"].records)
    assert not list(tmp_path.glob("chunking_viz*.png"))
    assert (tmp_path / "sample_summary.json").exists() and (tmp_path / "chunking_summary.png").exists()


class _Inputs(sampling.Sampler):
    """A Sampler that keeps every input x_t the diffusion loop hands the model."""

    def __call__(self, x, t, y):
        self.inputs = getattr(self, "inputs", []) + [x.clone()]
        return super().__call__(x, t, y)


def test_xt_row_shows_the_input_the_model_saw(tiny, tmp_path):
    """The xt row of column j is the batch the model (and its router) received at that column's step; x0 and p
    rows are that step's prediction and boundary map."""
    _, model, cfg = tiny
    sampler = _Inputs(model, cfg, 2.0)
    _, steps = sampling.generate(model, cfg, torch.tensor([3, 4, 5]), sampler=sampler, progressive=True)
    viz = visualize.chunking_viz(steps, sampler.records, cfg, str(tmp_path / "viz.png"), num_samples=2, num_cols=3,
                                 rows=("xt", "x0", "p"))
    panels = viz["panels"]
    assert panels["steps"] == [0, 2, 3] and panels["xt"].shape == (3, 2, 8, 8, 3)
    for j, k in enumerate(panels["steps"]):
        assert np.array_equal(panels["xt"][j], to_uint8_images(sampler.inputs[k][:2]))
        assert np.array_equal(panels["x0"][j], to_uint8_images(steps[k]["pred_xstart"][:2]))
        assert np.array_equal(panels["p"][j], sampler.records[k]["prob"][:2].view(2, 8, 8).numpy())
    assert not np.array_equal(panels["xt"][0], panels["x0"][0])  # x_T is noise, not the prediction
    assert visualize.parse_viz_rows("xt,x0,p") == ("xt", "x0", "p")
    for bad in ("xt,q", "x0,x0", "", "p,"):
        with pytest.raises(visualize.PlotError, match="--viz-rows"):
            visualize.parse_viz_rows(bad)


@pytest.fixture(scope="module")
def lite_run(tiny, tmp_path_factory):
    """One sample.py run under Lite-CFG with per-sample figures, the xt row and --profile: (out dir, stdout)."""
    import contextlib
    import io
    path, _, _ = tiny
    out = tmp_path_factory.mktemp("lite")
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        sample.main(["--ckpt", path, "--out-dir", str(out), "--class-labels", "0", "1", "2", "--device", "cpu",
                     "--cfg-scale", "2.0", "--lite-cfg", "--uncond-tail-dropping-fraction", "0.7",
                     "--viz-per-sample", "--num-viz-samples", "2", "--viz-rows", "xt,p", "--profile"])
    return out, stdout.getvalue()


def test_viz_per_sample_writes_one_file_per_sample(lite_run):
    out, printed = lite_run
    assert sorted(p.name for p in out.glob("chunking_viz*.png")) == ["chunking_viz_0.png", "chunking_viz_1.png"]
    assert "chunking_viz_1.png" in printed


def test_summary_json_prices_each_branch_at_its_budget(lite_run, tiny):
    """Kept shares are shares, components add up to every total, and Lite-CFG's uncond branch (tail drop 0.7)
    keeps fewer tokens and costs less than the cond branch; the totals price the recorded kept counts."""
    import json
    import math
    from models.flops import dcdit_flops_coeffs, tflops_from_counts
    out, printed = lite_run
    summary = json.loads((out / "sample_summary.json").read_text())
    cond, uncond = summary["branches"]["cond"], summary["branches"]["uncond"]
    assert (cond["tail_dropping_fraction"], uncond["tail_dropping_fraction"]) == (0.0, 0.7)
    for b in (cond, uncond):
        assert 0 < b["kept_share"] <= 1 and 0 <= b["boundary_prob"] <= 1
        for key in ("kept_share", "boundary_prob"):
            spread = b["per_step"][key]
            assert len(spread["mean"]) == summary["steps"] == 4
            assert all(0 <= lo <= m <= hi <= 1 for lo, m, hi in zip(spread["min"], spread["mean"], spread["max"]))
        c = b["compression"]
        assert 1 <= c["min"] <= c["geomean"] <= c["max"]
        assert math.isclose(sum(b["tflops_per_img_by_component"].values()), b["tflops_per_img"], rel_tol=1e-9)
        assert math.isclose(sum(b["per_step"]["tflops_per_img"]), b["tflops_per_img"], rel_tol=1e-9)
    assert uncond["kept_share"] < 0.5 * cond["kept_share"] and uncond["tflops_per_img"] < cond["tflops_per_img"]
    assert uncond["compression"]["geomean"] > cond["compression"]["geomean"]
    total = summary["tflops_per_img"]
    assert math.isclose(sum(summary["tflops_per_img_by_component"].values()), total, rel_tol=1e-9)
    assert math.isclose(cond["tflops_per_img"] + uncond["tflops_per_img"], total, rel_tol=1e-9)
    _, model, _ = tiny
    assert math.isclose(total, tflops_from_counts(dcdit_flops_coeffs(model), summary["kept_tokens"]), rel_tol=1e-9)
    assert (out / "chunking_summary.png").stat().st_size > 0
    assert re.search(r"^uncond +0\.70 +\d", printed, re.M) and "by component" in printed and "time per step" in printed


def test_profile_writes_a_trace_of_the_sampling_loop(lite_run):
    import json
    out, printed = lite_run
    (trace,) = (out / "profile").glob("*.pt.trace.json")
    events = json.loads(trace.read_text())["traceEvents"]
    # The profiler marks each recorded step: with 4 steps, the first skipped and one of warm-up, steps 3 and 4.
    assert sorted(e["name"] for e in events if e.get("name", "").startswith("ProfilerStep#")) == \
        ["ProfilerStep#2", "ProfilerStep#3"]
    assert str(trace) in printed and "sampling steps 3-4" in printed
