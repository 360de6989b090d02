"""Upcycling a pretrained DiT into a DC-DiT, and the activation-distillation warm-up (paper §4.4).

DC-DiT wraps DiT blocks in an encoder-router-decoder scaffold, so a DiT checkpoint's `blocks.*`,
`t_embedder.*` and `y_embedder.*` load one to one into a DC-DiT of the same width, depth and heads
(models/dc_dit.py keeps DiT's names). The paper found that the embedders drift when trained, which
destabilises the condition vector the pretrained adaLN-Zero layers rely on, so they are copied and
frozen, and a trainable LayerNorm adaptor on c (models/isotropic.CondAdaptor) sits inside the new
encoder and decoder. Kept tokens' positions are scaled by 1/patch (`pos_scale`) so that a token at
(row, col) lands on the teacher's patch grid: exactly on it when row and col are multiples of the
patch size, between patches otherwise.

Activation distillation (§4.4, after the grafting recipe of Chandrasegaran et al., 2025): a frozen
copy of the DiT is the teacher; for a brief warm-up the student minimises the mean over blocks of the
MSE between its block output at each kept token (row, col) and the teacher's block output at the
patch containing that token, index (row // p) * (W / p) + col // p. Both see the same x_t, t and
labels (with the same label-dropout decisions). Then training switches to the diffusion objective.

Why equality can hold at all: a block's attention is unchanged when every key/value token is
repeated the same number of times (each softmax weight and its normaliser scale alike), and
everything else in a block is per token. So if every token is kept and the student's block input at
(row, col) equals the teacher's at its patch, every student block output equals the teacher's at the
patch (tests/test_upcycle.py checks this). The encoder has to learn that input: its positional part
differs from the teacher's at tokens off the patch corners (sin-cos at (row / p, col / p) instead of
(row // p, col // p)), and with p = 1 it does not differ at all.
"""
import argparse
import re
from dataclasses import dataclass, field
from typing import List, Optional

import torch
import torch.nn as nn

from .checkpoint_io import read_checkpoint
from .dc_dit import DCDiT
from .dit import DIT_SIZES, DiT

# Parts of a DiT checkpoint that DC-DiT reuses; everything else (x_embedder, pos_embed, final_layer)
# belongs to DiT's fixed patchify / unpatchify, which the DC-DiT scaffold replaces.
COPIED_PREFIXES = ("blocks.", "t_embedder.", "y_embedder.")
FROZEN_MODULES = ("t_embedder", "y_embedder")


class UpcycleError(RuntimeError):
    """A checkpoint that cannot be upcycled into the configured model (scripts print one line, exit 2)."""
    user_error = True


@dataclass
class DiTCheckpoint:
    """A DiT state dict and the geometry read from its weights."""
    state: dict              # parameter name -> tensor, DiT's layout
    path: str
    source: str              # "bare state dict", "ema" or "model" (which entry of a training checkpoint)
    patch_size: int          # from x_embedder.proj.weight (D, C, p, p)
    in_channels: int
    hidden_size: int
    depth: int               # number of blocks.i
    num_patches: int         # pos_embed (1, T, D)
    num_heads: Optional[int]  # from the stored config/args or the DiT registry; None = unknown
    heads_from: str          # where num_heads came from, for error messages


@dataclass
class UpcycleReport:
    copied: List[str] = field(default_factory=list)   # checkpoint keys loaded into the DC-DiT
    unused: List[str] = field(default_factory=list)   # checkpoint keys DC-DiT has no place for
    frozen: List[str] = field(default_factory=list)   # DC-DiT parameters frozen after copying

    def summary(self, ckpt: DiTCheckpoint) -> str:
        return (f"upcycled {ckpt.path} ({ckpt.source}, patch {ckpt.patch_size}): copied {len(self.copied)} tensors "
                f"(blocks, t_embedder, y_embedder), froze {len(self.frozen)} embedder parameters; "
                f"unused checkpoint keys (DiT's patchify/unpatchify, replaced by the DC-DiT scaffold): "
                f"{', '.join(self.unused) or 'none'}")


# ----------------------------------------------------------------------------- reading a checkpoint

def _registry_heads(name: str) -> Optional[int]:
    """num_heads of a DiT registry name such as 'DiT-XL/2'."""
    m = re.fullmatch(r"DiT-(\w+)/\d+", name or "")
    return DIT_SIZES[m.group(1)][2] if m and m.group(1) in DIT_SIZES else None


