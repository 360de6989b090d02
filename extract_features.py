"""Encode an ImageFolder into autoencoder latents in Fast-DiT's layout, once, so training never runs the VAE.

    torchrun --nnodes=1 --nproc_per_node=8 extract_features.py \
        --data-path /path/to/imagenet/train --features-path /path/to/store/features
    python extract_features.py --data-path data/digits64 --features-path features --image-size 64 \
        --vae-path autoencoders/digits64                  # any diffusers AutoencoderKL

Writes features_path/imagenet{image_size}_features/{i}.npy, (1, C, h, w) float32 = (posterior sample - shift)
x scale, with C, the downsampling h = image_size / f, the scale and the shift read from the autoencoder's config
and recorded in imagenet{image_size}_features/latents.json (training and sampling check their config against
it), and features_path/imagenet{image_size}_labels/{i}.npy, (1,) int64, where i is the image's index
in the ImageFolder (2i and 2i + 1 for the original and its mirror with --flip both). Names and values
depend only on the image, its index and --seed -- not on the number of processes or the batch size -- so
a run can be resumed (finished files are skipped) or split across machines and give the same folder.
Preprocessing is DiT's: ADM center crop, then [-1, 1].
"""
import argparse
import os
import sys
from functools import partial

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.datasets import ImageFolder
from tqdm import tqdm

from data import DataError, center_crop_arr, feature_dirs, write_latents_record
from distributed import barrier, setup_distributed, teardown_distributed
from fileio import atomic_write
from vae import encode_latents, latent_geometry, load_vae

NOISE_STREAM = 0  # seed streams, so the flip coin and the posterior noise of an image are independent
FLIP_STREAM = 1


def image_seed(seed, index, stream=NOISE_STREAM):
    """A well-mixed 64-bit seed from (seed, index, stream): per-image randomness without a global RNG.

    Deliberately not sampling.image_seed: a feature folder's latents are a function of this hash (the
    posterior noise of file i), so a resumed, re-run or split extraction must keep drawing from it to give
    the same folder, and its streams (noise, flip) are numbered apart from the sampling streams."""
    return int(np.random.SeedSequence([seed, index, stream]).generate_state(1, dtype=np.uint64)[0])


def output_indices(index, flip):
    """File indices written for dataset image `index`: i, or 2i (original) and 2i + 1 (mirror)."""
    return [2 * index, 2 * index + 1] if flip == "both" else [index]


class ExtractionImages(Dataset):
    """ImageFolder images as (pixels (K, 3, S, S) in [-1, 1], label, index), K = 2 for --flip both."""

    def __init__(self, root, image_size, flip, seed):
        if not os.path.isdir(root):
            raise DataError(f"--data-path {root}: folder not found; expected an ImageFolder root "
                            f"(root/<class>/<image>)")
        try:
            self.folder = ImageFolder(root)
        except FileNotFoundError as e:  # torchvision's message for no class folders or no images
            raise DataError(f"--data-path {root}: no images found; expected root/<class>/<image> "
                            f"with .jpg/.png/... files ({e})") from e
        self.image_size, self.flip, self.seed = image_size, flip, seed

    def __len__(self):
        return len(self.folder)

    def __getitem__(self, index):
        path, label = self.folder.samples[index]
        try:
            image = self.folder.loader(path)  # RGB PIL image
        except OSError as e:
            raise DataError(f"{path}: cannot read image ({e})") from e
        image = center_crop_arr(image, self.image_size)
        if self.flip == "random":
            coin = np.random.default_rng(image_seed(self.seed, index, FLIP_STREAM)).random()
            if coin < 0.5:
                image = image.transpose(Image.FLIP_LEFT_RIGHT)
        x = torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1)  # (3, S, S)
        x = x / 127.5 - 1.0  # same as ToTensor + Normalize(0.5, 0.5)
        if self.flip == "both":
            x = torch.stack([x, x.flip(-1)])  # (2, 3, S, S)
        else:
            x = x[None]  # (1, 3, S, S)
        return x, label, index


def _npy_ok(path, shape):
    try:
        return np.load(path).shape == shape
    except (OSError, ValueError, EOFError):
        return False


