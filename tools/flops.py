"""Parameters and TFLOPs per image, in the paper's convention (Table 1), for DiT and DC-DiT.

Convention (paper §4, Table 1): count one forward pass at batch 1 with torch's FlopCounterMode,
which charges 2 FLOPs per multiply-add of every matmul, convolution and attention product and nothing
for element-wise work (norms, activations, softmax); then TFLOPs/img = forward FLOPs x sampling steps
(250, DDPM) x 2 when classifier-free guidance runs a conditional and an unconditional row per image.

DC-DiT's cost depends on M, the tokens its inner blocks keep. For a fixed M every layer has a fixed
shape, so the forward FLOPs per sample are exactly a + b M + c M^2: the encoder, router, residual
path and decoder run on all L tokens (a), the inner blocks' linear layers are linear in M (b), and
attention (QK^T and AV: 4 M^2 D per block) plus the de-chunking kernel products (2 M^2 (D + 1)) are
quadratic (c). `dcdit_flops_coeffs` reads a, b, c off exact counts at three values of M and checks
them on a fourth; `tflops_from_counts` then prices the per-step, per-row kept counts a sampling run
actually produced (with Lite-CFG the cheaper unconditional rows are charged as run).

DyDiT (paper §4.5, models/dydit.py) gates heads, MLP channel groups and MLP tokens per sample inside
the inner blocks. Its cost per model row is the DC-DiT's a + b M + c M^2 with every inner block's static
cost replaced by its dynamic cost from the gate decisions (`dydit_row_flops`); `count_flops` counts an
actual forward, values and all, which is how the tests show that the sliced inference path really skips
that work.

Counting is fast for any size: the model runs on the meta device (DiT) or, where chunking needs real
token counts on the host (DC-DiT), on CPU with every FLOP-carrying op replaced by a zero tensor of
the right shape (`_ShapeOnly`): FLOPs depend on shapes, never on values.

    python tools/flops.py --config configs/baselines/DiT-XL-2-isoflop.yaml
    python tools/flops.py --config configs/DCDiT-B-N4.yaml --kept-tokens 256
    python tools/flops.py --config configs/DCDiT-B-N4.yaml --from-json samples/run.json
    python tools/flops.py --table1 [--json]
"""
import argparse
import copy
import json
import math
import os
from contextlib import contextmanager
from fractions import Fraction
from typing import Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map
from torch.utils.flop_counter import FlopCounterMode, flop_registry

from config import add_config_args, config_from_args, load_config, main_guard
from models import DCDiT, DiT, create_model
from models.dydit import BlockDims, DyDiTInfo, block_flops, dydit_blocks, dydit_execution
from models.dydit import static_block_flops
from models.routing import RouterOutput

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository, where configs/ lives

DEFAULT_STEPS = 250  # paper §4: DDPM sampling with 250 steps

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
# Counting machinery
# ----------------------------------------------------------------------------------------------------

aten = torch.ops.aten


def _attention_flops(query_shape, key_shape, value_shape) -> int:
    """QK^T and AV for (B, H, Mq, Dh) queries against Mk keys: 2 B H Mq Mk (Dh + Dv)."""
    b, h, mq, dh = query_shape
    mk, dv = key_shape[-2], value_shape[-1]
    return 2 * b * h * mq * mk * (dh + dv)


def _cpu_attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return _attention_flops(query_shape, key_shape, value_shape)


def _cpu_attention_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None,
                                  **kwargs) -> int:
    # dV = P^T dO, dP = dO V^T, dQ = dS K, dK = dS^T Q: twice the forward's two products.
    return 2 * _attention_flops(query_shape, key_shape, value_shape)


# FlopCounterMode knows the CUDA attention kernels but not PyTorch's fused CPU kernel, which every
# SDPA call on CPU dispatches to (masked or not): without these entries attention would count as 0.
_EXTRA_FORMULAS = {
    aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops,
    aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_attention_backward_flops,
}
_FLOP_OPS = set(flop_registry) | set(_EXTRA_FORMULAS)


