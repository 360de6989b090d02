"""Parameters and TFLOPs per image of a config, in the paper's convention (Table 1); the counting itself is
models/flops.py (one forward at batch 1 by FlopCounterMode, 2 FLOPs per multiply-add, x steps x 2 with CFG;
a DC-DiT's cost is a + b M + c M^2 in its kept tokens M).

    python tools/flops.py --config configs/baselines/DiT-XL-2-isoflop.yaml
    python tools/flops.py --config configs/DCDiT-B-N4.yaml --kept-tokens 256
    python tools/flops.py --config configs/DCDiT-B-N4.yaml --from-json samples/run.json
    python tools/flops.py --config configs/DCDiT-B-N4.yaml --from-json samples/run.json --components
    python tools/flops.py --table1 [--json]

--components splits the TFLOPs/img by part of the model (condition, encoder, router, chunk, attention, mlp,
modulation, inner_norm, dechunk, residual, decoder, final_layer; a DiT's patchify instead of the scaffold), each
priced as the total is, so the parts sum to it.
"""
import argparse
import json
import os
from typing import Optional, Sequence

import numpy as np

from config import add_config_args, config_from_args, load_config, main_guard
from models import DiT
from models.flops import (DEFAULT_STEPS, build_model, component_coeffs, count_params, dcdit_flops_coeffs,
                          forward_flops, kept_for_flops, quadratic, tflops_by_component, tflops_from_counts,
                          tflops_per_image, tflops_per_image_by_component)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository, where configs/ lives

# Paper Table 1 as printed (the paper's reported values, not ours): name, config, parameters in
# millions, TFLOPs/img, and for DC-DiT the achieved average compression ratio L / M ("Avg CR").
PAPER_TABLE1_DIT = [
    ("DiT-B/2 isoparam (13 blocks)", "configs/baselines/DiT-B-2-isoparam.yaml", 141.0, 24.84),
    ("DiT-B/2 isoflop (17 blocks)", "configs/baselines/DiT-B-2-isoflop.yaml", 180.0, 32.50),
    ("DiT-B/4 isoparam (13 blocks)", "configs/baselines/DiT-B-4-isoparam.yaml", 141.0, 6.01),
    ("DiT-B/4 isoflop (28 blocks)", "configs/baselines/DiT-B-4-isoflop.yaml", 301.0, 12.92),
    ("DiT-XL/2 isoparam (29 blocks)", "configs/baselines/DiT-XL-2-isoparam.yaml", 699.0, 122.41),
    ("DiT-XL/2 isoflop (34 blocks)", "configs/baselines/DiT-XL-2-isoflop.yaml", 818.0, 143.75),
    ("DiT-XL/4 isoparam (29 blocks)", "configs/baselines/DiT-XL-4-isoparam.yaml", 699.0, 29.96),
    ("DiT-XL/4 isoflop (50 blocks)", "configs/baselines/DiT-XL-4-isoflop.yaml", 1201.0, 51.65),
]
PAPER_TABLE1_DCDIT = [
    ("DC-DiT-B N=4", "configs/DCDiT-B-N4.yaml", 138.0, 32.72, 4.49),
    ("DC-DiT-B N=16", "configs/DCDiT-B-N16.yaml", 138.0, 12.98, 17.2),
    ("DC-DiT-XL N=4", "configs/DCDiT-XL-N4.yaml", 690.0, 147.50, 4.4),
    ("DC-DiT-XL N=16", "configs/DCDiT-XL-N16.yaml", 690.0, 50.89, 15.61),
]

# ----------------------------------------------------------------------------------------------------
# Paper Table 1
# ----------------------------------------------------------------------------------------------------

