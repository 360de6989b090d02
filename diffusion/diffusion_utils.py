"""Density helpers for the variational bound of a Gaussian diffusion.

Same formulas as the public DiT / ADM code (``diffusion/diffusion_utils.py``), so the "vb" term
that trains the learned variance matches the literature to the bit:
- ``normal_kl``: closed-form KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats.
- ``discretized_gaussian_log_likelihood``: log-probability of 8-bit data (scaled to [-1, 1]) under a
  Gaussian integrated over each bin of width 2/255, with the two edge bins extended to +-inf. It is
  the decoder term L_0 of the bound (Ho et al. 2020, eq. 13).
"""

import math

import torch


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL divergence between two diagonal Gaussians, elementwise, in nats.

    Any argument may be a Python float as long as one is a tensor; shapes broadcast. Log-variances
    are used (not variances) because the diffusion keeps its tables in log space for stability.
    """
    ref = next((v for v in (mean1, logvar1, mean2, logvar2) if isinstance(v, torch.Tensor)), None)
    if ref is None:
        raise TypeError("normal_kl: expected at least one of mean1, logvar1, mean2, logvar2 to be a Tensor")
    # torch.exp needs tensors; plain floats become tensors on ref's device and dtype.
    logvar1 = logvar1 if isinstance(logvar1, torch.Tensor) else torch.tensor(logvar1).to(ref)
    logvar2 = logvar2 if isinstance(logvar2, torch.Tensor) else torch.tensor(logvar2).to(ref)
    return 0.5 * (
        -1.0
        + logvar2
        - logvar1
        + torch.exp(logvar1 - logvar2)
        + (mean1 - mean2) ** 2 * torch.exp(-logvar2)
    )


def approx_standard_normal_cdf(x):
    """Standard normal CDF via the tanh approximation used by ADM (and GELU-tanh).

    Kept instead of the exact erf so the decoder likelihood equals the reference numbers.
    """
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def continuous_gaussian_log_likelihood(x, *, means, log_scales):
    """Elementwise log-density of x under N(means, exp(log_scales)^2), in nats."""
    z = (x - means) * torch.exp(-log_scales)
    return torch.distributions.Normal(torch.zeros_like(x), torch.ones_like(x)).log_prob(z)


def discretized_gaussian_log_likelihood(x, *, means, log_scales):
    """Log-probability (nats) of uint8 data rescaled to [-1, 1] under a discretised Gaussian.

    Each of the 256 values owns the bin [x - 1/255, x + 1/255]; the lowest value (x < -0.999) owns
    (-inf, x + 1/255] and the highest (x > 0.999) owns [x - 1/255, inf), so the 256 probabilities
    sum to one. Probabilities are floored at 1e-12 before the log, as in ADM.
    """
    if not (x.shape == means.shape == log_scales.shape):
        raise ValueError(
            "discretized_gaussian_log_likelihood: expected x, means and log_scales of one shape, got "
            f"{tuple(x.shape)}, {tuple(means.shape)}, {tuple(log_scales.shape)}"
        )
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))  # upper bin edge
    cdf_min = approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))  # lower bin edge
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(
        x < -0.999,
        log_cdf_plus,
        torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta),
    )


def mean_flat(tensor):
    """Mean over every dimension but the batch one: (B, ...) -> (B,)."""
    return tensor.mean(dim=list(range(1, tensor.ndim)))
