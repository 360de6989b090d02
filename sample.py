"""Sample a class grid from a DiT or DC-DiT checkpoint, plus (DC-DiT) a chunking visualisation.

    python sample.py --config configs/DCDiT-B-N4.yaml --ckpt results/000-DCDiT-B/checkpoints/0400000.pt
    python sample.py --ckpt DiT-XL-2-256x256.pt --config configs/DiT-XL-2.yaml          # public DiT weights
    python sample.py --ckpt ... --tail-dropping-fraction 0.3                             # elastic inference
    python sample.py --ckpt ... --cfg-scale 1.5 --lite-cfg --uncond-tail-dropping-fraction 0.9

Writes `sample.png` and, for DC-DiT, `chunking_viz.png`: for a few samples, columns at 5 timesteps
from noisy to clean; rows alternate the current predicted x0 and the boundary-probability map, with
the share of kept tokens under each column. Every image has its own seed (seed + index), so an image
does not depend on the batch it was drawn in.
"""
import argparse
import math
import os
from typing import Optional, Sequence

import numpy as np
import torch

from config import add_config_args, format_config, load_config, main_guard
from data import to_uint8_images
from diffusion import create_diffusion
from models import create_model, is_dcdit


class SampleError(RuntimeError):
    user_error = True


def load_model_for_sampling(args, ckpt_path: str, use_ema: bool = True, device="cpu"):
    """-> (model, cfg). Our training checkpoints carry their config, which --config and `section.field=value`
    overrides then refine; a public DiT checkpoint is a bare state dict (or {"model"/"ema": ...}) and
    takes the model from --config."""
    state, saved = None, None
    if ckpt_path:
        try:
            ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise SampleError(f"cannot read checkpoint {ckpt_path}: {type(e).__name__}: {str(e).splitlines()[0]}") from None
        if isinstance(ckpt, dict) and "config" in ckpt:
            saved = ckpt["config"]
        if isinstance(ckpt, dict) and ("ema" in ckpt or "model" in ckpt):
            state = ckpt["ema"] if (use_ema and "ema" in ckpt) else ckpt["model"]
        else:
            state = ckpt
    cfg = load_config(args.config, args.overrides, base=saved)
    if args.dry_run:
        print(format_config(cfg), end="")
        raise SystemExit(0)
    model = create_model(cfg.model)
    if state is not None:
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise SampleError(f"checkpoint {ckpt_path} does not fit model {cfg.model.name}: "
                              f"{str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else e}") from None
    return model.to(device).eval(), cfg


def image_generators(seed: int, indices: Sequence[int], device) -> list:
    """One generator per image, seeded by (seed, image index): results independent of batching."""
    return [torch.Generator(device=device).manual_seed(seed * 1_000_003 + int(i)) for i in indices]


class Sampler:
    """Wraps a model for the diffusion loop: CFG / Lite-CFG / tail dropping, recording chunking stats."""

    def __init__(self, model, cfg, cfg_scale: float, tail_drop=0.0, uncond_tail_drop: Optional[float] = None):
        self.model, self.cfg = model, cfg
        self.cfg_scale = cfg_scale
        self.tail_drop, self.uncond_tail_drop = tail_drop, uncond_tail_drop
        self.dcdit = is_dcdit(cfg.model.name)
        self.records = []  # per model call: dict(t, kept (B,), prob (B, L)) of the conditional half

    @property
    def use_cfg(self) -> bool:
        return self.cfg_scale > 1.0

    def __call__(self, x, t, y):
        kw = {}
        if self.dcdit:
            kw = dict(tail_drop=self.tail_drop, return_info=True)
        if self.use_cfg:
            if self.dcdit and self.uncond_tail_drop is not None:
                kw["uncond_tail_drop"] = self.uncond_tail_drop
            res = self.model.forward_with_cfg(x, t, y, self.cfg_scale, guide_channels=self.cfg.sample.guide_channels, **kw)
        else:
            res = self.model(x, t, y, **kw)
        if not self.dcdit:
            return res
        out, info = res
        self.records.append({"t": int(t[0]), "kept": info.kept.detach().cpu(),
                             "prob": info.router.prob.detach().cpu(), "mask": info.router.mask.detach().cpu()})
        return out


