"""Checkpoints trained with the authors' release (AMD-AGI/DynamicChunkingDiT) -> this project's format.

A release checkpoint is `{"model", "ema", "opt", "config"}` written by `torch.save`, where "config" is the
release's own `config.Config` dataclass tree, pickled under the module name `config`. Reading it must not
execute pickled code and must not import anything called `config` (this project's config.py has that name):
`read_release_checkpoint` runs torch's weights-only unpickler with each of the release's config classes
mapped to a plain record class defined here, so the file can hold tensors, containers and those records,
and anything else is refused before it is built.

The network is the same as DCDiT with the predictability router, the inner-stack RMSNorm and the
release's 2 + 2 conv scaffold (`release_to_config`); `release_state_dict` renames every key.
"""
import os
import pickle
import re
from typing import Optional, Tuple

import torch

from config import Config, config_from_dict, config_to_dict
from .checkpoint_io import load_strict
from .dit import DIT_SIZES

# The release's config dataclasses (its config.py), by the name they are pickled under.
RELEASE_CONFIG_CLASSES = ("HNetConfig", "ModelConfig", "TrainingConfig", "DataConfig", "DiffusionConfig",
                          "LoggingConfig", "Config")


class ReleaseCheckpointError(ValueError):
    """A file that is not a convertible release checkpoint (printed as one line by the converter)."""
    user_error = True


class ReleaseRecord:
    """Plain stand-in for one of the release's config dataclasses: its fields as attributes, nothing run."""
    release_class = ""

    def fields(self) -> dict:
        return dict(vars(self))

    def __repr__(self) -> str:
        return f"release config.{self.release_class}({self.fields()})"


def _record_classes() -> list:
    """(stand-in class, "config.<Name>") pairs for torch.serialization.safe_globals."""
    pairs = []
    for name in RELEASE_CONFIG_CLASSES:
        cls = type(f"Release{name}", (ReleaseRecord,), {"release_class": name})
        pairs.append((cls, f"config.{name}"))
    return pairs


def read_release_checkpoint(path: str) -> dict:
    """torch.load with the weights-only unpickler; the release's config classes become ReleaseRecords.

    Any other class or function in the file is refused with one line naming it, before it is built or called.
    """
    if not os.path.isfile(path):
        raise ReleaseCheckpointError(f"{path}: no such file; expected a checkpoint written by the release's train.py")
    try:
        with torch.serialization.safe_globals(_record_classes()):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        text = str(e)
        found = re.search(r"GLOBAL ([\w.]+)", text) or re.search(r"function <?([^>\s]+)", text)
        what = found.group(1) if found else text.splitlines()[0]
        raise ReleaseCheckpointError(
            f"{path}: refused to unpickle {what}; a release checkpoint holds only tensors, containers and the "
            f"release's config dataclasses (nothing in the file was run)") from None
    except Exception as e:  # a truncated file, another format, ...
        first = str(e).splitlines()[0] if str(e) else ""
        raise ReleaseCheckpointError(f"{path}: cannot read it as a torch checkpoint ({type(e).__name__}: {first})") \
            from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("config"), ReleaseRecord):
        keys = sorted(ckpt) if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ReleaseCheckpointError(f"{path}: expected the release's {{'model', 'ema', 'opt', 'config'}} with its "
                                     f"config.Config, got {keys}")
    return ckpt


def _section(record: ReleaseRecord, name: str, path: str) -> dict:
    value = getattr(record, name, None)
    if not isinstance(value, ReleaseRecord):
        raise ReleaseCheckpointError(f"{path}: config.{name} missing from the release config")
    return value.fields()


def _single(value, key: str, path: str):
    """A release per-stage list of one stage's value (or a scalar) -> the scalar."""
    if isinstance(value, (list, tuple)):
        if len(value) != 1:
            raise ReleaseCheckpointError(f"{path}: {key}={value}: one value per chunking stage; this project "
                                         f"converts single-stage models only")
        return value[0]
    return value


def _parse_layout(layout, path: str) -> tuple:
    """The release's arch_layout -> (encoder layout, inner depth, decoder layout); anything but
    ["c<n>", ["D<depth>"], "c<m>"] is a one-line error."""
    expected = "['c<n>', ['D<depth>'], 'c<m>'] (conv blocks per side, DiT blocks with MLPs inside)"
    if not (isinstance(layout, (list, tuple)) and len(layout) == 3 and isinstance(layout[1], (list, tuple))):
        raise ReleaseCheckpointError(f"{path}: arch_layout {layout!r} is not supported; expected {expected}")
    inner = layout[1]
    if len(inner) == 3:
        raise ReleaseCheckpointError(f"{path}: arch_layout {layout!r} nests a second chunking stage; this converter "
                                     f"takes single-stage models, expected {expected}")
    # "C" (conv block with an MLP) builds the same block as "c" in the release: its has_mlp flag is unused.
    sides = [str(side).lower() for side in (layout[0], layout[2])]
    if not all(re.fullmatch(r"c[1-9]\d*", side) for side in sides) or len(inner) != 1 \
            or not isinstance(inner[0], str) or not re.fullmatch(r"D\d+", inner[0]):
        raise ReleaseCheckpointError(f"{path}: arch_layout {layout!r} is not supported; expected {expected}")
    return sides[0], int(inner[0][1:]), sides[1]


