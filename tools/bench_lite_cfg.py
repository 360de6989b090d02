"""Lite-CFG vs plain CFG: wall time and FLOPs of one guided sampling step, side by side in one run.

    python tools/bench_lite_cfg.py                                  # DC-DiT-B, 4 images (8 rows), CPU
    python tools/bench_lite_cfg.py --kept 256 --uncond-fraction 0.9 --batch 8 --device cuda

Every row keeps exactly --kept tokens before tail dropping (the model's own router scores them; the
highest-p ones are kept), so the comparison does not depend on an untrained router's budget. The
conditional half keeps its budget; Lite-CFG's unconditional half drops --uncond-fraction of it in the
same packed batch (README "Lite-CFG"). Prints the measured time ratio next to the FLOPs ratio.
"""
import argparse
import os
import statistics
import time

import torch

from config import load_config
from models import create_model
from models.flops import dcdit_flops_coeffs, quadratic
from models.routing import keep_exactly as forced_kept

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository, where configs/ lives


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=os.path.join(ROOT, "configs/DCDiT-B-N4.yaml"))
    parser.add_argument("--kept", type=int, default=256, help="tokens per row before tail dropping")
    parser.add_argument("--uncond-fraction", type=float, default=0.9)
    parser.add_argument("--batch", type=int, default=4, help="images (2x rows with CFG)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    cfg = load_config(args.config)
    torch.manual_seed(0)
    model = create_model(cfg.model).eval()
    coeffs = dcdit_flops_coeffs(model)
    model.to(args.device)
    n, s = args.batch, cfg.model.input_size
    x = torch.randn(n, cfg.model.in_channels, s, s, device=args.device)
    xx = torch.cat([x, x])                                                      # (2n, C, H, W)
    t = torch.full((2 * n,), 500, device=args.device)
    y = torch.cat([torch.arange(n) % cfg.model.num_classes, torch.full((n,), cfg.model.num_classes)]).to(args.device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=args.device == "cuda")
    results = {}
    with forced_kept(model, args.kept), torch.no_grad(), autocast:
        for name, kw in (("plain CFG", {}), (f"Lite-CFG (uncond f={args.uncond_fraction})",
                                              {"uncond_tail_drop": args.uncond_fraction})):
            model.forward_with_cfg(xx, t, y, 1.5, **kw)                          # warm-up
            times = []
            for _ in range(args.repeats):
                if args.device == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                _, info = model.forward_with_cfg(xx, t, y, 1.5, return_info=True, **kw)
                if args.device == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
            kept = info.kept.tolist()
            results[name] = (statistics.median(times), sum(quadratic(coeffs, m) for m in kept), kept)
    base_time, base_flops, _ = results["plain CFG"]
    print(f"{cfg.model.name}, {n} images ({2 * n} rows), {args.device}, median of {args.repeats}")
    print(f"{'':32s} {'kept (cond | uncond)':>22s} {'s/step':>8s} {'GFLOPs':>8s} {'time ratio':>11s} {'FLOPs ratio':>12s}")
    for name, (sec, flops, kept) in results.items():
        split = f"{kept[0]} | {kept[n]}"
        print(f"{name:32s} {split:>22s} {sec:8.3f} {flops / 1e9:8.1f} {sec / base_time:11.3f} {flops / base_flops:12.3f}")


if __name__ == "__main__":
    main()