def table1_dit_rows(steps: int = DEFAULT_STEPS) -> list:
    """The 8 DiT baselines of Table 1: ours (params in millions, TFLOPs/img) next to the paper's."""
    rows = []
    for name, path, paper_params, paper_tflops in PAPER_TABLE1_DIT:
        model = build_model(load_config(os.path.join(ROOT, path)))
        rows.append(dict(name=name, kind="dit", config=path, params=count_params(model) / 1e6,
                         tflops=tflops_per_image(model, steps=steps), paper_params=paper_params,
                         paper_tflops=paper_tflops))
    return rows


def table1_dcdit_rows(steps: int = DEFAULT_STEPS) -> list:
    """The 4 DC-DiT rows: our parameters, our TFLOPs/img if every forward kept L / AvgCR tokens (the
    paper's average compression), and the mean M whose quadratic cost gives the paper's TFLOPs/img."""
    rows, coeff_cache = [], {}
    for name, path, paper_params, paper_tflops, paper_cr in PAPER_TABLE1_DCDIT:
        cfg = load_config(os.path.join(ROOT, path))
        model = build_model(cfg)
        # N only sets the router's init target, never a layer shape: one fit serves both N.
        key = (cfg.model.name, cfg.model.depth, cfg.model.hidden_size, cfg.model.router, cfg.model.input_size)
        if key not in coeff_cache:
            coeff_cache[key] = dcdit_flops_coeffs(model)
        coeffs = coeff_cache[key]
        L = model.grid[0] * model.grid[1]
        per_image = steps * 2  # CFG doubles every step's forward
        rows.append(dict(name=name, kind="dcdit", config=path, params=count_params(model) / 1e6,
                         tflops=quadratic(coeffs, L / paper_cr) * per_image / 1e12,
                         paper_params=paper_params, paper_tflops=paper_tflops, paper_avg_cr=paper_cr,
                         kept_at_paper_cr=L / paper_cr,
                         kept_for_paper_tflops=kept_for_flops(coeffs, paper_tflops * 1e12 / per_image),
                         coeffs=list(coeffs)))
    return rows


def format_coeffs(coeffs: Sequence[float]) -> str:
    a, b, c = coeffs
    return f"{a / 1e9:.3f} G + {b / 1e6:.3f} M x M + {c / 1e3:.3f} K x M^2"


def _rel(ours: float, paper: float) -> str:
    return f"{100.0 * (ours - paper) / paper:+.2f}%"