def release_to_config(record: ReleaseRecord, path: str = "release checkpoint") -> Config:
    """The release's config.Config tree -> this project's Config for the same network and recipe."""
    model, training = _section(record, "model", path), _section(record, "training", path)
    data, diffusion = _section(record, "data", path), _section(record, "diffusion", path)
    hnet = model.get("hnet")
    if not isinstance(hnet, ReleaseRecord):
        raise ReleaseCheckpointError(f"{path}: config.model.hnet missing from the release config")
    hnet = hnet.fields()
    encoder_layout, depth, decoder_layout = _parse_layout(hnet.get("arch_layout"), path)
    widths = list(hnet.get("d_model") or [])
    if len(widths) != 2 or widths[0] != widths[1]:
        raise ReleaseCheckpointError(f"{path}: d_model {widths}: expected one width for the scaffold and the inner "
                                     f"blocks ([D, D]), as the single-stage release configs")
    hidden, heads = int(widths[0]), int(hnet["num_heads"][-1])
    factors = hnet.get("enc_dec_dim_factor") or [None]
    width = hidden // factors[0] if factors[0] else hidden
    # The registry name is for display; depth, width and heads are set explicitly below either way.
    size = next((s for s, dims in DIT_SIZES.items() if dims == (depth, hidden, heads)), "B")
    image_size = int(data.get("image_size", 256))
    n = float(_single(training.get("downsample_factor", 4.0), "training.downsample_factor", path))
    start = training.get("downsample_factor_start")
    ramp_steps = int(training.get("downsample_factor_warmup_steps") or 0)
    group = training.get("ratio_batch_size")
    tree = {
        "model": dict(name=f"DCDiT-{size}", input_size=image_size // 8, in_channels=4, num_classes=int(data.get("num_classes", 1000)),
                      class_dropout_prob=float(training.get("class_dropout_prob", 0.1)),
                      learn_sigma=bool(training.get("learn_sigma", True)), depth=depth, hidden_size=hidden,
                      num_heads=heads, mlp_ratio=float(model.get("mlp_ratio", 4.0)), encoder_width=width,
                      norm_groups=32, encoder_layout=encoder_layout, decoder_layout=decoder_layout,
                      router="predictability", downsample_factor=n,
                      dechunk_sigma=float(hnet.get("dechunk_kernel_sigma", 1.0)), inner_norm=True,
                      residual_init="xavier", attention="packed"),
        "diffusion": dict(diffusion_steps=int(diffusion.get("diffusion_steps", 1000)),
                          noise_schedule=str(diffusion.get("noise_schedule", "linear"))),
        "data": dict(kind="features", feature_path=str(data.get("feature_path", "features")), image_size=image_size),
        "train": dict(global_batch_size=int(training.get("global_batch_size", 256)),
                      lr=float(training.get("learning_rate", 1e-4)), weight_decay=float(training.get("weight_decay", 0.0)),
                      ema_decay=float(training.get("ema_decay", 0.9999)),
                      grad_clip=float(training.get("max_grad_norm", 1.0)),
                      grad_accum_steps=int(training.get("gradient_accumulation_steps", 1)),
                      ratio_loss_weight=float(training.get("ratio_loss_weight", 0.03)),
                      # None in the release = one group over the local batch; the global batch bounds it here.
                      ratio_group_size=int(group) if group else int(training.get("global_batch_size", 256)),
                      ratio_ramp_steps=ramp_steps if start is not None else 0,
                      multi_budget=bool(training.get("multi_budget_training", False)),
                      multi_budget_drop_fractions=[float(f) for f in training.get("multi_budget_drop_fractions",
                                                                                  [0.0, 0.1, 0.2, 0.3])],
                      multi_budget_start_step=training.get("multi_budget_start_step")),
    }
    if start is not None and ramp_steps > 0:
        tree["train"]["ratio_ramp_start"] = float(_single(start, "training.downsample_factor_start", path))
    try:
        return config_from_dict(tree)
    except ValueError as e:
        raise ReleaseCheckpointError(f"{path}: the release config does not map to a valid config here: {e}") from None


