"""Upcycling a DiT checkpoint into DC-DiT and the activation-distillation warm-up (paper §4.4)."""
import argparse
import glob
import json
import os

import pytest
import torch

from config import main_guard
from conftest import run_script
from diffusion import create_diffusion
from models.dc_dit import DCDiT
from models.dit import DiT
from models.routing import finish_routing, ratio_loss
from models.upcycle import (UpcycleError, block_distill_loss, build_teacher, distillation_loss, load_dit_checkpoint,
                            patch_index, reset_untouched_adam_state, teacher_block_outputs, upcycle_)

SIZES = dict(input_size=8, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=10)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These ops are tiny: a second intra-op thread only adds waiting (1 s instead of 10 ms per backward
    on a busy 2-core machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def trained_dit(patch=2, seed=0, **kw):
    """A DiT whose adaLN-Zero layers are not zero: a fresh one's blocks are identities and would hide bugs."""
    torch.manual_seed(seed)
    dit = DiT(patch_size=patch, **{**SIZES, **kw})
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in dit.named_parameters():
            if name != "pos_embed":
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return dit


def student(patch=2, **kw):
    args = dict(SIZES, encoder_width=8, norm_groups=4, cond_adaptor=True, pos_scale=1.0 / patch)
    args.update(kw)
    return DCDiT(**args)


def save(obj, tmp_path, name="dit.pt"):
    path = str(tmp_path / name)
    torch.save(obj, path)
    return path


class KeepAll(torch.nn.Module):
    """Router stand-in: every token is a boundary (p = 1), so the inner blocks see all L tokens."""

    def forward(self, enc, grid):
        return finish_routing(torch.ones(enc.shape[:2]))


class KeepTopRows(torch.nn.Module):
    """Router stand-in keeping only the first `rows` rows of the grid."""

    def __init__(self, rows):
        super().__init__()
        self.rows = rows

    def forward(self, enc, grid):
        p = torch.zeros(enc.shape[0], grid[0], grid[1])
        p[:, : self.rows] = 1.0
        return finish_routing(p.flatten(1))


class TeacherInput(torch.nn.Module):
    """Encoder stand-in: the student's block input at token (r, c) becomes the teacher's at patch (r // p, c // p).

    Returns teacher_embed[patch] + teacher_pos[patch] - student_pos[token]; DC-DiT then adds student_pos.
    """

    def __init__(self, teacher, model):
        super().__init__()
        self.nets = (teacher, model)  # a plain tuple: registering the model inside itself would be a cycle

    def correction(self):
        teacher, model = self.nets
        idx = torch.arange(model.input_size ** 2)                               # (L,)
        patch = patch_index(idx, model.grid, teacher.patch_size)                # (L,)
        return teacher.pos_embed[0, patch] - model.pos_embed(idx[None])[0], patch  # (L, D), (L,)

    def forward(self, x, c):
        corr, patch = self.correction()
        return self.nets[0].x_embedder(x)[:, patch] + corr                   # (B, L, D)


# ----------------------------------------------------------------------------- loading and copying

@pytest.mark.parametrize("layout", ["bare", "ours", "dit_train"])
def test_blocks_copied_bit_for_bit_embedders_frozen_adaptors_trained(tmp_path, layout):
    dit = trained_dit()
    state = dit.state_dict()
    obj = {"bare": state,
           "ours": {"model": trained_dit(seed=5).state_dict(), "ema": state, "step": 3,
                    "config": {"model": {"name": "DiT-S/2", "num_heads": 2}}},
           "dit_train": {"model": trained_dit(seed=5).state_dict(), "ema": state,
                         "args": argparse.Namespace(model="DiT-S/2")}}[layout]
    if layout == "dit_train":  # DiT-S has 6 heads; this tiny DiT has 2: the stored args say which model it was
        with pytest.raises(UpcycleError, match=r"num_heads: checkpoint 6 .*DiT-S/2.* vs model 2"):
            upcycle_(student(), load_dit_checkpoint(save(obj, tmp_path)))
        obj["args"] = argparse.Namespace(model="unknown")
    ckpt = load_dit_checkpoint(save(obj, tmp_path))
    assert ckpt.source == ("bare state dict" if layout == "bare" else "ema") and ckpt.patch_size == 2
    model = student()
    report = upcycle_(model, ckpt)
    own = model.state_dict()
    for key, value in state.items():
        if key.startswith(("blocks.", "t_embedder.", "y_embedder.")):
            assert torch.equal(own[key], value), key
    assert sorted(report.unused) == sorted(k for k in state if k.startswith(("x_embedder", "final_layer", "pos_embed")))
    assert len(report.copied) + len(report.unused) == len(state)

    # One diffusion training step as train.py builds it: embedders frozen, adaptors trained. The zero-initialised
    # final layer is perturbed first, as after a few steps; at zero it blocks every gradient but its own.
    with torch.no_grad():
        for p in model.final_layer.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    diffusion = create_diffusion(timestep_respacing="")
    torch.manual_seed(0)
    loss = diffusion.training_losses(model, torch.randn(4, 4, 8, 8), torch.randint(0, 1000, (4,)),
                                     model_kwargs=dict(y=torch.arange(4)))["loss"].mean()
    loss.backward()
    adaptors = {n: p.detach().clone() for n, p in model.named_parameters() if ".adaptor." in n}
    assert len(adaptors) == 4  # weight and bias of the encoder's and the decoder's LayerNorm on c
    for n, p in model.named_parameters():
        if n.startswith(("t_embedder", "y_embedder")):
            assert not p.requires_grad and p.grad is None, n
        if ".adaptor." in n:
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, n
    opt.step()
    for n, p in model.named_parameters():
        if n.startswith(("t_embedder", "y_embedder")):
            assert torch.equal(p, state[n]), n
        if n in adaptors:
            assert not torch.equal(p, adaptors[n]), n


def test_wrong_checkpoints_fail_naming_key_and_shapes(tmp_path, capsys):
    with pytest.raises(UpcycleError, match=r"blocks\.0\.attn\.qkv\.weight: checkpoint \[192, 64\] vs model \[96, 32\]"):
        upcycle_(student(), load_dit_checkpoint(save(trained_dit(hidden_size=64).state_dict(), tmp_path)))
    with pytest.raises(UpcycleError, match=r"depth: checkpoint has 3 blocks vs model 2"):
        upcycle_(student(), load_dit_checkpoint(save(trained_dit(depth=3).state_dict(), tmp_path)))
    ours = {"ema": trained_dit().state_dict(), "config": {"model": {"name": "DiT-S/2", "num_heads": 4}}}
    with pytest.raises(UpcycleError, match=r"num_heads: checkpoint 4 .* vs model 2"):
        upcycle_(student(), load_dit_checkpoint(save(ours, tmp_path)))
    with pytest.raises(UpcycleError, match=r"pos_embed: checkpoint has 64 patches .* model.input_size 8"):
        upcycle_(student(), load_dit_checkpoint(save(trained_dit(input_size=16).state_dict(), tmp_path)))
    with pytest.raises(UpcycleError, match=r"no x_embedder\.proj\.weight"):
        load_dit_checkpoint(save(student().state_dict(), tmp_path))
    with pytest.raises(UpcycleError, match=r"model.pos_scale: expected 1/2"):
        upcycle_(student(pos_scale=1.0), load_dit_checkpoint(save(trained_dit().state_dict(), tmp_path)))
    with pytest.raises(UpcycleError, match=r"model.cond_adaptor"):
        upcycle_(student(cond_adaptor=False), load_dit_checkpoint(save(trained_dit().state_dict(), tmp_path)))
    # Scripts (main_guard) print it as one line and exit 2.
    bad = load_dit_checkpoint(save(trained_dit(hidden_size=64).state_dict(), tmp_path))
    with pytest.raises(SystemExit) as exit_info:
        main_guard(upcycle_)(student(), bad)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith("error: blocks.0.attn.qkv.weight: checkpoint [192, 64] vs model [96, 32]")


# ----------------------------------------------------------------------------- what matches the teacher

@pytest.mark.parametrize("patch", [1, 2])
def test_block_outputs_equal_teacher_at_patch_when_inputs_match(tmp_path, patch):
    """With every token kept and the student's block input at (r, c) equal to the teacher's at patch
    (r // p, c // p), every block output equals the teacher's at that patch: attention over keys and
    values each repeated p^2 times gives the same softmax average, and the rest of a block is per token.
    The real encoder is replaced by that input (TeacherInput); for p = 2 its positional correction is
    non-zero at tokens off the patch corners, for p = 1 it is exactly zero."""
    ckpt = load_dit_checkpoint(save(trained_dit(patch).state_dict(), tmp_path))
    model = student(patch)
    upcycle_(model, ckpt)
    teacher = build_teacher(ckpt, model)
    model.router, model.encoder = KeepAll(), TeacherInput(teacher, model)
    corr, _ = model.encoder.correction()
    if patch == 1:
        assert torch.equal(corr, torch.zeros_like(corr))
    else:
        assert corr.abs().max() > 0.1

    torch.manual_seed(0)
    x, t, y = torch.randn(3, 4, 8, 8), torch.tensor([10, 400, 900]), torch.tensor([1, 2, 3])
    drop = torch.tensor([0, 1, 0])  # sample 1 uses the null class in both networks
    model.train()
    with torch.no_grad():
        loss, info = distillation_loss(model, teacher, x, t, y, drop)
        target = teacher_block_outputs(teacher, x, t, y, drop)
    assert torch.equal(info.idx, torch.arange(64).expand(3, 64)) and bool(info.valid.all())
    gathered = [tb[:, patch_index(info.idx[0], model.grid, patch)] for tb in target]  # (B, L, D) each
    h0 = teacher.x_embedder(x) + teacher.pos_embed
    for s, tb in zip(info.blocks, gathered):
        torch.testing.assert_close(s, tb, atol=2e-5, rtol=1e-5)
    assert (target[0] - h0).abs().max() > 0.1 and (target[1] - target[0]).abs().max() > 0.1  # blocks do work
    assert loss < 1e-9
    # The label-dropout decisions reach the teacher: without them sample 1's target differs.
    undropped = teacher_block_outputs(teacher, x, t, y, None)
    assert (undropped[0][1] - target[0][1]).abs().max() > 1e-3
    torch.testing.assert_close(undropped[0][0], target[0][0])

    # Every token kept is needed: keeping only the top half changes what each kept token attends to.
    model.router = KeepTopRows(4)
    with torch.no_grad():
        partial, info = distillation_loss(model, teacher, x, t, y, drop)
    assert info.kept.tolist() == [33, 33, 33] and partial > 1e-4  # 4 rows + the forced last token


def test_kept_token_positions_land_on_the_teacher_patch_grid_at_patch_corners(tmp_path):
    ckpt = load_dit_checkpoint(save(trained_dit(2).state_dict(), tmp_path))
    model = student(2)
    upcycle_(model, ckpt)
    teacher = build_teacher(ckpt, model)
    idx = torch.arange(64)
    pos = model.pos_embed(idx[None])[0]                                      # (L, D)
    teacher_pos = teacher.pos_embed[0, patch_index(idx, model.grid, 2)]      # (L, D)
    corner = (idx // 8 % 2 == 0) & (idx % 8 % 2 == 0)
    torch.testing.assert_close(pos[corner], teacher_pos[corner], atol=1e-6, rtol=0)
    assert ((pos[~corner] - teacher_pos[~corner]).abs().amax(1) > 1e-2).all()


def test_patch_index_and_padding_excluded_from_the_loss():
    idx = torch.tensor([[0, 9, 16, 2, 63, 18]])                              # (1, 6) on an 8 x 8 grid
    assert patch_index(idx, (8, 8), 2).tolist() == [[0, 0, 4, 1, 15, 5]]
    assert patch_index(idx, (8, 8), 1).tolist() == idx.tolist()
    valid = torch.tensor([[True, True, True, True, True, False]])
    torch.manual_seed(0)
    teacher = [torch.randn(1, 16, 4) for _ in range(2)]
    student_out = [tb[:, patch_index(idx, (8, 8), 2)[0]].clone() for tb in teacher]
    student_out[0][0, 1] += 1.0                                              # one kept token off by 1 in each of 4 dims
    for s in student_out:
        s[0, 5] = float("nan")                                               # padding: never read
    loss = block_distill_loss(student_out, teacher, idx, valid, (8, 8), 2)
    # block 0: 4 / (5 tokens * 4 dims); block 1: 0; mean over blocks.
    torch.testing.assert_close(loss, torch.tensor(4 / 20 / 2))


def test_collect_blocks_leaves_the_output_unchanged():
    model = student(2)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.eval()
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([3, 700]), torch.tensor([0, 1])
    plain, info = model(x, t, y, return_info=True)
    out, info2 = model(x, t, y, return_info=True, collect_blocks=True)
    assert torch.equal(plain, out) and info.blocks is None
    assert len(info2.blocks) == 2 and info2.blocks[0].shape == (2, int(info2.kept.max()), 32)
    with pytest.raises(ValueError, match="return_info"):
        model(x, t, y, collect_blocks=True)


def test_distillation_step_reaches_every_parameter_and_spares_teacher_and_embedders(tmp_path):
    """train.py's distillation step: block MSE + ratio loss. Every trainable parameter gets a gradient (DDP
    needs that), exactly zero on the decoder side, which the block outputs do not depend on; the teacher
    and the frozen embedders get none. At the switch those zero-only parameters get a fresh Adam state."""
    ckpt = load_dit_checkpoint(save(trained_dit(2).state_dict(), tmp_path))
    model = student(2)
    upcycle_(model, ckpt)
    with torch.no_grad():  # as after a few diffusion steps: the zero-initialised output layer is not zero
        for p in model.final_layer.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    teacher = build_teacher(ckpt, model)
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    torch.manual_seed(0)
    x, t, y = torch.randn(4, 4, 8, 8), torch.randint(0, 1000, (4,)), torch.arange(4)
    loss, info = distillation_loss(model, teacher, x, t, y, torch.tensor([0, 0, 1, 0]))
    (loss + 0.03 * ratio_loss(info.router.natural_mask, info.router.prob, 4.0, 4)).backward()
    decoder_side = ("inner_norm.", "residual_proj.", "decoder.", "final_layer.")
    for n, p in model.named_parameters():
        if n.startswith(("t_embedder", "y_embedder")):
            assert p.grad is None, n
        elif n.startswith(decoder_side):
            assert p.grad is not None and not p.grad.any(), n
        elif n.startswith(("encoder.", "router.q_proj", "router.k_proj", "blocks.1.")):
            assert p.grad is not None and p.grad.any(), n
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    opt.step()
    assert all(torch.equal(v, teacher_before[k]) for k, v in teacher.state_dict().items())
    n_decoder = sum(1 for n, p in model.named_parameters() if n.startswith(decoder_side))
    assert reset_untouched_adam_state(opt) == n_decoder
    assert all(p not in opt.state for n, p in model.named_parameters() if n.startswith(decoder_side))
    assert all(p in opt.state for n, p in model.named_parameters() if n.startswith("encoder."))


# ----------------------------------------------------------------------------- train.py end to end

DIT = ["--config", "configs/tiny/dit-digits.yaml", "model.depth=2", "model.hidden_size=32", "model.num_heads=2",
       "train.global_batch_size=32", "train.ema_decay=0.9", "train.max_steps=100", "train.log_every=50",
       "train.ckpt_every=100"]
UPCYCLE = ["--config", "configs/tiny/dcdit-digits-upcycle.yaml", "model.depth=2", "model.hidden_size=32",
           "model.num_heads=2", "model.encoder_width=8", "train.global_batch_size=16", "train.log_every=1",
           "upcycle.distill_steps=200", "train.max_steps=220", "train.ckpt_every=190"]


def records(run_dir):
    return [json.loads(line.split("] ", 1)[1]) for line in open(os.path.join(run_dir, "log.txt")) if '"step"' in line]


def test_distillation_on_digits_then_diffusion_and_resume_across_the_switch(tmp_path):
    """A small DiT trained on the 16 x 16 digits is upcycled; 200 distillation steps (loss falls), the switch to
    the diffusion loss at step 200, and a resume from step 190 repeats steps 191..220 exactly."""
    run_script(["train.py", *DIT, f"train.results_dir={tmp_path / 'dit'}"])
    dit_ckpt = glob.glob(str(tmp_path / "dit" / "*" / "checkpoints" / "0000100.pt"))[0]

    # pos_scale and cond_adaptor set against upcycling are fixed from the checkpoint (and logged).
    run_script(["train.py", "--upcycle-from", dit_ckpt, *UPCYCLE, "model.pos_scale=1.0", "model.cond_adaptor=false",
                f"train.results_dir={tmp_path / 'up'}"])
    run = glob.glob(str(tmp_path / "up" / "*"))[0]
    first = records(run)
    by_step = {r["step"]: r for r in first}
    assert sorted(by_step) == list(range(1, 221))
    # The phase is a function of the step: distillation for steps 1..200, diffusion from 201.
    assert all("distill_loss" in by_step[s] and "diffusion_loss" not in by_step[s] for s in range(1, 201))
    assert all("diffusion_loss" in by_step[s] and "distill_loss" not in by_step[s] for s in range(201, 221))
    start = by_step[1]["distill_loss"]
    end = sum(by_step[s]["distill_loss"] for s in range(181, 201)) / 20
    print(f"distill_loss step 1: {start:.4f}; mean of steps 181-200: {end:.4f}")
    assert end < 0.7 * start, (start, end)
    log = open(os.path.join(run, "log.txt")).read()
    assert "unused checkpoint keys" in log and "x_embedder.proj.weight" in log and "ratio loss stays on" in log
    assert "model.pos_scale: 1.0 -> 0.5" in log and "model.cond_adaptor: False -> True" in log
    assert "step 200: activation distillation done" in log

    # Frozen embedders are unchanged after 220 steps; the copied blocks did train.
    dit_state = load_dit_checkpoint(dit_ckpt).state
    final = torch.load(os.path.join(run, "checkpoints", "0000220.pt"), weights_only=True)
    for key in (k for k in dit_state if k.startswith(("t_embedder", "y_embedder"))):
        assert torch.equal(final["model"][key], dit_state[key]) and torch.equal(final["ema"][key], dit_state[key]), key
    assert not torch.equal(final["model"]["blocks.0.attn.qkv.weight"], dit_state["blocks.0.attn.qkv.weight"])
    assert final["config"]["upcycle"]["checkpoint"] == dit_ckpt
    assert final["config"]["model"]["cond_adaptor"] is True and final["config"]["model"]["pos_scale"] == 0.5

    # Resume from step 190 (inside the distillation) across the switch: same losses as uninterrupted.
    run_script(["train.py", "--resume", os.path.join(run, "checkpoints", "0000190.pt")])
    resumed = records(run)[len(first):]
    assert [r["step"] for r in resumed] == list(range(191, 221))
    for r in resumed:
        assert r["loss"] == by_step[r["step"]]["loss"], (r["step"], r["loss"], by_step[r["step"]]["loss"])
    assert by_step[200]["loss"] != by_step[201]["loss"]
