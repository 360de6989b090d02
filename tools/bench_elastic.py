"""Elastic inference (authors' README, tail dropping): measured speed-up against FLOPs saved.

One sampling step = a DC-DiT forward at batch B with CFG doubling (2B rows: conditional, then
unconditional), eval mode, no grad. For each tail-drop fraction f the step is timed (median of
repeats, fractions interleaved) and priced in FLOPs from the kept counts the model itself returns
(return_info=True) and the exact quadratic a + b M + c M^2 of tools/flops.py. The table shows
measured speed-up over f = 0 next to the FLOPs speed-up and their ratio (the target: at
least 0.8 on CPU for the B config at batch 8).

A freshly initialised cosine router keeps about 2 tokens per sample, which would leave nothing to
drop. So without --ckpt the model's own router still scores every token (its cost stays in the
step), but each sample keeps its round(L / N) highest-p tokens (tools.flops.FixedCountRouter, 256
at N = 4); tail dropping then removes the lowest-p share of those, as it would in a trained model.
With --ckpt the checkpoint's router decides. The output says which.

    python tools/bench_elastic.py                                  # DCDiT-B-N4, batch 8
    python tools/bench_elastic.py --ckpt results/000-DCDiT-B/checkpoints/0400000.pt
    python tools/bench_elastic.py --tiny
"""
import argparse
import os
import statistics
import time
from contextlib import ExitStack, nullcontext

import torch

from config import add_config_args, main_guard
from models import DCDiT
from sampling import load_model_for_sampling
from models.flops import dcdit_flops_coeffs, quadratic
from models.routing import keep_exactly as forced_kept

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository, where configs/ lives

DEFAULT_CONFIG = "configs/DCDiT-B-N4.yaml"
TINY_CONFIG = "configs/tiny/test-dcdit.yaml"


class BenchError(ValueError):
    user_error = True  # main_guard prints one line


def add_timing_args(parser: argparse.ArgumentParser, batch: int, tiny_config: str) -> None:
    """The flags every single-config step benchmark shares (this one and tools/bench_dydit.py)."""
    parser.add_argument("--batch", type=int, default=batch, help="images per step (2x rows with CFG)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats; the median is reported")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--tiny", action="store_true", help=f"use {tiny_config} (seconds)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def resolve_timing_args(args: argparse.Namespace, default_config: str, tiny_config: str) -> None:
    """--config from --tiny when none is given; a one-line BenchError for counts that cannot be timed."""
    if args.config is None:
        args.config = os.path.join(ROOT, tiny_config if args.tiny else default_config)
    if args.batch < 1 or args.repeats < 1 or args.warmup < 0:
        raise BenchError(f"--batch and --repeats must be >= 1 and --warmup >= 0, got {args.batch}, "
                         f"{args.repeats}, {args.warmup}")


def step_inputs(model: DCDiT, batch: int, device):
    """[z; z] latents, [labels; null class] and a mid-range timestep: one CFG sampling step's rows."""
    g = torch.Generator().manual_seed(0)
    H, W = model.grid
    z = torch.randn(batch, model.in_channels, H, W, generator=g)                        # (B, C, H, W)
    labels = torch.randint(0, model.y_embedder.num_classes, (batch,), generator=g)      # (B,)
    null = torch.full((batch,), model.y_embedder.num_classes)                           # (B,)
    x = torch.cat([z, z]).to(device)                                                    # (2B, C, H, W)
    y = torch.cat([labels, null]).to(device)                                            # (2B,)
    t = torch.full((2 * batch,), 500, dtype=torch.long, device=device)                  # (2B,)
    return x, t, y


def main_impl(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_config_args(parser)
    parser.add_argument("--ckpt", default="", help="a DC-DiT training checkpoint (EMA weights are used)")
    add_timing_args(parser, batch=8, tiny_config=TINY_CONFIG)
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.0, 0.3, 0.6, 0.9])
    parser.add_argument("--cfg-scale", type=float, default=4.0)
    args = parser.parse_args(argv)
    resolve_timing_args(args, DEFAULT_CONFIG, TINY_CONFIG)
    if 0.0 not in args.fractions or not all(0.0 <= f < 1.0 for f in args.fractions):
        raise BenchError(f"--fractions must lie in [0, 1) and include 0 (the reference), got {args.fractions}")
    device = torch.device(args.device)

    model, cfg = load_model_for_sampling(args, args.ckpt, use_ema=True, device="cpu")
    if not isinstance(model, DCDiT):
        raise BenchError(f"model.name={cfg.model.name!r} is not a DC-DiT: tail dropping needs a router")
    coeffs = dcdit_flops_coeffs(model)  # on CPU, before any router override
    model = model.to(device).eval()
    H, W = model.grid
    L = H * W
    with ExitStack() as stack:
        if args.ckpt:
            routing = f"router from checkpoint {args.ckpt}"
        else:
            keep = round(L / cfg.model.downsample_factor)
            stack.enter_context(forced_kept(model, keep))
            routing = (f"fresh weights: the {cfg.model.router} router scores tokens, each sample keeps its "
                       f"top {keep} = L/N by p (a fresh router keeps ~2)")
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
        x, t, y = step_inputs(model, args.batch, device)
        print(f"{cfg.model.name} (L={L}), batch {args.batch} ({2 * args.batch} rows with CFG), device {device}"
              f"{' (bf16 autocast)' if device.type == 'cuda' else ''}, torch threads {torch.get_num_threads()}")
        print(f"routing: {routing}", flush=True)

        def step(f: float):
            with torch.no_grad(), autocast:
                out, info = model.forward_with_cfg(x, t, y, args.cfg_scale, tail_drop=f, return_info=True)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            return info.kept

        kept = {f: step(f).cpu() for f in args.fractions}  # (2B,) per fraction, deterministic
        for _ in range(args.warmup):
            for f in args.fractions:
                step(f)
        times = {f: [] for f in args.fractions}
        for i in range(args.repeats):
            for f in args.fractions:
                start = time.perf_counter()
                step(f)
                times[f].append(time.perf_counter() - start)
            print(f"repeat {i + 1}/{args.repeats}: " + ", ".join(f"f={f:g} {v[-1]:.3f}s" for f, v in times.items()),
                  flush=True)

    flops = {f: float(quadratic(coeffs, kept[f].double()).sum()) for f in args.fractions}
    med = {f: statistics.median(v) for f, v in times.items()}
    print(f"\nper sampling step (forward of {2 * args.batch} rows); FLOPs from the returned kept counts")
    print(f"{'f':>5s} {'mean M':>8s} {'GFLOPs':>9s} {'time s':>9s} {'FLOPs speed-up':>15s} "
          f"{'measured speed-up':>18s} {'measured / FLOPs':>17s}")
    for f in args.fractions:
        fl_up, t_up = flops[0.0] / flops[f], med[0.0] / med[f]
        print(f"{f:5.2f} {kept[f].float().mean().item():8.1f} {flops[f] / 1e9:9.2f} {med[f]:9.4f} {fl_up:15.3f} "
              f"{t_up:18.3f} {t_up / fl_up:17.3f}")
    print("target: measured / FLOPs speed-up >= 0.8 on CPU for the B config at batch 8")


main = main_guard(main_impl)

if __name__ == "__main__":
    main()
