"""The report's figures: compression and stroke enrichment vs timestep, the FID-vs-GFLOPs Pareto figure, samples."""
import numpy as np

from visualize import label_fractions, pyplot, write_figure


def _timestep_figure(path: str, ylabel: str, reference: float, reference_label: str, draw) -> None:
    """A per-timestep line figure: `draw(ax)` adds the series, then a dotted reference line and labels."""
    fig, ax = pyplot().subplots(figsize=(5.5, 3.4), layout="constrained")
    draw(ax)
    ax.axhline(reference, color="k", ls=":", label=reference_label)
    ax.set_xlabel("diffusion timestep t (999 = noise)")
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7)
    write_figure(fig, path, dpi=110)


def plot_compression(series: dict, dit_ratio: float, path: str) -> None:
    def draw(ax):
        for label, s in series.items():
            line, = ax.plot(s["t"], s["mean"], label=f"{label} (mean)")
            ax.fill_between(s["t"], s["p10"], s["p90"], color=line.get_color(), alpha=0.2, label=f"{label} (10-90%)")

    _timestep_figure(path, "compression L / M", dit_ratio, f"DiT/2 (fixed {dit_ratio:g}x)", draw)


def plot_enrichment(series: dict, path: str) -> None:
    def draw(ax):
        for label, s in series.items():
            ax.plot(s["t"], s["enrichment"], label=label)

    _timestep_figure(path, "P(kept | stroke) / P(kept | background)", 1.0, "no preference", draw)


def plot_pareto(tail: list, lite: list, dit_rows: list, path: str) -> None:
    """FID vs measured GFLOPs/img: the one DC-DiT checkpoint under tail dropping and Lite-CFG, and the DiT rows."""
    fig, ax = pyplot().subplots(figsize=(5.0, 3.4), layout="constrained")
    g = [1e3 * r["tflops"] for r in tail]
    fids = [r["fid"] for r in tail]
    ax.errorbar(g, fids, yerr=[r["fid_sd"] for r in tail], marker="o", capsize=3, label="DC-DiT, tail drop f")
    label_fractions(ax, g, fids, [r["f"] for r in tail])
    if lite:
        ax.errorbar([1e3 * r["tflops"] for r in lite], [r["fid"] for r in lite], yerr=[r["fid_sd"] for r in lite],
                    marker="s", ls="none", capsize=3, label="DC-DiT, Lite-CFG (uncond f = "
                    + ", ".join(f"{r['uncond_f']:g}" for r in lite) + ")")
    for r in dit_rows:
        ax.errorbar([1e3 * r["tflops"]], [r["fid"]], yerr=[r["fid_sd"]], marker="^", ls="none", capsize=3,
                    label=r["label"])
    ax.set_xlabel("GFLOPs / image (measured)")
    ax.set_ylabel("FID")
    ax.legend(fontsize=6)
    write_figure(fig, path, dpi=110)


def plot_samples(sets: dict, path: str, per_row: int = 20) -> None:
    fig, axes = pyplot().subplots(len(sets), 1, figsize=(per_row * 0.45, 0.62 * len(sets)), layout="constrained",
                                  squeeze=False)
    for ax, (label, images) in zip(axes[:, 0], sets.items()):
        row = np.concatenate(list(images[:per_row]), axis=1)                        # (H, n * W, 3)
        ax.imshow(row, interpolation="nearest")
        ax.set_title(label, fontsize=7, loc="left")
        ax.axis("off")
    write_figure(fig, path, dpi=110)
