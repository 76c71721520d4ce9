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