def _heads_of(raw, hidden: int, depth: int) -> tuple:
    """(num_heads, how it is known). A weight cannot tell: qkv packs every head into one (3D, D) matrix."""
    if isinstance(raw, dict) and isinstance(raw.get("config"), dict):       # this repo's training checkpoint
        m = raw["config"].get("model", {})
        heads = m.get("num_heads") or _registry_heads(m.get("name", ""))
        return heads, f"its config, model.name {m.get('name')}"
    if isinstance(raw, dict) and isinstance(raw.get("args"), argparse.Namespace):  # DiT's train.py checkpoint
        name = getattr(raw["args"], "model", "")
        return _registry_heads(name), f"its args, model {name}"
    for size, (d, h, heads) in DIT_SIZES.items():                          # the public releases
        if (d, h) == (depth, hidden):
            return heads, f"the DiT-{size} registry size of its width {hidden} and depth {depth}"
    return None, "unknown"


def load_dit_checkpoint(path: str) -> DiTCheckpoint:
    """Read a DiT checkpoint with torch.load(weights_only=True).

    Accepts a bare state dict (the released DiT-XL-2-256x256.pt) or a training checkpoint holding
    "ema" and/or "model" (this repo's, or DiT's own, whose argparse args are allowed through); the EMA
    weights are preferred, as DiT releases and samples with them.
    """
    raw = read_checkpoint(path, "upcycle checkpoint", UpcycleError, "a DiT checkpoint",
                          safe_globals=(argparse.Namespace,))
    if not isinstance(raw, dict):
        raise UpcycleError(f"upcycle checkpoint {path}: expected a state dict or a dict with 'ema'/'model', "
                           f"got {type(raw).__name__}")
    source = "bare state dict"
    state = raw
    for key in ("ema", "model"):
        if isinstance(raw.get(key), dict):
            state, source = raw[key], key
            break
    cfg_name = raw.get("config", {}).get("model", {}).get("name", "") if isinstance(raw.get("config"), dict) else ""
    if cfg_name and not cfg_name.startswith("DiT-"):
        raise UpcycleError(f"upcycle checkpoint {path}: its config names model {cfg_name!r}; upcycling starts "
                           f"from a DiT checkpoint (model.name DiT-*)")
    for key in ("x_embedder.proj.weight", "pos_embed", "blocks.0.attn.qkv.weight"):
        if not torch.is_tensor(state.get(key)):
            raise UpcycleError(f"upcycle checkpoint {path}: no {key} in the {source}; expected a DiT state dict "
                               f"(facebookresearch/DiT layout)")
    w = state["x_embedder.proj.weight"]                                  # (D, C, p, p)
    if w.dim() != 4 or w.shape[2] != w.shape[3]:
        raise UpcycleError(f"upcycle checkpoint {path}: x_embedder.proj.weight has shape {list(w.shape)}; "
                           f"expected (D, C, p, p)")
    depth = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k)))
    hidden = int(w.shape[0])
    heads, heads_from = _heads_of(raw, hidden, depth)
    return DiTCheckpoint(state=state, path=path, source=source, patch_size=int(w.shape[2]),
                         in_channels=int(w.shape[1]), hidden_size=hidden, depth=depth,
                         num_patches=int(state["pos_embed"].shape[1]), num_heads=heads, heads_from=heads_from)


# ----------------------------------------------------------------------------- checking and copying

def _shape(t) -> str:
    return str(list(t.shape))