def flop_counter() -> FlopCounterMode:
    """A FlopCounterMode that also counts the fused CPU attention kernel."""
    return FlopCounterMode(display=False, custom_mapping=_EXTRA_FORMULAS)


class _ShapeOnly(TorchDispatchMode):
    """Replaces every op that carries FLOPs (matmul, conv, attention) by zeros of its output's shape.

    The output shape and strides come from running the op on meta copies of its inputs, so nothing
    is computed. Entered *below* the FlopCounterMode, the counter still sees (and prices) each op;
    the cheap element-wise and indexing work still runs for real, so chunking can read its token
    counts on the host.
    """

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func._overloadpacket not in _FLOP_OPS:
            return func(*args, **kwargs)
        device = next(a.device for a in tree_leaves(args) if isinstance(a, torch.Tensor))
        to_meta = lambda v: v.to("meta") if isinstance(v, torch.Tensor) else v  # noqa: E731
        out = func(*tree_map(to_meta, args), **tree_map(to_meta, kwargs))
        return tree_map(lambda v: torch.zeros_like(v, device=device) if isinstance(v, torch.Tensor) else v, out)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _inputs(model: nn.Module, device) -> tuple:
    """Batch-1 inputs: a zero latent, a mid-range timestep, class 0 (FLOPs do not depend on them)."""
    x = torch.zeros(1, model.in_channels, model.input_size, model.input_size, device=device)  # (1, C, H, W)
    t = torch.full((1,), 500, dtype=torch.long, device=device)                                 # (1,)
    y = torch.zeros(1, dtype=torch.long, device=device)                                        # (1,)
    return x, t, y


@contextmanager
def _eval(model: nn.Module):
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def _count_forward(model: nn.Module) -> int:
    """FLOPs of one batch-1 forward of `model` on its own device (meta included)."""
    device = _device(model)
    with _eval(model), torch.no_grad(), _ShapeOnly(), flop_counter() as counter:
        model(*_inputs(model, device))
    return counter.get_total_flops()


def count_params(model: nn.Module) -> int:
    """Every parameter, frozen ones included (DiT's pos_embed), as DiT's train.py counts them."""
    return sum(p.numel() for p in model.parameters())


def materialize(model: nn.Module) -> nn.Module:
    """A CPU copy of a meta-device model with zero weights (for counting: values never matter).

    Chunking reads token counts on the host, which meta tensors cannot give; a model already on a
    real device is returned as is.
    """
    if _device(model).type != "meta":
        return model
    real = copy.deepcopy(model).to_empty(device="cpu")
    with torch.no_grad():
        for tensor in list(real.parameters()) + list(real.buffers()):
            tensor.zero_()
    return real


class FixedCountRouter(nn.Module):
    """Runs the model's own router, then keeps exactly `kept` tokens per sample: the highest-p ones.

    Used to measure cost at a chosen M: the real router's work (and, when training, its gradient
    path through `selected`) stays in the step, only the decision is overridden. Ties in p go to
    topk's order; the first and last raster tokens carry p = 1, so they are kept whenever M >= 2.
    """

    def __init__(self, router: nn.Module, kept: int):
        super().__init__()
        self.router = router
        self.kept = int(kept)

    def forward(self, x: torch.Tensor, grid: Tuple[int, int]) -> RouterOutput:
        r = self.router(x, grid)
        B, L = r.prob.shape
        if not 1 <= self.kept <= L:
            raise ValueError(f"kept tokens M must lie in [1, L={L}], got {self.kept}")
        top = r.prob.detach().topk(self.kept, dim=1).indices                      # (B, M)
        mask = torch.zeros_like(r.mask).scatter(1, top, True)                     # (B, L)
        selected = torch.where(mask, r.prob, 1.0 - r.prob)                        # (B, L)
        return RouterOutput(prob=r.prob, mask=mask, natural_mask=mask, selected=selected)


