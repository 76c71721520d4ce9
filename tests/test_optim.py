"""booth.optim: Adafactor against transformers' Adafactor (the oracle) with kohya's absolute-step settings, AdamW
for bf16 weights against torch's AdamW, stochastic rounding against its closed form, and the step fused into the
backward pass against the plain step."""

import pytest
import torch

from booth.optim import Adafactor, AdamW, stochastic_round_


def reference(params, lr):
    from transformers.optimization import Adafactor as HFAdafactor

    return HFAdafactor(params, lr=lr, scale_parameter=False, relative_step=False, warmup_init=False)


def grads(shape, steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    # gradients of very different scales per row, so the factored moments matter
    return [torch.randn(shape, generator=g) * torch.logspace(-3, 1, shape[0]).reshape(-1, *[1] * (len(shape) - 1))
            for _ in range(steps)]  # fmt: skip


def run(opt_cls, param, gs, **kw):
    p = torch.nn.Parameter(param.clone())
    opt = opt_cls([p], **kw)
    for g in gs:
        p.grad = g.to(p.dtype, copy=True)
        opt.step()
    return p.detach(), opt


@pytest.mark.parametrize("shape", [(16, 24), (40,), (8, 1)])
def test_matrices_and_vectors_step_as_transformers_adafactor(shape):
    param, gs = torch.randn(shape, generator=torch.Generator().manual_seed(1)), grads(shape, 6)
    ours, _ = run(Adafactor, param, gs, lr=1e-2)
    theirs, _ = run(reference, param, gs, lr=1e-2)
    assert torch.equal(ours, theirs)
    assert not torch.equal(ours, param)


def test_a_conv_kernel_is_factored_as_out_by_in_times_k_times_k():
    shape = (12, 6, 3, 3)
    param, gs = torch.randn(shape, generator=torch.Generator().manual_seed(2)), grads(shape, 5)
    ours, opt = run(Adafactor, param, gs, lr=1e-2)
    # transformers' update on the same numbers seen as the (12, 54) matrix
    theirs, _ = run(reference, param.reshape(12, 54), [g.reshape(12, 54) for g in gs], lr=1e-2)
    assert torch.equal(ours, theirs.reshape(shape))
    state = opt.state[opt.param_groups[0]["params"][0]]
    assert sum(v.numel() for v in state.values() if torch.is_tensor(v)) == 12 + 6 * 3 * 3  # Adam: 2 * 648
    # factoring over the last two dimensions instead, as transformers does for a 4-d tensor, keeps more
    _, hf = run(reference, param, gs, lr=1e-2)
    hf_state = hf.state[hf.param_groups[0]["params"][0]]
    assert sum(v.numel() for k, v in hf_state.items() if k.startswith("exp_avg_sq")) == 12 * 6 * (3 + 3)


def reference_with_decay(params, lr):
    from transformers.optimization import Adafactor as HFAdafactor

    return HFAdafactor(params, lr=lr, scale_parameter=False, relative_step=False, warmup_init=False,
                       weight_decay=0.1)  # fmt: skip


def test_weight_decay_and_half_precision_weights_follow_transformers():
    shape = (10, 7)
    param, gs = torch.randn(shape, generator=torch.Generator().manual_seed(3)), grads(shape, 4)
    ours, _ = run(Adafactor, param, gs, lr=1e-2, weight_decay=0.1)
    assert torch.equal(ours, run(reference_with_decay, param, gs, lr=1e-2)[0])
    assert not torch.equal(ours, run(Adafactor, param, gs, lr=1e-2)[0])
    half, _ = run(Adafactor, param.bfloat16(), [g.bfloat16() for g in gs], lr=1e-2)
    half_ref, _ = run(reference, param.bfloat16(), [g.bfloat16() for g in gs], lr=1e-2)
    assert half.dtype == torch.bfloat16 and torch.equal(half, half_ref)


def test_the_update_is_clipped_to_rms_one_times_the_learning_rate():
    """A first step's update is g / |g| elementwise for a vector: RMS 1, whatever the gradient's scale."""
    for scale in (1e-6, 1.0, 1e6):
        p, _ = run(Adafactor, torch.zeros(50), [torch.randn(50, generator=torch.Generator().manual_seed(4)) * scale],
                   lr=0.5)  # fmt: skip
        assert torch.allclose(p.norm() / 50**0.5, torch.tensor(0.5), rtol=1e-5)


def test_a_saved_and_loaded_state_continues_bitwise():
    shape = (9, 5, 3, 3)
    param, gs = torch.randn(shape, generator=torch.Generator().manual_seed(5)), grads(shape, 6)
    whole, _ = run(Adafactor, param, gs, lr=1e-2)
    half, opt = run(Adafactor, param, gs[:3], lr=1e-2)
    p = torch.nn.Parameter(half.clone())
    resumed = Adafactor([p], lr=1e-2)
    resumed.load_state_dict(opt.state_dict())
    for g in gs[3:]:
        p.grad = g.clone()
        resumed.step()
    assert torch.equal(p.detach(), whole)


# ----------------------------------------------------------------------------- bf16 weights


def neighbours(x: float) -> tuple[float, float, float]:
    """(bf16 below x, bf16 above x, bf16 ulp there), from the bits, for a positive x that is not a bf16."""
    bits = torch.tensor([x], dtype=torch.float32).view(torch.int32).item()
    low = torch.tensor([bits & -65536], dtype=torch.int32).view(torch.float32).item()
    high = torch.tensor([(bits & -65536) + 65536], dtype=torch.int32).view(torch.float32).item()
    return low, high, high - low


@pytest.mark.parametrize("x", [1.0 + 2**-9, 0.3, -7.77e-3, 1234.5678])
def test_stochastic_rounding_lands_on_the_two_neighbours_with_the_mean_of_the_value(x):
    n = 200_000
    out = torch.empty(n, dtype=torch.bfloat16)
    stochastic_round_(out, torch.full((n,), x), torch.Generator().manual_seed(0))
    low, high, ulp = neighbours(abs(x))
    low, high = (low, high) if x > 0 else (-high, -low)
    values = out.float()
    assert set(values.unique().tolist()) == {low, high}
    frac = (x - low) / ulp  # P(high) of an unbiased rounding
    sigma = ulp * (frac * (1 - frac) / n) ** 0.5  # the standard error of the mean of n such draws
    assert abs(values.double().mean().item() - x) < 5 * sigma


def test_a_sub_ulp_update_repeated_moves_the_weight_by_the_right_total():
    n, step = 10_000, -1e-4  # bf16's ulp is 2**-8 just under 1: each step is 1/39 of it
    sr = torch.ones(n, dtype=torch.bfloat16)
    nearest = torch.ones(n, dtype=torch.bfloat16)
    gen = torch.Generator().manual_seed(1)
    for _ in range(1000):
        stochastic_round_(sr, sr.float() + step, gen)
        nearest.copy_(nearest.float() + step)
    assert torch.equal(nearest, torch.ones(n, dtype=torch.bfloat16))  # round to nearest never moves
    # 1000 draws of a rounding whose error has standard deviation at most ulp/2 each: the mean over n weights
    # lands within a few 1e-5 of 1 - 0.1
    assert abs(sr.float().mean().item() - 0.9) < 1e-3


def test_stochastic_rounding_repeats_with_the_seed_and_keeps_non_finite_values():
    x = torch.randn(1000, generator=torch.Generator().manual_seed(2))
    x[:3] = torch.tensor([float("inf"), float("-inf"), float("nan")])
    a, b, c = (torch.empty(1000, dtype=torch.bfloat16) for _ in range(3))
    stochastic_round_(a, x, torch.Generator().manual_seed(3))
    stochastic_round_(b, x, torch.Generator().manual_seed(3))
    stochastic_round_(c, x, torch.Generator().manual_seed(4))
    assert torch.equal(a.view(torch.int16), b.view(torch.int16)) and not torch.equal(a, c)
    assert a[0] == float("inf") and a[1] == float("-inf") and a[2].isnan()
    # exact bf16 values have nothing to round
    exact = x[3:].bfloat16().float()
    stochastic_round_(c[3:], exact, torch.Generator().manual_seed(5))
    assert torch.equal(c[3:].float(), exact)


def test_booth_adamw_on_fp32_weights_is_torch_adamw():
    shape = (12, 5)
    param, gs = torch.randn(shape, generator=torch.Generator().manual_seed(6)), grads(shape, 8)
    kw = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)
    ours, _ = run(AdamW, param, gs, **kw)
    theirs, _ = run(torch.optim.AdamW, param, gs, foreach=False, **kw)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)
    assert not torch.equal(ours, param)


