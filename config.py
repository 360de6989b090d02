"""Typed configuration: dataclasses, YAML files with `_base_`, command-line overrides, validation.

Every default is the paper's main setting (DC-DiT-B, N = 4, ImageNet 256x256 SD-VAE latents, 400K steps
at global batch 256 with AdamW lr 1e-4, ratio-loss weight 0.03: paper §4 "Training"), so a YAML file under
configs/ lists only what differs (nanoGPT's habit). Strictness: an unknown key, a
wrong type or an impossible value is a `ConfigError` whose one-line message names the key and what was
expected, because a silently ignored typo in a 400K-step run costs days.

    cfg = load_config("configs/DCDiT-B-N4.yaml", ["train.lr=2e-4", "model.depth=13"])

A file may start from another one with `_base_: other.yaml` (relative to the including file, may chain);
sections are merged field by field, the including file winning. Command-line overrides are
`section.field=value` with the value read as YAML, so `1e-4`, `[0.0, 0.5]`, `true` and `null` all work.
The resolved config is plain data (`config_to_dict`) so it fits in a checkpoint read with
`torch.load(weights_only=True)`, and `config_from_dict` rebuilds it with the same checks.
"""
import argparse
import dataclasses
import difflib
import functools
import math
import os
import re
import sys
import types
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional, Union, get_args, get_origin, get_type_hints

import yaml

from fileio import atomic_write

# Allowed values of the string-choice fields; scripts may reuse them as argparse `choices`.
RESIDUAL_INITS = ("xavier", "zero")  # residual_proj weight: what the release trains | H-Net's zero init
ATTENTION_KINDS = ("packed", "padded")
NOISE_SCHEDULES = ("linear", "cosine")
DATA_KINDS = ("features", "digits")
VAES = ("ema", "mse")  # stabilityai/sd-vae-ft-ema | sd-vae-ft-mse
MIXED_PRECISION = ("no", "fp16", "bf16")
WANDB_MODES = ("disabled", "offline", "online")
NAN_POLICIES = ("stop", "skip")
FLOPS_SCOPES = ("blocks", "model")  # DyDiT's FLOPs loss over the inner blocks | the whole DC-DiT forward


class ConfigError(ValueError):
    """A bad config: the message is one line naming the key and what was expected."""

    user_error = True  # main_guard prints it as `error: ...` instead of a traceback


# ----------------------------------------------------------------------------------------------------
# Schema. Other modules code against these exact names.
# ----------------------------------------------------------------------------------------------------

@dataclass
class ModelConfig:
    name: str = "DCDiT-B"          # a key of models.dit.DiT_models ("DiT-XL/2") or models.dc_dit.DCDiT_models
    input_size: int = 32           # latent (or pixel, for the digits demo) grid side
    in_channels: int = 4
    num_classes: int = 1000
    class_dropout_prob: float = 0.1  # CFG label dropout, as DiT
    learn_sigma: bool = True
    depth: Optional[int] = None    # None -> the registry's value (lets Table 1 baselines add blocks by config)
    hidden_size: Optional[int] = None
    num_heads: Optional[int] = None
    mlp_ratio: float = 4.0
    # DC-DiT only (ignored for DiT names)
    encoder_width: Optional[int] = None   # None -> hidden_size // 4
    encoder_layout: str = "c2"            # scaffold blocks per side: runs such as "c2", "c3", "c1D1" (c = conv ResBlock,
    decoder_layout: str = "c2"            # D = DiT block, d = DiT block without MLP); "c2" is the paper's and release's
    norm_groups: int = 32                 # GroupNorm groups in the conv encoder/decoder (§3.2)
    router: str = "cosine"                # a key of models.routers.ROUTERS: "cosine" (§3.3) | "predictability"
                                          # (authors' release) | "random" (§4.3)
    router_args: dict[str, Any] = field(default_factory=dict)  # the router's own options, e.g. {bias_init: target}
    downsample_factor: float = 4.0        # N, target compression of the ratio loss (must be > 1)
    dechunker: str = "gaussian"           # a key of models.chunking.DECHUNKERS: "gaussian" (§3.4) | "nearest"
    dechunk_sigma: float = 1.0            # Gaussian smoothing sigma in grid units (2.0 at 512px)
    # A second chunking stage on stage 0's kept tokens (models/hierarchy.py); null = single-stage (the paper).
    stage1_downsample_factor: Optional[float] = None  # N of the inner stage (e.g. 2 with N = 2: 4x overall)
    stage1_encoder_depth: int = 1         # DiT blocks of the inner stage's encoder / decoder on the stage-0 tokens
    stage1_decoder_depth: int = 1
    stage1_dechunker: str = "gaussian"    # "gaussian" (§3.4 on the kept tokens' positions) | "nearest"
    stage1_dechunk_sigma: float = 2.0     # grid cells; stage-0 kept tokens are about sqrt(N) cells apart
    stage1_router_sigma: float = 2.0      # grid cells of the Gaussian neighbourhood the inner router compares with
    pos_scale: float = 1.0                # scale of kept tokens' (row, col) before the sin-cos embedding
    cond_adaptor: bool = False            # LayerNorm adaptor on c in encoder/decoder (upcycling, §4.4)
    inner_norm: bool = True               # RMSNorm after the last inner block, before de-chunking (release, H-Net)
    residual_init: str = "xavier"         # residual_proj weight: "xavier" (what the release trains) | "zero" (H-Net)
    attention: str = "packed"             # "packed" | "padded"
    grad_checkpointing: bool = False


