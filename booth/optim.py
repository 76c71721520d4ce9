"""Optimizers torch does not provide in the form DreamBooth recipes need, and the optimizer step fused into the
backward pass.

`Adafactor` (Shazeer & Stern, 2018) keeps, for each matrix, only the running means of g² over its rows and over
its columns, instead of Adam's two full-size moments: for SD1's UNet that is megabytes of optimizer state instead
of 6.9 GB. `torch.optim.Adafactor` (torch >= 2.5) always scales the step by the weight's RMS (a relative step);
DreamBooth and kohya's recipes use an absolute learning rate, so booth has its own, which is the update of
transformers' `Adafactor(scale_parameter=False, relative_step=False, warmup_init=False)` (kohya's setting), with
one change: a conv kernel (O, I, k, k) is factored as the matrix (O, I*k*k). Factoring over its last two
dimensions, as transformers does, would keep O*I*(k + k) values: more than it saves for a 3x3 kernel.

Both optimizers here train bf16 weights with no fp32 copy (`--weights bf16`): the update is computed in fp32
and written back with stochastic rounding (`stochastic_round_`), drawn from a seeded generator so that runs
repeat bit for bit. Their fp32 state stays fp32 when loaded back (`_HalfWeights.load_state_dict`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch


def stochastic_round_(target: torch.Tensor, value: torch.Tensor, generator: torch.Generator | None) -> None:
    """Write fp32 `value` into bf16 `target`, rounding each element up (in magnitude) with probability equal to
    the fraction of a bf16 ulp it is past the value below, so the expected result is `value`: an update smaller
    than half an ulp, which round-to-nearest would lose, moves the weight by the right amount on average.

    bf16 is the top half of fp32, so a uniform 16-bit integer added to the low half before truncation rounds up
    exactly as often as the low half is large. A NaN or inf keeps its top half, so stays a NaN or inf."""
    bits = value.view(torch.int32)
    noise = torch.randint(0, 1 << 16, bits.shape, dtype=torch.int32, device=bits.device, generator=generator)
    finite = value.isfinite()
    # 0xFFFF0000 keeps the top half: a truncation, as an exact conversion of what is left
    rounded = torch.where(finite, bits + noise, bits).bitwise_and_(-65536)
    target.copy_(rounded.view(torch.float32))


def write_back(p: torch.Tensor, weights: torch.Tensor, generator: torch.Generator | None) -> None:
    """Store the updated fp32 `weights` of parameter `p`: in place for fp32, stochastically rounded for bf16
    (round to nearest without a generator or in another dtype)."""
    if weights is p:
        return
    if p.dtype == torch.bfloat16 and generator is not None:
        stochastic_round_(p, weights, generator)
    else:
        p.copy_(weights)


class _HalfWeights(torch.optim.Optimizer):
    """What booth's optimizers share: a step that updates each parameter with a gradient (`_update`), a rounding
    generator, and fp32 state kept fp32 on load."""

    generator: torch.Generator | None = None

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, group)
        return loss

    def _update(self, p: torch.Tensor, group: dict) -> None:
        raise NotImplementedError

    def load_state_dict(self, state_dict: dict) -> None:
        # torch casts floating-point state to its parameter's dtype, which for bf16 weights would round the
        # fp32 moments and break an exact resume; put back the saved tensors as they were
        super().load_state_dict(state_dict)
        ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for i, p in zip(ids, params):
            for key, value in state_dict["state"].get(i, {}).items():
                if torch.is_tensor(value) and value.is_floating_point():
                    self.state[p][key] = value.to(p.device, copy=True)


class AdamW(_HalfWeights):
    """torch.optim.AdamW's update (decoupled weight decay, bias-corrected moments) for bf16 weights: the moments
    are fp32 and the weights are stepped in fp32, then rounded stochastically. booth uses torch's own AdamW for
    fp32 weights, where the two agree to float reordering (tests/test_optim.py)."""

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, generator: torch.Generator | None = None):  # fmt: skip
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.generator = generator

    def _update(self, p: torch.Tensor, group: dict) -> None:
        grad, (beta1, beta2), lr = p.grad.float(), group["betas"], group["lr"]
        state = self.state[p]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(grad)
            state["exp_avg_sq"] = torch.zeros_like(grad)
        state["step"] += 1
        t, m, v = state["step"], state["exp_avg"], state["exp_avg_sq"]
        m.lerp_(grad, 1 - beta1)
        v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        denom = (v.sqrt() / (1 - beta2**t) ** 0.5).add_(group["eps"])
        weights = p.float() if p.dtype != torch.float32 else p
        weights.mul_(1 - lr * group["weight_decay"])
        weights.addcdiv_(m, denom, value=-lr / (1 - beta1**t))
        write_back(p, weights, self.generator)


class Adafactor(_HalfWeights):
    """Adafactor with an absolute learning rate and no first moment. `eps` is added to g² (so that its inverse
    square root is finite); each tensor's update is scaled down to an RMS of at most `clip_threshold`; the second
    moments decay with beta2 = 1 - step**decay_rate."""

    def __init__(self, params: Iterable, lr: float = 1e-5, eps: float = 1e-30, clip_threshold: float = 1.0,
                 decay_rate: float = -0.8, weight_decay: float = 0.0, generator: torch.Generator | None = None):  # fmt: skip
        defaults = dict(lr=lr, eps=eps, clip_threshold=clip_threshold, decay_rate=decay_rate,
                        weight_decay=weight_decay)  # fmt: skip
        super().__init__(params, defaults)
        self.generator = generator

    def _update(self, p: torch.Tensor, group: dict) -> None:
        grad = p.grad.float()
        factored = grad.dim() >= 2
        g = grad.reshape(grad.shape[0], -1) if factored else grad  # conv kernels as (out, in*k*k)
        state = self.state[p]
        if not state:
            state["step"] = 0
            if factored:
                state["row"] = torch.zeros(g.shape[0], dtype=torch.float32, device=g.device)
                state["col"] = torch.zeros(g.shape[1], dtype=torch.float32, device=g.device)
            else:
                state["sq"] = torch.zeros_like(g)
        state["step"] += 1
        beta2 = 1.0 - state["step"] ** group["decay_rate"]  # 0 at the first step: the moments start as g²
        sq = g.square().add_(group["eps"])
        if factored:
            row = state["row"].mul_(beta2).add_(sq.mean(dim=1), alpha=1.0 - beta2)
            col = state["col"].mul_(beta2).add_(sq.mean(dim=0), alpha=1.0 - beta2)
            # V ~ row x col / mean(row); its inverse square root, as two outer factors
            update = (row / row.mean()).rsqrt_().unsqueeze(1) * col.unsqueeze(0).rsqrt()
            update.mul_(g)
        else:
            update = state["sq"].mul_(beta2).add_(sq, alpha=1.0 - beta2).rsqrt().mul_(g)
        rms = update.norm(2) / update.numel() ** 0.5
        update.div_((rms / group["clip_threshold"]).clamp_(min=1.0)).mul_(group["lr"])
        weights = p.float() if p.dtype != torch.float32 else p
        if group["weight_decay"]:
            weights.add_(weights, alpha=-group["weight_decay"] * group["lr"])
        weights.sub_(update.view_as(p))
        write_back(p, weights, self.generator)


class StepInBackward:
    """The optimizer step fused into the backward pass: each parameter is stepped by an optimizer of its own as
    soon as its gradient is complete (`register_post_accumulate_grad_hook`), and the gradient is freed, so the
    gradients of the whole model never coexist.

    What that changes, compared with one step after the backward pass:
    - clipping is per tensor (each gradient to norm `max_norm`, as kohya and OneTrainer do): the global norm is
      not known until every gradient has been computed, and by then most of them are gone;
    - with gradient accumulation only the last micro-batch's backward pass steps (`armed`); the earlier ones
      accumulate as usual, so accumulation then saves no gradient memory;
    - over several processes each gradient is averaged by its own all-reduce before its step (the model is not
      wrapped in DistributedDataParallel, whose bucketed all-reduce would still be running);
    - fp16 loss scaling cannot work: an overflow in the last gradient is found after the others have stepped,
      so the combination is refused where a run is configured.
    `state_dict` holds every parameter's optimizer state, so a resumed run continues bitwise."""

    def __init__(self, params: list[torch.Tensor], make: Callable[[list], torch.optim.Optimizer],
                 max_norm: float = 0.0, world: int = 1):  # fmt: skip
        self.max_norm, self.world, self.armed = max_norm, world, True
        self.optimizers = [make([p]) for p in params]
        self._handles = [
            p.register_post_accumulate_grad_hook(self._hook(o)) for p, o in zip(params, self.optimizers)
        ]

    def _hook(self, optimizer: torch.optim.Optimizer) -> Callable[[torch.Tensor], None]:
        def step(p: torch.Tensor) -> None:
            if not self.armed:
                return
            if self.world > 1:
                torch.distributed.all_reduce(p.grad)
                p.grad /= self.world
            if self.max_norm:
                torch.nn.utils.clip_grad_norm_([p], self.max_norm)
            optimizer.step()
            p.grad = None

        return step

    @property
    def param_groups(self) -> list[dict]:
        return [g for o in self.optimizers for g in o.param_groups]

    def state_dict(self) -> dict:
        return {"per_parameter": [o.state_dict() for o in self.optimizers]}

    def load_state_dict(self, state: dict) -> None:
        states = state["per_parameter"]
        if len(states) != len(self.optimizers):
            raise ValueError(
                f"the state holds {len(states)} parameters' optimizers, this run {len(self.optimizers)}"
            )
        for optimizer, s in zip(self.optimizers, states):
            optimizer.load_state_dict(s)

    def close(self) -> None:
        """Remove the hooks, so that the parameters train normally again."""
        for handle in self._handles:
            handle.remove()
