"""Noise schedules, denoiser wrappers and samplers for Stable Diffusion.

Everything works in the "variance exploding" (VE) parametrisation of Karras et al. 2022
("Elucidating the Design Space of Diffusion-Based Generative Models", arXiv:2206.00364):
a noisy latent is ``x = x0 + sigma * eps``. A *denoiser* is any callable
``denoiser(x, sigma) -> x0_estimate`` with ``sigma`` of shape ``(B,)``. SD's UNet predicts eps for
the "variance preserving" latent ``x / sqrt(1 + sigma**2)``; :class:`EpsDenoiser` converts between
the two, so every sampler here is a short loop over ``sigmas`` (the k-diffusion design).

Each sampler ``sample_X(denoiser, x, sigmas, *, generator=None, callback=None, **opts)`` starts
from ``x`` at ``sigmas[0]`` (for pure noise: ``noise * sigmas[0]``) and returns the sample at
``sigmas[-1]``, which may be 0 (Karras/exponential schedules) or not (the model's own discrete
schedule ends at sigma_min ~ 0.029). ``sample_X.steps(...)`` is the same sampler as a Python
generator yielding, after every step, ``{"i", "x", "sigma", "sigma_next", "denoised"}``.
"""

import math
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from .errors import BoothError
from .options import MAX_STEPS, check_int
from .options import SAMPLERS as FACTS

Denoiser = Callable[..., Tensor]
Generator = torch.Generator | Sequence[torch.Generator] | None


# ----------------------------------------------------------------------------------------------
# The model's discrete noise schedule


def zero_terminal_snr(betas: Tensor) -> Tensor:
    """Lin et al. 2023, Algorithm 1: shift and scale sqrt(alphas_cumprod) so its last value is 0 and its first
    unchanged, and return the betas of that."""
    root = torch.cumprod(1 - betas, 0).sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * (first / (first - last))  # in this order, as diffusers rounds it
    alphas_cumprod = root**2
    alphas = torch.cat([alphas_cumprod[:1], alphas_cumprod[1:] / alphas_cumprod[:-1]])
    return 1 - alphas


class DiscreteSchedule:
    """The discrete DDPM schedule a model was trained with, expressed as VE sigmas.

    ``betas`` are "scaled linear" (linear in sqrt(beta)), as for SD 1.x/2.x. The float32 arithmetic
    mirrors diffusers exactly so that ``alphas_cumprod`` (and hence DDIM/PLMS) match bit for bit.
    ``sigmas[t] = sqrt((1 - alphas_cumprod[t]) / alphas_cumprod[t])`` increases with ``t``.
    """

    def __init__(self, beta_start: float = 0.00085, beta_end: float = 0.012, num_train_timesteps: int = 1000,
                 zero_snr: bool = False):  # fmt: skip
        """`zero_snr`: the betas rescaled so the last timestep is pure noise (Lin et al. 2023, Algorithm 1).
        Training then sees alphas_cumprod[-1] = 0; the samplers a last sigma of 4096 (alphas_cumprod 2**-24,
        as diffusers' schedulers stand in for the infinite one)."""
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2
        self.alphas_cumprod = torch.cumprod(1 - (zero_terminal_snr(betas) if zero_snr else betas), 0)
        alphas = self.alphas_cumprod.clone()
        if zero_snr:
            alphas[-1] = 2.0**-24
        self.sigmas = ((1 - alphas) / alphas) ** 0.5
        self.log_sigmas = self.sigmas.log()

    @property
    def num_train_timesteps(self) -> int:
        return self.sigmas.shape[0]

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def sigma_to_t(self, sigma: Tensor | float, quantize: bool = False) -> Tensor:
        """Continuous timestep for ``sigma``: linear interpolation in log-sigma between the two
        neighbouring training timesteps (as k-diffusion's ``DiscreteSchedule``), clamped to
        [0, T-1]. ``quantize`` rounds to the nearest training timestep instead."""
        sigma = torch.as_tensor(sigma, dtype=torch.float32)
        sigmas = self.sigmas.to(sigma.device)
        flat = sigma.reshape(-1).contiguous()
        low = torch.searchsorted(sigmas, flat, right=True) - 1
        low = low.clamp(0, self.num_train_timesteps - 2).reshape(sigma.shape)
        s_lo, s_hi = sigmas[low], sigmas[low + 1]
        w = ((s_lo.log() - sigma.log()) / (s_lo.log() - s_hi.log())).clamp(0, 1)
        # A training sigma must give its integer timestep exactly (DDIM/PLMS parity), whatever the
        # last-bit behaviour of log() on this device, so pin the endpoints by comparing sigmas.
        w = torch.where(sigma == s_lo, 0.0, torch.where(sigma == s_hi, 1.0, w))
        if quantize:
            w = (w > 0.5).float()
        return low.float() + w

    def t_to_sigma(self, t: Tensor | float) -> Tensor:
        """Inverse of :meth:`sigma_to_t` (log-linear interpolation of the table)."""
        t = torch.as_tensor(t, dtype=torch.float32)
        sigmas, log_sigmas = self.sigmas.to(t.device), self.log_sigmas.to(t.device)
        low = t.floor().long().clamp(0, self.num_train_timesteps - 1)
        high = t.ceil().long().clamp(0, self.num_train_timesteps - 1)
        w = t - low
        sigma = ((1 - w) * log_sigmas[low] + w * log_sigmas[high]).exp()
        return torch.where(w == 0, sigmas[low], sigma)