def initial_noise(cfg, gens: list, device) -> torch.Tensor:
    c, s = cfg.model.in_channels, cfg.model.input_size
    return torch.cat([torch.randn(1, c, s, s, generator=g, device=device) for g in gens])    # (B, C, H, W)


@torch.no_grad()
def generate(model, cfg, labels: torch.Tensor, seed: int = 0, device="cpu", indices: Optional[Sequence[int]] = None,
             sampler: Optional[Sampler] = None, progressive: bool = False, progress: bool = False, vae=None):
    """Sample images for `labels` -> (B, C_img, H_img, W_img) in [-1, 1] (decoded when latent), or with
    progressive=True a list of per-step dicts (x_t and predicted x0 in model space) as well."""
    n = len(labels)
    indices = list(range(n)) if indices is None else list(indices)
    sampler = sampler or Sampler(model, cfg, cfg.sample.cfg_scale, cfg.sample.tail_dropping_fraction)
    diffusion = create_diffusion(str(cfg.sample.num_sampling_steps), noise_schedule=cfg.diffusion.noise_schedule,
                                 learn_sigma=cfg.model.learn_sigma, diffusion_steps=cfg.diffusion.diffusion_steps)
    gens = image_generators(seed, indices, device)
    z = initial_noise(cfg, gens, device)                                     # (B, C, H, W)
    y = labels.to(device)
    if sampler.use_cfg:
        z = torch.cat([z, z], dim=0)                                         # (2B, C, H, W)
        y = torch.cat([y, torch.full_like(y, cfg.model.num_classes)], dim=0)
        # The unconditional half's per-step noise is never used (forward_with_cfg reads the first half).
        gens = gens + image_generators(seed + 7919, indices, device)
    kwargs = dict(noise=z, clip_denoised=False, model_kwargs=dict(y=y), device=device, generator=gens)
    steps = []
    if progressive:
        for out in diffusion.p_sample_loop_progressive(sampler, z.shape, progress=progress, **kwargs):
            steps.append({"sample": out["sample"][:n].cpu(), "pred_xstart": out["pred_xstart"][:n].cpu()})
        samples = steps[-1]["sample"].to(device)
    else:
        samples = diffusion.p_sample_loop(sampler, z.shape, progress=progress, **kwargs)[:n]
    images = to_pixels(samples, cfg, vae, device)
    return (images, steps) if progressive else images


def to_pixels(x: torch.Tensor, cfg, vae=None, device="cpu") -> torch.Tensor:
    """Model space -> images in [-1, 1]: identity for pixel-space data, SD-VAE decode for latents."""
    if cfg.data.kind != "features":
        return x
    if vae is None:
        from vae import load_vae
        vae = load_vae(cfg.data.vae, os.environ.get("DCDIT_VAE_PATH", ""), device)
    from vae import decode_latents
    return decode_latents(vae, x.to(device), cfg.data.latent_scale)


def save_grid(images: torch.Tensor, path: str, nrow: int = 8) -> None:
    from PIL import Image
    arr = to_uint8_images(images)                                             # (B, H, W, 3) uint8
    b, h, w, _ = arr.shape
    rows = math.ceil(b / nrow)
    grid = np.zeros((rows * (h + 2) + 2, nrow * (w + 2) + 2, 3), dtype=np.uint8)
    for i in range(b):
        r, c = divmod(i, nrow)
        grid[2 + r * (h + 2): 2 + r * (h + 2) + h, 2 + c * (w + 2): 2 + c * (w + 2) + w] = arr[i]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(grid).save(path)


