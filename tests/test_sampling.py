"""Tests for booth.sampling: schedules, noise, denoiser wrappers and samplers.

Two kinds of ground truth:
- an analytic case (Gaussian data) where the exact denoiser and the exact probability-flow ODE
  solution are known in closed form, for convergence and marginal-distribution checks;
- diffusers' schedulers driven by the same fake eps model, for step-by-step parity.
"""

import math

import pytest
import torch

from booth import sampling as S
from booth.errors import BoothError

MU, STD = 0.5, 0.7  # data distribution N(MU, STD^2) in every dimension
SCHEDULE = S.sd1_schedule()
DETERMINISTIC = ["ddim", "plms", "euler", "heun", "lms", "dpmpp_2m"]
STOCHASTIC = {"euler_a": {}, "dpmpp_2m_sde": {}, "ddim": {"eta": 1.0}}


# ----------------------------------------------------------------------------------------------
# Analytic Gaussian problem


def gaussian_denoiser(x, sigma):
    """E[x0 | x] for x0 ~ N(MU, STD^2), x = x0 + sigma * eps."""
    s2 = sigma.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1))) ** 2
    return (STD**2 * x + s2 * MU) / (STD**2 + s2)


def exact_flow(x_start, sigma_start, sigma):
    """Probability-flow ODE solution: x - MU scales with the marginal std sqrt(STD^2 + sigma^2)."""
    return MU + (x_start - MU) * math.sqrt(STD**2 + sigma**2) / math.sqrt(STD**2 + sigma_start**2)


def karras_no_zero(steps):
    """`steps` Karras steps ending at sigma_min (no final jump to 0, whose fixed size would put a
    step-count-independent floor under the error of every sampler)."""
    return S.get_sigmas_karras(steps + 1, SCHEDULE.sigma_min, SCHEDULE.sigma_max)[:-1]


