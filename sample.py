"""Sample a class grid from a DiT or DC-DiT checkpoint, plus (DC-DiT) a chunking visualisation.

    python sample.py --config configs/DCDiT-B-N4.yaml --ckpt results/000-DCDiT-B/checkpoints/0400000.pt
    python sample.py --ckpt DiT-XL-2-256x256.pt --config configs/DiT-XL-2.yaml          # public DiT weights
    python sample.py --ckpt ... --tail-dropping-fraction 0.3                             # elastic inference
    python sample.py --ckpt ... --cfg-scale 1.5 --lite-cfg --uncond-tail-dropping-fraction 0.9

Writes `sample.png` and, for DC-DiT, `chunking_viz.png`: for a few samples, columns at 5 timesteps
from noisy to clean; rows alternate the current predicted x0 and the boundary-probability map, with
the share of kept tokens under each column (paper §4, Fig. 3/4). The grid gives each class a row when
every class is drawn equally often, labelled on the left, and enlarges small images (sampling.save_grid).
Image i has its own generators, seeded by (seed, i) (sampling.image_generators), so it does not depend
on the batch it was drawn in.
"""
import argparse
import os

import numpy as np
import torch

from config import add_config_args, main_guard
from models import is_dcdit
from sampling import (SampleError, Sampler, add_sampling_args, class_grid, describe_budgets, generate,
                      kept_by_branch, load_model_for_sampling, load_vae_if_latent, save_grid, uncond_budget)
from visualize import chunking_viz


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    add_sampling_args(parser)
    parser.add_argument("--class-labels", type=int, nargs="*", default=None,
                        help="default: 207 360 387 974 88 979 417 279 (ImageNet) or every class twice")
    parser.add_argument("--num-viz-samples", type=int, default=4, help="samples shown in chunking_viz.png")
    parser.add_argument("--out-dir", default=".")
    args = parser.parse_args(argv)
    model, cfg = load_model_for_sampling(args, args.ckpt, not args.no_ema, args.device)
    torch.manual_seed(cfg.sample.seed)

    if args.class_labels:
        labels = args.class_labels
    elif cfg.model.num_classes >= 1000:
        labels = [207, 360, 387, 974, 88, 979, 417, 279]  # DiT's sample.py classes
    else:
        labels = [i % cfg.model.num_classes for i in range(2 * cfg.model.num_classes)]
    bad = [c for c in labels if not 0 <= c < cfg.model.num_classes]
    if bad:
        raise SampleError(f"--class-labels {bad} outside [0, {cfg.model.num_classes})")
    if args.num_viz_samples < 1:
        raise SampleError(f"--num-viz-samples {args.num_viz_samples}: expected >= 1")
    labels = torch.tensor(labels)
    vae = load_vae_if_latent(cfg, args.device)
    sampler = Sampler(model, cfg, cfg.sample.cfg_scale, cfg.sample.tail_dropping_fraction, uncond_budget(cfg))
    dcdit = is_dcdit(cfg.model.name)
    print(f"sampling {len(labels)} images: {describe_budgets(cfg)}", flush=True)
    res = generate(model, cfg, labels, seed=cfg.sample.seed, device=args.device, sampler=sampler,
                   progressive=dcdit, progress=True, vae=vae)
    images, steps = res if dcdit else (res, None)
    if dcdit:
        kept = kept_by_branch(sampler.records, len(labels), sampler.use_cfg)
        L = model.grid[0] * model.grid[1]
        print("tokens run per image and step, of " + str(L) + ": "
              + ", ".join(f"{branch} {k:.1f} ({k / L:.1%})" for branch, k in kept.items()), flush=True)
    os.makedirs(args.out_dir, exist_ok=True)
    path = os.path.join(args.out_dir, "sample.png")
    order, per_row, row_labels = class_grid(labels.tolist(), nrow=10 if cfg.model.num_classes <= 10 else 4)
    save_grid(images[order], path, nrow=per_row, row_labels=row_labels)
    print(f"saved {path}")
    if dcdit:
        viz_path = os.path.join(args.out_dir, "chunking_viz.png")
        viz = chunking_viz(steps, sampler.records, cfg, viz_path, num_samples=args.num_viz_samples, vae=vae,
                           device=args.device)
        print(f"saved {viz_path}; kept-token share per column (t = {viz['timesteps']}): "
              f"{[round(float(np.mean(s)), 3) for s in viz['kept_share']]}")


if __name__ == "__main__":
    main_guard(main)()
