"""tools/bench.py: one tiny run of every default section (each section's JSON keys and what it must show), the
stage methods the time shares are measured on, the targets per device, a trained checkpoint in the elastic and
dydit sections, and the helpers (FLOP-matched depth, release comparison, compile error report, memory child)."""
import contextlib
import io
import json
import math
from types import SimpleNamespace

import pytest
import torch

from config import config_to_dict, load_config
from conftest import json_numbers, trained_tiny_dcdit
from models.routing import keep_exactly
from tools import bench

DEFAULT_CPU_SECTIONS = {"train", "sample", "shares", "packed", "memory", "elastic", "lite_cfg", "dydit"}


def run_bench(path, *argv):
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        bench.main(["--tiny", "--repeats", "1", "--warmup", "0", "--batch", "2", "--json", str(path), *argv])
    with open(path) as f:
        return json.load(f), stdout.getvalue()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    return run_bench(tmp_path_factory.mktemp("bench") / "bench.json")


def test_tiny_run_measures_every_default_section(tiny_run):
    run, stdout = tiny_run
    res = run["results"]["tiny"]["2"]
    assert set(res) == DEFAULT_CPU_SECTIONS  # compile only with --compile on CPU, tf32 only when named
    assert set(bench.SECTIONS) == DEFAULT_CPU_SECTIONS | set(bench.CUDA_DEFAULT_ONLY)
    bad = [(p, v) for p, v in json_numbers(run) if not math.isfinite(v)]
    assert not bad, bad

    train = res["train"]
    for key in ("dcdit", "iso", "public"):
        assert train["images_per_s"][key] > 0 and train["gflops"][key] > 0
    for key in ("dcdit_over_iso_images_per_s", "fwd_bwd_time_ratio", "fwd_bwd_flops_ratio", "time_over_flops_ratio",
                "train_time_ratio", "train_time_over_flops_ratio"):
        assert train[key] > 0, key
    assert train["release"]["available"] is False  # the release was measured at B on CPU only

    # Tail dropping at f removes floor(f M) of the M = 64 forced tokens from every row.
    for f in bench.TAIL_DROPS:
        s = res["sample"][f"f={f:g}"]
        assert s["mean_kept"] == 64 - math.floor(f * 64)
        assert s["flops_speedup"] >= 1.0 and s["measured_speedup"] > 0 and s["efficiency"] > 0

    packed = res["packed"]
    assert sum(packed["counts"]["equal"]) == sum(packed["counts"]["varied"])
    assert len(set(packed["counts"]["varied"])) == 2
    for layout in ("packed", "padded"):
        p = packed[layout]
        assert p["time_ratio"] > 0 and p["time_per_flop_ratio"] == pytest.approx(p["time_ratio"] / p["flops_ratio"])
    assert packed["padded"]["flops_ratio"] > packed["packed"]["flops_ratio"] > 1.0  # padding costs FLOPs

    memory = res["memory"]
    assert "VmHWM" in memory["method"]
    for key in ("dcdit", "iso", "public"):
        assert "error" not in memory[key], memory[key]
        assert memory[key]["step_mib"] >= 0 and memory[key]["params_mib"] > 0

    # The table comes last (after every timing line), one row per measure, and is saved too.
    lines = stdout.splitlines()
    header = max(i for i, line in enumerate(lines) if line.startswith("measure"))
    assert header > max(i for i, line in enumerate(lines) if " 1/1: " in line)
    assert len(lines) - header - 2 == len(run["table"])  # rows, then the "wrote PATH" line
    measures = [row["measure"] for row in run["table"]]
    assert any("fwd+bwd time ratio / FLOPs ratio" in m for m in measures)
    assert any("route + chunk + dechunk" in m for m in measures)
    assert any(m.endswith("ours / release time per step") for m in measures)
    # Every judged row is in the JSON's targets with its number, judged by the CPU targets.
    assert run["meta"]["targets"] == "cpu"
    judged = {t["key"] for t in run["targets"]}
    assert judged == {"iso_images_per_s", "fwd_bwd_time_over_flops", "sample_efficiency", "overhead_share",
                      "packed_time_ratio", "padded_time_ratio"}
    for t in run["targets"]:
        assert t["verdict"] == ("PASS" if bench.TARGETS["cpu"][t["key"]][1](t["number"]) else "FAIL")
    assert run["models"]["tiny"]["iso"]["spec"]["depth"] == bench.flop_matched_depth(
        run["models"]["tiny"]["dcdit"]["gflops"] * 1e9,
        lambda d: bench.dit_flops_at_depth(bench.model_specs("tiny")[1], d))


