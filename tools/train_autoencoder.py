"""Train a small diffusers AutoencoderKL on the bundled digits: the paper's latent setting at CPU scale.

    python tools/train_autoencoder.py --out autoencoders/digits64                 # train (resumable), then report
    python tools/train_autoencoder.py --out autoencoders/digits64 --export-images data/digits64

The digits are resized to 64 x 64 RGB; the autoencoder downsamples by 4 into 4 latent channels, so latents are
16 x 16 x 4 (L = 256 tokens: DiT/2 sees 64, DC-DiT at N = 4 keeps about 64) - the geometry of the paper's
32 x 32 x 4 SD-VAE latents at a quarter of the tokens. It is the real class, saved with `save_pretrained`,
with its latent scaling factor set the way LDM sets SD-VAE's (1 / the std of the training latents), so
`extract_features.py --vae-path OUT` writes Fast-DiT feature folders from it and every script decodes with it
through `data.vae_path`, exactly as with SD-VAE.

Training (MSE + L1 reconstruction, a small KL weight) checkpoints OUT/train_state.pt every --ckpt-every steps
and continues from it when rerun. At the end OUT/report.json holds the reconstruction PSNR and FID of held-out
digits (Inception when its weights are installed, pixel features otherwise, labelled), and `--export-images`
writes the digits as an ImageFolder (DIR/<class>/<index>.png) for extract_features.py.
"""
import argparse
import json
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from config import main_guard
from data import digits_rgb, to_uint8_images
from fileio import atomic_save, atomic_write

IMAGE_SIZE = 64
HELD_OUT_EVERY = 10  # every 10th digit (50 per class) is held out for the report


class AutoencoderError(RuntimeError):
    user_error = True


def build_autoencoder():
    """AutoencoderKL with three resolutions (downsampling 4), 4 latent channels, widths 16-32-64: small enough
    to train on two CPU cores, and digits need little more."""
    from diffusers.models import AutoencoderKL
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
                         up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(16, 32, 64),
                         layers_per_block=1, latent_channels=4, norm_num_groups=8, sample_size=IMAGE_SIZE)


def split(n: int):
    held = np.arange(n) % HELD_OUT_EVERY == 0
    return np.flatnonzero(~held), np.flatnonzero(held)


def train(args, images: torch.Tensor, train_idx: np.ndarray):
    """Resumable training loop -> (the autoencoder, its training seconds summed over the invocations that ran it,
    each counted up to its last saved state)."""
    state_path = os.path.join(args.out, "train_state.pt")
    torch.manual_seed(args.seed)
    vae = build_autoencoder()
    opt = torch.optim.AdamW(vae.parameters(), lr=args.lr, weight_decay=0.0)
    step, before = 0, 0.0
    if os.path.isfile(state_path):
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        vae.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        step, before = int(state["step"]), float(state.get("seconds", float("nan")))  # nan: saved before it was kept
        print(f"resumed from step {step} ({state_path})")
    start = time.time()
    vae.train()
    bar = tqdm(total=args.steps, initial=step, desc="autoencoder", dynamic_ncols=True)
    while step < args.steps:
        g = torch.Generator().manual_seed(args.seed * 1_000_003 + step)  # the batch of a step is a function of it
        batch = images[torch.as_tensor(train_idx)[torch.randint(len(train_idx), (args.batch,), generator=g)]]
        posterior = vae.encode(batch).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=g)
        recon = vae.decode(z).sample
        kl = posterior.kl().mean() / batch[0].numel()  # per pixel, like the reconstruction terms
        loss = F.mse_loss(recon, batch) + F.l1_loss(recon, batch) + args.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if step % args.ckpt_every == 0 or step == args.steps:
            seconds = before + time.time() - start
            atomic_save({"model": vae.state_dict(), "opt": opt.state_dict(), "step": step, "seconds": seconds},
                        state_path)
    bar.close()
    return vae.eval(), before + time.time() - start


