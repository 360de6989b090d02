"""config.py: defaults, `_base_` chains, overrides, strict errors, round trips, --dry-run, main_guard."""
import argparse
import glob
import os
import subprocess
import sys
import textwrap

import pytest
import yaml

import config
from config import Config, ConfigError, load_config, validate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write(path, text):
    path.write_text(textwrap.dedent(text))
    return str(path)


def one_line_error(excinfo):
    message = str(excinfo.value)
    assert "\n" not in message, message
    return message


# ---------------------------------------------------------------------------------------------------
# Defaults and files
# ---------------------------------------------------------------------------------------------------

def test_defaults_are_the_paper_main_setting():
    cfg = load_config(None)
    assert cfg == Config()
    assert cfg.model.name == "DCDiT-B" and cfg.model.downsample_factor == 4.0 and cfg.model.router == "cosine"
    assert cfg.model.depth is None and cfg.model.encoder_width is None
    assert (cfg.train.global_batch_size, cfg.train.max_steps, cfg.train.lr) == (256, 400_000, 1e-4)
    assert cfg.train.ratio_loss_weight == 0.03 and cfg.train.ratio_group_size == 16
    assert cfg.train.multi_budget_drop_fractions == [0.0, 0.1, 0.2, 0.3]
    assert cfg.data.latent_scale == 0.18215 and cfg.sample.num_sampling_steps == 250
    # default_factory: instances must not share the list
    other = Config()
    other.train.multi_budget_drop_fractions.append(0.5)
    assert Config().train.multi_budget_drop_fractions == [0.0, 0.1, 0.2, 0.3]


def test_base_chain_merges_sections_field_by_field(tmp_path):
    (tmp_path / "sub").mkdir()
    write(tmp_path / "root.yaml", """
        model: {depth: 6, hidden_size: 256, num_heads: 4}
        train: {lr: 2e-4, max_steps: 100}
    """)
    write(tmp_path / "sub" / "mid.yaml", """
        _base_: ../root.yaml
        model: {depth: 8}
        sample: {cfg_scale: 1.5}
    """)
    leaf = write(tmp_path / "sub" / "leaf.yaml", """
        _base_: mid.yaml   # relative to this file, not to the working directory
        train: {max_steps: 7}
    """)
    cfg = load_config(leaf)
    assert cfg.model.depth == 8                      # mid overrides root
    assert cfg.model.hidden_size == 256 and cfg.model.num_heads == 4  # kept from root
    assert cfg.train.lr == 2e-4 and cfg.train.max_steps == 7          # leaf overrides root, lr kept
    assert cfg.sample.cfg_scale == 1.5
    assert cfg.model.name == "DCDiT-B"               # untouched fields keep defaults


def test_base_errors_name_the_problem(tmp_path):
    a = write(tmp_path / "a.yaml", "_base_: b.yaml\n")
    write(tmp_path / "b.yaml", "_base_: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle") as e:
        load_config(a)
    one_line_error(e)
    missing = write(tmp_path / "m.yaml", "_base_: nope.yaml\n")
    with pytest.raises(ConfigError, match="nope.yaml.*not found"):
        load_config(missing)
    listed = write(tmp_path / "l.yaml", "_base_: [a.yaml, b.yaml]\n")
    with pytest.raises(ConfigError, match="_base_"):
        load_config(listed)
    with pytest.raises(ConfigError, match="not found"):
        load_config(str(tmp_path / "absent.yaml"))


def test_yaml_float_written_without_dot(tmp_path):
    # YAML 1.1 reads `1e-4` as a string; float fields must still accept it, in files and in lists.
    path = write(tmp_path / "c.yaml", """
        train: {lr: 1e-4, weight_decay: 5E-2, multi_budget_drop_fractions: [0, 1e-1, .5]}
    """)
    cfg = load_config(path)
    assert cfg.train.lr == 1e-4 and isinstance(cfg.train.lr, float)
    assert cfg.train.weight_decay == 0.05
    assert cfg.train.multi_budget_drop_fractions == [0.0, 0.1, 0.5]
    assert all(isinstance(f, float) for f in cfg.train.multi_budget_drop_fractions)