def sd1_schedule() -> DiscreteSchedule:
    """The Stable Diffusion v1 training schedule (also SD 2.x)."""
    return DiscreteSchedule(0.00085, 0.012, 1000)


# ----------------------------------------------------------------------------------------------
# Sigma schedules for sampling: 1-D float32 tensors of length steps + 1, descending


def _check_steps(steps: int) -> None:
    check_int("--steps", steps, 1, MAX_STEPS)  # Settings.validate's rule, for callers of these functions


def get_sigmas_uniform(schedule: DiscreteSchedule, steps: int) -> Tensor:
    """The model's own timesteps, as DDIM/PLMS use them (CompVis; diffusers "leading" spacing with
    ``steps_offset=1``): ``t = k * (T // steps) + 1``. The last step goes to ``alphas_cumprod[0]``,
    not to 0 (diffusers' ``set_alpha_to_one=False``), so this schedule ends at ``sigma_min``."""
    _check_steps(steps)
    n = schedule.num_train_timesteps
    if (
        steps >= n
    ):  # the spacing n // steps would repeat timesteps (or be 0), and samplers divide by its steps
        raise BoothError(f"at most {n - 1} steps are possible with the uniform schedule, got {steps}")
    t = torch.arange(steps - 1, -1, -1) * (n // steps) + 1
    return torch.cat([schedule.sigmas[t], schedule.sigmas[:1]])


def get_sigmas_karras(steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    """Karras et al. 2022, eq. 5: uniform in ``sigma**(1/rho)``, then a final 0."""
    _check_steps(steps)
    # float64 then one rounding to float32, as diffusers' numpy version does.
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (hi + ramp * (lo - hi)) ** rho
    return torch.cat([sigmas, sigmas.new_zeros(1)]).float()


def get_sigmas_exponential(steps: int, sigma_min: float, sigma_max: float) -> Tensor:
    """Uniform in log-sigma from ``sigma_max`` to ``sigma_min``, then a final 0."""
    _check_steps(steps)
    sigmas = torch.linspace(math.log(sigma_max), math.log(sigma_min), steps, dtype=torch.float64).exp()
    return torch.cat([sigmas, sigmas.new_zeros(1)]).float()


SCHEDULES: dict[str, Callable[[DiscreteSchedule, int], Tensor]] = {
    "uniform": get_sigmas_uniform,
    "karras": lambda schedule, steps: get_sigmas_karras(steps, schedule.sigma_min, schedule.sigma_max),
    "exponential": lambda schedule, steps: get_sigmas_exponential(
        steps, schedule.sigma_min, schedule.sigma_max
    ),
}


# ----------------------------------------------------------------------------------------------
# Noise


def randn(shape: Sequence[int], generator: Generator = None, device=None, dtype=torch.float32) -> Tensor:
    """Standard normal noise, drawn exactly like diffusers' ``randn_tensor``.

    Noise is always drawn in float32 on the generator's device and then moved, so a seed gives the
    same image on any device/dtype. With a list of generators, row ``i`` comes from
    ``generator[i]`` alone, so an image does not depend on what else is in its batch.
    """
    shape = tuple(shape)
    if isinstance(generator, (list, tuple)):
        if len(generator) == 1:  # diffusers treats a one-element list like a single generator
            generator = generator[0]
        elif len(generator) != shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}")
        else:
            rows = [
                torch.randn((1, *shape[1:]), generator=g, device=g.device, dtype=torch.float32).to(device)
                for g in generator
            ]
            return torch.cat(rows).to(dtype=dtype)
    draw_device = generator.device if generator is not None else device
    noise = torch.randn(shape, generator=generator, device=draw_device, dtype=torch.float32)
    return noise.to(device=device, dtype=dtype)


# ----------------------------------------------------------------------------------------------
# Denoisers


def _expand_like(v: Tensor, x: Tensor) -> Tensor:
    """Per-row scalars (B,) -> (B, 1, 1, ...) for broadcasting against ``x``."""
    return v.reshape(-1, *([1] * (x.ndim - 1)))


class EpsDenoiser:
    """Wrap an eps-predicting model ``model(x_vp, t, **cond) -> eps`` as a VE denoiser.

    ``x_vp = x / sqrt(1 + sigma**2)`` is the model's "variance preserving" input and
    ``t = schedule.sigma_to_t(sigma)`` (rounded if ``quantize``, for models that only saw integer
    timesteps, like diffusers' DPM-Solver with Karras sigmas). The model runs in ``dtype`` (its
    own, e.g. float16); the returned ``x0 = x - sigma * eps`` is float32.
    """

    def __init__(self, model, schedule: DiscreteSchedule, quantize: bool = False, dtype=None):
        self.model, self.schedule, self.quantize, self.dtype = model, schedule, quantize, dtype

    def __call__(self, x: Tensor, sigma: Tensor, **cond) -> Tensor:
        x = x.float()
        sigma = sigma.to(device=x.device, dtype=torch.float32)
        s = _expand_like(sigma, x)
        x_in = (x / (s**2 + 1) ** 0.5).to(self.dtype or x.dtype)
        t = self.schedule.sigma_to_t(sigma, quantize=self.quantize)
        return self.from_output(x, s, self.model(x_in, t, **cond).float())

    # x0 is affine in the model's output, with the same coefficients for every output at one (x, sigma):
    # guidance can mix denoised outputs, and CFG rescale measure them in the model's own terms.
    def from_output(self, x: Tensor, s: Tensor, eps: Tensor) -> Tensor:
        return x - s * eps

    def to_output(self, x: Tensor, s: Tensor, x0: Tensor) -> Tensor:
        return (x - x0) / s


class VDenoiser(EpsDenoiser):
    """The same for a v-predicting model (Salimans & Ho 2022; SD 2.x 768-v): with ``alpha = 1 / sqrt(1 +
    sigma**2)`` and ``sigma_vp = sigma * alpha``, ``v = alpha * eps - sigma_vp * x0``, so ``x0 = alpha * x_vp -
    sigma_vp * v``, which in VE terms is ``x / (1 + sigma**2) - sigma / sqrt(1 + sigma**2) * v``."""

    def from_output(self, x: Tensor, s: Tensor, v: Tensor) -> Tensor:
        return x / (s**2 + 1) - s / (s**2 + 1) ** 0.5 * v

    def to_output(self, x: Tensor, s: Tensor, x0: Tensor) -> Tensor:
        return (x / (s**2 + 1) - x0) * (s**2 + 1) ** 0.5 / s


PREDICTIONS = {"eps": EpsDenoiser, "v": VDenoiser}  # what a UNet predicts -> its denoiser


def _match_batch(context: Tensor, batch: int) -> Tensor:
    if context.shape[0] == batch:
        return context
    if context.shape[0] == 1:
        return context.expand(batch, *context.shape[1:])
    raise ValueError(f"conditioning batch {context.shape[0]} does not match latent batch {batch}")


def _keywords(cond: Tensor | dict[str, Tensor]) -> dict[str, Tensor]:
    return {"context": cond} if isinstance(cond, Tensor) else dict(cond)


class CFGDenoiser:
    """Classifier-free guidance (Ho & Salimans 2022) around a denoiser taking ``context=``.

    Guidance is applied to the denoised output; since ``x0`` is affine in the model's output (eps or v)
    with the same coefficients for both halves, this is identical to guiding the output as diffusers does.
    Conditional and unconditional halves run in one batched call, uncond first (as diffusers).

    ``rescale`` (Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed", eq. 15-16;
    diffusers' ``guidance_rescale``) brings the guided output's standard deviation back towards the
    conditional one's, measured in the model's own output as diffusers does, against the over-exposure strong
    guidance gives v models.
    """

    def __init__(self, denoiser: Denoiser, cond: Tensor | dict[str, Tensor], uncond: Tensor | dict[str, Tensor] | None,
                 scale: float, rescale: float = 0.0):  # fmt: skip
        """`cond` and `uncond`: the text's embeddings (the model's `context=`), or a dict of all the model's
        conditioning keywords (SDXL's `context` and `y`)."""
        self.denoiser, self.cond, self.uncond, self.scale = denoiser, _keywords(cond), uncond, float(scale)
        self.uncond = None if uncond is None else _keywords(uncond)
        self.rescale = float(rescale)

    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor:
        b = x.shape[0]
        cond = {k: _match_batch(v, b) for k, v in self.cond.items()}
        if self.scale == 1.0 or self.uncond is None:
            return self.denoiser(x, sigma, **cond)
        both = {k: torch.cat([_match_batch(self.uncond[k], b), v]) for k, v in cond.items()}
        out_uncond, out_cond = self.denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), **both).chunk(2)
        guided = out_uncond + self.scale * (out_cond - out_uncond)
        return self._rescaled(x.float(), sigma, guided, out_cond) if self.rescale else guided

    def _rescaled(self, x: Tensor, sigma: Tensor, guided: Tensor, cond: Tensor) -> Tensor:
        s = _expand_like(sigma.to(device=x.device, dtype=torch.float32), x)
        if not bool((s > 0).all()):
            return guided  # at sigma 0 the output is the input: nothing to rescale
        to, back = self.denoiser.to_output, self.denoiser.from_output
        out, out_cond = to(x, s, guided), to(x, s, cond)
        dims = list(range(1, x.ndim))
        rescaled = out * (out_cond.std(dim=dims, keepdim=True) / out.std(dim=dims, keepdim=True))
        return back(x, s, self.rescale * rescaled + (1 - self.rescale) * out)


