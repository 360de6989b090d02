"""The GPU path: packed attention backends, bf16 training, compile, NCCL, sampling, extraction, evaluation.

Every test here needs a CUDA device and is skipped without one, so the CPU suite and CI are unchanged.
`scripts/gpu_check.sh` runs them on a GPU machine. With DCDIT_GPU_TEST_DEVICE=cpu they run on the CPU
instead, smaller and without the CUDA-only kernels: the dry mode that keeps this file from rotting
(tests/test_gpu_check.py runs it as part of the CPU suite).
"""
import os
import subprocess
import sys
from unittest import mock

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import only_run, run_losses, run_script

DEVICE = os.environ.get("DCDIT_GPU_TEST_DEVICE") or ("cuda" if torch.cuda.is_available() else "")
ON_GPU = DEVICE.startswith("cuda")
pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not DEVICE, reason="needs a CUDA device (DCDIT_GPU_TEST_DEVICE=cpu: dry run)")]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = "configs/tiny/test-dcdit.yaml"
# Kept counts far apart in one batch, as a trained router at f = 0 next to one at f = 0.9 gives.
LENGTHS = [1, 7, 300, 2, 64] if ON_GPU else [1, 7, 40, 2, 16]


# ------------------------------------------------------------------ packed attention backends

def _packed_backends(dtype):
    """name -> fn(q, k, v, layout) for every packed attention path this machine and dtype can run."""
    from models import attention as A
    backends = {"jagged SDPA": lambda q, k, v, layout: A._jagged_attention(q, k, v, layout)}
    if not ON_GPU:
        backends["CPU operator"] = lambda q, k, v, layout: A.packed_attention_cpu(q, k, v, layout.cu_seqlens)
    elif dtype in (torch.float16, torch.bfloat16):
        m = lambda layout: layout.max_seqlen  # noqa: E731
        if A.flash_attn_varlen_func is not None:
            backends["flash-attn varlen"] = lambda q, k, v, layout: A.flash_attn_varlen_func(
                q, k, v, layout.cu_seqlens, layout.cu_seqlens, m(layout), m(layout))
        if A.varlen_attn is not None:
            backends["torch varlen"] = lambda q, k, v, layout: A.varlen_attn(
                q, k, v, layout.cu_seqlens, layout.cu_seqlens, m(layout), m(layout))
    return backends


def _padded_reference(q, k, v, lengths):
    """Each sample's own attention, in float32, through padding with a key mask: (T, H, Dh)."""
    from models.attention import TokenLayout
    B, Mmax = len(lengths), max(lengths)
    valid = torch.arange(Mmax, device=q.device)[None] < torch.tensor(lengths, device=q.device)[:, None]
    layout = TokenLayout.build(valid, True, lengths)
    pad = [layout.unpack(t.float().flatten(1)).view(B, Mmax, *t.shape[1:]).transpose(1, 2) for t in (q, k, v)]
    mask = valid[:, None, None, :]                                              # keys only
    out = F.scaled_dot_product_attention(*pad, attn_mask=mask)                  # (B, H, Mmax, Dh)
    return layout.pack(out.transpose(1, 2).flatten(2)).view_as(q)               # (T, H, Dh)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_every_packed_backend_equals_padded_attention(dtype):
    from models.attention import TokenLayout
    torch.manual_seed(0)
    H, Dh = 4, 64
    valid = torch.arange(max(LENGTHS), device=DEVICE)[None] < torch.tensor(LENGTHS, device=DEVICE)[:, None]
    layout = TokenLayout.build(valid, True, LENGTHS)
    T = sum(LENGTHS)
    q, k, v = (torch.randn(T, H, Dh, device=DEVICE) for _ in range(3))
    w = torch.randn(T, H, Dh, device=DEVICE)
    q32, k32, v32 = (t.clone().requires_grad_() for t in (q, k, v))
    ref = _padded_reference(q32, k32, v32, LENGTHS)
    (ref * w).sum().backward()
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    backends = _packed_backends(dtype)
    assert backends, "no packed attention backend ran"
    for name, fn in backends.items():
        qc, kc, vc = (t.to(dtype).clone().requires_grad_() for t in (q, k, v))
        out = fn(qc, kc, vc, layout)
        assert out.shape == (T, H, Dh) and out.dtype == dtype, name
        torch.testing.assert_close(out.float(), ref.detach(), **tol, msg=f"{name} forward")
        (out.float() * w).sum().backward()
        for mine, theirs, g in ((qc, q32, "dq"), (kc, k32, "dk"), (vc, v32, "dv")):
            torch.testing.assert_close(mine.grad.float(), theirs.grad, **tol, msg=f"{name} {g}")
    print(f"packed attention backends checked on {DEVICE} in {dtype}: {', '.join(backends)}")


