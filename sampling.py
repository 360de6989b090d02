"""Sampling from a DiT or DC-DiT checkpoint: the pieces sample.py, sample_ddp.py, train.py and the tools share.

    from sampling import Sampler, class_labels, generate, load_model_for_sampling, save_grid

Every image has its own generators, seeded by (seed, image index) and split into streams (starting and
per-step noise, the unconditional CFG half's noise, the class label), so an image does not depend on the
batch it was drawn in, nor on the number of processes in sample_ddp.py (EDM2's per-image seeding).
`Sampler` wraps the model for the diffusion loop: classifier-free guidance, tail dropping and Lite-CFG
(elastic inference, one checkpoint at many budgets), and a record per model call of the tokens the inner
blocks really ran, from which tools/flops.py prices the run. `sampling_summary` turns those records into what
a run spent per CFG branch (kept shares, compression, FLOPs by component, time per step), and
`step_profiler` traces a few steps of the loop with torch.profiler.
"""
import argparse
import math
import os
import time
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from config import format_config, load_config, validate
from data import to_uint8_images
from diffusion import create_diffusion
from models import create_model, is_dcdit, load_checkpoint
from models.flops import (component_coeffs, dcdit_flops_coeffs, dydit_dims, dydit_info_row_flops, tflops_by_component,
                          tflops_per_image_by_component, tflops_per_step)
from models.hierarchy import inner_kept_grid

# Random streams of one image: each gets its own generator so that using one never shifts another.
NOISE_STREAM, UNCOND_NOISE_STREAM, LABEL_STREAM = 0, 1, 2


class SampleError(RuntimeError):
    user_error = True  # config.main_guard prints it as one line and exits 2


def image_seed(seed: int, index: int, stream: int = NOISE_STREAM) -> int:
    """64-bit seed of one random stream of image `index`: seed * 1_000_003 + index in the low 56 bits
    (seed < 2**32, so at most ~2**52) and the stream above them, so no two (seed, index, stream) collide."""
    if not 0 <= seed < 2 ** 32 or index < 0:
        raise ValueError(f"image_seed: expected seed in [0, 2**32) and index >= 0, got seed={seed}, index={index}")
    return (stream << 56) + seed * 1_000_003 + int(index)


def image_generators(seed: int, indices: Sequence[int], device="cpu", stream: int = NOISE_STREAM) -> list:
    """One torch.Generator per image, seeded by (seed, image index): results independent of batching.

    CPU generators by default: the diffusion draws on the generator's device and moves the noise, so a
    seed gives the same starting noise on any hardware."""
    return [torch.Generator(device=device).manual_seed(image_seed(seed, i, stream)) for i in indices]


def class_labels(seed: int, indices: Sequence[int], num_classes: int) -> torch.Tensor:
    """(len(indices),) class of each image index, uniform over classes, from that image's own generator,
    so labels (like the noise) do not depend on the number of processes, the batch size or N."""
    gens = image_generators(seed, indices, stream=LABEL_STREAM)
    return torch.tensor([int(torch.randint(num_classes, (1,), generator=g)) for g in gens], dtype=torch.long)


def load_model_for_sampling(args, ckpt_path: str, use_ema: bool = True, device="cpu"):
    """-> (model, cfg). Our training checkpoints carry their config, which --config and `section.field=value`
    overrides then refine; a public DiT checkpoint is a bare state dict (or {"model"/"ema": ...}) and
    takes the model from --config. Sampling flags (add_sampling_args) are applied before --dry-run prints."""

    def configure(saved):
        cfg = load_config(args.config, args.overrides, base=saved)
        if hasattr(args, "tail_dropping_fraction"):
            apply_sampling_args(cfg, args)
        if getattr(args, "dry_run", False):
            print(format_config(cfg), end="")
            raise SystemExit(0)
        return cfg

    if not ckpt_path:  # a fresh model from --config: a dry run, or a smoke test of the sampling path
        cfg = configure(None)
        return create_model(cfg.model, cfg.dydit).to(device).eval(), cfg
    return load_checkpoint(ckpt_path, "ema" if use_ema else "model", configure, device, SampleError, "--ckpt")