def flow_error(name, sigmas):
    """Max error against the exact ODE solution, relative to the size of x - MU at the end."""
    z = torch.randn(4, 1000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    s0, s1 = float(sigmas[0]), float(sigmas[-1])
    x_start = MU + math.sqrt(STD**2 + s0**2) * z  # float64 so that rounding does not blur the orders
    exact = exact_flow(x_start, s0, s1)
    out = S.SAMPLERS[name](gaussian_denoiser, x_start, sigmas)
    return float((out - exact).abs().max() / (exact - MU).abs().max())


@pytest.fixture(scope="module")
def karras_errors():
    return {name: [flow_error(name, karras_no_zero(n)) for n in (10, 20, 40)] for name in DETERMINISTIC}


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_deterministic_samplers_converge_to_exact_flow(karras_errors, name):
    e10, e20, e40 = karras_errors[name]
    assert e10 > e20 > e40
    assert e40 < 0.05


def test_higher_order_samplers_beat_euler(karras_errors):
    # Compared at equal step counts; heun spends ~2 denoiser calls per step, plms one extra call.
    for name in ["heun", "lms", "dpmpp_2m", "plms"]:
        assert all(e < e_euler for e, e_euler in zip(karras_errors[name], karras_errors["euler"])), name
    # Heun also wins at (about) equal cost: n Heun steps (2n - 1 calls) against 2n Euler steps.
    assert karras_errors["heun"][0] < karras_errors["euler"][1]
    assert karras_errors["heun"][1] < karras_errors["euler"][2]


def test_empirical_convergence_orders(karras_errors):
    order = {name: math.log2(e[1] / e[2]) for name, e in karras_errors.items()}  # 20 -> 40 steps
    assert 0.8 < order["euler"] < 1.2 and 0.8 < order["ddim"] < 1.2
    assert order["heun"] > 1.8 and order["dpmpp_2m"] > 1.8
    # PLMS uses equal-step Adams-Bashforth weights; on the (smoothly) non-uniform Karras grid the
    # weight mismatch is O(h^2) per step, so 2nd order globally rather than 4th.
    assert order["plms"] > 1.8
    assert order["lms"] > 2.8  # variable-step weights: approaching 4 as the start-up steps fade


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_deterministic_samplers_converge_on_uniform_schedule(name):
    errors = [flow_error(name, S.get_sigmas_uniform(SCHEDULE, n)) for n in (10, 20, 40)]
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 0.05


def test_ddim_eta0_equals_euler():
    sigmas = S.get_sigmas_uniform(SCHEDULE, 10)
    x = torch.randn(2, 16, generator=torch.Generator().manual_seed(0)) * float(sigmas[0])
    torch.testing.assert_close(
        S.sample_ddim(gaussian_denoiser, x, sigmas), S.sample_euler(gaussian_denoiser, x, sigmas)
    )


def _stochastic_run(name, sigmas, n=200_000, seed=1, **opts):
    gen = torch.Generator().manual_seed(seed)
    # Start from the exact marginal at sigmas[0] (mean MU): starting from zero-mean noise would leave
    # a bias of MU * STD / sigma_max in the mean that is no fault of the sampler.
    x = MU + math.sqrt(STD**2 + float(sigmas[0]) ** 2) * S.randn((1, n), gen)
    out = S.SAMPLERS[name](gaussian_denoiser, x, sigmas, generator=gen, **opts)
    return out.mean().item(), out.std().item() / math.hypot(STD, float(sigmas[-1]))


@pytest.mark.parametrize("name", sorted(STOCHASTIC))
def test_stochastic_samplers_reach_data_marginal(name):
    # Statistical error: 0.0016 on the mean, 0.16% on the std (n = 200k). The std also carries a
    # discretisation bias: ancestral steps are 1st order in it (-1.8% at 200 Karras steps).
    sigmas = S.get_sigmas_karras(200, SCHEDULE.sigma_min, SCHEDULE.sigma_max)
    mean, std_ratio = _stochastic_run(name, sigmas, **STOCHASTIC[name])
    assert abs(mean - MU) < 0.008
    assert abs(std_ratio - 1) < 0.03
    # ... and the std bias shrinks with more steps.
    _, coarse = _stochastic_run(
        name, S.get_sigmas_karras(50, SCHEDULE.sigma_min, SCHEDULE.sigma_max), **STOCHASTIC[name]
    )
    assert abs(std_ratio - 1) < abs(coarse - 1) or abs(std_ratio - 1) < 0.005


@pytest.mark.parametrize("schedule", ["karras", "uniform"])
@pytest.mark.parametrize("eta", [0.5, 1.0])
def test_ancestral_std_matches_exact_recursion(schedule, eta):
    # With a Gaussian x the ancestral/DDIM step keeps x Gaussian, and x - MU evolves as
    # (x - MU) * (STD^2 + sigma * sigma_down) / (STD^2 + sigma^2) + sigma_up * z: the final std is
    # known exactly for any step count, which checks the noise level itself, not just its limit.
    sigmas = S.SCHEDULES[schedule](SCHEDULE, 25)
    sig = sigmas.tolist()
    var = STD**2 + sig[0] ** 2
    for a, b in zip(sig, sig[1:]):
        down, up = S.ancestral_sigmas(a, b, eta)
        var = var * ((STD**2 + a * down) / (STD**2 + a**2)) ** 2 + up**2
    predicted = math.sqrt(var) / math.hypot(STD, sig[-1])
    for name in ["ddim", "euler_a"]:
        mean, std_ratio = _stochastic_run(name, sigmas, eta=eta)
        assert abs(mean - MU) < 0.008
        assert std_ratio == pytest.approx(predicted, rel=0.006)
    assert predicted < 0.95  # a real bias at 25 steps, so the check above is not vacuous


# ----------------------------------------------------------------------------------------------
# Plumbing shared by every sampler


def _run_all(sigmas, batch=2, seed=0):
    x = torch.randn(batch, 3, 4, 4, generator=torch.Generator().manual_seed(seed)) * float(sigmas[0])
    return {
        name: fn(gaussian_denoiser, x, sigmas, generator=torch.Generator().manual_seed(5))
        for name, fn in S.SAMPLERS.items()
    }


@pytest.mark.parametrize("schedule", ["uniform", "karras", "exponential"])
@pytest.mark.parametrize("steps", [1, 2, 7])
def test_all_samplers_handle_zero_and_nonzero_final_sigma(schedule, steps):
    sigmas = S.SCHEDULES[schedule](SCHEDULE, steps)
    assert (sigmas[-1] == 0) == (schedule != "uniform")
    for name, out in _run_all(sigmas).items():
        assert out.shape == (2, 3, 4, 4) and torch.isfinite(out).all(), name


def test_final_step_to_zero_lands_near_the_data():
    # Starting on the data mean's ODE path: every sampler must end near the exact solution at 0.
    sigmas = S.get_sigmas_karras(30, SCHEDULE.sigma_min, SCHEDULE.sigma_max)
    for name in DETERMINISTIC:
        assert flow_error(name, sigmas) < (0.07 if name in ("euler", "ddim") else 0.01), name


@pytest.mark.parametrize("name", sorted(S.SAMPLERS))
def test_callback_and_steps_agree(name):
    sigmas = S.get_sigmas_karras(6, SCHEDULE.sigma_min, SCHEDULE.sigma_max)
    x = torch.randn(2, 8, generator=torch.Generator().manual_seed(0)) * float(sigmas[0])
    seen = []
    out = S.SAMPLERS[name](
        gaussian_denoiser, x, sigmas, generator=torch.Generator().manual_seed(3), callback=seen.append
    )
    steps = list(
        S.SAMPLERS[name].steps(gaussian_denoiser, x, sigmas, generator=torch.Generator().manual_seed(3))
    )
    assert [d["i"] for d in seen] == [d["i"] for d in steps] == list(range(6))
    for a, b, i in zip(seen, steps, range(6)):
        assert set(a) == {"i", "x", "sigma", "sigma_next", "denoised"}
        assert a["sigma"] == sigmas[i] and a["sigma_next"] == sigmas[i + 1]
        torch.testing.assert_close(a["x"], b["x"], rtol=0, atol=0)
        torch.testing.assert_close(a["denoised"], b["denoised"], rtol=0, atol=0)
    torch.testing.assert_close(out, steps[-1]["x"], rtol=0, atol=0)


@pytest.mark.parametrize("name", sorted(S.SAMPLERS))
def test_per_row_generators_make_rows_batch_independent(name):
    sigmas = S.get_sigmas_karras(5, SCHEDULE.sigma_min, SCHEDULE.sigma_max)
    seeds = [11, 12, 13]
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    x = S.randn((3, 2, 4, 4), gens) * float(sigmas[0])
    batch = S.SAMPLERS[name](
        gaussian_denoiser, x, sigmas, generator=[torch.Generator().manual_seed(s) for s in seeds]
    )
    for i, seed in enumerate(seeds):
        x1 = S.randn((1, 2, 4, 4), [torch.Generator().manual_seed(seed)]) * float(sigmas[0])
        torch.testing.assert_close(x1, x[i : i + 1], rtol=0, atol=0)
        single = S.SAMPLERS[name](
            gaussian_denoiser, x1, sigmas, generator=[torch.Generator().manual_seed(seed)]
        )
        torch.testing.assert_close(single, batch[i : i + 1])


def test_randn_matches_diffusers_randn_tensor():
    from diffusers.utils.torch_utils import randn_tensor

    shape = (3, 4, 5, 5)
    gens = lambda: [torch.Generator().manual_seed(s) for s in (7, 8, 9)]
    torch.testing.assert_close(S.randn(shape, gens()), randn_tensor(shape, generator=gens()), rtol=0, atol=0)
    one = lambda: torch.Generator().manual_seed(4)
    torch.testing.assert_close(S.randn(shape, one()), randn_tensor(shape, generator=one()), rtol=0, atol=0)
    with pytest.raises(ValueError):
        S.randn(shape, gens()[:2])


def test_lms_coefficients_are_exact_integrals():
    sig = [10.0, 6.0, 3.5, 2.0, 1.1, 0.0]
    for i in range(len(sig) - 1):
        order = min(i + 1, 4)
        coeffs = S.lms_coefficients(sig, i, order)
        # Integrating 1 must give the step length; integrating tau^k the exact moment.
        for k in range(order):
            approx = sum(c * sig[i - j] ** k for j, c in enumerate(coeffs))
            exact = (sig[i + 1] ** (k + 1) - sig[i] ** (k + 1)) / (k + 1)
            assert approx == pytest.approx(exact, rel=1e-12, abs=1e-12)


# ----------------------------------------------------------------------------------------------
# Schedules


def test_discrete_schedule_matches_diffusers():
    from diffusers import DDIMScheduler

    ref = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    torch.testing.assert_close(SCHEDULE.alphas_cumprod, ref.alphas_cumprod, rtol=0, atol=0)
    assert SCHEDULE.sigma_min == pytest.approx(0.0292, abs=1e-4)
    assert SCHEDULE.sigma_max == pytest.approx(14.6146, abs=1e-4)


def test_sigma_to_t_is_exact_on_training_sigmas_and_monotone_between():
    t = SCHEDULE.sigma_to_t(SCHEDULE.sigmas)
    torch.testing.assert_close(t, torch.arange(1000, dtype=torch.float32), rtol=0, atol=0)
    torch.testing.assert_close(SCHEDULE.sigma_to_t(SCHEDULE.sigmas, quantize=True), t, rtol=0, atol=0)
    sigmas = torch.logspace(math.log10(SCHEDULE.sigma_min), math.log10(SCHEDULE.sigma_max), 5000)
    t = SCHEDULE.sigma_to_t(sigmas)
    assert (t.diff() >= 0).all() and t[0] == 0 and t[-1] == 999
    torch.testing.assert_close(SCHEDULE.t_to_sigma(t), sigmas, rtol=1e-5, atol=0)
    # Halfway in log-sigma between two training sigmas is halfway in t.
    mid = (SCHEDULE.log_sigmas[100] + SCHEDULE.log_sigmas[101]).div(2).exp()
    assert float(SCHEDULE.sigma_to_t(mid)) == pytest.approx(100.5, abs=1e-3)
    assert float(SCHEDULE.sigma_to_t(SCHEDULE.sigmas[100] * 1.0001, quantize=True)) == 100
    # Out of range clamps instead of extrapolating.
    assert SCHEDULE.sigma_to_t(torch.tensor([1e-4, 100.0])).tolist() == [0.0, 999.0]


@pytest.mark.parametrize("steps", [10, 20, 50])
def test_uniform_schedule_matches_diffusers_ddim_timesteps(steps):
    sigmas = S.get_sigmas_uniform(SCHEDULE, steps)
    ref = _ddim_scheduler()
    ref.set_timesteps(steps)
    t = SCHEDULE.sigma_to_t(sigmas[:-1])
    torch.testing.assert_close(t, ref.timesteps.float(), rtol=0, atol=0)
    assert sigmas[-1] == SCHEDULE.sigmas[0] and sigmas.dtype == torch.float32 and len(sigmas) == steps + 1


def test_karras_and_exponential_schedules():
    k = S.get_sigmas_karras(12, 0.03, 14.6)
    e = S.get_sigmas_exponential(12, 0.03, 14.6)
    for s in (k, e):
        assert s.dtype == torch.float32 and len(s) == 13 and s[-1] == 0
        assert s[0].item() == pytest.approx(14.6, rel=1e-6) and s[-2].item() == pytest.approx(0.03, rel=1e-6)
        assert (s.diff() < 0).all()
    # Karras: uniform in sigma^(1/rho); exponential: uniform in log-sigma.
    k_rho = k[:-1].double() ** (1 / 7)
    torch.testing.assert_close(k_rho.diff(), k_rho.diff()[:1].expand(11), rtol=1e-5, atol=0)
    torch.testing.assert_close(e[:-1].log().diff(), e[:-1].log().diff()[:1].expand(11), rtol=1e-4, atol=0)
    assert S.get_sigmas_karras(1, 0.03, 14.6).tolist() == pytest.approx([14.6, 0.0])
    with pytest.raises(BoothError):
        S.get_sigmas_uniform(SCHEDULE, 1000)
    with pytest.raises(BoothError):
        S.get_sigmas_karras(0, 0.03, 14.6)


# ----------------------------------------------------------------------------------------------
# Parity with diffusers, driven by a fake eps model


class FakeEpsModel:
    """Smooth stand-in for an eps UNet on (B, 4, H, W) latents: channel mixing + a t-dependent bias.
    Records its calls so tests can check the timesteps and conditioning it was given."""

    def __init__(self):
        g = torch.Generator().manual_seed(1234)
        self.w = torch.randn(4, 4, generator=g) * 0.3
        self.phase = torch.rand(4, generator=g).reshape(1, 4, 1, 1) * 6
        self.calls = []

    def __call__(self, x, t, context=None):
        self.calls.append((x.shape[0], torch.as_tensor(t).float().reshape(-1), context))
        t = torch.as_tensor(t).float().reshape(-1, 1, 1, 1)
        mix = torch.einsum("oc,bchw->bohw", self.w, x)
        out = 0.8 * x + 0.3 * torch.tanh(mix) + 0.1 * torch.sin(t / 150 + self.phase)
        if context is not None:
            out = out + context.mean(dim=(1, 2)).reshape(-1, 1, 1, 1)
        return out


SD_CONFIG = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)