@contextmanager
def forced_kept(model: DCDiT, kept: int, packed: Optional[bool] = None):
    """Temporarily route exactly `kept` tokens per sample (and optionally switch the token layout)."""
    router, layout = model.router, model.packed
    model.router = FixedCountRouter(router, kept)
    if packed is not None:
        model.packed = packed
    try:
        yield model
    finally:
        model.router, model.packed = router, layout


def _num_tokens(model: DCDiT) -> int:
    H, W = model.grid
    return H * W


# ----------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------

def forward_flops(model: nn.Module, kept: Optional[int] = None) -> int:
    """FLOPs of one forward at batch 1. DiT: `kept` is ignored. DC-DiT: `kept` = M is required.

    A DC-DiT runs with exactly M kept tokens and the padded attention layout: at batch 1 there is no
    padding, so the math is the packed path's, while attention goes through one SDPA call that the
    counter prices whatever kernel the device picks (flash-attn's varlen kernel would not be seen).
    A DC-DiT with DyDiT gates is counted as the DC-DiT it composes with (every gate on, no routers);
    its dynamic cost comes from `dydit_row_flops` and the gate decisions.
    """
    if isinstance(model, DCDiT):
        if kept is None:
            raise ValueError("forward_flops: a DC-DiT's cost depends on the kept-token count; pass kept=M "
                             f"(an int in [1, L={_num_tokens(model)}])")
        real = materialize(model)
        with forced_kept(real, int(kept), packed=False), dydit_execution(real, "static"):
            return _count_forward(real)
    if isinstance(model, DiT):
        return _count_forward(model)
    raise TypeError(f"forward_flops: expected a DiT or a DCDiT, got {type(model).__name__}")


def _fit_quadratic(points: Sequence[Tuple[int, int]]) -> Tuple[int, int, int]:
    """Exact (a, b, c) through three (M, FLOPs) points, in rational arithmetic (Newton's form)."""
    (m1, f1), (m2, f2), (m3, f3) = [(Fraction(m), Fraction(f)) for m, f in points]
    d1 = (f2 - f1) / (m2 - m1)
    d2 = (f3 - f2) / (m3 - m2)
    c = (d2 - d1) / (m3 - m1)
    b = d1 - c * (m1 + m2)
    a = f1 - b * m1 - c * m1 * m1
    if any(v.denominator != 1 for v in (a, b, c)):
        raise RuntimeError(f"FLOPs at M = {[p[0] for p in points]} ({[p[1] for p in points]}) do not fit an "
                           f"integer quadratic: a={a}, b={b}, c={c}")
    return int(a), int(b), int(c)