# ------------------------------------------------------------------ DC-DiT on the device

def _model_and_cfg(overrides=(), paper_size=ON_GPU):
    """DC-DiT-B at 32 x 32 latents on a GPU; the test config's tiny model in the CPU dry run."""
    from config import load_config
    from models import create_model
    path = os.path.join(ROOT, "configs/DCDiT-B-N4.yaml" if paper_size else TINY)
    cfg = load_config(path, ["model.router=predictability", *overrides])
    torch.manual_seed(0)
    model = create_model(cfg.model).to(DEVICE)
    with torch.no_grad():  # trained-looking weights and a router that keeps about half the tokens
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
        model.router.out.bias.fill_(0.0)
    return model, cfg


def _batch(cfg, B, seed=0):
    g = torch.Generator().manual_seed(seed)
    m = cfg.model
    x = torch.randn(B, m.in_channels, m.input_size, m.input_size, generator=g).to(DEVICE)
    t = torch.randint(0, 1000, (B,), generator=g).to(DEVICE)
    y = torch.randint(0, m.num_classes, (B,), generator=g).to(DEVICE)
    return x, t, y


def test_bf16_training_step_keeps_routing_in_fp32_and_reaches_the_router():
    from diffusion import create_diffusion
    from models.routing import ratio_loss
    model, cfg = _model_and_cfg()
    model.train()
    diffusion = create_diffusion("")
    x, t, y = _batch(cfg, 8)
    seen = {}
    model.dechunker.register_forward_hook(lambda mod, inp, out: seen.update(dechunk=out.dtype))  # returns None
    infos = []

    def model_fn(x_t, ts, **kw):
        out, info = model(x_t, ts, return_info=True, tail_drop=0.3, **kw)
        infos.append(info)
        return out

    device_type = "cuda" if ON_GPU else "cpu"
    with torch.autocast(device_type=device_type, dtype=torch.bfloat16):
        loss = diffusion.training_losses(model_fn, x, t, model_kwargs=dict(y=y))["loss"].mean()
        r = infos[0].router
        r_loss = ratio_loss(r.natural_mask, r.prob, cfg.model.downsample_factor, cfg.train.ratio_group_size)
        total = loss + cfg.train.ratio_loss_weight * r_loss
    assert torch.isfinite(total)
    assert r.prob.dtype == r.selected.dtype == r_loss.dtype == torch.float32
    assert seen["dechunk"] == torch.float32
    assert bool((infos[0].kept < r.natural_mask.sum(1)).all())  # tail dropping ran
    total.backward()
    grads = [p.grad for p in model.router.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0


@pytest.fixture
def full_fp32():
    """No TF32 in matmuls or convolutions (cuDNN allows it by default): its rounding depends on the GEMM's shape."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_plug_back_on_the_device_equals_the_cpu():
    """Plug-back and the two-stage nearest-slot search on CUDA (no cdist there) pick the CPU's slots, ties included."""
    from models.chunking import chunk, grid_coords, nearest_slot, plug_back_index
    g = torch.Generator().manual_seed(0)
    H, W = 32, 32
    mask = torch.rand(8, H * W, generator=g) < 0.25
    mask[:, 0] = True
    mask[7] = False
    mask[7, ::3] = True  # a lattice: many exact ties
    _, valid, idx = chunk(torch.randn(8, H * W, 2, generator=g), mask, torch.rand(8, H * W, generator=g))
    cpu = plug_back_index(idx, valid, (H, W))
    assert torch.equal(plug_back_index(idx.to(DEVICE), valid.to(DEVICE), (H, W)).cpu(), cpu)
    targets = grid_coords(torch.randint(0, H * W, (8, 300), generator=g), (H, W))
    pos = grid_coords(idx, (H, W))
    assert torch.equal(nearest_slot(targets.to(DEVICE), pos.to(DEVICE), valid.to(DEVICE)).cpu(),
                       nearest_slot(targets, pos, valid))


def test_a_sample_does_not_depend_on_its_batch(full_fp32):
    model, cfg = _model_and_cfg()
    model.eval()
    x, t, y = _batch(cfg, 6, seed=1)
    with torch.no_grad():
        batched, info = model(x, t, y, return_info=True)
        assert len(set(info.kept.tolist())) > 1  # the batch really mixes kept counts
        for i in (0, 3):
            alone = model(x[i:i + 1], t[i:i + 1], y[i:i + 1])
            torch.testing.assert_close(alone, batched[i:i + 1], rtol=1e-4, atol=1e-4)


def test_compiled_training_step_does_not_recompile_when_kept_counts_change():
    from torch._dynamo.utils import counters
    model, cfg = _model_and_cfg(paper_size=False)
    model.train()
    # aot_eager: Dynamo (which decides recompiles) and AOT autograd (which traces the backward) without Inductor's
    # code generation, which took most of this test's 2 minutes on an H100; tools/bench.py's compile section times
    # Inductor itself.
    compiled = torch.compile(model, dynamic=True, backend="aot_eager")
    torch._dynamo.reset()
    counters.clear()
    kept = []
    try:
        for seed in range(5):
            x, t, y = _batch(cfg, 4, seed=10 + seed)
            model.zero_grad(set_to_none=True)
            out, info = compiled(x, t, y, return_info=True)
            out.square().mean().backward()
            kept.append(tuple(info.kept.tolist()))
            if seed == 1:  # the first call compiles; a dynamic-shape specialisation may follow once
                graphs_after_warmup = counters["stats"]["unique_graphs"]
        assert len(set(kept)) == len(kept), kept  # every step saw other kept counts
        assert counters["stats"]["unique_graphs"] == graphs_after_warmup, dict(counters["stats"])
        assert not counters["recompiles"], dict(counters["recompiles"])
    finally:
        torch._dynamo.reset()


# ------------------------------------------------------------------ the scripts on the device

def _cuda_env():
    return {"CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", "0")} if ON_GPU else {}


