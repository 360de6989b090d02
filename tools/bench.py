"""DC-DiT performance benchmark: one run, every measure, the ratios printed last as one table.

Sections (docs/performance.md gives each protocol in full):
  train    training step (forward + backward + AdamW) of DC-DiT-<size> N=4, the FLOP-matched DiT of Table 1
           and the public DiT-<size>/2: images/s and FLOPs; forward + backward of DC-DiT against DiT-<size>/2
           next to their FLOPs ratio, and against the authors' release (RELEASE below: B on CPU).
  sample   a CFG sampling step at tail-drop f = 0, 0.3, 0.6: measured speed-up against the FLOPs speed-up.
  shares   time share of encoder, router, chunk, inner blocks, dechunk, decoder in a DC-DiT training step.
  packed   packed vs padded attention layout with equal and with widely varying kept counts per sample.
  memory   peak memory of one training step of each model, each in a fresh process.
  compile  torch.compile(dynamic=True) against eager, with the graph breaks it finds.

DC-DiT runs with its own (fresh) cosine router, but each sample keeps exactly M = L/N tokens, its top-M by
p (tools.flops.FixedCountRouter): a fresh router keeps ~2 tokens, a trained one ~L/N. Repeats are
interleaved across the things a section compares, so machine load hits all of them alike; medians are
reported. CPU runs fp32, CUDA runs under bf16 autocast.

    python tools/bench.py                    # CPU: B, batch 2 and 8, 5 repeats; CUDA: B and XL, batch 32
    python tools/bench.py --tiny             # tiny models, seconds
    python tools/bench.py --sizes B --batch 8 --sections train shares --json bench.json
    python tools/bench.py --compile          # add the torch.compile section
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
import traceback
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from functools import partial
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn as nn

from config import ModelConfig, load_config
from diffusion import create_diffusion
from models import DCDiT, create_model
from models.attention import TokenLayout
from models.chunking import chunk, dechunk
from models.dc_dit import ste_gate
from models.dit import run_blocks
from models.routing import RouterOutput, ratio_loss
from tools.bench_model import RATIO_LOSS_WEIGHT, sync, timed
from models.flops import count_params, dcdit_flops_coeffs, forward_flops, quadratic
from models.routing import keep_exactly as forced_kept

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository, where configs/ lives

SECTIONS = ("train", "sample", "shares", "packed", "memory", "compile")
SIZES = ("tiny", "S", "B", "L", "XL")
TAIL_DROPS = (0.0, 0.3, 0.6)
CFG_SCALE = 4.0  # DiT's sampling default; it only scales the guided output, never the cost
LR = 1e-4  # AdamW, paper §4 (config.TrainConfig.lr)
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

# The targets of docs/performance.md.
TARGET_OVERHEAD_SHARE = 0.05     # router + chunk + dechunk (+ plug-back) share of a B training step
TARGET_SAMPLE_EFFICIENCY = 0.85  # measured / FLOPs speed-up at f = 0.6
TARGET_PACKED_SPREAD = 0.05      # packed step time, varied / equal kept counts, within 1 +- 5%
TARGET_FLOPS_TRACKING = 0.03     # our time ratio to DiT-<size>/2 within 3% of our FLOPs ratio
TARGET_VS_RELEASE = 0.85         # our time per step at most 0.85 x the release's

# --tiny: a 16x16 grid (L = 256, M = 64 at N = 4), width 64, 2 inner blocks, 10 classes; DiT patch 2 -> 64 tokens.
TINY = dict(input_size=16, num_classes=10, depth=2, hidden_size=64, num_heads=4)


class BenchError(ValueError):
    user_error = True  # a bad command line: one line, no traceback


# ----------------------------------------------------------------------------------------------------
# Models under test
# ----------------------------------------------------------------------------------------------------

def build(spec: ModelConfig, device) -> nn.Module:
    """The model of a ModelConfig on `device` ("meta" for FLOP counting: instant, no memory)."""
    with torch.device(device):
        return create_model(spec)


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
        dc_meta = build(dc_spec, "meta")
        self.coeffs = dcdit_flops_coeffs(dc_meta)                          # forward FLOPs = a + b M + c M^2
        H, W = dc_meta.grid
        self.L, self.N = H * W, dc_meta.downsample_factor
        self.kept = round(self.L / self.N)                                 # M = L / N: 256 for B at 256px
        dc_flops = quadratic(self.coeffs, self.kept)
        if iso_spec is None:
            depth = flop_matched_depth(dc_flops, partial(dit_flops_at_depth, public_spec))
            iso_spec = dataclasses.replace(public_spec, depth=depth)
            self.iso_note = (f"FLOP-matched DiT picked here: depth {depth} is closest to DC-DiT's forward FLOPs "
                             f"at M={self.kept} (tools.flops.forward_flops)")
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
            c.optimizer = torch.optim.AdamW(c.model.parameters(), lr=LR, weight_decay=0.0)
        self.diffusion = create_diffusion("")

    @property
    def dc(self) -> DCDiT:
        return self.contenders["dcdit"].model

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


def measure(jobs: Dict[str, Callable[[], None]], repeats: int, warmup: int, device, title: str) -> Dict[str, dict]:
    """Time every job `repeats` times, interleaved (job 1, job 2, ..., then again), after `warmup` rounds."""
    for _ in range(warmup):
        for fn in jobs.values():
            fn()
    times: Dict[str, List[float]] = {name: [] for name in jobs}
    for i in range(repeats):
        for name, fn in jobs.items():
            times[name].append(timed(fn, device))
        print(f"  {title} {i + 1}/{repeats}: " + ", ".join(f"{k} {v[-1]:.4f}s" for k, v in times.items()),
              flush=True)
    return {name: dict(median_s=statistics.median(v), times_s=v) for name, v in times.items()}


# ----------------------------------------------------------------------------------------------------
# Per-sample kept counts (packed vs padded)
# ----------------------------------------------------------------------------------------------------

class PerSampleCountRouter(nn.Module):
    """Runs the model's own router, then sample b keeps exactly counts[b] tokens: its highest-p ones.

    The per-sample version of tools.flops.FixedCountRouter, so a batch can be given any spread of kept
    counts. Ties in p go to the lower raster index (a stable descending sort), so the choice is
    deterministic; the first and last raster tokens carry p = 1 and are kept whenever counts[b] >= 2.
    """

    def __init__(self, router: nn.Module, counts: Sequence[int]):
        super().__init__()
        self.router = router
        self.counts = [int(m) for m in counts]

    def forward(self, x: torch.Tensor, grid) -> RouterOutput:
        r = self.router(x, grid)
        B, L = r.prob.shape
        if len(self.counts) != B or not all(1 <= m <= L for m in self.counts):
            raise ValueError(f"counts must be {B} kept counts in [1, L={L}], got {self.counts}")
        order = r.prob.detach().argsort(dim=1, descending=True, stable=True)           # (B, L) by p, ties by index
        ranks = torch.empty_like(order).scatter_(1, order, torch.arange(L, device=order.device).expand(B, L))  # (B, L)
        counts = torch.tensor(self.counts, device=order.device)                          # (B,)
        mask = ranks < counts.unsqueeze(1)                                                # (B, L)
        selected = torch.where(mask, r.prob, 1.0 - r.prob)                               # (B, L)
        return RouterOutput(prob=r.prob, mask=mask, natural_mask=mask, selected=selected)


@contextmanager
def forced_counts(model: DCDiT, counts: Sequence[int], packed: bool):
    """Temporarily keep counts[b] tokens in sample b, with the packed (True) or padded attention layout."""
    router, layout = model.router, model.packed
    model.router, model.packed = PerSampleCountRouter(router, counts), packed
    try:
        yield model
    finally:
        model.router, model.packed = router, layout


def varied_counts(batch: int, mean: int, spread: float = 0.75) -> List[int]:
    """Kept counts alternating mean(1 - spread), mean(1 + spread): same total as `mean` everywhere.

    An odd batch ends with one sample at `mean`. With spread 0.75 at B: 64 and 448 tokens around 256.
    """
    low = round(mean * (1.0 - spread))
    pair = [low, 2 * mean - low]
    return [pair[i % 2] for i in range(batch - batch % 2)] + [mean] * (batch % 2)


# ----------------------------------------------------------------------------------------------------
# DC-DiT's forward, stage by stage (DCDiT.forward without tail dropping, DyDiT or collected blocks)
# ----------------------------------------------------------------------------------------------------

def encoder_stage(dc: DCDiT, x_t, c):
    return dc.encoder(x_t, c)                                                      # (B, L, D)


def router_stage(dc: DCDiT, enc):
    return dc.router(enc, dc.grid)                                                 # RouterOutput, each (B, L)


def chunk_stage(dc: DCDiT, enc, mask, prob):
    """chunk + positional embedding of the kept tokens + token layout + packing (everything before the blocks)."""
    z, valid, idx, counts = chunk(enc, mask, prob, return_counts=True)            # (B, Mmax, D), (B, Mmax) x2
    z = z + dc.pos_embed(idx).to(z.dtype)                                          # (B, Mmax, D)
    layout = TokenLayout.build(valid, dc.packed, counts)
    return layout.pack(z), layout, idx, valid                                      # (T, D) packed | (B, Mmax, D)


def blocks_stage(dc: DCDiT, h, c, layout):
    return run_blocks(dc.blocks, h, c, layout, dc.grad_checkpointing)              # same shape as h


def dechunk_stage(dc: DCDiT, h, layout, prob, selected, idx, valid, dtype):
    """unpack + dechunk (smoothing, plug-back) + the straight-through gate."""
    z = layout.unpack(h)                                                           # (B, Mmax, D)
    u = dechunk(z, prob, idx, valid, dc.grid, dc.dechunk_sigma)                    # (B, L, D) fp32
    return ste_gate(u, selected).to(dtype)                                          # (B, L, D)


def decoder_stage(dc: DCDiT, u, enc, c):
    """residual path + conv decoder + final layer."""
    u = u + dc.residual_proj(enc)                                                  # (B, L, D)
    h = dc.final_layer(dc.decoder(u, c, dc.grid), c)                               # (B, L, out)
    B, L, C = h.shape
    return h.transpose(1, 2).reshape(B, C, *dc.grid)                               # (B, out, H, W)


def run_stages(dc: DCDiT, x_t, t, y) -> dict:
    """One forward through the stages; returns every stage's inputs and the output (test: equals dc(x_t, t, y))."""
    c = dc.t_embedder(t) + dc.y_embedder(y, dc.training)                           # (B, D)
    enc = encoder_stage(dc, x_t, c)                                                # (B, L, D)
    r = router_stage(dc, enc)
    h, layout, idx, valid = chunk_stage(dc, enc, r.mask, r.prob)
    h_out = blocks_stage(dc, h, c, layout)
    u = dechunk_stage(dc, h_out, layout, r.prob, r.selected, idx, valid, enc.dtype)  # (B, L, D)
    out = decoder_stage(dc, u, enc, c)                                             # (B, out, H, W)
    return dict(x_t=x_t, c=c, enc=enc, r=r, h=h, layout=layout, idx=idx, valid=valid, h_out=h_out, u=u, out=out)