# ---------------------------------------------------------------------------------------------------
# Overrides
# ---------------------------------------------------------------------------------------------------

def test_overrides_of_every_kind(tmp_path):
    path = write(tmp_path / "c.yaml", "model: {depth: 6}\ntrain: {lr: 2e-4}\n")
    cfg = load_config(path, [
        "train.max_steps=123",                         # int
        "train.lr=1e-4",                               # float written without a dot
        "model.dechunk_sigma=2",                       # int given to a float field
        "train.compile=true",                          # bool
        "model.router=predictability",                 # str
        "train.multi_budget_drop_fractions=[0.0,0.5]",  # list of float
        "model.depth=null",                            # Optional -> None
        "model.hidden_size=256", "model.num_heads=8",
        "logging.wandb=offline",                       # str choice
        "diffusion.timestep_respacing=250",            # str field: digits stay text
        'train.exp_name="my run"',                     # quoted str
        "train.max_steps=456",                         # later override wins
    ])
    assert cfg.train.max_steps == 456
    assert cfg.train.lr == 1e-4 and isinstance(cfg.train.lr, float)
    assert cfg.model.dechunk_sigma == 2.0 and isinstance(cfg.model.dechunk_sigma, float)
    assert cfg.train.compile is True
    assert cfg.model.router == "predictability"
    assert cfg.train.multi_budget_drop_fractions == [0.0, 0.5]
    assert cfg.model.depth is None                   # overrides beat the file
    assert (cfg.model.hidden_size, cfg.model.num_heads) == (256, 8)
    assert cfg.logging.wandb == "offline"
    assert cfg.diffusion.timestep_respacing == "250"
    assert cfg.train.exp_name == "my run"


def test_str_override_keeps_raw_text():
    # `off` is a YAML boolean; the str field must receive the word, which validate then rejects by name.
    with pytest.raises(ConfigError, match=r"logging\.wandb.*one of") as e:
        load_config(None, ["logging.wandb=off"])
    assert "'off'" in one_line_error(e)
    assert load_config(None, ["train.exp_name="]).train.exp_name == ""
    assert load_config(None, ["train.exp_name=a: b"]).train.exp_name == "a: b"       # not a YAML mapping
    assert load_config(None, ["train.results_dir=[runs]"]).train.results_dir == "[runs]"


def test_malformed_override():
    for bad in ["train.lr", "lr=1", "train.lr.x=1", ".lr=1"]:
        with pytest.raises(ConfigError, match="section.field=value") as e:
            load_config(None, [bad])
        one_line_error(e)


# ---------------------------------------------------------------------------------------------------
# Unknown keys and wrong types
# ---------------------------------------------------------------------------------------------------

