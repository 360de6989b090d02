"""Shared fixtures: a tiny latent-feature folder in the fast-DiT layout, a helper to run scripts, and a tiny
DC-DiT with trained-looking weights."""
import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The tests exercise this checkout, whatever copy of the repository is installed: its root comes first on the
# path of this process and, through PYTHONPATH, of every script and tool the tests start.
sys.path.insert(0, ROOT)
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in [ROOT, *os.environ.get("PYTHONPATH", "").split(os.pathsep)] if p)
# Under pytest-xdist each worker (and every script it starts) gets its share of the cores: with the default of one
# OpenMP thread per core in every worker, two workers on two cores spend much of their time spin-waiting on each
# other (the Inception FID test ran 4x slower in the suite than alone).
if "PYTEST_XDIST_WORKER_COUNT" in os.environ and "OMP_NUM_THREADS" not in os.environ:
    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))

# A tiny DC-DiT whose predictability router (bias 0) keeps about half of the tokens, a different number per sample.
TINY_DCDIT = dict(input_size=8, in_channels=4, hidden_size=64, depth=2, num_heads=4, num_classes=10, norm_groups=4,
                  encoder_width=16, router="predictability")


def trained_tiny_dcdit(attention="packed"):
    """TINY_DCDIT with trained-looking weights, in eval mode (zero inits, and a fresh router's ~2 kept tokens,
    would hide bugs; eval mode so no label-dropout draws differ between two runs)."""
    import torch

    from models.dc_dit import DCDiT
    torch.manual_seed(0)
    model = DCDiT(attention=attention, **TINY_DCDIT)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
        model.router.out.bias.zero_()
    return model.eval()


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA device (skipped without one; DCDIT_GPU_TEST_DEVICE=cpu "
                                       "runs them on the CPU as a dry run)")


@pytest.fixture(scope="session")
def feature_dir(tmp_path_factory):
    """48 random (1, 4, 8, 8) 'latents' with labels in 10 classes (matches configs/tiny/test-*.yaml)."""
    root = tmp_path_factory.mktemp("features")
    rng = np.random.default_rng(0)
    (root / "imagenet64_features").mkdir()
    (root / "imagenet64_labels").mkdir()
    for i in range(48):
        np.save(root / "imagenet64_features" / f"{i}.npy", rng.standard_normal((1, 4, 8, 8)).astype(np.float32))
        np.save(root / "imagenet64_labels" / f"{i}.npy", np.array([i % 10], dtype=np.int64))
    return str(root)


@pytest.fixture(scope="session")
def tiny_vae(tmp_path_factory):
    """A small randomly initialised diffusers AutoencoderKL (downsampling 8, 4 latent channels) saved with
    save_pretrained: the folder `--vae-path` takes, so latent-space scripts run their real decode path."""
    import torch
    from diffusers.models import AutoencoderKL
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 16, 16, 16),
                        layers_per_block=1, latent_channels=4, norm_num_groups=8, sample_size=64)
    path = tmp_path_factory.mktemp("vae") / "vae"
    vae.save_pretrained(path)
    return str(path)


def run_script(args, timeout=300, check=True, env=None):
    """Run a repo script with this interpreter from the repo root; returns the CompletedProcess."""
    full_env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1", **(env or {}))
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env=full_env)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} exited {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}")
    return proc


def run_losses(run_dir):
    """{step: loss} from the JSON lines train.py writes to the run's log.txt."""
    out = {}
    for line in open(os.path.join(run_dir, "log.txt")):
        if '"step"' in line:
            rec = json.loads(line.split("] ", 1)[1])
            out[rec["step"]] = rec["loss"]
    return out


def train_full_and_resumed(common, steps, stop, tmp_path):
    """train.py `common` for `steps` steps in one go (tmp_path/a) and stopped at `stop` then resumed to `steps`
    (tmp_path/b) -> ({step: loss} uninterrupted, {step: loss} resumed, the resumed run's folder)."""
    run_script(["train.py", *common, f"train.max_steps={steps}", f"train.results_dir={tmp_path / 'a'}"])
    run_script(["train.py", *common, f"train.max_steps={stop}", f"train.results_dir={tmp_path / 'b'}"])
    run_b = only_run(tmp_path / "b")
    run_script(["train.py", "--resume", run_b, f"train.max_steps={steps}"])
    return run_losses(only_run(tmp_path / "a")), run_losses(run_b), run_b


def only_run(results):
    """The single run folder train.py made under `results`."""
    runs = sorted(glob.glob(os.path.join(str(results), "*")))
    assert len(runs) == 1, runs
    return runs[0]


def json_numbers(tree, path=""):
    """Every int/float leaf of a JSON tree as (path, value), for "all numbers are finite" checks."""
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from json_numbers(v, f"{path}/{k}")
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            yield from json_numbers(v, f"{path}/{i}")
    elif isinstance(tree, (int, float)) and not isinstance(tree, bool):
        yield path, tree