def backward_through(dc: DCDiT, stage: Callable, *inputs: torch.Tensor) -> None:
    """Forward + backward of one stage alone: `inputs` are the tensors the step differentiates through."""
    dc.zero_grad(set_to_none=True)
    leaves = [v.detach().requires_grad_(True) for v in inputs]
    out = stage(*leaves)
    outs = (out.prob, out.selected) if isinstance(out, RouterOutput) else out
    outs = outs if isinstance(outs, tuple) else (outs,)
    sum(o.float().sum() for o in outs if torch.is_tensor(o) and o.requires_grad).backward()


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
    with forced_kept(suite.dc, suite.kept):
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
    out["release"] = release_comparison(suite, B, out["fwd_bwd_time_ratio"], out["fwd_bwd_flops_ratio"])
    return out


def sample_section(suite: Suite, batch: Batch, args) -> dict:
    from tools.bench_elastic import step_inputs  # [z; z], [labels; null], t = 500: one CFG step's rows

    dc, B = suite.dc, batch.x.shape[0]
    x, t, y = step_inputs(dc, B, suite.device)                                     # (2B, C, H, W), (2B,), (2B,)

    def step(f: float) -> torch.Tensor:
        with torch.no_grad(), autocast_for(suite.device):
            _, info = dc.forward_with_cfg(x, t, y, CFG_SCALE, tail_drop=f, return_info=True)
        return info.kept                                                           # (2B,)

    dc.eval()
    try:
        with forced_kept(dc, suite.kept):
            kept = {f: step(f).cpu().double() for f in TAIL_DROPS}
            med = measure({f"f={f:g}": partial(step, f) for f in TAIL_DROPS}, args.repeats, args.warmup,
                          suite.device, "sample")
    finally:
        dc.train()
    out = {"times": med}
    flops0 = float(quadratic(suite.coeffs, kept[0.0]).sum())  # summed over the 2B rows
    for f in TAIL_DROPS:
        flops = float(quadratic(suite.coeffs, kept[f]).sum())
        speed = med["f=0"]["median_s"] / med[f"f={f:g}"]["median_s"]
        out[f"f={f:g}"] = dict(mean_kept=float(kept[f].mean()), gflops=flops / 1e9, flops_speedup=flops0 / flops,
                               measured_speedup=speed, efficiency=speed / (flops0 / flops))
    return out