@pytest.mark.parametrize("opt_cls", [AdamW, Adafactor])
def test_bf16_weights_follow_the_fp32_run_on_average_where_rounding_to_nearest_stalls(opt_cls):
    """Weights near 1 and a learning rate whose updates are a fraction of bf16's ulp: the fp32 run moves them,
    round-to-nearest bf16 leaves them where they started, stochastic rounding follows the fp32 run."""
    n, lr = 4096, 2e-4  # each update is at most lr (Adam's normalised step): 1/20 of the ulp at 1
    start = 1 + 0.001 * torch.randn(n, generator=torch.Generator().manual_seed(7))
    start = start.bfloat16().float()
    gs = [
        torch.ones(n) + 0.1 * torch.randn(n, generator=torch.Generator().manual_seed(8 + i))
        for i in range(200)
    ]
    fp32, _ = run(opt_cls, start, gs, lr=lr)
    nearest, _ = run(opt_cls, start.bfloat16(), gs, lr=lr)
    sr, _ = run(opt_cls, start.bfloat16(), gs, lr=lr, generator=torch.Generator().manual_seed(9))
    moved = (start - fp32).mean().item()
    assert moved > 0.02  # about 200 steps of lr
    assert torch.equal(nearest.float(), start)
    assert abs((start - sr.float()).mean().item() - moved) < 0.02 * moved


