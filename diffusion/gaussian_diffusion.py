"""Gaussian diffusion with the semantics of the public DiT code (trimmed OpenAI ADM / IDDPM).

Numbers must be comparable with the literature, so every formula here is the one of
facebookresearch/DiT ``diffusion/gaussian_diffusion.py``:
- schedule tables are numpy float64 and converted to float32 per step (``_extract_into_tensor``);
- the model predicts eps (or x0) plus, with learned sigma, an interpolation value v in [-1, 1]
  between log(beta_t) and the clipped log posterior variance (IDDPM eq. 15);
- the loss is MSE on the prediction plus the variational bound term, the latter computed on the
  *detached* mean so it only trains the variance (IDDPM §3.1, "L_hybrid");
- sampling is ancestral DDPM (``p_sample_loop``) or DDIM (``ddim_sample_loop``), consuming the global
  RNG exactly as DiT does when no generator is given.

Beyond DiT: an optional ``generator`` (one torch.Generator, or a list with one per sample) for the
per-step noise, so per-image seeded sampling does not depend on the batch, and a
model may return ``(output, extra)``; ``extra`` (e.g. router statistics) is handed back untouched.
"""

import enum
import math

import numpy as np
import torch

from .diffusion_utils import discretized_gaussian_log_likelihood, mean_flat, normal_kl


class ModelMeanType(enum.Enum):
    """What the network's first C output channels predict."""

    START_X = enum.auto()  # x_0
    EPSILON = enum.auto()  # the noise eps in x_t = sqrt(abar) x_0 + sqrt(1 - abar) eps


class ModelVarType(enum.Enum):
    """How the reverse-step variance is chosen."""

    FIXED_SMALL = enum.auto()  # posterior variance beta~_t (clipped at t = 0)
    FIXED_LARGE = enum.auto()  # beta_t (with beta~_1 at t = 0 for a better decoder likelihood)
    LEARNED_RANGE = enum.auto()  # the network interpolates between the two in log space


class LossType(enum.Enum):
    MSE = enum.auto()  # MSE, plus the raw VB term when the variance is learned (DiT default)
    RESCALED_MSE = enum.auto()  # MSE, plus VB * num_timesteps / 1000
    KL = enum.auto()  # the variational bound alone
    RESCALED_KL = enum.auto()  # the bound term times num_timesteps (estimates the full bound)

    def is_vb(self):
        return self in (LossType.KL, LossType.RESCALED_KL)


# --------------------------------------------------------------------------- beta schedules


def get_named_beta_schedule(schedule_name, num_diffusion_timesteps):
    """Betas (float64, shape (T,)) for a named schedule.

    "linear": Ho et al.'s 1e-4 .. 0.02, both ends scaled by 1000 / T so that any T approximates the
    same continuous process. "cosine" (alias "squaredcos_cap_v2", DiT's name): IDDPM's
    alpha_bar(s) = cos^2((s + 0.008) / 1.008 * pi / 2), betas capped at 0.999.
    """
    if num_diffusion_timesteps < 1:
        raise ValueError(f"diffusion_steps must be >= 1, got {num_diffusion_timesteps}")
    if schedule_name == "linear":
        scale = 1000.0 / num_diffusion_timesteps
        return np.linspace(scale * 1e-4, scale * 0.02, num_diffusion_timesteps, dtype=np.float64)
    if schedule_name in ("cosine", "squaredcos_cap_v2"):
        return betas_for_alpha_bar(
            num_diffusion_timesteps,
            lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2,
        )
    raise ValueError(
        f"noise_schedule: unknown schedule {schedule_name!r}; expected 'linear', 'cosine' or 'squaredcos_cap_v2'"
    )


def betas_for_alpha_bar(num_diffusion_timesteps, alpha_bar, max_beta=0.999):
    """Discretise a continuous alpha_bar(s), s in [0, 1], into T betas: 1 - abar(s2) / abar(s1)."""
    betas = [
        min(1.0 - alpha_bar((i + 1) / num_diffusion_timesteps) / alpha_bar(i / num_diffusion_timesteps), max_beta)
        for i in range(num_diffusion_timesteps)
    ]
    return np.array(betas, dtype=np.float64)


# --------------------------------------------------------------------------- small helpers


def _extract_into_tensor(arr, timesteps, broadcast_shape):
    """Gather a float64 numpy table at a batch of timesteps, as float32 broadcast to broadcast_shape.

    The tables stay float64 (accuracy of abar near 0 and 1) and only the gathered values are cast,
    exactly as ADM does, so results match the reference bit for bit.
    """
    table = torch.from_numpy(arr)
    if timesteps.device.type == "mps":  # MPS has no float64
        table = table.float()
    values = table.to(device=timesteps.device)[timesteps].float()  # (B,)
    values = values.view(-1, *([1] * (len(broadcast_shape) - 1)))  # (B, 1, ..., 1)
    return values.expand(broadcast_shape)  # (B, C, ...)


