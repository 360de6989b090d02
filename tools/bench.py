"""DC-DiT performance benchmark: one command, every measure, the ratios and their targets printed last as one table.

Sections (docs/performance.md gives each protocol in full):
  train     training step (forward + backward + AdamW) of DC-DiT-<size> N=4, the FLOP-matched DiT of Table 1
            and the public DiT-<size>/2: images/s and FLOPs; DC-DiT's time over DiT-<size>/2's next to their
            FLOPs ratio, and against the authors' release (RELEASE below: B on CPU).
  sample    a CFG sampling step at tail-drop f = 0, 0.3, 0.6: measured speed-up against the FLOPs speed-up.
  shares    time share of each DCDiT stage method (condition, encode, route, chunk, process, dechunk, decode)
            in a DC-DiT training step, next to its share of the forward FLOPs.
  packed    packed vs padded attention layout with equal and with widely varying kept counts per sample.
  memory    peak memory of one training step of each model, each in a fresh process.
  compile   torch.compile(dynamic=True) against eager, with the graph breaks it finds.
  tf32      training steps of DC-DiT and the public DiT with fp32 matmuls in full fp32 against TF32 (train.tf32):
            under bf16 autocast only the router's and de-chunking's fp32 arithmetic changes.
  adamw     training steps of DC-DiT and the public DiT with AdamW's foreach against its fused implementation
            (train.fused_adamw, on by default on CUDA; the train section uses what train.py uses).
  plugback  plug-back (models.chunking.plug_back_index, a two-pass distance transform) against the (B, L, Mmax)
            torch.cdist table it replaced, at equal and varied kept counts.
  elastic   tail dropping over --fractions, with the router of a trained --ckpt when given.
  lite_cfg  Lite-CFG (the unconditional half drops --uncond-fraction of its tokens) against plain CFG.
  dydit     DyDiT's gates (§4.5) on the DC-DiT: fixed gate patterns (or a --ckpt's own gates) against no gates.

DC-DiT runs with its own (fresh) cosine router, but each sample keeps exactly M = L/N tokens, its top-M by
p (models.routing.keep_exactly): a fresh router keeps ~2 tokens, a trained one ~L/N. Repeats are
interleaved across the things a section compares, so machine load hits all of them alike; medians are
reported. CPU runs fp32, CUDA runs under bf16 autocast; the CUDA timers read after a device synchronise.

    python tools/bench.py                    # CPU: B, batch 2 and 8, 5 repeats; CUDA: B and XL, batch 32
    python tools/bench.py --tiny             # tiny models, seconds
    python tools/bench.py --sizes B --batch 8 --sections train shares --json bench.json
    python tools/bench.py --compile          # add the torch.compile section
    python tools/bench.py --sections elastic dydit --ckpt results/000-DCDiT-B/checkpoints/0400000.pt
"""
import argparse
import dataclasses
import gc
import json
import math
import os
import re
import resource
import statistics
import subprocess
import sys
import time
import traceback
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn

from config import Config, DyDiTConfig, ModelConfig, TrainConfig, config_from_dict, load_config, main_guard
from diffusion import create_diffusion
from models import DCDiT, create_model
from models.checkpoint_io import model_state, read_checkpoint
from models.chunking import chunk, grid_coords, plug_back_index
from models.dydit import GATE_PREFIXES, dydit_execution, fix_gates, load_dcdit_weights
from models.flops import (block_flops, component_flops, count_params, dcdit_flops_coeffs, dydit_dims,
                          dydit_info_row_flops, dydit_row_flops, evaluating, forward_flops, quadratic, stage_flops,
                          static_block_flops)
from models.routing import keep_exactly, ratio_loss

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository, where configs/ lives

SECTIONS = ("train", "sample", "shares", "packed", "memory", "compile", "tf32", "adamw", "plugback", "elastic",
            "lite_cfg", "dydit")
# In the default sections on CUDA only (compile: minutes on a CPU; tf32: a no-op there; adamw, plugback: their
# subjects are CUDA kernels).
CUDA_DEFAULT_ONLY = ("compile", "tf32", "adamw", "plugback")
SIZES = ("tiny", "S", "B", "L", "XL")
TAIL_DROPS = (0.0, 0.3, 0.6)             # the sample section's fractions; its target is at 0.6
ELASTIC_FRACTIONS = (0.0, 0.3, 0.6, 0.9)  # the elastic section's default --fractions
UNCOND_FRACTION = 0.9                    # Lite-CFG's default: the unconditional half drops 90% of its tokens
CFG_SCALE = 4.0  # DiT's sampling default; it only scales the guided output, never the cost
SAMPLE_T = 500   # a mid-range timestep for the sampling sections; cost does not depend on it
LR = TrainConfig.lr                               # AdamW, as train.py
RATIO_LOSS_WEIGHT = TrainConfig.ratio_loss_weight  # §3.5, as train.py
MEMORY_TAG = "BENCH_MEMORY "  # prefix of the one line a memory child prints

# The authors' release, measured on a 2-core CPU (2 threads, torch 2.14, fp32):
# forward + backward of the diffusion loss + 0.03 x ratio loss, no optimizer step, median of 5, the
# release's DC-DiT-B forced to exactly 256 kept tokens per sample against the public DiT-B/2 (256 tokens).
# Absolute times drift between machines, so the comparison goes through DiT-B/2 measured in the same run:
# ours / release = (our DC-DiT / DiT-B/2 time) / (release DC-DiT / DiT-B/2 time).
RELEASE = {
    "size": "B", "device": "cpu", "kept": 256,
    "step_s": {2: {"dcdit": 1.59, "dit": 1.30}, 8: {"dcdit": 6.14, "dit": 4.38}},  # batch -> seconds
    "gflops": {"dcdit": 59.1, "dit": 46.0},  # forward FLOPs at batch 1 (ratio 1.285)
}


def _reported(v: float) -> bool:
    return math.isfinite(v) and v > 0


# The targets of docs/performance.md by device type: measure key -> (target as printed, test of the value).
# A CUDA run is judged by the CUDA targets, any other run by the CPU ones; a measure the device has no
# target for is printed without a verdict.
TARGETS: Dict[str, Dict[str, Tuple[str, Callable[[float], bool]]]] = {
    "cpu": {
        "iso_images_per_s": (">= 1", lambda v: v >= 1.0),
        "fwd_bwd_time_over_flops": ("1 +- 0.03", lambda v: abs(v - 1.0) <= 0.03),
        "ours_over_release": ("<= 0.85", lambda v: v <= 0.85),
        "sample_efficiency": (">= 0.85", lambda v: v >= 0.85),
        "overhead_share": ("< 5% (B)", lambda v: v < 0.05),
        "packed_time_ratio": ("1 +- 0.05", lambda v: abs(v - 1.0) <= 0.05),
        "padded_time_ratio": ("> 1 (pays for padding)", lambda v: v > 1.0),
        "compiled_over_eager": ("<= 1", lambda v: v <= 1.0),
    },
    "cuda": {
        "train_time_over_flops": ("<= 1.10", lambda v: v <= 1.10),             # step-time ratio vs FLOPs ratio
        "sample_efficiency": (">= 0.85", lambda v: v >= 0.85),                  # tail drop at f = 0.6
        "packed_time_per_flop": ("1 +- 0.05", lambda v: abs(v - 1.0) <= 0.05),  # unequal vs equal kept counts
        "overhead_share": ("< 5%", lambda v: v < 0.05),                         # route + chunk + dechunk
        "images_per_s": ("reported", _reported),
        "peak_mib": ("reported", _reported),
    },
}

# --tiny: a 16x16 grid (L = 256, M = 64 at N = 4), width 64, 2 inner blocks, 10 classes; DiT patch 2 -> 64 tokens.
TINY = dict(input_size=16, num_classes=10, depth=2, hidden_size=64, num_heads=4)


class BenchError(ValueError):
    user_error = True  # a bad command line or checkpoint: one line, no traceback


# ----------------------------------------------------------------------------------------------------
# Models under test
# ----------------------------------------------------------------------------------------------------

def build(spec: ModelConfig, device, dydit: Optional[DyDiTConfig] = None) -> nn.Module:
    """The model of a ModelConfig on `device` ("meta" for FLOP counting: instant, no memory)."""
    with torch.device(device):
        return create_model(spec, dydit)


def dit_flops_at_depth(spec: ModelConfig, depth: int) -> int:
    return forward_flops(build(dataclasses.replace(spec, depth=depth), "meta"))