@pytest.mark.parametrize("opt_cls", [AdamW, Adafactor])
def test_a_bf16_run_resumes_bitwise_with_its_fp32_state_and_generator(opt_cls):
    shape = (9, 5, 3, 3)
    param, gs = torch.randn(shape, generator=torch.Generator().manual_seed(10)).bfloat16(), grads(shape, 6)
    whole, _ = run(opt_cls, param, gs, lr=1e-2, generator=torch.Generator().manual_seed(11))
    gen = torch.Generator().manual_seed(11)
    half, opt = run(opt_cls, param, gs[:3], lr=1e-2, generator=gen)
    saved, rng = opt.state_dict(), gen.get_state()
    assert {v.dtype for v in saved["state"][0].values() if torch.is_tensor(v)} == {torch.float32}
    p = torch.nn.Parameter(half.clone())
    resumed = opt_cls([p], lr=1e-2, generator=torch.Generator().set_state(rng))
    resumed.load_state_dict(saved)
    assert {v.dtype for v in resumed.state[p].values() if torch.is_tensor(v)} == {torch.float32}  # not bf16
    for g in gs[3:]:
        p.grad = g.bfloat16()
        resumed.step()
    assert torch.equal(p.detach().view(torch.int16), whole.view(torch.int16))


# ----------------------------------------------------------------------------- the step fused into backward


def mlp(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.GELU(), torch.nn.Linear(16, 16), torch.nn.GELU(),
                               torch.nn.Linear(16, 3))  # fmt: skip


def batches(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 6, generator=g), torch.randn(4, 3, generator=g)) for _ in range(n)]


def adamw(params):
    return torch.optim.AdamW(params, lr=1e-2, weight_decay=1e-2, foreach=False)


def loss_of(model, batch):
    x, y = batch
    return torch.nn.functional.mse_loss(model(x), y)


