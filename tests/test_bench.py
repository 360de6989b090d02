"""tools/bench.py: one tiny run of every default section, the per-sample kept-count router, the
FLOP-matched depth picker, and the stage decomposition the time shares are measured on."""
import contextlib
import io
import json
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

from models.routing import RouterOutput
from tools import bench
from conftest import json_numbers
from models.routing import keep_exactly as forced_kept




@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "bench.json"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        bench.main(["--tiny", "--repeats", "1", "--warmup", "0", "--batch", "2", "--json", str(path)])
    with open(path) as f:
        return json.load(f), stdout.getvalue()


def test_tiny_run_measures_every_default_section(tiny_run):
    run, stdout = tiny_run
    res = run["results"]["tiny"]["2"]
    assert set(res) == {"train", "sample", "shares", "packed", "memory"}  # compile only with --compile on CPU
    bad = [(p, v) for p, v in json_numbers(run) if not math.isfinite(v)]
    assert not bad, bad

    train = res["train"]
    for key in ("dcdit", "iso", "public"):
        assert train["images_per_s"][key] > 0 and train["gflops"][key] > 0
    for key in ("dcdit_over_iso_images_per_s", "fwd_bwd_time_ratio", "fwd_bwd_flops_ratio", "time_over_flops_ratio"):
        assert train[key] > 0, key
    assert train["release"]["available"] is False  # the release was measured at B on CPU only

    # Tail dropping at f removes floor(f M) of the M = 64 forced tokens from every row.
    for f in bench.TAIL_DROPS:
        s = res["sample"][f"f={f:g}"]
        assert s["mean_kept"] == 64 - math.floor(f * 64)
        assert s["flops_speedup"] >= 1.0 and s["measured_speedup"] > 0 and s["efficiency"] > 0

    shares = res["shares"]
    assert set(shares["shares"]) == set(bench.PIECES) | {"other"}
    assert all(shares["shares"][k] > 0 for k in bench.PIECES)
    assert shares["overhead_share"] == pytest.approx(sum(shares["shares"][k] for k in bench.OVERHEAD))

    packed = res["packed"]
    assert sum(packed["counts"]["equal"]) == sum(packed["counts"]["varied"])
    assert len(set(packed["counts"]["varied"])) == 2
    for layout in ("packed", "padded"):
        assert packed[layout]["time_ratio"] > 0
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
    assert any("time ratio / FLOPs ratio" in m for m in measures)
    assert any("router + chunk + dechunk" in m for m in measures)
    assert any(m.endswith("ours / release time per step") for m in measures)
    assert run["models"]["tiny"]["iso"]["spec"]["depth"] == bench.flop_matched_depth(
        run["models"]["tiny"]["dcdit"]["gflops"] * 1e9,
        lambda d: bench.dit_flops_at_depth(bench.model_specs("tiny")[1], d))


class FixedProbRouter(nn.Module):
    """A router stub returning the given p, whatever the input."""

    def __init__(self, prob):
        super().__init__()
        self.prob = prob

    def forward(self, x, grid):
        mask = self.prob > 0.5
        selected = torch.where(mask, self.prob, 1 - self.prob)
        return RouterOutput(prob=self.prob, mask=mask, natural_mask=mask, selected=selected)


def test_per_sample_router_keeps_exact_counts_top_p_first():
    prob = torch.tensor([[0.9, 0.1, 0.8, 0.2, 0.7, 0.3],
                         [0.1, 0.2, 0.3, 0.4, 0.5, 0.6],
                         [0.5, 0.5, 0.5, 0.5, 0.5, 0.5]])
    r = bench.PerSampleCountRouter(FixedProbRouter(prob), [3, 1, 4])(torch.zeros(3, 6, 2), (2, 3))
    assert r.mask.sum(1).tolist() == [3, 1, 4]
    assert r.mask[0].tolist() == [True, False, True, False, True, False]   # the three highest p
    assert r.mask[1].tolist() == [False] * 5 + [True]
    assert r.mask[2].tolist() == [True] * 4 + [False] * 2                  # ties: lower raster index first
    assert torch.equal(r.natural_mask, r.mask)
    assert torch.equal(r.selected, torch.where(r.mask, prob, 1 - prob))


@pytest.mark.parametrize("counts", [[3, 1], [0, 1, 1], [7, 1, 1]])
def test_per_sample_router_rejects_bad_counts(counts):
    router = bench.PerSampleCountRouter(FixedProbRouter(torch.full((3, 6), 0.5)), counts)
    with pytest.raises(ValueError, match="counts must be 3 kept counts"):
        router(torch.zeros(3, 6, 2), (2, 3))


def tiny_dcdit():
    torch.manual_seed(0)
    return bench.build(bench.model_specs("tiny")[0], "cpu").eval()


def test_forced_counts_reach_the_inner_blocks_and_restore_the_model():
    dc = tiny_dcdit()
    router, packed = dc.router, dc.packed
    x, t, y = torch.randn(3, 4, 16, 16), torch.tensor([1, 500, 999]), torch.tensor([0, 1, 2])
    for layout in (True, False):
        with bench.forced_counts(dc, [16, 112, 64], packed=layout):
            assert dc.packed is layout
            _, info = dc(x, t, y, return_info=True)
        assert info.kept.tolist() == [16, 112, 64]
    assert dc.router is router and dc.packed == packed


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


@pytest.mark.parametrize("packed", [True, False])
def test_stages_compose_to_the_model_forward(packed):
    """The shares section times these stages, so together they must be exactly DCDiT.forward."""
    dc = tiny_dcdit()
    dc.packed = packed
    x, t, y = torch.randn(4, 4, 16, 16), torch.tensor([0, 10, 500, 999]), torch.tensor([0, 3, 5, 9])
    with torch.no_grad(), bench.forced_counts(dc, [16, 112, 64, 64], packed):
        stages = bench.run_stages(dc, x, t, y)
        assert torch.equal(stages["out"], dc(x, t, y))
    with torch.no_grad(), forced_kept(dc, 64):
        assert torch.equal(bench.run_stages(dc, x, t, y)["out"], dc(x, t, y))


def test_release_comparison_goes_through_dit_b2():
    cpu_b = SimpleNamespace(size="B", device=torch.device("cpu"))
    rel = bench.release_comparison(cpu_b, 8, time_ratio=1.30, flops_ratio=1.28)
    assert rel["release_time_ratio"] == pytest.approx(6.14 / 4.38)
    assert rel["ours_over_release"] == pytest.approx(1.30 / (6.14 / 4.38))
    assert rel["release_flops_ratio"] == pytest.approx(59.1 / 46.0)
    assert not bench.release_comparison(cpu_b, 4, 1.0, 1.0)["available"]
    assert not bench.release_comparison(SimpleNamespace(size="tiny", device=torch.device("cpu")), 2, 1.0, 1.0)[
        "available"]


def test_bad_command_line_is_one_line_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--tiny", "--repeats", "0"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.startswith("error: --batch values and --repeats must be >= 1")


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