def _draw_normal(generator, shape, device, dtype):
    """Standard normal noise from one generator, drawn on the generator's own device then moved.

    Drawing on the generator's device lets a CPU generator seed a CUDA sampler, so a seed gives the
    same image on any hardware.
    """
    noise = torch.randn(shape, generator=generator, device=generator.device, dtype=dtype)
    return noise.to(device)


def _randn(shape, generator, device, dtype=torch.float32):
    """Noise of `shape` from the global RNG (generator None, like DiT), one generator, or a list.

    With a list of B generators, row i is drawn from generator i with shape (1, *shape[1:]), so a
    sample's noise does not depend on which other samples share its batch.
    """
    shape = tuple(shape)
    if generator is None:
        return torch.randn(shape, device=device, dtype=dtype)
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(
                f"generator: a list of generators needs one per sample, got {len(generator)} for batch {shape[0]}"
            )
        rows = [_draw_normal(g, (1, *shape[1:]), device, dtype) for g in generator]  # B x (1, C, ...)
        return torch.cat(rows, dim=0)  # (B, C, ...)
    return _draw_normal(generator, shape, device, dtype)


def _infer_device(model, noise, device):
    """Device to sample on: explicit, else the noise's, else the model's parameters', else CPU."""
    if device is not None:
        return torch.device(device)
    if noise is not None:
        return noise.device
    owner = getattr(model, "__self__", model)  # a bound method such as model.forward_with_cfg
    parameters = getattr(owner, "parameters", None)
    if callable(parameters):
        first = next(iter(parameters()), None)
        if first is not None:
            return first.device
    return torch.device("cpu")


def _split_model_return(returned):
    """A model may return a tensor or (tensor, extra); extra is passed through unchanged."""
    if isinstance(returned, tuple):
        if len(returned) != 2:
            raise ValueError(f"model: expected a tensor or an (output, extra) pair, got a tuple of {len(returned)}")
        return returned
    return returned, None


# --------------------------------------------------------------------------- the process