def test_shares_cover_every_stage_with_its_flops(tiny_run):
    shares = tiny_run[0]["results"]["tiny"]["2"]["shares"]
    stages = [s.name for s in bench.STAGES]
    assert list(shares["shares"]) == stages + ["other"]
    assert all(shares["shares"][k] > 0 for k in stages)
    assert shares["overhead_share"] == pytest.approx(sum(shares["shares"][k] for k in bench.OVERHEAD))
    # FLOPs by stage come from models/flops.py at the bench's M and add up to the forward's.
    dc_meta = bench.build(bench.model_specs("tiny")[0], "meta")
    assert list(shares["gflops"]) == stages
    assert sum(shares["gflops"].values()) * 1e9 == pytest.approx(bench.forward_flops(dc_meta, 64), rel=1e-12)
    assert shares["gflops"]["chunk"] == 0 and shares["gflops"]["process"] > shares["gflops"]["route"] > 0
    assert sum(shares["flops_shares"].values()) == pytest.approx(1.0)


def test_elastic_lite_cfg_and_dydit_sections(tiny_run):
    res = tiny_run[0]["results"]["tiny"]["2"]
    elastic = res["elastic"]
    assert "top 64 = L/N" in elastic["routing"]
    speedups = []
    for f in bench.ELASTIC_FRACTIONS:  # measured speed-up next to the FLOPs of what was kept, per f
        s = elastic[f"f={f:g}"]
        assert s["mean_kept"] == 64 - math.floor(f * 64) and s["gflops"] > 0 and s["measured_speedup"] > 0
        assert s["efficiency"] == pytest.approx(s["measured_speedup"] / s["flops_speedup"])
        speedups.append(s["flops_speedup"])
    assert speedups[0] == 1.0 and speedups == sorted(speedups) and len(set(speedups)) == len(speedups)

    lite = res["lite_cfg"]  # the unconditional half runs fewer tokens, in the same batch, and costs less
    assert lite["plain"]["kept_cond"] == lite["plain"]["kept_uncond"] == lite["lite"]["kept_cond"] == 64
    assert lite["lite"]["kept_uncond"] == 64 - math.floor(0.9 * 64)
    assert lite["lite"]["gflops"] < lite["plain"]["gflops"] and lite["flops_ratio"] < 1 and lite["time_ratio"] > 0

    rows = res["dydit"]["rows"]  # FLOPs ratio over the DC-DiT row, as run: sliced saves, masked does not
    assert list(rows) == ["DC-DiT (no gates)", "all gates on", "width", "tokens", "width, masked"]
    assert rows["DC-DiT (no gates)"]["flops_ratio"] == 1.0 and rows["DC-DiT (no gates)"]["mode"] == "static"
    assert 1.0 < rows["all gates on"]["flops_ratio"] < 1.01  # the routers' own FLOPs
    assert rows["width"]["flops_ratio"] < 0.95 and rows["width, masked"]["flops_ratio"] >= 1.0
    assert rows["width"]["heads"] == res["dydit"]["width_kept"] / res["dydit"]["heads"] < 1
    assert rows["tokens"]["tokens"] < 0.9 and rows["tokens"]["flops_ratio"] < 1.0  # tokens skipped the MLP
    assert all(r["time_ratio"] > 0 and r["blocks_ratio"] > 0 for r in rows.values())


