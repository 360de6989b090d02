"""FID vs TFLOPs/img across inference budgets (the README's elastic-inference trade-off, paper §4).

    python tools/plot_pareto.py --runs f0.json f3.json f6.json \\
        --metrics f0_metrics.json f3_metrics.json f6_metrics.json --out pareto.png

Each run is a sample_ddp.py JSON (TFLOPs/img measured from the tokens really kept, tail-drop budgets);
its metrics file, matched by position, is evaluations/evaluate.py's --out JSON (FID under the key
"fid", or under "metrics" -> "FID"). A run whose metrics file is missing, unreadable or has no FID is
left out of the plot with a message naming it (pass "-" to skip one on purpose). Points of the same
model and guidance settings are joined in order of cost and labelled with their tail-drop fraction;
the dashed line is the Pareto frontier over all points (no other point is both cheaper and better).
"""
import argparse
import json
import os
import sys
from typing import Optional, Sequence

from config import main_guard
from visualize import PlotError, label_fractions, pyplot, read_run, write_figure


def read_fid(path: str) -> tuple:
    """-> (fid or None, reason when None). Accepts {"fid": x} and evaluate.py's {"metrics": {"FID": x}}."""
    if path in ("", "-"):
        return None, "no metrics file given"
    if not os.path.isfile(path):
        return None, f"metrics file {path} not found"
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        return None, f"metrics file {path} is not JSON ({type(e).__name__})"
    for table in (data, data.get("metrics") if isinstance(data, dict) else None):
        if isinstance(table, dict):
            for key, value in table.items():
                if key.lower() == "fid" and isinstance(value, (int, float)):
                    return float(value), ""
    return None, f"metrics file {path} has no numeric 'fid'"


def pareto_front(points: Sequence[tuple]) -> list:
    """The (tflops, fid) points no other point beats on both axes (lower is better), sorted by cost."""
    front, best = [], float("inf")
    for x, y in sorted(points):
        if y < best:
            front.append((x, y))
            best = y
    return front


def _series_key(run: dict) -> str:
    key = f"{run.get('model', '?')} cfg={run.get('cfg_scale', '?')}"
    if run.get("lite_cfg"):
        key += f" Lite-CFG uncond f={run.get('uncond_tail_dropping_fraction')}"
    return key


def plot_pareto(runs: Sequence[str], metrics: Optional[Sequence[str]], out: str) -> dict:
    """Write the figure; returns {"points": [...], "skipped": [(run, reason)], "front": [...]}."""
    metrics = list(metrics or [])
    if len(metrics) > len(runs):
        raise PlotError(f"--metrics: {len(metrics)} files for {len(runs)} runs; expected at most one per run "
                        f"(matched by position, '-' for none)")
    metrics += ["-"] * (len(runs) - len(metrics))
    points, skipped = [], []
    for run_path, metrics_path in zip(runs, metrics):
        run = read_run(run_path)
        tflops = run.get("tflops_per_img")
        if not isinstance(tflops, (int, float)):
            skipped.append((run_path, "no measured 'tflops_per_img' in the run JSON"))
            continue
        fid, reason = read_fid(metrics_path)
        if fid is None:
            skipped.append((run_path, reason))
            continue
        points.append({"run": run_path, "tflops": float(tflops), "fid": fid, "series": _series_key(run),
                       "f": run.get("tail_dropping_fraction")})
    for run_path, reason in skipped:
        print(f"skipping {run_path}: {reason}", file=sys.stderr)
    if not points:
        raise PlotError("no run has both TFLOPs/img and an FID; evaluate the samples with "
                        "`python evaluations/evaluate.py REF.npz RUN.npz --out RUN_metrics.json` and pass --metrics")

    fig, ax = pyplot().subplots(figsize=(6.5, 4.5), layout="constrained")
    for k, name in enumerate(dict.fromkeys(p["series"] for p in points)):
        pts = sorted((p for p in points if p["series"] == name), key=lambda p: p["tflops"])
        xs, ys = [p["tflops"] for p in pts], [p["fid"] for p in pts]
        ax.plot(xs, ys, "o-", color=f"C{k}", label=name)
        label_fractions(ax, xs, ys, [p["f"] for p in pts])
    front = pareto_front([(p["tflops"], p["fid"]) for p in points])
    if len(front) > 1:
        ax.plot(*zip(*front), "k--", lw=1, alpha=0.6, label="Pareto frontier")
    ax.set_xlabel("TFLOPs / image (measured kept tokens)")
    ax.set_ylabel("FID (lower is better)")
    ax.set_title("FID vs compute across inference budgets", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    write_figure(fig, out, dpi=100)
    return {"points": points, "skipped": skipped, "front": front}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", nargs="+", required=True, metavar="RUN.json", help="sample_ddp.py JSONs")
    parser.add_argument("--metrics", nargs="*", default=None, metavar="METRICS.json",
                        help="evaluate.py JSON per run, by position ('-' for none)")
    parser.add_argument("--out", default="pareto.png", help="output PNG")
    args = parser.parse_args(argv)
    result = plot_pareto(args.runs, args.metrics, args.out)
    for p in sorted(result["points"], key=lambda p: p["tflops"]):
        print(f"{p['run']}: {p['tflops']:.4g} TFLOPs/img, FID {p['fid']:.3f} ({p['series']}, f={p['f']})")
    print(f"wrote {args.out} ({len(result['points'])} points, {len(result['skipped'])} skipped)")


if __name__ == "__main__":
    main_guard(main)()