def flop_matched_depth(target: float, flops_at: Callable[[int], int]) -> int:
    """The DiT depth whose forward FLOPs come closest to `target` (ties to the shallower one).

    A DiT's FLOPs are affine in depth (every block costs the same), so two counts give the line and the
    two depths around its crossing with the target are the only candidates.
    """
    f1, f2 = flops_at(1), flops_at(2)
    per_block = f2 - f1
    if per_block <= 0:
        raise ValueError(f"DiT FLOPs must grow with depth, got {f1} at depth 1 and {f2} at depth 2")
    exact = (target - (f1 - per_block)) / per_block
    candidates = {max(1, math.floor(exact)), max(1, math.ceil(exact))}
    return min(candidates, key=lambda d: (abs(f1 + (d - 1) * per_block - target), d))


@dataclass
class Contender:
    key: str                # "dcdit" | "iso" (FLOP-matched DiT, Table 1) | "public" (DiT-<size>/2)
    label: str
    spec: ModelConfig
    gflops: float           # forward GFLOPs at batch 1 (DC-DiT at M = L/N)
    model: Optional[nn.Module] = None
    optimizer: Optional[torch.optim.Optimizer] = None

    @property
    def dcdit(self) -> bool:
        return self.key == "dcdit"


def model_specs(size: str):
    """(DC-DiT, public DiT-<size>/2, FLOP-matched DiT or None to pick by FLOPs) model configs."""
    if size == "tiny":
        return (ModelConfig(name="DCDiT-S", encoder_width=16, norm_groups=4, **TINY),
                ModelConfig(name="DiT-S/2", **TINY), None)
    dc = load_config(os.path.join(ROOT, f"configs/DCDiT-{size}-N4.yaml")).model
    public_path = os.path.join(ROOT, f"configs/DiT-{size}-2.yaml")
    public = load_config(public_path).model if os.path.exists(public_path) else ModelConfig(name=f"DiT-{size}/2")
    iso_path = os.path.join(ROOT, f"configs/baselines/DiT-{size}-2-isoflop.yaml")
    iso = load_config(iso_path).model if os.path.exists(iso_path) else None
    return dc, public, iso


class Suite:
    """The three models of one size, their FLOPs, optimizers and the diffusion loss, on one device."""

    def __init__(self, size: str, device: torch.device):
        self.size, self.device = size, device
        dc_spec, public_spec, iso_spec = model_specs(size)
        self.dc_meta = build(dc_spec, "meta")
        self.coeffs = dcdit_flops_coeffs(self.dc_meta)                     # forward FLOPs = a + b M + c M^2
        H, W = self.dc_meta.grid
        self.L, self.N = H * W, self.dc_meta.downsample_factor
        self.kept = round(self.L / self.N)                                 # M = L / N: 256 for B at 256px
        dc_flops = quadratic(self.coeffs, self.kept)
        if iso_spec is None:
            depth = flop_matched_depth(dc_flops, partial(dit_flops_at_depth, public_spec))
            iso_spec = dataclasses.replace(public_spec, depth=depth)
            self.iso_note = (f"FLOP-matched DiT picked here: depth {depth} is closest to DC-DiT's forward FLOPs "
                             f"at M={self.kept} (models.flops.forward_flops)")
        else:
            self.iso_note = f"FLOP-matched DiT from configs/baselines/DiT-{size}-2-isoflop.yaml (paper Table 1)"
        public_depth = len(build(public_spec, "meta").blocks)
        self.contenders = {
            "dcdit": Contender("dcdit", f"DC-DiT-{size} N{self.N:g} (M={self.kept})", dc_spec, dc_flops / 1e9),
            "iso": Contender("iso", f"DiT-{size}/2 depth {iso_spec.depth} (FLOP-matched)", iso_spec,
                             forward_flops(build(iso_spec, "meta")) / 1e9),
            "public": Contender("public", f"DiT-{size}/2 depth {public_depth} (public)", public_spec,
                                forward_flops(build(public_spec, "meta")) / 1e9),
        }
        torch.manual_seed(0)
        for c in self.contenders.values():
            c.model = build(c.spec, device).train()
            c.optimizer = adamw(c.model.parameters(), device)
        self.diffusion = create_diffusion("")
        self.cache: dict = {}  # what several batch sizes share: stage FLOPs, the DyDiT model, a loaded --ckpt

    @property
    def dc(self) -> DCDiT:
        return self.contenders["dcdit"].model

    @property
    def judged_as(self) -> str:
        """Whose targets judge this run: "cuda" or "cpu"."""
        return "cuda" if self.device.type == "cuda" else "cpu"

    def flops_of(self, kept) -> float:
        return float(quadratic(self.coeffs, kept))

    def describe(self) -> dict:
        return {k: dict(label=c.label, params_m=count_params(c.model) / 1e6, gflops=c.gflops,
                        spec=dataclasses.asdict(c.spec)) for k, c in self.contenders.items()}


# ----------------------------------------------------------------------------------------------------
# Data, the training step, timing
# ----------------------------------------------------------------------------------------------------

@dataclass
class Batch:
    x: torch.Tensor      # (B, C, H, W) clean latents
    y: torch.Tensor      # (B,) class labels
    t: torch.Tensor      # (B,) diffusion timesteps
    noise: torch.Tensor  # (B, C, H, W)


def make_batch(spec: ModelConfig, batch: int, num_timesteps: int, device, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    shape = (batch, spec.in_channels, spec.input_size, spec.input_size)
    return Batch(x=torch.randn(shape, generator=g).to(device),                                      # (B, C, H, W)
                 y=torch.randint(0, spec.num_classes, (batch,), generator=g).to(device),           # (B,)
                 t=torch.randint(0, num_timesteps, (batch,), generator=g).to(device),              # (B,)
                 noise=torch.randn(shape, generator=g).to(device))                                 # (B, C, H, W)


def autocast_for(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def training_loss(net, dcdit: bool, n_target: float, diffusion, batch: Batch, device) -> torch.Tensor:
    """Diffusion loss (+ 0.03 x ratio loss for DC-DiT, §3.5), as train.py computes it."""
    def model_fn(x_t, ts, **kw):
        return net(x_t, ts, return_info=True, **kw) if dcdit else net(x_t, ts, **kw)  # (out, ChunkInfo) | out

    with autocast_for(device):
        terms = diffusion.training_losses(model_fn, batch.x, batch.t, dict(y=batch.y), noise=batch.noise)
        loss = terms["loss"].mean()
        if dcdit:
            r = terms["extra"].router
            loss = loss + RATIO_LOSS_WEIGHT * ratio_loss(r.natural_mask, r.prob, n_target)
    return loss


def fwd_bwd(net, dcdit: bool, n_target: float, diffusion, batch: Batch, device) -> None:
    """Forward + backward, no optimizer step: the release comparison's protocol."""
    net.zero_grad(set_to_none=True)
    training_loss(net, dcdit, n_target, diffusion, batch, device).backward()


def adamw(params, device, fused: Optional[bool] = None) -> torch.optim.AdamW:
    """AdamW as train.py builds it (fused kernels on CUDA, train.fused_adamw's default); fused=False: the foreach
    implementation, fused=True: the fused one, on any device."""
    if fused is None:
        fused = torch.device(device).type == "cuda"
    return torch.optim.AdamW(params, lr=LR, weight_decay=0.0, fused=True if fused else None,
                             foreach=None if fused else True)


def train_step(net, optimizer, dcdit: bool, n_target: float, diffusion, batch: Batch, device) -> None:
    """A full training step: zero_grad, forward, backward, AdamW step."""
    fwd_bwd(net, dcdit, n_target, diffusion, batch, device)
    optimizer.step()


def step_fn(suite: Suite, key: str, batch: Batch, optimizer_step: bool, net=None) -> Callable[[], None]:
    """A no-argument callable running one step of contender `key` (optionally through a compiled `net`)."""
    c = suite.contenders[key]
    net = c.model if net is None else net
    if optimizer_step:
        return partial(train_step, net, c.optimizer, c.dcdit, suite.N, suite.diffusion, batch, suite.device)
    return partial(fwd_bwd, net, c.dcdit, suite.N, suite.diffusion, batch, suite.device)


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device) -> float:
    """Wall time of fn(), with the device drained before the clock starts and before it is read."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def measure(jobs: Dict[str, Callable[[], object]], repeats: int, warmup: int, device, title: str,
            setup: Optional[Dict[str, Callable[[], None]]] = None) -> Dict[str, dict]:
    """Time every job `repeats` times, interleaved (job 1, job 2, ..., then again), after `warmup` rounds.

    setup: per job, an untimed call made right before each of its runs (e.g. setting gate patterns)."""
    setup = setup or {}
    for _ in range(warmup):
        for name, fn in jobs.items():
            setup.get(name, lambda: None)()
            fn()
    times: Dict[str, List[float]] = {name: [] for name in jobs}
    for i in range(repeats):
        for name, fn in jobs.items():
            setup.get(name, lambda: None)()
            times[name].append(timed(fn, device))
        print(f"  {title} {i + 1}/{repeats}: " + ", ".join(f"{k} {v[-1]:.4f}s" for k, v in times.items()),
              flush=True)
    return {name: dict(median_s=statistics.median(v), times_s=v) for name, v in times.items()}


# ----------------------------------------------------------------------------------------------------
# DC-DiT's forward as its own stage methods (what the shares section times)
# ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Stage:
    """One DCDiT stage method as DCDiT.forward calls it. `call(model, s)` reads the forward's state s (a dict
    of what earlier stages returned) and returns the entries it adds; `grads` names the entries the training
    step differentiates the stage through (its float tensors become leaves when the stage is timed alone)."""
    name: str
    call: Callable[[DCDiT, dict], dict]
    grads: Tuple[str, ...]


def _process(m: DCDiT, s: dict) -> dict:
    h, dyn = m.process(s["chunks"].tokens, s["c"], s["t_emb"], s["chunks"].layout)  # same shape as tokens
    return dict(h=h, dydit=dyn)


# DCDiT.forward's calls, in its order and with its arguments (no tail dropping or collected blocks). What each
# adds: condition c, t_emb (B, D); encode enc (B, L, D); route r, each field (B, L); chunk chunks.tokens (T, D)
# packed | (B, Mmax, D) padded; process h (same shape); dechunk u (B, L, D) fp32; decode out (B, out, H, W).
STAGES = (
    Stage("condition", lambda m, s: dict(zip(("c", "t_emb"), m.condition(s["t"], s["y"]))), ()),
    Stage("encode", lambda m, s: dict(enc=m.encode(s["x"], s["c"])), ("c",)),
    Stage("route", lambda m, s: dict(r=m.route(s["enc"])), ("enc",)),
    Stage("chunk", lambda m, s: dict(chunks=m.chunk(s["enc"], s["r"])), ("enc",)),
    Stage("process", _process, ("chunks", "c", "t_emb")),
    Stage("dechunk", lambda m, s: dict(u=m.dechunk(s["h"], s["r"], s["chunks"])), ("h", "r")),
    Stage("decode", lambda m, s: dict(out=m.decode(s["u"], s["enc"], s["r"], s["c"])), ("u", "enc", "r", "c")),
)
OVERHEAD = ("route", "chunk", "dechunk")  # what dynamic chunking adds to a DiT: routing, gathering, plug-back


def run_stages(model: DCDiT, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> dict:
    """One forward through STAGES -> the state after every stage; state["out"] is model(x, t, y)."""
    s = dict(x=x, t=t, y=y)
    for stage in STAGES:
        s.update(stage.call(model, s))
    return s


def as_leaf(v):
    """v with its float tensors detached into new leaves that require grad (a dataclass: its tensor fields)."""
    if torch.is_tensor(v):
        return v.detach().requires_grad_(True) if v.is_floating_point() else v
    if dataclasses.is_dataclass(v):
        return dataclasses.replace(v, **{f.name: as_leaf(getattr(v, f.name)) for f in dataclasses.fields(v)
                                         if torch.is_tensor(getattr(v, f.name))})
    return v


def grad_outputs(v) -> List[torch.Tensor]:
    """Every tensor in a stage's result (tuples, dicts, dataclass fields) that carries a gradient."""
    if torch.is_tensor(v):
        return [v] if v.requires_grad else []
    if isinstance(v, dict):
        return [o for item in v.values() for o in grad_outputs(item)]
    if isinstance(v, (tuple, list)):
        return [o for item in v for o in grad_outputs(item)]
    if dataclasses.is_dataclass(v):
        return [o for f in dataclasses.fields(v) for o in grad_outputs(getattr(v, f.name))]
    return []


