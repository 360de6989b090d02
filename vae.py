"""The SD-VAE that maps images to the latents DiT and DC-DiT are trained on (Fast-DiT layout)."""
import os

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


@torch.no_grad()
def decode_latents(vae, z: torch.Tensor, latent_scale: float) -> torch.Tensor:
    """(B, 4, h, w) scaled latents -> (B, 3, 8h, 8w) images in about [-1, 1]."""
    return vae.decode(z / latent_scale).sample