# ----------------------------------------------------------------------------------------------
# Sampler plumbing

Steps = Iterator[dict]


def _sampler(name: str, steps_fn: Callable[..., Steps]) -> Callable[..., Tensor]:
    """Build ``sample_X`` from a step generator and the sampler's facts (``booth.options.SAMPLERS``): its default
    eta comes from there, and the generator stays reachable as ``.steps``, the facts as ``.facts``."""
    facts = FACTS[name]
    defaults = {} if facts.eta is None else {"eta": facts.eta}

    def steps(denoiser, x, sigmas, *, generator=None, **opts) -> Steps:
        return steps_fn(denoiser, x, sigmas, generator=generator, **{**defaults, **opts})

    def sample(denoiser, x, sigmas, *, generator=None, callback=None, **opts) -> Tensor:
        for info in steps(denoiser, x, sigmas, generator=generator, **opts):
            if callback is not None:
                callback(info)
            x = info["x"]
        return x

    sample.__name__ = sample.__qualname__ = f"sample_{name}"
    sample.__doc__ = steps.__doc__ = steps_fn.__doc__
    sample.steps, sample.facts = steps, facts
    return sample


def _prepare(sigmas, x: Tensor) -> tuple[Tensor, list[float]]:
    """Sigmas as a float32 tensor on x's device (passed to the denoiser) and as Python floats
    (for the step arithmetic and branching without a device sync per step)."""
    sigmas = torch.as_tensor(sigmas, dtype=torch.float32).to(x.device)
    return sigmas, sigmas.tolist()