def plain_run(data, accum=1, clip_each=0.0):
    """The reference: one optimizer stepped after the backward pass (per-tensor clipping done by hand)."""
    model = mlp()
    opt = adamw(list(model.parameters()))
    for k in range(0, len(data), accum):
        for batch in data[k : k + accum]:
            (loss_of(model, batch) / accum).backward()
        for p in model.parameters():
            if clip_each:
                torch.nn.utils.clip_grad_norm_([p], clip_each)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model


def fused_run(data, accum=1, max_norm=0.0, state=None, start=0):
    from booth.optim import StepInBackward

    model = mlp()
    if state is not None:
        model.load_state_dict(state["model"])
    fused = StepInBackward(list(model.parameters()), adamw, max_norm)
    if state is not None:
        fused.load_state_dict(state["optimizer"])
    for k in range(start, len(data), accum):
        for i, batch in enumerate(data[k : k + accum]):
            fused.armed = i == accum - 1
            (loss_of(model, batch) / accum).backward()
    return model, fused


def same_weights(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))


def test_the_fused_step_gives_the_plain_steps_weights():
    data = batches(4)
    model, _ = fused_run(data)
    assert same_weights(model, plain_run(data))
    assert not same_weights(model, mlp())
    assert all(p.grad is None for p in model.parameters()), "every gradient is freed once used"


def test_the_gradients_of_the_whole_model_never_coexist():
    from booth.optim import StepInBackward

    model = mlp()
    params = list(model.parameters())
    live = []
    for p in params:  # registered first, so it runs before the step frees this gradient
        p.register_post_accumulate_grad_hook(lambda _: live.append(sum(q.grad is not None for q in params)))
    StepInBackward(params, adamw)
    loss_of(model, batches(1)[0]).backward()
    assert len(live) == len(params) and max(live) == 1, live
    live.clear()
    for p in params:
        p.grad = None
    model2 = mlp()  # without the fused step, all of them are alive by the end
    params2 = list(model2.parameters())
    for p in params2:
        p.register_post_accumulate_grad_hook(lambda _: live.append(sum(q.grad is not None for q in params2)))
    loss_of(model2, batches(1)[0]).backward()
    assert max(live) == len(params2)


def test_fused_clipping_is_per_tensor_and_accumulation_steps_once():
    data = batches(6)
    model, _ = fused_run(data, max_norm=0.05)
    assert same_weights(model, plain_run(data, clip_each=0.05))
    assert not same_weights(model, plain_run(data))
    model, _ = fused_run(data, accum=3)
    # accumulated gradients sum in another order than one backward of the whole: equal to rounding
    for a, b in zip(model.parameters(), plain_run(data, accum=3).parameters()):
        assert torch.allclose(a, b, atol=1e-6)


def test_a_fused_run_resumes_bitwise():
    data = batches(6)
    whole, _ = fused_run(data)
    part, fused = fused_run(data[:3])
    state = {"model": part.state_dict(), "optimizer": fused.state_dict()}
    resumed, _ = fused_run(data, state=state, start=3)
    assert same_weights(resumed, whole)
    fused.close()
    loss_of(part, data[0]).backward()
    assert all(p.grad is not None for p in part.parameters()), "close() removes the hooks"


def test_the_fused_step_works_under_gradient_checkpointing_and_with_adafactor():
    """Recomputed activations accumulate the same gradients; the hook fires once they are complete."""
    from torch.utils.checkpoint import checkpoint

    from booth.optim import StepInBackward

    def checkpointed_loss(model, batch):
        x, y = batch
        h = checkpoint(model[:4], x, use_reentrant=False)
        return torch.nn.functional.mse_loss(model[4](h), y)

    data = batches(3)
    make = lambda ps: Adafactor(ps, lr=1e-2)  # noqa: E731
    plain, fused = mlp(), mlp()
    opt = make(list(plain.parameters()))
    StepInBackward(list(fused.parameters()), make)
    for batch in data:
        loss_of(plain, batch).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        checkpointed_loss(fused, batch).backward()
    assert same_weights(plain, fused) and not same_weights(plain, mlp())