class GaussianDiffusion:
    """Training and sampling utilities for a discrete Gaussian diffusion over len(betas) steps.

    Index t = 0 is the first noising step (x_1 in Ho et al.'s notation) and t = T - 1 the last.
    """

    def __init__(self, *, betas, model_mean_type, model_var_type, loss_type):
        self.model_mean_type = model_mean_type
        self.model_var_type = model_var_type
        self.loss_type = loss_type

        betas = np.array(betas, dtype=np.float64)
        if betas.ndim != 1 or betas.size == 0:
            raise ValueError(f"betas: expected a non-empty 1-D array, got shape {betas.shape}")
        if not ((betas > 0).all() and (betas <= 1).all()):
            raise ValueError("betas: expected every beta in (0, 1]")
        self.betas = betas
        self.num_timesteps = int(betas.shape[0])

        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.alphas_cumprod_next = np.append(self.alphas_cumprod[1:], 0.0)

        # q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I) and its inversions for x_0 / eps.
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.log_one_minus_alphas_cumprod = np.log(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1.0)

        # q(x_{t-1} | x_t, x_0) = N(coef1 x_0 + coef2 x_t, beta~_t I)   (Ho et al. eq. 6-7)
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # beta~_0 is 0, so its log is replaced by log beta~_1 (ADM's clipping).
        if self.num_timesteps > 1:
            self.posterior_log_variance_clipped = np.log(
                np.append(self.posterior_variance[1], self.posterior_variance[1:])
            )
        else:
            self.posterior_log_variance_clipped = np.array([], dtype=np.float64)
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)

    # ----------------------------------------------------------------------- forward process

    def q_mean_variance(self, x_start, t):
        """Mean, variance and log-variance of q(x_t | x_0), each shaped like x_start."""
        mean = _extract_into_tensor(self.sqrt_alphas_cumprod, t, x_start.shape) * x_start
        variance = _extract_into_tensor(1.0 - self.alphas_cumprod, t, x_start.shape)
        log_variance = _extract_into_tensor(self.log_one_minus_alphas_cumprod, t, x_start.shape)
        return mean, variance, log_variance

    def q_sample(self, x_start, t, noise=None):
        """Draw x_t ~ q(x_t | x_0) = sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise."""
        if noise is None:
            noise = torch.randn_like(x_start)
        if noise.shape != x_start.shape:
            raise ValueError(f"q_sample: noise shape {tuple(noise.shape)} != x_start shape {tuple(x_start.shape)}")
        return (
            _extract_into_tensor(self.sqrt_alphas_cumprod, t, x_start.shape) * x_start
            + _extract_into_tensor(self.sqrt_one_minus_alphas_cumprod, t, x_start.shape) * noise
        )

    def q_posterior_mean_variance(self, x_start, x_t, t):
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
        if x_start.shape != x_t.shape:
            raise ValueError(f"q_posterior: x_start {tuple(x_start.shape)} and x_t {tuple(x_t.shape)} differ")
        mean = (
            _extract_into_tensor(self.posterior_mean_coef1, t, x_t.shape) * x_start
            + _extract_into_tensor(self.posterior_mean_coef2, t, x_t.shape) * x_t
        )
        variance = _extract_into_tensor(self.posterior_variance, t, x_t.shape)
        log_variance = _extract_into_tensor(self.posterior_log_variance_clipped, t, x_t.shape)
        return mean, variance, log_variance

    def _predict_xstart_from_eps(self, x_t, t, eps):
        return (
            _extract_into_tensor(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t
            - _extract_into_tensor(self.sqrt_recipm1_alphas_cumprod, t, x_t.shape) * eps
        )

    def _predict_eps_from_xstart(self, x_t, t, pred_xstart):
        return (
            _extract_into_tensor(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t - pred_xstart
        ) / _extract_into_tensor(self.sqrt_recipm1_alphas_cumprod, t, x_t.shape)

    # ----------------------------------------------------------------------- reverse process

    def _wrap_model(self, model):
        """Hook for SpacedDiffusion, which maps respaced indices back to original timesteps."""
        return model

    def p_mean_variance(self, model, x, t, clip_denoised=True, denoised_fn=None, model_kwargs=None):
        """Run the model at (x, t) and turn its output into p(x_{t-1} | x_t) and a prediction of x_0.

        Returns a dict: "mean", "variance", "log_variance", "pred_xstart" (each shaped like x) and
        "extra" (what the model returned beside its prediction, else None).
        """
        if t.shape != (x.shape[0],):
            raise ValueError(f"p_mean_variance: t must have shape ({x.shape[0]},), got {tuple(t.shape)}")
        model_output, extra = _split_model_return(self._wrap_model(model)(x, t, **(model_kwargs or {})))
        out = self._output_to_distribution(model_output, x, t, clip_denoised, denoised_fn)
        out["extra"] = extra
        return out

    def _output_to_distribution(self, model_output, x, t, clip_denoised, denoised_fn):
        """Reverse-step Gaussian from a raw network output (shared by sampling and the VB loss)."""
        B, C = x.shape[:2]
        if self.model_var_type == ModelVarType.LEARNED_RANGE:
            if model_output.shape != (B, C * 2, *x.shape[2:]):
                raise ValueError(
                    f"model output: learned sigma needs shape {(B, C * 2, *x.shape[2:])}, "
                    f"got {tuple(model_output.shape)}"
                )
            model_output, var_values = torch.split(model_output, C, dim=1)  # (B, C, ...) each
            # v in [-1, 1] interpolates log-variance between beta~_t (v=-1) and beta_t (v=+1).
            min_log = _extract_into_tensor(self.posterior_log_variance_clipped, t, x.shape)
            max_log = _extract_into_tensor(np.log(self.betas), t, x.shape)
            frac = (var_values + 1) / 2
            log_variance = frac * max_log + (1 - frac) * min_log
            variance = torch.exp(log_variance)
        else:
            if model_output.shape != x.shape:
                raise ValueError(
                    f"model output: fixed variance needs shape {tuple(x.shape)}, got {tuple(model_output.shape)}"
                )
            if self.model_var_type == ModelVarType.FIXED_LARGE:
                # beta~_1 replaces beta_0 at t = 0 for a better decoder log-likelihood (ADM).
                var_table = np.append(self.posterior_variance[1], self.betas[1:])
                log_var_table = np.log(var_table)
            else:
                var_table, log_var_table = self.posterior_variance, self.posterior_log_variance_clipped
            variance = _extract_into_tensor(var_table, t, x.shape)
            log_variance = _extract_into_tensor(log_var_table, t, x.shape)

        if self.model_mean_type == ModelMeanType.START_X:
            pred_xstart = model_output
        else:
            pred_xstart = self._predict_xstart_from_eps(x_t=x, t=t, eps=model_output)
        if denoised_fn is not None:  # applied before clipping, as in ADM
            pred_xstart = denoised_fn(pred_xstart)
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1, 1)
        mean, _, _ = self.q_posterior_mean_variance(x_start=pred_xstart, x_t=x, t=t)
        return {"mean": mean, "variance": variance, "log_variance": log_variance, "pred_xstart": pred_xstart}

    def p_sample(self, model, x, t, clip_denoised=True, denoised_fn=None, model_kwargs=None, generator=None):
        """One ancestral step x_t -> x_{t-1}; no noise is added where t == 0.

        Returns {"sample", "pred_xstart", "extra"}. Noise is drawn at every step (also at t == 0) so
        the global RNG advances exactly as in DiT.
        """
        out = self.p_mean_variance(model, x, t, clip_denoised, denoised_fn, model_kwargs)
        noise = _randn(x.shape, generator, x.device, x.dtype)  # (B, C, ...)
        nonzero = (t != 0).float().view(-1, *([1] * (x.ndim - 1)))  # (B, 1, ..., 1)
        sample = out["mean"] + nonzero * torch.exp(0.5 * out["log_variance"]) * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"], "extra": out["extra"]}

    def ddim_sample(
        self, model, x, t, clip_denoised=True, denoised_fn=None, model_kwargs=None, eta=0.0, generator=None
    ):
        """One DDIM step (Song et al. 2021, eq. 12); eta = 0 is deterministic, eta = 1 is DDPM-like."""
        out = self.p_mean_variance(model, x, t, clip_denoised, denoised_fn, model_kwargs)
        # eps is re-derived from the (possibly clipped) x_0 so x0-predicting models work too.
        eps = self._predict_eps_from_xstart(x, t, out["pred_xstart"])
        alpha_bar = _extract_into_tensor(self.alphas_cumprod, t, x.shape)
        alpha_bar_prev = _extract_into_tensor(self.alphas_cumprod_prev, t, x.shape)
        sigma = eta * torch.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar)) * torch.sqrt(1 - alpha_bar / alpha_bar_prev)
        noise = _randn(x.shape, generator, x.device, x.dtype)  # drawn even for eta = 0, as DiT does
        mean_pred = out["pred_xstart"] * torch.sqrt(alpha_bar_prev) + torch.sqrt(1 - alpha_bar_prev - sigma**2) * eps
        nonzero = (t != 0).float().view(-1, *([1] * (x.ndim - 1)))  # (B, 1, ..., 1)
        sample = mean_pred + nonzero * sigma * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"], "extra": out["extra"]}

    def _loop_progressive(self, step, model, shape, noise, device, progress, generator, **step_kwargs):
        """Shared sampling loop: start from noise at t = T-1, apply `step` down to t = 0, yield each."""
        if not isinstance(shape, (tuple, list)):
            raise TypeError(f"shape: expected a tuple or list such as (B, C, H, W), got {type(shape).__name__}")
        device = _infer_device(model, noise, device)
        if noise is not None:
            if tuple(noise.shape) != tuple(shape):
                raise ValueError(f"noise: shape {tuple(noise.shape)} does not match shape {tuple(shape)}")
            img = noise
        else:
            img = _randn(shape, generator, device)  # (B, C, ...)
        indices = list(range(self.num_timesteps))[::-1]
        if progress:
            from tqdm.auto import tqdm  # imported lazily: only needed for the bar

            indices = tqdm(indices)
        for i in indices:
            t = torch.full((shape[0],), i, device=device, dtype=torch.long)  # (B,)
            with torch.no_grad():
                out = step(model, img, t, generator=generator, **step_kwargs)
            yield out
            img = out["sample"]

    def p_sample_loop_progressive(
        self, model, shape, noise=None, clip_denoised=True, denoised_fn=None, model_kwargs=None,
        device=None, progress=False, generator=None,
    ):
        """Ancestral sampling, yielding p_sample's dict ("sample" = x_{t-1}, "pred_xstart") per step."""
        yield from self._loop_progressive(
            self.p_sample, model, shape, noise, device, progress, generator,
            clip_denoised=clip_denoised, denoised_fn=denoised_fn, model_kwargs=model_kwargs,
        )

    def p_sample_loop(
        self, model, shape, noise=None, clip_denoised=True, denoised_fn=None, model_kwargs=None,
        device=None, progress=False, generator=None,
    ):
        """Ancestral sampling over all (respaced) steps; returns the final x_0 batch, no grad."""
        final = None
        for final in self.p_sample_loop_progressive(
            model, shape, noise, clip_denoised, denoised_fn, model_kwargs, device, progress, generator
        ):
            pass
        return final["sample"]

    def ddim_sample_loop_progressive(
        self, model, shape, noise=None, clip_denoised=True, denoised_fn=None, model_kwargs=None,
        device=None, progress=False, eta=0.0, generator=None,
    ):
        """DDIM sampling, yielding ddim_sample's dict per step."""
        yield from self._loop_progressive(
            self.ddim_sample, model, shape, noise, device, progress, generator,
            clip_denoised=clip_denoised, denoised_fn=denoised_fn, model_kwargs=model_kwargs, eta=eta,
        )

    def ddim_sample_loop(
        self, model, shape, noise=None, clip_denoised=True, denoised_fn=None, model_kwargs=None,
        device=None, progress=False, eta=0.0, generator=None,
    ):
        """DDIM sampling over all (respaced) steps; returns the final x_0 batch, no grad."""
        final = None
        for final in self.ddim_sample_loop_progressive(
            model, shape, noise, clip_denoised, denoised_fn, model_kwargs, device, progress, eta, generator
        ):
            pass
        return final["sample"]

    # ----------------------------------------------------------------------- losses

    def _vb_terms_bpd(self, p_dist, x_start, x_t, t):
        """One term of the variational bound in bits per dimension, (B,).

        KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) for t > 0, the discretised decoder NLL at t = 0.
        """
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x_start=x_start, x_t=x_t, t=t)
        kl = normal_kl(true_mean, true_log_variance, p_dist["mean"], p_dist["log_variance"])
        kl = mean_flat(kl) / math.log(2.0)  # (B,)
        decoder_nll = -discretized_gaussian_log_likelihood(
            x_start, means=p_dist["mean"], log_scales=0.5 * p_dist["log_variance"]
        )
        decoder_nll = mean_flat(decoder_nll) / math.log(2.0)  # (B,)
        return torch.where(t == 0, decoder_nll, kl)

    def training_losses(self, model, x_start, t, model_kwargs=None, noise=None):
        """Per-sample training loss at timesteps t, as DiT's.

        Returns a dict of (B,) tensors: "loss"; with an MSE loss type also "mse", and "vb" when the
        variance is learned (loss = mse + vb, the VB seeing the mean only through a detached copy);
        with a KL loss type "loss" and "vb". If the model returned (output, extra), "extra" holds it.
        """
        model_kwargs = model_kwargs or {}
        if noise is None:
            noise = torch.randn_like(x_start)
        x_t = self.q_sample(x_start, t, noise=noise)  # (B, C, ...)
        terms = {}

        if self.loss_type.is_vb():
            p_dist = self.p_mean_variance(model, x_t, t, clip_denoised=False, model_kwargs=model_kwargs)
            terms["vb"] = self._vb_terms_bpd(p_dist, x_start, x_t, t)
            terms["loss"] = terms["vb"] * (self.num_timesteps if self.loss_type == LossType.RESCALED_KL else 1.0)
            if p_dist["extra"] is not None:
                terms["extra"] = p_dist["extra"]
            return terms

        model_output, extra = _split_model_return(self._wrap_model(model)(x_t, t, **model_kwargs))
        C = x_t.shape[1]
        if self.model_var_type == ModelVarType.LEARNED_RANGE:
            if model_output.shape != (x_t.shape[0], C * 2, *x_t.shape[2:]):
                raise ValueError(
                    f"model output: learned sigma needs {C * 2} channels, got shape {tuple(model_output.shape)}"
                )
            model_output, var_values = torch.split(model_output, C, dim=1)  # (B, C, ...) each
            # The bound trains the variance only; the mean is learned from the MSE alone (IDDPM §3.1).
            frozen = torch.cat([model_output.detach(), var_values], dim=1)  # (B, 2C, ...)
            p_dist = self._output_to_distribution(frozen, x_t, t, clip_denoised=False, denoised_fn=None)
            terms["vb"] = self._vb_terms_bpd(p_dist, x_start, x_t, t)
            if self.loss_type == LossType.RESCALED_MSE:
                terms["vb"] = terms["vb"] * (self.num_timesteps / 1000.0)

        target = x_start if self.model_mean_type == ModelMeanType.START_X else noise
        if model_output.shape != target.shape:
            raise ValueError(f"model output: prediction shape {tuple(model_output.shape)} != {tuple(target.shape)}")
        terms["mse"] = mean_flat((target - model_output) ** 2)  # (B,)
        terms["loss"] = terms["mse"] + terms["vb"] if "vb" in terms else terms["mse"]
        if extra is not None:
            terms["extra"] = extra
        return terms
