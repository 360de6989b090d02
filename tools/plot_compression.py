"""Compression ratio and throughput vs diffusion timestep from sample_ddp.py JSONs (paper §4, Fig. 4).

    python tools/plot_compression.py samples/dcdit-xl.json --out compression.png
    python tools/plot_compression.py a.json b.json --labels "f=0" "f=0.3" --out compression.png

Top panel: compression ratio L / M of the conditional rows at every sampling step, the mean over images
with a band of +-1 std and thin min / max lines; under Lite-CFG the unconditional rows are drawn dashed
(under plain CFG they share the conditional budget and are left out). Bottom panel, when the JSON has
per-step timing: images per second at each step. The x axis runs from the noisiest timestep (left) to
the cleanest (right), the order of sampling, so the paper's claim reads left to right: fewer tokens
(higher compression, faster steps) early, more tokens late.
"""
import argparse
import os
from typing import Optional, Sequence

import numpy as np

from config import main_guard
from visualize import PlotError, pyplot, read_run, write_figure


def compression_series(run: dict, path: str) -> dict:
    """Per step (S,): timestep t and, for cond (and uncond) rows, compression L / M: mean, std, min, max.

    From the raw per-row counts `kept_tokens` (S, rows) when present (ratio per row, then statistics),
    else from the per-step summaries `kept_stats` (ratio of the mean count; min/max from max/min M)."""
    L = run.get("token_count")
    steps = run.get("timesteps")
    if not isinstance(L, int) or L < 1 or not isinstance(steps, list) or not steps:
        raise PlotError(f"{path}: expected 'token_count' (int) and 'timesteps' (list) from sample_ddp.py")
    out = {"t": np.asarray(steps, dtype=np.int64)}
    raw = run.get("kept_tokens")
    rows = run.get("kept_tokens_rows") or {}
    if isinstance(raw, list) and raw:
        kept = np.asarray(raw, dtype=np.float64)                                   # (S, rows)
        if kept.ndim != 2 or kept.shape[0] != len(steps) or (kept < 1).any():
            raise PlotError(f"{path}: 'kept_tokens' must be (steps={len(steps)}, rows) counts >= 1, "
                            f"got shape {kept.shape}")
        n_cond = int(rows.get("cond", kept.shape[1]))
        groups = {"cond": kept[:, :n_cond]}
        if rows.get("uncond"):
            groups["uncond"] = kept[:, n_cond:]
        for name, m in groups.items():
            ratio = L / m                                                          # (S, n)
            out[name] = {"mean": ratio.mean(1), "std": ratio.std(1), "min": ratio.min(1), "max": ratio.max(1)}
        return out
    stats = run.get("kept_stats")
    if not isinstance(stats, list) or len(stats) != len(steps):
        raise PlotError(f"{path}: no kept-token statistics ('kept_tokens' or 'kept_stats'); a DiT run has a "
                        f"fixed token count, and a resumed run that drew no image measured nothing")
    for name in ("cond", "uncond"):
        if name not in stats[0]:
            continue
        mean = np.array([s[name]["mean"] for s in stats])
        std = np.array([s[name]["std"] for s in stats])
        lo = np.array([s[name]["min"] for s in stats], dtype=np.float64)
        hi = np.array([s[name]["max"] for s in stats], dtype=np.float64)
        # Spread of L / M from the spread of M, to first order: std(L / M) ~ L std(M) / mean(M)^2.
        out[name] = {"mean": L / mean, "std": L * std / mean ** 2, "min": L / hi, "max": L / lo}
    return out


def plot_compression(paths: Sequence[str], out: str, labels: Optional[Sequence[str]] = None) -> dict:
    """Write the figure; returns {label: series} (the numbers drawn) for tests and logs."""
    if labels is not None and len(labels) != len(paths):
        raise PlotError(f"--labels: {len(labels)} labels for {len(paths)} runs; expected one per run")
    runs = [read_run(p) for p in paths]
    series = {}
    for i, (path, run) in enumerate(zip(paths, runs)):
        label = labels[i] if labels else _default_label(run, path)
        if label in series:  # two runs with equal settings: tell them apart by file
            label = f"{label} ({os.path.basename(path)})"
        series[label] = (compression_series(run, path), run)
    has_speed = any(isinstance(run.get("images_per_second"), list) for _, run in series.values())
    fig, axes = pyplot().subplots(2 if has_speed else 1, 1, figsize=(7, 6.5 if has_speed else 4), sharex=True,
                             squeeze=False, layout="constrained")
    ax = axes[0, 0]
    for k, (label, (s, run)) in enumerate(series.items()):
        color = f"C{k}"
        for name, style in (("cond", "-"), ("uncond", "--")):
            # Plain CFG gives the unconditional rows the same budget; only Lite-CFG's are worth a line.
            if name not in s or (name == "uncond" and not run.get("lite_cfg")):
                continue
            c = s[name]
            tag = label if name == "cond" else f"{label} (uncond rows)"
            ax.plot(s["t"], c["mean"], style, color=color, label=tag)
            if name == "cond":
                ax.fill_between(s["t"], c["mean"] - c["std"], c["mean"] + c["std"], color=color, alpha=0.2)
                ax.plot(s["t"], c["min"], ":", color=color, lw=0.8)
                ax.plot(s["t"], c["max"], ":", color=color, lw=0.8)
    ax.set_ylabel("compression ratio L / M")
    ax.set_title("Compression per sampling step (mean, band +-1 std, dotted min / max)", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    if has_speed:
        ax2 = axes[1, 0]
        for k, (label, (s, run)) in enumerate(series.items()):
            speed = run.get("images_per_second")
            if isinstance(speed, list) and len(speed) == len(s["t"]):
                ax2.plot(s["t"], speed, color=f"C{k}", label=label)
        ax2.set_ylabel("throughput (images / s)")
        ax2.set_title("Throughput of one sampling step (all processes)", fontsize=10)
        ax2.grid(alpha=0.3)
    bottom = axes[-1, 0]
    bottom.set_xlabel("diffusion timestep t (noisy -> clean)")
    bottom.invert_xaxis()  # shared x: sampling order, t = T-1 first
    write_figure(fig, out, dpi=100)
    return {label: s for label, (s, _) in series.items()}


def _default_label(run: dict, path: str) -> str:
    label = f"{run.get('model', os.path.basename(path))} f={run.get('tail_dropping_fraction', '?')}"
    if run.get("lite_cfg"):
        label += f" uncond f={run.get('uncond_tail_dropping_fraction')}"
    return label


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", metavar="RUN.json", help="sample_ddp.py JSON(s) of DC-DiT runs")
    parser.add_argument("--out", default="compression.png", help="output PNG")
    parser.add_argument("--labels", nargs="+", default=None, help="legend label per run")
    args = parser.parse_args(argv)
    series = plot_compression(args.runs, args.out, args.labels)
    for label, s in series.items():
        c = s["cond"]
        print(f"{label}: compression {c['mean'][0]:.2f} at t={s['t'][0]} -> {c['mean'][-1]:.2f} at t={s['t'][-1]}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main_guard(main)()
