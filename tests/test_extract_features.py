"""extract_features.py end to end on CPU with a tiny random AutoencoderKL: files, values, torchrun, flips, resume."""
import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

import extract_features
from data import FeatureDataset, center_crop_arr, feature_dirs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGE_SIZE = 64  # latents 8 x 8
FEATURES_DIR, LABELS_DIR = feature_dirs(IMAGE_SIZE)  # imagenet64_features, imagenet64_labels
SEED = 3
# (class, height, width): non-square sizes exercise the ADM crop; 5 images so 2 ranks split 3 + 2.
IMAGES = [("cat", 64, 80), ("cat", 72, 64), ("cat", 64, 64), ("dog", 96, 70), ("dog", 64, 100)]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    from diffusers.models import AutoencoderKL

    root = tmp_path_factory.mktemp("extract")
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 16, 16, 16),
                        layers_per_block=1, latent_channels=4, norm_num_groups=8, sample_size=IMAGE_SIZE)
    vae.save_pretrained(root / "vae")
    rng = np.random.default_rng(0)
    paths = []
    for k, (cls, h, w) in enumerate(IMAGES):
        os.makedirs(root / "images" / cls, exist_ok=True)
        path = root / "images" / cls / f"{k}.png"
        Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return {"root": root, "vae": str(root / "vae"), "images": str(root / "images"), "paths": paths,
            "labels": [0, 0, 0, 1, 1]}  # ImageFolder: classes sorted, files sorted within a class


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def extract_args(workspace, out, *extra):
    """The tests compare against unflipped encodings unless they ask for a flip mode (the default is random)."""
    flip = [] if "--flip" in extra else ["--flip", "none"]
    return ["--data-path", workspace["images"], "--features-path", str(out), "--vae-path", workspace["vae"],
            "--image-size", str(IMAGE_SIZE), "--device", "cpu", "--num-workers", "0", "--seed", str(SEED), *flip,
            *extra]


def run_extract(workspace, out, *extra, nproc=1):
    """The script as users run it: `python extract_features.py` or `torchrun --nproc_per_node N ...`."""
    args = ["extract_features.py", *extract_args(workspace, out, *extra)]
    if nproc > 1:
        args = ["-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(nproc),
                "--master_addr", "127.0.0.1", "--master_port", str(free_port()), *args]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def run_in_process(workspace, out, capsys, *extra):
    """Same entry point in this process (saves the ~4 s of imports a subprocess pays)."""
    assert extract_features.cli(extract_args(workspace, out, *extra)) == 0
    return capsys.readouterr().out


def load_dir(out):
    feats = {int(n[:-4]): np.load(os.path.join(out, FEATURES_DIR, n)) for n in os.listdir(out / FEATURES_DIR)
             if n.endswith(".npy")}
    labels = {int(n[:-4]): np.load(os.path.join(out, LABELS_DIR, n)) for n in os.listdir(out / LABELS_DIR)}
    return feats, labels


def direct_encode(workspace, index, out_index, flip=False):
    """Reference latent: Fast-DiT's transform (ADM crop, ToTensor, Normalize 0.5) and one encode."""
    from diffusers.models import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(workspace["vae"]).eval()
    image = center_crop_arr(Image.open(workspace["paths"][index]).convert("RGB"), IMAGE_SIZE)
    if flip:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    x = transforms.Normalize([0.5] * 3, [0.5] * 3)(transforms.ToTensor()(image))[None]  # (1, 3, 64, 64)
    gen = torch.Generator().manual_seed(extract_features.image_seed(SEED, out_index))
    with torch.no_grad():
        z = vae.encode(x).latent_dist.sample(generator=gen) * vae.config.scaling_factor  # (1, 4, 8, 8)
    return z.numpy()


@pytest.fixture(scope="module")
def single(workspace):
    out = workspace["root"] / "single"
    run_extract(workspace, out, "--batch-size", "2")
    return out