def stage_fwd_bwd(model: DCDiT, stage: Stage, state: dict) -> None:
    """Forward + backward of one stage alone on the state a step gives it.

    Its `grads` inputs become fresh leaves, so the backward runs through the stage into its parameters and
    those inputs and stops there, where the step's would go on into the earlier stages; the sum of the
    stage's outputs seeds it."""
    model.zero_grad(set_to_none=True)
    leaves = {k: as_leaf(state[k]) for k in stage.grads}
    outs = grad_outputs(stage.call(model, {**state, **leaves}))
    if outs:
        sum(o.float().sum() for o in outs).backward()


# ----------------------------------------------------------------------------------------------------
# Sampling steps and checkpoints (sample, elastic, lite_cfg, dydit)
# ----------------------------------------------------------------------------------------------------

def cfg_inputs(model: DCDiT, batch: int, device):
    """[z; z] latents, [labels; null class] and t = SAMPLE_T: one CFG sampling step's 2B rows."""
    g = torch.Generator().manual_seed(0)
    H, W = model.grid
    z = torch.randn(batch, model.in_channels, H, W, generator=g)                        # (B, C, H, W)
    labels = torch.randint(0, model.y_embedder.num_classes, (batch,), generator=g)      # (B,)
    null = torch.full((batch,), model.y_embedder.num_classes)                           # (B,)
    x = torch.cat([z, z]).to(device)                                                    # (2B, C, H, W)
    y = torch.cat([labels, null]).to(device)                                            # (2B,)
    t = torch.full((2 * batch,), SAMPLE_T, dtype=torch.long, device=device)             # (2B,)
    return x, t, y


def sampling_step(model: DCDiT, x, t, y, device, **kw):
    """One guided step as sample.py runs it (no grad, eval mode set by the caller) -> its ChunkInfo."""
    with torch.no_grad(), autocast_for(device):
        _, info = model.forward_with_cfg(x, t, y, CFG_SCALE, return_info=True, **kw)
    return info


def tail_drop_sweep(model: DCDiT, coeffs, fractions: Sequence[float], batch: int, device, args, title: str) -> dict:
    """Sampling-step time at each tail-drop fraction f, next to the FLOPs of the kept counts the model returns."""
    x, t, y = cfg_inputs(model, batch, device)                                   # (2B, C, H, W), (2B,), (2B,)
    with evaluating(model):
        kept = {f: sampling_step(model, x, t, y, device, tail_drop=f).kept.cpu().double() for f in fractions}
        med = measure({f"f={f:g}": partial(sampling_step, model, x, t, y, device, tail_drop=f) for f in fractions},
                      args.repeats, args.warmup, device, title)
    out = {"times": med}
    flops0 = float(quadratic(coeffs, kept[0.0]).sum())  # summed over the 2B rows
    for f in fractions:
        flops = float(quadratic(coeffs, kept[f]).sum())
        speed = med["f=0"]["median_s"] / med[f"f={f:g}"]["median_s"]
        out[f"f={f:g}"] = dict(mean_kept=float(kept[f].mean()), gflops=flops / 1e9, flops_speedup=flops0 / flops,
                               measured_speedup=speed, efficiency=speed / (flops0 / flops))
    return out


def load_ckpt(path: str, spec: ModelConfig, dydit: bool) -> Tuple[DCDiT, bool]:
    """A training checkpoint's EMA weights (or a bare state dict) in its model, on the CPU in eval mode
    -> (model, whether it holds trained DyDiT gates).

    The model is the one the checkpoint's config names (a bare state dict: `spec`); dydit=True builds it with
    DyDiT's gates, which a DC-DiT checkpoint leaves at their all-on init."""
    ckpt = read_checkpoint(path, "--ckpt", BenchError, "a DC-DiT training checkpoint")
    state, which = model_state(ckpt)
    if state is None:
        raise BenchError(f"--ckpt {path}: {which}; expected a training checkpoint or a state dict")
    saved = ckpt.get("config")
    cfg = config_from_dict(saved) if saved else Config(model=spec)
    gated = any(k.startswith("blocks.") and k.split(".", 2)[-1].startswith(GATE_PREFIXES) for k in state)
    model = create_model(cfg.model, dataclasses.replace(cfg.dydit, enabled=dydit or gated))
    if not isinstance(model, DCDiT):
        raise BenchError(f"--ckpt {path}: model {cfg.model.name} is not a DC-DiT; the elastic and dydit sections "
                         f"need a router")
    if dydit and not gated:
        load_dcdit_weights(model, state, path)
    else:
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as e:
            lines = [line.strip() for line in str(e).splitlines() if line.strip()]
            raise BenchError(f"--ckpt {path} does not fit model {cfg.model.name}: {lines[-1]}") from None
    return model.eval(), gated


# ----------------------------------------------------------------------------------------------------
# Sections: each returns a dict of measured numbers
# ----------------------------------------------------------------------------------------------------

