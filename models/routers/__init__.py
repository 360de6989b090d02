"""The router registry: `model.router` names one of these, `model.router_args` its keyword options.

A router is an nn.Module built as `Router(dim, downsample_factor, **router_args)` with
- `forward(x (B, L, D), grid (H, W)) -> RouterOutput`, computed in fp32 and ending in
  `models.routing.finish_routing(prob)` (forced endpoints, p > 0.5, the STE gate's `selected`);
- `reset_parameters()`, its own initialisation: the model's generic init (DiT's xavier on Linears)
  never touches a router, and calls this instead.
Adding one is one file here and one line in ROUTERS (README, "Adding a router").
"""
import inspect
from typing import Any, Dict

import torch.nn as nn

from .cosine import CosineRouter
from .predictability import PredictabilityRouter
from .random import RandomRouter

ROUTERS = {
    "cosine": CosineRouter,                  # the paper's text (§3.3)
    "predictability": PredictabilityRouter,  # the authors' release
    "random": RandomRouter,                  # random boundaries, the §4.3 ablation
}


class RouterArgsError(ValueError):
    """A router name or option the registry cannot build (one line, naming the config key)."""
    user_error = True


def router_options(name: str) -> Dict[str, inspect.Parameter]:
    """The keyword options of a registered router (its constructor's parameters after dim, downsample_factor)."""
    if name not in ROUTERS:
        raise RouterArgsError(f"model.router: unknown router {name!r}; expected one of {', '.join(ROUTERS)}")
    params = list(inspect.signature(ROUTERS[name].__init__).parameters.values())[3:]  # self, dim, downsample_factor
    return {p.name: p for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def check_router_args(name: str, args: Dict[str, Any]) -> None:
    """Every key of model.router_args is an option of the router, with a value of the option's default's type."""
    options = router_options(name)
    for key, value in args.items():
        if key not in options:
            known = ", ".join(options) or "none"
            raise RouterArgsError(f"model.router_args.{key}: not an option of the {name!r} router (options: {known})")
        default = options[key].default
        if default is not inspect.Parameter.empty and default is not None:
            ok = isinstance(value, type(default)) and not (isinstance(value, bool) and not isinstance(default, bool))
            if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
                ok = True
            if not ok:
                raise RouterArgsError(f"model.router_args.{key}: expected {type(default).__name__} (like the default "
                                      f"{default!r}), got {type(value).__name__} {value!r}")


def build_router(name: str, dim: int, downsample_factor: float, **args) -> nn.Module:
    """The registered router `name` for D = dim and target compression N = downsample_factor."""
    check_router_args(name, args)
    return ROUTERS[name](dim, downsample_factor, **args)


__all__ = ["ROUTERS", "build_router", "check_router_args", "router_options", "RouterArgsError",
           "CosineRouter", "PredictabilityRouter", "RandomRouter"]