@dataclass
class DiffusionConfig:
    diffusion_steps: int = 1000           # paper §4: linear schedule, 1000 training steps (as DiT)
    noise_schedule: str = "linear"        # "linear" | "cosine"
    timestep_respacing: str = ""          # training uses all steps


@dataclass
class DataConfig:
    kind: str = "features"                # "features" (fast-DiT latent layout) | "digits" (bundled MNIST, pixel space)
    feature_path: str = "features"        # folder holding imagenet{image_size}_features/ and _labels/
    image_size: int = 256                 # pixels; latents are image_size // vae_downsample
    # The autoencoder's latents (SD-VAE's by default); extract_features.py records them next to the features and
    # training and sampling check these against that record (vae.latent_geometry).
    vae_downsample: int = 8               # pixels per latent cell along a side
    latent_scale: float = 0.18215         # latents = (z - latent_shift) * latent_scale: SD-VAE's, LDM's choice
    latent_shift: float = 0.0
    vae: str = "ema"                      # "ema" | "mse" (stabilityai/sd-vae-ft-*)
    vae_path: str = ""                    # a local diffusers AutoencoderKL folder instead of the hub's SD-VAE
    num_workers: int = 4


@dataclass
class TrainConfig:
    results_dir: str = "results"
    exp_name: str = ""                    # "" -> derived from model.name
    global_batch_size: int = 256          # paper §4
    max_steps: int = 400_000              # paper §4 (Table 1 is at 400K steps)
    lr: float = 1e-4                      # AdamW, paper §4
    weight_decay: float = 0.0
    ema_decay: float = 0.9999
    grad_clip: float = 1.0
    grad_accum_steps: int = 1
    mixed_precision: str = "bf16"         # "no" | "fp16" | "bf16"
    seed: int = 0
    log_every: int = 100
    ckpt_every: int = 50_000
    keep_last_ckpts: int = 0              # 0 = keep all
    compile: bool = False
    deterministic: bool = False           # deterministic kernels (exact resume on GPUs; slower)
    tf32: bool = False                    # TF32 fp32 matmuls on CUDA (DiT's train.py: on; the release's: off)
    fused_adamw: bool = True              # AdamW's fused CUDA kernels: the same update, fewer kernels (CPU: foreach)
    init_from: str = ""                   # a checkpoint whose weights start a new run (fresh optimizer, step 0)
    init_weights: str = "ema"             # which weights of init_from: "ema" | "model"
    profile_steps: list[int] = field(default_factory=list)  # [a, b]: torch.profiler trace of steps a..b
    ratio_loss_weight: float = 0.03       # lambda, §3.5 (grid-searched in §4)
    stage1_ratio_loss_weight: float = 0.03  # the inner stage's ratio loss (two-stage models)
    ratio_group_size: int = 16
    ratio_ramp_steps: int = 0             # 0 = no ramp; else N ramps linearly from ratio_ramp_start to N
    ratio_ramp_start: float = 2.0
    # Multi-budget training (authors' README): from the start step on, each step trains at a tail-drop fraction
    # drawn from the list. Off by default and on in the paper configs, as the release's code and shipped YAML.
    multi_budget: bool = False
    multi_budget_drop_fractions: list[float] = field(default_factory=lambda: [0.0, 0.1, 0.2, 0.3])
    multi_budget_start_step: Optional[int] = None  # null = when the N ramp ends (ratio_ramp_steps), as the release
    nan_policy: str = "stop"              # "stop" | "skip"


@dataclass
class SampleConfig:
    num_sampling_steps: int = 250         # paper §4: DDPM with 250 steps
    cfg_scale: float = 4.0                # sample.py: pictures (DiT's and the release's sample.py)
    fid_cfg_scale: float = 1.5            # sample_ddp.py: the FID convention of DiT and the release
    guide_channels: int = 3               # DiT guides the first 3 eps channels; 0 = all channels
    seed: int = 0
    tail_dropping_fraction: float = 0.0
    uncond_tail_dropping_fraction: float = 0.0    # Lite-CFG only: the unconditional branch's budget (release default)
    lite_cfg: bool = False
    per_proc_batch_size: int = 32
    num_fid_samples: int = 50_000