def tiny_dcdit():
    torch.manual_seed(0)
    return bench.build(bench.model_specs("tiny")[0], "cpu").eval()


@pytest.mark.parametrize("packed", [True, False])
def test_stages_are_the_model_forward(packed):
    """The shares section times STAGES, so they must be DCDiT.forward's own calls, in its order, and produce
    exactly its output (per-sample and equal kept counts)."""
    dc = tiny_dcdit()
    dc.packed = packed
    x, t, y = torch.randn(4, 4, 16, 16), torch.tensor([0, 10, 500, 999]), torch.tensor([0, 3, 5, 9])
    calls = []
    for stage in bench.STAGES:  # record the stage methods forward calls, on this instance only
        method = getattr(dc, stage.name)
        setattr(dc, stage.name, lambda *a, _m=method, _n=stage.name, **kw: calls.append(_n) or _m(*a, **kw))
    for kept in ([16, 112, 64, 64], 64):
        with torch.no_grad(), keep_exactly(dc, kept, packed):
            out = dc(x, t, y)
            assert calls == [s.name for s in bench.STAGES]
            assert torch.equal(bench.run_stages(dc, x, t, y)["out"], out)
        calls.clear()


def _has_grad(v) -> bool:
    if torch.is_tensor(v):
        return v.grad is not None
    return any(torch.is_tensor(getattr(v, f)) and getattr(v, f).grad is not None for f in vars(v))


class _Reads(dict):
    """A forward state that records which entries a stage reads."""

    def __init__(self, state):
        super().__init__(state)
        self.read = []

    def __getitem__(self, key):
        self.read.append(key)
        return super().__getitem__(key)


def _carries_grad(v) -> bool:
    if torch.is_tensor(v):
        return v.requires_grad
    tensors = [getattr(v, f) for f in vars(v)] if hasattr(v, "__dataclass_fields__") else []
    return any(torch.is_tensor(x) and x.requires_grad for x in tensors)


def test_stage_grads_are_exactly_the_inputs_the_forward_differentiates():
    """Each stage's `grads` (what it is differentiated through when timed alone) are exactly the inputs it reads
    that its output depends on differentiably: none missing (the step's backward through them would go
    untimed), none extra. Found here by running each stage on leaf copies of everything it reads."""
    dc = tiny_dcdit()
    x, t, y = torch.randn(2, 4, 16, 16), torch.tensor([3, 700]), torch.tensor([1, 2])
    state = dict(x=x, t=t, y=y)
    with keep_exactly(dc, 64):
        for stage in bench.STAGES:
            reads = _Reads(state)
            out = stage.call(dc, reads)                                          # the real forward, with grad
            leaves = {k: bench.as_leaf(state[k]) for k in dict.fromkeys(reads.read) if _carries_grad(state[k])}
            outs = bench.grad_outputs(stage.call(dc, {**state, **leaves}))
            sum(o.float().sum() for o in outs).backward()
            used = [k for k, v in leaves.items() if _has_grad(v)]
            assert used == [k for k in stage.grads if k != "t_emb"], stage.name  # t_emb: DyDiT's gates only
            state.update(out)


def test_stage_backwards_cover_the_step_parameters():
    """Timed alone, the stages' backward passes together reach every parameter the whole backward reaches, each
    in exactly one stage, so their times tile the step's work on the model."""
    dc = tiny_dcdit()
    x, t, y = torch.randn(2, 4, 16, 16), torch.tensor([3, 700]), torch.tensor([1, 2])
    with keep_exactly(dc, 64):
        with torch.no_grad():
            state = bench.run_stages(dc, x, t, y)
        reached = {}
        for stage in bench.STAGES:
            bench.stage_fwd_bwd(dc, stage, state)
            reached[stage.name] = {n for n, p in dc.named_parameters() if p.grad is not None}
        dc.zero_grad(set_to_none=True)
        dc(x, t, y).sum().backward()
        whole = {n for n, p in dc.named_parameters() if p.grad is not None}
    assert set().union(*reached.values()) == whole
    assert sum(len(v) for v in reached.values()) == len(whole)  # no parameter in two stages
    assert reached["route"] == {n for n in whole if n.startswith("router.")}
    assert {k for k, v in reached.items() if v} == {"condition", "encode", "route", "process", "decode"}