def _ddim_scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        **SD_CONFIG, clip_sample=False, set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading"
    )


def _diffusers_trajectory(scheduler, model, noise, steps, **step_kwargs):
    scheduler.set_timesteps(steps)
    latents = noise * scheduler.init_noise_sigma
    out = []
    for t in scheduler.timesteps:
        eps = model(scheduler.scale_model_input(latents, t), t)
        latents = scheduler.step(eps, t, latents, **step_kwargs).prev_sample
        out.append(latents)
    return out


def _our_trajectory(name, model, x, sigmas, vp, quantize=False, **opts):
    """Our latents after each step; ``vp`` converts to diffusers' DDIM/PNDM/DPM latent scaling."""
    denoiser = S.EpsDenoiser(model, SCHEDULE, quantize=quantize)
    out = []
    for info in S.SAMPLERS[name].steps(denoiser, x, sigmas, **opts):
        scale = (1 + info["sigma_next"] ** 2) ** 0.5 if vp else 1.0
        out.append(info["x"] / scale)
    return out


def _assert_trajectories_close(ours, theirs, tol=1e-5):
    assert len(ours) == len(theirs)
    for i, (a, b) in enumerate(zip(ours, theirs)):
        err = (a - b).abs().max().item() / b.abs().max().item()
        assert err < tol, f"step {i}: relative error {err:.2e}"