PIECES = ("encoder", "router", "chunk", "blocks", "dechunk", "decoder")
OVERHEAD = ("router", "chunk", "dechunk")  # routing + chunk + dechunk + plug-back (inside dechunk)


def shares_section(suite: Suite, batch: Batch, args) -> dict:
    """Each stage timed forward + backward alone on the tensors the step feeds it; "other" is the rest."""
    dc = suite.dc
    own_router = dc.router  # the model's router, without the benchmark's forced top-M override
    with forced_kept(dc, suite.kept):
        with torch.no_grad(), autocast_for(suite.device):
            x_t = suite.diffusion.q_sample(batch.x, batch.t, noise=batch.noise)  # (B, C, H, W)
            s = run_stages(dc, x_t, batch.t, batch.y)
        r, layout = s["r"], s["layout"]

        def piece(stage, *inputs):
            def run():
                with autocast_for(suite.device):
                    backward_through(dc, stage, *inputs)
            return run

        # Each stage differentiates through the inputs the step differentiates through; x_t, the hard mask,
        # the slot indices and the token layout are constants there too.
        jobs = {"step": step_fn(suite, "dcdit", batch, False),
                "encoder": piece(lambda c: encoder_stage(dc, s["x_t"], c), s["c"]),
                "router": piece(lambda enc: own_router(enc, dc.grid), s["enc"]),
                "chunk": piece(lambda enc: chunk_stage(dc, enc, r.mask, r.prob), s["enc"]),
                "blocks": piece(lambda h, c: blocks_stage(dc, h, c, layout), s["h"], s["c"]),
                "dechunk": piece(lambda h, p, sel: dechunk_stage(dc, h, layout, p, sel, s["idx"], s["valid"],
                                                                 s["enc"].dtype), s["h_out"], r.prob, r.selected),
                "decoder": piece(lambda u, enc, c: decoder_stage(dc, u, enc, c), s["u"], s["enc"], s["c"])}
        med = measure(jobs, args.repeats, args.warmup, suite.device, "shares")
    step = med["step"]["median_s"]
    shares = {k: med[k]["median_s"] / step for k in PIECES}
    shares["other"] = 1.0 - sum(shares.values())
    return dict(times=med, step_s=step, shares=shares, overhead_share=sum(shares[k] for k in OVERHEAD))