def test_targets_per_device(tiny_run):
    """A CUDA run is judged by the GPU targets: step time vs FLOPs, tail drop, packed time per FLOP, overhead,
    and images/s and peak memory reported; the CPU-only targets give no verdict there."""
    res = tiny_run[0]["results"]["tiny"]["2"]
    labels = {k: SimpleNamespace(label=k) for k in ("dcdit", "iso", "public")}
    cuda = SimpleNamespace(judged_as="cuda", contenders=labels)
    memory = dict(res["memory"], method="torch.cuda.max_memory_allocated ...")
    rows = [r for name in ("train", "sample", "shares", "packed") for r in bench.ROW_FNS[name](cuda, res[name])]
    rows += bench.memory_rows(cuda, memory)
    keys = [r.key for r in rows if r.key]
    assert sorted(set(keys)) == ["images_per_s", "overhead_share", "packed_time_per_flop", "peak_mib",
                                 "sample_efficiency", "train_time_over_flops"]
    assert keys.count("images_per_s") == 3 and keys.count("peak_mib") == 3
    by_key = {r.key: r for r in rows if r.key}
    assert by_key["train_time_over_flops"].number == res["train"]["train_time_over_flops_ratio"]
    assert by_key["packed_time_per_flop"].number == res["packed"]["packed"]["time_per_flop_ratio"]
    assert by_key["peak_mib"].verdict == "PASS"
    assert bench.judged(cuda, "train_time_over_flops", "m", 1.09).verdict == "PASS"
    assert bench.judged(cuda, "train_time_over_flops", "m", 1.11).verdict == "FAIL"
    assert bench.judged(cuda, "packed_time_per_flop", "m", 0.96).verdict == "PASS"
    assert bench.judged(cuda, "fwd_bwd_time_over_flops", "m", 1.0).verdict == ""  # a CPU target only
    failed = bench.memory_rows(cuda, dict(memory, dcdit=dict(error="child exited 1: out of memory")))
    assert [r.verdict for r in failed if r.key == "peak_mib"] == ["FAIL", "PASS", "PASS"]


def test_checkpoint_router_and_gates_decide(tmp_path):
    """--ckpt: the elastic and dydit sections run the checkpoint's model with its own router (no fixed M)."""
    cfg = load_config("configs/tiny/test-dcdit.yaml", ["model.router=predictability"])  # TINY_DCDIT's model
    model = trained_tiny_dcdit()  # its predictability router keeps about half of the 64 tokens
    path = tmp_path / "ckpt.pt"
    torch.save({"ema": model.state_dict(), "config": config_to_dict(cfg)}, path)
    run, _ = run_bench(tmp_path / "b.json", "--sections", "elastic", "dydit", "--ckpt", str(path),
                       "--fractions", "0", "0.5")
    res = run["results"]["tiny"]["2"]
    x, t, y = bench.cfg_inputs(model, 2, torch.device("cpu"))
    with torch.no_grad():
        kept = model(x, t, y, return_info=True)[1].kept.double()             # the router's own counts
    for f in (0.0, 0.5):
        expected = (kept - torch.floor(f * kept)).mean().item()
        assert res["elastic"][f"f={f:g}"]["mean_kept"] == pytest.approx(expected)
    assert str(path) in res["elastic"]["routing"] and 64 > kept.mean() > 2
    rows = res["dydit"]["rows"]  # a DC-DiT checkpoint: its weights, the gates at fixed patterns
    assert rows["width"]["flops_ratio"] < 1.0 and "checkpoint gates" not in rows


