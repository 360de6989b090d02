"""Reading checkpoints, shared by train.py, sampling, upcycling and DyDiT fine-tuning; writing is fileio's.

Every read goes through torch.load(weights_only=True) on the CPU (no pickled code runs), and a missing
or unreadable file becomes one error of the caller's own class naming the setting and the path.
"""
import os
from typing import Optional, Tuple, Type

import torch


def read_checkpoint(path: str, what: str, error: Type[Exception], expected: str = "a checkpoint",
                    safe_globals: tuple = ()):
    """torch.load(path, weights_only=True) on the CPU; `error(...)` names `what` (a flag or config key) when the
    file is missing or cannot be read. `safe_globals`: extra classes the file may hold (e.g. argparse.Namespace
    in DiT's own training checkpoints)."""
    if not os.path.isfile(path):
        raise error(f"{what} {path}: no such file; expected {expected}")
    try:
        with torch.serialization.safe_globals(list(safe_globals)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling errors of every kind: a truncated file, another format, ...
        first = str(e).splitlines()[0] if str(e) else ""
        raise error(f"{what} {path}: cannot read it with torch.load(weights_only=True) "
                    f"({type(e).__name__}: {first})") from None


def model_state(ckpt, use_ema: bool = True) -> Tuple[Optional[dict], str]:
    """The weights in a loaded checkpoint -> (state dict, which: "ema" | "model" | "state dict").

    A training checkpoint holds "ema" and/or "model" (the EMA is preferred unless use_ema=False: papers
    evaluate it); anything else that is a dict of tensors is a bare state dict. (None, reason) otherwise.
    """
    if not isinstance(ckpt, dict):
        return None, f"a {type(ckpt).__name__}, not a dict"
    order = ("ema", "model") if use_ema else ("model",)
    for key in order:
        if isinstance(ckpt.get(key), dict):
            return ckpt[key], key
    if ckpt and all(torch.is_tensor(v) for v in ckpt.values()):
        return ckpt, "state dict"
    return None, "neither 'ema'/'model' nor a state dict of tensors"


def load_strict(model: torch.nn.Module, state: dict, error: Type[Exception], what: str) -> None:
    """model.load_state_dict(state, strict=True); a mismatch raises `error` in one line: `what`, then the first
    specific line of PyTorch's report (the missing, unexpected or mis-shaped keys)."""
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        raise error(f"{what}: {lines[1] if len(lines) > 1 else lines[0]}") from None


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as asked (one line, printed by scripts without a traceback)."""
    user_error = True


WEIGHTS = ("ema", "model")


def load_checkpoint(path: str, weights: str = "ema", configure=None, device="cpu",
                    error: Type[Exception] = CheckpointError, what: str = "checkpoint"):
    """A model from a checkpoint of this repo (or a DiT state dict) -> (model in eval mode, Config).

        from models import load_checkpoint
        model, cfg = load_checkpoint("results/000-DCDiT-B/checkpoints/0400000.pt", weights="ema")

    weights: "ema" (what papers evaluate; falls back to "model" when the file has no EMA) or "model".
    configure: saved config dict (None for a bare state dict) -> Config; default = the checkpoint's own config.
    Scripts pass one that merges --config and overrides (sample.py). The weights load with strict=True.
    """
    from config import config_from_dict
    from . import create_model
    if weights not in WEIGHTS:
        raise error(f"weights={weights!r}: expected one of {WEIGHTS}")
    ckpt = read_checkpoint(path, what, error, "a training checkpoint or a DiT state dict")
    saved = ckpt.get("config") if isinstance(ckpt, dict) else None
    state, which = model_state(ckpt, use_ema=weights == "ema")
    if state is None:
        raise error(f"{what} {path}: {which}; expected a training checkpoint or a DiT state dict")
    if configure is not None:
        cfg = configure(saved)
    elif saved is None:
        raise error(f"{what} {path}: holds no config (a bare state dict); pass configure= to say which model it is")
    else:
        cfg = config_from_dict(saved)
    model = create_model(cfg.model, cfg.dydit)
    load_strict(model, state, error, f"{what} {path} does not fit model {cfg.model.name}")
    return model.to(device).eval(), cfg
