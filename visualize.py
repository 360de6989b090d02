"""Figures: the chunking visualisation (paper §4, Fig. 3/4), the sampling summary, and what every figure
script shares.

sample.py, tools/reproduce.py, tools/plot_compression.py, tools/plot_pareto.py and tools/tail_drop_grid.py
draw through `pyplot()` and `write_figure()`, so every figure is rendered without a display and its folder
is created the same way; the two plot tools read sample_ddp.py's JSON through `read_run`.
"""
import json
import os
import textwrap
from typing import Sequence

import numpy as np

from data import to_uint8_images
from sampling import to_pixels


class PlotError(ValueError):
    """A bad input file or flag (printed as one line by config.main_guard)."""
    user_error = True


def pyplot():
    """matplotlib.pyplot on the Agg backend: figures go to files, often on machines without a display."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def write_figure(fig, path: str, dpi: int = 100) -> None:
    """Save `fig` to `path` (its folder created) and free it: figure scripts make many in one process."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)


def label_fractions(ax, xs: Sequence[float], ys: Sequence[float], fractions: Sequence) -> None:
    """Write "f=..." beside each point: which tail-drop budget produced it (None: no label)."""
    for x, y, f in zip(xs, ys, fractions):
        if f is not None:
            ax.annotate(f"f={f:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)


def read_run(path: str) -> dict:
    """A sample_ddp.py JSON as a dict (errors name the file)."""
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise PlotError(f"{path}: cannot read it as JSON ({type(e).__name__}: {e})") from None
    if not isinstance(data, dict):
        raise PlotError(f"{path}: expected a sample_ddp.py JSON object, got {type(data).__name__}")
    return data


# Rows chunking_viz can draw per sample, in the order asked: what each shows.
VIZ_ROWS = {"xt": "noisy input x_t", "x0": "predicted x0", "p": "boundary probability p",
            "kept": "kept tokens (grey: stage 0, white: inner stage)"}
DEFAULT_VIZ_ROWS = ("x0", "p")


def parse_viz_rows(text: str) -> tuple:
    """'xt,x0,p' -> ("xt", "x0", "p"): distinct names of VIZ_ROWS, in the order given."""
    names = tuple(r.strip() for r in text.split(","))
    if not all(names) or len(set(names)) != len(names) or not set(names) <= set(VIZ_ROWS):
        raise PlotError(f"--viz-rows {text!r}: expected distinct row names from {', '.join(VIZ_ROWS)}, "
                        f"comma-separated (e.g. xt,x0,p)")
    return names


def chunking_panels(steps: list, records: list, cfg, num_samples: int = 4, num_cols: int = 5,
                    rows: Sequence[str] = DEFAULT_VIZ_ROWS, vae=None, device="cpu") -> dict:
    """The pictures chunking_viz draws, at `num_cols` steps spread from noisy to clean.

    steps: generate(..., progressive=True)'s per-step dicts; records: the Sampler's, one per step (with
    keep_maps=True for the "p" row). Returns {"steps": the step index of each column, "timesteps",
    "kept_share": (cols, n) M / L, and per row asked "xt" / "x0": (cols, n, H, W, 3) uint8 images (x_t, the
    model's input at that step, and the predicted x0, decoded when latent), "p": (cols, n, h, w) boundary
    probabilities}, n = min(num_samples, images).
    """
    bad = [r for r in rows if r not in VIZ_ROWS]
    if bad or not rows:
        raise ValueError(f"chunking_panels: rows {list(rows)}: expected names from {list(VIZ_ROWS)}")
    need = ["kept"] + (["prob"] if "p" in rows else []) + (["mask"] if "kept" in rows else [])
    if len(records) != len(steps) or not records or any(k not in records[0] for k in need):
        raise ValueError(f"chunking_viz: expected one DC-DiT record with boundary maps per step, got "
                         f"{len(records)} records for {len(steps)} steps (a fresh Sampler with keep_maps=True)")
    if "xt" in rows and "x_t" not in steps[0]:
        raise ValueError("chunking_viz: the xt row needs the steps' x_t (generate(..., progressive=True))")
    s = cfg.model.input_size
    n = min(num_samples, steps[0]["pred_xstart"].shape[0])
    cols = np.unique(np.linspace(0, len(steps) - 1, num_cols).round().astype(int))
    out = {"steps": cols.tolist(), "timesteps": [records[k]["t"] for k in cols],
           "kept_share": [(records[k]["kept"][:n].float() / (s * s)).tolist() for k in cols]}
    for row, key in (("xt", "x_t"), ("x0", "pred_xstart")):
        if row in rows:
            out[row] = np.stack([to_uint8_images(to_pixels(steps[k][key][:n], cfg, vae, device))
                                 for k in cols])                                               # (cols, n, H, W, 3)
    if "p" in rows:
        out["p"] = np.stack([records[k]["prob"][:n].view(n, s, s).numpy() for k in cols])     # (cols, n, s, s)
    if "kept" in rows:  # 0.5 where stage 0 keeps a token, 1 where a two-stage model's inner stage keeps it too
        out["kept"] = np.stack([(0.5 * records[k]["mask"][:n].float() + 0.5 * records[k]["mask1"][:n].float()
                                 if "mask1" in records[k] else records[k]["mask"][:n].float()).view(n, s, s).numpy()
                                for k in cols])                                                # (cols, n, s, s)
    return out


def _draw_chunking(panels: dict, samples: Sequence[int], rows: Sequence[str], path: str) -> None:
    """One figure: for each sample in `samples`, a row per entry of `rows`; columns are panels' timesteps."""
    plt = pyplot()
    ncols, nrows = len(panels["timesteps"]), len(samples) * len(rows)
    fig, axes = plt.subplots(nrows, ncols, figsize=(2.0 * ncols + 1.2, 2.1 * nrows), squeeze=False,
                             layout="constrained")
    im = None
    for j, t in enumerate(panels["timesteps"]):
        for a, i in enumerate(samples):
            for r, row in enumerate(rows):
                ax = axes[a * len(rows) + r, j]
                if row == "p":
                    im = ax.imshow(panels["p"][j, i], vmin=0, vmax=1, cmap="magma")
                elif row == "kept":
                    ax.imshow(panels["kept"][j, i], vmin=0, vmax=1, cmap="gray")
                else:
                    ax.imshow(panels[row][j, i])
                ax.set_xticks([])
                ax.set_yticks([])
                if j == 0:  # wrapped to the panel's height, so the labels of neighbouring rows never overlap
                    ax.set_ylabel(textwrap.fill(VIZ_ROWS[row], 24) + (f"\nsample {i}" if r == 0 else ""), fontsize=8)
                if a == 0 and r == 0:
                    ax.set_title(f"t = {t}", fontsize=9)
                if r == len(rows) - 1:
                    ax.set_xlabel(f"kept {100 * panels['kept_share'][j][i]:.1f}%", fontsize=8)
    if im is not None:
        fig.colorbar(im, ax=axes, fraction=0.03, label="boundary probability p")
    fig.suptitle("DC-DiT chunking: " + ", ".join(VIZ_ROWS[r] for r in rows) + " (top to bottom)", fontsize=10)
    write_figure(fig, path, dpi=80)


def chunking_viz(steps: list, records: list, cfg, path: str, num_samples: int = 4, num_cols: int = 5,
                 vae=None, device="cpu", rows: Sequence[str] = DEFAULT_VIZ_ROWS, per_sample: bool = False) -> dict:
    """Figure of `rows` (VIZ_ROWS: x_t, predicted x0, boundary probability) at `num_cols` timesteps, noisy ->
    clean, with the share of kept tokens under each column (paper §4, Fig. 3/4).

    per_sample: one file per sample, `path` with _{i} before its extension, instead of one figure.
    Returns chunking_panels' "timesteps" and "kept_share" (per column, per sample) for logging and tests,
    "panels" (everything drawn) and "paths" (the files written).
    """
    panels = chunking_panels(steps, records, cfg, num_samples, num_cols, rows, vae, device)
    n = len(panels["kept_share"][0])
    if per_sample:
        stem, ext = os.path.splitext(path)
        paths = [f"{stem}_{i}{ext}" for i in range(n)]
        for i, p in enumerate(paths):
            _draw_chunking(panels, [i], rows, p)
    else:
        paths = [path]
        _draw_chunking(panels, range(n), rows, path)
    return {"timesteps": panels["timesteps"], "kept_share": panels["kept_share"], "panels": panels, "paths": paths}


BRANCH_COLORS = {"cond": "tab:blue", "uncond": "tab:orange"}


def summary_figure(summary: dict, path: str) -> None:
    """chunking_summary.png from sampling.sampling_summary of a DC-DiT run, each CFG branch in its own colour.

    Per timestep (noisy on the left): kept share M / L and mean boundary probability (line: mean over
    images, band: their min to max), wall time of the step's model call, TFLOPs per image; then TFLOPs/img
    by component, one stacked bar per branch, and the per-branch numbers as text.
    """
    if "tokens" not in summary:
        raise ValueError("summary_figure: expected a DC-DiT summary (kept shares per step); a DiT has no router")
    plt = pyplot()
    branches, t = summary["branches"], summary["timesteps"]
    fig, axes = plt.subplots(2, 3, figsize=(15, 8), layout="constrained")
    marker = "o" if len(t) <= 30 else None  # a handful of steps reads better as points
    for ax, key, label in ((axes[0, 0], "kept_share", "kept share M / L"),
                           (axes[0, 1], "boundary_prob", "mean boundary probability p")):
        for name, b in branches.items():
            spread = b["per_step"][key]
            ax.plot(t, spread["mean"], marker=marker, color=BRANCH_COLORS[name],
                    label=f"{name} (tail drop {b['tail_dropping_fraction']:g})")
            ax.fill_between(t, spread["min"], spread["max"], color=BRANCH_COLORS[name], alpha=0.2, linewidth=0)
        ax.set_ylim(0, 1)
        ax.set_ylabel(label)
        ax.legend(fontsize=8, title="mean; band: min-max over images", title_fontsize=7)
    axes[0, 2].plot(t, summary["seconds_per_step"], marker=marker, color="k")
    axes[0, 2].set_ylabel(f"seconds per step ({summary['images']} images, all branches)")
    for name, b in branches.items():
        axes[1, 0].plot(t, b["per_step"]["tflops_per_img"], marker=marker, color=BRANCH_COLORS[name], label=name)
    axes[1, 0].set_ylabel("TFLOPs per image at the step")
    axes[1, 0].legend(fontsize=8)
    for ax in (axes[0, 0], axes[0, 1], axes[0, 2], axes[1, 0]):
        ax.set_xlim(max(t) + 0.5, min(t) - 0.5)  # noisy -> clean, left to right (as chunking_viz)
        ax.set_xlabel("timestep t")
        ax.grid(alpha=0.3)

    ax = axes[1, 1]
    names = [k for k, v in summary["tflops_per_img_by_component"].items() if v > 0]
    colors = plt.get_cmap("tab20")(np.linspace(0, 1, max(len(names), 1)))
    bottoms = np.zeros(len(branches))
    for k, color in zip(names, colors):
        values = np.array([b["tflops_per_img_by_component"][k] for b in branches.values()])
        ax.bar(list(branches), values, bottom=bottoms, color=color, label=k)
        bottoms += values
    ax.set_ylabel("TFLOPs / image")
    ax.set_title("by component", fontsize=9)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))

    ax = axes[1, 2]
    ax.set_axis_off()
    lines = [f"{summary['model']}: {summary['images']} images x {summary['steps']} steps", ""]
    for name, b in branches.items():
        c = b["compression"]
        lines += [f"{name}: tail drop {b['tail_dropping_fraction']:g}",
                  f"  kept {b['kept_share']:.1%}, mean p {b['boundary_prob']:.3f}",
                  f"  L/M {c['geomean']:.2f} (geomean), {c['min']:.2f}-{c['max']:.2f}",
                  f"  {b['tflops_per_img']:.4g} TFLOPs/img"]
    lines += ["", f"total {summary['tflops_per_img']:.4g} TFLOPs/img",
              f"{summary['mean_seconds_per_step']:.4g} s per step (after the first)"]
    ax.text(0.0, 1.0, "\n".join(lines), va="top", family="monospace", fontsize=9, transform=ax.transAxes)
    fig.suptitle(f"DC-DiT sampling summary: {summary['budgets']}", fontsize=10)
    write_figure(fig, path, dpi=80)