def _denoise(denoiser: Denoiser, x: Tensor, sigma: Tensor) -> Tensor:
    return denoiser(x, sigma * x.new_ones(x.shape[0], dtype=torch.float32))


def _info(i: int, x: Tensor, sigmas: Tensor, denoised: Tensor) -> dict:
    return {"i": i, "x": x, "sigma": sigmas[i], "sigma_next": sigmas[i + 1], "denoised": denoised}


def ancestral_sigmas(sigma: float, sigma_next: float, eta: float = 1.0) -> tuple[float, float]:
    """Split a step sigma -> sigma_next into a deterministic part to ``sigma_down`` and fresh noise
    of std ``sigma_up``, with ``sigma_down**2 + sigma_up**2 = sigma_next**2``. ``eta=1`` is the
    DDPM posterior (ancestral) step, ``eta=0`` the deterministic DDIM step (Song et al. 2021)."""
    if sigma_next == 0:
        return 0.0, 0.0
    sigma_up = min(sigma_next, eta * math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2))
    return math.sqrt(sigma_next**2 - sigma_up**2), sigma_up


def _ancestral_step(x, denoised, sigma, sigma_next, eta, generator) -> Tensor:
    sigma_down, sigma_up = ancestral_sigmas(sigma, sigma_next, eta)
    eps = (x - denoised) / sigma
    x = denoised + sigma_down * eps
    if sigma_up > 0:
        x = x + sigma_up * randn(x.shape, generator, x.device, x.dtype)
    return x


