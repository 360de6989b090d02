"""Gaussian diffusion with DiT / ADM semantics (docs/architecture.md).

``create_diffusion`` has DiT's signature and defaults: linear betas over 1000 steps, eps
prediction, learned-range sigma, loss = MSE + VB. Train with ``create_diffusion("")`` (all steps)
and sample with e.g. ``create_diffusion("250")`` or ``create_diffusion("ddim50")``.
"""

from .diffusion_utils import discretized_gaussian_log_likelihood, mean_flat, normal_kl
from .gaussian_diffusion import (
    GaussianDiffusion,
    LossType,
    ModelMeanType,
    ModelVarType,
    get_named_beta_schedule,
)
from .respace import SpacedDiffusion, space_timesteps


def create_diffusion(
    timestep_respacing,
    noise_schedule="linear",
    use_kl=False,
    sigma_small=False,
    predict_xstart=False,
    learn_sigma=True,
    rescale_learned_sigmas=False,
    diffusion_steps=1000,
):
    """Build the SpacedDiffusion DiT uses.

    timestep_respacing: None or "" for all `diffusion_steps`; "250" (evenly spaced, rounded);
    "ddimN" (integer stride, exactly N steps); "10,15,20" (per-section counts); or a list of ints.
    Loss: RESCALED_KL if use_kl, else RESCALED_MSE if rescale_learned_sigmas, else MSE (DiT's default,
    where the VB term is added unscaled).
    """
    betas = get_named_beta_schedule(noise_schedule, diffusion_steps)
    if use_kl:
        loss_type = LossType.RESCALED_KL
    elif rescale_learned_sigmas:
        loss_type = LossType.RESCALED_MSE
    else:
        loss_type = LossType.MSE
    if timestep_respacing is None or timestep_respacing == "":
        timestep_respacing = [diffusion_steps]
    if learn_sigma:
        model_var_type = ModelVarType.LEARNED_RANGE
    else:
        model_var_type = ModelVarType.FIXED_SMALL if sigma_small else ModelVarType.FIXED_LARGE
    return SpacedDiffusion(
        use_timesteps=space_timesteps(diffusion_steps, timestep_respacing),
        betas=betas,
        model_mean_type=ModelMeanType.START_X if predict_xstart else ModelMeanType.EPSILON,
        model_var_type=model_var_type,
        loss_type=loss_type,
    )


__all__ = [
    "GaussianDiffusion",
    "LossType",
    "ModelMeanType",
    "ModelVarType",
    "SpacedDiffusion",
    "create_diffusion",
    "discretized_gaussian_log_likelihood",
    "get_named_beta_schedule",
    "mean_flat",
    "normal_kl",
    "space_timesteps",
]
