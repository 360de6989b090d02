"""Crashes and numerical faults lose nothing: kill -9 mid-run, NaN losses, a full disk, determinism."""
import errno
import glob
import os
import random
import re
import signal
import subprocess
import sys
import time

import numpy as np
import psutil
import pytest
import torch

from conftest import ROOT, only_run as the_run, run_losses as losses, run_script

TINY = ["--config", "configs/tiny/test-dcdit.yaml", "train.log_every=1"]


def torchrun(args):
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
            "--master_port", str(29700 + random.randrange(200)), "train.py", *args]


def test_kill_9_midway_then_resume_matches_uninterrupted(feature_dir, tmp_path):
    common = [*TINY, f"data.feature_path={feature_dir}", "train.ckpt_every=5", "train.max_steps=150"]
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    proc = subprocess.Popen(torchrun([*common, f"train.results_dir={tmp_path / 'killed'}"]), cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and not glob.glob(str(tmp_path / "killed" / "*" / "checkpoints" / "0000010.pt")):
        time.sleep(0.05)
    time.sleep(random.uniform(0.0, 1.5))  # a random moment after the second checkpoint
    # torchrun starts each worker in its own session, so kill the workers themselves, then the launcher.
    workers = psutil.Process(proc.pid).children(recursive=True)
    for p in workers:
        p.send_signal(signal.SIGKILL)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    psutil.wait_procs(workers, timeout=30)
    run = the_run(tmp_path / "killed")
    ckpts = sorted(glob.glob(os.path.join(run, "checkpoints", "*.pt")))
    assert ckpts, "the run was killed before its first checkpoint"
    for path in ckpts:  # no checkpoint on disk is half written
        ck = torch.load(path, weights_only=True)
        assert ck["step"] == int(os.path.basename(path)[:7])
    last = int(os.path.basename(ckpts[-1])[:7])

    run_script(torchrun(["--resume", run])[1:])
    run_script(["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                str(29500 + random.randrange(100)), "train.py", *common, f"train.results_dir={tmp_path / 'full'}"])
    full, resumed = losses(the_run(tmp_path / "full")), losses(run)
    assert last < 150, "the run finished before it was killed"
    assert all(resumed[s] == full[s] for s in range(last + 1, 151)), (last, resumed, full)
    assert not glob.glob(os.path.join(run, "checkpoints", "*.tmp.*"))


@pytest.fixture()
def nan_features(tmp_path):
    root = tmp_path / "nan_features"
    (root / "imagenet64_features").mkdir(parents=True)
    (root / "imagenet64_labels").mkdir()
    rng = np.random.default_rng(0)
    for i in range(64):
        x = rng.standard_normal((1, 4, 8, 8)).astype(np.float32)
        if i == 5:
            x[0, 0, 0, 0] = np.nan
        np.save(root / "imagenet64_features" / f"{i}.npy", x)
        np.save(root / "imagenet64_labels" / f"{i}.npy", np.array([i % 10]))
    return str(root)


def test_nan_loss_stops_with_step_and_last_good_checkpoint(nan_features, tmp_path):
    proc = run_script(["train.py", *TINY, f"data.feature_path={nan_features}", "train.ckpt_every=1",
                       "train.max_steps=20", f"train.results_dir={tmp_path / 'runs'}"], check=False)
    assert proc.returncode == 2
    err = re.search(r"error: non-finite loss at step (\d+) .*", proc.stderr)  # after the progress bar
    assert err and "last good checkpoint" in err.group(0) and "Traceback" not in proc.stderr, proc.stderr
    step, err = int(err.group(1)), err.group(0)
    for path in glob.glob(os.path.join(the_run(tmp_path / "runs"), "checkpoints", "*.pt")):
        ck = torch.load(path, weights_only=True)
        assert ck["step"] < step and all(torch.isfinite(v).all() for v in ck["model"].values())
    assert step > 1, "the NaN sample should not be in the first batch (seeded data order)"
    assert f"{step - 1:07d}.pt" in err


def test_nan_loss_skip_policy_keeps_training(nan_features, tmp_path):
    run_script(["train.py", *TINY, f"data.feature_path={nan_features}", "train.max_steps=12",
                "train.nan_policy=skip", f"train.results_dir={tmp_path / 'runs'}"])
    run = the_run(tmp_path / "runs")
    log = open(os.path.join(run, "log.txt")).read()
    assert "skipping the step" in log
    ck = torch.load(os.path.join(run, "checkpoints", "0000012.pt"), weights_only=True)
    assert all(torch.isfinite(v).all() for v in ck["model"].values())


def test_full_disk_keeps_previous_checkpoint(tmp_path, monkeypatch):
    import fileio
    target = tmp_path / "0000010.pt"
    fileio.atomic_save({"step": 10}, str(target))
    real_save = torch.save

    def failing_save(obj, f, *a, **k):
        f.write(b"partial bytes")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError):
        fileio.atomic_save({"step": 20}, str(target))
    monkeypatch.setattr(torch, "save", real_save)
    assert torch.load(target, weights_only=True) == {"step": 10}
    assert os.listdir(tmp_path) == ["0000010.pt"]


def test_full_disk_during_training_is_a_clear_error(feature_dir, tmp_path):
    # Run train.main with a writer that fails on the second checkpoint, as a full disk would.
    code = (
        "import errno, sys, torch, train\n"
        "from config import main_guard\n"
        "real = torch.save\n"
        "calls = []\n"
        "def save(obj, f, *a, **k):\n"
        "    calls.append(1)\n"
        "    if len(calls) == 2:\n"
        "        f.write(b'xx'); raise OSError(errno.ENOSPC, 'No space left on device')\n"
        "    return real(obj, f, *a, **k)\n"
        "train.torch.save = save\n"
        "main_guard(train.main)(sys.argv[1:])\n")
    proc = run_script(["-c", code, *TINY, f"data.feature_path={feature_dir}", "train.ckpt_every=2",
                       "train.max_steps=6", f"train.results_dir={tmp_path}"], check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    err = proc.stderr
    assert "Traceback" not in err and "could not write checkpoint" in err and "No space left on device" in err and "0000002.pt is intact" in err
    run = the_run(tmp_path)
    assert sorted(os.listdir(os.path.join(run, "checkpoints"))) == ["0000002.pt"]
    assert torch.load(os.path.join(run, "checkpoints", "0000002.pt"), weights_only=True)["step"] == 2


def test_same_seed_same_first_50_losses(feature_dir, tmp_path):
    args = ["train.py", "--config", "configs/tiny/test-dit.yaml", "train.log_every=1", f"data.feature_path={feature_dir}",
            "train.max_steps=50", "train.ckpt_every=1000"]
    run_script([*args, f"train.results_dir={tmp_path / 'a'}"])
    run_script([*args, f"train.results_dir={tmp_path / 'b'}"])
    a, b = losses(the_run(tmp_path / "a")), losses(the_run(tmp_path / "b"))
    assert sorted(a) == list(range(1, 51)) and a == b
    run_script([*args, "train.seed=1", f"train.results_dir={tmp_path / 'c'}"])
    assert losses(the_run(tmp_path / "c")) != a