def _gens(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


NOISE = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(99))
SEEDS = [21, 22, 23]


@pytest.mark.parametrize("steps", [10, 20, 50])
@pytest.mark.parametrize("eta", [0.0, 0.6, 1.0])
def test_ddim_matches_diffusers(steps, eta):
    model = FakeEpsModel()
    theirs = _diffusers_trajectory(_ddim_scheduler(), model, NOISE, steps, eta=eta, generator=_gens(SEEDS))
    sigmas = S.get_sigmas_uniform(SCHEDULE, steps)
    x = NOISE * (1 + sigmas[0] ** 2) ** 0.5
    ours = _our_trajectory("ddim", model, x, sigmas, vp=True, eta=eta, generator=_gens(SEEDS))
    _assert_trajectories_close(ours, theirs)


# Not 1 step: there diffusers' PNDM (whose timestep list then has no repeated entry) does a plain
# DDIM step, while we still do the 2nd-order start into sigmas[-1] = sigma_min.
@pytest.mark.parametrize("steps", [2, 10, 20, 50])
def test_plms_matches_diffusers_pndm(steps):
    from diffusers import PNDMScheduler

    scheduler = PNDMScheduler(**SD_CONFIG, skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1)
    model = FakeEpsModel()
    theirs = _diffusers_trajectory(scheduler, model, NOISE, steps)
    # PNDM's timesteps repeat one entry: its first two calls are our first step (the predictor at
    # t_{n-1}, then the model at the predicted point). Its first "latents" are that predictor.
    assert len(theirs) == steps + 1
    theirs_t = [c[1].expand(3) for c in model.calls]  # diffusers passes a 0-d timestep
    sigmas = S.get_sigmas_uniform(SCHEDULE, steps)
    model.calls.clear()
    ours = _our_trajectory("plms", model, NOISE * (1 + sigmas[0] ** 2) ** 0.5, sigmas, vp=True)
    torch.testing.assert_close(torch.cat([c[1] for c in model.calls]), torch.cat(theirs_t), rtol=0, atol=0)
    _assert_trajectories_close(ours, theirs[1:])