def format_table1(rows: list) -> str:
    lines = ["Paper Table 1, DiT baselines: ours vs the paper's reported values "
             f"(TFLOPs/img = forward x {DEFAULT_STEPS} steps x 2 for CFG)",
             f"{'model':32s} {'params M':>9s} {'paper':>7s} {'diff':>8s} {'TFLOPs':>8s} {'paper':>7s} {'diff':>8s}"]
    for r in rows:
        if r["kind"] == "dit":
            lines.append(f"{r['name']:32s} {r['params']:9.1f} {r['paper_params']:7.0f} "
                         f"{_rel(r['params'], r['paper_params']):>8s} {r['tflops']:8.2f} {r['paper_tflops']:7.2f} "
                         f"{_rel(r['tflops'], r['paper_tflops']):>8s}")
    dc = [r for r in rows if r["kind"] == "dcdit"]
    if dc:
        lines += ["", "DC-DiT: cost depends on the kept count M (per forward a + b M + c M^2). 'TFLOPs @L/CR' "
                  "keeps L / (paper's Avg CR) tokens every step;",
                  "'M for paper' is the mean M whose cost equals the paper's TFLOPs/img.",
                  f"{'model':32s} {'params M':>9s} {'paper':>7s} {'diff':>8s} {'L/CR':>7s} {'TFLOPs@L/CR':>12s} "
                  f"{'paper':>7s} {'M for paper':>12s}"]
        for r in dc:
            lines.append(f"{r['name']:32s} {r['params']:9.1f} {r['paper_params']:7.0f} "
                         f"{_rel(r['params'], r['paper_params']):>8s} {r['kept_at_paper_cr']:7.1f} "
                         f"{r['tflops']:12.2f} {r['paper_tflops']:7.2f} {r['kept_for_paper_tflops']:12.1f}")
        for r in dc:
            lines.append(f"  {r['name']}: forward FLOPs = {format_coeffs(r['coeffs'])}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------

class FlopsError(ValueError):
    """A bad command line or input file (printed as one line by main_guard)."""
    user_error = True


def read_kept_json(path: str) -> list:
    """`kept_tokens` of a sample_ddp.py JSON: per sampling step, the kept count of every model row
    (conditional rows, then unconditional rows under CFG)."""
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise FlopsError(f"--from-json {path}: cannot read it as JSON ({e})") from None
    counts = data.get("kept_tokens") if isinstance(data, dict) else None
    if not isinstance(counts, list) or not counts or not all(isinstance(s, list) and s for s in counts):
        raise FlopsError(f"--from-json {path}: expected a key 'kept_tokens' holding a list over sampling steps "
                         "of non-empty lists of per-row kept counts")
    if len({len(s) for s in counts}) != 1:
        raise FlopsError(f"--from-json {path}: every step must list the same rows; got row counts "
                         f"{sorted({len(s) for s in counts})}")
    return counts


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Parameters and TFLOPs/img of a DiT or DC-DiT config. Convention of the paper's Table 1: "
                    "FLOPs of one forward at batch 1 (torch FlopCounterMode, 2 FLOPs per multiply-add of "
                    "matmuls, convolutions and attention) x sampling steps (250) x 2 when CFG is on. "
                    "A DC-DiT's cost depends on its kept tokens M: pass --kept-tokens M, or --from-json with the "
                    "per-step, per-row kept counts of a sample_ddp.py run; with neither, M = L / N is assumed.")
    add_config_args(parser)
    parser.add_argument("--kept-tokens", type=int, default=None, metavar="M",
                        help="DC-DiT: kept tokens per forward (same for every step and row)")
    parser.add_argument("--from-json", default=None, metavar="PATH",
                        help="DC-DiT: a sample_ddp.py JSON whose 'kept_tokens' lists, per step, every row's kept count")
    parser.add_argument("--steps", type=int, default=None,
                        help=f"sampling steps (default {DEFAULT_STEPS}; with --from-json the JSON's step count)")
    parser.add_argument("--no-cfg", action="store_true", help="one forward per step and image (no guidance)")
    parser.add_argument("--table1", action="store_true",
                        help="paper Table 1: our params and TFLOPs/img next to the paper's, DiT baselines and DC-DiT")
    parser.add_argument("--components", action="store_true",
                        help="also split TFLOPs/img by part of the model (key 'tflops_by_component' in --json)")
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON instead of text")
    return parser