def test_train_py_under_torchrun_and_exact_resume(feature_dir, tmp_path):
    """train.py through torchrun (NCCL on a GPU), then resume == uninterrupted in fp32 with deterministic kernels."""
    common = ["train.py", "--config", TINY, f"data.feature_path={feature_dir}", "train.log_every=1",
              "train.ckpt_every=3", "train.mixed_precision=no", "train.deterministic=true"]
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_port", "29655"]
    env = _cuda_env()
    subprocess.run(launch + common + ["train.max_steps=6", f"train.results_dir={tmp_path / 'a'}"], cwd=ROOT,
                   check=True, capture_output=True, env=dict(os.environ, **env), timeout=600)
    run_script(common + ["train.max_steps=3", f"train.results_dir={tmp_path / 'b'}"], env=env)
    run_b = only_run(tmp_path / "b")
    run_script(["train.py", "--resume", run_b, "train.max_steps=6"], env=env)
    log = open(os.path.join(only_run(tmp_path / "a"), "log.txt")).read()
    assert ("on cuda" in log) == ON_GPU, log[:400]
    full, resumed = run_losses(only_run(tmp_path / "a")), run_losses(run_b)
    assert all(resumed[s] == full[s] for s in (4, 5, 6)), (full, resumed)


@pytest.fixture(scope="module")
def latent_checkpoint(tmp_path_factory):
    from config import config_to_dict
    model, cfg = _model_and_cfg(paper_size=False)
    state = {k: v.cpu() for k, v in model.state_dict().items()}
    path = tmp_path_factory.mktemp("gpu_ckpt") / "dcdit.pt"
    torch.save({"model": state, "ema": state, "opt": {}, "config": config_to_dict(cfg), "step": 0}, path)
    return str(path)