@torch.no_grad()
def latents_and_reconstructions(vae, images: torch.Tensor, batch: int = 100, decode: bool = True):
    """Posterior means (N, 4, 16, 16) and, with decode, their decodings (N, 3, 64, 64) (else None)."""
    zs, recons = [], []
    for i in range(0, len(images), batch):
        z = vae.encode(images[i:i + batch]).latent_dist.mean
        zs.append(z)
        if decode:
            recons.append(vae.decode(z).sample.clamp(-1, 1))
    return torch.cat(zs), (torch.cat(recons) if decode else None)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio of uint8 images, in dB."""
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0 ** 2 / max(mse, 1e-12)))


def report(vae, images: torch.Tensor, train_idx: np.ndarray, held_idx: np.ndarray, features: str) -> dict:
    from evaluations.activations import compute_activations
    from evaluations.images import ArrayImages
    from evaluations.inception import feature_net
    from evaluations.metrics import frechet_distance, gaussian_statistics
    # The scaling factor's std needs no more than a thousand training digits.
    z_train, _ = latents_and_reconstructions(vae, images[torch.as_tensor(train_idx[::4])], decode=False)
    _, recon = latents_and_reconstructions(vae, images[torch.as_tensor(held_idx)])
    real, fake = to_uint8_images(images[torch.as_tensor(held_idx)]), to_uint8_images(recon)
    net, label = feature_net(features)
    acts = [compute_activations(net, ArrayImages(a, name), batch_size=50, use_cache=False, desc=name).pool
            for a, name in ((real, "held-out digits"), (fake, "reconstructions"))]
    fid = frechet_distance(*gaussian_statistics(acts[0]), *gaussian_statistics(acts[1]), method="eigh")
    return {"psnr_db": psnr(real, fake), "fid": float(fid), "fid_features": label, "held_out": int(len(held_idx)),
            "latent_shape": list(z_train.shape[1:]), "latent_std": float(z_train.std()),
            "scaling_factor": float(1.0 / z_train.std())}


def export_images(folder: str, images: torch.Tensor, labels: torch.Tensor) -> None:
    """The digits as an ImageFolder of 64 x 64 RGB PNGs: what extract_features.py reads."""
    from PIL import Image
    pixels = to_uint8_images(images)  # (N, 64, 64, 3)
    for i, (image, label) in enumerate(tqdm(list(zip(pixels, labels.tolist())), desc="export")):
        os.makedirs(os.path.join(folder, str(label)), exist_ok=True)
        Image.fromarray(image).save(os.path.join(folder, str(label), f"{i:05d}.png"))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for the autoencoder (save_pretrained) and its report")
    parser.add_argument("--steps", type=int, default=6000)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--kl-weight", type=float, default=1e-4, help="weight of the per-pixel KL term")
    parser.add_argument("--ckpt-every", type=int, default=250)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--features", choices=("auto", "inception", "pixels"), default="auto",
                        help="FID features of the report (auto: Inception when its weights are installed)")
    parser.add_argument("--export-images", default=None, metavar="DIR", help="also write the digits as an ImageFolder")
    parser.add_argument("--export-limit", type=int, default=None, metavar="N",
                        help="export only the first N digits (a smoke test's feature folder)")
    args = parser.parse_args(argv)
    for name in ("steps", "batch", "ckpt_every") + (("export_limit",) if args.export_limit is not None else ()):
        if getattr(args, name) < 1:
            raise AutoencoderError(f"--{name.replace('_', '-')} {getattr(args, name)}: expected a positive integer")
    os.makedirs(args.out, exist_ok=True)
    images, labels = digits_rgb(IMAGE_SIZE)
    train_idx, held_idx = split(len(images))
    start = time.time()
    vae, train_seconds = train(args, images, train_idx)
    result = report(vae, images, train_idx, held_idx, args.features)
    # LDM's choice for SD-VAE: scale latents to unit variance, so the diffusion sees the noise level it assumes.
    vae.register_to_config(scaling_factor=result["scaling_factor"])
    vae.save_pretrained(args.out)
    result.update(steps=args.steps, seconds=round(time.time() - start, 1),
                  train_seconds=round(train_seconds, 1) if np.isfinite(train_seconds) else None)
    # Written last and atomically: reproduce.py takes a complete report.json as "this autoencoder is done".
    atomic_write(os.path.join(args.out, "report.json"), lambda f: f.write(json.dumps(result, indent=1).encode()))
    print(f"saved {args.out}: latents {tuple(result['latent_shape'])}, scaling factor {result['scaling_factor']:.4f}; "
          f"held-out reconstruction PSNR {result['psnr_db']:.2f} dB, FID {result['fid']:.2f} ({result['fid_features']})")
    if args.export_images:
        images, labels = images[:args.export_limit], labels[:args.export_limit]
        export_images(args.export_images, images, labels)
        print(f"wrote {len(images)} digits to {args.export_images} (an ImageFolder for extract_features.py)")


if __name__ == "__main__":
    main_guard(main)()