@pytest.mark.parametrize("steps", [10, 25])
def test_euler_matches_diffusers_karras(steps):
    from diffusers import EulerDiscreteScheduler

    scheduler = EulerDiscreteScheduler(**SD_CONFIG, use_karras_sigmas=True, timestep_spacing="linspace")
    model = FakeEpsModel()
    theirs = _diffusers_trajectory(scheduler, model, NOISE, steps)
    sigmas = S.get_sigmas_karras(steps, SCHEDULE.sigma_min, SCHEDULE.sigma_max)
    torch.testing.assert_close(sigmas, scheduler.sigmas, rtol=1e-6, atol=0)
    ours = _our_trajectory("euler", model, NOISE * sigmas[0], sigmas, vp=False)
    _assert_trajectories_close(ours, theirs)


@pytest.mark.parametrize("steps", [10, 25])
def test_euler_a_matches_diffusers_with_per_row_generators(steps):
    from diffusers import EulerAncestralDiscreteScheduler

    scheduler = EulerAncestralDiscreteScheduler(**SD_CONFIG, steps_offset=1, timestep_spacing="leading")
    model = FakeEpsModel()
    theirs = _diffusers_trajectory(scheduler, model, NOISE, steps, generator=_gens(SEEDS))
    # "leading" spacing puts its sigmas on integer timesteps: our uniform ones, but ending at 0.
    sigmas = torch.cat([S.get_sigmas_uniform(SCHEDULE, steps)[:-1], torch.zeros(1)])
    torch.testing.assert_close(sigmas, scheduler.sigmas, rtol=0, atol=0)
    x = NOISE * scheduler.init_noise_sigma
    ours = _our_trajectory("euler_a", model, x, sigmas, vp=False, generator=_gens(SEEDS))
    _assert_trajectories_close(ours, theirs)


