"""Sample a class grid from a DiT or DC-DiT checkpoint, plus (DC-DiT) a chunking visualisation and a summary.

    python sample.py --config configs/DCDiT-B-N4.yaml --ckpt results/000-DCDiT-B/checkpoints/0400000.pt
    python sample.py --ckpt DiT-XL-2-256x256.pt --config configs/DiT-XL-2.yaml          # public DiT weights
    python sample.py --ckpt ... --tail-dropping-fraction 0.3                             # elastic inference
    python sample.py --ckpt ... --cfg-scale 1.5 --lite-cfg --uncond-tail-dropping-fraction 0.9
    python sample.py --ckpt ... --viz-rows xt,x0,p --viz-per-sample                      # what the router sees
    python sample.py --ckpt ... --no-visualize --profile                                 # trace the loop alone

Writes into --out-dir:
  sample.png            the grid: each class a row when every class is drawn equally often, labelled on the
                        left, small images enlarged (sampling.save_grid);
  chunking_viz.png      (DC-DiT, unless --no-visualize) for a few samples, columns at 5 timesteps from noisy to
                        clean, rows --viz-rows: the noisy input x_t the router sees, the predicted x0, the
                        boundary-probability map, with the share of kept tokens under each column (paper §4,
                        Fig. 3/4); --viz-per-sample writes chunking_viz_{i}.png, one per sample, instead;
  chunking_summary.png  (DC-DiT) per timestep and CFG branch the kept share and mean boundary probability,
                        time and TFLOPs per step, and TFLOPs/img by component (visualize.summary_figure);
  sample_summary.json   the numbers of the summary printed at the end (sampling.sampling_summary);
  profile/              with --profile, a torch.profiler trace of a few sampling steps after the first.
Image i has its own generators, seeded by (seed, i) (sampling.image_generators), so it does not depend
on the batch it was drawn in.
"""
import argparse
import contextlib
import glob
import json
import os

import numpy as np
import torch

from config import add_config_args, main_guard
from fileio import atomic_write
from models import is_dcdit
from sampling import (PROFILE_WARMUP, SampleError, Sampler, add_sampling_args, class_grid, describe_budgets,
                      format_summary, generate, load_model_for_sampling, load_vae_if_latent, profiled_steps,
                      sampling_summary, save_grid, uncond_budget)
from tracking import step_profiler
from visualize import DEFAULT_VIZ_ROWS, chunking_viz, parse_viz_rows, summary_figure


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    add_sampling_args(parser)
    parser.add_argument("--class-labels", type=int, nargs="*", default=None,
                        help="default: 207 360 387 974 88 979 417 279 (ImageNet) or every class twice")
    parser.add_argument("--num-viz-samples", type=int, default=4, help="samples shown in chunking_viz.png")
    parser.add_argument("--viz-rows", default=",".join(DEFAULT_VIZ_ROWS),
                        help="rows per sample in chunking_viz.png, top to bottom: xt (the noisy input the router "
                             "sees), x0 (predicted x0), p (boundary probability); default %(default)s")
    parser.add_argument("--viz-per-sample", action="store_true",
                        help="one chunking_viz_{i}.png per sample instead of one figure")
    parser.add_argument("--no-visualize", action="store_true",
                        help="no chunking_viz.png: sample without keeping per-step images and boundary maps")
    parser.add_argument("--profile", action="store_true",
                        help="torch.profiler trace of the sampling loop into OUT/profile/ (the first step skipped)")
    parser.add_argument("--profile-steps", type=int, default=3, help="sampling steps the --profile trace records")
    parser.add_argument("--out-dir", default=".")
    args = parser.parse_args(argv)
    viz_rows = parse_viz_rows(args.viz_rows)
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
    profiled = profiled_steps(cfg.sample.num_sampling_steps, args.profile_steps)
    if args.profile and (args.profile_steps < 1 or not profiled):
        raise SampleError(f"--profile with --profile-steps {args.profile_steps} and {cfg.sample.num_sampling_steps} "
                          f"sampling steps records nothing: expected --profile-steps >= 1 and at least "
                          f"{profiled.start} sampling steps (the first skipped, one for the profiler's warm-up)")
    labels = torch.tensor(labels)
    vae = load_vae_if_latent(cfg, args.device)
    dcdit = is_dcdit(cfg.model.name)
    visualize = dcdit and not args.no_visualize  # the visualisation alone needs every step's images and maps
    sampler = Sampler(model, cfg, cfg.sample.cfg_scale, cfg.sample.tail_dropping_fraction, uncond_budget(cfg),
                      keep_maps=visualize)
    trace_dir = os.path.join(args.out_dir, "profile")
    profiler = step_profiler(profiled.start, profiled.stop - 1, trace_dir, warmup=PROFILE_WARMUP,
                             cuda=torch.device(args.device).type == "cuda") if args.profile else None
    earlier_traces = set(glob.glob(os.path.join(trace_dir, "*.pt.trace.json")))
    print(f"sampling {len(labels)} images: {describe_budgets(cfg)}", flush=True)
    with profiler or contextlib.nullcontext():
        res = generate(model, cfg, labels, seed=cfg.sample.seed, device=args.device, sampler=sampler,
                       progressive=visualize, progress=True, vae=vae, on_step=profiler.step if profiler else None)
    images, steps = res if visualize else (res, None)

    os.makedirs(args.out_dir, exist_ok=True)
    path = os.path.join(args.out_dir, "sample.png")
    order, per_row, row_labels = class_grid(labels.tolist(), nrow=10 if cfg.model.num_classes <= 10 else 4)
    save_grid(images[order], path, nrow=per_row, row_labels=row_labels)
    print(f"saved {path}")
    if visualize:
        viz = chunking_viz(steps, sampler.records, cfg, os.path.join(args.out_dir, "chunking_viz.png"),
                           num_samples=args.num_viz_samples, vae=vae, device=args.device, rows=viz_rows,
                           per_sample=args.viz_per_sample)
        print(f"saved {', '.join(viz['paths'])}; kept-token share per column (t = {viz['timesteps']}): "
              f"{[round(float(np.mean(s)), 3) for s in viz['kept_share']]}")

    summary = sampling_summary(sampler, len(labels))
    print(format_summary(summary))
    json_path = os.path.join(args.out_dir, "sample_summary.json")
    atomic_write(json_path, lambda f: f.write(json.dumps(summary, indent=1).encode()))
    written = [json_path]
    if dcdit:
        written.append(os.path.join(args.out_dir, "chunking_summary.png"))
        summary_figure(summary, written[-1])
    print(f"saved {', '.join(written)}")
    if profiler is not None:
        traces = sorted(set(glob.glob(os.path.join(trace_dir, "*.pt.trace.json"))) - earlier_traces)
        print(f"profiler trace of sampling steps {profiled.start}-{profiled.stop - 1}: {', '.join(traces)}\n"
              f"  open with `tensorboard --logdir {trace_dir}` (needs the torch-tb-profiler plugin) or load the "
              f"JSON in https://ui.perfetto.dev or chrome://tracing")


if __name__ == "__main__":
    main_guard(main)()