@pytest.mark.parametrize("argv, message", [
    (["--repeats", "0"], "--batch values and --repeats must be >= 1"),
    (["--fractions", "0.3", "0.6"], "--fractions must lie in [0, 1) and include 0"),
    (["--uncond-fraction", "1"], "--uncond-fraction must lie in [0, 1)"),
    (["--ckpt", "x.pt", "--sections", "train"], "--ckpt is measured by the elastic and dydit sections"),
    (["--ckpt", "x.pt", "--sizes", "S", "B", "--sections", "elastic"], "--ckpt is one model: give one size"),
    (["--sections", "elastic", "--ckpt", "no/such.pt"], "--ckpt no/such.pt: no such file"),
])
def test_bad_command_line_is_one_line_error(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main((["--tiny"] if "--sizes" not in argv else []) + argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}") and len(err.strip().splitlines()) == 1


def test_varied_counts_keep_the_total():
    assert bench.varied_counts(4, 256) == [64, 448, 64, 448]
    assert bench.varied_counts(3, 64) == [16, 112, 64]
    assert bench.varied_counts(1, 10) == [10]


def test_flop_matched_depth_picks_the_closest_affine_depth():
    line = lambda d: 100 + 30 * d  # noqa: E731
    assert bench.flop_matched_depth(250, line) == 5
    assert bench.flop_matched_depth(262, line) == 5
    assert bench.flop_matched_depth(268, line) == 6
    assert bench.flop_matched_depth(265, line) == 5   # equally close: the shallower depth
    assert bench.flop_matched_depth(10, line) == 1    # never below one block


def test_flop_matched_depth_matches_brute_force_on_real_dit_counts():
    public = bench.model_specs("tiny")[1]
    counts = {d: bench.dit_flops_at_depth(public, d) for d in range(1, 9)}
    for target in (counts[3] + 1, (counts[4] + counts[5]) / 2 - 1, counts[7] * 1.01):
        best = min(counts, key=lambda d: (abs(counts[d] - target), d))
        assert bench.flop_matched_depth(target, counts.__getitem__) == best


def test_release_comparison_goes_through_dit_b2():
    cpu_b = SimpleNamespace(size="B", device=torch.device("cpu"))
    rel = bench.release_comparison(cpu_b, 8, time_ratio=1.30, flops_ratio=1.28)
    assert rel["release_time_ratio"] == pytest.approx(6.14 / 4.38)
    assert rel["ours_over_release"] == pytest.approx(1.30 / (6.14 / 4.38))
    assert rel["release_flops_ratio"] == pytest.approx(59.1 / 46.0)
    assert not bench.release_comparison(cpu_b, 4, 1.0, 1.0)["available"]
    assert not bench.release_comparison(SimpleNamespace(size="tiny", device=torch.device("cpu")), 2, 1.0, 1.0)[
        "available"]


def test_compile_errors_point_at_model_lines():
    """An Inductor error names the FX node being lowered (a local of GraphLowering.run_node) and its model code."""
    models = f"{bench.ROOT}/models"
    stack = (f'  File "{models}/dit.py", line 121, in forward\n    x = ...\n'
             f'  File "{models}/attention.py", line 102, in _packed_attention\n    outs = ...\n'
             f'  File "/usr/lib/python3/torch/nn/functional.py", line 10, in conv2d\n')
    node = SimpleNamespace(meta={"stack_trace": stack}, format_node=lambda: "%unsqueeze_6 = aten.unsqueeze(%p, 0)")

    def run_node(n):  # the name and local Inductor's lowering loop has
        raise TypeError("cannot determine truth value of Relational: 64*s15 < 4")

    try:
        try:
            run_node(node)
        except TypeError as inner:
            raise RuntimeError("InductorError: TypeError: cannot determine truth value\nmore") from inner
    except RuntimeError as e:
        err = e
    assert bench.first_line(err) == "InductorError: TypeError: cannot determine truth value"
    assert bench.failing_node_report(err) == [
        "node %unsqueeze_6 = aten.unsqueeze(%p, 0)",
        "model code (innermost first): models/attention.py:102 < models/dit.py:121"]
    assert bench.failing_node_report(ValueError("no lowering involved")) == []


def test_child_peak_memory_is_its_own():
    """A memory child must not report its parent's peak (ru_maxrss survives fork + exec on Linux)."""
    import subprocess
    import sys
    big = torch.ones(100 * 2**20)  # 400 MiB, touched, in this (parent) process
    code = "from tools import bench; print(bench._max_rss())"
    child = int(subprocess.run([sys.executable, "-c", code], cwd=bench.ROOT, capture_output=True, text=True,
                               check=True).stdout.split()[-1])
    assert child < bench._max_rss() - big.numel() * 2


def test_adamw_section_times_foreach_and_fused(tmp_path):
    run, stdout = run_bench(tmp_path / "bench.json", "--sections", "adamw")
    res = run["results"]["tiny"]["2"]["adamw"]
    assert set(res["times"]) == {f"{k} {impl}" for k in ("dcdit", "public") for impl in ("foreach", "fused")}
    assert all(math.isfinite(v) and v > 0 for v in res["fused_over_foreach"].values())
    assert "fused / foreach AdamW" in stdout
    opt = bench.adamw([torch.nn.Parameter(torch.ones(3))], "cpu")
    assert not opt.defaults["fused"]  # what train.py uses on a CPU: PyTorch's default, not the fused kernels
    assert bench.adamw([torch.nn.Parameter(torch.ones(3))], "cpu", fused=True).defaults["fused"]


def test_plugback_section_compares_the_cdist_table_with_the_two_pass_plug_back(tmp_path, monkeypatch):
    calls = []
    real = bench.plug_back_index
    monkeypatch.setattr(bench, "plug_back_index", lambda *a: calls.append(1) or real(*a))
    run, stdout = run_bench(tmp_path / "bench.json", "--sections", "plugback")
    res = run["results"]["tiny"]["2"]["plugback"]
    assert set(res["times"]) == {f"{what} {case}" for what in ("cdist table", "two-pass") for case in ("equal", "varied")}
    assert all(math.isfinite(v) and v > 0 for v in res["cdist_over_two_pass"].values())
    assert len(calls) == 4  # per case: the agreement check and one timed run (1 repeat, no warmup)
    assert "plug-back, cdist table / two-pass (equal counts" in stdout


def test_tf32_section_times_both_settings_and_restores_the_flag(tmp_path, monkeypatch):
    seen = []
    real_step = bench.train_step

    def recording_step(*a, **kw):
        seen.append(torch.backends.cuda.matmul.allow_tf32)
        return real_step(*a, **kw)

    monkeypatch.setattr(bench, "train_step", recording_step)
    before = torch.backends.cuda.matmul.allow_tf32
    run, stdout = run_bench(tmp_path / "bench.json", "--sections", "tf32")
    res = run["results"]["tiny"]["2"]["tf32"]
    assert set(res["tf32_over_fp32"]) == {"dcdit", "public"}
    assert all(math.isfinite(v) and v > 0 for v in res["tf32_over_fp32"].values())
    assert set(res["times"]) == {"dcdit fp32", "dcdit tf32", "public fp32", "public tf32"}
    assert seen.count(True) == seen.count(False) == 2  # each model once per setting (1 repeat, no warmup)
    assert torch.backends.cuda.matmul.allow_tf32 == before
    assert "TF32 / full fp32 matmuls" in stdout


def test_profile_stages_prints_the_op_table_of_the_named_stage(tmp_path):
    run, stdout = run_bench(tmp_path / "bench.json", "--sections", "shares", "--profile-stages", "dechunk")
    profiles = run["results"]["tiny"]["2"]["shares"]["profiles"]
    assert set(profiles) == {"dechunk"}
    assert "Self CPU" in profiles["dechunk"] and "aten::" in profiles["dechunk"]
    assert "profile of stage dechunk" in stdout
