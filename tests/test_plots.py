"""tools/plot_compression.py, tools/plot_pareto.py, tools/tail_drop_grid.py write PNGs from small inputs."""
import json

import numpy as np
import pytest
from PIL import Image

from config import main_guard
from test_sample import make_checkpoint
from tools import plot_compression, plot_pareto, tail_drop_grid

L = 64


def synthetic_run(path, f=0.0, tflops=1.0, lite=False, raw=True, timing=True, n=3):
    """A sample_ddp.py-shaped JSON: 5 steps from t=999 to 0, cond rows keeping more tokens as t falls."""
    t = [999, 749, 500, 250, 0]
    cond = np.array([[10 + 4 * s + i for i in range(n)] for s in range(5)])          # (steps, n)
    uncond = cond // 3 if lite else cond + 1                                           # (steps, n)
    kept = np.concatenate([cond, uncond], axis=1)                                      # (steps, 2n)
    run = {"model": "DCDiT-S", "token_count": L, "timesteps": t, "cfg_scale": 1.5, "tail_dropping_fraction": f,
           "lite_cfg": lite, "uncond_tail_dropping_fraction": 0.9 if lite else None, "tflops_per_img": tflops}
    if raw:
        run["kept_tokens"] = kept.tolist()
        run["kept_tokens_rows"] = {"cond": n, "uncond": n}
    run["kept_stats"] = [{"t": t[s], "cond": {"mean": float(cond[s].mean()), "std": float(cond[s].std()),
                                              "min": int(cond[s].min()), "max": int(cond[s].max())},
                          "uncond": {"mean": float(uncond[s].mean()), "std": float(uncond[s].std()),
                                     "min": int(uncond[s].min()), "max": int(uncond[s].max())}} for s in range(5)]
    if timing:
        run["images_per_second"] = [100.0 - 10 * s for s in range(5)]
    path.write_text(json.dumps(run))
    return str(path), cond


def is_png(path):
    with Image.open(path) as im:
        return im.format == "PNG" and im.size[0] > 100 and im.size[1] > 100


def test_compression_plot_from_raw_counts_and_from_summaries(tmp_path, capsys):
    raw, cond = synthetic_run(tmp_path / "raw.json", lite=True)
    summary, _ = synthetic_run(tmp_path / "summary.json", raw=False, timing=False)
    out = tmp_path / "fig.png"
    plot_compression.main([raw, summary, "--labels", "raw", "summary", "--out", str(out)])
    assert is_png(out) and "wrote" in capsys.readouterr().out
    series = plot_compression.plot_compression([raw, summary], str(tmp_path / "fig2.png"), ["raw", "summary"])
    assert np.allclose(series["raw"]["cond"]["mean"], (L / cond).mean(1))           # per-row ratios, averaged
    assert np.allclose(series["raw"]["cond"]["max"], L / cond.min(1))
    assert np.allclose(series["summary"]["cond"]["mean"], L / cond.mean(1))         # from the step means
    assert "uncond" in series["raw"]
    # More tokens as t falls: compression decreases along the sampling order.
    assert (np.diff(series["raw"]["cond"]["mean"]) < 0).all()