def _dpm_scheduler(**kwargs):
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler(**SD_CONFIG, use_karras_sigmas=True, solver_order=2, **kwargs)


@pytest.mark.parametrize("steps", [10, 20])
@pytest.mark.parametrize("name", ["dpmpp_2m", "dpmpp_2m_sde"])
def test_dpmpp_matches_diffusers_karras(name, steps):
    sde = name == "dpmpp_2m_sde"
    scheduler = _dpm_scheduler(algorithm_type="sde-dpmsolver++" if sde else "dpmsolver++")
    model = FakeEpsModel()
    kwargs = {"generator": _gens(SEEDS)} if sde else {}
    theirs = _diffusers_trajectory(scheduler, model, NOISE, steps, **kwargs)
    sigmas = S.get_sigmas_karras(steps, SCHEDULE.sigma_min, SCHEDULE.sigma_max)
    torch.testing.assert_close(sigmas, scheduler.sigmas, rtol=1e-6, atol=0)
    x = NOISE * (1 + sigmas[0] ** 2) ** 0.5
    # diffusers' DPM-Solver rounds the model's timesteps to integers: our `quantize`.
    kwargs = {"generator": _gens(SEEDS)} if sde else {}
    ours = _our_trajectory(name, model, x, sigmas, vp=True, quantize=True, **kwargs)
    _assert_trajectories_close(ours, theirs)