def test_single_process_files_labels_values(workspace, single):
    feats, labels = load_dir(single)
    assert sorted(feats) == sorted(labels) == list(range(len(IMAGES)))
    for i in range(len(IMAGES)):
        assert feats[i].shape == (1, 4, 8, 8) and feats[i].dtype == np.float32
        assert labels[i].shape == (1,) and labels[i].dtype == np.int64 and labels[i][0] == workspace["labels"][i]
        assert np.allclose(feats[i], direct_encode(workspace, i, i), atol=1e-5)
    # The posterior noise matters (a different seed gives a different latent), so the check above has teeth.
    assert not np.allclose(feats[0], direct_encode(workspace, 0, 1), atol=1e-3)
    ds = FeatureDataset(str(single), IMAGE_SIZE, expected_shape=(4, 8, 8))
    x, y = ds[3]
    assert len(ds) == len(IMAGES) and torch.equal(x, torch.from_numpy(feats[3][0])) and int(y) == 1


def test_torchrun_two_processes_match_single(workspace, single):
    out = workspace["root"] / "ddp"
    stdout = run_extract(workspace, out, "--batch-size", "1", nproc=2)  # other batch size too: values must not care
    assert "rank 0 encodes 3 of its 3 (2 processes)" in stdout  # strided shard, no padded repeat
    feats, labels = load_dir(out)
    ref_feats, ref_labels = load_dir(single)
    assert sorted(feats) == sorted(ref_feats)
    for i in ref_feats:
        assert np.allclose(feats[i], ref_feats[i], atol=1e-5)
        assert np.array_equal(labels[i], ref_labels[i])


def test_flip_both_doubles_and_flipped_latent_matches(workspace, capsys):
    out = workspace["root"] / "both"
    run_in_process(workspace, out, capsys, "--flip", "both", "--batch-size", "3")
    feats, labels = load_dir(out)
    assert sorted(feats) == sorted(labels) == list(range(2 * len(IMAGES)))
    for i in (0, 4):
        assert labels[2 * i][0] == labels[2 * i + 1][0] == workspace["labels"][i]
        assert np.allclose(feats[2 * i], direct_encode(workspace, i, 2 * i), atol=1e-5)
        assert np.allclose(feats[2 * i + 1], direct_encode(workspace, i, 2 * i + 1, flip=True), atol=1e-5)
    assert not np.allclose(feats[1], direct_encode(workspace, 0, 1, flip=False), atol=1e-3)


def test_random_flip_is_seeded_per_image(workspace):
    plain = extract_features.ExtractionImages(workspace["images"], IMAGE_SIZE, "none", SEED)
    flipped = []
    for seed in (SEED, SEED + 1):
        rand = extract_features.ExtractionImages(workspace["images"], IMAGE_SIZE, "random", seed)
        for i in range(len(IMAGES)):
            x, y, index = rand[i]
            coin = np.random.default_rng(extract_features.image_seed(seed, i, extract_features.FLIP_STREAM)).random()
            expected = plain[i][0].flip(-1) if coin < 0.5 else plain[i][0]  # (1, 3, 64, 64)
            assert torch.equal(x, expected) and y == workspace["labels"][i] and index == i
            assert torch.equal(x, rand[i][0])  # same image, same answer (deterministic, not a global RNG)
            flipped.append(coin < 0.5)
    assert any(flipped) and not all(flipped)


def test_resume_rewrites_only_missing_or_broken(workspace, single, capsys):
    out = workspace["root"] / "resume"
    shutil.copytree(single, out)
    os.remove(out / FEATURES_DIR / "1.npy")
    broken = out / FEATURES_DIR / "3.npy"
    broken.write_bytes(broken.read_bytes()[:100])
    untouched = {i: os.stat(out / FEATURES_DIR / f"{i}.npy").st_mtime_ns for i in (0, 2, 4)}
    assert "rank 0 encodes 2 of its 5" in run_in_process(workspace, out, capsys)
    assert {i: os.stat(out / FEATURES_DIR / f"{i}.npy").st_mtime_ns for i in (0, 2, 4)} == untouched
    feats, _ = load_dir(out)
    ref, _ = load_dir(single)
    for i in (1, 3):
        assert np.allclose(feats[i], ref[i], atol=1e-5)
    assert not any(".tmp" in name for name in os.listdir(out / FEATURES_DIR))


