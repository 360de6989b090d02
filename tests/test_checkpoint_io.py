"""models/checkpoint_io.py: which weights a checkpoint yields, and one clear error per unreadable file."""
import pytest
import torch

from fileio import atomic_save
from models.checkpoint_io import load_strict, model_state, read_checkpoint


class Bad(Exception):
    pass


def test_model_state_prefers_ema_unless_told():
    ema, raw = {"w": torch.ones(1)}, {"w": torch.zeros(1)}
    assert model_state({"ema": ema, "model": raw, "step": 3}) == (ema, "ema")
    assert model_state({"ema": ema, "model": raw}, use_ema=False) == (raw, "model")
    assert model_state({"model": raw}) == (raw, "model")
    assert model_state(raw) == (raw, "state dict")
    assert model_state({"state_dict": {}})[0] is None
    assert model_state([raw])[0] is None


def test_read_checkpoint_errors_name_the_setting(tmp_path):
    with pytest.raises(Bad, match=r"--ckpt .*nope\.pt: no such file; expected a thing"):
        read_checkpoint(str(tmp_path / "nope.pt"), "--ckpt", Bad, "a thing")
    path = tmp_path / "cut.pt"
    atomic_save({"model": {"w": torch.zeros(1000)}}, str(path))
    assert torch.equal(read_checkpoint(str(path), "--ckpt", Bad)["model"]["w"], torch.zeros(1000))
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(Bad, match=r"--ckpt .*cut\.pt: cannot read it with torch.load\(weights_only=True\)"):
        read_checkpoint(str(path), "--ckpt", Bad)
    assert list(tmp_path.iterdir()) == [path]  # atomic_save left no temp file behind


def test_load_strict_names_the_offending_keys_in_one_line():
    model = torch.nn.Linear(2, 3)
    load_strict(model, {"weight": torch.ones(3, 2), "bias": torch.zeros(3)}, Bad, "x.pt")
    assert torch.equal(model.weight, torch.ones(3, 2))
    with pytest.raises(Bad, match=r'^x\.pt: Missing key\(s\) in state_dict: "bias"\.$'):
        load_strict(model, {"weight": torch.ones(3, 2)}, Bad, "x.pt")
    with pytest.raises(Bad, match=r"^x\.pt: size mismatch for weight: .*torch\.Size\(\[3, 2\]\)"):
        load_strict(model, {"weight": torch.ones(2, 2), "bias": torch.zeros(3)}, Bad, "x.pt")
