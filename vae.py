"""The autoencoder that maps images to the latents DiT and DC-DiT are trained on (Fast-DiT layout).

The paper's is SD-VAE (stabilityai/sd-vae-ft-ema: 4 channels, downsampling 8, scale 0.18215), but any diffusers
AutoencoderKL works: its latent channels, downsampling factor, scaling factor and shift are read from its own
config (`latent_geometry`), recorded next to extracted features (data.py reads them back) and checked against
the run's config, so a mismatch is a one-line error rather than a silently wrong decode.
"""
import os
from typing import Optional

import torch


class VAEError(RuntimeError):
    """The VAE could not be loaded (printed as one line by the scripts)."""
    user_error = True


def load_vae(vae: str = "ema", vae_path: str = "", device="cpu"):
    """diffusers AutoencoderKL: a local folder `vae_path`, else `stabilityai/sd-vae-ft-{vae}` from the hub."""
    from diffusers.models import AutoencoderKL

    if vae_path:
        if not os.path.isdir(vae_path):
            raise VAEError(f"--vae-path {vae_path}: no such folder (expected a diffusers AutoencoderKL folder)")
        source = vae_path
    else:
        if vae not in ("ema", "mse"):
            raise VAEError(f"vae {vae!r}: expected 'ema' or 'mse'")
        source = f"stabilityai/sd-vae-ft-{vae}"
    try:
        model = AutoencoderKL.from_pretrained(source)
    except Exception as e:  # network down, missing weight file, corrupt folder
        raise VAEError(f"could not load the VAE from {source}: {type(e).__name__}: {str(e).splitlines()[0]} "
                       f"(offline? download it once and pass --vae-path DIR)") from None
    return model.to(device).eval().requires_grad_(False)


def latent_geometry(vae) -> dict:
    """What a diffusers AutoencoderKL's config says about its latents: channels, downsampling factor (two per
    resolution below the first), and the scaling factor and shift that map them to unit variance
    (latents = (z - shift) * scale)."""
    c = vae.config
    return {"latent_channels": int(c.latent_channels), "downsample": 2 ** (len(c.block_out_channels) - 1),
            "scaling_factor": float(c.scaling_factor), "shift_factor": float(getattr(c, "shift_factor", None) or 0.0)}


def check_geometry(geometry: dict, data_cfg, in_channels: int, source: str) -> None:
    """The run's config must describe the autoencoder's latents: model.in_channels, data.vae_downsample,
    data.latent_scale and data.latent_shift; the first mismatch is a one-line error naming the key."""
    for key, want, have in (("model.in_channels", geometry["latent_channels"], in_channels),
                            ("data.vae_downsample", geometry["downsample"], data_cfg.vae_downsample),
                            ("data.latent_scale", geometry["scaling_factor"], data_cfg.latent_scale),
                            ("data.latent_shift", geometry["shift_factor"], data_cfg.latent_shift)):
        if abs(float(want) - float(have)) > 1e-6 * max(1.0, abs(float(want))):
            raise VAEError(f"{key}={have} does not match the autoencoder's latents ({source}: {want}); "
                           f"set {key}={want}")


@torch.no_grad()
def encode_latents(vae, x: torch.Tensor, scale: float, shift: float = 0.0,
                   generator: Optional[list] = None) -> torch.Tensor:
    """(B, 3, H, W) images in [-1, 1] -> (B, C, H/f, W/f) latents, a posterior sample mapped to unit variance."""
    return (vae.encode(x).latent_dist.sample(generator=generator) - shift) * scale


@torch.no_grad()
def decode_latents(vae, z: torch.Tensor, latent_scale: float, latent_shift: float = 0.0) -> torch.Tensor:
    """(B, C, h, w) latents as the model sees them -> (B, 3, f h, f w) images in about [-1, 1]."""
    return vae.decode(z / latent_scale + latent_shift).sample