def chunking_viz(steps: list, records: list, cfg, path: str, num_samples: int = 4, num_cols: int = 5,
                 vae=None, device="cpu") -> dict:
    """Figure of predicted x0 and boundary-probability maps at `num_cols` timesteps, noisy -> clean.
    Returns the kept-token shares shown (per column, per sample) for logging and tests."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = cfg.model.input_size
    n = min(num_samples, steps[0]["pred_xstart"].shape[0])
    cols = np.linspace(0, len(steps) - 1, num_cols).round().astype(int)
    fig, axes = plt.subplots(2 * n, num_cols, figsize=(2.2 * num_cols, 2.2 * 2 * n), squeeze=False)
    shares = []
    for j, k in enumerate(cols):
        imgs = to_uint8_images(to_pixels(steps[k]["pred_xstart"][:n], cfg, vae, device))   # (n, H, W, 3)
        rec = records[k]
        prob = rec["prob"][:n].view(n, s, s).numpy()
        share = (rec["kept"][:n].float() / (s * s)).numpy()
        shares.append(share.tolist())
        for i in range(n):
            ax = axes[2 * i, j]
            ax.imshow(imgs[i])
            ax.set_axis_off()
            if i == 0:
                ax.set_title(f"t = {rec['t']}", fontsize=9)
            ax = axes[2 * i + 1, j]
            im = ax.imshow(prob[i], vmin=0, vmax=1, cmap="magma")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_xlabel(f"kept {100 * share[i]:.1f}%", fontsize=8)
    fig.colorbar(im, ax=axes.ravel().tolist(), fraction=0.02, label="boundary probability p")
    fig.suptitle("DC-DiT chunking: predicted x0 (top) and router boundary probability (bottom)", fontsize=10)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return {"timesteps": [records[k]["t"] for k in cols], "kept_share": shares}


def add_sampling_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt", default="", help="our training checkpoint or a public DiT state dict")
    parser.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    parser.add_argument("--cfg-scale", type=float, default=None)
    parser.add_argument("--num-sampling-steps", type=int, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--tail-dropping-fraction", type=float, default=None)
    parser.add_argument("--lite-cfg", action="store_true")
    parser.add_argument("--uncond-tail-dropping-fraction", type=float, default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def apply_sampling_args(cfg, args) -> None:
    """Command-line flags override the sample section (same validation as the config file)."""
    from config import validate
    s = cfg.sample
    for flag, field in (("cfg_scale", "cfg_scale"), ("num_sampling_steps", "num_sampling_steps"), ("seed", "seed"),
                        ("tail_dropping_fraction", "tail_dropping_fraction"),
                        ("uncond_tail_dropping_fraction", "uncond_tail_dropping_fraction")):
        value = getattr(args, flag)
        if value is not None:
            setattr(s, field, value)
    s.lite_cfg = s.lite_cfg or args.lite_cfg
    validate(cfg)


def uncond_budget(cfg) -> Optional[float]:
    s = cfg.sample
    if not s.lite_cfg:
        return None
    return s.uncond_tail_dropping_fraction if s.uncond_tail_dropping_fraction >= 0 else s.tail_dropping_fraction


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    add_sampling_args(parser)
    parser.add_argument("--class-labels", type=int, nargs="*", default=None, help="default: 207 360 387 974 88 979 417 279 or 0..N-1")
    parser.add_argument("--out-dir", default=".")
    args = parser.parse_args(argv)
    model, cfg = load_model_for_sampling(args, args.ckpt, not args.no_ema, args.device)
    apply_sampling_args(cfg, args)
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
    labels = torch.tensor(labels)
    vae = None
    if cfg.data.kind == "features":
        from vae import load_vae
        vae = load_vae(cfg.data.vae, os.environ.get("DCDIT_VAE_PATH", ""), args.device)
    sampler = Sampler(model, cfg, cfg.sample.cfg_scale, cfg.sample.tail_dropping_fraction, uncond_budget(cfg))
    dcdit = is_dcdit(cfg.model.name)
    res = generate(model, cfg, labels, seed=cfg.sample.seed, device=args.device, sampler=sampler,
                   progressive=dcdit, progress=True, vae=vae)
    images, steps = res if dcdit else (res, None)
    os.makedirs(args.out_dir, exist_ok=True)
    path = os.path.join(args.out_dir, "sample.png")
    save_grid(images, path, nrow=min(len(labels), 10 if cfg.model.num_classes <= 10 else 4))
    print(f"saved {path}")
    if dcdit:
        viz = chunking_viz(steps, sampler.records, cfg, os.path.join(args.out_dir, "chunking_viz.png"), vae=vae,
                           device=args.device)
        print(f"saved {os.path.join(args.out_dir, 'chunking_viz.png')}; kept-token share per column "
              f"(t = {viz['timesteps']}): {[round(float(np.mean(s)), 3) for s in viz['kept_share']]}")


if __name__ == "__main__":
    main_guard(main)()