def check_compatible(model: DCDiT, ckpt: DiTCheckpoint) -> None:
    """Raise UpcycleError naming the first mismatch between the checkpoint and the target DC-DiT."""
    if not isinstance(model, DCDiT):
        raise UpcycleError(f"upcycling needs a DC-DiT target (model.name DCDiT-*), got {type(model).__name__}")
    own = model.state_dict()
    common = [k for k in ckpt.state if k.startswith(COPIED_PREFIXES) and k in own]
    # Blocks first: their shapes name the width most plainly (qkv is (3D, D)).
    bad = sorted((k for k in common if ckpt.state[k].shape != own[k].shape), key=lambda k: not k.startswith("blocks."))
    if bad:
        k = bad[0]
        more = f"; {len(bad) - 1} more keys differ" if len(bad) > 1 else ""
        raise UpcycleError(f"{k}: checkpoint {_shape(ckpt.state[k])} vs model {_shape(own[k])} "
                           f"(upcycling {ckpt.path}: model.hidden_size/mlp_ratio/num_classes must match the DiT{more})")
    if ckpt.depth != len(model.blocks):
        raise UpcycleError(f"depth: checkpoint has {ckpt.depth} blocks vs model {len(model.blocks)} "
                           f"(model.depth; upcycling {ckpt.path})")
    if ckpt.num_heads is not None and ckpt.num_heads != model.num_heads:
        raise UpcycleError(f"num_heads: checkpoint {ckpt.num_heads} (from {ckpt.heads_from}) vs model "
                           f"{model.num_heads} (model.num_heads; upcycling {ckpt.path})")
    if ckpt.in_channels != model.in_channels:
        raise UpcycleError(f"x_embedder.proj.weight: checkpoint takes {ckpt.in_channels} input channels vs "
                           f"model.in_channels {model.in_channels} (teacher and student see the same x_t)")
    p = ckpt.patch_size
    if model.input_size % p or (model.input_size // p) ** 2 != ckpt.num_patches:
        raise UpcycleError(f"pos_embed: checkpoint has {ckpt.num_patches} patches at patch size {p} vs "
                           f"model.input_size {model.input_size} ({(model.input_size // p) ** 2} patches); "
                           f"the teacher must run on the student's latent grid")
    missing = [k for k in own if k.startswith(COPIED_PREFIXES) and k not in ckpt.state]
    if missing:
        raise UpcycleError(f"{missing[0]}: missing from checkpoint {ckpt.path} (model expects "
                           f"{_shape(own[missing[0]])}; {len(missing)} keys missing in all)")


def freeze_embedders(model: DCDiT) -> List[str]:
    """requires_grad False on t_embedder and y_embedder (§4.4: trained, they drift and destabilise the
    adaLN conditioning). Done on resume too, before the optimizer is built, so its parameter list matches."""
    names = []
    for module in FROZEN_MODULES:
        for name, p in getattr(model, module).named_parameters():
            p.requires_grad_(False)
            names.append(f"{module}.{name}")
    return names


def upcycle_(model: DCDiT, ckpt: DiTCheckpoint) -> UpcycleReport:
    """Copy the checkpoint's blocks and embedders into `model` in place, freeze the embedders.

    The model must have been built with cond_adaptor=True and pos_scale = 1 / patch
    (`upcycle_model_config` sets both in the config).
    """
    check_compatible(model, ckpt)
    if model.encoder.adaptor.norm is None or model.decoder.adaptor.norm is None:
        raise UpcycleError("model.cond_adaptor: expected true when upcycling (§4.4: a LayerNorm adaptor on the "
                           "frozen embedders' condition vector inside the encoder and decoder)")
    if abs(model.pos_scale * ckpt.patch_size - 1.0) > 1e-9:
        raise UpcycleError(f"model.pos_scale: expected 1/{ckpt.patch_size} (the checkpoint's patch size) so kept "
                           f"tokens land on the teacher's patch grid, got {model.pos_scale}")
    own = model.state_dict()
    report = UpcycleReport()
    with torch.no_grad():
        for key, value in ckpt.state.items():
            if key.startswith(COPIED_PREFIXES):
                own[key].copy_(value)
                report.copied.append(key)
            else:
                report.unused.append(key)
    report.frozen = freeze_embedders(model)
    return report


def upcycle_model_config(model_cfg, ckpt: DiTCheckpoint) -> List[str]:
    """Set config.ModelConfig fields upcycling needs, in place: cond_adaptor on, pos_scale = 1 / patch.

    Done before the model is built and the config saved, so checkpoints and resumes rebuild the same
    model. Returns one note per changed field.
    """
    notes = []
    for name, value in (("cond_adaptor", True), ("pos_scale", 1.0 / ckpt.patch_size)):
        if getattr(model_cfg, name) != value:
            notes.append(f"model.{name}: {getattr(model_cfg, name)} -> {value} (upcycling a patch-"
                         f"{ckpt.patch_size} DiT, §4.4)")
            setattr(model_cfg, name, value)
    return notes


# ----------------------------------------------------------------------------- the teacher

def build_teacher(ckpt: DiTCheckpoint, model: DCDiT) -> DiT:
    """A frozen DiT with the checkpoint's weights, on the student's latent grid, in eval mode.

    Built on the meta device and filled with load_state_dict(assign=True), so no random init is spent on
    an XL-sized network and the global RNG is untouched. It is not trained, not given to the optimizer
    and not wrapped for data parallelism; under mixed precision autocast alone casts its matmuls.
    """
    check_compatible(model, ckpt)
    p, D = ckpt.patch_size, ckpt.hidden_size
    out_channels = ckpt.state["final_layer.linear.weight"].shape[0] // (p * p)
    mlp_hidden = ckpt.state["blocks.0.mlp.fc1.weight"].shape[0]
    with torch.device("meta"):
        teacher = DiT(input_size=model.input_size, patch_size=p, in_channels=ckpt.in_channels, hidden_size=D,
                      depth=ckpt.depth, num_heads=model.num_heads, mlp_ratio=mlp_hidden / D,
                      class_dropout_prob=model.y_embedder.dropout_prob, num_classes=model.y_embedder.num_classes,
                      learn_sigma=out_channels == 2 * ckpt.in_channels)
    try:
        teacher.load_state_dict(ckpt.state, strict=True, assign=True)
    except RuntimeError as e:
        raise UpcycleError(f"teacher DiT from {ckpt.path}: {' '.join(str(e).split())[:300]}") from None
    return teacher.eval().requires_grad_(False)


@torch.no_grad()
def teacher_block_outputs(teacher: DiT, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                          force_drop_ids: Optional[torch.Tensor]) -> List[torch.Tensor]:
    """Every teacher block's output on x (B, C, H, W): depth x (B, T, D), T = (H / p) * (W / p).

    force_drop_ids (B,) (1 = use the null class) are the student's label-dropout decisions, so both
    networks are conditioned on the same c.
    """
    h = teacher.x_embedder(x) + teacher.pos_embed                                # (B, T, D)
    c = teacher.t_embedder(t) + teacher.y_embedder(y, False, force_drop_ids)    # (B, D)
    outs = []
    for block in teacher.blocks:
        h = block(h, c)                                                          # (B, T, D)
        outs.append(h)
    return outs


# ----------------------------------------------------------------------------- the distillation loss

def patch_index(idx: torch.Tensor, grid: tuple, patch: int) -> torch.Tensor:
    """Raster positions idx on grid (H, W) -> index of the teacher patch holding each: (r // p) * (W / p) + c // p."""
    W = int(grid[1])
    r = torch.div(idx, W, rounding_mode="floor")
    c = idx % W
    return torch.div(r, patch, rounding_mode="floor") * (W // patch) + torch.div(c, patch, rounding_mode="floor")


def block_distill_loss(student: List[torch.Tensor], teacher: List[torch.Tensor], idx: torch.Tensor,
                       valid: torch.Tensor, grid: tuple, patch: int) -> torch.Tensor:
    """Mean over blocks of the MSE between student block outputs at kept tokens and the teacher's at their patch.

    student: depth x (B, Mmax, D); teacher: depth x (B, T, D); idx, valid (B, Mmax). Padding slots
    (valid False) are excluded from sum and count. Computed in float32.
    """
    if len(student) != len(teacher):
        raise ValueError(f"block_distill_loss: {len(student)} student blocks vs {len(teacher)} teacher blocks")
    target_idx = patch_index(idx, grid, patch)                                   # (B, Mmax)
    keep = valid.unsqueeze(-1)                                                   # (B, Mmax, 1)
    count = valid.sum() * student[0].shape[-1]
    losses = []
    for s, t in zip(student, teacher):
        target = t.gather(1, target_idx.unsqueeze(-1).expand(-1, -1, t.shape[-1]))  # (B, Mmax, D)
        diff = torch.where(keep, s.float() - target.float(), 0.0)                # (B, Mmax, D)
        losses.append(diff.square().sum() / count)
    return torch.stack(losses).mean()


def distillation_loss(model: nn.Module, teacher: DiT, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                      force_drop_ids: torch.Tensor, tail_drop=0.0):
    """One student forward (model may be wrapped for data parallelism) and the teacher's, on the same
    x_t, t, y and label-dropout decisions. Returns (loss, ChunkInfo with the router's output for the ratio loss).

    The decoder side (inner_norm, residual_proj, decoder, final layer) is outside this loss. A zero-weighted term on the
    student's output gives it exact zero gradients, so every trainable parameter takes part in each backward:
    DDP waits for a gradient of every parameter reachable from the forward's output and otherwise stops with
    "Expected to have finished reduction in the prior iteration" at the next step.
    """
    out, info = model(x_t, t, y, return_info=True, collect_blocks=True, tail_drop=tail_drop,
                      force_drop_ids=force_drop_ids)                             # (B, out, H, W), ChunkInfo
    target = teacher_block_outputs(teacher, x_t, t, y, force_drop_ids)
    loss = block_distill_loss(info.blocks, target, info.idx, info.valid, info.grid, teacher.patch_size)
    return loss + 0.0 * out.float().mean(), info


def reset_untouched_adam_state(optimizer) -> int:
    """Forget the Adam moments of parameters that only ever saw zero gradients; returns how many.

    During distillation the decoder side (inner_norm, residual_proj, decoder, final layer) is outside the
    loss; it gets exact zero gradients (`distillation_loss`, for DDP) and AdamW counts those steps. At the
    switch to the diffusion loss its bias correction would then be spent, and its first real updates would
    be several times the learning rate (docs/upcycling.md). Forgetting the state makes them those of a
    fresh Adam. Called once, at the switch.
    """
    n = 0
    for p in list(optimizer.state.keys()):
        v = optimizer.state[p].get("exp_avg_sq")
        if v is not None and not bool(v.any()):
            del optimizer.state[p]
            n += 1
    return n
