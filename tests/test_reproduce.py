"""tools/reproduce.py: the quick run writes every section with finite numbers; the judging and the
baseline matching follow the numbers they are given."""
import json
import math
import os

import numpy as np
import pytest

from config import load_config
from conftest import json_numbers
from tools import reproduce
from tools.reproduction import plan, runs, scoring
from tools.reproduction import report as reporting
from models.flops import build_model, count_params, forward_flops

SECTIONS = ("## Setup", "## Claims", "## Table 1 in miniature", "## Where the boundaries land",
            "## Same noise, same images?", "## Compression vs timestep", "## Tail dropping",
            "## Differences from the paper's setting",
            "## Two stages", "## Wall times")
FIGURES = ("samples.png", "boundary_maps.png", "enrichment.png", "compression_vs_t.png", "tail_drop.png",
           "boundary_maps_two_stage.png")




def test_quick_run_writes_every_section(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the four train.py children
    # Pixel features: the Inception path has its own tests (test_evaluations.py); here it would only add a minute.
    res = reproduce.main_impl(["--out", str(tmp_path), "--quick", "--features", "pixels", "--two-stage",
                               "--tables", "1", "2"])
    report = (tmp_path / "REPORT.md").read_text()
    for section in SECTIONS:
        assert section in report, section
    for name in FIGURES:
        assert (tmp_path / name).stat().st_size > 1000, name
    assert "QUICK MODE" in report
    saved = json.loads((tmp_path / "results.json").read_text())
    assert set(saved["models"]) == {"dcdit", "random", "isoparam", "isoflop", "twostage"}
    assert [r["f"] for r in saved["tail_drop"]] == list(plan.FRACTIONS)
    assert [r["uncond_f"] for r in saved["lite_cfg"]] == list(plan.LITE_CFG_FRACTIONS)
    assert "Table 3 in miniature" not in report and not saved["upcycling"]  # its table was not asked for
    for path, value in json_numbers({k: v for k, v in saved.items() if k != "enrichment"}):
        assert math.isfinite(value), path
    for key in ("dcdit", "random", "isoparam", "isoflop", "twostage"):
        m = saved["models"][key]
        assert m["fid"] >= 0 and m["tflops"] > 0 and m["params"] > 0
        assert f"{m['fid']:.2f} ± {m['fid_sd']:.2f}" in report  # the table shows what was measured
    # Tail dropping really cut the measured cost, and the random router keeps exactly L / N.
    t = [r["tflops"] for r in saved["tail_drop"]]
    assert t[0] > t[1] > t[2]
    lite = [r["tflops"] for r in saved["lite_cfg"]]  # Lite-CFG: only the unconditional rows got cheaper
    assert t[0] > lite[0] > lite[1] > t[2]
    assert saved["models"]["random"]["compression"] == pytest.approx(4.0)
    # The two-stage model: each stage compresses (N = 2 each), the inner stage never keeps more than stage 0, and
    # its boundaries are scored on their own.
    c0, c1 = saved["compression"]["twostage_stage0"]["overall"], saved["compression"]["twostage"]["overall"]
    assert 1.0 <= c0 <= c1 and saved["models"]["twostage"]["compression"] == c1
    assert "stage1" in saved["enrichment"]["twostage"] and saved["two_stage"]["flops"] > 0
    assert f"{c0:.2f} | {c1:.2f}" in report
    bands = reporting._by_band(saved["compression"]["twostage_stage0"], "mean")
    assert f"| two-stage, stage 0 | {bands} | {c0:.2f} |" in report  # compression per stage by timestep band
    assert len(res["claims"]) == 7 and report.count("| **yes** |") + report.count("| **no** |") == 7
    assert res["claims"][6][0].startswith("Lite-CFG cuts the cost of guidance")
    # The same-seed diagnostics: every pair measured, the zero-output reference scored, the baseline bar judged.
    assert set(saved["agreement"]) == {f"{a} vs {b}" for a, b in plan.AGREEMENT_PAIRS}
    assert all(0 <= a["mean_abs"] <= 255 and -1 <= a["corr"] <= 1 for a in saved["agreement"].values())
    assert saved["zero_output"]["fid"] >= 0 and "output layer zeroed" in report
    assert "Baseline bar:" in report and ("**met**" in report or "**not met**" in report)

    # --rerender rewrites the same report from results.json alone, judging the claims again (here from none).
    results = (tmp_path / "results.json").read_text()
    (tmp_path / "results.json").write_text(json.dumps(dict(json.loads(results), claims=[]), indent=1))
    (tmp_path / "REPORT.md").unlink()
    reproduce.main_impl(["--out", str(tmp_path), "--rerender"])
    assert (tmp_path / "REPORT.md").read_text() == report
    assert (tmp_path / "results.json").read_text() == results
    assert saved["depths"]["kept"] == 64
    # A rerun trains, samples and featurizes nothing (every sample set and the real digits' features are cached in
    # work/scores) and reports the same numbers.
    def not_again(*args, **kwargs):
        raise AssertionError("recomputed on a rerun")

    for name in ("sample_set", "features"):
        monkeypatch.setattr(scoring, name, not_again)
    rerun = reproduce.main_impl(["--out", str(tmp_path), "--quick", "--features", "pixels", "--two-stage",
                                 "--tables", "1", "2"])
    assert {k: m["fid"] for k, m in rerun["models"].items()} == {k: m["fid"] for k, m in saved["models"].items()}

    # A rerun reuses a finished training run instead of training it again.
    spec = {"dcdit": ("DC-DiT", plan.DCDIT_CONFIG, [f"train.max_steps={plan.QUICK.steps}"])}
    again = runs.train_all(spec, str(tmp_path / "work"))["dcdit"]
    assert again["ckpt"].endswith(f"{plan.QUICK.steps:07d}.pt") and "train.py --config" in again["command"]
    assert again["seconds"] == saved["models"]["dcdit"]["train_seconds"] > 0  # from the run's log, both times


def test_rerender_names_a_missing_table3_baseline(tmp_path):
    rows = [{"run": "distill", "steps": 500, "fid": 30.0, "fid_sd": 1.0}]
    (tmp_path / "results.json").write_text(json.dumps({"depths": {"kept": 64}, "upcycling": rows}))
    with pytest.raises(plan.ReproduceError, match="has Table 3's rows but no DiT/2 baseline row"):
        reproduce.main_impl(["--out", str(tmp_path), "--rerender"])
    assert not (tmp_path / "REPORT.md").exists()


def test_distill_ablation_adds_one_table3_run_with_a_longer_warm_up():
    dc_cfg = load_config(os.path.join(plan.ROOT, plan.DCDIT_CONFIG))
    depths = {"isoparam": 2, "isoflop": 3}
    specs = plan.run_specs(depths, plan.FULL_LATENT, dc_cfg, tables=("3",), distill_ablation=True)
    assert list(specs) == ["dcdit", "teacher", "upcycle", "distill", "distill_long"]  # after the teacher it needs
    short, long = (plan.distill_steps(plan.FULL_LATENT), plan.distill_ablation_steps(plan.FULL_LATENT))
    assert (short, long) == (125, 500)
    assert f"upcycle.distill_steps={long}" in specs["distill_long"][2]
    assert specs["distill_long"][2][:-1] == specs["distill"][2][:-1]  # nothing else differs from the paper's run
    assert "distill_long" not in plan.run_specs(depths, plan.FULL_LATENT, dc_cfg, tables=("3",))
    with pytest.raises(plan.ReproduceError, match="add 3 to --tables"):
        plan.run_specs(depths, plan.FULL_LATENT, dc_cfg, tables=("1",), distill_ablation=True)
    with pytest.raises(plan.ReproduceError, match="leaves no diffusion training before the last budget"):
        plan.run_specs(depths, plan.QUICK, dc_cfg, tables=("3",), distill_ablation=True)  # 4 steps of 3


def test_table3_section_lists_the_ablation_rows_beside_the_paper_run():
    def row(run, steps, fid):
        return {"run": run, "steps": steps, "fid": fid, "fid_sd": 1.0, "recognised": 0.5, "tflops": 0.01,
                "compression": 4.0}

    model = {"label": "m", "params": 1e6, "tflops": 0.01, "compression": 4.0, "fid": 20.0, "fid_sd": 1.0,
             "recognised": 0.9}
    res = {"plan": {"steps": 1000}, "budgets": [50, 125, 250], "distill_steps": 12, "distill_ablation_steps": 48,
           "teacher_steps": 2000, "models": {k: dict(model) for k in ("teacher", "dcdit", "upcycle", "distill",
                                                                       "distill_long")},
           "dit_baseline": dict(model, steps=1000),
           "upcycling": [row(run, b, fid + b / 10) for run, fid in (("scratch", 300), ("upcycle", 200),
                                                                   ("distill", 100), ("distill_long", 50))
                         for b in (50, 125, 250)]}
    text = "\n".join(reporting.upcycling_section(res))
    assert "| DC-DiT upcycled + distilled (48 steps, ablation) | 1.000M | 125 | 12.5% |" in text
    order = [text.index(f"| {name} | 1.000M | 50 |") for name in ("DC-DiT from scratch", "DC-DiT upcycled",
             "DC-DiT upcycled + distilled (12 steps)", "DC-DiT upcycled + distilled (48 steps, ablation)")]
    assert order == sorted(order)
    assert ("warm-up of 48 steps (4.8% of the from-scratch steps) instead of 12: FID 55.00 ± 1.00 vs 105.00 ± 1.00 "
            "at 50 steps, 62.50 ± 1.00 vs 112.50 ± 1.00 at 125 steps, 75.00 ± 1.00 vs 125.00 ± 1.00 at 250 steps.") \
        in text
    del res["models"]["distill_long"], res["distill_ablation_steps"]
    res["upcycling"] = [r for r in res["upcycling"] if r["run"] != "distill_long"]
    assert "ablation" not in "\n".join(reporting.upcycling_section(res))  # a report without it is unchanged


def test_matched_depths_pick_the_closest_dit():
    dc_cfg = load_config(os.path.join(plan.ROOT, plan.DCDIT_CONFIG))
    dit_cfg = load_config(os.path.join(plan.ROOT, plan.DIT_CONFIG))
    d = plan.matched_depths(dc_cfg, dit_cfg)
    assert d["kept"] == 64 and d["dcdit_params"] == count_params(build_model(dc_cfg))
    for key, target in (("isoparam", "dcdit_params"), ("isoflop", "dcdit_flops_at_L_over_N")):
        metric = "params" if key == "isoparam" else "flops"
        gaps = {c["depth"]: abs(c[metric] - d[target]) for c in d["candidates"]}
        assert gaps[d[key]] == min(gaps.values())
    deeper = load_config(os.path.join(plan.ROOT, plan.DIT_CONFIG), [f"model.depth={d['isoflop']}"])
    assert forward_flops(build_model(deeper)) == next(c["flops"] for c in d["candidates"]
                                                      if c["depth"] == d["isoflop"])


def test_compression_by_step_uses_conditional_rows_only():
    kept = np.array([[4, 8, 1, 1], [16, 16, 2, 2]])  # (steps, [cond; uncond]) with L = 16
    c = scoring.compression_by_step(kept, np.array([999, 0]), L=16)
    assert c["mean"] == [3.0, 1.0]
    assert c["overall"] == pytest.approx(16 / np.mean([4, 8, 16, 16]))


def _result(fids, enrich=(2.0, 1.0), comp=(8.0, 4.0), tail=((0.0, 1.0, 10.0), (0.3, 0.8, 11.0), (0.6, 0.6, 12.0))):
    models = {k: {"fid": f, "fid_sd": 0.1, "tflops": 1.0} for k, f in zip(("dcdit", "random", "isoparam", "isoflop"),
                                                                            fids)}
    series = {"t": [900, 100], "enrichment": list(enrich)}
    return {"models": models,
            "enrichment": {"dcdit": series, "random": {"t": [900, 100], "enrichment": [1.0, 1.0]}},
            "compression": {"dcdit": {"t": [900, 100], "mean": list(comp)}},
            "tail_drop": [{"f": f, "tflops": t, "fid": fid} for f, t, fid in tail]}


def test_judge_reports_claims_that_fail():
    held = [h for _, h, _ in reporting.judge(_result([10.0, 12.0, 11.0, 13.0]))]
    assert held == [True, True, True, True, True, True]
    # A worse learned router, boundaries off the strokes, clean steps compressed more, a cliff under dropping.
    bad = _result([12.0, 10.0, 11.0, 13.0], enrich=(0.5, 0.7), comp=(3.0, 6.0),
                  tail=((0.0, 1.0, 10.0), (0.3, 0.8, 11.0), (0.6, 0.6, 30.0)))
    held = [h for _, h, _ in reporting.judge(bad)]
    assert held == [False, False, True, False, False, False]
    # Tail-drop rows past the fractions the checkpoint trained with are said to be.
    bad["recipe"] = {"drop_fractions": [0.0, 0.1, 0.2, 0.3]}
    evidence = reporting.judge(bad)[-1][2]
    assert evidence.endswith("; multi-budget training drew f from {0, 0.1, 0.2, 0.3}, so f = 0.6 is beyond "
                             "what it was trained for")
    bad["recipe"] = {"drop_fractions": [0.0, 0.3, 0.6]}
    assert "beyond" not in reporting.judge(bad)[-1][2]


def test_lite_cfg_claim_follows_cost_and_fid():
    tail = [{"f": f, "tflops": t, "fid": fid, "fid_sd": 0.5} for f, t, fid in ((0.0, 1.0, 10.0), (0.3, 0.8, 12.0),
                                                                                  (0.6, 0.6, 20.0))]
    lite = [{"uncond_f": 0.3, "tflops": 0.9, "fid": 10.5, "fid_sd": 0.5},
            {"uncond_f": 0.6, "tflops": 0.79, "fid": 11.0, "fid_sd": 0.5}]
    (claim, held, evidence), = reporting.lite_cfg_claim({"tail_drop": tail, "lite_cfg": lite})
    assert held and "unconditional f = 0.6: 790.00 GFLOPs, FID 11.00 (dropping both branches at f = 0.3: 800.00 " \
                     "GFLOPs, FID 12.00)" in evidence
    lite[1]["fid"] = 11.5  # 1.5 worse than f = 0 against 2 sd = 1.41: measurably worse
    assert not reporting.lite_cfg_claim({"tail_drop": tail, "lite_cfg": lite})[0][1]
    lite[1].update(fid=10.0, tflops=1.0)  # no cheaper than plain CFG
    assert not reporting.lite_cfg_claim({"tail_drop": tail, "lite_cfg": lite})[0][1]
    assert reporting.lite_cfg_claim({"tail_drop": tail}) == []


def _table34(fids: dict, flops_ratio: float = 0.7) -> dict:
    """A results dict with Tables 3 and 4: fids maps (run, steps) -> FID, plus the full runs' FIDs."""
    row = lambda fid: {"fid": fid, "fid_sd": 0.1, "tflops": 1.0, "recognised": 0.9}  # noqa: E731
    models = {k: row(fids.pop(k)) for k in ("dcdit", "teacher")}
    models["dydit"] = dict(row(fids.pop("dydit")), flops_ratio=flops_ratio, tflops=0.7)
    return {"models": models, "budgets": [200, 500, 1000], "plan": {"steps": 4000}, "dydit": {"target": 0.7},
            "dit_baseline": dict(row(fids.pop("dit")), steps=4000),
            "upcycling": [dict(row(f), run=run, steps=b) for (run, b), f in fids.items()]}


def test_table3_and_table4_claims_follow_the_numbers():
    # The full-budget rivals are the DC-DiT and the DiT/2 at 100% (the paper's rows), not the longer-trained teacher.
    good = {"dcdit": 10.0, "dit": 11.0, "teacher": 5.0, "dydit": 10.1, ("upcycle", 200): 50.0, ("upcycle", 500): 12.0,
            ("upcycle", 1000): 9.0, ("distill", 200): 15.0, ("distill", 500): 8.0, ("distill", 1000): 7.0}
    res = _table34(dict(good))
    assert [h for _, h, _ in reporting.upcycling_claims(res)] == [True, True, True]  # no from-scratch budget rows
    assert [h for _, h, _ in reporting.dydit_claim(res)] == [True]
    assert "12.5%" in reporting.upcycling_claims(res)[0][0] and "25%" in reporting.upcycling_claims(res)[1][0]
    # With the from-scratch checkpoints at the budgets: the distilled run against them at equal steps.
    scratch = {("scratch", 200): 80.0, ("scratch", 500): 30.0, ("scratch", 1000): 20.0}
    claims = reporting.upcycling_claims(_table34({**good, **scratch}))
    assert [h for _, h, _ in claims] == [True, True, True, True] and "same steps" in claims[3][0]
    assert claims[3][2].startswith("at 5%: FID 15.00 vs 80.00") and "at 25%: FID 7.00 vs 20.00" in claims[3][2]
    assert "both at 100%" in claims[0][0] and "vs DiT/2: FID 8.00 vs 11.00" in claims[0][2]
    # Distilled at 12.5% loses to the DC-DiT, the warm-up does not help early, DyDiT misses lambda; at 5% the
    # distilled run also loses to the from-scratch checkpoint, so the equal-steps claim holds only partly.
    res = _table34({**good, **scratch, ("distill", 500): 10.5, ("distill", 200): 60.0}, flops_ratio=0.9)
    assert [h for _, h, _ in reporting.upcycling_claims(res)] == [False, True, False, True]
    res = _table34({**good, **scratch, ("distill", 500): 10.5, ("distill", 200): 90.0}, flops_ratio=0.9)
    assert [h for _, h, _ in reporting.upcycling_claims(res)] == [False, True, False, "partly"]
    assert "| **partly** |" in "\n".join(reporting.claims_section({"claims": reporting.upcycling_claims(res),
                                                                    "models": {}}))
    worse = {k: 200.0 for k in (("distill", 200), ("distill", 500), ("distill", 1000))}
    assert reporting.upcycling_claims(_table34({**good, **scratch, **worse}))[3][1] is False
    assert [h for _, h, _ in reporting.dydit_claim(res)] == [False]
    # DyDiT reaches lambda but its FID is worse by more than 2 bootstrap sd.
    assert [h for _, h, _ in reporting.dydit_claim(_table34(dict(good, dydit=12.0)))] == [False]
    assert reporting.upcycling_claims({"models": {}}) == [] and reporting.dydit_claim({"models": {}}) == []


def test_pixel_fallback_is_labelled():
    from evaluations.inception import feature_net
    net, label = feature_net("pixels")
    assert "FALLBACK" in label
    import torch
    images = torch.zeros(3, 16, 16, 3, dtype=torch.uint8)
    images[1] = 255
    pool, _, logits = net(images)
    assert pool.shape == (3, 256) and logits is None and float(pool[1].min()) == 1.0


def test_quick_latent_pipeline_end_to_end(tmp_path, monkeypatch):
    """--space latent: a diffusers AutoencoderKL trained here -> extract_features.py -> train.py on its latents ->
    samples decoded by it -> scored; the geometry the features folder records is what training used. Tables 3
    and 4 alone (--tables): the teacher, the upcycled runs from it and the DyDiT fine-tune of the DC-DiT."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    reproduce.main_impl(["--out", str(tmp_path), "--quick", "--space", "latent", "--features", "pixels",
                         "--tables", "3", "4", "--jobs", "2"])
    work = tmp_path / "work"
    # Two at a time (--jobs 2), each child's output in its own log; the upcycled runs waited for the teacher and
    # DyDiT for the DC-DiT (their commands name those final checkpoints, below).
    for key in ("dcdit", "teacher", "upcycle", "distill", "dydit"):
        assert "saved checkpoint" in (work / "runs" / f"{key}.log").read_text(), key
    ae = json.loads((work / "autoencoder" / "config.json").read_text())
    assert ae["_class_name"] == "AutoencoderKL" and ae["latent_channels"] == 4
    record = json.loads((work / "features" / "imagenet64_features" / "latents.json").read_text())
    assert record["downsample"] == 4 and record["scaling_factor"] == pytest.approx(ae["scaling_factor"])
    assert len(list((work / "features" / "imagenet64_features").glob("*.npy"))) == plan.QUICK.n_latents
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["space"] == "latent" and saved["input_size"] == 16
    assert saved["autoencoder"]["latents"]["latent_channels"] == 4 and saved["autoencoder"]["psnr_db"] > 0
    report = (tmp_path / "REPORT.md").read_text()
    assert "in latent space" in report and f"PSNR {saved['autoencoder']['psnr_db']:.2f} dB" in report
    # Every model trained on the latents with the autoencoder that made them.
    for m in saved["models"].values():
        assert f"data.vae_path={work / 'autoencoder'}" in m["command"]
        assert 0.0 <= m["recognised"] <= 1.0 and math.isfinite(m["fid"])
    assert set(saved["models"]) == {"dcdit", "teacher", "upcycle", "distill", "dydit"}
    assert saved["tables"] == ["3", "4"] and not (work / "runs" / "isoparam").exists()
    # Table 3: the upcycled runs start from the teacher's final checkpoint; every run is scored at every budget.
    teacher = saved["models"]["teacher"]["ckpt"]
    for key in ("upcycle", "distill"):
        assert f"upcycle.checkpoint={tmp_path / teacher}" in saved["models"][key]["command"]
    assert "upcycle.distill_steps=0" in saved["models"]["upcycle"]["command"]
    budgets = list(plan.budget_steps(plan.QUICK))
    assert saved["budgets"] == budgets
    assert sorted((r["run"], r["steps"]) for r in saved["upcycling"]) == sorted(
        (run, b) for run in ("scratch", "upcycle", "distill") for b in budgets)
    final = next(r for r in saved["upcycling"] if r["run"] == "distill" and r["steps"] == budgets[-1])
    assert final["fid"] == saved["models"]["distill"]["fid"]  # the last budget is the run's final checkpoint
    assert "## Table 3 in miniature" in report and "## Table 4 in miniature" in report
    # The paper's DiT row: the teacher's DiT/2 at the from-scratch steps, a checkpoint of the teacher's own run.
    dit = saved["dit_baseline"]
    assert dit["steps"] == plan.QUICK.steps < saved["teacher_steps"] and dit["fid"] != saved["models"]["teacher"]["fid"]
    assert f"| {plan.QUICK.steps} | 100% | {1e3 * dit['tflops']:.2f} | 4.00 | {dit['fid']:.2f} ± " in report
    # Table 4: fine-tuned from the DC-DiT's final checkpoint; its FLOPs are priced from what the gates left.
    dydit = saved["models"]["dydit"]
    assert f"dydit.init_checkpoint={tmp_path / saved['models']['dcdit']['ckpt']}" in dydit["command"]
    assert 0.0 < dydit["flops_ratio"] < 1.5 and f"{dydit['flops_ratio']:.3f}" in report
    claims = [c[0] for c in saved["claims"]]
    assert sum("(Table 3)" in c for c in claims) == 3 and sum("(Table 4)" in c for c in claims) == 1
    assert not any("(Table 1)" in c or "(Table 2)" in c for c in claims)


def test_training_seconds_counts_each_logged_interval_once_across_resumes(tmp_path):
    lines = ["[t] run folder x; 1 process(es)", "[t] dataset: 5 items",
             '[t] {"step": 100, "steps_per_sec": 2.0}', '[t] {"step": 200, "steps_per_sec": 4.0}',
             '[t] {"step": 300, "steps_per_sec": 1.0}',              # killed after this line, resumed from 150
             "[t] run folder x; 1 process(es)", "[t] resumed from step 150",
             '[t] {"step": 200, "steps_per_sec": 5.0}', '[t] {"step": 300, "steps_per_sec": 10.0}',
             "[t] saved checkpoint x/0000300.pt"]
    (tmp_path / "log.txt").write_text("\n".join(lines) + "\n")
    # 100 / 2 for the first 100 steps; 50 / 5 and 100 / 10 after the resume replace the first 200 and 300.
    assert runs.training_seconds(str(tmp_path)) == pytest.approx(50 + 10 + 10)
    assert runs.training_seconds(str(tmp_path), upto=200) == pytest.approx(50 + 10)


def test_cached_set_is_reused_only_for_the_same_ident(tmp_path):
    calls = []

    def make(kept=True):
        calls.append(1)
        return {"images": np.full((2, 4, 4, 3), len(calls), dtype=np.uint8), "kept": np.ones((3, 4)) if kept else None,
                "kept0": None, "t": np.array([999, 500, 0]), "gated_tflops": 0.25 if kept else None, "seconds": 1.5,
                "acts": np.zeros((2, 8))}

    path = str(tmp_path / "scores" / "dcdit_f=0.npz")
    first = scoring.cached_set(path, {"source": "a.pt", "f": 0.0}, make)
    again = scoring.cached_set(path, {"source": "a.pt", "f": 0.0}, make)
    assert len(calls) == 1 and np.array_equal(again["images"], first["images"]) and again["kept0"] is None
    assert again["gated_tflops"] == 0.25 and again["seconds"] == 1.5 and np.array_equal(again["t"], first["t"])
    other = scoring.cached_set(path, {"source": "a.pt", "f": 0.3}, lambda: make(kept=False))  # another set
    assert len(calls) == 2 and int(other["images"][0, 0, 0, 0]) == 2
    assert scoring.cached_set(path, {"source": "a.pt", "f": 0.3}, make)["kept"] is None and len(calls) == 2


def test_agreement_section_names_the_zero_output_reference_only_when_it_ran():
    m = lambda label: {"label": label, "fid": 1.0}  # noqa: E731
    res = {"agreement": {"dcdit vs random": {"mean_abs": 7.0, "corr": 0.9}}, "zero_output": None,
           "models": {"dcdit": m("learned"), "random": m("random")}}
    text = "\n".join(reporting.agreement_section(res))
    assert "| learned vs random | 7.00 | 0.900 |" in text and "zero" not in text and "nan" not in text
    res["zero_output"] = {"label": "DiT, output layer zeroed", "fid": 300.0, "fid_sd": 2.0, "recognised": 0.1}
    res["agreement"]["dcdit vs zero"] = {"mean_abs": 50.0, "corr": 0.1}
    text = "\n".join(reporting.agreement_section(res))
    assert "(FID 300.00 ± 2.00, recognised 10.0%)" in text and "| learned vs DiT, output layer zeroed |" in text


def test_agreement_and_the_zero_output_reference():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, size=(4, 8, 8, 3), dtype=np.uint8)
    assert scoring.agreement(a, a) == {"mean_abs": 0.0, "corr": pytest.approx(1.0)}
    b = 255 - a
    assert scoring.agreement(a, b)["corr"] == pytest.approx(-1.0)
    assert scoring.agreement(a, b)["mean_abs"] == pytest.approx(np.abs(a.astype(float) - b).mean())
    import torch
    from models import create_model
    cfg = load_config(os.path.join(plan.ROOT, plan.DIT_CONFIG))
    model = create_model(cfg.model).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))  # a trained-looking network whose output is not zero
        x = torch.randn(2, cfg.model.in_channels, cfg.model.input_size, cfg.model.input_size)
        t, y = torch.tensor([10, 900]), torch.tensor([1, 2])
        assert model(x, t, y).abs().max() > 0
        zero = scoring.zero_output(model)
        assert torch.equal(zero(x, t, y), torch.zeros_like(model(x, t, y)))
        assert model(x, t, y).abs().max() > 0  # the original is untouched


def test_status_reports_each_run_from_its_folder_and_trains_nothing(tmp_path, capsys, monkeypatch):
    """--status: the newest checkpoint of each run of the asked tables, its logged training time, the scored sets;
    no run folder, autoencoder or report is created."""
    monkeypatch.setattr(reproduce, "matched_depths", lambda *cfgs: {"isoparam": 5, "isoflop": 7})  # tested above
    work = tmp_path / "work"
    done = work / "runs" / "dcdit" / "000-DCDiT-S"
    (done / "checkpoints").mkdir(parents=True)
    for step in (6, 12):
        (done / "checkpoints" / f"{step:07d}.pt").write_bytes(b"")
    (done / "log.txt").write_text('[t] run folder x\n[t] {"step": 12, "steps_per_sec": 2.0}\n')
    # An older, longer attempt logged steps past the newest checkpoint: they are still to be redone.
    (done / "log.txt").open("a").write('[t] {"step": 20, "steps_per_sec": 1.0}\n')
    half = work / "runs" / "random" / "000-DCDiT-S" / "checkpoints"
    half.mkdir(parents=True)
    (half / "0000006.pt").write_bytes(b"")
    (half / "not-a-step.pt").write_bytes(b"")  # only NNNNNNN.pt files are checkpoints
    (work / "scores").mkdir()
    (work / "scores" / "dcdit_f=0.npz").write_bytes(b"")
    res = reproduce.main_impl(["--out", str(tmp_path), "--quick", "--tables", "1", "2", "--status"])
    rows = {r["key"]: r for r in res["runs"]}
    assert list(rows) == ["dcdit", "random", "isoparam", "isoflop"]  # Tables 1 and 2's runs, in training order
    assert rows["isoflop"]["label"] == "DiT/2 isoflop (depth 7)" and rows["isoflop"]["step"] == 0
    assert (rows["dcdit"]["step"], rows["dcdit"]["steps"], rows["dcdit"]["seconds"]) == (12, 12, 6.0)
    assert (rows["random"]["step"], rows["random"]["seconds"], rows["random"]["rate"]) == (6, 0.0, None)
    assert rows["dcdit"]["rate"] == 1.0  # its last logged interval
    out = capsys.readouterr().out
    assert "done" in out.splitlines()[0] and " 50%" in out.splitlines()[1] and "scored and cached: 1" in out
    assert "to go" not in out  # done, or no logged rate yet
    (half.parent / "log.txt").write_text('[t] run folder x\n[t] {"step": 6, "steps_per_sec": 0.1}\n')
    reproduce.main_impl(["--out", str(tmp_path), "--quick", "--tables", "2", "--status"])
    assert "1 min to go at its last logged 0.10 steps/s" in capsys.readouterr().out  # 6 steps left at 0.1/s
    assert not (work / "runs" / "isoparam").exists() and not (tmp_path / "REPORT.md").exists()
    # The latent space reads its folders the same way, without training the autoencoder first.
    reproduce.main_impl(["--out", str(tmp_path), "--quick", "--space", "latent", "--tables", "2", "--status"])
    assert "autoencoder: to train" in capsys.readouterr().out and not (work / "autoencoder").exists()


def test_train_all_runs_jobs_at_once_and_waits_for_the_checkpoints_a_run_starts_from(tmp_path, monkeypatch):
    """The scheduler alone (children that sleep instead of training): at most `jobs` at once, a run that starts from
    another's final checkpoint gets its path and starts only after it, a failure stops the runs beside it."""
    import subprocess
    import sys
    import time
    finished, started = [], {}
    sleep = {"slow": 30.0}

    def fake_start(key, config, overrides, work, threads=None):
        started[key] = dict(overrides=overrides, threads=threads, at=time.monotonic())
        code = 1 if key == "bad" else 0
        proc = subprocess.Popen([sys.executable, "-c",
                                 f"import time, sys; time.sleep({sleep.get(key, 0.5)}); sys.exit({code})"])
        return runs.TrainJob(key, str(tmp_path / key), 10, f"train {key}", proc=proc)

    def fake_finish(job):
        finished.append(job.key)
        if job.proc.returncode != 0:
            raise plan.ReproduceError(f"{job.key} failed")
        return {"ckpt": f"/ckpt/{job.key}.pt", "seconds": 1.0, "command": job.command}

    monkeypatch.setattr(runs, "start_training", fake_start)
    monkeypatch.setattr(runs, "finish_training", fake_finish)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    specs = {"a": ("A", "c", ["x=1"]), "b": ("B", "c", ["x=2"]), "child": ("C", "c", ["init={a}"]),
             "d": ("D", "c", [])}
    out = runs.train_all(specs, str(tmp_path), jobs=2)
    assert list(out) == list(specs) and out["child"]["ckpt"] == "/ckpt/child.pt"
    assert started["child"]["overrides"] == ["init=/ckpt/a.pt"]  # "{a}" became a's final checkpoint
    assert all(s["threads"] == 3 for s in started.values())  # OMP_NUM_THREADS set by the caller wins
    # a and b together; child and d only once a slot is free, child only after a finished.
    assert abs(started["a"]["at"] - started["b"]["at"]) < 0.4
    assert min(started["child"]["at"], started["d"]["at"]) > started["a"]["at"] + 0.4
    assert finished.index("a") < finished.index("child")

    # A run others start from goes first among those ready (here: before b).
    started.clear()
    awaited_first = {"b": ("B", "c", []), "a": ("A", "c", []), "child": ("C", "c", ["init={a}"])}
    runs.train_all(awaited_first, str(tmp_path), jobs=1)
    assert sorted(started, key=lambda k: started[k]["at"]) == ["a", "b", "child"]

    # One at a time: specs' order, the machine's threads and this console.
    started.clear()
    runs.train_all(specs, str(tmp_path), jobs=1)
    assert sorted(started, key=lambda k: started[k]["at"]) == ["a", "b", "child", "d"]
    assert all(s["threads"] is None for s in started.values())

    # A failed run stops the one beside it (terminated, not waited for).
    jobs = {}
    monkeypatch.setattr(runs, "start_training", lambda key, *a, **k: jobs.setdefault(key, fake_start(key, *a, **k)))
    t0 = time.monotonic()
    with pytest.raises(plan.ReproduceError, match="bad failed"):
        runs.train_all({"bad": ("X", "c", []), "slow": ("S", "c", [])}, str(tmp_path), jobs=2)
    assert jobs["slow"].proc.returncode < 0 and time.monotonic() - t0 < 10
    # Past the --minutes deadline the runs training are stopped (SIGTERM) and the rest never start.
    jobs.clear()
    t0 = time.monotonic()
    with pytest.raises(plan.TimeBudgetSpent, match="before training runs \\['slow', 'later'\\] finished"):
        runs.train_all({"slow": ("S", "c", []), "later": ("L", "c", [])}, str(tmp_path), jobs=1, deadline=t0 + 1.0)
    assert list(jobs) == ["slow"] and jobs["slow"].proc.returncode < 0 and 1.0 <= time.monotonic() - t0 < 10
    # A run starting from one this invocation does not train is refused before anything starts.
    with pytest.raises(plan.ReproduceError, match="starts from \\['teacher'\\]"):
        runs.train_all({"up": ("U", "c", ["upcycle.checkpoint={teacher}"])}, str(tmp_path), jobs=2)


def test_a_killed_reproduce_stops_its_training_children(tmp_path):
    """SIGTERM to the parent (a `kill`) stops the runs it started: none trains on, orphaned, beside a rerun that
    resumes the same runs."""
    import signal
    import subprocess
    import sys
    import time
    pids = tmp_path / "pids"
    script = f"""
import subprocess, sys
from tools.reproduction import runs
def start(key, config, overrides, work, threads=None):
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    with open({str(pids)!r}, "a") as f:
        f.write(f"{{proc.pid}}\\n")
    return runs.TrainJob(key, work, 10, key, proc=proc)
runs.start_training = start
runs.train_all({{"a": ("A", "c", []), "b": ("B", "c", [])}}, {str(tmp_path)!r}, jobs=2)
"""
    parent = subprocess.Popen([sys.executable, "-c", script], cwd=plan.ROOT)
    deadline = time.monotonic() + 60
    while not (pids.exists() and len(pids.read_text().split()) == 2):
        assert time.monotonic() < deadline and parent.poll() is None, "the two children never started"
        time.sleep(0.1)
    parent.send_signal(signal.SIGTERM)
    assert parent.wait(timeout=30) == 128 + signal.SIGTERM
    for pid in map(int, pids.read_text().split()):
        with pytest.raises(ProcessLookupError):  # terminated and reaped by the parent
            os.kill(pid, 0)


def test_the_two_stage_verdict_follows_the_margin_and_its_spread():
    row = lambda fid, sd=0.5: {"fid": fid, "fid_sd": sd, "tflops": 1e-3, "recognised": 0.9}  # noqa: E731
    assert reporting._hierarchy_verdict(row(10.0), row(10.5)).startswith("**Not measurably**")  # 0.5 < 2 x 0.71
    assert reporting._hierarchy_verdict(row(10.0), row(12.0)).startswith("**Yes**")
    assert reporting._hierarchy_verdict(row(12.0), row(10.0)).startswith("**No**")
    assert reporting._hierarchy_verdict(row(12.0, 0.1), row(10.0, 2.0)).startswith("**Not measurably**")


def test_minutes_stops_before_the_next_sample_set_and_exits_3(tmp_path, monkeypatch, capsys):
    """--minutes: a spent budget stops scoring before a set it would have to sample (cached sets still load), and the
    command exits 3 with one line saying that the same command continues."""
    import time
    scorer = object.__new__(scoring.Scorer)  # only what score() reads before it samples
    scorer.plan, scorer.work, scorer.phases, scorer.feature_label = plan.QUICK, str(tmp_path), {}, "pixels"
    scorer.deadline = time.monotonic() - 1.0
    ckpt = tmp_path / "0000012.pt"
    ckpt.write_bytes(b"weights")
    monkeypatch.setattr(scoring, "sample_set", lambda *a, **k: pytest.fail("sampled past the deadline"))
    with pytest.raises(plan.TimeBudgetSpent, match="before sampling dcdit f=0"):
        scorer.score(None, None, "dcdit f=0", str(ckpt))
    assert not (tmp_path / "scores").exists()

    with pytest.raises(SystemExit) as stop:
        reproduce.main(["--out", str(tmp_path / "r"), "--quick", "--tables", "2", "--minutes", "1e-9"])
    assert stop.value.code == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("stopped: the --minutes budget is spent before training runs ['dcdit', 'random']")
    assert not (tmp_path / "r" / "work" / "runs").exists()  # nothing started
    with pytest.raises(SystemExit) as bad:
        reproduce.main(["--out", str(tmp_path / "r"), "--minutes", "0"])
    assert bad.value.code == 2


def test_the_report_says_when_its_invocation_reused_earlier_runs():
    fresh = {"total_seconds": 600.0, "phases": {"training (2 models), this invocation": 500.0,
                                                "training dcdit (from its log)": 300.0,
                                                "training random (from its log)": 290.0}}
    assert reporting._invocation_time(fresh) == "total wall time 10.0 min."
    reused = {"total_seconds": 600.0, "phases": dict(fresh["phases"], **{"training (2 models), this invocation": 0.0})}
    assert reporting._invocation_time(reused).startswith("this invocation took 10.0 min, reusing the runs")
