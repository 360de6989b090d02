"""DyDiT on DC-DiT (paper §4.5): a fresh DyDiT is its DC-DiT bit for bit, sliced inference equals the
masked training path and really skips the work it prices, the FLOPs loss reaches every router, strict
fine-tuning init, a short digits fine-tune that settles at lambda, configs, sampling JSON (the wall-time
benchmark is tools/bench.py's dydit section, tested in tests/test_bench.py)."""
import glob
import json
import os

import pytest
import torch

import sample_ddp
import sampling
from config import ConfigError, load_config
from conftest import ROOT, TINY_DCDIT, run_script
from conftest import trained_tiny_dcdit as dcdit
from models import create_model
from models.dc_dit import DCDiT
from models.dydit import (DyDiTError, dydit_execution, fix_gates, flops_loss, flops_ratio, gate_patterns,
                          gumbel_sigmoid_gate, load_dcdit_weights)
from models.flops import (block_flops, count_flops, dcdit_flops_coeffs, dydit_dims, dydit_info_row_flops,
                          static_block_flops)
from models.routing import keep_exactly as forced_kept


def dydit_from(base, **kw):
    """A DyDiT built on the same sizes, loaded with every DC-DiT weight of `base` (gates at their init)."""
    torch.manual_seed(1)
    model = DCDiT(attention="packed" if base.packed else "padded", dydit=True, **{**TINY_DCDIT, **kw})
    load_dcdit_weights(model, base.state_dict())
    return model.eval()


def inputs(batch=3):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 4, 8, 8, generator=g)                              # (B, C, H, W)
    t = torch.tensor([5, 500, 900, 250, 750][:batch])                         # (B,)
    y = torch.tensor([1, 2, 3, 4, 5][:batch])                                 # (B,)
    return x, t, y


# ----------------------------------------------------------------------------- equivalence

@pytest.mark.parametrize("attention", ["packed", "padded"])
def test_fresh_dydit_equals_its_dcdit_bit_for_bit(attention):
    base = dcdit(attention)
    model = dydit_from(base)
    x, t, y = inputs()
    ref, ref_info = base(x, t, y, return_info=True, collect_blocks=True)
    out, info = model(x, t, y, return_info=True, collect_blocks=True)
    assert len(set(ref_info.kept.tolist())) > 1                               # samples keep different M
    assert torch.equal(out, ref)
    assert all(torch.equal(a, b) for a, b in zip(info.blocks, ref_info.blocks))
    d = info.dydit
    assert bool((d.heads == 1).all() and (d.groups == 1).all())
    assert torch.equal(d.tokens, d.kept.float()[:, None].expand(-1, 2))         # every kept token ran the MLP
    # Training mode: Gumbel noise on gates that start at logit 15 / 35 never turns one off.
    base.train()
    model.train()
    torch.manual_seed(7)
    ref = base(x, t, y)
    torch.manual_seed(7)
    assert torch.equal(model(x, t, y), ref)


@pytest.mark.parametrize("attention", ["packed", "padded"])
@pytest.mark.parametrize("forced", [None, ([0, 4], [4, 0]), ([2, 3], [1, 4])])
def test_sliced_inference_equals_masked_training_path(attention, forced):
    """Gates from real routers (t-dependent width: several patterns in one batch) or forced, some blocks
    with no head or no group at all; the token router decides per token (about half run the MLP)."""
    model = dydit_from(dcdit(attention))
    with torch.no_grad():
        for block in model.blocks:
            block.head_router.bias.zero_()
            block.group_router.bias.zero_()
            block.token_router[2].bias.zero_()
    if forced is not None:
        fix_gates(model, *forced, tokens=None)
    x, t, y = inputs(5)
    with dydit_execution(model, "masked"):
        masked, m_info = model(x, t, y, return_info=True)
    with dydit_execution(model, "sliced"):
        sliced, s_info = model(x, t, y, return_info=True)
    if forced is None:
        assert len(gate_patterns(s_info.dydit.heads[:, 0])) > 1               # per-sample grouping exercised
    for key in ("heads", "groups", "tokens"):
        assert torch.equal(getattr(m_info.dydit, key), getattr(s_info.dydit, key)), key
    run = s_info.dydit.tokens.sum() / (s_info.dydit.kept.sum() * 2)
    assert 0.2 < run < 0.8                                                    # token skipping exercised
    torch.testing.assert_close(sliced, masked, rtol=1e-5, atol=1e-5)
    assert (sliced - masked).abs().max() < 1e-3 * masked.abs().max()
    assert not torch.equal(masked, dcdit(attention)(x, t, y))                 # the gates changed the output