# ----------------------------------------------------------------------------------------------
# Samplers


def ancestral_steps(denoiser, x, sigmas, *, generator=None, eta: float) -> Steps:
    """DDIM (Song et al. 2021, "Denoising Diffusion Implicit Models", eq. 12) and Euler ancestral
    (k-diffusion ``sample_euler_ancestral``) are one update in sigma space.

    ``x_next = x0 + sigma_down * eps + sigma_up * z`` with ``eps = (x - x0) / sigma`` and
    ``sigma_up = eta * sqrt(sigma_next**2 (sigma**2 - sigma_next**2) / sigma**2)``: an Euler step of
    the probability flow ODE to ``sigma_down``, then fresh noise of std ``sigma_up`` (see
    :func:`ancestral_sigmas`). eta=0 is deterministic DDIM (and coincides with Euler); eta=1 samples
    the DDPM posterior (Ho et al. 2020). With the uniform schedule, ``ddim`` is diffusers'
    ``DDIMScheduler`` (``set_alpha_to_one=False``); ``euler_a`` is this at eta=1 on Karras sigmas.
    """
    sigmas, sig = _prepare(sigmas, x)
    for i in range(len(sig) - 1):
        denoised = _denoise(denoiser, x, sigmas[i])
        x = _ancestral_step(x, denoised, sig[i], sig[i + 1], eta, generator)
        yield _info(i, x, sigmas, denoised)


def euler_steps(denoiser, x, sigmas, *, generator=None) -> Steps:
    """Euler's method on the probability flow ODE ``dx/dsigma = (x - D(x, sigma)) / sigma``
    (Karras et al. 2022, Algorithm 2 without churn and without the 2nd-order correction)."""
    sigmas, sig = _prepare(sigmas, x)
    for i in range(len(sig) - 1):
        denoised = _denoise(denoiser, x, sigmas[i])
        d = (x - denoised) / sig[i]
        x = x + d * (sig[i + 1] - sig[i])
        yield _info(i, x, sigmas, denoised)


