"""Checkpoints of the authors' release: a round trip through their key layout and pickled config, the
restricted unpickler refusing foreign classes without running them, and load_checkpoint."""
import dataclasses
import os
import re
import subprocess
import sys
import types

import pytest
import torch

from config import config_to_dict, load_config
from models import create_model, load_checkpoint
from models.release import (ReleaseCheckpointError, convert_release_checkpoint, read_release_checkpoint,
                            release_key)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A release-sized network in miniature: predictability router, 2 + 2 conv blocks, GroupNorm(32) as the release.
TINY = ["model.name=DCDiT-S", "model.input_size=8", "model.depth=2", "model.hidden_size=128", "model.num_heads=4",
        "model.num_classes=10", "model.router=predictability", "data.image_size=64", "model.norm_groups=32"]


def release_config_module(arch_layout=("c2", ["D2"], "c2"), d_model=(128, 128), num_heads=(4, 4)):
    """A stand-in for the release's `config` module: dataclasses with its class and field names, so that
    torch.save pickles them exactly as the release's train.py does (module `config`, the same class names)."""
    mod = types.ModuleType("config")

    def dc(name, fields):
        cls = dataclasses.make_dataclass(name, fields)
        cls.__module__ = "config"
        setattr(mod, name, cls)
        return cls

    hnet = dc("HNetConfig", [("arch_layout", list), ("d_model", list), ("num_heads", list),
                             ("tie_embeddings", bool), ("enc_dec_dim_factor", list),
                             ("dechunk_kernel_sigma", float), ("fp32_router_dechunk", bool)])
    model = dc("ModelConfig", [("name", str), ("hnet", object), ("mlp_ratio", float)])
    training = dc("TrainingConfig", [("global_batch_size", int), ("learning_rate", float), ("ema_decay", float),
                                     ("class_dropout_prob", float), ("learn_sigma", bool), ("ratio_loss_weight", float),
                                     ("ratio_batch_size", int), ("downsample_factor", float),
                                     ("downsample_factor_start", object), ("downsample_factor_warmup_steps", int),
                                     ("multi_budget_training", bool), ("multi_budget_drop_fractions", list),
                                     ("multi_budget_start_step", object)])
    data = dc("DataConfig", [("feature_path", str), ("image_size", int), ("num_classes", int)])
    diffusion = dc("DiffusionConfig", [("noise_schedule", str), ("diffusion_steps", int)])
    logging = dc("LoggingConfig", [("results_dir", str)])
    config = dc("Config", [("model", object), ("training", object), ("data", object), ("diffusion", object),
                           ("logging", object), ("ckpt", object)])
    value = config(
        model=model("DC-DiT", hnet(list(arch_layout), list(d_model), list(num_heads), False, [4, None], 1.0, True), 4.0),
        training=training(256, 1e-4, 0.9999, 0.1, True, 0.03, 16, 4.0, None, 0, True,
                          [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6], 50000),
        data=data("features", 64, 10), diffusion=diffusion("linear", 1000), logging=logging("results"), ckpt=None)
    return mod, value


def to_release_keys(state):
    """This project's state dict in the release's key layout (the inverse of models.release.release_key)."""
    inverse = [("encoder.patch_embed.", "x_embedder.proj."), ("encoder.norm.", "hnet.encoder.rmsnorm."),
               ("decoder.norm.", "hnet.decoder.rmsnorm."), ("inner_norm.", "hnet.main_network.main_network.rmsnorm."),
               ("blocks.", "hnet.main_network.main_network.layers."), ("encoder.blocks.", "hnet.encoder.layers."),
               ("decoder.blocks.", "hnet.decoder.layers."), ("router.reduce.", "hnet.routing_module.proj."),
               ("router.context.", "hnet.routing_module.context_predictor."),
               ("router.score.", "hnet.routing_module.residual_scorer.0."),
               ("router.norm.", "hnet.routing_module.residual_scorer.1."),
               ("router.out.", "hnet.routing_module.residual_scorer.3."),
               ("residual_proj.", "hnet.residual_proj.")]
    from models.pos_embed import sincos_2d_grid
    out = {"pos_embed": sincos_2d_grid(128, 8).unsqueeze(0)}  # the release's frozen table, (1, L, D)
    for key, value in state.items():
        for ours, theirs in sorted(inverse, key=lambda p: -len(p[0])):
            if key.startswith(ours):
                key = theirs + key[len(ours):]
                key = key.replace(".skip.", ".skip_proj.").replace(".cond.", ".cond_proj.")
                break
        out["_orig_mod." + key] = value  # as a torch.compile'd release model saves them
    return out