def test_unknown_key_and_section(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(None, ["train.max_step=5"])
    message = one_line_error(e)
    assert message.startswith("train.max_step:") and "train.max_steps" in message
    path = write(tmp_path / "c.yaml", "train:\n  max_step: 5\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    message = one_line_error(e)
    assert "train.max_step" in message and "c.yaml" in message and "train.max_steps" in message
    with pytest.raises(ConfigError) as e:
        load_config(None, ["train.zzz=1"])
    assert "did you mean" not in one_line_error(e) and "train.max_steps" in str(e.value)  # lists the keys
    with pytest.raises(ConfigError, match="trian.*unknown section.*train"):
        load_config(None, ["trian.lr=1"])
    path = write(tmp_path / "d.yaml", "optim: {lr: 1}\n")
    with pytest.raises(ConfigError, match="optim.*unknown section"):
        load_config(path)
    with pytest.raises(ConfigError, match="train.*expected a mapping"):
        load_config(write(tmp_path / "e.yaml", "train: 5\n"))
    with pytest.raises(ConfigError, match="unknown key"):
        config.config_from_dict({"model": {"name": "DCDiT-B", "widht": 3}})


@pytest.mark.parametrize("override, expected", [
    ("train.max_steps=abc", r"train\.max_steps: expected int, got str 'abc'"),
    ("train.max_steps=1.5", r"train\.max_steps: expected int, got float"),
    ("train.max_steps=true", r"train\.max_steps: expected int, got bool"),  # bool is not an int
    ("model.learn_sigma=1", r"model\.learn_sigma: expected bool, got int"),
    ("train.lr=fast", r"train\.lr: expected float, got str"),
    ("train.lr=.inf", r"train\.lr: expected a finite float"),
    ("model.depth=2.5", r"model\.depth: expected int or null, got float"),
    ("model.depth=[1]", r"model\.depth: expected int or null, got list"),
    ("train.multi_budget_drop_fractions=0.1", r"train\.multi_budget_drop_fractions: expected a list of float"),
    ("train.multi_budget_drop_fractions=[0.1,x]", r"train\.multi_budget_drop_fractions\[1\]: expected float"),
    ("train.seed=[1]", r"train\.seed: expected int, got list"),
    ("model.mlp_ratio=null", r"model\.mlp_ratio: expected float, got NoneType"),
])
def test_wrong_type_names_key_and_expected_type(override, expected):
    with pytest.raises(ConfigError, match=expected) as e:
        load_config(None, [override])
    one_line_error(e)


def test_wrong_type_in_yaml_file(tmp_path):
    path = write(tmp_path / "c.yaml", "logging:\n  wandb: off\n")  # unquoted: YAML reads a bool
    with pytest.raises(ConfigError, match=r"logging\.wandb: expected str, got bool.*quote"):
        load_config(path)


# ---------------------------------------------------------------------------------------------------
# Impossible values
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, key", [
    (["model.downsample_factor=1"], "model.downsample_factor"),
    (["model.downsample_factor=0.5"], "model.downsample_factor"),
    (["model.hidden_size=768", "model.num_heads=5"], "model.hidden_size"),
    (["model.hidden_size=66"], "model.hidden_size"),            # sin-cos needs a multiple of 4
    (["model.encoder_width=40"], "model.encoder_width"),        # GroupNorm(32) cannot split 40
    (["model.router=learned"], "model.router"),
    (["model.attention=flash"], "model.attention"),
    (["model.class_dropout_prob=1.0"], "model.class_dropout_prob"),
    (["model.depth=0"], "model.depth"),
    (["model.dechunk_sigma=0"], "model.dechunk_sigma"),
    (["diffusion.noise_schedule=sqrt"], "diffusion.noise_schedule"),
    (["diffusion.timestep_respacing=fast"], "diffusion.timestep_respacing"),
    (["data.kind=images"], "data.kind"),
    (["data.vae=kl"], "data.vae"),
    (["data.image_size=260", "model.input_size=32"], "data.image_size"),  # not a multiple of 8
    (["data.image_size=512"], "model.input_size"),              # latents would be 64, model says 32
    (["train.mixed_precision=fp8"], "train.mixed_precision"),
    (["logging.wandb=cloud"], "logging.wandb"),
    (["train.profile_steps=[5]"], "train.profile_steps"),
    (["train.profile_steps=[6,5]"], "train.profile_steps"),
    (["train.init_weights=raw"], "train.init_weights"),
    (["train.nan_policy=ignore"], "train.nan_policy"),
    (["train.lr=0"], "train.lr"),
    (["train.lr=-1e-4"], "train.lr"),
    (["train.global_batch_size=0"], "train.global_batch_size"),
    (["train.grad_accum_steps=0"], "train.grad_accum_steps"),
    (["train.grad_accum_steps=3"], "train.global_batch_size"),  # 256 does not split into 3 micro-steps
    (["train.ema_decay=1.5"], "train.ema_decay"),
    (["train.multi_budget_drop_fractions=[0.0,1.0]"], "train.multi_budget_drop_fractions[1]"),
    (["train.multi_budget_drop_fractions=[-0.1]"], "train.multi_budget_drop_fractions[0]"),
    (["train.multi_budget_drop_fractions=[]"], "train.multi_budget_drop_fractions"),
    (["train.ratio_ramp_steps=10", "train.ratio_ramp_start=1.0"], "train.ratio_ramp_start"),
    (["train.exp_name=a/b"], "train.exp_name"),
    (["sample.tail_dropping_fraction=1.0"], "sample.tail_dropping_fraction"),
    (["sample.tail_dropping_fraction=-0.1"], "sample.tail_dropping_fraction"),
    (["sample.uncond_tail_dropping_fraction=1.0"], "sample.uncond_tail_dropping_fraction"),
    (["sample.uncond_tail_dropping_fraction=-0.5"], "sample.uncond_tail_dropping_fraction"),
    (["sample.guide_channels=5"], "sample.guide_channels"),     # only 4 eps channels exist
    (["sample.num_sampling_steps=2000"], "sample.num_sampling_steps"),
    (["sample.cfg_scale=0.5"], "sample.cfg_scale"),
])
def test_impossible_values_name_the_key(overrides, key):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    message = one_line_error(e)
    assert message.startswith(f"{key}: expected"), message