def heun_steps(denoiser, x, sigmas, *, generator=None) -> Steps:
    """Heun's 2nd-order method (Karras et al. 2022, Algorithm 2, churn 0): two denoiser calls per
    step, except a plain Euler step into sigma = 0 where the slope is undefined."""
    sigmas, sig = _prepare(sigmas, x)
    for i in range(len(sig) - 1):
        s, s_next = sig[i], sig[i + 1]
        denoised = _denoise(denoiser, x, sigmas[i])
        d = (x - denoised) / s
        x_euler = x + d * (s_next - s)
        if s_next == 0:
            x = x_euler
        else:
            d_next = (x_euler - _denoise(denoiser, x_euler, sigmas[i + 1])) / s_next
            x = x + (d + d_next) / 2 * (s_next - s)
        yield _info(i, x, sigmas, denoised)


# Adams-Bashforth weights for equal steps, newest value first.
_ADAMS_BASHFORTH = {
    1: (1.0,),
    2: (3 / 2, -1 / 2),
    3: (23 / 12, -16 / 12, 5 / 12),
    4: (55 / 24, -59 / 24, 37 / 24, -9 / 24),
}


def _plms_first_eps(denoiser, x, eps, sigmas, sig, i) -> Tensor:
    """PLMS's start: a DDIM step, the model again at the predicted point, and the average of both
    eps (2nd-order, Heun-like). Impossible into sigma = 0, where it stays a plain DDIM step."""
    if sig[i + 1] == 0:
        return eps
    x_pred = x + (sig[i + 1] - sig[i]) * eps
    eps_pred = (x_pred - _denoise(denoiser, x_pred, sigmas[i + 1])) / sig[i + 1]
    return (eps + eps_pred) / 2


def plms_steps(denoiser, x, sigmas, *, generator=None) -> Steps:
    """Pseudo linear multistep (Liu et al. 2022, "Pseudo Numerical Methods for Diffusion Models on
    Manifolds"; PLMS as in CompVis' ``PLMSSampler`` and diffusers' ``PNDMScheduler(skip_prk_steps=True)``).

    Adams-Bashforth (up to 4th order, equal-step weights) on the model's eps, each step then being
    a DDIM (eta=0) step with the combined eps: ``x_next = x + (sigma_next - sigma) * eps``. The
    first step is the 2nd-order predictor-corrector of :func:`_plms_first_eps`; as in the
    references, the history keeps the raw eps of each step's starting point.
    """
    sigmas, sig = _prepare(sigmas, x)
    history: list[Tensor] = []
    for i in range(len(sig) - 1):
        denoised = _denoise(denoiser, x, sigmas[i])
        eps = (x - denoised) / sig[i]
        if history:
            history = [*history[-3:], eps]
            weights = _ADAMS_BASHFORTH[len(history)]
            eps_step = sum(w * e for w, e in zip(weights, reversed(history)))
        else:
            history = [eps]
            eps_step = _plms_first_eps(denoiser, x, eps, sigmas, sig, i)
        denoised = x - sig[i] * eps_step
        x = x + (sig[i + 1] - sig[i]) * eps_step
        yield _info(i, x, sigmas, denoised)


def lms_coefficients(sig: Sequence[float], i: int, order: int) -> list[float]:
    """Weights of the last ``order`` slopes (newest first) for the step ``sig[i] -> sig[i+1]``:
    the integrals over that step of the Lagrange basis polynomials on nodes
    ``sig[i], sig[i-1], ...``. Gauss-Legendre with ``order`` nodes is exact for these polynomials
    of degree ``order - 1``, so no adaptive quadrature (scipy) is needed."""
    nodes = np.array([sig[i - k] for k in range(order)], dtype=np.float64)
    a, b = sig[i], sig[i + 1]
    xg, wg = np.polynomial.legendre.leggauss(order)
    tau = (b - a) / 2 * xg + (a + b) / 2
    coeffs = []
    for j in range(order):
        others = np.delete(nodes, j)
        basis = np.prod((tau[:, None] - others) / (nodes[j] - others), axis=1)
        coeffs.append(float((b - a) / 2 * np.dot(wg, basis)))
    return coeffs


