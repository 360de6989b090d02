"""DyDiT on DC-DiT (paper §4.5): wall time per sampling step with and without the gates, next to FLOPs.

One sampling step = a forward of 2B rows (CFG: conditional then unconditional, every row at the same
t), eval mode, no grad. The same weights run as the plain DC-DiT ("static" execution: no routers) and
as DyDiT with its gates fixed to patterns near lambda (default 0.7), each step timed (median of
repeats, rows interleaved so drift hits all alike) and priced from the gate decisions the forward
returns (tools/flops.dydit_info_row_flops; exact, the same count FlopCounterMode gives the sliced path).

Patterns (without --ckpt; a trained DyDiT's routers would decide):
  all gates on       the routers' overhead alone
  width              every block keeps the k of H heads and MLP groups that brings the inner blocks'
                     FLOPs ratio closest to lambda, every token runs the MLP
  tokens             all heads and groups; the token router's last bias at 0, so about half the tokens
                     skip the MLP (the measured share is printed)
  width, masked      the width pattern run as in training: every head and channel computed, then
                     multiplied by its 0/1 gate, so nothing is saved (what "sliced" avoids)
With --ckpt (a DyDiT training checkpoint) its own gates are timed too.

Kept tokens: a fresh DC-DiT router keeps ~2 tokens, so without --ckpt each sample keeps its top
round(L / N) tokens by p (tools.flops.FixedCountRouter), as in tools/bench_elastic.py.

    python tools/bench_dydit.py                       # DC-DiT-B N=4 + DyDiT, 256px latents, batch 1
    python tools/bench_dydit.py --ckpt results/002-DCDiT-B/checkpoints/0120000.pt
    python tools/bench_dydit.py --tiny
"""
import argparse
import statistics
import time
from contextlib import ExitStack, nullcontext

import numpy as np
import torch

from config import add_config_args, config_from_args, load_config, main_guard
from models import create_model
from models.dydit import dydit_blocks, dydit_execution, fix_gates, load_dcdit_weights, read_dcdit_checkpoint
from models.flops import block_flops, static_block_flops
from tools.bench_elastic import add_timing_args, resolve_timing_args, step_inputs
from models.flops import dcdit_flops_coeffs, dydit_dims, dydit_info_row_flops
from models.routing import keep_exactly as forced_kept

DEFAULT_CONFIG = "configs/DCDiT-B-N4-DyDiT.yaml"
TINY_CONFIG = "configs/tiny/test-dydit.yaml"


def width_for_ratio(dims, depth: int, kept: int, target: float) -> int:
    """Heads (= MLP groups) kept per block whose inner-block FLOPs ratio, every token running, is closest
    to target (routers included)."""
    static = static_block_flops(dims, kept)
    ratios = [block_flops(dims, kept, k, k, kept) / static for k in range(dims.heads + 1)]
    return int(np.argmin([abs(r - target) for r in ratios]))


def load_weights(model, path: str) -> bool:
    """EMA weights of a training checkpoint (or a bare state dict) into model. True if it held DyDiT gates
    (a DyDiT run), False for a DC-DiT checkpoint (gates stay at their all-on init)."""
    state, _ = read_dcdit_checkpoint(path, what="--ckpt")
    if any(".head_router." in k for k in state):
        model.load_state_dict(state, strict=True)
        return True
    load_dcdit_weights(model, state, path)
    return False