def test_sliced_path_runs_exactly_the_flops_it_prices():
    """FlopCounterMode over a real forward: the sliced path spends what the analytic count says (so the
    skipped heads, groups and tokens are not computed), the masked path all of it; with half the heads and
    groups in every block and every token running, the blocks' FLOPs fall by the closed-form fraction."""
    model = dydit_from(dcdit())
    coeffs = dcdit_flops_coeffs(model)
    dims, depth = dydit_dims(model)
    x, t, y = inputs(1)
    M = 24
    with forced_kept(model, M):
        with dydit_execution(model, "static"):
            static = count_flops(model, x, t, y)
        assert static == coeffs[0] + coeffs[1] * M + coeffs[2] * M * M
        fix_gates(model, [2, 2], [2, 2], tokens=True)
        _, info = model(x, t, y, return_info=True)
        sliced = count_flops(model, x, t, y)
        with dydit_execution(model, "masked"):
            masked = count_flops(model, x, t, y)
        D, H, gc, r = dims.hidden, dims.heads, dims.group_width, dims.router_hidden
        routers = 4 * D * H + M * (2 * D * r + 2 * r)
        half = 12 * D * D + routers + 0.5 * (D * (8 * M * D + 4 * M * M) + 4 * M * D * H * gc)
        assert static - sliced == depth * (static_block_flops(dims, M) - half)
        assert info.dydit.ratio.item() == pytest.approx(half / static_block_flops(dims, M), rel=1e-6)
        assert masked == static + depth * routers                             # masking saves nothing
        # Data-dependent tokens and uneven widths: still exactly the priced count.
        fix_gates(model, [1, 3], [4, 2], tokens=None)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for block in model.blocks:  # a token router with a real say again (fix_gates zeroed its weight)
                block.token_router[2].weight.copy_(torch.randn(block.token_router[2].weight.shape, generator=g))
                block.token_router[2].bias.zero_()
        _, info = model(x, t, y, return_info=True)
        assert 0 < info.dydit.tokens.sum() < 2 * M
        run, dcdit_cost = dydit_info_row_flops(coeffs, dims, info.dydit)
        assert count_flops(model, x, t, y) == run[0]
        # dydit.flops_scope=model: the same saving over the whole forward, scaffold on both sides.
        assert flops_ratio(info.dydit, coeffs).item() == pytest.approx(run[0] / dcdit_cost[0], rel=1e-6)


# ----------------------------------------------------------------------------- training signals

def test_gumbel_gates_are_hard_with_a_soft_gradient():
    logits = torch.zeros(4000, requires_grad=True)
    torch.manual_seed(0)
    gates = gumbel_sigmoid_gate(logits, tau=5.0, training=True)
    assert set(gates.unique().tolist()) == {0.0, 1.0} and 0.45 < gates.mean().item() < 0.55
    gates.sum().backward()
    assert bool((logits.grad > 0).all()) and logits.grad.max() <= 0.25 / 5.0 + 1e-6  # sigmoid' / tau
    assert torch.equal(gumbel_sigmoid_gate(torch.tensor([-0.1, 0.1, 15.0]), 5.0, False), torch.tensor([0.0, 1, 1]))


