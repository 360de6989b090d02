"""Fuzz the config loader and the scripts' command lines: any input ends in a ConfigError/usage error, never an
unhandled exception."""
import argparse
import string

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from config import ConfigError, Config, add_config_args, config_from_args, load_config

SECTIONS = ["model", "diffusion", "data", "train", "sample", "upcycle", "nope", ""]
KEYS = ["name", "depth", "hidden_size", "router", "downsample_factor", "lr", "max_steps", "global_batch_size",
        "tail_dropping_fraction", "multi_budget_drop_fractions", "kind", "image_size", "cfg_scale", "x", ""]
values = st.one_of(st.integers(-10**6, 10**6), st.floats(allow_nan=True, allow_infinity=True), st.booleans(),
                   st.none(), st.text(string.printable, max_size=12), st.lists(st.floats(-2, 2), max_size=4))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(SECTIONS), st.sampled_from(KEYS), values), max_size=4))
def test_overrides_never_crash(items):
    overrides = [f"{s}.{k}={yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}"
                 for s, k, v in items]
    try:
        cfg = load_config(None, overrides)
    except ConfigError as e:
        assert "\n" not in str(e)
        return
    assert isinstance(cfg, Config)


@settings(max_examples=100, deadline=None)
@given(st.dictionaries(st.sampled_from(SECTIONS), st.one_of(values, st.dictionaries(st.sampled_from(KEYS), values,
                                                                                     max_size=3)), max_size=3))
def test_yaml_files_never_crash(tmp_path_factory, tree):
    path = tmp_path_factory.mktemp("fuzz") / "c.yaml"
    path.write_text(yaml.safe_dump(tree))
    try:
        load_config(str(path))
    except ConfigError as e:
        assert "\n" not in str(e)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.one_of(st.sampled_from(["--config", "--dry-run", "--resume", "configs/tiny/test-dit.yaml",
                                           "train.lr=1", "x", "--", "=", "a.b=c"]),
                          st.text(string.printable, max_size=8)), max_size=5))
def test_command_lines_never_crash(argv):
    parser = argparse.ArgumentParser(exit_on_error=False)
    add_config_args(parser)
    try:
        args = parser.parse_args(argv)
    except (argparse.ArgumentError, SystemExit):
        return
    try:
        config_from_args(args)
    except (ConfigError, SystemExit):
        pass