# Release key prefix -> project key prefix, most specific first. Block internals keep their names
# (attn.qkv, attn.proj, mlp.fc1, mlp.fc2, adaLN_modulation.1, norm1/2, conv1/2).
_RENAMES = (
    ("x_embedder.proj.", "encoder.patch_embed."),
    ("hnet.encoder.rmsnorm.", "encoder.norm."),
    ("hnet.decoder.rmsnorm.", "decoder.norm."),
    ("hnet.main_network.main_network.rmsnorm.", "inner_norm."),  # the inner stage is an H-Net of its own
    ("hnet.main_network.main_network.layers.", "blocks."),
    ("hnet.encoder.layers.", "encoder.blocks."),
    ("hnet.decoder.layers.", "decoder.blocks."),
    ("hnet.routing_module.proj.", "router.reduce."),
    ("hnet.routing_module.context_predictor.", "router.context."),
    ("hnet.routing_module.residual_scorer.0.", "router.score."),
    ("hnet.routing_module.residual_scorer.1.", "router.norm."),
    ("hnet.routing_module.residual_scorer.3.", "router.out."),
    ("hnet.residual_proj.", "residual_proj."),
)
# Inside the conv ResBlocks the release calls the 1x1 skip `skip_proj` and the condition projection `cond_proj`.
_BLOCK_RENAMES = ((".skip_proj.", ".skip."), (".cond_proj.", ".cond."))
# Wrappers a training script may leave on the keys (torch.compile, DDP).
_WRAPPER_PREFIXES = ("_orig_mod.", "module.")


def _strip_wrappers(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix):], True
    return key


def release_key(key: str) -> Optional[str]:
    """One release state-dict key -> this project's, or None for pos_embed (recomputed here, not stored)."""
    key = _strip_wrappers(key)
    if key == "pos_embed":
        return None
    for old, new in _RENAMES:
        if key.startswith(old):
            key = new + key[len(old):]
            if new.startswith(("encoder.blocks.", "decoder.blocks.")):
                for a, b in _BLOCK_RENAMES:
                    key = key.replace(a, b)
            return key
    return key  # t_embedder.*, y_embedder.*, final_layer.*: the same names


def release_state_dict(state: dict, path: str = "release checkpoint") -> dict:
    """Rename every key of a release state dict; the sin-cos pos_embed is dropped (DCDiT derives its own)."""
    out = {}
    for key, value in state.items():
        if not torch.is_tensor(value):
            raise ReleaseCheckpointError(f"{path}: state-dict entry {key!r} is a {type(value).__name__}, not a tensor")
        new = release_key(key)
        if new is not None:
            out[new] = value
    return out


def convert_release_checkpoint(path: str) -> Tuple[dict, Config, list]:
    """Read a release checkpoint -> (project checkpoint {"model", "ema", "config", "step"}, Config, notes).

    Both weight sets are loaded strictly into a DCDiT built from the converted config, so a key or shape the
    mapping does not cover is an error naming it. The optimizer state is not carried over (a different
    parameter order); fine-tuning starts a fresh AdamW.
    """
    from . import create_model
    ckpt = read_release_checkpoint(path)
    cfg = release_to_config(ckpt["config"], path)
    notes = []
    hnet = ckpt["config"].model.hnet.fields()
    if hnet.get("fp32_router_dechunk") is False:
        notes.append("the release ran router and de-chunking under autocast (fp32_router_dechunk: false); they "
                     "always run in fp32 here")
    out = {"config": config_to_dict(cfg), "step": 0}
    for which in ("model", "ema"):
        if not isinstance(ckpt.get(which), dict):
            if which == "ema" and isinstance(ckpt.get("model"), dict):
                notes.append("no 'ema' weights in the file: the EMA slot holds the raw weights")
                out["ema"] = out["model"]
                continue
            raise ReleaseCheckpointError(f"{path}: no {which!r} state dict in the checkpoint")
        state = release_state_dict(ckpt[which], path)
        model = create_model(cfg.model)
        # pos_embed is dropped because DCDiT derives the same fixed sin-cos table; check that it is that table.
        pos = next((v for k, v in ckpt[which].items() if _strip_wrappers(k) == "pos_embed"), None)
        if pos is not None and (pos.shape[-2:] != model.pos_table.shape
                                or not torch.allclose(pos.reshape(model.pos_table.shape).float(), model.pos_table,
                                                      atol=1e-5)):
            raise ReleaseCheckpointError(f"{path}: {which} pos_embed {tuple(pos.shape)} is not the fixed 2D sin-cos "
                                         f"table of a {model.grid[0]}x{model.grid[1]} grid that DCDiT uses")
        load_strict(model, state, ReleaseCheckpointError, f"{path}: {which} weights do not fit {cfg.model.name} "
                    "as converted")
        out[which] = model.state_dict()
    if "opt" in ckpt:
        notes.append("optimizer state not converted (fine-tuning starts a fresh AdamW)")
    return out, cfg, notes