def _single(args) -> dict:
    cfg = config_from_args(args)
    model = build_model(cfg)
    cfg_on = not args.no_cfg
    out = dict(model=cfg.model.name, config=args.config, params=count_params(model) / 1e6, cfg=cfg_on)
    if isinstance(model, DiT):
        if args.kept_tokens is not None or args.from_json:
            raise FlopsError(f"--kept-tokens / --from-json apply to DC-DiT models; {cfg.model.name} has fixed patches")
        steps = args.steps or DEFAULT_STEPS
        flops = forward_flops(model)
        out.update(steps=steps, forward_flops=flops, tflops=flops * steps * (2 if cfg_on else 1) / 1e12)
        if args.components:
            out["tflops_by_component"] = tflops_per_image_by_component(model, steps=steps, cfg=cfg_on)
        return out
    if args.kept_tokens is not None and args.from_json:
        raise FlopsError("pass either --kept-tokens or --from-json, not both")
    L = model.grid[0] * model.grid[1]
    coeffs = dcdit_flops_coeffs(model)
    out.update(coeffs=list(coeffs), tokens=L)
    if args.from_json:
        counts = read_kept_json(args.from_json)
        if args.steps is not None and args.steps != len(counts):
            raise FlopsError(f"--steps {args.steps} disagrees with the {len(counts)} steps in {args.from_json}")
        try:
            tflops = tflops_from_counts(coeffs, counts, cfg=cfg_on)
        except ValueError as e:
            raise FlopsError(f"--from-json {args.from_json}: {e}") from None
        arr = np.asarray(counts, dtype=np.float64)
        out.update(steps=len(counts), rows=arr.shape[1], mean_kept=float(arr.mean()), tflops=tflops)
        if args.components:
            out["tflops_by_component"] = tflops_by_component(component_coeffs(model), counts, cfg=cfg_on)
        return out
    kept = args.kept_tokens if args.kept_tokens is not None else round(L / cfg.model.downsample_factor)
    if not 1 <= kept <= L:
        raise FlopsError(f"--kept-tokens must lie in [1, L={L}], got {kept}")
    steps = args.steps or DEFAULT_STEPS
    flops = quadratic(coeffs, kept)
    out.update(steps=steps, kept=kept, kept_source="--kept-tokens" if args.kept_tokens is not None else "L / N",
               forward_flops=flops, tflops=flops * steps * (2 if cfg_on else 1) / 1e12)
    if args.components:
        out["tflops_by_component"] = tflops_per_image_by_component(model, kept, steps=steps, cfg=cfg_on)
    return out


def format_components(parts: dict, total: float) -> list:
    """Lines of a component table: TFLOPs/img and share of `total` for each part, then their sum."""
    lines = [f"  {'component':12s} {'TFLOPs/img':>11s} {'share':>7s}"]
    lines += [f"  {name:12s} {v:11.4g} {v / total:7.2%}" for name, v in parts.items()]
    lines.append(f"  {'sum':12s} {sum(parts.values()):11.4g} {sum(parts.values()) / total:7.2%}")
    return lines


def _format_single(r: dict) -> str:
    lines = [f"{r['model']}: {r['params']:.2f}M parameters"]
    mult = f"x {r['steps']} steps" + (" x 2 (CFG)" if r["cfg"] else "")
    if "coeffs" in r:
        lines.append(f"forward FLOPs per sample = {format_coeffs(r['coeffs'])} (L = {r['tokens']} tokens)")
        if "rows" in r:
            lines.append(f"kept tokens from JSON: {r['steps']} steps x {r['rows']} rows, mean M = {r['mean_kept']:.1f}")
            lines.append(f"TFLOPs/img: {r['tflops']:.3f} (sum over steps and rows / images)")
        else:
            lines.append(f"M = {r['kept']} ({r['kept_source']}): forward {r['forward_flops'] / 1e9:.3f} GFLOPs")
    else:
        lines.append(f"forward {r['forward_flops'] / 1e9:.3f} GFLOPs")
    if "rows" not in r:
        lines.append(f"TFLOPs/img: {r['tflops']:.3f} (forward {mult})")
    if "tflops_by_component" in r:
        lines += format_components(r["tflops_by_component"], r["tflops"])
    return "\n".join(lines)


@main_guard
def main(argv: Optional[Sequence[str]] = None) -> None:
    args = _parser().parse_args(argv)
    if args.steps is not None and args.steps < 1:
        raise FlopsError(f"--steps must be >= 1, got {args.steps}")
    if args.table1:
        if args.config or args.kept_tokens is not None or args.from_json or args.overrides or args.components:
            raise FlopsError("--table1 uses the Table 1 configs; drop --config, overrides, --kept-tokens, --from-json, "
                             "--components")
        steps = args.steps or DEFAULT_STEPS
        rows = table1_dit_rows(steps) + table1_dcdit_rows(steps)
        print(json.dumps(rows, indent=1) if args.json else format_table1(rows))
        return
    if not args.config:
        raise FlopsError("pass --config PATH (or --table1)")
    result = _single(args)
    print(json.dumps(result, indent=1) if args.json else _format_single(result))


if __name__ == "__main__":
    main()