def test_edge_values_that_are_allowed():
    cfg = load_config(None, [
        "sample.uncond_tail_dropping_fraction=0.95",
        "sample.tail_dropping_fraction=0.9",
        "train.multi_budget_drop_fractions=[0.0,0.6]",
        "model.downsample_factor=1.5",
        "model.encoder_width=64",
        "data.kind=digits", "data.image_size=28",    # pixel space: no multiple-of-8 rule
        "train.multi_budget_start_step=50000",
    ])
    assert cfg.sample.uncond_tail_dropping_fraction == 0.95
    # DC-DiT-only GroupNorm rules do not apply to a plain DiT name
    load_config(None, ["model.name=DiT-B/2", "model.encoder_width=40"])


def test_validate_checks_programmatic_configs():
    cfg = Config()
    validate(cfg)
    cfg.train.lr = "fast"
    with pytest.raises(ConfigError, match=r"train\.lr: expected float"):
        validate(cfg)
    cfg = Config()
    cfg.model.downsample_factor = 1.0
    with pytest.raises(ConfigError, match=r"model\.downsample_factor"):
        validate(cfg)


# ---------------------------------------------------------------------------------------------------
# Round trips
# ---------------------------------------------------------------------------------------------------

def test_dict_round_trip_is_plain_data():
    cfg = load_config(os.path.join(ROOT, "configs", "tiny", "dcdit-digits.yaml"),
                      ["model.depth=null", "train.multi_budget_drop_fractions=[0.0,0.25]"])
    d = config.config_to_dict(cfg)

    def plain(x):
        if isinstance(x, dict):
            return all(isinstance(k, str) and plain(v) for k, v in x.items())
        if isinstance(x, list):
            return all(plain(v) for v in x)
        return x is None or type(x) in (str, int, float, bool)

    assert plain(d)
    assert config.config_from_dict(d) == cfg
    # a checkpoint saved before a field existed still loads, the field at its default
    del d["train"]["nan_policy"]
    assert config.config_from_dict(d).train.nan_policy == "stop"


def test_dict_round_trip_through_torch_weights_only(tmp_path):
    torch = pytest.importorskip("torch")
    cfg = load_config(os.path.join(ROOT, "configs", "tiny", "test-dcdit.yaml"))
    torch.save({"config": config.config_to_dict(cfg)}, tmp_path / "ckpt.pt")
    loaded = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert config.config_from_dict(loaded["config"]) == cfg


def test_config_from_dict_checks_values():
    with pytest.raises(ConfigError, match=r"model\.downsample_factor"):
        config.config_from_dict({"model": {"downsample_factor": 1}})
    with pytest.raises(ConfigError, match=r"train\.max_steps: expected int"):
        config.config_from_dict({"train": {"max_steps": "many"}})