def release_comparison(suite: Suite, batch: int, time_ratio: float, flops_ratio: float) -> dict:
    """Our DC-DiT / DiT-<size>/2 time ratio against the release's at the same batch (B on CPU only)."""
    if suite.size != RELEASE["size"] or suite.device.type != RELEASE["device"] or batch not in RELEASE["step_s"]:
        return dict(available=False, reason="release measured at B on CPU, batch 2 and 8 only")
    step = RELEASE["step_s"][batch]
    release_ratio = step["dcdit"] / step["dit"]
    return dict(available=True, release_time_ratio=release_ratio,
                release_flops_ratio=RELEASE["gflops"]["dcdit"] / RELEASE["gflops"]["dit"],
                ours_over_release=time_ratio / release_ratio, our_flops_ratio=flops_ratio)


def train_section(suite: Suite, batch: Batch, args) -> dict:
    B = batch.x.shape[0]
    jobs = {f"train {k}": step_fn(suite, k, batch, True) for k in suite.contenders}
    jobs.update({f"fwd+bwd {k}": step_fn(suite, k, batch, False) for k in ("dcdit", "public")})
    with keep_exactly(suite.dc, suite.kept):
        med = measure(jobs, args.repeats, args.warmup, suite.device, "train")
    out = {"images_per_s": {}, "gflops": {}, "times": med}
    for k, c in suite.contenders.items():
        out["images_per_s"][k] = B / med[f"train {k}"]["median_s"]
        out["gflops"][k] = c.gflops
    g = out["gflops"]
    out["dcdit_over_iso_images_per_s"] = out["images_per_s"]["dcdit"] / out["images_per_s"]["iso"]
    out["dcdit_over_iso_flops"] = g["dcdit"] / g["iso"]
    out["fwd_bwd_time_ratio"] = med["fwd+bwd dcdit"]["median_s"] / med["fwd+bwd public"]["median_s"]
    out["fwd_bwd_flops_ratio"] = g["dcdit"] / g["public"]
    out["time_over_flops_ratio"] = out["fwd_bwd_time_ratio"] / out["fwd_bwd_flops_ratio"]
    out["train_time_ratio"] = med["train dcdit"]["median_s"] / med["train public"]["median_s"]
    out["train_time_over_flops_ratio"] = out["train_time_ratio"] / out["fwd_bwd_flops_ratio"]
    out["release"] = release_comparison(suite, B, out["fwd_bwd_time_ratio"], out["fwd_bwd_flops_ratio"])
    return out


def sample_section(suite: Suite, batch: Batch, args) -> dict:
    with keep_exactly(suite.dc, suite.kept):
        return tail_drop_sweep(suite.dc, suite.coeffs, TAIL_DROPS, batch.x.shape[0], suite.device, args, "sample")


def shares_section(suite: Suite, batch: Batch, args) -> dict:
    """Each DCDiT stage method timed forward + backward alone on the state the step gives it; "other" is the
    rest of the step. The state comes from one no-grad pass through the same stages on the step's x_t."""
    dc = suite.dc
    if "stage_flops" not in suite.cache:
        suite.cache["stage_flops"] = stage_flops(component_flops(suite.dc_meta, suite.kept))
    flops = suite.cache["stage_flops"]
    with keep_exactly(dc, suite.kept):
        with torch.no_grad(), autocast_for(suite.device):
            x_t = suite.diffusion.q_sample(batch.x, batch.t, noise=batch.noise)  # (B, C, H, W)
            state = run_stages(dc, x_t, batch.t, batch.y)

        def timed_stage(stage: Stage) -> Callable[[], None]:
            def run():
                with autocast_for(suite.device):
                    stage_fwd_bwd(dc, stage, state)
            return run

        jobs = {"step": step_fn(suite, "dcdit", batch, False)}
        jobs.update({stage.name: timed_stage(stage) for stage in STAGES})
        med = measure(jobs, args.repeats, args.warmup, suite.device, "shares")
        # --profile-stages: which kernels a stage's time goes to (one profiled forward + backward after the timing)
        profiles = {stage.name: profile_table(timed_stage(stage), suite.device)
                    for stage in STAGES if stage.name in (getattr(args, "profile_stages", None) or ())}
    for name, table in profiles.items():
        print(f"  profile of stage {name} (forward + backward, one run):\n{table}", flush=True)
    step = med["step"]["median_s"]
    shares = {stage.name: med[stage.name]["median_s"] / step for stage in STAGES}
    shares["other"] = 1.0 - sum(shares.values())
    total = sum(flops.values())
    return dict(times=med, step_s=step, shares=shares, overhead_share=sum(shares[k] for k in OVERHEAD),
                profiles=profiles,
                gflops={k: v / 1e9 for k, v in flops.items()}, flops_shares={k: v / total for k, v in flops.items()},
                overhead_flops_share=sum(flops[k] for k in OVERHEAD) / total)


def profile_table(fn: Callable[[], None], device, rows: int = 15) -> str:
    """torch.profiler's table of one run of fn (after one unprofiled run), the ops with the most self time on the
    device (CUDA) or the CPU first."""
    from torch.profiler import ProfilerActivity, profile
    cuda = device.type == "cuda"
    fn()
    sync(device)
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        fn()
        sync(device)
    return prof.key_averages().table(sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total",
                                     row_limit=rows, max_name_column_width=60)


def varied_counts(batch: int, mean: int, spread: float = 0.75) -> List[int]:
    """Kept counts alternating mean(1 - spread), mean(1 + spread): same total as `mean` everywhere.

    An odd batch ends with one sample at `mean`. With spread 0.75 at B: 64 and 448 tokens around 256.
    """
    low = round(mean * (1.0 - spread))
    pair = [low, 2 * mean - low]
    return [pair[i % 2] for i in range(batch - batch % 2)] + [mean] * (batch % 2)


def packed_section(suite: Suite, batch: Batch, args) -> dict:
    """The same total kept tokens per batch, spread equally or unequally, through both attention layouts."""
    B, M = batch.x.shape[0], suite.kept
    cases = {"equal": [M] * B, "varied": varied_counts(B, M)}
    step = step_fn(suite, "dcdit", batch, False)

    def run(counts, packed):
        with keep_exactly(suite.dc, counts, packed):
            step()

    jobs = {f"{layout} {case}": partial(run, counts, layout == "packed")
            for layout in ("packed", "padded") for case, counts in cases.items()}
    med = measure(jobs, args.repeats, args.warmup, suite.device, "packed")
    # FLOPs the quadratic cost model predicts: packed prices every sample at its own M_b, padded at Mmax.
    flops = {"packed": {case: sum(suite.flops_of(m) for m in counts) for case, counts in cases.items()},
             "padded": {case: B * suite.flops_of(max(counts)) for case, counts in cases.items()}}
    out = dict(counts=cases, times=med)
    for layout in ("packed", "padded"):
        res = out[layout] = dict(equal_s=med[f"{layout} equal"]["median_s"],
                                 varied_s=med[f"{layout} varied"]["median_s"],
                                 flops_ratio=flops[layout]["varied"] / flops[layout]["equal"])
        res["time_ratio"] = res["varied_s"] / res["equal_s"]
        res["time_per_flop_ratio"] = res["time_ratio"] / res["flops_ratio"]
    return out


# -- memory: one training step per model in a fresh process -----------------------------------------

def _current_rss() -> int:
    """Resident set size now, in bytes (Linux /proc; elsewhere the high-water mark so far)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return _max_rss()


def _max_rss() -> int:
    """Peak resident set size of this process image, in bytes.

    Linux: VmHWM of /proc/self/status, the high-water mark of this address space. Not ru_maxrss: the
    kernel carries that across fork and exec, so a child started by a large parent reports the parent's
    peak. Elsewhere ru_maxrss (bytes on macOS).
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def memory_child(job: dict) -> dict:
    """Build one model, run one training step (first step: AdamW state included), report its peak memory."""
    device = torch.device(job["device"])
    spec = ModelConfig(**job["spec"])
    torch.manual_seed(0)
    model = build(spec, device).train()
    optimizer = adamw(model.parameters(), device)
    diffusion = create_diffusion("")
    batch = make_batch(spec, job["batch"], diffusion.num_timesteps, device)
    dcdit = isinstance(model, DCDiT)
    with keep_exactly(model, job["kept"]) if dcdit else nullcontext():
        sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
        else:
            before = _current_rss()
        train_step(model, optimizer, dcdit, getattr(model, "downsample_factor", 0.0), diffusion, batch, device)
        sync(device)
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else _max_rss()
    return dict(before_mib=before / 2**20, peak_mib=peak / 2**20, step_mib=(peak - before) / 2**20,
                params_mib=sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20)