# ----------------------------------------------------------------------------------------------
# Denoiser wrappers


def test_eps_denoiser_scaling_dtype_and_timesteps():
    model = FakeEpsModel()
    dtypes = []

    def half_model(x, t):
        dtypes.append(x.dtype)
        return model(x.float(), t).to(x.dtype)

    x = torch.randn(2, 4, 8, 8)
    sigma = torch.tensor([SCHEDULE.sigmas[500].item(), 3.3])
    out = S.EpsDenoiser(half_model, SCHEDULE, dtype=torch.bfloat16)(x, sigma)
    assert out.dtype == torch.float32 and dtypes == [torch.bfloat16]
    t = model.calls[-1][1]
    assert t[0] == 500 and t[1] == SCHEDULE.sigma_to_t(torch.tensor(3.3)) and t[1] != t[1].round()
    ref = S.EpsDenoiser(model, SCHEDULE)(x, sigma)
    c_in = (1 + sigma**2).rsqrt().reshape(2, 1, 1, 1)
    torch.testing.assert_close(
        ref, x - sigma.reshape(2, 1, 1, 1) * model(x * c_in, SCHEDULE.sigma_to_t(sigma))
    )
    quantized = S.EpsDenoiser(model, SCHEDULE, quantize=True)
    quantized(x, sigma)
    assert model.calls[-1][1][1] == SCHEDULE.sigma_to_t(torch.tensor(3.3)).round()


def test_cfg_denoiser_one_batched_call_uncond_first():
    model = FakeEpsModel()
    eps = S.EpsDenoiser(model, SCHEDULE)
    cond, uncond = torch.full((2, 7, 16), 0.5), torch.zeros(1, 7, 16)
    x, sigma = torch.randn(2, 4, 8, 8), torch.tensor([2.0, 2.0])
    model.calls.clear()
    out = S.CFGDenoiser(eps, cond, uncond, 7.5)(x, sigma)
    assert len(model.calls) == 1 and model.calls[0][0] == 4
    context = model.calls[0][2]
    assert (context[:2] == 0).all() and (context[2:] == 0.5).all()
    d_cond, d_uncond = eps(x, sigma, context=cond), eps(x, sigma, context=uncond.expand(2, 7, 16))
    torch.testing.assert_close(out, d_uncond + 7.5 * (d_cond - d_uncond), rtol=1e-5, atol=1e-5)
    # Same as guiding eps, as diffusers does.
    x_in = x / (1 + 4.0) ** 0.5
    t = SCHEDULE.sigma_to_t(sigma)
    e_c, e_u = model(x_in, t, context=cond), model(x_in, t, context=uncond.expand(2, 7, 16))
    torch.testing.assert_close(out, x - 2.0 * (e_u + 7.5 * (e_c - e_u)), rtol=1e-5, atol=1e-5)
    model.calls.clear()
    torch.testing.assert_close(S.CFGDenoiser(eps, cond, uncond, 1.0)(x, sigma), d_cond)
    assert len(model.calls) == 1 and model.calls[0][0] == 2


def test_cfg_sampling_end_to_end():
    model = FakeEpsModel()
    cond, uncond = torch.randn(1, 5, 8), torch.zeros(1, 5, 8)
    denoiser = S.CFGDenoiser(S.EpsDenoiser(model, SCHEDULE), cond, uncond, 5.0)
    sigmas = S.SCHEDULES["karras"](SCHEDULE, 8)
    x = S.randn((2, 4, 8, 8), _gens([1, 2])) * sigmas[0]
    for name, fn in S.SAMPLERS.items():
        out = fn(denoiser, x, sigmas, generator=_gens([3, 4]))
        assert torch.isfinite(out).all(), name