def test_compression_plot_rejects_a_run_without_kept_tokens(tmp_path, capsys):
    path = tmp_path / "dit.json"
    path.write_text(json.dumps({"model": "DiT-S/2", "token_count": 16, "timesteps": [999, 0], "tflops_per_img": 1.0}))
    with pytest.raises(SystemExit) as e:
        main_guard(plot_compression.main)([str(path), "--out", str(tmp_path / "x.png")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no kept-token statistics" in err[0]


def test_pareto_plot_with_missing_metrics(tmp_path, capsys):
    runs = [synthetic_run(tmp_path / f"f{k}.json", f=f, tflops=t)[0]
            for k, (f, t) in enumerate([(0.0, 3.0), (0.3, 2.0), (0.6, 1.0), (0.9, 0.5)])]
    (tmp_path / "m0.json").write_text(json.dumps({"fid": 10.0}))
    (tmp_path / "m1.json").write_text(json.dumps({"metrics": {"FID": 12.0, "sFID": 5.0}}))   # evaluate.py --out
    (tmp_path / "m2.json").write_text(json.dumps({"metrics": {"FID": 9.0}}))                  # cheaper and better
    out = tmp_path / "pareto.png"
    metrics = [str(tmp_path / "m0.json"), str(tmp_path / "m1.json"), str(tmp_path / "m2.json"),
               str(tmp_path / "absent.json")]
    plot_pareto.main(["--runs", *runs, "--metrics", *metrics, "--out", str(out)])
    assert is_png(out)
    captured = capsys.readouterr()
    assert "skipping" in captured.err and "absent.json not found" in captured.err
    result = plot_pareto.plot_pareto(runs, metrics[:2], str(tmp_path / "p2.png"))
    assert [p["fid"] for p in result["points"]] == [10.0, 12.0] and len(result["skipped"]) == 2
    assert plot_pareto.pareto_front([(3.0, 10.0), (2.0, 12.0), (1.0, 9.0)]) == [(1.0, 9.0)]


def test_pareto_plot_without_any_fid_is_an_error(tmp_path, capsys):
    run, _ = synthetic_run(tmp_path / "a.json")
    with pytest.raises(SystemExit) as e:
        main_guard(plot_pareto.main)(["--runs", run, "--out", str(tmp_path / "x.png")])
    assert e.value.code == 2 and "no run has both TFLOPs/img and an FID" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_tail_drop_grid(tmp_path, capsys):
    ckpt = make_checkpoint(tmp_path / "dcdit.pt")
    out = tmp_path / "grid.png"
    tail_drop_grid.main(["--ckpt", ckpt, "--fractions", "0", "0.5", "--num-sampling-steps", "2",
                         "--class-labels", "1", "2", "--device", "cpu", "--out", str(out)])
    assert is_png(out)
    lines = [line for line in capsys.readouterr().out.splitlines() if "TFLOPs/img" in line]
    tflops = [float(line.split(": ")[1].split(" ")[0]) for line in lines]
    assert len(tflops) == 2 and tflops[1] < tflops[0]                               # f = 0.5 costs less
    with pytest.raises(SystemExit) as e:
        main_guard(tail_drop_grid.main)(["--ckpt", ckpt, "--fractions", "1.0", "--out", str(out)])
    assert e.value.code == 2 and "--fractions [1.0]" in capsys.readouterr().err


def test_chunking_figure_row_labels_do_not_overlap(tmp_path, monkeypatch):
    """The two-stage figure's third row has the longest label; each row's label must fit beside its own panel."""
    import visualize
    figures = []
    monkeypatch.setattr(visualize, "write_figure", lambda fig, path, dpi=100: figures.append(fig))
    s, cols, n = 16, 5, 4  # the report's two-stage figure: 4 samples, 5 timesteps, 16 x 16 tokens
    panels = {"timesteps": [999, 750, 500, 250, 0], "kept_share": [[0.5] * n] * cols,
              "x0": np.zeros((cols, n, 64, 64, 3), np.uint8), "p": np.full((cols, n, s, s), 0.5),
              "kept": np.full((cols, n, s, s), 0.5)}
    rows = ("x0", "p", "kept")
    visualize._draw_chunking(panels, range(n), rows, str(tmp_path / "maps.png"))
    fig = figures[0]
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    left = fig.axes[:n * len(rows) * cols:cols]  # the first column's panels, top to bottom (then the colorbar)
    assert all(ax.get_ylabel() for ax in left)
    for ax in left:  # a label taller than its panel runs into the labels of the rows above and below
        label, panel = ax.yaxis.label.get_window_extent(renderer), ax.get_window_extent(renderer)
        assert panel.y0 - 1 <= label.y0 and label.y1 <= panel.y1 + 1, (ax.get_ylabel(), label, panel)
