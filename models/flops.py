"""FLOPs and parameters in the paper's convention (Table 1), for DiT and DC-DiT: every formula and counter.

Convention (paper §4, Table 1): one forward pass at batch 1 counted with torch's FlopCounterMode, which
charges 2 FLOPs per multiply-add of every matmul, convolution and attention product and nothing for
element-wise work (norms, activations, softmax); TFLOPs/img = forward FLOPs x sampling steps (250, DDPM)
x 2 when classifier-free guidance runs a conditional and an unconditional row per image.

DC-DiT's cost depends on M, the tokens its inner blocks keep. For a fixed M every layer has a fixed shape,
so the forward FLOPs per sample are exactly a + b M + c M^2: the encoder, router, residual path and
decoder run on all L tokens (a), the inner blocks' linear layers are linear in M (b), and attention
(QK^T and AV: 4 M^2 D per block) plus the de-chunking kernel products (2 M^2 (D + 1)) are quadratic (c).
`dcdit_flops_coeffs` reads a, b, c off exact counts at three values of M and checks them on a fourth;
`tflops_from_counts` then prices the per-step, per-row kept counts a sampling run actually produced
(with Lite-CFG the cheaper unconditional rows are charged as run).

DyDiT (paper §4.5, models/dydit.py) gates heads, MLP channel groups and MLP tokens per sample inside the
inner blocks: `block_flops` is the closed form of one gated block, `dydit_row_flops` swaps it in for the
static blocks, and `count_flops` counts an actual forward, values and all (how the tests show that the
sliced inference path really skips that work).

Counting is fast for any size: the model runs on the meta device (DiT) or, where chunking needs real token
counts on the host (DC-DiT), on CPU with every FLOP-carrying op replaced by a zero tensor of the right shape
(`_ShapeOnly`): FLOPs depend on shapes, never on values. The command line is tools/flops.py.
"""
import copy
import dataclasses
import math
from contextlib import contextmanager
from dataclasses import dataclass
from fractions import Fraction
from typing import TYPE_CHECKING, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map
from torch.utils.flop_counter import FlopCounterMode, flop_registry

from .routing import keep_exactly

if TYPE_CHECKING:
    from .dydit import DyDiTInfo

DEFAULT_STEPS = 250  # paper §4: DDPM sampling with 250 steps

# ----------------------------------------------------------------------------------------------------
# Formulas
# ----------------------------------------------------------------------------------------------------


def attention_flops(pairs: int, head_dim: int, value_dim: int) -> int:
    """QK^T and AV over `pairs` (query, key) pairs summed over heads and samples: 2 pairs (Dh + Dv)."""
    return 2 * pairs * (head_dim + value_dim)


def attention_backward_flops(forward: int) -> int:
    """dV = P^T dO, dP = dO V^T, dQ = dS K, dK = dS^T Q: twice the forward's two products."""
    return 2 * forward


@dataclass(frozen=True)
class BlockDims:
    """Widths of one inner block, for the analytic FLOPs."""
    hidden: int          # D
    heads: int           # H
    head_dim: int        # D / H
    group_width: int     # MLP hidden channels per group, mlp_hidden / H
    router_hidden: int   # D / 16

    @property
    def mlp_hidden(self) -> int:
        return self.group_width * self.heads


