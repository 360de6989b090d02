"""The same samples at several tail-drop fractions, with the TFLOPs/img each really cost (README,
"Elastic inference"): one checkpoint, one seed, a column per fraction f.

    python tools/tail_drop_grid.py --ckpt ckpt.pt --fractions 0 0.3 0.6 --out tail_drop_grid.png
    python tools/tail_drop_grid.py --ckpt ckpt.pt --fractions 0 0.3 0.6 --cfg-scale 1.5 \\
        --lite-cfg --uncond-tail-dropping-fraction 0.9 --num-sampling-steps 50

Every column starts from the same per-image noise and labels (sampling.image_generators), so what
changes between columns is only the budget: each sample drops floor(f * M) of its lowest-probability
boundary tokens at every step. Above each column: f, TFLOPs/img measured from the kept counts of that
run (tools/flops.py, all steps, CFG rows included), and the mean share of tokens kept.
"""
import argparse

import numpy as np
import torch

from config import add_config_args, main_guard
from data import to_uint8_images
from models import is_dcdit
from sampling import SampleError, Sampler, add_sampling_args, generate, load_model_for_sampling, load_vae_if_latent
from models.flops import dcdit_flops_coeffs, tflops_from_counts
from visualize import pyplot, write_figure


def run_fractions(model, cfg, labels: torch.Tensor, fractions, device="cpu", vae=None) -> list:
    """For each f: images (B, H, W, 3) uint8, TFLOPs/img from the kept counts, mean kept share (cond rows)."""
    s = cfg.sample
    coeffs = dcdit_flops_coeffs(model)
    L = model.grid[0] * model.grid[1]
    results = []
    for f in fractions:
        uncond = s.uncond_tail_dropping_fraction if s.lite_cfg else None  # Lite-CFG: fixed across columns
        sampler = Sampler(model, cfg, s.cfg_scale, f, uncond, keep_maps=False)
        images = generate(model, cfg, labels, seed=s.seed, device=device, sampler=sampler, vae=vae)
        kept = np.stack([r["kept"].numpy() for r in sampler.records])                      # (S, rows)
        n = len(labels)
        results.append({"f": f, "images": to_uint8_images(images),                          # (B, H, W, 3)
                        "tflops": tflops_from_counts(coeffs, kept, cfg=sampler.use_cfg),
                        "kept_share": float(kept[:, :n].mean() / L), "kept": kept})
    return results


def save_figure(results: list, path: str, steps: int, use_cfg: bool) -> None:
    n, cols = len(results[0]["images"]), len(results)
    fig, axes = pyplot().subplots(n, cols, figsize=(1.9 * cols, 1.9 * n + 0.8), squeeze=False, layout="constrained")
    for j, r in enumerate(results):
        for i in range(n):
            axes[i, j].imshow(r["images"][i])
            axes[i, j].set_axis_off()
        axes[0, j].set_title(f"f = {r['f']:g}\n{r['tflops']:.4g} TFLOPs/img\nkept {100 * r['kept_share']:.1f}%",
                             fontsize=8)
    fig.suptitle(f"Tail dropping: same seeds, {steps} steps{' with CFG' if use_cfg else ''}", fontsize=9)
    write_figure(fig, path, dpi=100)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_config_args(parser)
    add_sampling_args(parser)
    parser.add_argument("--fractions", type=float, nargs="+", required=True,
                        help="tail-drop fractions, one column each")
    parser.add_argument("--class-labels", type=int, nargs="+", default=None, help="default: 0 .. 3 (4 rows)")
    parser.add_argument("--out", default="tail_drop_grid.png")
    args = parser.parse_args(argv)
    if args.tail_dropping_fraction is not None:
        raise SampleError("--tail-dropping-fraction: pass the budgets as --fractions f1 f2 ... instead")
    bad = [f for f in args.fractions if not 0.0 <= f < 1.0]
    if bad:
        raise SampleError(f"--fractions {bad}: expected fractions in [0, 1)")
    model, cfg = load_model_for_sampling(args, args.ckpt, not args.no_ema, args.device)
    if not is_dcdit(cfg.model.name):
        raise SampleError(f"model.name={cfg.model.name!r}: tail dropping needs a DC-DiT (DiT has no router)")
    labels = args.class_labels or [i % cfg.model.num_classes for i in range(4)]
    bad = [c for c in labels if not 0 <= c < cfg.model.num_classes]
    if bad:
        raise SampleError(f"--class-labels {bad} outside [0, {cfg.model.num_classes})")
    vae = load_vae_if_latent(cfg, args.device)
    results = run_fractions(model, cfg, torch.tensor(labels), args.fractions, args.device, vae)
    save_figure(results, args.out, cfg.sample.num_sampling_steps, cfg.sample.cfg_scale > 1.0)
    for r in results:
        print(f"f={r['f']:g}: {r['tflops']:.4g} TFLOPs/img, kept {100 * r['kept_share']:.1f}% of tokens")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main_guard(main)()