def main_impl(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_config_args(parser)
    parser.add_argument("--ckpt", default="", help="a DyDiT or DC-DiT training checkpoint (EMA weights)")
    add_timing_args(parser, batch=1, tiny_config=TINY_CONFIG)
    parser.add_argument("--target", type=float, default=None, help="lambda (default: the config's dydit.target_ratio)")
    args = parser.parse_args(argv)
    resolve_timing_args(args, DEFAULT_CONFIG, TINY_CONFIG)
    cfg = config_from_args(args)
    if not cfg.dydit.enabled:
        cfg = load_config(args.config, list(args.overrides) + ["dydit.enabled=true"])
    target = cfg.dydit.target_ratio if args.target is None else args.target
    device = torch.device(args.device)

    torch.manual_seed(0)
    model = create_model(cfg.model, cfg.dydit).eval()
    trained_gates = load_weights(model, args.ckpt) if args.ckpt else False
    coeffs = dcdit_flops_coeffs(model)  # the DC-DiT's a + b M + c M^2, on CPU
    dims, depth = dydit_dims(model)
    model = model.to(device)
    H, W = model.grid
    L = H * W
    keep = round(L / cfg.model.downsample_factor)
    k = width_for_ratio(dims, depth, keep, target)
    saved = {n: p.detach().clone() for n, p in model.named_parameters() if "router" in n}

    def pattern(name: str):
        """Set the routers for one row; returns the execution mode to time it with."""
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in saved:
                    p.copy_(saved[n])
        if name == "checkpoint gates":
            return "sliced"
        if name == "all gates on":
            fix_gates(model, [dims.heads] * depth, [dims.heads] * depth, tokens=True)
        elif name.startswith("width"):
            fix_gates(model, [k] * depth, [k] * depth, tokens=True)
        elif name == "tokens":
            fix_gates(model, [dims.heads] * depth, [dims.heads] * depth, tokens=None)
            with torch.no_grad():
                for block in dydit_blocks(model):
                    block.token_router[2].bias.zero_()
        return "masked" if name.endswith("masked") else "static" if name == "DC-DiT (no gates)" else "sliced"

    rows = ["DC-DiT (no gates)"]
    rows += ["checkpoint gates"] if trained_gates else []
    rows += ["all gates on", "width", "tokens", "width, masked"] if not trained_gates else []
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    x, t, y = step_inputs(model, args.batch, device)
    with ExitStack() as stack:
        routing = f"router from checkpoint {args.ckpt}"
        if not args.ckpt:
            stack.enter_context(forced_kept(model, keep))
            routing = f"fresh weights: each sample keeps its top {keep} = L/N tokens by p"
        print(f"{cfg.model.name} + DyDiT (L={L}, {depth} blocks, H={dims.heads}), batch {args.batch} "
              f"({2 * args.batch} rows with CFG), device {device}, torch threads {torch.get_num_threads()}")
        print(f"routing: {routing}; lambda {target}; width pattern keeps {k}/{dims.heads} heads and groups",
              flush=True)

        def step(name: str):
            mode = pattern(name)
            with torch.no_grad(), autocast, dydit_execution(model, mode):
                start = time.perf_counter()
                out, info = model.forward_with_cfg(x, t, y, cfg.sample.cfg_scale, return_info=True)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                return time.perf_counter() - start, info

        modes = {name: pattern(name) for name in rows}
        infos = {name: step(name)[1] for name in rows}
        for _ in range(args.warmup):
            for name in rows:
                step(name)
        times = {name: [] for name in rows}
        for i in range(args.repeats):
            for name in rows:
                times[name].append(step(name)[0])
            print(f"repeat {i + 1}/{args.repeats}: " + ", ".join(f"{n} {v[-1]:.3f}s" for n, v in times.items()),
                  flush=True)

    print(f"\nper sampling step (forward of {2 * args.batch} rows); FLOPs priced from the returned gate decisions")
    print(f"{'row':20s} {'heads':>6s} {'groups':>7s} {'tokens':>7s} {'GFLOPs':>9s} {'FLOPs ratio':>12s} "
          f"{'blocks ratio':>13s} {'time s':>9s} {'time ratio':>11s}")
    base_time = statistics.median(times[rows[0]])
    base_flops = None
    for name in rows:
        d = infos[name].dydit
        run, dcdit = dydit_info_row_flops(coeffs, dims, d)                        # (rows,) each
        if modes[name] == "masked":  # every head, channel and token computed: the static cost plus the routers
            run = dcdit + depth * (4 * dims.hidden * dims.heads
                                   + d.kept.cpu().numpy() * (2 * dims.hidden * dims.router_hidden
                                                             + 2 * dims.router_hidden))
        base_flops = dcdit.sum() if base_flops is None else base_flops
        blocks = depth * static_block_flops(dims, d.kept.cpu().numpy().astype(np.float64)).sum()
        blocks_ratio = (run.sum() - (dcdit.sum() - blocks)) / blocks
        med = statistics.median(times[name])
        print(f"{name:20s} {d.heads.mean().item():6.2f} {d.groups.mean().item():7.2f} "
              f"{(d.tokens.sum() / (d.kept.sum() * depth)).item():7.2f} {run.sum() / 1e9:9.2f} "
              f"{run.sum() / base_flops:12.3f} {blocks_ratio:13.3f} {med:9.4f} {med / base_time:11.3f}")
    print("heads / groups / tokens: share kept; ratios are over the DC-DiT row (blocks ratio: inner blocks only)")


main = main_guard(main_impl)

if __name__ == "__main__":
    main()