def test_saved_yaml_reloads_equal(tmp_path):
    cfg = load_config(os.path.join(ROOT, "configs", "DCDiT-XL-N16.yaml"),
                      ["train.lr=3e-5", "diffusion.timestep_respacing=250", "logging.wandb=offline",
                       "train.exp_name=0123", "model.depth=null"])
    path = tmp_path / "run" / "config.yaml"
    config.save_config(cfg, str(path))
    assert load_config(str(path)) == cfg
    assert yaml.safe_load(path.read_text()) == config.config_to_dict(cfg)
    assert config.format_config(cfg) == path.read_text()
    assert "multi_budget_drop_fractions: [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6]" in path.read_text()  # as configs/
    assert [p.name for p in path.parent.iterdir()] == ["config.yaml"]  # no temp file left behind


# ---------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------

def parser():
    return config.add_config_args(argparse.ArgumentParser())


def test_config_from_args_loads_file_and_overrides():
    args = parser().parse_args(["--config", os.path.join(ROOT, "configs", "tiny", "test-dit.yaml"),
                                "train.max_steps=3", "sample.cfg_scale=1.5"])
    cfg = config.config_from_args(args)
    assert cfg.model.hidden_size == 64 and cfg.train.max_steps == 3 and cfg.sample.cfg_scale == 1.5
    assert config.config_from_args(parser().parse_args([])) == Config()


def test_dry_run_prints_resolved_yaml_and_exits_0(capsys):
    args = parser().parse_args(["--config", os.path.join(ROOT, "configs", "DCDiT-B-N16.yaml"), "--dry-run",
                                "train.lr=2e-4"])
    with pytest.raises(SystemExit) as e:
        config.config_from_args(args)
    assert e.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["downsample_factor"] == 16.0 and printed["train"]["lr"] == 2e-4
    assert config.config_from_dict(printed) == load_config(
        os.path.join(ROOT, "configs", "DCDiT-B-N16.yaml"), ["train.lr=2e-4"])


SCRIPT = """
import argparse
import config

class DataProblem(RuntimeError):
    user_error = True

@config.main_guard
def main():
    parser = config.add_config_args(argparse.ArgumentParser())
    parser.add_argument("--raise", dest="raise_", default="")
    args = parser.parse_args()
    if args.raise_ == "user":
        raise DataProblem("features folder missing:\\n  expected imagenet256_features/")
    if args.raise_ == "bug":
        raise RuntimeError("a real bug")
    cfg = config.config_from_args(args)
    print("steps", cfg.train.max_steps)

main()
"""


def run_script(tmp_path, *argv):
    script = tmp_path / "script.py"
    script.write_text(SCRIPT)
    return subprocess.run([sys.executable, str(script), *argv], capture_output=True, text=True, timeout=60)


def test_main_guard_and_dry_run_in_a_script(tmp_path):
    ok = run_script(tmp_path, "train.max_steps=7")
    assert ok.returncode == 0 and ok.stdout.strip() == "steps 7", ok.stderr
    dry = run_script(tmp_path, "--dry-run", "train.max_steps=7")
    assert dry.returncode == 0 and yaml.safe_load(dry.stdout)["train"]["max_steps"] == 7
    bad = run_script(tmp_path, "train.max_step=7")
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.count("\n") == 1 and bad.stderr.startswith("error: train.max_step:"), bad.stderr
    assert "Traceback" not in bad.stderr
    user = run_script(tmp_path, "--raise", "user")   # any exception class with user_error = True
    assert user.returncode == 2 and user.stderr.count("\n") == 1
    assert user.stderr.startswith("error: features folder missing: expected imagenet256_features/")
    bug = run_script(tmp_path, "--raise", "bug")     # other exceptions keep their traceback
    assert bug.returncode == 1 and "Traceback" in bug.stderr


def test_main_guard_in_process(capsys):
    @config.main_guard
    def main():
        load_config(None, ["model.router=learned"])

    with pytest.raises(SystemExit) as e:
        main()
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: model.router: expected one of") and err.count("\n") == 1