def memory_section(suite: Suite, batch: Batch, args) -> dict:
    B = batch.x.shape[0]
    method = ("torch.cuda.max_memory_allocated after reset_peak_memory_stats, minus memory_allocated before the "
              "step" if suite.device.type == "cuda" else
              "peak RSS (VmHWM) of a fresh process after the step, minus its RSS before the step")
    jobs = {k: dict(spec=dataclasses.asdict(c.spec), batch=B, kept=suite.kept, device=str(suite.device))
            for k, c in suite.contenders.items()}
    # Tiny children are small: run them side by side, one thread each so together they do not oversubscribe
    # the cores (spinning thread pools then slow everything down). Real sizes one at a time (host or GPU memory).
    side_by_side = suite.size == "tiny"
    groups = [list(jobs)] if side_by_side else [[k] for k in jobs]
    env = dict(os.environ, OMP_NUM_THREADS="1") if side_by_side else None
    out = dict(method=method)
    if suite.device.type == "cuda":
        # The children share the GPU with this process: hand back its AdamW state, gradients and cached blocks
        # (the next step rebuilds the state), else an XL child runs out of memory beside three XL models.
        for c in suite.contenders.values():
            c.optimizer.state.clear()
            c.model.zero_grad(set_to_none=True)
        gc.collect()
        torch.cuda.empty_cache()
    for group in groups:
        procs = {k: subprocess.Popen([sys.executable, os.path.abspath(__file__), "--memory-child", json.dumps(jobs[k])],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
                 for k in group}
        for k, proc in procs.items():
            out[k] = read_memory_child(k, proc)
    return out


def read_memory_child(key: str, proc: subprocess.Popen) -> dict:
    stdout, stderr = proc.communicate()
    lines = [ln for ln in stdout.splitlines() if ln.startswith(MEMORY_TAG)]
    if proc.returncode != 0 or not lines:
        tail = (stderr.strip().splitlines() or ["no output"])[-1]
        print(f"  memory {key}: child exited {proc.returncode}: {tail}", flush=True)
        return dict(error=f"child exited {proc.returncode}: {tail}")
    res = json.loads(lines[-1][len(MEMORY_TAG):])
    print(f"  memory {key}: step peak {res['step_mib']:.1f} MiB above {res['before_mib']:.1f} MiB", flush=True)
    return res


# -- compile --------------------------------------------------------------------------------------------

def first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]


def repo_lines(text: str) -> List[str]:
    """`path:line` of every frame of this repository (other than this script) in a Python stack trace."""
    found = []
    for path, line in re.findall(r'File "([^"]+)", line (\d+)', text):
        path = os.path.abspath(path)
        if path.startswith(ROOT + os.sep) and path != os.path.abspath(__file__):
            where = f"{os.path.relpath(path, ROOT)}:{line}"
            if where not in found:
                found.append(where)
    return found


def failing_node_report(e: BaseException) -> List[str]:
    """Where in the model an Inductor error comes from: the FX node being lowered and its user code.

    Inductor lowers node `n` in GraphLowering.run_node; when that raises, the frame (kept alive by the
    traceback) still holds the node, whose meta["stack_trace"] is the model code that produced it.
    """
    node, seen = None, set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        tb = e.__traceback__
        while tb is not None:
            if tb.tb_frame.f_code.co_name == "run_node" and hasattr(tb.tb_frame.f_locals.get("n"), "meta"):
                node = tb.tb_frame.f_locals["n"]
            tb = tb.tb_next
        e = e.__cause__ or e.__context__
    if node is None:
        return []
    lines = repo_lines(node.meta.get("stack_trace") or "")
    return [f"node {node.format_node()[:160]}", "model code (innermost first): " + " < ".join(reversed(lines))]


def explain_breaks(net: nn.Module, args_: tuple, kwargs: dict) -> dict:
    """torch._dynamo.explain: graphs, graph breaks and their reasons with the model line that caused them."""
    torch._dynamo.reset()
    try:
        ex = torch._dynamo.explain(net)(*args_, **kwargs)
    except Exception as e:  # explain itself may fail where compile does; report it and carry on
        return dict(error=f"{type(e).__name__}: {first_line(e)}")
    reasons = []
    for r in ex.break_reasons:
        where = " < ".join(reversed(repo_lines("".join(traceback.format_list(r.user_stack))))) or "?"
        text = f"{where}: {(r.reason.strip().splitlines() or ['?'])[0][:200]}"
        if text not in reasons:
            reasons.append(text)
    return dict(graphs=ex.graph_count, breaks=ex.graph_break_count, reasons=reasons)


def compile_one(suite: Suite, key: str, batch: Batch, args) -> dict:
    c = suite.contenders[key]
    x_t = suite.diffusion.q_sample(batch.x, batch.t, noise=batch.noise)           # (B, C, H, W)
    kwargs = dict(return_info=True) if c.dcdit else {}
    with autocast_for(suite.device):
        out = dict(explain=explain_breaks(c.model, (x_t, batch.t, batch.y), kwargs))
    torch._dynamo.reset()
    compiled = torch.compile(c.model, dynamic=True)
    try:
        out["compile_s"] = timed(step_fn(suite, key, batch, True, net=compiled), suite.device)
        jobs = {"eager": step_fn(suite, key, batch, True), "compiled": step_fn(suite, key, batch, True, compiled)}
        med = measure(jobs, args.repeats, args.warmup, suite.device, f"compile {key}")
    except Exception as e:  # report and carry on: the model is fixed from the reasons
        out["error"] = f"{type(e).__name__}: {first_line(e)}"
        out["error_at"] = failing_node_report(e)
        print(f"  compile {key} failed: {out['error']}", flush=True)
        for where in out["error_at"]:
            print(f"    at {where}", flush=True)
        return out
    out.update(times=med, eager_s=med["eager"]["median_s"], compiled_s=med["compiled"]["median_s"])
    out["compiled_over_eager"] = out["compiled_s"] / out["eager_s"]
    return out


def compile_section(suite: Suite, batch: Batch, args) -> dict:
    with keep_exactly(suite.dc, suite.kept):  # the override is in place before compiling, so it is traced
        out = {k: compile_one(suite, k, batch, args) for k in args.compile_models}
    for k, res in out.items():
        ex = res["explain"]
        if "error" in ex or ex["breaks"]:
            print(f"  compile {k}: explain " + (ex.get("error") or f"{ex['graphs']} graphs, {ex['breaks']} breaks"))
            for reason in ex.get("reasons", []):
                print(f"    break at {reason}")
    torch._dynamo.reset()
    return out


# -- tf32: the fp32 matmuls in full fp32 against TF32 ----------------------------------------------------

def with_tf32(fn: Callable[[], None], enabled: bool) -> Callable[[], None]:
    """fn run with torch.backends.cuda.matmul.allow_tf32 = enabled, the previous value restored after."""
    def run():
        saved = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = enabled
        try:
            fn()
        finally:
            torch.backends.cuda.matmul.allow_tf32 = saved
    return run


def adamw_section(suite: Suite, batch: Batch, args) -> dict:
    """Training steps of DC-DiT and the public DiT with AdamW's foreach against its fused implementation, one model
    at a time (each implementation with its own state on the same weights: only the time means anything; one
    extra optimizer state at a time, so XL fits beside the suite's own)."""
    med = {}
    for k in ("dcdit", "public"):
        c = suite.contenders[k]
        jobs = {}
        for impl in ("foreach", "fused"):
            opt = adamw(c.model.parameters(), suite.device, fused=impl == "fused")
            jobs[f"{k} {impl}"] = partial(train_step, c.model, opt, c.dcdit, suite.N, suite.diffusion, batch,
                                          suite.device)
        with keep_exactly(suite.dc, suite.kept):
            med.update(measure(jobs, args.repeats, args.warmup, suite.device, f"adamw {k}"))
        del jobs, opt
        c.model.zero_grad(set_to_none=True)
        if suite.device.type == "cuda":
            torch.cuda.empty_cache()
    return dict(times=med, fused_over_foreach={k: med[f"{k} fused"]["median_s"] / med[f"{k} foreach"]["median_s"]
                                               for k in ("dcdit", "public")})


def tf32_section(suite: Suite, batch: Batch, args) -> dict:
    jobs = {}
    for k in ("dcdit", "public"):
        step = step_fn(suite, k, batch, True)
        jobs[f"{k} fp32"], jobs[f"{k} tf32"] = with_tf32(step, False), with_tf32(step, True)
    with keep_exactly(suite.dc, suite.kept):
        med = measure(jobs, args.repeats, args.warmup, suite.device, "tf32")
    return dict(times=med, tf32_over_fp32={k: med[f"{k} tf32"]["median_s"] / med[f"{k} fp32"]["median_s"]
                                           for k in ("dcdit", "public")})


