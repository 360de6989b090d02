"""Figures: the chunking visualisation (paper §4, Fig. 3/4) and what every figure script shares.

sample.py, tools/reproduce.py, tools/plot_compression.py, tools/plot_pareto.py and tools/tail_drop_grid.py
draw through `pyplot()` and `write_figure()`, so every figure is rendered without a display and its folder
is created the same way; the two plot tools read sample_ddp.py's JSON through `read_run`.
"""
import json
import os
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


def chunking_viz(steps: list, records: list, cfg, path: str, num_samples: int = 4, num_cols: int = 5,
                 vae=None, device="cpu") -> dict:
    """Figure of predicted x0 and boundary-probability maps at `num_cols` timesteps, noisy -> clean.

    steps: generate(..., progressive=True)'s per-step dicts; records: the Sampler's, one per step (made
    with keep_maps=True). Returns the kept-token shares shown (per column, per sample) for logging and tests.
    """
    if len(records) != len(steps) or not records or "prob" not in records[0]:
        raise ValueError(f"chunking_viz: expected one DC-DiT record with boundary maps per step, got "
                         f"{len(records)} records for {len(steps)} steps (a fresh Sampler with keep_maps=True)")
    plt = pyplot()
    s = cfg.model.input_size
    n = min(num_samples, steps[0]["pred_xstart"].shape[0])
    cols = np.unique(np.linspace(0, len(steps) - 1, num_cols).round().astype(int))
    fig, axes = plt.subplots(2 * n, len(cols), figsize=(2.0 * len(cols) + 1.0, 2.1 * 2 * n), squeeze=False,
                             layout="constrained")
    shares = []
    for j, k in enumerate(cols):
        imgs = to_uint8_images(to_pixels(steps[k]["pred_xstart"][:n], cfg, vae, device))   # (n, H, W, 3)
        rec = records[k]
        prob = rec["prob"][:n].view(n, s, s).numpy()                                         # (n, H, W)
        share = (rec["kept"][:n].float() / (s * s)).numpy()                                  # (n,)
        shares.append(share.tolist())
        for i in range(n):
            ax = axes[2 * i, j]
            ax.imshow(imgs[i])
            ax.set_axis_off()
            if i == 0:
                ax.set_title(f"t = {rec['t']}", fontsize=9)
            ax = axes[2 * i + 1, j]
            im = ax.imshow(prob[i], vmin=0, vmax=1, cmap="magma")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_xlabel(f"kept {100 * share[i]:.1f}%", fontsize=8)
    fig.colorbar(im, ax=axes, fraction=0.03, label="boundary probability p")
    fig.suptitle("DC-DiT chunking: predicted x0 (top) and router boundary probability (bottom)", fontsize=10)
    write_figure(fig, path, dpi=80)
    return {"timesteps": [records[k]["t"] for k in cols], "kept_share": shares}