class Sampler:
    """Wraps a model for the diffusion loop: CFG / Lite-CFG / tail dropping, recording chunking stats.

    `records` gets one dict per model call (= per sampling step): t (original timestep), seconds (wall time
    of the call, synchronised on CUDA) and, for DC-DiT, kept (rows,) the tokens each row's inner blocks ran
    on (cond rows then uncond rows under CFG) and mean_prob (rows,) each row's mean boundary probability
    over its L tokens; with keep_maps also prob / mask (rows, L) for chunking_viz. A DC-DiT with DyDiT gates
    (§4.5) also records flops (rows,): each row's forward FLOPs as its gates left them, since its kept counts
    alone price the ungated model.
    """

    def __init__(self, model, cfg, cfg_scale: float, tail_drop: float = 0.0, uncond_tail_drop: Optional[float] = None,
                 keep_maps: bool = True):
        self.model, self.cfg = model, cfg
        self.cfg_scale = cfg_scale
        self.tail_drop, self.uncond_tail_drop = tail_drop, uncond_tail_drop
        self.dcdit = is_dcdit(cfg.model.name)
        self.keep_maps = keep_maps
        self.records = []
        # DyDiT's gates change a forward's FLOPs at the same kept tokens: price each row from what they left.
        self._gate_pricing = None
        if self.dcdit and getattr(model, "dydit", False):
            self._gate_pricing = (dcdit_flops_coeffs(model), dydit_dims(model)[0])
        if not self.dcdit and (tail_drop > 0 or uncond_tail_drop is not None):
            raise SampleError(f"model {cfg.model.name} has no router: tail dropping and Lite-CFG need a DC-DiT")

    @property
    def use_cfg(self) -> bool:
        return self.cfg_scale > 1.0

    def reset(self) -> None:
        self.records = []

    def _sync(self, x: torch.Tensor) -> None:
        if x.is_cuda:
            torch.cuda.synchronize(x.device)

    def __call__(self, x, t, y):
        kw = {}
        if self.dcdit:
            kw = dict(tail_drop=self.tail_drop, return_info=True)
        self._sync(x)
        start = time.perf_counter()
        if self.use_cfg:
            if self.dcdit and self.uncond_tail_drop is not None:
                kw["uncond_tail_drop"] = self.uncond_tail_drop
            res = self.model.forward_with_cfg(x, t, y, self.cfg_scale, guide_channels=self.cfg.sample.guide_channels,
                                              **kw)
        else:
            res = self.model(x, t, y, **kw)
        out, info = res if self.dcdit else (res, None)
        self._sync(x)
        record = {"t": int(t[0]), "seconds": time.perf_counter() - start}
        if info is not None:
            record["kept"] = info.kept.detach().cpu()                        # (rows,)
            if info.stage1 is not None:  # a two-stage model: stage 0's kept tokens too (its FLOPs depend on both)
                record["kept0"] = info.router.mask.sum(1).detach().cpu()     # (rows,)
            record["mean_prob"] = info.router.prob.detach().float().mean(-1).cpu()  # (rows,)
            if self._gate_pricing is not None and info.dydit is not None:
                record["flops"] = torch.from_numpy(dydit_info_row_flops(*self._gate_pricing, info.dydit)[0])  # (rows,)
            if self.keep_maps:
                record["prob"] = info.router.prob.detach().cpu()             # (rows, L)
                record["mask"] = info.router.mask.detach().cpu()             # (rows, L)
                if info.stage1 is not None:
                    record["mask1"] = inner_kept_grid(info).cpu()            # (rows, L) the inner stage's tokens
        self.records.append(record)
        return out


def initial_noise(cfg, gens: list, device) -> torch.Tensor:
    """x_T of each image from its own generator, drawn on the generator's device then moved."""
    c, s = cfg.model.in_channels, cfg.model.input_size
    rows = [torch.randn(1, c, s, s, generator=g, device=g.device) for g in gens]   # B x (1, C, H, W)
    return torch.cat(rows).to(device)                                               # (B, C, H, W)


