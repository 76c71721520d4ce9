"""booth.optim.Adafactor against transformers' Adafactor (the oracle) with kohya's absolute-step settings."""

import pytest
import torch

from booth.optim import Adafactor


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
        p.grad = g.clone()
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