def packed_section(suite: Suite, batch: Batch, args) -> dict:
    """The same total kept tokens per batch, spread equally or unequally, through both attention layouts."""
    B, M = batch.x.shape[0], suite.kept
    cases = {"equal": [M] * B, "varied": varied_counts(B, M)}
    step = step_fn(suite, "dcdit", batch, False)

    def run(counts, packed):
        with forced_counts(suite.dc, counts, packed):
            step()

    jobs = {f"{layout} {case}": partial(run, counts, layout == "packed")
            for layout in ("packed", "padded") for case, counts in cases.items()}
    med = measure(jobs, args.repeats, args.warmup, suite.device, "packed")
    # FLOPs the quadratic cost model predicts: packed prices every sample at its own M_b, padded at Mmax.
    flops = {"packed": {case: sum(suite.flops_of(m) for m in counts) for case, counts in cases.items()},
             "padded": {case: B * suite.flops_of(max(counts)) for case, counts in cases.items()}}
    out = dict(counts=cases, times=med)
    for layout in ("packed", "padded"):
        out[layout] = dict(equal_s=med[f"{layout} equal"]["median_s"], varied_s=med[f"{layout} varied"]["median_s"],
                           flops_ratio=flops[layout]["varied"] / flops[layout]["equal"])
        out[layout]["time_ratio"] = out[layout]["varied_s"] / out[layout]["equal_s"]
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
    peak (a 10 GB parent made every child "use" 7 GB). Elsewhere ru_maxrss (bytes on macOS).
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
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    diffusion = create_diffusion("")
    batch = make_batch(spec, job["batch"], diffusion.num_timesteps, device)
    dcdit = isinstance(model, DCDiT)
    with forced_kept(model, job["kept"]) if dcdit else nullcontext():
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
    # Tiny children are small: run them side by side. Real sizes one at a time (host or GPU memory).
    groups = [list(jobs)] if suite.size == "tiny" else [[k] for k in jobs]
    out = dict(method=method)
    for group in groups:
        procs = {k: subprocess.Popen([sys.executable, os.path.abspath(__file__), "--memory-child", json.dumps(jobs[k])],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
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
    except Exception as e:  # report and carry on: the lead fixes the model from the reasons
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
    with forced_kept(suite.dc, suite.kept):  # the override is in place before compiling, so it is traced
        out = {k: compile_one(suite, k, batch, args) for k in ("dcdit", "iso")}
    for k, res in out.items():
        ex = res["explain"]
        if "error" in ex or ex["breaks"]:
            print(f"  compile {k}: explain " + (ex.get("error") or f"{ex['graphs']} graphs, {ex['breaks']} breaks"))
            for reason in ex.get("reasons", []):
                print(f"    break at {reason}")
    torch._dynamo.reset()
    return out


SECTION_FNS = dict(train=train_section, sample=sample_section, shares=shares_section, packed=packed_section,
                   memory=memory_section, compile=compile_section)


# ----------------------------------------------------------------------------------------------------
# The final table
# ----------------------------------------------------------------------------------------------------

def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def train_rows(suite: Suite, r: dict) -> list:
    cs = suite.contenders
    rows = [(f"train images/s: {cs[k].label}", f"{r['images_per_s'][k]:.3f}", "", "") for k in cs]
    rows += [(f"forward GFLOPs: {cs[k].label}", f"{r['gflops'][k]:.4g}", "", "") for k in cs]
    rows += [("train images/s DC-DiT / FLOP-matched DiT", f"{r['dcdit_over_iso_images_per_s']:.3f}", ">= 1",
              verdict(r["dcdit_over_iso_images_per_s"] >= 1.0)),
             ("  (forward FLOPs DC-DiT / FLOP-matched DiT)", f"{r['dcdit_over_iso_flops']:.3f}", "", ""),
             (f"fwd+bwd time DC-DiT / {cs['public'].label}", f"{r['fwd_bwd_time_ratio']:.3f}", "", ""),
             (f"  forward FLOPs DC-DiT / {cs['public'].label}", f"{r['fwd_bwd_flops_ratio']:.3f}", "", ""),
             ("  time ratio / FLOPs ratio", f"{r['time_over_flops_ratio']:.3f}", f"1 +- {TARGET_FLOPS_TRACKING:g}",
              verdict(abs(r["time_over_flops_ratio"] - 1.0) <= TARGET_FLOPS_TRACKING))]
    rel = r["release"]
    if not rel["available"]:
        return rows + [("ours / release time per step", "n/a", rel["reason"], "")]
    return rows + [("  release DC-DiT / DiT-B/2 time (RELEASE)", f"{rel['release_time_ratio']:.3f}", "", ""),
                   ("  release forward FLOPs ratio (59.1 G / 46.0 G)", f"{rel['release_flops_ratio']:.3f}", "", ""),
                   ("ours / release time per step", f"{rel['ours_over_release']:.3f}", f"<= {TARGET_VS_RELEASE:g}",
                    verdict(rel["ours_over_release"] <= TARGET_VS_RELEASE))]


def sample_rows(suite: Suite, r: dict) -> list:
    rows = []
    for f in TAIL_DROPS[1:]:
        s = r[f"f={f:g}"]
        target = f">= {TARGET_SAMPLE_EFFICIENCY:g}" if f == 0.6 else ""
        rows += [(f"sample f={f:g}: FLOPs / measured speed-up (mean M {s['mean_kept']:.1f})",
                  f"{s['flops_speedup']:.3f} / {s['measured_speedup']:.3f}", "", ""),
                 (f"sample f={f:g}: measured / FLOPs speed-up", f"{s['efficiency']:.3f}", target,
                  verdict(s["efficiency"] >= TARGET_SAMPLE_EFFICIENCY) if target else "")]
    return rows


def shares_rows(suite: Suite, r: dict) -> list:
    rows = [(f"share of DC-DiT step ({r['step_s']:.4f} s): {k}", f"{100 * v:.1f}%", "", "")
            for k, v in r["shares"].items()]
    return rows + [("router + chunk + dechunk (+plug-back) share", f"{100 * r['overhead_share']:.1f}%",
                    f"< {100 * TARGET_OVERHEAD_SHARE:g}% (B)", verdict(r["overhead_share"] < TARGET_OVERHEAD_SHARE))]


def packed_rows(suite: Suite, r: dict) -> list:
    rows = []
    for layout in ("packed", "padded"):
        p = r[layout]
        rows.append((f"{layout}: step equal / varied M (s)", f"{p['equal_s']:.4f} / {p['varied_s']:.4f}", "", ""))
        target, ok = ((f"1 +- {TARGET_PACKED_SPREAD:g}", abs(p["time_ratio"] - 1.0) <= TARGET_PACKED_SPREAD)
                      if layout == "packed" else ("> 1 (pays for padding)", p["time_ratio"] > 1.0))
        rows.append((f"{layout}: varied / equal time (FLOPs {p['flops_ratio']:.3f})", f"{p['time_ratio']:.3f}",
                     target, verdict(ok)))
    return rows


def memory_rows(suite: Suite, r: dict) -> list:
    how = "CUDA allocator peak" if r["method"].startswith("torch.cuda") else "peak RSS"
    rows = []
    for k, c in suite.contenders.items():
        m = r[k]
        value = m["error"][:40] if "error" in m else f"{m['step_mib']:.1f} MiB"
        rows.append((f"train step memory ({how} above pre-step): {c.label}", value, "", ""))
    return rows


def compile_rows(suite: Suite, r: dict) -> list:
    rows = []
    for k, res in r.items():
        label = suite.contenders[k].label
        ex = res["explain"]
        breaks = ex.get("error", f"{ex.get('breaks')} breaks, {ex.get('graphs')} graphs")
        rows.append((f"compile {label}: graph breaks", breaks[:40], "", ""))
        if "error" in res:
            rows.append((f"compile {label}", "failed: " + res["error"][:40], "works", "FAIL"))
            continue
        rows += [(f"compile {label}: first step (compile) s", f"{res['compile_s']:.2f}", "", ""),
                 (f"compile {label}: compiled / eager step", f"{res['compiled_over_eager']:.3f}", "<= 1",
                  verdict(res["compiled_over_eager"] <= 1.0))]
    return rows


ROW_FNS = dict(train=train_rows, sample=sample_rows, shares=shares_rows, packed=packed_rows, memory=memory_rows,
               compile=compile_rows)


def print_table(rows: list) -> None:
    w = [max(len(r[i]) for r in rows + [("measure", "value", "target", "")]) for i in range(3)]
    print(f"\n{'measure':{w[0]}s}  {'value':>{w[1]}s}  {'target':{w[2]}s}  verdict")
    for name, value, target, ok in rows:
        print(f"{name:{w[0]}s}  {value:>{w[1]}s}  {target:{w[2]}s}  {ok}".rstrip())


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
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", default=None, metavar="PATH", help="write every measured number as JSON")
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
    if args.sections is None:
        args.sections = [s for s in SECTIONS if s != "compile" or device.type == "cuda" or args.compile]
    elif args.compile and "compile" not in args.sections:
        args.sections.append("compile")
    return args


def run(args) -> dict:
    device = torch.device(args.device)
    results = dict(meta=dict(device=str(device), torch=torch.__version__, threads=torch.get_num_threads(),
                             precision="bf16 autocast" if device.type == "cuda" else "fp32", sizes=args.sizes,
                             batch=args.batch, repeats=args.repeats, warmup=args.warmup, sections=args.sections,
                             release=RELEASE), models={}, results={}, table=[])
    print(f"device {device} ({results['meta']['precision']}), torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; sections {' '.join(args.sections)}", flush=True)
    rows = []
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
                rows += [(f"[{size} b{B}] {name}", value, target, ok)
                         for name, value, target, ok in ROW_FNS[section](suite, out[section])]
        del suite
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    results["table"] = [dict(measure=n, value=v, target=t, verdict=o) for n, v, t, o in rows]
    print("\nTargets are stated for the B config (CPU) and B/XL (CUDA); tiny rows only check the machinery.")
    print_table(rows)
    return results


def main(argv=None) -> Optional[dict]:
    try:
        args = parse_args(argv)
    except BenchError as e:
        sys.stderr.write(f"error: {e}\n")
        raise SystemExit(2) from None
    if args.memory_child is not None:
        print(MEMORY_TAG + json.dumps(memory_child(json.loads(args.memory_child))), flush=True)
        return None
    results = run(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
        print(f"wrote {args.json}")
    return results


if __name__ == "__main__":
    main()