@torch.no_grad()
def generate(model, cfg, labels: torch.Tensor, seed: int = 0, device="cpu", indices: Optional[Sequence[int]] = None,
             sampler: Optional[Sampler] = None, progressive: bool = False, progress: bool = False, vae=None,
             on_step: Optional[Callable[[], None]] = None):
    """Sample images for `labels` -> (B, C_img, H_img, W_img) in [-1, 1] (decoded when latent), or with
    progressive=True (images, steps) with steps a list of per-step dicts in model space, (B, C, H, W) each:
    x_t (the input the model and its router saw at that step), sample (x_{t-1}) and pred_xstart (predicted x0).

    indices: the image index of each label (default 0..B-1); it alone seeds that image's noise.
    sampler: default = the config's cfg_scale, tail dropping and Lite-CFG budget.
    on_step: called after every denoising step (a profiler's `step`).
    """
    labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
    n = len(labels)
    indices = list(range(n)) if indices is None else [int(i) for i in indices]
    if len(indices) != n:
        raise ValueError(f"generate: {len(indices)} image indices for {n} labels; expected one per label")
    if n == 0:
        raise ValueError("generate: expected at least one label")
    if bool(((labels < 0) | (labels >= cfg.model.num_classes)).any()):
        raise ValueError(f"generate: labels {labels.tolist()} outside [0, model.num_classes={cfg.model.num_classes})")
    if sampler is None:
        sampler = Sampler(model, cfg, cfg.sample.cfg_scale, cfg.sample.tail_dropping_fraction, uncond_budget(cfg))
    diffusion = create_diffusion(str(cfg.sample.num_sampling_steps), noise_schedule=cfg.diffusion.noise_schedule,
                                 learn_sigma=cfg.model.learn_sigma, diffusion_steps=cfg.diffusion.diffusion_steps)
    gens = image_generators(seed, indices)
    z = initial_noise(cfg, gens, device)                                     # (B, C, H, W)
    y = labels.to(device)                                                    # (B,)
    if sampler.use_cfg:
        z = torch.cat([z, z], dim=0)                                         # (2B, C, H, W)
        y = torch.cat([y, torch.full_like(y, cfg.model.num_classes)], dim=0)  # (2B,) null class second
        # The unconditional half's per-step noise is never used (forward_with_cfg reads the first half),
        # but it must come from generators of its own so that drawing it does not shift the first half's.
        gens = gens + image_generators(seed, indices, stream=UNCOND_NOISE_STREAM)
    kwargs = dict(noise=z, clip_denoised=False, model_kwargs=dict(y=y), device=device, generator=gens)
    was_training = model.training
    model.eval()  # label dropout and any train-only behaviour off, whatever the caller left on
    try:
        steps, x_t = [], z
        for out in diffusion.p_sample_loop_progressive(sampler, z.shape, progress=progress, **kwargs):
            if progressive:
                steps.append({"x_t": x_t[:n].cpu(), "sample": out["sample"][:n].cpu(),
                              "pred_xstart": out["pred_xstart"][:n].cpu()})
            x_t = out["sample"]                                              # (B or 2B, C, H, W): next step's input
            if on_step is not None:
                on_step()
        images = to_pixels(x_t[:n], cfg, vae, device)                        # (B, C_img, H_img, W_img)
    finally:
        model.train(was_training)
    return (images, steps) if progressive else images


def image_size(cfg) -> int:
    """Side of the output images: the latent grid times the autoencoder's downsampling for features, else the
    model grid."""
    return cfg.model.input_size * (cfg.data.vae_downsample if cfg.data.kind == "features" else 1)


def to_pixels(x: torch.Tensor, cfg, vae=None, device="cpu") -> torch.Tensor:
    """Model space -> images in [-1, 1]: identity for pixel-space data, the autoencoder's decode for latents."""
    if cfg.data.kind != "features":
        return x
    if vae is None:
        vae = load_vae_if_latent(cfg, device)
    from vae import decode_latents
    return decode_latents(vae, x.to(device), cfg.data.latent_scale, cfg.data.latent_shift)


GRID_GUTTER = 2      # black pixels between and around the images of a grid
GRID_MIN_SIDE = 64   # smaller images are enlarged to at least this many pixels a side (16 x 16 digits are unreadable)


def grid_upscale(side: int, min_side: int = GRID_MIN_SIDE) -> int:
    """The integer factor k >= 1 that brings an image side of `side` pixels to at least `min_side`."""
    return max(1, math.ceil(min_side / side))


