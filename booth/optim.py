"""Optimizers torch does not provide in the form DreamBooth recipes need.

`Adafactor` (Shazeer & Stern, 2018) keeps, for each matrix, only the running means of g² over its rows and over
its columns, instead of Adam's two full-size moments: for SD1's UNet that is megabytes of optimizer state instead
of 6.9 GB. `torch.optim.Adafactor` (torch >= 2.5) always scales the step by the weight's RMS (a relative step);
DreamBooth and kohya's recipes use an absolute learning rate, so booth has its own, which is the update of
transformers' `Adafactor(scale_parameter=False, relative_step=False, warmup_init=False)` (kohya's setting), with
one change: a conv kernel (O, I, k, k) is factored as the matrix (O, I*k*k). Factoring over its last two
dimensions, as transformers does, would keep O*I*(k + k) values: more than it saves for a 3x3 kernel.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


class Adafactor(torch.optim.Optimizer):
    """Adafactor with an absolute learning rate and no first moment. `eps` is added to g² (so that its inverse
    square root is finite); each tensor's update is scaled down to an RMS of at most `clip_threshold`; the second
    moments decay with beta2 = 1 - step**decay_rate."""

    def __init__(self, params: Iterable, lr: float = 1e-5, eps: float = 1e-30, clip_threshold: float = 1.0,
                 decay_rate: float = -0.8, weight_decay: float = 0.0):  # fmt: skip
        defaults = dict(lr=lr, eps=eps, clip_threshold=clip_threshold, decay_rate=decay_rate,
                        weight_decay=weight_decay)  # fmt: skip
        super().__init__(params, defaults)

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
        if weights is not p:
            p.copy_(weights)