def plugback_section(suite: Suite, batch: Batch, args) -> dict:
    """Plug-back on this size's grid for the batch, M = L/N kept per sample (equal, then varied counts with the same
    total): the two-pass distance transform against the cdist table over every (position, kept token) pair that
    plug-back used to build (elementwise mode, then argmin; the same slots)."""
    B, (H, W), dev = batch.x.shape[0], suite.dc_meta.grid, suite.device
    g = torch.Generator().manual_seed(0)
    every = grid_coords(torch.arange(H * W, device=dev), (H, W)).expand(B, -1, -1)  # (B, L, 2)

    def cdist_table(pos):
        return torch.cdist(every, pos, compute_mode="donot_use_mm_for_euclid_dist").argmin(dim=2)  # (B, L)

    jobs, cases = {}, {"equal": [suite.kept] * B, "varied": varied_counts(B, suite.kept)}
    for case, counts in cases.items():
        mask = torch.zeros(B, H * W, dtype=torch.bool)
        for b, m in enumerate(counts):
            mask[b, torch.randperm(H * W, generator=g)[:m]] = True
        _, valid, idx = chunk(torch.zeros(B, H * W, 1), mask, torch.rand(B, H * W, generator=g))
        idx, valid = idx.to(dev), valid.to(dev)
        pos = grid_coords(idx, (H, W)).masked_fill(~valid.unsqueeze(-1), 1e6)  # (B, Mmax, 2) padding out of reach
        if not torch.equal(cdist_table(pos), plug_back_index(idx, valid, (H, W))):
            raise BenchError(f"plugback: the two-pass plug-back and the cdist table disagree ({case} counts)")
        jobs[f"cdist table {case}"] = partial(cdist_table, pos)
        jobs[f"two-pass {case}"] = partial(plug_back_index, idx, valid, (H, W))
    med = measure(jobs, args.repeats, args.warmup, dev, "plugback")
    return dict(times=med, grid=[H, W], kept=suite.kept,
                cdist_over_two_pass={case: med[f"cdist table {case}"]["median_s"] / med[f"two-pass {case}"]["median_s"]
                                     for case in cases})


# -- elastic, lite_cfg, dydit: sampling steps -------------------------------------------------------

def checkpoint_model(suite: Suite, args, dydit: bool) -> Tuple[DCDiT, tuple, bool]:
    """--ckpt's model on the device (loaded once per size) -> (model, its a, b, c, trained DyDiT gates?)."""
    key = ("ckpt", dydit)
    if key not in suite.cache:
        model, gated = load_ckpt(args.ckpt, suite.contenders["dcdit"].spec, dydit)
        coeffs = dcdit_flops_coeffs(model)  # counted on the CPU, before the move
        suite.cache[key] = (model.to(suite.device), coeffs, gated)
        print(f"  --ckpt {args.ckpt}: a DC-DiT on a {model.grid[0]}x{model.grid[1]} grid, N "
              f"{model.downsample_factor:g}{', with trained DyDiT gates' if gated else ''}", flush=True)
    return suite.cache[key]


def elastic_section(suite: Suite, batch: Batch, args) -> dict:
    """Tail dropping over --fractions: the trained router of --ckpt decides what is kept, else the fixed M."""
    if args.ckpt:
        model, coeffs, _ = checkpoint_model(suite, args, dydit=False)
        routing, fixed = f"router of {args.ckpt}", nullcontext()
    else:
        model, coeffs = suite.dc, suite.coeffs
        routing = f"fresh weights: each sample keeps its top {suite.kept} = L/N tokens by p (a fresh router keeps ~2)"
        fixed = keep_exactly(model, suite.kept)
    print(f"  elastic routing: {routing}", flush=True)
    with fixed:
        out = tail_drop_sweep(model, coeffs, args.fractions, batch.x.shape[0], suite.device, args, "elastic")
    return dict(routing=routing, **out)


def lite_cfg_section(suite: Suite, batch: Batch, args) -> dict:
    """Plain CFG against Lite-CFG in one packed batch: the unconditional half drops --uncond-fraction."""
    dc, B = suite.dc, batch.x.shape[0]
    x, t, y = cfg_inputs(dc, B, suite.device)                                    # (2B, C, H, W), (2B,), (2B,)
    cases = {"plain": {}, "lite": dict(uncond_tail_drop=args.uncond_fraction)}
    with keep_exactly(dc, suite.kept), evaluating(dc):
        kept = {name: sampling_step(dc, x, t, y, suite.device, **kw).kept.cpu().double() for name, kw in cases.items()}
        med = measure({name: partial(sampling_step, dc, x, t, y, suite.device, **kw) for name, kw in cases.items()},
                      args.repeats, args.warmup, suite.device, "lite_cfg")
    out = dict(uncond_fraction=args.uncond_fraction, times=med)
    for name in cases:
        out[name] = dict(kept_cond=float(kept[name][:B].mean()), kept_uncond=float(kept[name][B:].mean()),
                         gflops=float(quadratic(suite.coeffs, kept[name]).sum()) / 1e9, time_s=med[name]["median_s"])
    out["time_ratio"] = out["lite"]["time_s"] / out["plain"]["time_s"]
    out["flops_ratio"] = out["lite"]["gflops"] / out["plain"]["gflops"]
    return out


def width_for_ratio(dims, kept: int, target: float) -> int:
    """Heads (= MLP groups) kept per block whose inner-block FLOPs ratio, every token running, is closest
    to target (routers included)."""
    static = static_block_flops(dims, kept)
    ratios = [block_flops(dims, kept, k, k, kept) / static for k in range(dims.heads + 1)]
    return int(np.argmin([abs(r - target) for r in ratios]))


def dydit_model(suite: Suite, args) -> Tuple[DCDiT, tuple, bool]:
    """The DC-DiT with DyDiT's gates (§4.5): --ckpt's, or a fresh one of the suite's DC-DiT (built once per size)."""
    if args.ckpt:
        return checkpoint_model(suite, args, dydit=True)
    if "dydit" not in suite.cache:
        torch.manual_seed(0)
        model = build(suite.contenders["dcdit"].spec, suite.device, DyDiTConfig(enabled=True)).eval()
        suite.cache["dydit"] = (model, suite.coeffs, False)  # with its gates on it costs what the DC-DiT does
    return suite.cache["dydit"]


def dydit_section(suite: Suite, batch: Batch, args) -> dict:
    """Sampling steps of one DyDiT model run as the plain DC-DiT (static execution: no routers) and with its
    gates fixed to patterns near lambda (or, from a DyDiT --ckpt, its own gates), priced from the gate
    decisions each forward returns."""
    model, coeffs, trained = dydit_model(suite, args)
    dims, depth = dydit_dims(model)
    H, W = model.grid
    keep = round(H * W / model.downsample_factor)
    target = args.dydit_target
    k = width_for_ratio(dims, keep, target)
    gate_names = [n for n, _ in model.named_parameters()
                  if n.startswith("blocks.") and n.split(".", 2)[-1].startswith(GATE_PREFIXES)]
    own = {n: p.detach().clone() for n, p in model.named_parameters() if n in gate_names}

    def own_gates() -> None:
        params = dict(model.named_parameters())
        with torch.no_grad():
            for n in gate_names:
                params[n].copy_(own[n])

    def set_gates(name: str) -> str:
        """Put the gate routers in the state of one row; returns the execution mode it runs in."""
        own_gates()
        if name == "all gates on":
            fix_gates(model, [dims.heads] * depth, [dims.heads] * depth, tokens=True)
        elif name.startswith("width"):
            fix_gates(model, [k] * depth, [k] * depth, tokens=True)
        elif name == "tokens":  # every head and group; the token router's last bias at 0: about half skip the MLP
            fix_gates(model, [dims.heads] * depth, [dims.heads] * depth, tokens=None)
            with torch.no_grad():
                for block in model.blocks:
                    block.token_router[2].bias.zero_()
        return "masked" if name.endswith("masked") else "static" if name == "DC-DiT (no gates)" else "sliced"

    names = ["DC-DiT (no gates)"] + (["checkpoint gates"] if trained else
                                     ["all gates on", "width", "tokens", "width, masked"])
    modes = {name: set_gates(name) for name in names}
    x, t, y = cfg_inputs(model, batch.x.shape[0], suite.device)                  # (2B, C, H, W), (2B,), (2B,)
    fixed = nullcontext() if args.ckpt else keep_exactly(model, keep)
    routing = f"router of {args.ckpt}" if args.ckpt else f"fresh weights: each sample keeps its top {keep} = L/N"

    def step(name: str):
        with dydit_execution(model, modes[name]):
            return sampling_step(model, x, t, y, suite.device)

    with fixed:
        infos = {}
        for name in names:
            set_gates(name)
            infos[name] = step(name)
        med = measure({name: partial(step, name) for name in names}, args.repeats, args.warmup, suite.device,
                      "dydit", setup={name: partial(set_gates, name) for name in names})
        own_gates()
    rows, base_time, base_flops = {}, med[names[0]]["median_s"], None
    for name in names:
        d = infos[name].dydit
        run, dcdit = dydit_info_row_flops(coeffs, dims, d)                        # (rows,) each
        kept = d.kept.cpu().numpy().astype(np.float64)                           # (rows,)
        if modes[name] == "masked":  # every head, group and token computed, then gated: nothing saved, routers paid
            full = np.full((len(kept), depth), dims.heads, dtype=np.float64)     # (rows, depth)
            run = dydit_row_flops(coeffs, dims, kept, full, full, np.repeat(kept[:, None], depth, 1))
        base_flops = dcdit.sum() if base_flops is None else base_flops
        blocks = depth * static_block_flops(dims, kept).sum()
        rows[name] = dict(mode=modes[name], heads=float(d.heads.mean()), groups=float(d.groups.mean()),
                          tokens=float(d.tokens.sum() / (d.kept.sum() * depth)), gflops=float(run.sum()) / 1e9,
                          flops_ratio=float(run.sum() / base_flops),
                          blocks_ratio=float((run.sum() - (dcdit.sum() - blocks)) / blocks),
                          time_s=med[name]["median_s"], time_ratio=med[name]["median_s"] / base_time)
    return dict(routing=routing, target=target, width_kept=k, heads=dims.heads, times=med, rows=rows)