# ---------------------------------------------------------------------------------------------------
# Shipped configs
# ---------------------------------------------------------------------------------------------------

CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "**", "*.yaml"), recursive=True))


def test_configs_exist():
    names = {os.path.relpath(p, os.path.join(ROOT, "configs")) for p in CONFIGS}
    expected = {f"DCDiT-{s}-N{n}.yaml" for s in "S B L XL".split() for n in (4, 16)}
    expected |= {"DiT-XL-2.yaml", "DiT-B-2.yaml"}
    expected |= {f"baselines/DiT-{m}-{k}.yaml" for m in ("B-2", "B-4", "XL-2", "XL-4") for k in ("isoparam", "isoflop")}
    expected |= {f"tiny/{n}.yaml" for n in ("dit-digits", "dcdit-digits", "test-dit", "test-dcdit")}
    assert expected <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: os.path.relpath(p, ROOT))
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert config.config_from_dict(config.config_to_dict(cfg)) == cfg


def test_shipped_config_values():
    def load(name):
        return load_config(os.path.join(ROOT, "configs", name))

    assert load("DCDiT-XL-N16.yaml").model.name == "DCDiT-XL"
    assert load("DCDiT-XL-N16.yaml").model.downsample_factor == 16.0
    # The paper's main setting is the default; the paper configs add the release's multi-budget recipe.
    recipe = Config()
    recipe.train.multi_budget = True
    recipe.train.multi_budget_drop_fractions = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
    recipe.train.multi_budget_start_step = 50000
    assert load("DCDiT-B-N4.yaml") == recipe
    for name in ("DCDiT-S-N4.yaml", "DCDiT-L-N16.yaml", "DCDiT-XL-N4.yaml", "DCDiT-XL-N16.yaml"):
        t = load(name).train
        assert (t.multi_budget, t.multi_budget_start_step, t.multi_budget_drop_fractions) == (
            True, 50000, recipe.train.multi_budget_drop_fractions), name
    assert (recipe.sample.cfg_scale, recipe.sample.fid_cfg_scale) == (4.0, 1.5)  # pictures | FID, as the release
    m = recipe.model
    assert (m.inner_norm, m.residual_init, m.router_args) == (True, "xavier", {})  # predictability: bias -1.1
    assert load("DiT-XL-2.yaml").model.name == "DiT-XL/2"
    depths = {"B-2-isoparam": 13, "B-2-isoflop": 17, "B-4-isoparam": 13, "B-4-isoflop": 28,
              "XL-2-isoparam": 29, "XL-2-isoflop": 34, "XL-4-isoparam": 29, "XL-4-isoflop": 50}
    for stem, depth in depths.items():
        cfg = load(f"baselines/DiT-{stem}.yaml")
        assert cfg.model.depth == depth and cfg.model.name == "DiT-" + stem.split("-iso")[0].replace("-", "/")
    digits = load("tiny/dcdit-digits.yaml")
    assert (digits.model.name, digits.model.in_channels, digits.data.kind) == ("DCDiT-S", 1, "digits")
    assert (digits.model.encoder_width, digits.model.norm_groups, digits.train.lr) == (24, 8, 3e-4)
    test = load("tiny/test-dcdit.yaml")
    assert (test.model.input_size, test.model.depth, test.model.hidden_size, test.train.max_steps) == (8, 2, 64, 20)
    assert test.train.mixed_precision == "no" and test.data.num_workers == 0


def test_fields_that_moved_section_still_load_from_older_configs():
    """A checkpoint saved before logging had its own section still resumes: train.wandb and train.sample_every
    land in logging.wandb and logging.image_every, from a saved tree and from an override alike."""
    cfg = config.config_from_dict({"train": {"wandb": "offline", "sample_every": 50, "lr": 2e-4}})
    assert (cfg.logging.wandb, cfg.logging.image_every, cfg.train.lr) == ("offline", 50, 2e-4)
    assert load_config(None, ["train.sample_every=7"]).logging.image_every == 7

