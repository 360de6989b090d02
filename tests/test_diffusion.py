"""Tests of diffusion/: DiT/ADM schedule, respacing, closed forms, losses and samplers (CPU, tiny)."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from diffusion import (
    LossType,
    ModelVarType,
    create_diffusion,
    discretized_gaussian_log_likelihood,
    get_named_beta_schedule,
    normal_kl,
    space_timesteps,
)

SHAPE = (3, 4, 4, 4)  # (B, C, H, W): tiny latents


def _linear_betas_np(steps=1000):
    """Independent float64 linear schedule (Ho et al.), written here, not imported."""
    scale = 1000.0 / steps
    return np.linspace(scale * 1e-4, scale * 0.02, steps, dtype=np.float64)


class ToyModel(nn.Module):
    """A per-sample, elementwise toy network: eps = tanh(w * x + b(t)), sigma channels = 0.3."""

    def __init__(self, learn_sigma=True):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(0.5))
        self.learn_sigma = learn_sigma

    def forward(self, x, t, y=None):
        eps = torch.tanh(self.w * x + 1e-3 * t.float().view(-1, 1, 1, 1))  # (B, C, H, W)
        if not self.learn_sigma:
            return eps
        return torch.cat([eps, torch.full_like(eps, 0.3)], dim=1)  # (B, 2C, H, W)


# --------------------------------------------------------------------------- schedule and respacing


def test_linear_schedule_endpoints_and_cumprod():
    betas = get_named_beta_schedule("linear", 1000)
    assert betas.dtype == np.float64 and betas.shape == (1000,)
    assert betas[0] == pytest.approx(1e-4, rel=1e-12)
    assert betas[-1] == pytest.approx(0.02, rel=1e-12)
    # Scaled by 1000 / steps so that shorter chains approximate the same process.
    short = get_named_beta_schedule("linear", 500)
    assert short[0] == pytest.approx(2e-4, rel=1e-12) and short[-1] == pytest.approx(0.04, rel=1e-12)

    diffusion = create_diffusion("")
    assert diffusion.num_timesteps == 1000
    np.testing.assert_allclose(diffusion.betas, _linear_betas_np(), rtol=1e-9)
    np.testing.assert_allclose(diffusion.alphas_cumprod, np.cumprod(1.0 - _linear_betas_np()), rtol=1e-12)
    assert diffusion.alphas_cumprod[-1] == pytest.approx(4.0358e-5, rel=1e-3)  # the known abar_T of DDPM


def test_cosine_schedule():
    betas = get_named_beta_schedule("cosine", 1000)
    abar = np.cumprod(1.0 - betas)
    target = np.cos((np.arange(1, 1001) / 1000 + 0.008) / 1.008 * np.pi / 2) ** 2
    target /= math.cos(0.008 / 1.008 * math.pi / 2) ** 2
    # Matches the continuous alpha_bar except where the 0.999 cap bites at the very end.
    np.testing.assert_allclose(abar[:990], target[:990], rtol=1e-9)
    assert betas.max() <= 0.999
    with pytest.raises(ValueError, match="noise_schedule"):
        get_named_beta_schedule("quadratic", 10)


def test_space_timesteps_250_like_dit():
    kept = sorted(space_timesteps(1000, "250"))
    assert len(kept) == 250
    # stride (1000 - 1) / (250 - 1) = 4.0120...: multiples of 4 until the drift passes 0.5 at k = 42.
    assert kept[:42] == [4 * k for k in range(42)]
    assert kept[42] == 169 and kept[43] == 173
    assert kept[-1] == 999
    assert kept == [round(k * 999 / 249) for k in range(250)]


def test_space_timesteps_ddim_and_sections():
    assert sorted(space_timesteps(1000, "ddim50")) == list(range(0, 1000, 20))
    assert sorted(space_timesteps(1000, "ddim5")) == [0, 200, 400, 600, 800]
    # Two sections of 50 steps: 10 evenly over [0, 49], 15 evenly over [50, 99].
    kept = sorted(space_timesteps(100, "10,15"))
    assert kept[:10] == [round(k * 49 / 9) for k in range(10)]
    assert kept[10:] == [50 + round(k * 49 / 14) for k in range(15)]
    with pytest.raises(ValueError):
        space_timesteps(10, "ddim7")  # no integer stride gives exactly 7 of 10
    with pytest.raises(ValueError):
        space_timesteps(10, "20")


def test_respaced_betas_reproduce_alphas_cumprod():
    base = create_diffusion("")
    for respacing in ("250", "ddim50", "10", "10,15"):
        spaced = create_diffusion(respacing)
        kept = sorted(space_timesteps(1000, respacing))
        assert spaced.timestep_map == kept and spaced.num_timesteps == len(kept)
        np.testing.assert_allclose(spaced.alphas_cumprod, base.alphas_cumprod[kept], rtol=1e-12)


def test_respaced_model_sees_original_timesteps():
    diffusion = create_diffusion("10")
    seen = []

    def model(x, t, **kwargs):
        seen.append(t.clone())
        return torch.zeros(x.shape[0], 2 * x.shape[1], *x.shape[2:])

    x = torch.randn(2, 4, 2, 2)
    diffusion.p_mean_variance(model, x, torch.tensor([3, 9]))
    assert seen[-1].tolist() == [333, 999]  # no rescaling to a 0..1000 range (DiT)
    diffusion.training_losses(model, x, torch.tensor([0, 5]))
    assert seen[-1].tolist() == [0, 555]


# --------------------------------------------------------------------------- closed forms


def test_q_sample_matches_closed_form():
    diffusion = create_diffusion("")
    abar = np.cumprod(1.0 - _linear_betas_np())
    torch.manual_seed(0)
    n = 20000
    t = torch.tensor([10, 300, 700, 999]).repeat_interleave(n)  # (4n,)
    x0 = torch.full((4 * n, 1), 0.7)
    xt = diffusion.q_sample(x0, t).view(4, n)
    for row, step in enumerate((10, 300, 700, 999)):
        mean, var = math.sqrt(abar[step]) * 0.7, 1.0 - abar[step]
        assert abs(xt[row].mean().item() - mean) < 5 * math.sqrt(var / n)
        assert xt[row].var().item() == pytest.approx(var, rel=0.05)
    # With explicit noise it is the deterministic reparameterisation.
    noise = torch.randn(4 * n, 1)
    expected = np.sqrt(abar[t.numpy()])[:, None] * 0.7 + np.sqrt(1 - abar[t.numpy()])[:, None] * noise.numpy()
    np.testing.assert_allclose(diffusion.q_sample(x0, t, noise=noise).numpy(), expected, rtol=1e-5, atol=1e-6)


def test_posterior_matches_bayes_rule_numpy():
    diffusion = create_diffusion("")
    betas = _linear_betas_np()
    alphas = 1.0 - betas
    abar = np.cumprod(alphas)
    rng = np.random.default_rng(0)
    t = np.array([1, 50, 400, 999])
    x0 = rng.standard_normal((4, 3))
    xt = rng.standard_normal((4, 3))
    abar_prev = abar[t - 1]
    # Product of N(x_{t-1}; sqrt(abar_prev) x0, 1 - abar_prev) and N(x_t; sqrt(alpha) x_{t-1}, beta),
    # written as precisions: an independent route to Ho et al.'s eq. 6-7.
    precision = 1.0 / (1.0 - abar_prev) + alphas[t] / betas[t]
    var = 1.0 / precision
    mean = var[:, None] * (
        np.sqrt(abar_prev)[:, None] * x0 / (1.0 - abar_prev)[:, None]
        + np.sqrt(alphas[t])[:, None] * xt / betas[t][:, None]
    )
    got_mean, got_var, got_logvar = diffusion.q_posterior_mean_variance(
        torch.tensor(x0, dtype=torch.float32), torch.tensor(xt, dtype=torch.float32), torch.tensor(t)
    )
    np.testing.assert_allclose(got_mean.numpy(), mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got_var[:, 0].numpy(), var, rtol=1e-5)
    np.testing.assert_allclose(got_logvar[:, 0].numpy(), np.log(var), rtol=1e-5)
    # t = 0: the posterior collapses onto x0; its log-variance is clipped to that of t = 1.
    m0, v0, lv0 = diffusion.q_posterior_mean_variance(torch.ones(1, 2), torch.zeros(1, 2), torch.tensor([0]))
    assert torch.allclose(m0, torch.ones(1, 2)) and v0.abs().max() == 0
    assert lv0[0, 0].item() == pytest.approx(math.log(betas[1] * (1 - abar[0]) / (1 - abar[1])), rel=1e-6)


def test_normal_kl_matches_torch_distributions():
    torch.manual_seed(0)
    m1, m2 = torch.randn(50, dtype=torch.float64), torch.randn(50, dtype=torch.float64)
    lv1, lv2 = torch.randn(50, dtype=torch.float64), torch.randn(50, dtype=torch.float64)
    expected = torch.distributions.kl_divergence(
        torch.distributions.Normal(m1, torch.exp(0.5 * lv1)), torch.distributions.Normal(m2, torch.exp(0.5 * lv2))
    )
    torch.testing.assert_close(normal_kl(m1, lv1, m2, lv2), expected)
    # Scalars broadcast against a tensor argument (the prior term uses mean2 = 0, logvar2 = 0).
    torch.testing.assert_close(normal_kl(m1, lv1, 0.0, 0.0), normal_kl(m1, lv1, torch.zeros(50), torch.zeros(50)))


def test_discretized_gaussian_likelihood_is_a_distribution():
    x = torch.arange(256, dtype=torch.float64) / 127.5 - 1.0  # every uint8 value in [-1, 1]
    for mean, scale in ((0.1, 0.3), (-0.79, 0.05), (0.0, 2.0)):
        means = torch.full_like(x, mean)
        log_scales = torch.full_like(x, math.log(scale))
        probs = discretized_gaussian_log_likelihood(x, means=means, log_scales=log_scales).exp()
        assert probs.sum().item() == pytest.approx(1.0, abs=1e-6)
        if scale < 1:  # the mode sits in the mean's bin
            assert probs.argmax().item() == int(round((mean + 1) * 127.5))
        else:  # a wide Gaussian puts its tails in the two open-ended edge bins, symmetrically
            assert probs[0].item() == pytest.approx(probs[-1].item()) and probs[0] > 100 * probs[128]
    with pytest.raises(ValueError, match="one shape"):
        discretized_gaussian_log_likelihood(x, means=x[:3], log_scales=x)


# --------------------------------------------------------------------------- training losses


def test_training_losses_shapes_and_keys():
    diffusion = create_diffusion("")
    model = ToyModel()
    torch.manual_seed(0)
    x0 = torch.randn(SHAPE)
    t = torch.tensor([0, 500, 999])
    terms = diffusion.training_losses(model, x0, t, model_kwargs={"y": torch.zeros(3, dtype=torch.long)})
    assert set(terms) == {"loss", "mse", "vb"}
    for value in terms.values():
        assert value.shape == (3,) and torch.isfinite(value).all()
    torch.testing.assert_close(terms["loss"], terms["mse"] + terms["vb"])
    with pytest.raises(ValueError, match="learned sigma"):
        diffusion.training_losses(ToyModel(learn_sigma=False), x0, t)


def test_vb_does_not_backprop_into_the_mean():
    """The VB term trains sigma only (IDDPM §3.1): the eps parameters get gradients from the MSE alone."""
    diffusion = create_diffusion("")

    class ParamModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.eps = nn.Parameter(0.1 * torch.randn(SHAPE[1:]))
            self.v = nn.Parameter(torch.full(SHAPE[1:], 0.2))

        def forward(self, x, t):
            B = x.shape[0]
            return torch.cat([self.eps.expand(B, -1, -1, -1), self.v.expand(B, -1, -1, -1)], dim=1)

    torch.manual_seed(1)
    model = ParamModel()
    x0, noise, t = torch.randn(SHAPE), torch.randn(SHAPE), torch.tensor([3, 200, 900])
    terms = diffusion.training_losses(model, x0, t, noise=noise)
    grad_eps_loss, grad_v_loss = torch.autograd.grad(terms["loss"].sum(), [model.eps, model.v])
    terms = diffusion.training_losses(model, x0, t, noise=noise)
    (grad_eps_mse,) = torch.autograd.grad(terms["mse"].sum(), [model.eps])
    torch.testing.assert_close(grad_eps_loss, grad_eps_mse, rtol=0, atol=0)
    assert grad_v_loss.abs().sum() > 0  # the variance is trained by the VB term

    # Not vacuous: a VB computed on the live (non-detached) mean does depend on eps.
    x_t = diffusion.q_sample(x0, t, noise=noise)
    live = diffusion._output_to_distribution(model(x_t, t), x_t, t, clip_denoised=False, denoised_fn=None)
    (grad_eps_live,) = torch.autograd.grad(diffusion._vb_terms_bpd(live, x0, x_t, t).sum(), [model.eps])
    assert grad_eps_live.abs().sum() > 1e-6


def _zero_model_loss_numpy(t, noise):
    """Closed-form loss (float64) of a model whose output is all zeros: eps = 0 and v = 0 (t > 0)."""
    betas = _linear_betas_np()
    abar = np.cumprod(1.0 - betas)
    abar_prev = np.append(1.0, abar[:-1])
    post_var = betas * (1 - abar_prev) / (1 - abar)
    c1 = betas * np.sqrt(abar_prev) / (1 - abar)
    lv_true = np.log(post_var[t])
    lv_model = 0.5 * (np.log(betas[t]) + lv_true)  # v = 0 is the midpoint of the learned range
    # eps = 0 predicts x0 = x_t / sqrt(abar), so mean error = -c1 sqrt((1 - abar) / abar) * noise.
    mean_err2 = c1[t, None] ** 2 * (1 - abar[t, None]) / abar[t, None] * noise**2  # (B, D)
    kl = 0.5 * (-1 + lv_model - lv_true + np.exp(lv_true - lv_model))[:, None]
    kl = kl + 0.5 * mean_err2 * np.exp(-lv_model)[:, None]
    vb = kl.mean(axis=1) / math.log(2.0)
    expected_vb = (
        0.5 * (-1 + lv_model - lv_true + np.exp(lv_true - lv_model))
        + 0.5 * c1[t] ** 2 * (1 - abar[t]) / abar[t] * np.exp(-lv_model)
    ) / math.log(2.0)
    return (noise**2).mean(axis=1) + vb, 1.0 + expected_vb


def test_zero_model_loss_equals_closed_form():
    diffusion = create_diffusion("")

    def zero_model(x, t):
        return torch.zeros(x.shape[0], 2 * x.shape[1], *x.shape[2:])

    t = torch.tensor([1, 10, 250, 999])
    torch.manual_seed(2)
    x0 = torch.rand(4, 4, 8, 8) * 2 - 1
    noise = torch.randn(4, 4, 8, 8)
    loss = diffusion.training_losses(zero_model, x0, t, noise=noise)["loss"]
    exact, expectation = _zero_model_loss_numpy(t.numpy(), noise.view(4, -1).double().numpy())
    np.testing.assert_allclose(loss.numpy(), exact, rtol=1e-4)
    # Averaged over noise draws the loss approaches its expectation 1 + E[vb].
    many = torch.stack(
        [diffusion.training_losses(zero_model, x0, t)["loss"] for _ in range(50)]
    ).mean(0)
    np.testing.assert_allclose(many.numpy(), expectation, rtol=0.02)


def test_fixed_variance_x0_prediction_and_kl_loss():
    torch.manual_seed(3)
    x0, t = torch.rand(SHAPE) * 2 - 1, torch.tensor([0, 7, 900])
    # learn_sigma=False, predict_xstart=True: an oracle x0 model has zero MSE and no VB term.
    diffusion = create_diffusion("", learn_sigma=False, predict_xstart=True)
    terms = diffusion.training_losses(lambda x, ts: x0, x0, t)
    assert set(terms) == {"loss", "mse"} and terms["loss"].abs().max() == 0
    # Fixed variances: large = beta_t (beta~_1 at t = 0), small = the posterior variance.
    x = torch.randn(SHAPE)
    large = create_diffusion("", learn_sigma=False).p_mean_variance(lambda x, ts: x, x, t)["variance"][:, 0, 0, 0]
    small = create_diffusion("", learn_sigma=False, sigma_small=True)
    small_var = small.p_mean_variance(lambda x, ts: x, x, t)["variance"][:, 0, 0, 0]
    betas = _linear_betas_np()
    torch.testing.assert_close(large[1:], torch.tensor(betas[[7, 900]], dtype=torch.float32))
    torch.testing.assert_close(large[0], torch.tensor(small.posterior_variance[1], dtype=torch.float32))
    torch.testing.assert_close(small_var, torch.tensor(small.posterior_variance[t.numpy()], dtype=torch.float32))
    # Learned range: v = +1 gives beta_t, v = -1 the clipped posterior variance.
    learned = create_diffusion("")
    for v, table in ((1.0, np.log(betas)), (-1.0, learned.posterior_log_variance_clipped)):
        out = learned.p_mean_variance(lambda x, ts: torch.cat([x, torch.full_like(x, v)], 1), x, t)
        torch.testing.assert_close(out["log_variance"][:, 0, 0, 0], torch.tensor(table[t.numpy()], dtype=torch.float32))
    # use_kl: the loss is the bound term times the number of steps.
    kl = create_diffusion("", use_kl=True)
    assert kl.loss_type == LossType.RESCALED_KL and kl.model_var_type == ModelVarType.LEARNED_RANGE
    terms = kl.training_losses(ToyModel(), x0, t)
    torch.testing.assert_close(terms["loss"], terms["vb"] * 1000)


def test_model_extra_output_is_passed_through():
    diffusion = create_diffusion("10")

    def model(x, t):
        return torch.zeros(x.shape[0], 2 * x.shape[1], *x.shape[2:]), {"t": t}

    terms = diffusion.training_losses(model, torch.zeros(SHAPE), torch.tensor([1, 2, 3]))
    assert terms["extra"]["t"].tolist() == [111, 222, 333]
    steps = list(diffusion.p_sample_loop_progressive(model, SHAPE))
    assert [s["extra"]["t"][0].item() for s in steps] == [999, 888, 777, 666, 555, 444, 333, 222, 111, 0]


# --------------------------------------------------------------------------- sampling


@pytest.mark.parametrize("respacing,loop", [("10", "p_sample_loop"), ("ddim5", "ddim_sample_loop")])
def test_sampling_is_reproducible(respacing, loop, capsys):
    diffusion = create_diffusion(respacing)
    model = ToyModel()
    sample = getattr(diffusion, loop)
    noise = torch.randn(SHAPE)

    torch.manual_seed(0)
    a = sample(model, SHAPE, noise)
    torch.manual_seed(0)
    b = sample(model, SHAPE, noise)
    assert a.shape == SHAPE and torch.isfinite(a).all()
    assert torch.equal(a, b)

    # A generator gives the same result whatever the global RNG does, and leaves it untouched.
    state = torch.get_rng_state()
    c = sample(model, SHAPE, generator=torch.Generator().manual_seed(5))
    assert torch.equal(state, torch.get_rng_state())
    torch.manual_seed(123)
    d = sample(model, SHAPE, generator=torch.Generator().manual_seed(5))
    e = sample(model, SHAPE, generator=torch.Generator().manual_seed(6))
    assert torch.equal(c, d) and not torch.allclose(c, e)
    # Without a generator the global RNG is used exactly as a generator with the same seed (DiT parity).
    torch.manual_seed(5)
    assert torch.equal(sample(model, SHAPE), c)

    # progress=True shows a tqdm bar over the respaced steps.
    sample(model, SHAPE, noise, progress=True)
    steps = diffusion.num_timesteps
    assert f"{steps}/{steps}" in capsys.readouterr().err


@pytest.mark.parametrize("respacing,loop", [("10", "p_sample_loop"), ("ddim5", "ddim_sample_loop")])
def test_list_of_generators_gives_batch_independent_samples(respacing, loop):
    diffusion = create_diffusion(respacing)
    model = ToyModel()
    sample = getattr(diffusion, loop)
    kwargs = {"eta": 1.0} if loop == "ddim_sample_loop" else {}  # stochastic DDIM uses per-step noise too
    batch = sample(model, SHAPE, generator=[torch.Generator().manual_seed(s) for s in (10, 11, 12)], **kwargs)
    alone = sample(model, (1, *SHAPE[1:]), generator=[torch.Generator().manual_seed(11)], **kwargs)
    other = sample(model, (2, *SHAPE[1:]), generator=[torch.Generator().manual_seed(s) for s in (99, 11)], **kwargs)
    torch.testing.assert_close(alone[0], batch[1], rtol=0, atol=1e-6)
    torch.testing.assert_close(other[1], batch[1], rtol=0, atol=1e-6)
    assert not torch.allclose(batch[0], batch[1])
    with pytest.raises(ValueError, match="one per sample"):
        sample(model, SHAPE, generator=[torch.Generator()])


def test_progressive_yields_every_step():
    diffusion = create_diffusion("10")
    steps = list(diffusion.p_sample_loop_progressive(ToyModel(), SHAPE, generator=torch.Generator().manual_seed(0)))
    assert len(steps) == 10
    assert all(s["sample"].shape == SHAPE and s["pred_xstart"].shape == SHAPE for s in steps)
    final = diffusion.p_sample_loop(ToyModel(), SHAPE, generator=torch.Generator().manual_seed(0))
    assert torch.equal(steps[-1]["sample"], final)
    ddim = list(create_diffusion("ddim5").ddim_sample_loop_progressive(ToyModel(), SHAPE))
    assert len(ddim) == 5 and all(s["pred_xstart"].abs().max() <= 1 for s in ddim)  # clip_denoised


def _oracle(base, x0):
    """An eps model that knows x0: eps = (x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t) at original t."""
    abar = torch.tensor(base.alphas_cumprod)  # float64

    def model(x, t):
        a = abar[t].view(-1, 1, 1, 1)
        eps = ((x.double() - a.sqrt() * x0.double()) / (1 - a).sqrt()).float()  # (B, C, H, W)
        return torch.cat([eps, torch.zeros_like(eps)], dim=1)  # (B, 2C, H, W)

    return model


@pytest.mark.parametrize("respacing", ["ddim5", "ddim50", "250"])
def test_ddim_with_oracle_recovers_x0(respacing):
    torch.manual_seed(4)
    x0 = torch.rand(SHAPE) * 1.8 - 0.9
    oracle = _oracle(create_diffusion(""), x0)
    diffusion = create_diffusion(respacing)
    out = diffusion.ddim_sample_loop(oracle, SHAPE, clip_denoised=False)
    torch.testing.assert_close(out, x0, rtol=0, atol=1e-4)
    # Ancestral sampling ends on the posterior mean at t = 0, which is x0 itself.
    out = diffusion.p_sample_loop(oracle, SHAPE)
    torch.testing.assert_close(out, x0, rtol=0, atol=1e-4)


def test_loss_at_t0_is_the_discretized_decoder_nll():
    """At t = 0 the VB term is -log p(x0 | x1) of the 8-bit bin (bits), not a KL."""
    diffusion = create_diffusion("")
    betas = _linear_betas_np()
    abar = np.cumprod(1.0 - betas)
    x0 = (torch.arange(2 * 16).view(2, 1, 4, 4) * 7 + 20).float() / 127.5 - 1  # interior uint8 values
    noise = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))

    def zero_model(x, t):
        return torch.zeros(x.shape[0], 2, *x.shape[2:])

    terms = diffusion.training_losses(zero_model, x0, torch.tensor([0, 0]), noise=noise)
    # eps = 0 at t = 0: the mean is x_1 / sqrt(abar_0); v = 0 puts log var midway to log beta~_1.
    x_t = math.sqrt(abar[0]) * x0.double().numpy() + math.sqrt(1 - abar[0]) * noise.double().numpy()
    mean = x_t / math.sqrt(abar[0])
    log_var = 0.5 * (math.log(betas[0]) + math.log(betas[1] * (1 - abar[0]) / (1 - abar[1])))
    std = math.exp(0.5 * log_var)
    cdf = np.vectorize(lambda z: 0.5 * (1 + math.erf(z / math.sqrt(2))))
    x = x0.double().numpy()
    prob = cdf((x + 1 / 255 - mean) / std) - cdf((x - 1 / 255 - mean) / std)
    expected = -np.log(prob).reshape(2, -1).mean(1) / math.log(2.0)
    np.testing.assert_allclose(terms["vb"].numpy(), expected, rtol=5e-3)  # ADM's tanh CDF vs the exact erf


@pytest.mark.parametrize("step", ["p_sample", "ddim_sample"])
def test_one_step_draws_from_the_posterior_with_the_oracle(step):
    """With the true eps, a DDPM step and a DDIM step with eta = 1 both sample q(x_{t-1} | x_t, x0)."""
    diffusion = create_diffusion("10", learn_sigma=False, sigma_small=True)
    torch.manual_seed(5)
    x0 = torch.rand(SHAPE) * 1.8 - 0.9
    base = create_diffusion("", learn_sigma=False)
    abar = torch.tensor(base.alphas_cumprod)

    def oracle(x, t):
        a = abar[t].view(-1, 1, 1, 1)
        return ((x.double() - a.sqrt() * x0.double()) / (1 - a).sqrt()).float()

    t = torch.tensor([9, 5, 1])  # respaced indices
    x_t = diffusion.q_sample(x0, t)
    kwargs = {"eta": 1.0} if step == "ddim_sample" else {}
    out = getattr(diffusion, step)(oracle, x_t, t, generator=torch.Generator().manual_seed(7), **kwargs)
    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(7))
    mean, var, _ = diffusion.q_posterior_mean_variance(x0, x_t, t)
    torch.testing.assert_close(out["sample"], mean + var.sqrt() * z, rtol=1e-4, atol=1e-5)
