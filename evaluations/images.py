"""Image inputs of the evaluator: an .npz with `arr_0` (ADM's batch format), a folder of PNGs, an array.

Every source yields uint8 batches (B, H, W, 3), the form ADM's evaluator feeds to the Inception graph.
Large .npz files (50K samples at 256px are ~10 GB) are streamed batch by batch from the zip member,
as ADM does, instead of being loaded whole. Grayscale arrays (B, H, W) or (B, H, W, 1) are repeated
to three channels, the convention of data.to_uint8_images.
"""
import hashlib
import os
import zipfile

import numpy as np
from PIL import Image

IMAGE_KEY = "arr_0"
PNG_SUFFIX = ".png"


class ImageInputError(Exception):
    """A bad image input (missing file, wrong key, dtype or shape); scripts exit with code 2."""

    user_error = True


def as_rgb_uint8(batch, where):
    """(B, H, W[, 1 or 3]) uint8 -> (B, H, W, 3) uint8; anything else is an ImageInputError naming `where`."""
    if batch.dtype != np.uint8:
        raise ImageInputError(f"{where}: images are {batch.dtype}; expected uint8 in [0, 255] "
                              "(clamp(127.5 x + 128, 0, 255) of [-1, 1] samples)")
    if batch.ndim == 3:
        batch = batch[..., None]  # (B, H, W, 1)
    if batch.ndim != 4 or batch.shape[-1] not in (1, 3):
        raise ImageInputError(f"{where}: images have shape {batch.shape}; expected (N, H, W, 3) NHWC")
    if batch.shape[-1] == 1:
        batch = np.repeat(batch, 3, axis=-1)  # (B, H, W, 3)
    return batch


class ArrayImages:
    """Images already in memory (the bundled digits, tests); never cached."""

    def __init__(self, images, name="array"):
        self.images = as_rgb_uint8(np.asarray(images), name)
        self.name = name
        if len(self.images) == 0:
            raise ImageInputError(f"{name}: no images")

    def __len__(self):
        return len(self.images)

    def batches(self, batch_size):
        for start in range(0, len(self), batch_size):
            yield self.images[start:start + batch_size]  # (B, H, W, 3)

    def fingerprint(self):
        return None  # nothing on disk to key a cache on


class NpzImages:
    """`arr_0` of an .npz, read from the zip member in batches; the other keys (mu, sigma, ...) untouched."""

    def __init__(self, path):
        self.path = path
        self.name = path
        try:
            with zipfile.ZipFile(path) as archive:
                if f"{IMAGE_KEY}.npy" not in archive.namelist():
                    raise ImageInputError(f"{path}: no '{IMAGE_KEY}' array; expected an ADM-style batch "
                                          f"(keys found: {[n[:-4] for n in archive.namelist()]})")
                with archive.open(f"{IMAGE_KEY}.npy") as member:
                    self.shape, self.fortran, self.dtype = self._read_header(member)
        except (OSError, zipfile.BadZipFile) as e:
            raise ImageInputError(f"{path}: cannot be read as .npz ({e})") from None
        if len(self.shape) not in (3, 4) or self.shape[0] == 0:
            raise ImageInputError(f"{path}: '{IMAGE_KEY}' has shape {self.shape}; expected (N, H, W, 3), N > 0")
        as_rgb_uint8(np.zeros((1, *self.shape[1:]), self.dtype), path)  # dtype and shape checked up front

    @staticmethod
    def _read_header(member):
        version = np.lib.format.read_magic(member)
        reader = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
        if version not in reader:
            return None, None, None  # a rarer format: read the array whole below
        return reader[version](member)

    def __len__(self):
        return self.shape[0]

    def batches(self, batch_size):
        if self.shape is None or self.fortran or self.dtype.hasobject:
            images = np.load(self.path)[IMAGE_KEY]
            for start in range(0, len(images), batch_size):
                yield as_rgb_uint8(images[start:start + batch_size], self.path)
            return
        per_image = int(np.prod(self.shape[1:])) * self.dtype.itemsize
        with zipfile.ZipFile(self.path) as archive, archive.open(f"{IMAGE_KEY}.npy") as member:
            self._read_header(member)  # skip to the data
            for start in range(0, self.shape[0], batch_size):
                count = min(batch_size, self.shape[0] - start)
                data = member.read(count * per_image)
                if len(data) != count * per_image:
                    raise ImageInputError(f"{self.path}: '{IMAGE_KEY}' ends after {start} images; "
                                          f"the header promised {self.shape[0]}")
                batch = np.frombuffer(data, dtype=self.dtype).reshape(count, *self.shape[1:])  # (B, H, W, C)
                yield as_rgb_uint8(batch, self.path)

    def fingerprint(self):
        st = os.stat(self.path)
        return f"npz|{st.st_size}|{st.st_mtime_ns}"


class PngFolder:
    """The .png files of a folder (not recursive), sorted by name; all must share one size."""

    def __init__(self, path):
        self.path = path
        self.name = path
        self.files = sorted(f for f in os.listdir(path) if f.lower().endswith(PNG_SUFFIX))
        if not self.files:
            raise ImageInputError(f"{path}: a folder without .png files; expected sample PNGs or an .npz")

    def __len__(self):
        return len(self.files)

    def _load(self, name):
        with Image.open(os.path.join(self.path, name)) as image:
            return np.asarray(image.convert("RGB"))  # (H, W, 3) uint8

    def batches(self, batch_size):
        first_shape = None
        for start in range(0, len(self.files), batch_size):
            batch = [self._load(name) for name in self.files[start:start + batch_size]]
            for name, image in zip(self.files[start:], batch):
                first_shape = first_shape or image.shape
                if image.shape != first_shape:
                    raise ImageInputError(f"{os.path.join(self.path, name)}: size {image.shape[:2]}; expected "
                                          f"{first_shape[:2]} like {self.files[0]}")
            yield np.stack(batch)  # (B, H, W, 3)

    def fingerprint(self):
        digest = hashlib.sha256()
        for name in self.files:
            st = os.stat(os.path.join(self.path, name))
            digest.update(f"{name}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        return f"png|{len(self.files)}|{digest.hexdigest()}"


def open_images(path):
    """An ImageSource for an .npz file or a folder of PNGs."""
    if os.path.isdir(path):
        return PngFolder(path)
    if os.path.isfile(path):
        return NpzImages(path)
    raise ImageInputError(f"{path}: no such file or folder; expected an .npz with '{IMAGE_KEY}' or a folder of PNGs")


def read_reference_statistics(path, dims):
    """Statistics stored in an ADM reference .npz: {'fid': (mu, sigma), 'sfid': (mu_s, sigma_s)} as present.

    `dims` {'fid': 2048, 'sfid': 2023} is what the network gives; stored statistics of another size
    (another feature layer) are an ImageInputError rather than a wrong number.
    """
    if not (os.path.isfile(path) and zipfile.is_zipfile(path)):
        return {}
    stats = {}
    with np.load(path) as npz:
        for metric, (mu, sigma) in (("fid", ("mu", "sigma")), ("sfid", ("mu_s", "sigma_s"))):
            if mu in npz.files and sigma in npz.files:
                stats[metric] = (npz[mu].astype(np.float64), npz[sigma].astype(np.float64))
                d = dims[metric]
                if stats[metric][0].shape != (d,) or stats[metric][1].shape != (d, d):
                    raise ImageInputError(f"{path}: stored {mu} {stats[metric][0].shape} and {sigma} "
                                          f"{stats[metric][1].shape}; expected ({d},) and ({d}, {d})")
    return stats
