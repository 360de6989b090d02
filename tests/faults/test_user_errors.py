"""Expected user errors end in one line naming the file/key and what was expected, exit code 2, no traceback."""

import pytest
import torch

import sample
import train
from config import main_guard


def run_main(main, argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main_guard(main)(argv)
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2, err
    assert err.startswith("error: ") and len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_truncated_checkpoint_on_resume(tmp_path, capsys):
    bad = tmp_path / "0000010.pt"
    torch.save({"model": {"w": torch.zeros(1000)}}, bad)
    bad.write_bytes(bad.read_bytes()[:100])
    err = run_main(train.main, ["--resume", str(bad)], capsys)
    assert str(bad) in err and "--resume" in err and "cannot read it" in err


def test_foreign_checkpoint_on_resume(tmp_path, capsys):
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    err = run_main(train.main, ["--resume", str(foreign)], capsys)
    assert str(foreign) in err and "missing" in err and "'model'" in err


def test_missing_resume_target(tmp_path, capsys):
    err = run_main(train.main, ["--resume", str(tmp_path / "nope")], capsys)
    assert "no such file or run folder" in err


@pytest.mark.parametrize("override,needle", [
    ("train.max_step=5", "train.max_step"),
    ("train.max_steps=abc", "train.max_steps"),
    ("model.downsample_factor=1.0", "model.downsample_factor"),
    ("sample.tail_dropping_fraction=1.0", "sample.tail_dropping_fraction"),
    ("model.router=cosine2", "model.router"),
    ("model.router_args={bias_init: target}", "model.router_args.bias_init: not an option of the 'cosine' router"),
    ("model.router_args=[1]", "model.router_args: expected a mapping"),
    ("model.dechunker=ema", "model.dechunker: expected one of ('gaussian', 'nearest')"),
])
def test_bad_config_values(override, needle, capsys):
    err = run_main(train.main, ["--config", "configs/tiny/test-dcdit.yaml", override], capsys)
    assert needle in err


def test_empty_feature_folder(tmp_path, capsys):
    (tmp_path / "imagenet64_features").mkdir()
    (tmp_path / "imagenet64_labels").mkdir()
    err = run_main(train.main, ["--config", "configs/tiny/test-dit.yaml", f"data.feature_path={tmp_path}",
                                f"train.results_dir={tmp_path / 'r'}"], capsys)
    assert "imagenet64_features" in err


def _tiny_ckpt(path, overrides):
    from config import config_to_dict, load_config
    from models import create_model
    cfg = load_config("configs/tiny/test-dcdit.yaml", overrides)
    model = create_model(cfg.model)
    torch.save({"model": model.state_dict(), "ema": model.state_dict(), "opt": {}, "config": config_to_dict(cfg),
                "step": 0}, path)


def test_checkpoint_of_another_size_names_the_key(tmp_path, capsys):
    ck = tmp_path / "small.pt"
    _tiny_ckpt(ck, [])
    # Ask for a wider model than the checkpoint holds.
    err = run_main(sample.main, ["--ckpt", str(ck), "model.hidden_size=128", "model.encoder_width=32",
                                 "--out-dir", str(tmp_path)], capsys)
    assert str(ck) in err and "size mismatch" in err and "torch.Size" in err


def test_tail_drop_fraction_out_of_range(tmp_path, capsys):
    ck = tmp_path / "c.pt"
    _tiny_ckpt(ck, [])
    err = run_main(sample.main, ["--ckpt", str(ck), "--tail-dropping-fraction", "1.5", "--out-dir", str(tmp_path)],
                   capsys)
    assert "tail_dropping_fraction" in err


def test_missing_vae_weights_offline(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from vae import VAEError, load_vae
    with pytest.raises(VAEError) as e:
        load_vae("ema", "", "cpu")
    assert "stabilityai/sd-vae-ft-ema" in str(e.value) and "--vae-path" in str(e.value)
    with pytest.raises(VAEError) as e:
        load_vae("ema", str(tmp_path / "missing"), "cpu")
    assert "missing" in str(e.value)