SECTION_FNS = dict(train=train_section, sample=sample_section, shares=shares_section, packed=packed_section,
                   memory=memory_section, compile=compile_section, tf32=tf32_section, adamw=adamw_section,
                   plugback=plugback_section, elastic=elastic_section, lite_cfg=lite_cfg_section,
                   dydit=dydit_section)


# ----------------------------------------------------------------------------------------------------
# The final table
# ----------------------------------------------------------------------------------------------------

@dataclass
class Row:
    measure: str
    value: str
    target: str = ""
    verdict: str = ""
    key: str = ""                   # the TARGETS entry that judged it
    number: Optional[float] = None  # the judged value


def judged(suite: Suite, key: str, measure: str, number: float, fmt: str = "{:.3f}") -> Row:
    """A table row judged by the target `key` has on this device (no target there: no verdict)."""
    target = TARGETS[suite.judged_as].get(key)
    if target is None:
        return Row(measure, fmt.format(number))
    text, ok = target
    return Row(measure, fmt.format(number), text, "PASS" if ok(number) else "FAIL", key, float(number))


def train_rows(suite: Suite, r: dict) -> List[Row]:
    cs = suite.contenders
    rows = [judged(suite, "images_per_s", f"train images/s: {cs[k].label}", r["images_per_s"][k]) for k in cs]
    rows += [Row(f"forward GFLOPs: {cs[k].label}", f"{r['gflops'][k]:.4g}") for k in cs]
    rows += [judged(suite, "iso_images_per_s", "train images/s DC-DiT / FLOP-matched DiT",
                    r["dcdit_over_iso_images_per_s"]),
             Row("  (forward FLOPs DC-DiT / FLOP-matched DiT)", f"{r['dcdit_over_iso_flops']:.3f}"),
             Row(f"train step time DC-DiT / {cs['public'].label}", f"{r['train_time_ratio']:.3f}"),
             judged(suite, "train_time_over_flops", "  train step time ratio / FLOPs ratio",
                    r["train_time_over_flops_ratio"]),
             Row(f"fwd+bwd time DC-DiT / {cs['public'].label}", f"{r['fwd_bwd_time_ratio']:.3f}"),
             Row(f"  forward FLOPs DC-DiT / {cs['public'].label}", f"{r['fwd_bwd_flops_ratio']:.3f}"),
             judged(suite, "fwd_bwd_time_over_flops", "  fwd+bwd time ratio / FLOPs ratio", r["time_over_flops_ratio"])]
    rel = r["release"]
    if not rel["available"]:
        return rows + [Row("ours / release time per step", "n/a", rel["reason"])]
    return rows + [Row("  release DC-DiT / DiT-B/2 time (RELEASE)", f"{rel['release_time_ratio']:.3f}"),
                   Row("  release forward FLOPs ratio (59.1 G / 46.0 G)", f"{rel['release_flops_ratio']:.3f}"),
                   judged(suite, "ours_over_release", "ours / release time per step", rel["ours_over_release"])]


def sweep_rows(suite: Suite, r: dict, title: str, fractions: Sequence[float], target_at: Optional[float]) -> List[Row]:
    rows = []
    for f in fractions:
        if f == 0:
            continue
        s = r[f"f={f:g}"]
        rows.append(Row(f"{title} f={f:g}: FLOPs / measured speed-up (mean M {s['mean_kept']:.1f})",
                        f"{s['flops_speedup']:.3f} / {s['measured_speedup']:.3f}"))
        measure_name = f"{title} f={f:g}: measured / FLOPs speed-up"
        rows.append(judged(suite, "sample_efficiency", measure_name, s["efficiency"]) if f == target_at
                    else Row(measure_name, f"{s['efficiency']:.3f}"))
    return rows


def sample_rows(suite: Suite, r: dict) -> List[Row]:
    return sweep_rows(suite, r, "sample", TAIL_DROPS, target_at=0.6)


def shares_rows(suite: Suite, r: dict) -> List[Row]:
    rows = [Row(f"share of DC-DiT step ({r['step_s']:.4f} s): {k}",
                f"{100 * v:.1f}%" + (f" (FLOPs {100 * r['flops_shares'][k]:.1f}%)" if k in r["flops_shares"] else ""))
            for k, v in r["shares"].items()]
    return rows + [judged(suite, "overhead_share", "route + chunk + dechunk share of the step", r["overhead_share"],
                          fmt="{:.1%}")]


def packed_rows(suite: Suite, r: dict) -> List[Row]:
    rows = []
    for layout in ("packed", "padded"):
        p = r[layout]
        rows.append(Row(f"{layout}: step equal / varied M (s)", f"{p['equal_s']:.4f} / {p['varied_s']:.4f}"))
        rows.append(judged(suite, f"{layout}_time_ratio",
                           f"{layout}: varied / equal time (FLOPs {p['flops_ratio']:.3f})", p["time_ratio"]))
        rows.append(judged(suite, f"{layout}_time_per_flop", f"{layout}: varied / equal time per FLOP",
                           p["time_per_flop_ratio"]))
    return rows


def memory_rows(suite: Suite, r: dict) -> List[Row]:
    cuda = r["method"].startswith("torch.cuda")
    rows = []
    for k, c in suite.contenders.items():
        m = r[k]
        if "error" in m:
            rows.append(judged(suite, "peak_mib", f"train step memory: {c.label}: {m['error'][:40]}", float("nan")))
            continue
        rows.append(Row(f"train step memory ({'CUDA allocator' if cuda else 'peak RSS'} above pre-step): {c.label}",
                        f"{m['step_mib']:.1f} MiB"))
        if cuda:
            rows.append(judged(suite, "peak_mib", f"peak memory (max_memory_allocated): {c.label}", m["peak_mib"],
                               fmt="{:.1f} MiB"))
    return rows


def compile_rows(suite: Suite, r: dict) -> List[Row]:
    rows = []
    for k, res in r.items():
        label = suite.contenders[k].label
        ex = res["explain"]
        breaks = ex.get("error", f"{ex.get('breaks')} breaks, {ex.get('graphs')} graphs")
        rows.append(Row(f"compile {label}: graph breaks", breaks[:40]))
        if "error" in res:
            rows.append(Row(f"compile {label}", "failed: " + res["error"][:40], "works", "FAIL"))
            continue
        rows += [Row(f"compile {label}: first step (compile) s", f"{res['compile_s']:.2f}"),
                 judged(suite, "compiled_over_eager", f"compile {label}: compiled / eager step",
                        res["compiled_over_eager"])]
    return rows


def elastic_rows(suite: Suite, r: dict) -> List[Row]:
    fractions = [float(key[2:]) for key in r if key.startswith("f=")]
    return sweep_rows(suite, r, "elastic", fractions, target_at=None)


def lite_cfg_rows(suite: Suite, r: dict) -> List[Row]:
    return [Row(f"Lite-CFG (uncond f={r['uncond_fraction']:g}): kept cond / uncond",
                f"{r['lite']['kept_cond']:.1f} / {r['lite']['kept_uncond']:.1f}"),
            Row(f"Lite-CFG / plain CFG step: time (FLOPs {r['flops_ratio']:.3f})", f"{r['time_ratio']:.3f}")]


def dydit_rows(suite: Suite, r: dict) -> List[Row]:
    return [Row(f"dydit {name}: time (FLOPs {row['flops_ratio']:.3f}, blocks {row['blocks_ratio']:.3f})",
                f"{row['time_ratio']:.3f}") for name, row in r["rows"].items() if name != "DC-DiT (no gates)"]