@pytest.mark.parametrize("checkpointing", [False, True])
def test_flops_loss_reaches_every_router(checkpointing):
    model = dydit_from(dcdit(), grad_checkpointing=checkpointing).train()
    x, t, y = inputs()
    out, info = model(x, t, y, return_info=True)
    ratio = info.dydit.ratio
    assert ratio.shape == (3,) and bool((ratio > 1).all() and (ratio < 1.05).all())  # all on + routers' cost
    loss = flops_loss(info.dydit, 0.7)
    assert loss.item() == pytest.approx((ratio.mean().item() - 0.7) ** 2)
    (loss + out.square().mean()).backward()
    for name, p in model.named_parameters():
        if "router." in name and name.startswith("blocks."):
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_block_flops_closed_form():
    dims = dydit_dims(dydit_from(dcdit()))[0]
    D, M = 64, 10
    assert static_block_flops(dims, M) == 12 * D * D + 8 * M * D * D + 4 * M * M * D + 4 * M * D * 4 * D
    assert block_flops(dims, M, 0, 0, 0, gated=False) == 12 * D * D


def test_loading_a_dcdit_checkpoint_is_strict():
    base = dcdit()
    model = dydit_from(base)
    own = model.state_dict()
    assert all(torch.equal(own[k], v) for k, v in base.state_dict().items())
    assert bool((model.blocks[1].head_router.bias == 15).all() and (model.blocks[0].token_router[2].bias == 35).all())
    state = base.state_dict()
    bad = dict(state, **{"blocks.0.attn.qkv.weight": state["blocks.0.attn.qkv.weight"][:, :8]})
    with pytest.raises(DyDiTError, match=r"blocks\.0\.attn\.qkv\.weight: .* shape \[192, 8\] vs model \[192, 64\]"):
        load_dcdit_weights(model, bad)
    missing = {k: v for k, v in state.items() if k != "residual_proj.weight"}
    with pytest.raises(DyDiTError, match=r"residual_proj\.weight: missing"):
        load_dcdit_weights(model, missing)
    with pytest.raises(DyDiTError, match=r"blocks\.0\.head_router\.weight: in checkpoint but not a DC-DiT weight"):
        load_dcdit_weights(model, model.state_dict())                         # a DyDiT state is not a DC-DiT


# ----------------------------------------------------------------------------- configs

def test_configs_and_their_errors():
    n4 = load_config(os.path.join(ROOT, "configs/DCDiT-B-N4-DyDiT.yaml"))
    n16 = load_config(os.path.join(ROOT, "configs/DCDiT-B-N16-DyDiT.yaml"))
    for cfg, n in ((n4, 4.0), (n16, 16.0)):
        assert cfg.dydit.enabled and cfg.dydit.target_ratio == 0.7 and cfg.model.downsample_factor == n
        assert (cfg.train.lr, cfg.train.global_batch_size, cfg.train.max_steps) == (2e-5, 256, 120_000)
    assert not load_config(None).dydit.enabled
    for overrides, key in ((["model.name=DiT-S/2", "dydit.enabled=true"], "dydit.enabled"),
                           (["dydit.target_ratio=0"], "dydit.target_ratio"),
                           (["dydit.tau=0"], "dydit.tau"),
                           (["dydit.init_checkpoint=x.pt"], "dydit.init_checkpoint"),
                           (["dydit.enabled=true", "model.hidden_size=12", "model.num_heads=3",
                             "model.norm_groups=1", "model.encoder_width=3"], "model.hidden_size")):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config(None, overrides)


# ----------------------------------------------------------------------------- end to end

def _records(run_dir):
    return [json.loads(line.split("] ", 1)[1]) for line in open(os.path.join(run_dir, "log.txt")) if '"step"' in line]