def class_grid(labels: Sequence[int], nrow: int) -> tuple:
    """How a grid of class-conditional samples reads best -> (image order, images per row, row labels).

    When every class appears equally often and more than once (sample.py's default for small class
    counts), each class gets a row of its own, in order of first appearance, labelled "class c". Otherwise
    the images stay in order, `nrow` per row, and each row is labelled with its classes, left to right.
    """
    labels = [int(c) for c in labels]
    classes = list(dict.fromkeys(labels))
    counts = {labels.count(c) for c in classes}
    if len(counts) == 1 and counts.pop() > 1:
        order = [i for c in classes for i, label in enumerate(labels) if label == c]
        return order, len(order) // len(classes), [f"class {c}" for c in classes]
    cols = max(1, min(nrow, len(labels)))
    rows = [labels[r:r + cols] for r in range(0, len(labels), cols)]
    names = [f"class {row[0]}" if len(set(row)) == 1 else ", ".join(map(str, row)) for row in rows]
    return list(range(len(labels))), cols, names


def save_grid(images: torch.Tensor, path: str, nrow: int = 8, row_labels: Optional[Sequence[str]] = None,
              min_side: int = GRID_MIN_SIDE) -> int:
    """(B, C, H, W) images in [-1, 1] -> one PNG grid, `nrow` images per row, 2-pixel black gutters.

    Images under `min_side` pixels a side are enlarged by the integer factor k = grid_upscale(...) with
    nearest neighbour: every pixel becomes a k x k block of the same value, so the grid still shows the
    sampled values exactly. row_labels: one text per grid row, written in a margin on its left.
    Returns k.
    """
    from PIL import Image, ImageDraw, ImageFont
    arr = to_uint8_images(images)                                             # (B, H, W, 3) uint8
    b, h, w, _ = arr.shape
    k = grid_upscale(min(h, w), min_side)
    arr = arr.repeat(k, axis=1).repeat(k, axis=2)                             # (B, kH, kW, 3)
    h, w, g = h * k, w * k, GRID_GUTTER
    cols = max(1, min(nrow, b))
    rows = math.ceil(b / cols)
    labels = [] if row_labels is None else [str(t) for t in row_labels]
    if row_labels is not None and len(labels) != rows:
        raise ValueError(f"save_grid: {len(labels)} row labels for {rows} rows of {cols} images; expected one per row")
    # Text about a quarter of a row high, within the sizes the default font stays legible and compact at.
    font = ImageFont.load_default(size=min(max(10, h // 4), 24))
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    boxes = [measure.textbbox((0, 0), t, font=font) for t in labels]          # (left, top, right, bottom) each
    margin = max(box[2] for box in boxes) + 2 * g if labels else 0
    grid = np.zeros((rows * (h + g) + g, margin + cols * (w + g) + g, 3), dtype=np.uint8)
    for i in range(b):
        r, c = divmod(i, cols)
        top, left = g + r * (h + g), margin + g + c * (w + g)
        grid[top:top + h, left:left + w] = arr[i]
    picture = Image.fromarray(grid)
    draw = ImageDraw.Draw(picture)
    for r, (text, box) in enumerate(zip(labels, boxes)):
        middle = g + r * (h + g) + h // 2
        draw.text((g, middle - (box[1] + box[3]) // 2), text, fill=(255, 255, 255), font=font)  # centred on its row
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    picture.save(path)
    return k


def add_sampling_args(parser: argparse.ArgumentParser) -> None:
    """Flags shared by sample.py and sample_ddp.py; unset flags keep the config's sample section."""
    parser.add_argument("--ckpt", default="", help="our training checkpoint or a public DiT state dict")
    parser.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    parser.add_argument("--cfg-scale", type=float, default=None, help="classifier-free guidance scale (1 = off)")
    parser.add_argument("--num-sampling-steps", type=int, default=None, help="DDPM steps (respaced)")
    parser.add_argument("--seed", type=int, default=None, help="global seed; image i is seeded by (seed, i)")
    parser.add_argument("--tail-dropping-fraction", type=float, default=None,
                        help="elastic inference: drop this share of each sample's lowest-p boundary tokens")
    parser.add_argument("--lite-cfg", action="store_true",
                        help="give the unconditional CFG branch its own budget (--uncond-tail-dropping-fraction)")
    parser.add_argument("--uncond-tail-dropping-fraction", type=float, default=None,
                        help="Lite-CFG budget of the unconditional branch (needs --lite-cfg)")
    parser.add_argument("--vae", choices=("ema", "mse"), default=None,
                        help="SD-VAE that decodes latents (data.vae; default: the checkpoint's config)")
    parser.add_argument("--vae-path", default=os.environ.get("DCDIT_VAE_PATH") or None,
                        help="local diffusers AutoencoderKL folder (data.vae_path; default: $DCDIT_VAE_PATH, the "
                             "checkpoint's config, else the hub's SD-VAE)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def apply_sampling_args(cfg, args) -> None:
    """Command-line flags override the sample section (same validation as the config file), then the
    combinations that cannot mean what the user asked are refused with the flag named."""
    s = cfg.sample
    if getattr(args, "vae", None) is not None:
        cfg.data.vae = args.vae
    if getattr(args, "vae_path", None) is not None:
        cfg.data.vae_path = args.vae_path
    # --cfg-scale sets sample.cfg_scale here (pictures, 4.0 unless set) and sample.fid_cfg_scale in sample_ddp.py
    # (FID, 1.5 unless set: DiT's and the release's convention); the scale in use is then sample.cfg_scale.
    guidance = getattr(args, "guidance_field", "cfg_scale")
    for flag, field in (("cfg_scale", guidance), ("num_sampling_steps", "num_sampling_steps"), ("seed", "seed"),
                        ("tail_dropping_fraction", "tail_dropping_fraction"),
                        ("uncond_tail_dropping_fraction", "uncond_tail_dropping_fraction")):
        value = getattr(args, flag, None)
        if value is not None:
            setattr(s, field, value)
    s.cfg_scale = getattr(s, guidance)
    s.lite_cfg = s.lite_cfg or bool(getattr(args, "lite_cfg", False))
    validate(cfg)
    if getattr(args, "uncond_tail_dropping_fraction", None) is not None and not s.lite_cfg:
        raise SampleError("--uncond-tail-dropping-fraction needs --lite-cfg (without it both CFG branches use "
                          "--tail-dropping-fraction)")
    if s.lite_cfg and s.cfg_scale <= 1.0:
        raise SampleError(f"--lite-cfg needs --cfg-scale > 1 (it sets the budget of the unconditional guidance "
                          f"branch, which cfg_scale={s.cfg_scale} does not run)")
    if not is_dcdit(cfg.model.name) and (s.tail_dropping_fraction > 0 or s.lite_cfg):
        raise SampleError(f"--tail-dropping-fraction / --lite-cfg need a DC-DiT; model.name={cfg.model.name!r} "
                          f"has no router")


def uncond_budget(cfg) -> Optional[float]:
    """Tail-drop fraction of the unconditional CFG rows under Lite-CFG (sample.uncond_tail_dropping_fraction,
    0.0 unless set, as the release), None when Lite-CFG is off (both branches at tail_dropping_fraction)."""
    s = cfg.sample
    return s.uncond_tail_dropping_fraction if s.lite_cfg else None


def describe_budgets(cfg) -> str:
    """One line saying which tail-drop fraction each CFG branch runs, printed before sampling."""
    s = cfg.sample
    if not is_dcdit(cfg.model.name):
        return f"cfg {s.cfg_scale}, full token grid (DiT)"
    if s.cfg_scale <= 1.0:
        return f"no guidance; tail drop {s.tail_dropping_fraction}"
    if not s.lite_cfg:
        return f"cfg {s.cfg_scale}; both branches at tail drop {s.tail_dropping_fraction}"
    line = (f"cfg {s.cfg_scale}, Lite-CFG: conditional branch at tail drop {s.tail_dropping_fraction}, "
            f"unconditional branch at {s.uncond_tail_dropping_fraction}")
    if s.uncond_tail_dropping_fraction == s.tail_dropping_fraction:
        line += " (same budget: Lite-CFG saves nothing; set --uncond-tail-dropping-fraction)"
    elif s.uncond_tail_dropping_fraction < s.tail_dropping_fraction:
        line += " (the guidance branch keeps more tokens than the conditional one)"
    return line


def kept_by_branch(records: list, n: int, use_cfg: bool) -> dict:
    """Mean tokens the inner blocks ran per image and step, per CFG branch, from Sampler.records."""
    kept = torch.stack([r["kept"].float() for r in records if "kept" in r])  # (S, rows)
    out = {"cond": float(kept[:, :n].mean())}
    if use_cfg:
        out["uncond"] = float(kept[:, n:].mean())
    return out


def load_vae_if_latent(cfg, device):
    """The autoencoder of data.vae / data.vae_path for data.kind=features (latents need decoding), else None;
    checked to be the one whose latents the config describes (channels, downsampling, scale, shift)."""
    if cfg.data.kind != "features":
        return None
    from vae import check_geometry, latent_geometry, load_vae
    vae = load_vae(cfg.data.vae, cfg.data.vae_path, device)
    check_geometry(latent_geometry(vae), cfg.data, cfg.model.in_channels,
                   cfg.data.vae_path or f"stabilityai/sd-vae-ft-{cfg.data.vae}")
    return vae


def _spread(x: np.ndarray) -> dict:
    """(S, n) values per step and image -> per step the mean, min and max over images."""
    return {"mean": x.mean(1).tolist(), "min": x.min(1).tolist(), "max": x.max(1).tolist()}


def sampling_summary(sampler: Sampler, n: int) -> dict:
    """What a sampling run spent, per CFG branch ("cond", and "uncond" under CFG), from `sampler.records`.

    Per branch: the tail-drop fraction it ran at and TFLOPs/img in total, per step and by component
    (models.flops: component_coeffs priced at the kept counts as run, so Lite-CFG's cheaper unconditional
    rows cost less; a DiT's fixed cost from component_flops); for DC-DiT also the kept share M / L and mean
    boundary probability (over the run, and per step as mean, min and max over the n images) and the
    compression L / M (geometric mean, min and max over steps and images). For the run: wall time per step
    (both branches run in one model call), TFLOPs/img summed over branches, by component too, and (DC-DiT)
    the raw kept counts `kept_tokens` (steps, rows) in sample_ddp.py's layout.
    """
    records, model, cfg = sampler.records, sampler.model, sampler.cfg
    if not records:
        raise ValueError("sampling_summary: the sampler has no records; pass it to generate(..., sampler=...) first")
    steps = len(records)
    seconds = np.array([r["seconds"] for r in records])                     # (S,)
    timed = seconds[1:] if steps > 1 else seconds  # the first call carries one-off costs (allocation, kernel choice)
    rows = {"cond": slice(0, n), "uncond": slice(n, 2 * n)} if sampler.use_cfg else {"cond": slice(0, n)}
    uncond_f = sampler.tail_drop if sampler.uncond_tail_drop is None else sampler.uncond_tail_drop
    out = {"model": cfg.model.name, "images": n, "steps": steps, "timesteps": [r["t"] for r in records],
           "cfg_scale": sampler.cfg_scale, "budgets": describe_budgets(cfg),
           "seconds_per_step": seconds.tolist(), "mean_seconds_per_step": float(timed.mean()),
           "mean_seconds_per_step_per_image": float(timed.mean() / n), "branches": {}}
    if sampler.dcdit:
        L = model.grid[0] * model.grid[1]
        kept = torch.stack([r["kept"] for r in records]).double().numpy()       # (S, rows)
        kept0 = torch.stack([r["kept0"] for r in records]).double().numpy() if "kept0" in records[0] else None
        prob = torch.stack([r["mean_prob"] for r in records]).double().numpy()  # (S, rows)
        parts = component_coeffs(model)
        coeffs = dcdit_flops_coeffs(model)  # the parts' coefficients add up to these
        out["tokens"] = L
        out["kept_tokens"] = kept.astype(np.int64).tolist()  # (S, rows) as sample_ddp.py's, for tools/flops.py
        if kept0 is not None:
            out["kept_tokens_stage0"] = kept0.astype(np.int64).tolist()
        if cfg.dydit.enabled:
            out["flops_note"] = "DC-DiT cost at the kept tokens: DyDiT's gates are not priced here"
    for branch, sl in rows.items():
        if sampler.dcdit:
            m = kept[:, sl]                                                      # (S, n)
            counts = m if kept0 is None else (m, kept0[:, sl])                   # what models.flops prices
            compression = L / m
            b = {"tail_dropping_fraction": sampler.tail_drop if branch == "cond" else uncond_f,
                 "kept_share": float((m / L).mean()), "boundary_prob": float(prob[:, sl].mean()),
                 "compression": {"geomean": float(np.exp(np.log(compression).mean())),
                                 "min": float(compression.min()), "max": float(compression.max())},
                 "tflops_per_img_by_component": tflops_by_component(parts, counts, cfg=False),
                 "per_step": {"kept_share": _spread(m / L), "boundary_prob": _spread(prob[:, sl]),
                              "tflops_per_img": tflops_per_step(coeffs, counts, cfg=False).tolist()}}
        else:  # a DiT runs every token of every row: a fixed cost per step
            by_component = tflops_per_image_by_component(model, steps=steps, cfg=False)
            b = {"tail_dropping_fraction": None, "tflops_per_img_by_component": by_component,
                 "per_step": {"tflops_per_img": [sum(by_component.values()) / steps] * steps}}
        b["tflops_per_img"] = float(sum(b["tflops_per_img_by_component"].values()))
        out["branches"][branch] = b
    branches = out["branches"].values()
    out["tflops_per_img"] = float(sum(b["tflops_per_img"] for b in branches))
    names = next(iter(branches))["tflops_per_img_by_component"]
    out["tflops_per_img_by_component"] = {k: float(sum(b["tflops_per_img_by_component"][k] for b in branches))
                                          for k in names}
    return out


def format_summary(summary: dict) -> str:
    """sampling_summary as the table sample.py prints: one row per branch, then TFLOPs/img by component."""
    branches = summary["branches"]
    dcdit = "tokens" in summary
    lines = [f"summary: {summary['images']} images x {summary['steps']} steps; {summary['budgets']}"]
    if dcdit:
        lines.append(f"{'branch':8s} {'tail drop':>9s} {'kept M/L':>9s} {'L/M geomean [min, max]':>24s} "
                     f"{'mean p':>7s} {'TFLOPs/img':>11s}")
        for name, b in branches.items():
            c = b["compression"]
            span = f"{c['geomean']:.2f} [{c['min']:.2f}, {c['max']:.2f}]"
            lines.append(f"{name:8s} {b['tail_dropping_fraction']:9.2f} {b['kept_share']:9.1%} {span:>24s} "
                         f"{b['boundary_prob']:7.3f} {b['tflops_per_img']:11.4g}")
    else:
        lines.append(f"{'branch':8s} {'TFLOPs/img':>11s}   (DiT: every token at every step)")
        for name, b in branches.items():
            lines.append(f"{name:8s} {b['tflops_per_img']:11.4g}")
    lines.append(f"total TFLOPs/img {summary['tflops_per_img']:.4g}, by component:")
    total = summary["tflops_per_img_by_component"]
    lines.append(f"  {'component':12s} " + " ".join(f"{k:>11s}" for k in branches) + f" {'all':>11s} {'share':>6s}")
    for k, v in total.items():
        if v == 0:
            continue  # parts without FLOPs (gathers, norms) would only add zero rows
        per_branch = " ".join(f"{b['tflops_per_img_by_component'][k]:11.4g}" for b in branches.values())
        lines.append(f"  {k:12s} {per_branch} {v:11.4g} {v / summary['tflops_per_img']:6.1%}")
    lines.append(f"time per step: {summary['mean_seconds_per_step']:.4g} s for {summary['images']} images "
                 f"({summary['mean_seconds_per_step_per_image']:.4g} s per image; both branches in one call; "
                 f"mean over the steps after the first)")
    if "flops_note" in summary:
        lines.append(f"note: {summary['flops_note']}")
    return "\n".join(lines)


PROFILE_SKIP, PROFILE_WARMUP = 1, 1  # steps before the profiler records: one-off first-step costs, then its warm-up


def profiled_steps(num_steps: int, record_steps: int) -> range:
    """The 1-based sampling steps step_profiler records: after the skipped and warm-up steps, at most
    `record_steps`, and no further than the run goes (empty when the run is too short)."""
    first = PROFILE_SKIP + PROFILE_WARMUP + 1
    return range(first, min(first + record_steps, num_steps + 1))