def lms_steps(denoiser, x, sigmas, *, generator=None, order: int = 4) -> Steps:
    """Linear multistep in sigma: the variable-step Adams-Bashforth method (Hairer, Norsett &
    Wanner, "Solving Ordinary Differential Equations I", Sec. III.5) on the probability flow ODE,
    as k-diffusion's ``sample_lms``. The slope is extrapolated by the Lagrange polynomial through
    the last ``order`` slopes and integrated exactly over each step (lower order at the start)."""
    sigmas, sig = _prepare(sigmas, x)
    slopes: list[Tensor] = []
    for i in range(len(sig) - 1):
        denoised = _denoise(denoiser, x, sigmas[i])
        slopes = [*slopes, (x - denoised) / sig[i]][-order:]
        coeffs = lms_coefficients(sig, i, len(slopes))
        x = x + sum(c * d for c, d in zip(coeffs, reversed(slopes)))
        yield _info(i, x, sigmas, denoised)


def dpmpp_2m_steps(denoiser, x, sigmas, *, generator=None, eta: float = 0.0) -> Steps:
    """DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", Algorithm 2) and its SDE variant, midpoint form
    (Sec. 4 and App.; k-diffusion ``sample_dpmpp_2m`` and ``sample_dpmpp_2m_sde``, diffusers ``dpmsolver++``
    and ``sde-dpmsolver++``): one update, the ODE solver at eta = 0.

    An exponential integrator in ``lambda = -log(sigma)`` with the denoised output extrapolated from
    the previous step. The first step, and a step into sigma = 0 (where ``lambda`` is infinite and
    the exact answer of the 1st-order update is simply ``denoised``), are first order. ``eta`` scales
    the injected noise (1 = the reverse SDE). Noise is plain per-step Gaussian from ``generator``
    (k-diffusion uses a Brownian tree, which has the same distribution for a fixed schedule but needs
    torchsde).
    """
    sigmas, sig = _prepare(sigmas, x)
    old, h_last = None, None
    for i in range(len(sig) - 1):
        s, s_next = sig[i], sig[i + 1]
        denoised = _denoise(denoiser, x, sigmas[i])
        if s_next == 0:
            x = denoised
        else:
            h = math.log(s / s_next)
            gain = -math.expm1(-h - eta * h)  # weight of denoised in the exact 1st-order SDE step
            x = (s_next / s) * math.exp(-eta * h) * x + gain * denoised
            if old is not None:
                x = x + 0.5 * gain * (h / h_last) * (denoised - old)
            if eta:
                noise = randn(x.shape, generator, x.device, x.dtype)
                x = x + s_next * math.sqrt(-math.expm1(-2 * eta * h)) * noise
            h_last = h
        old = denoised
        yield _info(i, x, sigmas, denoised)


_STEPS = {
    "ddim": ancestral_steps,
    "plms": plms_steps,
    "euler": euler_steps,
    "euler_a": ancestral_steps,
    "heun": heun_steps,
    "lms": lms_steps,
    "dpmpp_2m": dpmpp_2m_steps,
    "dpmpp_2m_sde": dpmpp_2m_steps,
}
if _STEPS.keys() != FACTS.keys():  # a sampler without code, or code without facts
    raise ImportError(
        f"booth.sampling and booth.options disagree on the samplers: {sorted(_STEPS)} {sorted(FACTS)}"
    )
SAMPLERS: dict[str, Callable[..., Tensor]] = {name: _sampler(name, fn) for name, fn in _STEPS.items()}
sample_ddim, sample_plms, sample_euler, sample_euler_a = (
    SAMPLERS[n] for n in ("ddim", "plms", "euler", "euler_a")
)
sample_heun, sample_lms, sample_dpmpp_2m, sample_dpmpp_2m_sde = (
    SAMPLERS[n] for n in ("heun", "lms", "dpmpp_2m", "dpmpp_2m_sde")
)