def dcdit_flops_coeffs(model: DCDiT) -> Tuple[int, int, int]:
    """(a, b, c) with forward FLOPs per sample = a + b M + c M^2, exact.

    Fitted on exact counts at M = 2, L/4, L/2 and asserted to reproduce the count at M = L.
    """
    if not isinstance(model, DCDiT):
        raise TypeError(f"dcdit_flops_coeffs: expected a DCDiT, got {type(model).__name__}")
    L = _num_tokens(model)
    if L < 8:
        raise ValueError(f"dcdit_flops_coeffs needs a grid of at least 8 tokens to fit and check, got L={L}")
    real = materialize(model)
    fit_at, check_at = (2, L // 4, L // 2), L
    coeffs = _fit_quadratic([(m, forward_flops(real, m)) for m in fit_at])
    expected, counted = quadratic(coeffs, check_at), forward_flops(real, check_at)
    if expected != counted:
        raise RuntimeError(f"DC-DiT FLOPs are not quadratic in M: the fit {coeffs} predicts {expected} at "
                           f"M={check_at}, the counter gives {counted}")
    return coeffs


def quadratic(coeffs: Sequence[float], kept):
    """a + b M + c M^2 (M a number or an array)."""
    a, b, c = coeffs
    return a + b * kept + c * kept * kept


def kept_for_flops(coeffs: Sequence[float], flops: float) -> float:
    """The M >= 0 at which a + b M + c M^2 = flops (the quadratic's positive root)."""
    a, b, c = (float(v) for v in coeffs)
    disc = b * b - 4.0 * c * (a - flops)
    if flops < a or disc < 0:
        raise ValueError(f"{flops:.4g} FLOPs is below the cost at M = 0 ({a:.4g}); no kept count reaches it")
    return (-b + math.sqrt(disc)) / (2.0 * c) if c else (flops - a) / b


def tflops_per_image(model: nn.Module, kept: Optional[int] = None, steps: int = DEFAULT_STEPS,
                     cfg: bool = True) -> float:
    """Paper convention: forward FLOPs (batch 1) x steps x 2 with CFG, in TFLOPs."""
    return forward_flops(model, kept) * steps * (2 if cfg else 1) / 1e12


def tflops_from_counts(coeffs: Sequence[float], counts, cfg: bool = True) -> float:
    """TFLOPs per image of a sampling run from its kept counts.

    counts: (steps, rows) kept tokens of every model row run at every step; with CFG the rows are
    the conditional then the unconditional halves, both charged as run (so Lite-CFG's cheaper
    unconditional rows cost less), and n_images = rows / 2; without CFG n_images = rows.
    """
    arr = np.asarray(counts, dtype=np.float64)  # (steps, rows)
    if arr.ndim != 2 or arr.size == 0:
        raise ValueError(f"counts must be a non-empty (steps, rows) array of kept tokens, got shape {arr.shape}")
    if (arr < 1).any():
        raise ValueError(f"kept counts must be >= 1 per row, got a minimum of {arr.min():g}")
    rows = arr.shape[1]
    if cfg and rows % 2:
        raise ValueError(f"with CFG the rows are [cond; uncond] halves, so their number must be even, got {rows}")
    n_images = rows // 2 if cfg else rows
    return float(quadratic(coeffs, arr).sum()) / n_images / 1e12


def build_model(cfg, device: str = "meta") -> nn.Module:
    """The config's model, on the meta device by default (instant, no memory, same parameter shapes)."""
    with torch.device(device):
        return create_model(cfg.model, cfg.dydit)


# ----------------------------------------------------------------------------------------------------
# DyDiT: the FLOPs its gates leave
# ----------------------------------------------------------------------------------------------------

def count_flops(model: nn.Module, *args, **kwargs) -> int:
    """FLOPs of the call model(*args, **kwargs) as it really runs (values and all, on the model's device).

    Unlike forward_flops this executes the forward, so data-dependent work, such as DyDiT's sliced heads,
    channel groups and tokens, is priced as run.
    """
    with torch.no_grad(), flop_counter() as counter:
        model(*args, **kwargs)
    return counter.get_total_flops()


def dydit_dims(model: DCDiT) -> Tuple[BlockDims, int]:
    """(widths of an inner DyDiT block, number of blocks) of a DC-DiT built with dydit=True."""
    blocks = dydit_blocks(model)
    if not blocks:
        raise ValueError(f"dydit_dims: {type(model).__name__} has no DyDiT blocks (build it with dydit=True)")
    return blocks[0].dims, len(blocks)


def dydit_row_flops(coeffs: Sequence[float], dims: BlockDims, kept, heads, groups, tokens) -> np.ndarray:
    """Forward FLOPs of each model row as DyDiT ran it, exact (float64).

    coeffs: the DC-DiT's (a, b, c) (`dcdit_flops_coeffs`, which counts a DyDiT model with its gates on);
    kept (R,) M per row; heads, groups (R, depth) heads and MLP groups kept per inner block; tokens
    (R, depth) tokens that ran each block's MLP. The inner blocks' static cost at M is swapped for the
    gated one (block_flops with the routers), everything else (scaffold, router, dechunk) is unchanged.
    """
    m = np.asarray(kept, dtype=np.float64)                                       # (R,)
    h, g, k = (np.asarray(v, dtype=np.float64) for v in (heads, groups, tokens))  # (R, depth) each
    if h.ndim != 2 or h.shape != g.shape or h.shape != k.shape or h.shape[0] != m.shape[0]:
        raise ValueError(f"dydit_row_flops: expected kept (R,) and heads, groups, tokens (R, depth); got "
                         f"{m.shape}, {h.shape}, {g.shape}, {k.shape}")
    depth = h.shape[1]
    dynamic = block_flops(dims, m[:, None], h, g, k, gated=True).sum(1)          # (R,)
    return quadratic(coeffs, m) - depth * static_block_flops(dims, m) + dynamic


def dydit_info_row_flops(coeffs: Sequence[float], dims: BlockDims, info: DyDiTInfo) -> Tuple[np.ndarray, np.ndarray]:
    """(dynamic, static) forward FLOPs of every row of one forward, from its ChunkInfo.dydit: (R,) each."""
    kept = info.kept.detach().cpu().numpy()
    heads = info.heads.detach().sum(-1).round().cpu().numpy()                    # (R, depth)
    groups = info.groups.detach().sum(-1).round().cpu().numpy()                  # (R, depth)
    tokens = info.tokens.detach().round().cpu().numpy()                          # (R, depth)
    static = quadratic(coeffs, kept.astype(np.float64))                          # (R,)
    if not info.gated:  # "static" execution: the plain DC-DiT ran
        return static, static
    return dydit_row_flops(coeffs, dims, kept, heads, groups, tokens), static


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
        L = _num_tokens(model)
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
        return out
    if args.kept_tokens is not None and args.from_json:
        raise FlopsError("pass either --kept-tokens or --from-json, not both")
    L = _num_tokens(model)
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
        return out
    kept = args.kept_tokens if args.kept_tokens is not None else round(L / cfg.model.downsample_factor)
    if not 1 <= kept <= L:
        raise FlopsError(f"--kept-tokens must lie in [1, L={L}], got {kept}")
    steps = args.steps or DEFAULT_STEPS
    flops = quadratic(coeffs, kept)
    out.update(steps=steps, kept=kept, kept_source="--kept-tokens" if args.kept_tokens is not None else "L / N",
               forward_flops=flops, tflops=flops * steps * (2 if cfg_on else 1) / 1e12)
    return out


def _format_single(r: dict) -> str:
    lines = [f"{r['model']}: {r['params']:.2f}M parameters"]
    mult = f"x {r['steps']} steps" + (" x 2 (CFG)" if r["cfg"] else "")
    if "coeffs" in r:
        lines.append(f"forward FLOPs per sample = {format_coeffs(r['coeffs'])} (L = {r['tokens']} tokens)")
        if "rows" in r:
            lines.append(f"kept tokens from JSON: {r['steps']} steps x {r['rows']} rows, mean M = {r['mean_kept']:.1f}")
            lines.append(f"TFLOPs/img: {r['tflops']:.3f} (sum over steps and rows / images)")
            return "\n".join(lines)
        lines.append(f"M = {r['kept']} ({r['kept_source']}): forward {r['forward_flops'] / 1e9:.3f} GFLOPs")
    else:
        lines.append(f"forward {r['forward_flops'] / 1e9:.3f} GFLOPs")
    lines.append(f"TFLOPs/img: {r['tflops']:.3f} (forward {mult})")
    return "\n".join(lines)


@main_guard
def main(argv: Optional[Sequence[str]] = None) -> None:
    args = _parser().parse_args(argv)
    if args.steps is not None and args.steps < 1:
        raise FlopsError(f"--steps must be >= 1, got {args.steps}")
    if args.table1:
        if args.config or args.kept_tokens is not None or args.from_json or args.overrides:
            raise FlopsError("--table1 uses the Table 1 configs; drop --config, overrides, --kept-tokens, --from-json")
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