def test_sample_ddp_gives_the_same_images_for_other_batch_sizes(latent_checkpoint, tiny_vae, tmp_path):
    import sample_ddp
    images = []
    for batch in (2, 5):
        out = tmp_path / f"b{batch}"
        sample_ddp.main(["--ckpt", latent_checkpoint, "--output-dir", str(out), "--num-fid-samples", "5",
                         "--per-proc-batch-size", str(batch), "--num-sampling-steps", "4", "--device", DEVICE,
                         "--vae-path", tiny_vae, "--tail-dropping-fraction", "0.2", "--no-tf32"])
        images.append(np.load(f"{out}.npz")["arr_0"].astype(np.int16))
    diff = np.abs(images[0] - images[1])
    # In fp32 (--no-tf32), batch-size-dependent GEMM tiling may move a value across a rounding boundary: at most
    # 1 of 255, rarely. With TF32 (sample_ddp's default, as DiT's) about 2% of pixels move by 1.
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3, (diff.max(), (diff > 0).mean())


def test_extract_features_on_the_device_matches_the_cpu(tiny_vae, tmp_path):
    from PIL import Image
    rng = np.random.default_rng(0)
    for k, (cls, h, w) in enumerate([("a", 64, 80), ("b", 72, 64), ("b", 64, 64)]):
        os.makedirs(tmp_path / "images" / cls, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)).save(tmp_path / "images" / cls / f"{k}.png")
    outs = {}
    for device in ("cpu", DEVICE):
        out = tmp_path / f"features_{device.replace(':', '')}"
        run_script(["extract_features.py", "--data-path", str(tmp_path / "images"), "--features-path", str(out),
                    "--vae-path", tiny_vae, "--image-size", "64", "--device", device, "--num-workers", "0"],
                   env=_cuda_env())
        folder = out / "imagenet64_features"
        outs[device] = [np.load(folder / f"{i}.npy") for i in range(3)]
    for a, b in zip(outs["cpu"], outs[DEVICE]):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-3)


def _random_torch_fidelity_weights(path):
    """torch-fidelity's InceptionV3 with its random initialisation, saved as the .pth its loader reads
    (no download: the GPU machines have no internet)."""
    from torch_fidelity import feature_extractor_inceptionv3 as tf
    with mock.patch.object(tf, "load_state_dict_from_url", lambda *a, **k: {}), \
            mock.patch.object(torch.nn.Module, "load_state_dict", lambda self, *a, **k: None):
        net = tf.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    torch.save(net.state_dict(), path)
    return str(path)


def test_evaluate_py_on_the_device_matches_the_cpu(tmp_path):
    from evaluations.activations import compute_activations
    from evaluations.images import ArrayImages
    from evaluations.inception import load_inception
    weights = _random_torch_fidelity_weights(tmp_path / "inception.pth")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(6, 32, 32, 3), dtype=np.uint8)
    acts = {d: compute_activations(load_inception(weights, d), ArrayImages(images), batch_size=4, device=d,
                                   use_cache=False) for d in ("cpu", DEVICE)}
    np.testing.assert_allclose(acts[DEVICE].pool, acts["cpu"].pool, rtol=1e-3, atol=1e-4)
    ref, sample = tmp_path / "ref.npz", tmp_path / "sample.npz"
    np.savez(ref, arr_0=images)
    np.savez(sample, arr_0=images[::-1].copy())
    proc = subprocess.run([sys.executable, "evaluations/evaluate.py", str(ref), str(sample), "--inception-weights",
                           weights, "--device", DEVICE, "--batch-size", "4", "--fid-sqrt", "eigh"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600, env=dict(os.environ, **_cuda_env()))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "FID:" in proc.stdout