def test_digits_fine_tune_settles_at_lambda_and_samples_at_its_flops(tmp_path, monkeypatch):
    """Table 4's recipe in miniature: a DC-DiT trained on the digits, then DyDiT fine-tuned from its
    checkpoint; the measured FLOPs ratio starts at 1 (every gate on) and the FLOPs loss pulls it to
    lambda = 0.7. Sampling the result records the FLOPs its gates left; resuming repeats the run exactly."""
    common = ["--config", "configs/tiny/test-dydit.yaml", "train.log_every=20"]
    run_script(["train.py", *common, "dydit.enabled=false", "train.max_steps=40", "train.ema_decay=0.5",
                f"train.results_dir={tmp_path / 'dcdit'}"])
    base = glob.glob(str(tmp_path / "dcdit" / "*" / "checkpoints" / "0000040.pt"))[0]
    # EMA 0.9: sampling uses the EMA weights, which at the paper's 0.9999 would still be the init after 200 steps.
    run_script(["train.py", *common, f"dydit.init_checkpoint={base}", "train.max_steps=200", "train.ema_decay=0.9",
                "train.ckpt_every=100", f"train.results_dir={tmp_path / 'dydit'}"], timeout=300)
    run_dir = glob.glob(str(tmp_path / "dydit" / "*"))[0]
    log = open(os.path.join(run_dir, "log.txt")).read()
    assert "every DC-DiT weight loaded strictly; 16 gate-router tensors" in log
    recs = _records(run_dir)
    assert recs[0]["flops_ratio"] > 0.97, recs[0]
    assert all(abs(r["flops_ratio"] - 0.7) < 0.05 for r in recs[-3:]), [r["flops_ratio"] for r in recs]
    assert recs[-1]["diffusion_loss"] < recs[0]["diffusion_loss"]

    # sampling builds its model with create_model(cfg.model); hand it the run's DyDiT settings.
    cfg = load_config(os.path.join(run_dir, "config.yaml"))
    monkeypatch.setattr(sampling, "create_model", lambda model_cfg, *_: create_model(model_cfg, cfg.dydit))
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    out = tmp_path / "samples"
    sample_ddp.main(["--ckpt", os.path.join(run_dir, "checkpoints", "0000200.pt"), "--output-dir", str(out),
                     "--num-fid-samples", "2", "--per-proc-batch-size", "2", "--device", "cpu",
                     "sample.num_sampling_steps=3"])
    report = json.load(open(f"{out}.json"))
    d = report["dydit"]
    assert report["tflops_per_img"] == d["tflops_per_img"] < d["dcdit_tflops_per_img"]
    assert d["blocks_flops_ratio"] < 0.9 and len(d["per_step"]) == 3
    from sample_ddp import measure_tflops
    kept_only = measure_tflops(create_model(cfg.model, cfg.dydit), cfg, {"kept_tokens": report["kept_tokens"]})
    assert d["dcdit_tflops_per_img"] == pytest.approx(kept_only)              # same kept tokens, DC-DiT priced

    # Resume is exact: the gates' Gumbel noise is drawn from the per-step seed like every other draw.
    run_script(["train.py", "--resume", os.path.join(run_dir, "checkpoints", "0000100.pt"), "train.max_steps=120"])
    at_120 = [r for r in _records(run_dir) if r["step"] == 120]
    assert len(at_120) == 2 and at_120[0]["loss"] == at_120[1]["loss"] and at_120[0]["flops_ratio"] != 1.0
    assert at_120[0]["flops_ratio"] == at_120[1]["flops_ratio"]


def test_sampler_prices_each_row_from_what_its_gates_left():
    """sampling.Sampler (tools/reproduce.py's sampling loop) records every row's FLOPs as run: above the DC-DiT's at
    the same kept tokens with every gate on (the gate routers cost FLOPs too), below it with half the heads and MLP
    groups off; kept counts alone would price both at the DC-DiT's."""
    from types import SimpleNamespace
    model = dydit_from(dcdit())
    cfg = SimpleNamespace(model=SimpleNamespace(name="DCDiT-S"), sample=SimpleNamespace(guide_channels=0))
    sampler = sampling.Sampler(model, cfg, cfg_scale=1.0, keep_maps=False)
    a, b, c = dcdit_flops_coeffs(model)
    x, t, y = inputs()
    with torch.no_grad():
        sampler(x, t, y)
        fix_gates(model, [2, 2], [2, 2], tokens=True)
        sampler(x, t, y)
    on, half = sampler.records
    for r in (on, half):
        m = r["kept"].double()
        r["static"] = a + b * m + c * m * m                                   # (rows,) the DC-DiT at those tokens
        assert r["flops"].shape == m.shape
    assert bool((on["flops"] > on["static"]).all()) and bool((half["flops"] < half["static"]).all())