def block_flops(dims: BlockDims, kept, heads, groups, tokens, gated: bool = True):
    """Forward FLOPs of one inner block for one sample (this module's convention: 2 per
    multiply-add of matmuls and attention products; norms, activations and softmax are free).

    kept M tokens, heads h kept, groups g kept, tokens K running the MLP: numbers, numpy arrays or tensors
    (differentiable in h, g and K). gated adds DyDiT's routers (two Linear(D, H) on t_emb, the token router
    on all M tokens); gated=False with h = g = H, K = M is the plain DC-DiT block.
        adaLN      12 D^2                     (Linear(D, 6D) on c, once per sample)
        attention  h Dh (8 M D + 4 M^2)       (qkv 6 M D h Dh, proj 2 M h Dh D, QK^T and AV 4 M^2 h Dh)
        MLP        4 K D g Gc                 (fc1 and fc2 on the K tokens and g groups of Gc channels)
        routers    4 D H + M (2 D r + 2 r)    (r = D / 16)
    """
    D, dh, gc, r = dims.hidden, dims.head_dim, dims.group_width, dims.router_hidden
    flops = 12 * D * D + heads * dh * (8 * kept * D + 4 * kept * kept) + 4 * tokens * D * groups * gc
    if gated:
        flops = flops + 4 * D * dims.heads + kept * (2 * D * r + 2 * r)
    return flops


def static_block_flops(dims: BlockDims, kept):
    """block_flops with every gate on and no routers: the DC-DiT block at M = kept."""
    return block_flops(dims, kept, dims.heads, dims.heads, kept, gated=False)


# ----------------------------------------------------------------------------------------------------
# Counting machinery
# ----------------------------------------------------------------------------------------------------

aten = torch.ops.aten


def _sdpa_flops(query_shape, key_shape, value_shape) -> int:
    """An SDPA call on (B, H, Mq, Dh) queries against Mk keys: attention_flops of its B H Mq Mk pairs."""
    b, h, mq, dh = query_shape
    return attention_flops(b * h * mq * key_shape[-2], dh, value_shape[-1])


def _cpu_attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return _sdpa_flops(query_shape, key_shape, value_shape)


