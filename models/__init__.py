"""Model registries and the one constructor scripts use: `create_model(cfg.model, cfg.dydit)`."""
from .dc_dit import DCDiT, DCDiT_models
from .dit import DiT, DiT_models


class ModelConfigError(ValueError):
    """A model name or size that the registries cannot build (printed as one line by scripts)."""
    user_error = True


def is_dcdit(name: str) -> bool:
    return name in DCDiT_models


def create_model(model_cfg, dydit_cfg=None):
    """Build a DiT or a DC-DiT from a `config.ModelConfig` (registry name + overrides).

    dydit_cfg: a `config.DyDiTConfig`; with `enabled` the DC-DiT's inner blocks carry DyDiT's gates (§4.5).
    """
    name = model_cfg.name
    dydit = dydit_cfg is not None and dydit_cfg.enabled
    if dydit and name not in DCDiT_models:
        raise ModelConfigError(f"dydit.enabled: DyDiT gates are built into a DC-DiT's inner blocks; model.name "
                               f"{name!r} is not one of {', '.join(DCDiT_models)}")
    common = dict(input_size=model_cfg.input_size, in_channels=model_cfg.in_channels,
                  num_classes=model_cfg.num_classes, class_dropout_prob=model_cfg.class_dropout_prob,
                  learn_sigma=model_cfg.learn_sigma, mlp_ratio=model_cfg.mlp_ratio,
                  grad_checkpointing=model_cfg.grad_checkpointing)
    for key in ("depth", "hidden_size", "num_heads"):
        value = getattr(model_cfg, key)
        if value is not None:
            common[key] = value
    if name in DiT_models:
        return DiT_models[name](**common)
    if name in DCDiT_models:
        return DCDiT_models[name](
            **common, encoder_width=model_cfg.encoder_width, norm_groups=model_cfg.norm_groups,
            router=model_cfg.router, router_args=model_cfg.router_args, downsample_factor=model_cfg.downsample_factor,
            dechunker=model_cfg.dechunker, dechunk_sigma=model_cfg.dechunk_sigma, pos_scale=model_cfg.pos_scale,
            cond_adaptor=model_cfg.cond_adaptor, attention=model_cfg.attention, dydit=dydit,
            dydit_tau=dydit_cfg.tau if dydit else 5.0, inner_norm=model_cfg.inner_norm,
            residual_init=model_cfg.residual_init, encoder_layout=model_cfg.encoder_layout,
            decoder_layout=model_cfg.decoder_layout, stage1_downsample_factor=model_cfg.stage1_downsample_factor,
            stage1_encoder_depth=model_cfg.stage1_encoder_depth, stage1_decoder_depth=model_cfg.stage1_decoder_depth,
            stage1_dechunker=model_cfg.stage1_dechunker, stage1_dechunk_sigma=model_cfg.stage1_dechunk_sigma,
            stage1_router_sigma=model_cfg.stage1_router_sigma)
    choices = ", ".join(list(DiT_models) + list(DCDiT_models))
    raise ModelConfigError(f"model.name {name!r} is not a known model; expected one of: {choices}")


from .checkpoint_io import load_checkpoint  # noqa: E402  (it builds models with create_model above)

__all__ = ["DiT", "DiT_models", "DCDiT", "DCDiT_models", "create_model", "is_dcdit", "ModelConfigError",
           "load_checkpoint"]