def trained_looking(seed=0):
    cfg = load_config(None, TINY)
    torch.manual_seed(seed)
    model = create_model(cfg.model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
        model.router.out.bias.fill_(0.0)  # keeps about half the tokens: every path of the network runs
    return model.eval(), cfg


def save_release(path, monkeypatch, model, ema, **layout):
    mod, config = release_config_module(**layout)
    with monkeypatch.context() as m:  # the release's module name, only while pickling
        m.setitem(sys.modules, "config", mod)
        torch.save({"model": to_release_keys(model.state_dict()), "ema": to_release_keys(ema.state_dict()),
                    "opt": {"state": {}, "param_groups": []}, "config": config}, path)


def test_round_trip_through_the_release_layout_gives_identical_outputs(tmp_path, monkeypatch):
    model, _ = trained_looking(0)
    ema, _ = trained_looking(1)
    path = tmp_path / "release.pt"
    save_release(path, monkeypatch, model, ema)
    out, cfg, notes = convert_release_checkpoint(str(path))
    m = cfg.model
    assert (m.name, m.depth, m.hidden_size, m.num_heads, m.encoder_width, m.router, m.inner_norm) == (
        "DCDiT-B", 2, 128, 4, 32, "predictability", True)  # not a registry size: B with explicit dims
    assert (cfg.train.multi_budget, cfg.train.multi_budget_start_step, cfg.train.ratio_group_size) == (True, 50000, 16)
    assert any("optimizer" in n for n in notes)
    converted = tmp_path / "converted.pt"
    torch.save(out, converted)
    x, t, y = torch.randn(3, 4, 8, 8), torch.tensor([0, 400, 999]), torch.tensor([1, 5, 10])
    for weights, ref in (("ema", ema), ("model", model)):
        loaded, loaded_cfg = load_checkpoint(str(converted), weights=weights)
        assert not loaded.training and loaded_cfg == cfg
        with torch.no_grad():
            for f in (0.0, 0.3, torch.tensor([0.0, 0.6, 0.3])):
                a, ia = loaded(x, t, y, return_info=True, tail_drop=f)
                b, ib = ref(x, t, y, return_info=True, tail_drop=f)
                assert torch.equal(a, b) and torch.equal(ia.router.mask, ib.router.mask)
                assert 4 < int(ib.kept.min()) < 60  # tokens were really dropped and kept


def test_converter_command_writes_a_checkpoint_sample_py_accepts(tmp_path, monkeypatch, tiny_vae):
    model, _ = trained_looking(0)
    path, out = tmp_path / "release.pt", tmp_path / "out.pt"
    save_release(path, monkeypatch, model, model)
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "tools/convert_release_checkpoint.py", str(path), str(out)], cwd=ROOT,
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "DCDiT-B (depth 2, width 128, 4 heads, N = 4" in proc.stdout and os.path.isfile(out)
    proc = subprocess.run([sys.executable, "sample.py", "--ckpt", str(out), "--num-sampling-steps", "3",
                           "--class-labels", "1", "2", "--device", "cpu", "--out-dir", str(tmp_path / "s"),
                           "--vae-path", tiny_vae, "--lite-cfg", "--tail-dropping-fraction", "0.3"],
                          cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    # Lite-CFG without an unconditional fraction: the release's default 0.0, said before sampling.
    assert ("cfg 4.0, Lite-CFG: conditional branch at tail drop 0.3, unconditional branch at 0.0" in proc.stdout
            and re.search(r"^uncond +0\.00 ", proc.stdout, re.M)), proc.stdout  # the summary's uncond row
    assert os.path.isfile(tmp_path / "s" / "sample.png") and os.path.isfile(tmp_path / "s" / "chunking_viz.png")


class Payload:
    """Unpickling this runs `touch MARKER` (pickle calls os.system): what a restricted loader must never do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_foreign_pickled_class_is_refused_and_never_runs(tmp_path, monkeypatch):
    marker = tmp_path / "ran"
    mod, config = release_config_module()
    path = tmp_path / "evil.pt"
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "config", mod)
        torch.save({"model": {}, "ema": {}, "opt": Payload(marker), "config": config}, path)
    with pytest.raises(ReleaseCheckpointError, match=r"evil\.pt: refused to unpickle .*system.*nothing in the file"):
        read_release_checkpoint(str(path))
    assert not marker.exists()
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "tools/convert_release_checkpoint.py", str(path), str(tmp_path / "o.pt")],
                          cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr
    assert not marker.exists() and not (tmp_path / "o.pt").exists()


def test_release_classes_are_never_resolved_through_an_import(tmp_path, monkeypatch):
    """This project's own config.py is `config`: the release's config.Config must not become ours."""
    model, _ = trained_looking(0)
    path = tmp_path / "release.pt"
    save_release(path, monkeypatch, model, model)
    ckpt = read_release_checkpoint(str(path))
    import config as ours
    assert type(ckpt["config"]).__name__ == "ReleaseConfig" and not isinstance(ckpt["config"], ours.Config)
    assert ckpt["config"].model.hnet.d_model == [128, 128]


@pytest.mark.parametrize("layout,needle", [
    ((("c2", ["c1", ["D2"], "c1"], "c2")), "nests a second chunking stage"),
    ((("c2D1", ["D2"], "c2")), "is not supported"),
    ((("c2", ["d2"], "c2")), "is not supported"),
])
def test_unsupported_layouts_are_one_line_errors(tmp_path, monkeypatch, layout, needle):
    model, _ = trained_looking(0)
    path = tmp_path / "release.pt"
    save_release(path, monkeypatch, model, model, arch_layout=layout)
    with pytest.raises(ReleaseCheckpointError, match=needle) as e:
        convert_release_checkpoint(str(path))
    assert "\n" not in str(e.value)


def test_release_key_names():
    assert release_key("_orig_mod.hnet.encoder.layers.1.skip_proj.weight") == "encoder.blocks.1.skip.weight"
    assert release_key("hnet.decoder.layers.0.cond_proj.1.bias") == "decoder.blocks.0.cond.1.bias"
    assert release_key("hnet.main_network.main_network.layers.11.attn.qkv.weight") == "blocks.11.attn.qkv.weight"
    assert release_key("hnet.main_network.main_network.rmsnorm.weight") == "inner_norm.weight"
    assert release_key("hnet.routing_module.residual_scorer.3.bias") == "router.out.bias"
    assert release_key("module.final_layer.linear.weight") == "final_layer.linear.weight"
    assert release_key("pos_embed") is None


def test_load_checkpoint_of_this_repo_and_its_errors(tmp_path):
    model, cfg = trained_looking(0)
    path = tmp_path / "ours.pt"
    torch.save({"model": model.state_dict(), "ema": model.state_dict(), "config": config_to_dict(cfg)}, path)
    loaded, loaded_cfg = load_checkpoint(str(path), weights="model")
    assert loaded_cfg == cfg and all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(),
                                                                       model.state_dict().values()))
    bare = tmp_path / "bare.pt"
    torch.save(model.state_dict(), bare)
    with pytest.raises(ValueError, match="holds no config"):
        load_checkpoint(str(bare))
    with pytest.raises(ValueError, match="weights='raw'"):
        load_checkpoint(str(path), weights="raw")


def test_release_conv_block_counts_become_scaffold_layouts(tmp_path, monkeypatch):
    """A release model with three conv blocks per side converts to model.encoder_layout/decoder_layout c3."""
    from models.release import release_to_config
    mod, config = release_config_module(arch_layout=("c3", ["D2"], "C3"))
    path = tmp_path / "c3.pt"
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "config", mod)
        torch.save({"model": {}, "ema": {}, "config": config}, path)
    cfg = release_to_config(read_release_checkpoint(str(path))["config"])
    assert (cfg.model.encoder_layout, cfg.model.decoder_layout, cfg.model.depth) == ("c3", "c3", 2)

