"""Two-stage DC-DiT (models/hierarchy.py): per-sample through both stages, gradients to both routers, the
single-stage model as the special case, the inner stage's router, de-chunking and ratio loss, resume."""
import os

import pytest
import torch

from config import load_config
from conftest import train_full_and_resumed
from models import create_model
from models.hierarchy import SparseCosineRouter, finish_sparse_routing
from models.routing import ratio_loss

TWO = "configs/tiny/test-dcdit-2stage.yaml"


def two_stage(overrides=(), seed=0):
    """A trained-looking two-stage model whose routers keep a fair share at each stage."""
    cfg = load_config(TWO, ["model.router=predictability", *overrides])
    torch.manual_seed(seed)
    model = create_model(cfg.model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
        model.router.out.bias.fill_(0.0)
        # A random rotation as W_Q: the cosine with the neighbours' keys is then spread around 0, p around 0.5.
        model.stage1.router.q_proj.weight.copy_(torch.linalg.qr(torch.randn(64, 64, generator=g))[0])
    return model.eval(), cfg


def inputs(B=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 4, 8, 8, generator=g), torch.randint(0, 1000, (B,), generator=g), torch.arange(B) % 10


@pytest.mark.parametrize("attention", ["packed", "padded"])
def test_a_sample_does_not_depend_on_its_batch_through_both_stages(attention):
    model, _ = two_stage([f"model.attention={attention}"])
    x, t, y = inputs()
    with torch.no_grad():
        out, info = model(x, t, y, return_info=True, tail_drop=torch.tensor([0.0, 0.5, 0.2, 0.0]))
        m0, m1 = info.router.natural_mask.sum(1), info.kept
        assert len(set(m0.tolist())) > 1 and len(set(m1.tolist())) > 1 and bool((m1 <= m0).all() and (m1 < m0).any())
        for i in range(4):
            f = torch.tensor([[0.0, 0.5, 0.2, 0.0][i]])
            alone, a = model(x[i:i + 1], t[i:i + 1], y[i:i + 1], return_info=True, tail_drop=f)
            assert int(a.kept) == int(m1[i])
            torch.testing.assert_close(alone, out[i:i + 1], rtol=1e-5, atol=1e-5)


def test_tail_dropping_acts_at_the_innermost_stage_and_gradients_reach_both_routers():
    model, cfg = two_stage()
    x, t, y = inputs()
    with torch.no_grad():
        _, full = model(x, t, y, return_info=True)
        _, dropped = model(x, t, y, return_info=True, tail_drop=0.5)
    assert torch.equal(full.router.mask, dropped.router.mask)  # stage 0 keeps its whole budget
    s1 = dropped.stage1.router.natural_mask.sum(1)
    assert torch.equal(dropped.kept, s1 - torch.floor(0.5 * s1.double()).long())
    model.train()
    out, info = model(x, t, y, return_info=True)
    loss = out.square().mean() + ratio_loss(info.router.natural_mask, info.router.prob, 2.0, 4) + ratio_loss(
        info.stage1.router.natural_mask, info.stage1.router.prob, 2.0, 4, valid=info.stage1.valid)
    loss.backward()
    for router in (model.router, model.stage1.router):
        grads = [p.grad for p in router.parameters()]
        assert all(g is not None and g.abs().sum() > 0 for g in grads)


def test_a_stage_1_that_keeps_everything_is_the_single_stage_model():
    """With no stage-1 blocks, plug-back without smoothing, a zero residual and a router keeping every token, the
    two-stage model computes exactly what the single-stage model with the same weights computes."""
    single_cfg = load_config("configs/tiny/test-dcdit.yaml", ["model.router=predictability", "model.downsample_factor=2"])
    torch.manual_seed(0)
    single = create_model(single_cfg.model)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in single.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
        single.router.out.bias.fill_(0.0)
    model, _ = two_stage(["model.stage1_encoder_depth=0", "model.stage1_decoder_depth=0",
                          "model.stage1_dechunker=nearest", "model.residual_init=zero"])
    missing, unexpected = model.load_state_dict(single.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("stage1.") for k in missing)
    with torch.no_grad():
        model.stage1.residual_proj.weight.zero_()
        model.stage1.residual_proj.bias.zero_()
    model.stage1.router.forward = lambda x, pos, valid: finish_sparse_routing(torch.ones(valid.shape), valid)
    x, t, y = inputs()
    with torch.no_grad():
        want, a = single.eval()(x, t, y, return_info=True)
        got, b = model(x, t, y, return_info=True)
    assert torch.equal(b.kept, a.kept) and torch.equal(got, want)


def test_inner_router_rule_and_forced_ends():
    """p = (1 - cos(q, k_bar)) / 2 with k_bar the Gaussian-weighted mean of the other points' keys; the first and
    last valid slot are boundaries and padding never is."""
    torch.manual_seed(0)
    router = SparseCosineRouter(8, 2.0, sigma=1.0)
    pos = torch.tensor([[[0, 0], [0, 1], [5, 5], [5, 6], [9, 9]]], dtype=torch.float32)
    valid = torch.tensor([[True, True, True, True, False]])
    v = torch.randn(8)
    x = torch.stack([v, v, -v, -v, v])[None]  # two pairs of equal keys, far apart; the last slot is padding
    out = router(x, pos, valid)
    assert out.prob[0, 0] == 1 and out.prob[0, 3] == 1 and out.prob[0, 4] == 0 and not out.mask[0, 4]
    # Slots 1 and 2 see mostly their own pair (the other pair is ~7 cells away): cosine ~ 1, p ~ 0.
    assert out.prob[0, 1] < 1e-3 and out.prob[0, 2] < 1e-3
    x[0, 1] = -v  # now unlike its neighbour: a boundary
    assert router(x, pos, valid).prob[0, 1] > 0.99


def test_two_stage_training_resumes_exactly(feature_dir, tmp_path):
    common = ["--config", TWO, f"data.feature_path={feature_dir}", "train.log_every=1", "train.ckpt_every=2"]
    full, resumed, run_b = train_full_and_resumed(common, 4, 2, tmp_path)
    assert [resumed[s] for s in (3, 4)] == [full[s] for s in (3, 4)]
    log = open(os.path.join(run_b, "log.txt")).read()
    assert "compression_stage0_gmean" in log


def test_two_stage_samples_with_tail_dropping_and_prices_both_stages(tmp_path, tiny_vae):
    """sample_ddp.py and sample.py on a two-stage checkpoint: tail dropping cuts the inner stage's tokens, the
    FLOPs come from both stages' counts (models.flops.TwoStageCoeffs), and the parts add up to the total."""
    import json

    import numpy as np

    import sample
    import sample_ddp
    from config import config_to_dict
    from models.flops import dcdit_flops_coeffs, forward_flops, tflops_from_counts
    model, cfg = two_stage()
    state = model.state_dict()
    ckpt = tmp_path / "two.pt"
    torch.save({"model": state, "ema": state, "opt": {}, "config": config_to_dict(cfg), "step": 0}, ckpt)
    coeffs = dcdit_flops_coeffs(model)
    assert coeffs(30, 12) == forward_flops(model, (30, 12))
    reports = {}
    for f in ("0.0", "0.5"):
        out = tmp_path / f"s{f}"
        sample_ddp.main(["--ckpt", str(ckpt), "--output-dir", str(out), "--num-fid-samples", "3",
                         "--num-sampling-steps", "3", "--device", "cpu", "--vae-path", tiny_vae,
                         "--tail-dropping-fraction", f])
        reports[f] = json.loads(open(f"{out}.json").read())
    for r in reports.values():
        counts = (np.array(r["kept_tokens"]), np.array(r["kept_tokens_stage0"]))
        assert bool((counts[0] <= counts[1]).all())
        assert r["tflops_per_img"] == pytest.approx(tflops_from_counts(coeffs, counts, cfg=True), rel=1e-12)
        assert sum(r["tflops_per_img_by_component"].values()) == pytest.approx(r["tflops_per_img"], rel=1e-9)
        assert r["tflops_per_img_by_component"]["inner_stage"] > 0
    assert np.mean(reports["0.5"]["kept_tokens"]) < np.mean(reports["0.0"]["kept_tokens"])
    assert reports["0.5"]["tflops_per_img"] < reports["0.0"]["tflops_per_img"]
    sample.main(["--ckpt", str(ckpt), "--num-sampling-steps", "3", "--class-labels", "1", "2", "--device", "cpu",
                 "--out-dir", str(tmp_path / "one"), "--vae-path", tiny_vae])
    summary = json.loads((tmp_path / "one" / "sample_summary.json").read_text())
    assert "kept_tokens_stage0" in summary and summary["tflops_per_img"] > 0


def test_chunking_visualisation_shows_both_stages(tiny_vae):
    """The "kept" row: 0.5 where stage 0 keeps a token, 1 where the inner stage keeps it as well; the 1s of each
    sample are exactly the tokens the inner blocks ran, and they lie inside stage 0's."""
    from sampling import Sampler, generate
    from visualize import chunking_panels
    model, cfg = two_stage([f"data.vae_path={tiny_vae}", "sample.num_sampling_steps=3"])
    sampler = Sampler(model, cfg, 1.0, 0.3, keep_maps=True)
    _, steps = generate(model, cfg, torch.tensor([1, 2]), sampler=sampler, progressive=True)
    panels = chunking_panels(steps, sampler.records, cfg, num_samples=2, num_cols=3, rows=("kept",))
    for j, k in enumerate(panels["steps"]):
        kept = panels["kept"][j]                                                      # (n, 8, 8)
        assert set(kept.flatten().tolist()) <= {0.0, 0.5, 1.0}
        assert (kept == 1.0).reshape(2, -1).sum(1).tolist() == sampler.records[k]["kept"][:2].tolist()
        assert ((kept > 0).reshape(2, -1).sum(1) == sampler.records[k]["kept0"][:2]).all()