def tf32_rows(suite: Suite, r: dict) -> List[Row]:
    return [Row(f"train step time, TF32 / full fp32 matmuls: {suite.contenders[k].label}", f"{v:.3f}")
            for k, v in r["tf32_over_fp32"].items()]


def adamw_rows(suite: Suite, r: dict) -> List[Row]:
    return [Row(f"train step time, fused / foreach AdamW: {suite.contenders[k].label}", f"{v:.3f}")
            for k, v in r["fused_over_foreach"].items()]


def plugback_rows(suite: Suite, r: dict) -> List[Row]:
    t = r["times"]
    return [Row(f"plug-back, cdist table / two-pass ({case} counts, M = {r['kept']})",
                f"{1e3 * t[f'cdist table {case}']['median_s']:.2f} / {1e3 * t[f'two-pass {case}']['median_s']:.2f} ms "
                f"= {ratio:.2f}x") for case, ratio in r["cdist_over_two_pass"].items()]


ROW_FNS = dict(train=train_rows, sample=sample_rows, shares=shares_rows, packed=packed_rows, memory=memory_rows,
               compile=compile_rows, tf32=tf32_rows, adamw=adamw_rows, plugback=plugback_rows, elastic=elastic_rows,
               lite_cfg=lite_cfg_rows, dydit=dydit_rows)


def print_table(rows: List[Row]) -> None:
    cols = [[r.measure, r.value, r.target] for r in rows]
    w = [max(len(c[i]) for c in cols + [["measure", "value", "target"]]) for i in range(3)]
    print(f"\n{'measure':{w[0]}s}  {'value':>{w[1]}s}  {'target':{w[2]}s}  verdict")
    for r in rows:
        print(f"{r.measure:{w[0]}s}  {r.value:>{w[1]}s}  {r.target:{w[2]}s}  {r.verdict}".rstrip())


# ----------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------

def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", choices=SIZES, default=None,
                        help="model sizes (default: B on CPU, B XL on CUDA)")
    parser.add_argument("--tiny", action="store_true", help="same as --sizes tiny (seconds)")
    parser.add_argument("--batch", nargs="+", type=int, default=None,
                        help="images per step, one run per value (default: 2 8 on CPU, 32 on CUDA)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats; medians are reported")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first (allocator, kernel choice)")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=None,
                        help="default: all but compile on CPU (add it with --compile), all on CUDA")
    parser.add_argument("--compile", action="store_true", help="add the torch.compile section")
    parser.add_argument("--tf32", action="store_true",
                        help="TF32 for fp32 matmuls on CUDA, as train.tf32=true (the fp32 router and de-chunking)")
    parser.add_argument("--profile-stages", nargs="+", choices=[st.name for st in STAGES], default=None,
                        help="shares section: also print torch.profiler's op table of these stages' forward + backward")
    parser.add_argument("--compile-models", nargs="+", choices=("dcdit", "iso"), default=["dcdit", "iso"],
                        help="which models the compile section compiles (default both; Inductor takes minutes each)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", default=None, metavar="PATH", help="write every measured number as JSON")
    parser.add_argument("--ckpt", default="", metavar="PATH",
                        help="elastic, dydit: a training checkpoint (EMA weights); its router (and gates) decide")
    parser.add_argument("--fractions", nargs="+", type=float, default=list(ELASTIC_FRACTIONS),
                        help="elastic: tail-drop fractions f, 0 included (the reference)")
    parser.add_argument("--uncond-fraction", type=float, default=UNCOND_FRACTION,
                        help="lite_cfg: tail-drop fraction of the unconditional half")
    parser.add_argument("--dydit-target", type=float, default=DyDiTConfig.target_ratio,
                        help="dydit: lambda, the inner blocks' FLOPs ratio the width pattern aims at")
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_child is not None:
        return args
    device = torch.device(args.device)
    if args.tiny and args.sizes and args.sizes != ["tiny"]:
        raise BenchError(f"--tiny means --sizes tiny; got --sizes {' '.join(args.sizes)} as well")
    args.sizes = ["tiny"] if args.tiny else args.sizes or (["B", "XL"] if device.type == "cuda" else ["B"])
    args.batch = args.batch or ([32] if device.type == "cuda" else [2, 8])
    if min(args.batch) < 1 or args.repeats < 1 or args.warmup < 0:
        raise BenchError(f"--batch values and --repeats must be >= 1 and --warmup >= 0, got --batch {args.batch}, "
                         f"--repeats {args.repeats}, --warmup {args.warmup}")
    if 0.0 not in args.fractions or not all(0.0 <= f < 1.0 for f in args.fractions):
        raise BenchError(f"--fractions must lie in [0, 1) and include 0 (the reference), got {args.fractions}")
    args.fractions = sorted(set(args.fractions))
    if not 0.0 <= args.uncond_fraction < 1.0:
        raise BenchError(f"--uncond-fraction must lie in [0, 1), got {args.uncond_fraction}")
    if not 0.0 < args.dydit_target <= 1.0:
        raise BenchError(f"--dydit-target must lie in (0, 1], got {args.dydit_target}")
    if args.sections is None:
        args.sections = [s for s in SECTIONS if s not in CUDA_DEFAULT_ONLY or device.type == "cuda"
                         or (s == "compile" and args.compile)]
    elif args.compile and "compile" not in args.sections:
        args.sections.append("compile")
    if args.ckpt and not {"elastic", "dydit"} & set(args.sections):
        raise BenchError("--ckpt is measured by the elastic and dydit sections; add one of them to --sections")
    if args.ckpt and len(args.sizes) > 1:
        raise BenchError(f"--ckpt is one model: give one size (the sections beside it), got --sizes "
                         f"{' '.join(args.sizes)}")
    if args.ckpt and not os.path.isfile(args.ckpt):
        raise BenchError(f"--ckpt {args.ckpt}: no such file; expected a DC-DiT training checkpoint")
    return args


def run(args) -> dict:
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = args.tf32  # train.tf32; the tf32 section sets it per job
    precision = ("bf16 autocast" + (", TF32 matmuls" if args.tf32 else "")) if device.type == "cuda" else "fp32"
    results = dict(meta=dict(device=str(device), torch=torch.__version__, threads=torch.get_num_threads(),
                             precision=precision, sizes=args.sizes,
                             batch=args.batch, repeats=args.repeats, warmup=args.warmup, sections=args.sections,
                             ckpt=args.ckpt or None, release=RELEASE,
                             targets="cuda" if device.type == "cuda" else "cpu"),
                   models={}, results={}, table=[], targets=[])
    print(f"device {device} ({results['meta']['precision']}), torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; sections {' '.join(args.sections)}", flush=True)
    rows: List[Row] = []
    for size in args.sizes:
        suite = Suite(size, device)
        results["models"][size] = suite.describe()
        print(f"\n== {size}: L={suite.L} tokens, N={suite.N:g}, every DC-DiT sample keeps exactly M={suite.kept} "
              f"(own router scores, top-M kept); {suite.iso_note}")
        for k, m in results["models"][size].items():
            print(f"   {m['label']}: {m['params_m']:.2f}M parameters, {m['gflops']:.3f} GFLOPs per forward")
        results["results"][size] = {}
        for B in args.batch:
            batch = make_batch(suite.contenders["dcdit"].spec, B, suite.diffusion.num_timesteps, device)
            out = results["results"][size][str(B)] = {}
            for section in args.sections:
                print(f"-- {size}, batch {B}: {section}", flush=True)
                out[section] = SECTION_FNS[section](suite, batch, args)
                for row in ROW_FNS[section](suite, out[section]):
                    row.measure = f"[{size} b{B}] {row.measure}"
                    rows.append(row)
                    if row.key:
                        results["targets"].append(dict(size=size, batch=B, section=section, **dataclasses.asdict(row)))
        del suite
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    results["table"] = [dict(measure=r.measure, value=r.value, target=r.target, verdict=r.verdict) for r in rows]
    print(f"\nVerdicts use the {results['meta']['targets'].upper()} targets (docs/performance.md); they are stated "
          f"for B (CPU) and B/XL (CUDA), and tiny rows only check the machinery.")
    print_table(rows)
    return results


def main_impl(argv=None) -> Optional[dict]:
    args = parse_args(argv)
    if args.memory_child is not None:
        print(MEMORY_TAG + json.dumps(memory_child(json.loads(args.memory_child))), flush=True)
        return None
    results = run(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
        print(f"wrote {args.json}")
    return results


main = main_guard(main_impl)  # a bad flag, config or checkpoint: one line on stderr, exit code 2

if __name__ == "__main__":
    main()