def is_done(features_dir, labels_dir, out_index, feature_shape):
    """True when both files of `out_index` exist and load with the right shapes (resume support)."""
    return (_npy_ok(os.path.join(features_dir, f"{out_index}.npy"), feature_shape)
            and _npy_ok(os.path.join(labels_dir, f"{out_index}.npy"), (1,)))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-path", required=True, help="ImageFolder root: data_path/<class>/<image>")
    parser.add_argument("--features-path", required=True, help="output root (imagenet{size}_features/, _labels/)")
    parser.add_argument("--image-size", type=int, default=256,
                        help="pixels; latents are image_size // the autoencoder's downsampling factor")
    parser.add_argument("--vae", choices=["ema", "mse"], default="ema", help="stabilityai/sd-vae-ft-{vae}")
    parser.add_argument("--vae-path", default=None, help="local diffusers AutoencoderKL folder (overrides --vae)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per process per step")
    parser.add_argument("--num-workers", type=int, default=4)
    parser.add_argument("--flip", choices=["none", "random", "both"], default="random",
                        help="horizontal flip: random per image (seeded; Fast-DiT's and the release's augmentation, "
                             "the default), none, or both copies")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if args.image_size <= 0:
        parser.error(f"--image-size {args.image_size}: expected a positive number of pixels")
    if args.batch_size <= 0:
        parser.error(f"--batch-size {args.batch_size}: expected a positive integer")
    if args.seed < 0:
        parser.error(f"--seed {args.seed}: expected a non-negative integer")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available; use --device cpu")
    return args


@torch.inference_mode()
def main(argv=None):
    args = parse_args(argv)
    # Check the inputs before joining the process group, so a bad path fails fast on every rank.
    images = ExtractionImages(args.data_path, args.image_size, args.flip, args.seed)
    if args.vae_path is not None and not os.path.isdir(args.vae_path):
        raise DataError(f"--vae-path {args.vae_path}: folder not found; expected a diffusers AutoencoderKL folder")
    rank, world_size, device = setup_distributed(args.device)
    try:
        vae = load_vae(args.vae, args.vae_path or "", device)  # the shared loader (hub or local folder)
        geometry = latent_geometry(vae)  # channels, downsampling, scale and shift from the autoencoder's config
        f, scale, shift = geometry["downsample"], geometry["scaling_factor"], geometry["shift_factor"]
        if args.image_size % f:
            raise DataError(f"--image-size {args.image_size}: expected a multiple of the autoencoder's "
                            f"downsampling factor {f}")
        latent = args.image_size // f
        feature_shape = (1, geometry["latent_channels"], latent, latent)
        features_dir, labels_dir = (os.path.join(args.features_path, name) for name in feature_dirs(args.image_size))
        if rank == 0:
            write_latents_record(features_dir, geometry, args.vae_path or f"stabilityai/sd-vae-ft-{args.vae}",
                                 args.image_size)
        barrier()
        os.makedirs(labels_dir, exist_ok=True)

        # Strided shards, as DistributedSampler without shuffling but with no padded repeats at the tail:
        # every image belongs to exactly one rank. Finished images are dropped before loading (resume).
        shard = range(rank, len(images), world_size)
        todo = [i for i in shard
                if not all(is_done(features_dir, labels_dir, j, feature_shape) for j in output_indices(i, args.flip))]
        loader = DataLoader(images, batch_size=args.batch_size, sampler=todo, num_workers=args.num_workers,
                            pin_memory=device.type == "cuda")
        if rank == 0:
            print(f"{len(images)} images in {args.data_path}; rank 0 encodes {len(todo)} of its {len(shard)} "
                  f"({world_size} processes), latents {feature_shape} x {scale}", flush=True)
        for x, y, index in tqdm(loader, disable=rank != 0, desc="extract", unit="batch"):
            batch, copies = x.shape[:2]
            x = x.reshape(batch * copies, *x.shape[2:]).to(device, non_blocking=True)  # (B*K, 3, S, S)
            out = [j for i in index.tolist() for j in output_indices(i, args.flip)]  # B*K file indices
            labels = y.repeat_interleave(copies)  # (B*K,)
            # One CPU generator per output file: the noise is the same on any device, batch or world size.
            generators = [torch.Generator().manual_seed(image_seed(args.seed, j)) for j in out]
            z = encode_latents(vae, x, scale, shift, generator=generators)  # (B*K, C, h, w)
            z = z.float().cpu().numpy()
            for j, zj, yj in zip(out, z, labels.tolist()):
                # Atomic: a killed run leaves each .npy whole or absent, never half written.
                atomic_write(os.path.join(labels_dir, f"{j}.npy"), partial(np.save, arr=np.array([yj], dtype=np.int64)))
                atomic_write(os.path.join(features_dir, f"{j}.npy"), partial(np.save, arr=zj[None]))  # (1, C, h, w)
        barrier()
        if rank == 0:
            print(f"done: {len(images) * len(output_indices(0, args.flip))} latents in {args.features_path}")
    finally:
        teardown_distributed()


def cli(argv=None):
    """Run main; a user error (bad path, no images) becomes one `error: ...` line and exit code 2."""
    try:
        main(argv)
    except Exception as e:
        if getattr(e, "user_error", False):
            print(f"error: {e}", file=sys.stderr)
            return 2
        raise
    return 0


if __name__ == "__main__":
    sys.exit(cli())