@dataclass
class UpcycleConfig:
    checkpoint: str = ""                  # "" = no upcycling
    distill_steps: int = 5000             # activation-distillation warm-up, §4.4


@dataclass
class DyDiTConfig:
    """DyDiT on the inner blocks (paper §4.5, Table 4): fine-tuned from a DC-DiT checkpoint."""
    enabled: bool = False
    target_ratio: float = 0.7             # lambda: target F_dynamic / F_static of the inner blocks (Table 4)
    flops_loss_weight: float = 1.0        # weight of (mean F_dyn / F_static - lambda)^2 in the total loss
    tau: float = 5.0                      # Gumbel-sigmoid temperature of the gates in training (DyDiT)
    init_checkpoint: str = ""             # DC-DiT checkpoint to fine-tune from ("" = gates on a fresh model)
    flops_scope: str = "blocks"           # F of the loss: "blocks" (inner blocks) | "model" (whole forward)


@dataclass
class LoggingConfig:
    """Where a run reports besides log.txt: W&B (offline works without an account) and/or TensorBoard."""
    wandb: str = "disabled"               # "disabled" | "offline" | "online"
    project: str = "dc-dit"               # W&B project
    entity: str = ""                      # W&B team or user ("" = the account's default)
    run_name: str = ""                    # "" = the run folder's name
    tags: list[str] = field(default_factory=list)
    resume_wandb: bool = True             # --resume continues the same W&B run (its id is kept in the checkpoint)
    tensorboard: bool = False             # also write TensorBoard event files to RUN/tensorboard/
    image_every: int = 0                  # 0 = never; else an EMA sample grid and chunking visualisation every k steps


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    upcycle: UpcycleConfig = field(default_factory=UpcycleConfig)
    dydit: DyDiTConfig = field(default_factory=DyDiTConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


# ----------------------------------------------------------------------------------------------------
# Type checking against the annotations
# ----------------------------------------------------------------------------------------------------

SECTIONS: dict[str, type] = get_type_hints(Config)  # section name -> dataclass
# Fields that moved to another section; configs saved in older checkpoints (and old command lines) still load.
MOVED = {("train", "wandb"): ("logging", "wandb"), ("train", "sample_every"): ("logging", "image_every")}
_FIELD_TYPES: dict[str, dict[str, Any]] = {name: get_type_hints(cls) for name, cls in SECTIONS.items()}
# A YAML 1.1 float needs a dot ("1.0e-4"), so "1e-4" arrives as a string; accept any such decimal text.
_FLOAT_TEXT = re.compile(r"[-+]?(\d[\d_]*\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _optional_inner(tp: Any) -> Optional[Any]:
    """X for Optional[X] (either spelling), else None."""
    if get_origin(tp) in (Union, types.UnionType):
        inner = [a for a in get_args(tp) if a is not type(None)]
        if len(inner) == 1:
            return inner[0]
    return None


def _describe(tp: Any) -> str:
    inner = _optional_inner(tp)
    if inner is not None:
        return f"{_describe(inner)} or null"
    if get_origin(tp) is list:
        return f"a list of {_describe(get_args(tp)[0])}"
    if get_origin(tp) is dict:
        return "a mapping of option: value"
    return tp.__name__


def _type_error(key: str, tp: Any, value: Any) -> ConfigError:
    hint = ""
    if tp is str and isinstance(value, bool):
        hint = " (YAML reads yes/no/on/off as booleans: quote the string)"
    return ConfigError(f"{key}: expected {_describe(tp)}, got {type(value).__name__} {value!r}{hint}")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """`value` checked against annotation `tp`; ints and decimal text become floats for float fields.

    bool is not accepted as an int (nor 0/1 as a bool): `learn_sigma: 1` is more likely a slip than intent.
    """
    inner = _optional_inner(tp)
    if inner is not None:
        if value is None:
            return None
        try:
            return _coerce(value, inner, key)
        except ConfigError:
            raise _type_error(key, tp, value) from None
    if get_origin(tp) is list:
        if not isinstance(value, (list, tuple)):
            raise _type_error(key, tp, value)
        (elem,) = get_args(tp)
        return [_coerce(v, elem, f"{key}[{i}]") for i, v in enumerate(value)]
    if get_origin(tp) is dict:
        # Options of a registered component (e.g. model.router_args): plain YAML data under string keys; the
        # component's registry checks the keys and value types.
        if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
            raise _type_error(key, tp, value)
        for k, v in value.items():
            if not isinstance(v, (str, int, float, bool, list, type(None))):
                raise ConfigError(f"{key}.{k}: expected a YAML scalar or list, got {type(v).__name__}")
        return dict(value)
    if tp is bool and isinstance(value, bool):
        return value
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp is str and isinstance(value, str):
        return value
    if tp is float and not isinstance(value, bool):
        number = None
        if isinstance(value, (int, float)):
            number = value
        elif isinstance(value, str) and _FLOAT_TEXT.fullmatch(value.strip()):
            number = value.strip().replace("_", "")
        if number is not None:
            try:
                number = float(number)
            except OverflowError:
                number = math.inf
            if not math.isfinite(number):
                raise ConfigError(f"{key}: expected a finite float, got {value!r}")
            return number
    raise _type_error(key, tp, value)


def _unknown_key(key: str, known: Sequence[str], where: str, what: str = "key") -> ConfigError:
    # Compare field names without the shared "section." prefix, which would make every key look close.
    tails = {k.rpartition(".")[2]: k for k in known}
    close = [tails[c] for c in difflib.get_close_matches(key.rpartition(".")[2], list(tails), n=1)]
    expected = f"did you mean {close[0]}?" if close else f"expected one of {', '.join(known)}"
    return ConfigError(f"{key}: unknown {what}{where}; {expected}")


def _field_type(section: Any, name: Any, where: str) -> Any:
    """Annotation of `section.name`, or a ConfigError naming the unknown section or key."""
    if section not in SECTIONS:
        raise _unknown_key(str(section), list(SECTIONS), where, "section")
    types_ = _FIELD_TYPES[section]
    if name not in types_:
        raise _unknown_key(f"{section}.{name}", [f"{section}.{k}" for k in types_], where)
    return types_[name]


def _check_tree(tree: Any, where: str) -> dict:
    """`tree` as {section: {field: value}} with every name known (values are checked later)."""
    if not isinstance(tree, Mapping):
        raise ConfigError(f"config{where}: expected a mapping of sections ({', '.join(SECTIONS)}), "
                          f"got {type(tree).__name__}")
    out = {}
    for section, body in tree.items():
        if section not in SECTIONS:
            raise _unknown_key(str(section), list(SECTIONS), where, "section")
        body = {} if body is None else body  # an empty `sample:` heading is harmless
        if not isinstance(body, Mapping):
            raise ConfigError(f"{section}{where}: expected a mapping of field: value, got {type(body).__name__}")
        for name, value in body.items():
            section_to, name_to = MOVED.get((section, name), (section, name))
            _field_type(section_to, name_to, where)
            out.setdefault(section_to, {})[name_to] = value
    return out


# ----------------------------------------------------------------------------------------------------
# Plain data <-> Config
# ----------------------------------------------------------------------------------------------------

def config_from_dict(d: Mapping) -> Config:
    """A Config from {section: {field: value}} (e.g. a checkpoint's "config"), missing fields at defaults.

    Same checks as load_config: unknown keys, types, then validate().
    """
    tree = _check_tree(d, "")
    sections = {}
    for section, cls in SECTIONS.items():
        body = tree.get(section, {})
        sections[section] = cls(**{k: _coerce(v, _FIELD_TYPES[section][k], f"{section}.{k}")
                                   for k, v in body.items()})
    cfg = Config(**sections)
    validate(cfg)
    return cfg


def config_to_dict(cfg: Config) -> dict:
    """{section: {field: value}} of plain str/int/float/bool/None/list: safe for torch.load(weights_only=True)."""
    return dataclasses.asdict(cfg)


class _Dumper(yaml.SafeDumper):
    """Lists in flow style ([0.0, 0.1]) so a resolved config reads like the hand-written files."""


_Dumper.add_representer(
    list, lambda dumper, value: dumper.represent_sequence("tag:yaml.org,2002:seq", value, flow_style=True))


def format_config(cfg: Config) -> str:
    """The fully resolved config as YAML text, loadable by load_config."""
    return yaml.dump(config_to_dict(cfg), Dumper=_Dumper, sort_keys=False, default_flow_style=False)


def save_config(cfg: Config, path: str) -> None:
    """Write format_config(cfg) to `path` atomically (fileio.atomic_write), creating its folder."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write(path, lambda f: f.write(format_config(cfg).encode()))


# ----------------------------------------------------------------------------------------------------
# YAML files with `_base_`, and command-line overrides
# ----------------------------------------------------------------------------------------------------

def _one_line(text: Any) -> str:
    return " ".join(str(text).split())


def _read_tree(path: str, chain: tuple[str, ...] = ()) -> dict:
    """The merged {section: {field: value}} of `path` and its `_base_` chain (the including file wins)."""
    real = os.path.realpath(path)
    if real in chain:
        raise ConfigError(f"_base_: cycle {' -> '.join(chain + (real,))}; expected a chain that ends")
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path}: not found; expected a path to a YAML file")
    with open(path) as f:
        try:
            raw = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path}: invalid YAML: {_one_line(e)}") from None
    raw = {} if raw is None else raw
    if not isinstance(raw, Mapping):
        raise ConfigError(f"config file {path}: expected a mapping of sections at the top level, "
                          f"got {type(raw).__name__}")
    raw = dict(raw)
    base = raw.pop("_base_", None)
    tree = _check_tree(raw, f" in {path}")
    if base is None:
        return tree
    if not isinstance(base, str) or not base:
        raise ConfigError(f"_base_ in {path}: expected one file path (a string), got {base!r}")
    merged = _read_tree(os.path.join(os.path.dirname(path), base), chain + (real,))
    for section, body in tree.items():  # sections merge field by field
        merged.setdefault(section, {}).update(body)
    return merged


def _parse_override(text: str) -> tuple[str, str, Any]:
    """"section.field=value" -> (section, field, value), the value read as YAML and checked for the field.

    A str field takes the text as typed unless YAML reads it as a string (which strips quotes), so that
    `diffusion.timestep_respacing=250`, `logging.wandb=off` or `train.exp_name=a: b` keep what the user typed.
    """
    name, sep, raw = text.partition("=")
    parts = name.strip().split(".")
    if not sep or len(parts) != 2 or not all(parts):
        raise ConfigError(f"override {text!r}: expected section.field=value, e.g. train.lr=1e-4")
    section, key = MOVED.get(tuple(parts), tuple(parts))
    tp = _field_type(section, key, f" in override {text!r}")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        if tp is not str:
            raise ConfigError(f"{section}.{key}: could not read {raw!r} as YAML ({_one_line(e)}); "
                              f"expected {_describe(tp)}") from None
        value = raw.strip()
    if tp is str and not isinstance(value, str):
        value = raw.strip()
    return section, key, _coerce(value, tp, f"{section}.{key}")


def load_config(path: Optional[str], overrides: Sequence[str] = (), base: Optional[Mapping] = None) -> Config:
    """Defaults <- `base` (e.g. a checkpoint's saved config) <- YAML at `path` (with its `_base_` chain;
    None = none) <- overrides, validated."""
    tree = {s: dict(body) for s, body in _check_tree(dict(base), " in the saved config").items()} if base else {}
    for section, body in (_read_tree(path) if path is not None else {}).items():
        tree.setdefault(section, {}).update(body)
    for text in overrides:
        section, key, value = _parse_override(text)
        tree.setdefault(section, {})[key] = value
    return config_from_dict(tree)


# ----------------------------------------------------------------------------------------------------
# Impossible values
# ----------------------------------------------------------------------------------------------------

def _require(ok: bool, key: str, expected: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"{key}: expected {expected}, got {value!r}")


def _check_types(cfg: Config) -> None:
    """Every field has its annotated type (catches programmatic assignments such as cfg.train.lr = "x")."""
    if not isinstance(cfg, Config):
        raise ConfigError(f"config: expected a config.Config, got {type(cfg).__name__}")
    for section, cls in SECTIONS.items():
        body = getattr(cfg, section)
        if not isinstance(body, cls):
            raise ConfigError(f"{section}: expected a config.{cls.__name__}, got {type(body).__name__}")
        for name, tp in _FIELD_TYPES[section].items():
            _coerce(getattr(body, name), tp, f"{section}.{name}")


def validate(cfg: Config) -> None:
    """Raise ConfigError on the first impossible value (types are checked first).

    Checks that need the world size (global batch divisible by it) live in train.py; checks that need the
    model registry (valid name, patch size dividing input_size) live in models.create_model.
    """
    _check_types(cfg)
    m, d, data, t, s, u, dy = cfg.model, cfg.diffusion, cfg.data, cfg.train, cfg.sample, cfg.upcycle, cfg.dydit

    _require(bool(m.name), "model.name", "a model registry name such as DCDiT-B or DiT-XL/2", m.name)
    _require(m.input_size >= 1, "model.input_size", "a positive grid side", m.input_size)
    _require(m.in_channels >= 1, "model.in_channels", "a positive channel count", m.in_channels)
    _require(m.num_classes >= 1, "model.num_classes", "a positive class count", m.num_classes)
    _require(0.0 <= m.class_dropout_prob < 1.0, "model.class_dropout_prob", "a probability in [0, 1)",
             m.class_dropout_prob)
    for name in ("depth", "hidden_size", "num_heads", "encoder_width"):
        value = getattr(m, name)
        _require(value is None or value >= 1, f"model.{name}", "a positive int or null (registry value)", value)
    if m.hidden_size is not None:
        # The 2D sin-cos embedding gives half the width to each axis, each half split into sin and cos.
        _require(m.hidden_size % 4 == 0, "model.hidden_size", "a multiple of 4 (2D sin-cos position embedding)",
                 m.hidden_size)
        if m.num_heads is not None:
            _require(m.hidden_size % m.num_heads == 0, "model.hidden_size",
                     f"a multiple of model.num_heads={m.num_heads}", m.hidden_size)
    _require(m.mlp_ratio > 0, "model.mlp_ratio", "> 0", m.mlp_ratio)
    _require(m.norm_groups >= 1, "model.norm_groups", "a positive GroupNorm group count", m.norm_groups)
    if m.name.startswith("DCDiT"):
        # GroupNorm needs every encoder/decoder width (E and D, §3.2) to split into norm_groups groups.
        width = m.encoder_width if m.encoder_width is not None else (
            m.hidden_size // 4 if m.hidden_size is not None else None)
        if width is not None:
            _require(width % m.norm_groups == 0, "model.encoder_width",
                     f"a multiple of model.norm_groups={m.norm_groups} (GroupNorm in the encoder/decoder)", width)
        if m.hidden_size is not None:
            _require(m.hidden_size % m.norm_groups == 0, "model.hidden_size",
                     f"a multiple of model.norm_groups={m.norm_groups} (GroupNorm in the encoder/decoder)",
                     m.hidden_size)
    # The registries are the lists of choices: a new router or de-chunker needs no edit here.
    from models.chunking import DECHUNKERS
    from models.routers import ROUTERS, RouterArgsError, check_router_args
    _require(m.router in ROUTERS, "model.router", f"one of {tuple(ROUTERS)}", m.router)
    try:
        check_router_args(m.router, m.router_args)
    except RouterArgsError as e:
        raise ConfigError(str(e)) from None
    _require(m.dechunker in DECHUNKERS, "model.dechunker", f"one of {tuple(DECHUNKERS)}", m.dechunker)
    for side in ("encoder", "decoder"):
        layout = getattr(m, f"{side}_layout")
        _require(re.fullmatch(r"([cdD][1-9]\d*)+", layout) is not None, f"model.{side}_layout",
                 "runs of block kinds with counts such as 'c2' or 'c1D1' (c = conv ResBlock, D = DiT block, "
                 "d = DiT block without MLP)", layout)
    if m.stage1_downsample_factor is not None:
        _require(m.stage1_downsample_factor > 1.0, "model.stage1_downsample_factor", "> 1 (the inner stage's N), or "
                 "null (single stage)", m.stage1_downsample_factor)
        _require(m.stage1_encoder_depth >= 0 and m.stage1_decoder_depth >= 0, "model.stage1_encoder_depth",
                 ">= 0 DiT blocks per side", (m.stage1_encoder_depth, m.stage1_decoder_depth))
        _require(m.stage1_dechunker in ("gaussian", "nearest"), "model.stage1_dechunker", "'gaussian' or 'nearest'",
                 m.stage1_dechunker)
        _require(m.stage1_dechunk_sigma > 0 and m.stage1_router_sigma > 0, "model.stage1_dechunk_sigma",
                 "positive widths (stage1_dechunk_sigma, stage1_router_sigma)",
                 (m.stage1_dechunk_sigma, m.stage1_router_sigma))
    _require(m.residual_init in RESIDUAL_INITS, "model.residual_init", f"one of {RESIDUAL_INITS}", m.residual_init)
    # N = 1 makes the ratio loss's N/(N-1) infinite and means no compression at all (§3.5).
    _require(m.downsample_factor > 1.0, "model.downsample_factor", "> 1 (target compression N)",
             m.downsample_factor)
    _require(m.dechunk_sigma > 0, "model.dechunk_sigma", "> 0 (Gaussian width in grid units)", m.dechunk_sigma)
    _require(m.pos_scale > 0, "model.pos_scale", "> 0", m.pos_scale)
    _require(m.attention in ATTENTION_KINDS, "model.attention", f"one of {ATTENTION_KINDS}", m.attention)

    _require(d.diffusion_steps >= 1, "diffusion.diffusion_steps", "a positive step count", d.diffusion_steps)
    _require(d.noise_schedule in NOISE_SCHEDULES, "diffusion.noise_schedule", f"one of {NOISE_SCHEDULES}",
             d.noise_schedule)
    _require(re.fullmatch(r"(ddim\d+|\d+(,\d+)*)?", d.timestep_respacing) is not None,
             "diffusion.timestep_respacing", "'' (all steps), 'ddimN' or comma-separated step counts",
             d.timestep_respacing)

    _require(data.kind in DATA_KINDS, "data.kind", f"one of {DATA_KINDS}", data.kind)
    _require(data.image_size >= 1, "data.image_size", "a positive pixel size", data.image_size)
    _require(data.vae_downsample >= 1, "data.vae_downsample", "a positive factor", data.vae_downsample)
    if data.kind == "features":
        f = data.vae_downsample
        _require(data.image_size % f == 0, "data.image_size",
                 f"a multiple of data.vae_downsample={f} (the autoencoder downsamples by {f})", data.image_size)
        # Latents of image_size pixels are image_size // f wide; a DC-DiT would otherwise run silently on a grid its
        # position embeddings and dechunk sigma were not set for.
        _require(m.input_size == data.image_size // f, "model.input_size",
                 f"data.image_size // data.vae_downsample = {data.image_size // f} (the latent grid of "
                 f"data.kind=features)", m.input_size)
        _require(bool(data.feature_path), "data.feature_path", "a folder of extracted features", data.feature_path)
    _require(data.latent_scale > 0, "data.latent_scale", "> 0", data.latent_scale)
    _require(data.vae in VAES, "data.vae", f"one of {VAES}", data.vae)
    _require(data.num_workers >= 0, "data.num_workers", ">= 0", data.num_workers)

    _require(bool(t.results_dir), "train.results_dir", "a folder path", t.results_dir)
    _require("/" not in t.exp_name and os.sep not in t.exp_name, "train.exp_name",
             "a folder name without path separators", t.exp_name)
    _require(t.global_batch_size >= 1, "train.global_batch_size", "a positive batch size", t.global_batch_size)
    _require(t.max_steps >= 1, "train.max_steps", "a positive step count", t.max_steps)
    _require(t.lr > 0, "train.lr", "> 0", t.lr)
    _require(t.weight_decay >= 0, "train.weight_decay", ">= 0", t.weight_decay)
    _require(0.0 <= t.ema_decay <= 1.0, "train.ema_decay", "a decay in [0, 1]", t.ema_decay)
    _require(t.grad_clip > 0, "train.grad_clip", "a max gradient norm > 0", t.grad_clip)
    _require(t.grad_accum_steps >= 1, "train.grad_accum_steps", ">= 1", t.grad_accum_steps)
    _require(t.global_batch_size % t.grad_accum_steps == 0, "train.global_batch_size",
             f"a multiple of train.grad_accum_steps={t.grad_accum_steps}", t.global_batch_size)
    _require(t.mixed_precision in MIXED_PRECISION, "train.mixed_precision", f"one of {MIXED_PRECISION}",
             t.mixed_precision)
    _require(0 <= t.seed < 2 ** 32, "train.seed", "an int in [0, 2**32) (numpy seeds)", t.seed)
    _require(t.log_every >= 1, "train.log_every", ">= 1", t.log_every)
    _require(t.ckpt_every >= 1, "train.ckpt_every", ">= 1", t.ckpt_every)
    _require(t.keep_last_ckpts >= 0, "train.keep_last_ckpts", ">= 0 (0 = keep all)", t.keep_last_ckpts)
    _require(t.init_weights in ("ema", "model"), "train.init_weights", "'ema' or 'model'", t.init_weights)
    _require(not t.profile_steps or (len(t.profile_steps) == 2 and 1 <= t.profile_steps[0] <= t.profile_steps[1]),
             "train.profile_steps", "[] or [first, last] steps to profile, 1 <= first <= last", t.profile_steps)
    lg = cfg.logging
    _require(lg.wandb in WANDB_MODES, "logging.wandb", f"one of {WANDB_MODES}", lg.wandb)
    _require(lg.image_every >= 0, "logging.image_every", ">= 0 (0 = never)", lg.image_every)
    _require(t.ratio_loss_weight >= 0, "train.ratio_loss_weight", ">= 0", t.ratio_loss_weight)
    _require(t.ratio_group_size >= 1, "train.ratio_group_size", ">= 1", t.ratio_group_size)
    _require(t.ratio_ramp_steps >= 0, "train.ratio_ramp_steps", ">= 0 (0 = no ramp)", t.ratio_ramp_steps)
    if t.ratio_ramp_steps > 0:
        _require(t.ratio_ramp_start > 1.0, "train.ratio_ramp_start", "> 1 (the ramp's first N)", t.ratio_ramp_start)
    _require(len(t.multi_budget_drop_fractions) >= 1, "train.multi_budget_drop_fractions",
             "a non-empty list of drop fractions", t.multi_budget_drop_fractions)
    for i, f in enumerate(t.multi_budget_drop_fractions):
        _require(0.0 <= f < 1.0, f"train.multi_budget_drop_fractions[{i}]", "a fraction in [0, 1)", f)
    _require(t.multi_budget_start_step is None or t.multi_budget_start_step >= 0, "train.multi_budget_start_step",
             "a step >= 0, or null (when the N ramp ends; turn multi-budget training on/off with train.multi_budget)",
             t.multi_budget_start_step)
    _require(t.nan_policy in NAN_POLICIES, "train.nan_policy", f"one of {NAN_POLICIES}", t.nan_policy)

    _require(1 <= s.num_sampling_steps <= d.diffusion_steps, "sample.num_sampling_steps",
             f"an int in [1, diffusion.diffusion_steps={d.diffusion_steps}]", s.num_sampling_steps)
    _require(s.cfg_scale >= 1.0, "sample.cfg_scale", ">= 1.0 (1.0 = no guidance)", s.cfg_scale)
    _require(s.fid_cfg_scale >= 1.0, "sample.fid_cfg_scale", ">= 1.0 (1.0 = no guidance)", s.fid_cfg_scale)
    # Only eps channels may be guided; with learned sigma the next channels are the variance.
    _require(0 <= s.guide_channels <= m.in_channels, "sample.guide_channels",
             f"an int in [0, model.in_channels={m.in_channels}] (0 = all)", s.guide_channels)
    _require(0 <= s.seed < 2 ** 32, "sample.seed", "an int in [0, 2**32)", s.seed)
    # Dropping every boundary token would leave nothing for the inner blocks (README, elastic inference).
    _require(0.0 <= s.tail_dropping_fraction < 1.0, "sample.tail_dropping_fraction", "a fraction in [0, 1)",
             s.tail_dropping_fraction)
    _require(0.0 <= s.uncond_tail_dropping_fraction < 1.0, "sample.uncond_tail_dropping_fraction",
             "a fraction in [0, 1)", s.uncond_tail_dropping_fraction)
    _require(s.per_proc_batch_size >= 1, "sample.per_proc_batch_size", ">= 1", s.per_proc_batch_size)
    _require(s.num_fid_samples >= 1, "sample.num_fid_samples", ">= 1", s.num_fid_samples)

    _require(u.distill_steps >= 0, "upcycle.distill_steps", ">= 0", u.distill_steps)

    # lambda = 1 asks for no saving at all; lambda <= 0 for skipping every block.
    _require(0.0 < dy.target_ratio <= 1.0, "dydit.target_ratio", "a FLOPs ratio lambda in (0, 1]", dy.target_ratio)
    _require(dy.flops_loss_weight >= 0, "dydit.flops_loss_weight", ">= 0", dy.flops_loss_weight)
    _require(dy.tau > 0, "dydit.tau", "> 0 (Gumbel-sigmoid temperature)", dy.tau)
    _require(dy.flops_scope in FLOPS_SCOPES, "dydit.flops_scope", f"one of {FLOPS_SCOPES}", dy.flops_scope)
    if dy.enabled:
        _require(m.name.startswith("DCDiT"), "dydit.enabled", f"false for model.name={m.name!r} (DyDiT gates are "
                 f"built into a DC-DiT's inner blocks)", dy.enabled)
        _require(not u.checkpoint, "dydit.enabled", "false while upcycle.checkpoint is set (DyDiT fine-tunes a "
                 "trained DC-DiT: upcycle first, then fine-tune from that run with dydit.init_checkpoint)", dy.enabled)
        if m.hidden_size is not None:
            _require(m.hidden_size >= 16, "model.hidden_size", ">= 16 with dydit.enabled (token router D/16 wide)",
                     m.hidden_size)
            heads = m.num_heads
            hidden = int(m.hidden_size * m.mlp_ratio)
            if heads is not None:
                _require(hidden % heads == 0, "model.mlp_ratio", f"a ratio whose MLP width (hidden_size x mlp_ratio = "
                         f"{hidden}) splits into model.num_heads={heads} DyDiT channel groups", m.mlp_ratio)
    else:
        _require(not dy.init_checkpoint, "dydit.init_checkpoint", "'' unless dydit.enabled is true",
                 dy.init_checkpoint)


# ----------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------

def add_config_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """--config PATH, --dry-run and positional section.field=value overrides (put them after the flags)."""
    parser.add_argument("--config", metavar="PATH", default=None,
                        help="YAML config; fields it omits keep the paper defaults of config.py")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved config as YAML and exit")
    parser.add_argument("overrides", nargs="*", metavar="section.field=value",
                        help="override any config field, e.g. train.lr=1e-4 model.depth=13")
    return parser


def config_from_args(args: argparse.Namespace) -> Config:
    """load_config(args.config, args.overrides); with --dry-run print the resolved YAML and exit 0."""
    cfg = load_config(args.config, args.overrides)
    if args.dry_run:
        sys.stdout.write(format_config(cfg))
        sys.stdout.flush()
        raise SystemExit(0)
    return cfg


def main_guard(fn: Callable) -> Callable:
    """Wrap a script's main: a ConfigError (or any exception whose class sets `user_error = True`) becomes
    one line `error: <message>` on stderr and exit code 2, without a traceback; other errors propagate."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            if not (isinstance(e, ConfigError) or getattr(e, "user_error", False) is True):
                raise
            sys.stderr.write(f"error: {_one_line(e) or type(e).__name__}\n")
            sys.stderr.flush()
            raise SystemExit(2) from None

    return wrapper