@pytest.mark.parametrize("case", ["missing_data", "no_images", "missing_vae", "empty_vae"])
def test_user_errors_exit_2_with_one_line(workspace, tmp_path, capsys, case):
    data, vae = workspace["images"], workspace["vae"]
    if case == "missing_data":
        data = str(tmp_path / "nowhere")
    elif case == "no_images":
        data = str(tmp_path / "empty")
        os.makedirs(tmp_path / "empty" / "cls")
    elif case == "missing_vae":
        vae = str(tmp_path / "no_vae")
    else:
        vae = str(tmp_path / "empty_vae")
        os.makedirs(vae)
    code = extract_features.cli(["--data-path", data, "--features-path", str(tmp_path / "out"),
                                 "--vae-path", vae, "--device", "cpu", "--image-size", str(IMAGE_SIZE)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1
    assert (vae if case.endswith("vae") else data) in err
    assert not os.path.exists(tmp_path / "out")  # failed before writing anything


def test_random_flip_is_the_default():
    """As Fast-DiT and the authors' release extract features: a seeded coin per image."""
    assert extract_features.parse_args(["--data-path", "x", "--features-path", "y"]).flip == "random"



def test_any_autoencoder_geometry_is_recorded_and_checked(workspace, tmp_path, capsys):
    """An AutoencoderKL with 3 latent channels, downsampling 4, scale 0.5 and shift 0.1: extract_features.py reads
    all four from its config, writes (z - shift) * scale and records them; training with a config that says
    otherwise is a one-line error naming the key; with the matching config the model trains and samples decode
    to image_size pixels."""
    from diffusers.models import AutoencoderKL

    from conftest import only_run, run_script
    torch.manual_seed(1)
    ae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
                       up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(8, 16, 16), layers_per_block=1,
                       latent_channels=3, norm_num_groups=8, sample_size=32, scaling_factor=0.5, shift_factor=0.1)
    ae.save_pretrained(tmp_path / "ae")
    out = tmp_path / "features"
    assert extract_features.cli(["--data-path", workspace["images"], "--features-path", str(out), "--vae-path",
                                 str(tmp_path / "ae"), "--image-size", "32", "--device", "cpu", "--num-workers", "0",
                                 "--flip", "none", "--seed", str(SEED)]) == 0
    record = json.loads((out / "imagenet32_features" / "latents.json").read_text())
    assert (record["latent_channels"], record["downsample"], record["scaling_factor"], record["shift_factor"],
            record["latent_size"]) == (3, 4, 0.5, 0.1, 8)
    x = transforms.Normalize([0.5] * 3, [0.5] * 3)(transforms.ToTensor()(
        center_crop_arr(Image.open(workspace["paths"][0]).convert("RGB"), 32)))[None]
    gen = torch.Generator().manual_seed(extract_features.image_seed(SEED, 0))
    with torch.no_grad():
        want = (ae.eval().encode(x).latent_dist.sample(generator=gen) - 0.1) * 0.5         # (1, 3, 8, 8)
    assert np.allclose(np.load(out / "imagenet32_features" / "0.npy"), want.numpy(), atol=1e-5)

    common = ["train.py", "--config", "configs/tiny/test-dcdit.yaml", f"data.feature_path={out}",
              "data.image_size=32", "data.vae_downsample=4", "model.in_channels=3", "train.max_steps=1",
              "train.global_batch_size=4", f"data.vae_path={tmp_path / 'ae'}", "sample.guide_channels=0"]
    bad = run_script([*common, f"train.results_dir={tmp_path / 'bad'}"], check=False)
    assert bad.returncode == 2 and "data.latent_scale=0.18215 does not match" in bad.stderr and "set data.latent_scale=0.5" \
        in bad.stderr, bad.stderr[-1500:]
    run_script([*common, "data.latent_scale=0.5", "data.latent_shift=0.1", "train.ckpt_every=1",
                f"train.results_dir={tmp_path / 'good'}"])
    ckpt = os.path.join(only_run(tmp_path / "good"), "checkpoints", "0000001.pt")
    import sample_ddp
    sample_ddp.main(["--ckpt", ckpt, "--output-dir", str(tmp_path / "s"), "--num-fid-samples", "2",
                     "--num-sampling-steps", "2", "--device", "cpu"])
    assert np.load(f"{tmp_path / 's'}.npz")["arr_0"].shape == (2, 32, 32, 3)  # 8 x 8 latents x 4