def _cpu_attention_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None,
                                  **kwargs) -> int:
    return attention_backward_flops(_sdpa_flops(query_shape, key_shape, value_shape))


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
def evaluating(model: nn.Module):
    """Eval mode for a measurement (dropout and label dropout off), then back to the mode the model had."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def _count_forward(model: nn.Module, by_component: bool = False):
    """FLOPs of one batch-1 forward of `model` on its own device (meta included); with by_component, the
    {component: FLOPs} split of `_components` instead."""
    device = _device(model)
    with evaluating(model), torch.no_grad(), _ShapeOnly(), flop_counter() as counter:
        model(*_inputs(model, device))
    if not by_component:
        return counter.get_total_flops()
    return _components(type(model).__name__, counter.get_total_flops(), counter.get_flop_counts())


# Parts of a model a FLOP is charged to, by where its module sits. Inner (DiT) blocks are split into their
# attention (qkv, QK^T and AV, proj), MLP and adaLN modulation. What runs in the model's own forward outside
# any child module (DC-DiT: chunking, position embeddings, the STE gate) is "chunk" for DC-DiT, "other" for DiT.
DCDIT_COMPONENTS = ("condition", "encoder", "router", "chunk", "inner_stage", "attention", "mlp", "modulation",
                    "inner_norm", "dechunk", "residual", "decoder", "final_layer")
DIT_COMPONENTS = ("condition", "patchify", "attention", "mlp", "modulation", "final_layer", "other")
_CHILD_COMPONENT = {"stage1": "inner_stage", "t_embedder": "condition", "y_embedder": "condition", "encoder": "encoder", "router": "router",
                    "inner_norm": "inner_norm", "dechunker": "dechunk", "residual_proj": "residual",
                    "decoder": "decoder", "final_layer": "final_layer", "x_embedder": "patchify"}
_BLOCK_COMPONENT = {"attn": "attention", "mlp": "mlp", "adaLN_modulation": "modulation"}
# The DCDiT stage method (models/dc_dit.py) that runs each DC-DiT component, so FLOPs can sit beside the time
# each stage takes (tools/bench.py's shares section).
DCDIT_STAGE_OF = {"condition": "condition", "encoder": "encode", "router": "route", "chunk": "chunk",
                  "inner_stage": "process_two_stage",
                  "attention": "process", "mlp": "process", "modulation": "process", "inner_norm": "process",
                  "dechunk": "dechunk", "residual": "decode", "decoder": "decode", "final_layer": "decode"}


def _components(root: str, total: int, counts: dict) -> dict:
    """{component: FLOPs} from FlopCounterMode's per-module counts (each module's count includes its children).

    Reads each first-level child (and each inner block's attn / mlp / adaLN_modulation) once; whatever is left
    of the total ran in the root's own code. The values sum to the total exactly, by construction."""
    names = DCDIT_COMPONENTS if root == "DCDiT" else DIT_COMPONENTS
    out = dict.fromkeys(names, 0)
    for module, ops in counts.items():
        parts = module.split(".")
        if parts[0] != root or len(parts) < 2:
            continue
        flops = sum(ops.values())
        if parts[1] == "blocks":
            if len(parts) == 4 and parts[3] in _BLOCK_COMPONENT:
                out[_BLOCK_COMPONENT[parts[3]]] += flops
        elif parts[1] in _CHILD_COMPONENT and not any(".".join(parts[:k]) in counts for k in range(2, len(parts))):
            # The outermost module that ran: a child called whole, or the parts of one whose methods are called
            # one by one (the inner stage's encoder blocks, router, ...), each counted once.
            out[_CHILD_COMPONENT[parts[1]]] += flops
    blocks = sum(sum(ops.values()) for m, ops in counts.items() if m.split(".")[:2] == [root, "blocks"]
                 and len(m.split(".")) == 3)
    block_parts = out["attention"] + out["mlp"] + out["modulation"]
    if blocks != block_parts:
        raise RuntimeError(f"inner blocks count {blocks} FLOPs but attention + mlp + modulation give {block_parts}: "
                           f"a block has work outside those three")
    rest = "chunk" if root == "DCDiT" else "other"
    out[rest] += total - sum(out.values())
    return out


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


def _num_tokens(model) -> int:
    H, W = model.grid
    return H * W


# ----------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------

def forward_flops(model: nn.Module, kept=None) -> int:
    """FLOPs of one forward at batch 1. DiT: `kept` is ignored. DC-DiT: `kept` = M is required.

    A DC-DiT runs with exactly M kept tokens and the padded attention layout: at batch 1 there is no
    padding, so the math is the packed path's, while attention goes through one SDPA call that the
    counter prices whatever kernel the device picks (flash-attn's varlen kernel would not be seen).
    A DC-DiT with DyDiT gates is counted as the DC-DiT it composes with (every gate on, no routers);
    its dynamic cost comes from `dydit_row_flops` and the gate decisions.
    """
    from .dc_dit import DCDiT
    from .dit import DiT
    from .dydit import dydit_execution
    if isinstance(model, DCDiT):
        if kept is None:
            raise ValueError("forward_flops: a DC-DiT's cost depends on the kept-token count; pass kept=M "
                             f"(an int in [1, L={_num_tokens(model)}]; (M0, M1) for a two-stage model)")
        real = materialize(model)
        with _keep(real, kept), dydit_execution(real, "static"):
            return _count_forward(real)
    if isinstance(model, DiT):
        return _count_forward(model)
    raise TypeError(f"forward_flops: expected a DiT or a DCDiT, got {type(model).__name__}")


@contextmanager
def _keep(model: nn.Module, kept):
    """Exactly `kept` = M tokens per sample (padded layout: at batch 1 the packed path's maths); for a two-stage
    model `kept` = (M0, M1), the tokens each stage keeps."""
    two_stage = getattr(model, "stage1", None) is not None
    if two_stage != isinstance(kept, (tuple, list)):
        raise ValueError(f"kept={kept!r}: expected " + ("(M0, M1), the tokens each stage keeps, for a two-stage model"
                                                        if two_stage else "one token count M"))
    if not two_stage:
        with keep_exactly(model, int(kept), packed=False):
            yield model
        return
    from .hierarchy import keep_exactly_inner
    m0, m1 = (int(k) for k in kept)
    if not 1 <= m1 <= m0:
        raise ValueError(f"kept=(M0, M1)={kept!r}: the inner stage keeps at most what stage 0 kept (1 <= M1 <= M0)")
    with keep_exactly(model, m0, packed=False), keep_exactly_inner(model, m1):
        yield model


def component_flops(model: nn.Module, kept=None) -> dict:
    """forward_flops split by part of the model, {component: FLOPs}, summing exactly to forward_flops(model, kept)."""
    from .dc_dit import DCDiT
    from .dit import DiT
    from .dydit import dydit_execution
    if isinstance(model, DCDiT):
        if kept is None:
            raise ValueError("component_flops: a DC-DiT's cost depends on the kept-token count; pass kept=M")
        real = materialize(model)
        with _keep(real, kept), dydit_execution(real, "static"):
            return _count_forward(real, by_component=True)
    if isinstance(model, DiT):
        return _count_forward(model, by_component=True)
    raise TypeError(f"component_flops: expected a DiT or a DCDiT, got {type(model).__name__}")


def stage_flops(components: dict) -> dict:
    """A DC-DiT's component_flops summed by the stage method that runs each part: {stage: FLOPs}, in the
    order DCDiT.forward calls the stages."""
    out: dict = {}
    for name in DCDIT_COMPONENTS:
        if name == "inner_stage" and not components.get(name):
            continue  # a single-stage model has no process_two_stage
        stage = DCDIT_STAGE_OF[name]
        out[stage] = out.get(stage, 0) + components[name]
    return out


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


def dcdit_flops_coeffs(model: nn.Module) -> Tuple[int, int, int]:
    """(a, b, c) with forward FLOPs per sample = a + b M + c M^2, exact.

    Fitted on exact counts at M = 2, L/4, L/2 and asserted to reproduce the count at M = L.
    """
    from .dc_dit import DCDiT
    if not isinstance(model, DCDiT):
        raise TypeError(f"dcdit_flops_coeffs: expected a DCDiT, got {type(model).__name__}")
    if model.stage1 is not None:
        return two_stage_coeffs(model)
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


@dataclass(frozen=True)
class TwoStageCoeffs:
    """Forward FLOPs per sample of a two-stage DC-DiT: a + b0 M0 + c0 M0^2 + b1 M1 + c1 M1^2 + d M0 M1, with M0 the
    tokens stage 0 keeps (the inner stage's encoder, router and decoder run on them) and M1 the inner blocks'."""
    a: int
    b0: int
    c0: int
    b1: int
    c1: int
    d: int

    @staticmethod
    def monomials(m0, m1) -> tuple:
        return (1, m0, m0 * m0, m1, m1 * m1, m0 * m1)

    def __call__(self, m0, m1):
        return sum(c * x for c, x in zip(dataclasses.astuple(self), self.monomials(m0, m1)))


def _solve_exact(rows: list, rhs: list) -> list:
    """Gaussian elimination in rational arithmetic: the exact solution of rows x = rhs (square, non-singular)."""
    n = len(rows)
    a = [[Fraction(v) for v in row] + [Fraction(b)] for row, b in zip(rows, rhs)]
    for col in range(n):
        pivot = next(r for r in range(col, n) if a[r][col] != 0)
        a[col], a[pivot] = a[pivot], a[col]
        for r in range(n):
            if r != col and a[r][col] != 0:
                f = a[r][col] / a[col][col]
                a[r] = [x - f * y for x, y in zip(a[r], a[col])]
    return [a[i][n] / a[i][i] for i in range(n)]


def _two_stage_points(L: int) -> tuple:
    """(M0, M1) fitting points (six, the monomials independent) and a check point; M1 <= M0 <= L."""
    q, h = max(L // 4, 4), max(L // 2, 8)
    return [(4, 2), (q, 2), (h, 2), (h, q // 2), (h, q), (q, q // 2)], (L, h)


def _fit_two_stage(points: list, flops: list, what: str) -> TwoStageCoeffs:
    sol = _solve_exact([TwoStageCoeffs.monomials(m0, m1) for m0, m1 in points], flops)
    if any(v.denominator != 1 for v in sol):
        raise RuntimeError(f"{what}: FLOPs at (M0, M1) = {points} do not fit an integer polynomial: {sol}")
    return TwoStageCoeffs(*(int(v) for v in sol))


def two_stage_coeffs(model: nn.Module) -> TwoStageCoeffs:
    """The exact TwoStageCoeffs of a two-stage DC-DiT, fitted on six (M0, M1) and checked on a seventh."""
    real = materialize(model)
    points, check = _two_stage_points(_num_tokens(model))
    coeffs = _fit_two_stage(points, [forward_flops(real, p) for p in points], "two-stage DC-DiT")
    if coeffs(*check) != forward_flops(real, check):
        raise RuntimeError(f"two-stage DC-DiT FLOPs are not {coeffs} at (M0, M1) = {check}")
    return coeffs


def price(coeffs, kept):
    """Forward FLOPs per row at its kept tokens: a + b M + c M^2 for (a, b, c), or, for TwoStageCoeffs, kept is the
    pair (M1, M0) of the inner and stage-0 counts (numbers or arrays)."""
    if isinstance(coeffs, TwoStageCoeffs):
        m1, m0 = kept
        return coeffs(m0, m1)
    return quadratic(coeffs, kept)


def component_coeffs(model: nn.Module) -> dict:
    """{component: (a, b, c)} of a DC-DiT: each part's forward FLOPs are a + b M + c M^2 too (fitted exactly as
    dcdit_flops_coeffs, checked at M = L), and the parts' coefficients add up to the model's. A two-stage model's
    parts get TwoStageCoeffs, fitted the same way."""
    if getattr(model, "stage1", None) is not None:
        real = materialize(model)
        points, check = _two_stage_points(_num_tokens(model))
        counts = [component_flops(real, p) for p in points]
        out = {name: _fit_two_stage(points, [c[name] for c in counts], f"component {name}") for name in counts[0]}
        at = component_flops(real, check)
        for name, coeffs in out.items():
            if coeffs(*check) != at[name]:
                raise RuntimeError(f"component {name}: FLOPs are not {coeffs} at (M0, M1) = {check}")
        return out
    L = _num_tokens(model)
    real = materialize(model)
    fit_at = (2, L // 4, L // 2)
    counts = [component_flops(real, m) for m in fit_at]
    out = {name: _fit_quadratic([(m, c[name]) for m, c in zip(fit_at, counts)]) for name in counts[0]}
    check = component_flops(real, L)
    for name, coeffs in out.items():
        if quadratic(coeffs, L) != check[name]:
            raise RuntimeError(f"component {name}: FLOPs are not quadratic in M ({coeffs} at M={L} vs {check[name]})")
    return out


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


def tflops_per_image_by_component(model: nn.Module, kept: Optional[int] = None, steps: int = DEFAULT_STEPS,
                                  cfg: bool = True) -> dict:
    """tflops_per_image split by part of the model: {component: TFLOPs/img}, from component_flops at a fixed cost
    per forward (a DiT, or a DC-DiT at M = kept every step), summing to tflops_per_image to float rounding."""
    per_image = steps * (2 if cfg else 1)
    return {name: flops * per_image / 1e12 for name, flops in component_flops(model, kept).items()}


def tflops_by_component(component_coeffs: dict, counts, cfg: bool = True) -> dict:
    """tflops_from_counts for each part: {component: TFLOPs/img}, summing to tflops_from_counts of the model."""
    return {name: tflops_from_counts(coeffs, counts, cfg) for name, coeffs in component_coeffs.items()}


def _counts(coeffs, counts) -> tuple:
    """(the inner counts as a (steps, rows) float array, what `price` takes): for TwoStageCoeffs, counts is the pair
    (inner counts, stage-0 counts) of equal shapes."""
    pair = isinstance(coeffs, TwoStageCoeffs)
    if pair and not (isinstance(counts, (tuple, list)) and len(counts) == 2):
        raise ValueError("a two-stage model's kept counts are a pair: (inner counts, stage-0 counts), each (steps, rows)")
    arrays = [np.asarray(c, dtype=np.float64) for c in (counts if pair else (counts,))]
    for arr in arrays:
        if arr.ndim != 2 or arr.size == 0:
            raise ValueError(f"counts must be a non-empty (steps, rows) array of kept tokens, got shape {arr.shape}")
        if (arr < 1).any():
            raise ValueError(f"kept counts must be >= 1 per row, got a minimum of {arr.min():g}")
    if pair and arrays[0].shape != arrays[1].shape:
        raise ValueError(f"inner and stage-0 counts differ in shape: {arrays[0].shape} vs {arrays[1].shape}")
    return arrays[0], (tuple(arrays) if pair else arrays[0])


def tflops_from_counts(coeffs: Sequence[float], counts, cfg: bool = True) -> float:
    """TFLOPs per image of a sampling run from its kept counts.

    counts: (steps, rows) kept tokens of every model row run at every step; with CFG the rows are
    the conditional then the unconditional halves, both charged as run (so Lite-CFG's cheaper
    unconditional rows cost less), and n_images = rows / 2; without CFG n_images = rows.
    """
    arr, both = _counts(coeffs, counts)
    rows = arr.shape[1]
    if cfg and rows % 2:
        raise ValueError(f"with CFG the rows are [cond; uncond] halves, so their number must be even, got {rows}")
    n_images = rows // 2 if cfg else rows
    return float(price(coeffs, both).sum()) / n_images / 1e12


def tflops_per_step(coeffs: Sequence[float], counts, cfg: bool = True) -> np.ndarray:
    """(steps,) TFLOPs per image spent at each sampling step, priced as tflops_from_counts (whose total is their
    sum): the step's rows a + b M + c M^2 summed, over the images they belong to."""
    tflops_from_counts(coeffs, counts, cfg)     # the same checks of shape, counts and CFG halves
    arr, both = _counts(coeffs, counts)
    n_images = arr.shape[1] // 2 if cfg else arr.shape[1]
    return price(coeffs, both).sum(1) / n_images / 1e12  # (steps,)


def build_model(cfg, device: str = "meta") -> nn.Module:
    """The config's model, on the meta device by default (instant, no memory, same parameter shapes)."""
    with torch.device(device):
        from . import create_model
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


def dydit_dims(model: nn.Module) -> Tuple[BlockDims, int]:
    """(widths of an inner DyDiT block, number of blocks) of a DC-DiT built with dydit=True."""
    from .dydit import dydit_blocks
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


def dydit_info_row_flops(coeffs: Sequence[float], dims: BlockDims, info: "DyDiTInfo") -> Tuple[np.ndarray, np.ndarray]:
    """(dynamic, static) forward FLOPs of every row of one forward, from its ChunkInfo.dydit: (R,) each."""
    kept = info.kept.detach().cpu().numpy()
    heads = info.heads.detach().sum(-1).round().cpu().numpy()                    # (R, depth)
    groups = info.groups.detach().sum(-1).round().cpu().numpy()                  # (R, depth)
    tokens = info.tokens.detach().round().cpu().numpy()                          # (R, depth)
    static = quadratic(coeffs, kept.astype(np.float64))                          # (R,)
    if not info.gated:  # "static" execution: the plain DC-DiT ran
        return static, static
    return dydit_row_flops(coeffs, dims, kept, heads, groups, tokens), static
