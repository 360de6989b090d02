"""sample_ddp.py: same images for 1 and 2 processes, resume == uninterrupted, corrupt PNGs redrawn,
Lite-CFG statistics and TFLOPs (by component too), one-line errors."""
import argparse
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import sample_ddp
from config import main_guard
from data import to_uint8_images
from sampling import class_labels, generate, load_model_for_sampling
from test_sample import TINY_DIT, make_checkpoint
from models.flops import component_coeffs, dcdit_flops_coeffs, tflops_by_component, tflops_from_counts

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N = 7  # images: odd, so the two ranks get 4 and 3 and batches end ragged


@pytest.fixture(autouse=True)
def single_process(monkeypatch):
    """In-process runs are one process whatever the environment pytest was started from."""
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "dcdit.pt")


def run(ckpt, out, *flags, n=N, batch=3):
    sample_ddp.main(["--ckpt", ckpt, "--output-dir", str(out), "--num-fid-samples", str(n),
                     "--per-proc-batch-size", str(batch), "--device", "cpu", *flags])
    with open(f"{out}.json") as f:
        return np.load(f"{out}.npz")["arr_0"], json.load(f)


@pytest.fixture(scope="module")
def uninterrupted(ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "one"
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        os.environ.pop(key, None)
    arr, report = run(ckpt, out)
    return out, arr, report


def test_outputs_follow_adm_layout(uninterrupted):
    out, arr, report = uninterrupted
    assert arr.shape == (N, 8, 8, 3) and arr.dtype == np.uint8
    assert sorted(f for f in os.listdir(out) if f.endswith(".png")) == [f"{i:06d}.png" for i in range(N)]
    for i in (0, N - 1):
        assert np.array_equal(np.asarray(Image.open(out / f"{i:06d}.png")), arr[i])
    assert len(np.unique(arr.reshape(N, -1), axis=0)) == N  # every index got its own noise
    assert report["num_images"] == N and report["measured_images"] == N
    # Without --cfg-scale: 1.5, DiT's and the release's FID setting, not the checkpoint's picture scale.
    assert report["cfg_scale"] == 1.5 and report["config"]["sample"]["cfg_scale"] == 1.5
    assert report["config"]["model"]["name"] == "DCDiT-S" and report["ckpt"].endswith("dcdit.pt")
    steps = report["num_sampling_steps"]
    assert report["timesteps"] == [999, 666, 333, 0] and len(report["kept_tokens"]) == steps
    assert len(report["kept_tokens"][0]) == 2 * N                      # cond rows then uncond rows (CFG)
    assert len(report["step_seconds"]) == len(report["images_per_second"]) == steps
    kept = np.array(report["kept_tokens"])                              # (steps, rows)
    for s, stats in enumerate(report["kept_stats"]):
        assert stats["cond"]["mean"] == pytest.approx(kept[s, :N].mean())
        assert stats["uncond"]["max"] == kept[s, N:].max()
    assert report["params"] > 0 and report["tflops_per_img"] > 0


def test_png_i_is_what_sample_py_draws_for_image_i_alone(ckpt, uninterrupted):
    """PNG i of a batched run is generate() of index i alone, labelled class_labels(seed, [i]): both scripts map
    image i to (seed, i). Index 3 opens the second batch of 3 and 6 is alone in the last one, so an index
    shifted by one, or counted within its batch, draws another image (all N differ)."""
    out, _, report = uninterrupted
    model, cfg = load_model_for_sampling(
        argparse.Namespace(config=None, overrides=[], dry_run=False), ckpt)
    cfg.sample.cfg_scale = report["cfg_scale"]  # sample_ddp.py guides at its FID scale
    for i in (3, 6):
        labels = class_labels(report["seed"], [i], cfg.model.num_classes)                 # (1,)
        want = to_uint8_images(generate(model, cfg, labels, seed=report["seed"], indices=[i]))[0]  # (H, W, 3)
        assert np.array_equal(np.asarray(Image.open(out / f"{i:06d}.png")), want), i


def test_two_processes_give_the_same_images_as_one(ckpt, uninterrupted, tmp_path):
    """Measured: max uint8 difference 0, 0 differing pixels (per-image seeds; the tiny untrained model
    saturates most pixels, so this mostly checks seeds, labels and the split; float-level batch
    independence is tested in test_sample.py)."""
    _, arr1, report1 = uninterrupted
    out = tmp_path / "two"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "sample_ddp.py",
           "--ckpt", ckpt, "--output-dir", str(out), "--num-fid-samples", str(N), "--per-proc-batch-size", "2",
           "--device", "cpu"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    arr2 = np.load(f"{out}.npz")["arr_0"]
    with open(f"{out}.json") as f:
        report2 = json.load(f)
    diff = np.abs(arr1.astype(np.int16) - arr2.astype(np.int16))
    assert diff.max() == 0 and np.count_nonzero(diff) == 0
    assert report2["world_size"] == 2 and report2["measured_images"] == N
    assert report2["kept_tokens"] == report1["kept_tokens"]            # gathered from both ranks, index order
    assert report2["tflops_per_img"] == pytest.approx(report1["tflops_per_img"])


@pytest.mark.parametrize("fails", [False, True])
def test_ranks_leave_the_process_group_together_after_a_run(monkeypatch, fails):
    """On success every rank meets at a barrier before tearing its group down (no rank exits while rank 0 still
    writes the .npz); after an error the group is torn down at once, with no barrier to hang on."""
    calls = []

    def run(*args):
        calls.append("run")
        if fails:
            raise sample_ddp.SampleError("boom")

    monkeypatch.setattr(sample_ddp, "parse_args", lambda argv: argparse.Namespace(device="cpu"))
    monkeypatch.setattr(sample_ddp, "setup_distributed", lambda flag: (1, 2, torch.device("cpu")))
    monkeypatch.setattr(sample_ddp, "run", run)
    monkeypatch.setattr(sample_ddp, "barrier", lambda: calls.append("barrier"))
    monkeypatch.setattr(sample_ddp, "teardown_distributed", lambda: calls.append("teardown"))
    if fails:
        with pytest.raises(sample_ddp.SampleError):
            sample_ddp.main([])
        assert calls == ["run", "teardown"]
    else:
        sample_ddp.main([])
        assert calls == ["run", "barrier", "teardown"]


def test_resumed_run_equals_uninterrupted_and_redraws_corrupt_pngs(ckpt, uninterrupted, tmp_path):
    _, arr_full, _ = uninterrupted
    out = tmp_path / "resumed"
    run(ckpt, out, n=4, batch=2)                                    # "killed" after 4 images
    png = out / "000002.png"
    data = png.read_bytes()
    png.write_bytes(data[: len(data) // 2])                         # truncated by the kill
    (out / "000001.png").unlink()                                   # never written
    assert not sample_ddp.png_ok(str(png), 8)
    arr, report = run(ckpt, out, n=N, batch=3)
    assert np.array_equal(arr, arr_full)
    assert sample_ddp.png_ok(str(png), 8)
    assert report["measured_images"] == 2 + (N - 4)                 # 1, 2 redrawn; 4.. new; 0, 3 kept
    assert len(report["kept_tokens"][0]) == 2 * report["measured_images"]
    # Nothing left to draw: the .npz is rebuilt, and no TFLOPs are claimed for an empty run.
    arr, report = run(ckpt, out, n=N, batch=3)
    assert np.array_equal(arr, arr_full)
    assert report["measured_images"] == 0 and report["tflops_per_img"] is None


def test_png_check(tmp_path):
    good = tmp_path / "good.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(good)
    assert sample_ddp.png_ok(str(good), 8)
    assert not sample_ddp.png_ok(str(good), 16)                      # wrong size
    gray = tmp_path / "gray.png"
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(gray)
    assert not sample_ddp.png_ok(str(gray), 8)                       # not RGB
    assert not sample_ddp.png_ok(str(tmp_path / "missing.png"), 8)
    flipped = bytearray(good.read_bytes())
    flipped[flipped.index(b"IDAT") + 6] ^= 0xFF                      # inside the image data: CRC fails
    (tmp_path / "flipped.png").write_bytes(bytes(flipped))
    assert not sample_ddp.png_ok(str(tmp_path / "flipped.png"), 8)


def test_lite_cfg_uncond_rows_cost_less(ckpt, tmp_path):
    _, plain = run(ckpt, tmp_path / "plain", "--cfg-scale", "2.0", n=4, batch=4)
    _, lite = run(ckpt, tmp_path / "lite", "--cfg-scale", "2.0", "--lite-cfg",
                  "--uncond-tail-dropping-fraction", "0.7", n=4, batch=4)
    assert lite["lite_cfg"] and lite["uncond_tail_dropping_fraction"] == 0.7
    for stats in lite["kept_stats"]:
        assert stats["uncond"]["mean"] < 0.5 * stats["cond"]["mean"]
        assert stats["uncond"]["max"] < stats["cond"]["min"]
    for stats in plain["kept_stats"]:
        assert abs(stats["uncond"]["mean"] - stats["cond"]["mean"]) < 0.1 * stats["cond"]["mean"]
    # Equal conditional budget (f = 0 for the conditional rows): same first step, cheaper run.
    assert lite["kept_stats"][0]["cond"] == plain["kept_stats"][0]["cond"]
    assert lite["tflops_per_img"] < plain["tflops_per_img"]
    # The reported TFLOPs are models/flops.py's price of the reported counts.
    model, _ = load_model_for_sampling(
        argparse.Namespace(config=None, overrides=[], dry_run=False), ckpt)
    coeffs = dcdit_flops_coeffs(model)
    assert lite["tflops_per_img"] == pytest.approx(tflops_from_counts(coeffs, lite["kept_tokens"], cfg=True))
    # By component: the same counts priced part by part, summing to the total; Lite-CFG saves inside the blocks.
    for report in (plain, lite):
        parts = report["tflops_per_img_by_component"]
        assert math.isclose(sum(parts.values()), report["tflops_per_img"], rel_tol=1e-9)
        assert parts == pytest.approx(tflops_by_component(component_coeffs(model), report["kept_tokens"]))
    saved = {k: plain["tflops_per_img_by_component"][k] - v for k, v in lite["tflops_per_img_by_component"].items()}
    assert saved["attention"] > 0 and saved["mlp"] > 0 and saved["encoder"] == 0


def test_dit_run_reports_constant_flops(tmp_path):
    from models.flops import forward_flops
    ckpt = make_checkpoint(tmp_path / "dit.pt", TINY_DIT)
    arr, report = run(ckpt, tmp_path / "dit", n=2, batch=2)
    assert arr.shape == (2, 8, 8, 3) and "kept_tokens" not in report and report["token_count"] == 16
    model, _ = load_model_for_sampling(
        argparse.Namespace(config=None, overrides=[], dry_run=False), ckpt)
    assert report["tflops_per_img"] == pytest.approx(forward_flops(model) * 3 * 2 / 1e12)
    parts = report["tflops_per_img_by_component"]
    assert math.isclose(sum(parts.values()), report["tflops_per_img"], rel_tol=1e-9) and parts["patchify"] > 0


@pytest.mark.parametrize("flags,message", [
    (["--per-proc-batch-size", "0"], "sample.per_proc_batch_size"),
    (["--num-fid-samples", "-1"], "sample.num_fid_samples"),
    (["--lite-cfg", "--cfg-scale", "1.0"], "--lite-cfg needs --cfg-scale > 1"),
    (["--bogus"], "unrecognized arguments"),
])
def test_bad_flags_are_one_line_errors(ckpt, tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as e:
        main_guard(sample_ddp.main)(["--ckpt", ckpt, "--output-dir", str(tmp_path / "x"), "--device", "cpu", *flags])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and message in err[0], err


def test_resume_with_other_settings_is_refused(ckpt, tmp_path, capsys):
    out = tmp_path / "mixed"
    run(ckpt, out, n=1, batch=1)
    with pytest.raises(SystemExit) as e:
        main_guard(sample_ddp.main)(["--ckpt", ckpt, "--output-dir", str(out), "--num-fid-samples", "2",
                                     "--cfg-scale", "3.0", "--device", "cpu"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "different settings" in err and "cfg_scale was 1.5, now 3.0" in err  # 1.5: the FID default
    assert not (out / "000001.png").exists()
