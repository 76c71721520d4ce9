"""DreamBooth: the loss, gradients against diffusers, checkpoints other tools read, exact resume, DDP, bad input."""

import contextlib
import dataclasses
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import safetensors.torch
import torch
from helpers import (
    diffusers_unet,
    dreambooth_argv,
    error_of,
    interrupt_once_logged,
    interrupt_when,
    ldm_original_config,
    perturb_norms,
    read_jsonl,
)

from booth.checkpoint import UNET, read_checkpoint, save_checkpoint
from booth.cli import main
from booth.config import TINY
from booth.formats import safetensors_metadata
from booth.model import random_weights
from booth.train import dreambooth_loss, min_snr_weights, pyramid_noise

DOG = Path(__file__).parent / "data" / "dog"
FAST = ["--hw", "32", "32", "--class-img-count", "4", "--gb", "4", "--ddim-steps", "2", "--seed", "3"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny base model saved in fp16, as SD checkpoints usually are."""
    model = random_weights(TINY, seed=11)
    perturb_norms(model)
    path = tmp_path_factory.mktemp("base") / "base.safetensors"
    save_checkpoint(model.state_dict(), path, dtype=torch.float16)
    return path


def dreambooth(base, out, *args, expect=0):
    code = main(dreambooth_argv(base, out, *FAST, *args))
    assert code == expect
    return out


def unet_of(path):
    return {k: v for k, v in read_checkpoint(path).state_dict.items() if k.startswith(UNET)}


def metrics(run):
    return read_jsonl(run / "metrics.jsonl")


def whole_and_resumed(base, tmp_path, total: int, first: int, *args, name: str = "whole"):
    """A run of `total` steps in tmp_path/name, and one stopped after `first` and continued with -r in
    tmp_path/part; their last checkpoints are asserted to be the same bytes. Returns both run folders."""
    whole = dreambooth(base, tmp_path / name, "--iterations", str(total), *args) / "run0"
    part = dreambooth(base, tmp_path / "part", "--iterations", str(first), *args) / "run0"
    assert main(["dreambooth", "-r", str(part), "--iterations", str(total)]) == 0
    last = f"step-{total:06d}.safetensors"
    assert (whole / "ckpts" / last).read_bytes() == (part / "ckpts" / last).read_bytes()
    return whole, part


def test_prefetched_batches_are_the_same_batches_and_resume_bitwise(base, tmp_path, monkeypatch):
    """On a GPU the next batch is augmented on a worker thread while the step runs (booth.train.prefetch); here
    it is turned on for the CPU. Same weights as without it, and -r continues it exactly."""
    import booth.train

    common = ["-l", "1", "--iterations", "3"]
    plain = dreambooth(base, tmp_path / "plain", *common) / "run0"
    monkeypatch.setattr(booth.train, "prefetch", lambda device: True)
    seen = []
    real = booth.train.Batches._draw
    monkeypatch.setattr(
        booth.train.Batches,
        "_draw",
        lambda self, *a: seen.append(threading.current_thread().name) or real(self, *a),
    )
    whole, _ = whole_and_resumed(base, tmp_path, 3, 1, "-l", "1", name="ahead")
    last = "ckpts/step-000003.safetensors"
    assert (whole / last).read_bytes() == (plain / last).read_bytes()
    assert any(name.startswith("booth-batches") for name in seen)  # it did draw ahead on the worker


def test_every_run_prints_its_memory_forecast_and_goes_on_without_one(base, tmp_path, capsys, monkeypatch):
    import booth.train

    dreambooth(base, tmp_path / "a", "--iterations", "1", "-l", "0")
    assert re.search(r"booth: this run needs about [0-9.]+ GB on cpu \(weights", capsys.readouterr().err)

    def untraceable(*a, **k):
        raise RuntimeError("aten::something has no meta kernel\nmore")

    monkeypatch.setattr(booth.train, "forecast", untraceable)
    dreambooth(base, tmp_path / "b", "--iterations", "1", "-l", "0")  # the forecast only advises
    assert (
        "booth: warning: no memory forecast (aten::something has no meta kernel)" in capsys.readouterr().err
    )


# ----------------------------------------------------------------------------- the loss


def test_loss_matches_a_hand_computation():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(4, 4, 3, 3, generator=g), torch.randn(4, 4, 3, 3, generator=g)
    sq = [((pred[i] - target[i]) ** 2).sum().item() / 36 for i in range(4)]
    inst, prior = (sq[0] + sq[1]) / 2, (sq[2] + sq[3]) / 2
    for lamb in (0.0, 0.5, 1.0):
        loss, i, p = dreambooth_loss(pred, target, 2, lamb)
        assert i.item() == pytest.approx(inst) and p.item() == pytest.approx(prior)
        assert loss.item() == pytest.approx(inst + lamb * prior)
    # lambda = 0: the class rows cannot change the loss, whatever they hold
    changed = pred.clone()
    changed[2:] += 100
    assert dreambooth_loss(changed, target, 2, 0.0)[0].item() == pytest.approx(inst)
    # without class rows the prior term is zero
    assert dreambooth_loss(pred[:2], target[:2], 2, 1.0)[2].item() == 0.0


def test_min_snr_weights():
    ac = torch.tensor([0.99, 0.5, 0.01])  # SNR = ac / (1 - ac): 99, 1, 0.0101
    assert torch.allclose(min_snr_weights(ac, 5.0), torch.tensor([5 / 99, 1.0, 1.0]))


def test_gradients_match_diffusers():
    """One training step's gradients: our UNet and diffusers' UNet2DConditionModel on the same everything."""
    from diffusers.loaders.single_file_utils import (
        convert_ldm_unet_checkpoint,
        create_unet_diffusers_config_from_ldm,
    )

    model = random_weights(TINY, seed=4)
    perturb_norms(model)
    ref = diffusers_unet(model).train()
    ours = model.unet.train().requires_grad_(True)
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(3, 4, 16, 16, generator=g), torch.randn(3, 4, 16, 16, generator=g)
    t = torch.tensor([5, 500, 990])
    ctx = torch.randn(3, 77, 128, generator=g)
    ac = torch.linspace(0.99, 0.01, 1000)[t].view(-1, 1, 1, 1)
    noisy = ac.sqrt() * x0 + (1 - ac).sqrt() * noise
    dreambooth_loss(ours(noisy, t.float(), ctx), noise, 1, 1.0)[0].backward()
    dreambooth_loss(ref(noisy, t, encoder_hidden_states=ctx).sample, noise, 1, 1.0)[0].backward()
    grads = {UNET + k: p.grad for k, p in ours.named_parameters()}
    sd = {k: v for k, v in model.state_dict().items() if k.startswith(UNET)}
    config = create_unet_diffusers_config_from_ldm(ldm_original_config(model.config), sd, image_size=256)
    ours_as_diffusers = convert_ldm_unet_checkpoint(grads, config)
    theirs = dict(ref.named_parameters())
    assert ours_as_diffusers.keys() == theirs.keys()
    for k, grad in ours_as_diffusers.items():
        ref_grad = theirs[k].grad
        scale = ref_grad.abs().max().clamp(min=1e-6)
        assert (grad - ref_grad).abs().max() <= 1e-4 * scale + 1e-7, k


# ----------------------------------------------------------------------------- training runs


def test_instance_loss_goes_down_and_prior_loss_counts(base, tmp_path):
    run = dreambooth(base, tmp_path / "a", "--iterations", "30", "--learning-rate", "1e-3", "-l", "0",
                     "--no-random-resize", "--no-color-jitter", "--batch-size", "2")  # fmt: skip
    m = metrics(run / "run0")
    first, last = sum(r["instance_loss"] for r in m[:5]) / 5, sum(r["instance_loss"] for r in m[-5:]) / 5
    assert last < 0.8 * first, (first, last)
    assert all(r["prior_loss"] == 0 and r["loss"] == r["instance_loss"] for r in m), "lambda 0: no prior term"
    assert not (run / "run0" / "class-imgs").exists(), "lambda 0 needs no class images"
    run = dreambooth(base, tmp_path / "b", "--iterations", "2", "-l", "0.5")
    for r in metrics(run / "run0"):
        assert r["prior_loss"] > 0 and r["loss"] == pytest.approx(r["instance_loss"] + 0.5 * r["prior_loss"])
    assert len(list((run / "run0" / "class-imgs").glob("*.png"))) == 4


def test_checkpoint_is_a_complete_sd1_file_diffusers_reads(base, tmp_path):
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        convert_ldm_unet_checkpoint,
        create_unet_diffusers_config_from_ldm,
    )

    run = dreambooth(base, tmp_path, "--iterations", "2", "--learning-rate", "1e-4") / "run0"
    path = run / "ckpts" / "step-000002.safetensors"
    ckpt = read_checkpoint(path)
    base_sd = read_checkpoint(base).state_dict
    assert ckpt.state_dict.keys() == base_sd.keys()
    changed = [k for k in base_sd if not torch.equal(base_sd[k], ckpt.state_dict[k])]
    assert changed and all(k.startswith(UNET) for k in changed), "only the UNet trains without -t"
    meta = ckpt.metadata
    assert meta["booth.step"] == "2" and meta["booth.instance_prompt"] == "a sks dog"
    assert json.loads(meta["booth.train"])["learning_rate"] == 1e-4
    # diffusers' own converter makes a UNet of it that computes what booth's does
    sd = {k: v.float() for k, v in ckpt.state_dict.items() if k.startswith(UNET)}
    config = create_unet_diffusers_config_from_ldm(ldm_original_config(ckpt.config), sd, image_size=256)
    ref = UNet2DConditionModel(**config)
    ref.load_state_dict(convert_ldm_unet_checkpoint(sd, config), strict=True)
    model = random_weights(TINY)
    model.load_state_dict({k: v.float() for k, v in ckpt.state_dict.items()})
    x, t, ctx = torch.randn(1, 4, 8, 8), torch.tensor([300.0]), torch.randn(1, 77, 128)
    with torch.no_grad():
        assert torch.allclose(model.unet(x, t, ctx), ref(x, t, encoder_hidden_states=ctx).sample, atol=1e-5)
    # and the file renders with txt2img
    assert main(["txt2img", "-c", str(run / "ckpts"), "-p", "a sks dog", "--hw", "16", "16", "--steps", "2",
                 "-o", str(tmp_path / "img")]) == 0  # fmt: skip


def test_text_encoder_trains_with_t(base, tmp_path):
    run = dreambooth(base, tmp_path, "--iterations", "2", "--learning-rate", "1e-3", "-t", "-l", "0") / "run0"
    ckpt = read_checkpoint(run / "ckpts" / "step-000002.safetensors").state_dict
    base_sd = read_checkpoint(base).state_dict
    te = [k for k in base_sd if k.startswith("cond_stage_model.") and not torch.equal(base_sd[k], ckpt[k])]
    vae = [k for k in base_sd if k.startswith("first_stage_model.") and not torch.equal(base_sd[k], ckpt[k])]
    assert te and not vae


def test_resume_from_any_save_point_is_bitwise_identical(base, tmp_path):
    common = ["--save-precision", "fp32", "--learning-rate", "1e-3", "-s", "2"]
    whole = dreambooth(base, tmp_path / "whole", "--iterations", "6", *common) / "run0"
    part = dreambooth(base, tmp_path / "part", "--iterations", "2", *common) / "run0"
    assert main(["dreambooth", "-r", str(part), "--iterations", "4"]) == 0
    assert main(["dreambooth", "-r", str(part), "--iterations", "6"]) == 0
    for step in (2, 4, 6):  # the same bytes: the weights, and the metadata in a fixed order
        a, b = (r / "ckpts" / f"step-{step:06d}.safetensors" for r in (whole, part))
        assert a.read_bytes() == b.read_bytes(), f"step {step} differs"
    assert [r["step"] for r in metrics(part)] == list(range(1, 7))
    assert [r["loss"] for r in metrics(part)] == [r["loss"] for r in metrics(whole)]
    assert [p.name for p in (part / "state").iterdir()] == ["step-000006.pt"], "only the newest state is kept"


def test_adafactor_trains_resumes_bitwise_and_keeps_factored_moments(base, tmp_path):
    common = ["--save-precision", "fp32", "--learning-rate", "1e-3", "-s", "2", "--optimizer", "adafactor"]
    whole, part = whole_and_resumed(base, tmp_path, 4, 2, *common)
    name = "step-000004.safetensors"
    assert unet_of(whole / "ckpts" / name).keys() == unet_of(base).keys()
    assert any(not torch.equal(a, b) for a, b in zip(unet_of(whole / "ckpts" / name).values(),
                                                     unet_of(base).values()))  # fmt: skip
    state = torch.load(part / "state" / "step-000004.pt", weights_only=True)
    moments = sum(
        v.numel() for s in state["optimizer"]["state"].values() for v in s.values() if torch.is_tensor(v)
    )
    weights = sum(v.numel() for v in unet_of(base).values())
    assert moments < weights / 5, (moments, weights)  # AdamW keeps 2 * weights


def env():
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def test_ctrl_c_saves_a_state_and_resume_finishes_identically(base, tmp_path):
    args = ["--save-precision", "fp32", "--learning-rate", "1e-3", "--iterations", "40", "-l", "0"]
    whole = dreambooth(base, tmp_path / "whole", *args) / "run0"
    cmd = [sys.executable, "-m", "booth", *dreambooth_argv(base, tmp_path / "cut", *FAST, *args)]
    code, err = interrupt_once_logged(cmd, tmp_path / "cut" / "run0" / "metrics.jsonl", timeout=120)
    assert code == 130, err
    assert "continue with: booth dreambooth -r" in err and "Traceback" not in err
    cut = tmp_path / "cut" / "run0"
    stopped = len(metrics(cut))
    assert 3 <= stopped < 40 and (cut / "state" / f"step-{stopped:06d}.pt").exists()
    assert main(["dreambooth", "-r", str(cut)]) == 0
    a, b = (unet_of(r / "ckpts" / "step-000040.safetensors") for r in (whole, cut))
    assert all(torch.equal(a[k], b[k]) for k in a)


TORCH_DISK_FULL = "[enforce fail at inline_container.cc:603] . PytorchStreamWriter failed writing file data/0: file write failed"


def full_disk(monkeypatch, where: str) -> None:
    """Make one of the writes a run does fail as it does on a full disk: the checkpoint (booth's safetensors writer,
    an OSError), the training state (torch.save, a RuntimeError that does not say why), or the metrics log."""
    if where == "checkpoint":

        def write(tensors, filename, metadata=None, dtypes=None, finite=False):
            Path(filename).write_bytes(b"partial")
            raise OSError(28, "No space left on device")

        monkeypatch.setattr("booth.checkpoint.write_safetensors", write)
    elif where == "state":

        def save(obj, f):
            Path(f).write_bytes(b"partial")
            raise RuntimeError(TORCH_DISK_FULL)

        monkeypatch.setattr("booth.train.torch.save", save)
        monkeypatch.setattr(
            "booth.atomic.shutil.disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9, 0)
        )
    else:
        real = open

        def full_open(file, mode="r", *a, **k):
            if str(file).endswith("metrics.jsonl") and "a" in mode:
                f = real(file, mode, *a, **k)
                f.write('{"step": 3, "loss": 0.1')  # a torn line, as a full disk leaves it
                f.close()
                raise OSError(28, "No space left on device")
            return real(file, mode, *a, **k)

        monkeypatch.setattr("builtins.open", full_open)


@pytest.mark.parametrize("where", ["checkpoint", "state", "metrics"])
def test_a_full_disk_keeps_earlier_files_and_resume_carries_on(base, tmp_path, monkeypatch, capsys, where):
    run = dreambooth(base, tmp_path, "--iterations", "2", "-s", "2") / "run0"
    before = (run / "ckpts" / "step-000002.safetensors").read_bytes()
    full_disk(monkeypatch, where)
    assert main(["dreambooth", "-r", str(run), "--iterations", "4"]) == 1
    message = error_of(capsys)
    assert "the disk is full" in message and f"continue with booth dreambooth -r {run}" in message, message
    monkeypatch.undo()
    assert sorted(p.name for p in (run / "ckpts").iterdir()) == ["step-000002.safetensors"] + (
        ["step-000004.safetensors"] if where == "state" else []
    )
    assert (run / "ckpts" / "step-000002.safetensors").read_bytes() == before
    assert sorted(p.name for p in (run / "state").iterdir()) == ["step-000002.pt"], "no temporary left behind"
    assert main(["dreambooth", "-r", str(run), "--iterations", "4"]) == 0  # and it carries on
    assert [r["step"] for r in metrics(run)] == [1, 2, 3, 4], "the torn line and the redone steps are gone"


def test_nan_loss_stops_with_a_clear_message(base, tmp_path, monkeypatch, capsys):
    import booth.train

    real = booth.train.dreambooth_loss
    calls = []

    def poisoned(*a, **k):
        out = real(*a, **k)
        if a[0].is_meta:  # the memory forecast's trace of a step, before the run
            return out
        calls.append(1)
        return (out[0] * float("nan"), *out[1:]) if len(calls) > 2 else out

    monkeypatch.setattr(booth.train, "dreambooth_loss", poisoned)
    dreambooth(base, tmp_path, "--iterations", "5", "-s", "2", "-l", "0", expect=1)
    err = capsys.readouterr().err
    assert "loss became nan at step 3" in err and "step-000002.safetensors" in err
    assert read_checkpoint(tmp_path / "run0" / "ckpts" / "step-000002.safetensors")


@pytest.mark.parametrize("lora", [[], ["--lora", "4"]], ids=["full", "lora"])
def test_the_fused_step_trains_as_the_plain_one_and_resumes_bitwise(base, tmp_path, lora):
    """Without clipping the fused step is the same arithmetic, parameter by parameter."""
    common = ["--save-precision", "fp32", "--learning-rate", "1e-3", "-s", "2", "--max-grad-norm", "0", *lora]
    plain = dreambooth(base, tmp_path / "plain", "--iterations", "4", *common) / "run0"
    fused, _ = whole_and_resumed(base, tmp_path, 4, 2, "--fused-backward", *common, name="fused")
    name = "step-000004.safetensors"
    a, b = (safetensors.torch.load_file(r / "ckpts" / name) for r in (plain, fused))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in metrics(plain)] == [r["loss"] for r in metrics(fused)]
    assert json.loads(safetensors_metadata(fused / "ckpts" / name)["booth.train"])["fused_backward"] is True


def test_split_prior_trains_as_one_batch_with_half_the_activations_and_resumes_bitwise(base, tmp_path):
    """The class rows' pass after the instance rows' gives the same losses at every step (AdamW then amplifies
    the rounding of the gradients' sums, whose order differs, in the weights of near-zero gradient, so those are
    compared in test_split_prior_gives_the_gradients_of_one_batch); the forecast step is about half."""
    from booth.options import TrainConfig
    from booth.train import forecast

    common = ["--save-precision", "fp32", "--learning-rate", "1e-3", "-s", "2", "--max-grad-norm", "0"]
    one = dreambooth(base, tmp_path / "one", "--iterations", "4", *common) / "run0"
    split, _ = whole_and_resumed(base, tmp_path, 4, 2, "--split-prior", *common, name="split")
    assert len(metrics(split)) == 4
    for a, b in zip(metrics(one), metrics(split)):
        for key in ("loss", "instance_loss", "prior_loss"):
            assert a[key] == pytest.approx(b[key], rel=1e-5), key
    cfg = TrainConfig(class_name="dog", instance_dir=".").resolve(64, 0)
    steps = [
        forecast(dataclasses.replace(cfg, split_prior=s), TINY, torch.device("cpu")).step
        for s in (False, True)
    ]
    assert 0.4 < steps[1] / steps[0] < 0.75, steps


def test_split_prior_gives_the_gradients_of_one_batch():
    """diffusion_loss over 2 instance and 2 class rows at once, and over each half in turn (each row keeping its
    generator): the losses add up to the same, and so do the UNet's gradients."""
    from booth.options import Noise
    from booth.train import diffusion_loss

    model = random_weights(TINY, seed=3)
    unet, alphas = model.unet, torch.linspace(0.999, 0.01, 1000)
    x0, cond = (
        torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(0)),
        torch.randn(4, 77, TINY.unet.context_dim),
    )
    gens = lambda: [torch.Generator().manual_seed(s) for s in range(4)]  # noqa: E731

    def grads(parts):
        unet.zero_grad()
        total = 0
        for rows, n_inst in parts:
            g = gens()
            loss = diffusion_loss(Noise(), x0[rows], [g[i] for i in rows], {"context": cond[rows]}, n_inst, unet,
                                  alphas, contextlib.nullcontext(), lamb=0.5)[0]  # fmt: skip
            loss.backward()
            total += loss.item()
        return total, {n: p.grad.clone() for n, p in unet.named_parameters()}

    (one, a), (two, b) = grads([([0, 1, 2, 3], 2)]), grads([([0, 1], 2), ([2, 3], 0)])
    assert one == pytest.approx(two, rel=1e-6)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("optimizer", ["adamw", "adafactor"])
def test_bf16_weights_keep_no_fp32_copy_and_resume_bitwise(base, tmp_path, optimizer):
    common = ["--weights", "bf16", "--optimizer", optimizer, "--learning-rate", "1e-3", "-s", "2", "-l", "0",
              "--save-precision", "fp32"]  # fmt: skip
    whole, part = whole_and_resumed(base, tmp_path, 4, 2, *common)
    name = "step-000004.safetensors"
    state = torch.load(part / "state" / "step-000004.pt", weights_only=True)
    assert {v.dtype for v in state["task"]["unet"].values()} == {torch.bfloat16}, "the weights are bf16 alone"
    moments = {
        v.dtype for s in state["optimizer"]["state"].values() for k, v in s.items() if torch.is_tensor(v)
    }
    assert moments == {torch.float32}
    assert "rounding" in state["rng"]["gens"]
    trained, start = unet_of(whole / "ckpts" / name), unet_of(base)
    assert any(not torch.equal(trained[k], start[k].float()) for k in trained)
    assert all(torch.equal(v, v.bfloat16().float()) for v in trained.values()), "saved as the bf16 values"


def test_lean_turns_on_its_parts_and_resumes_bitwise_after_ctrl_c(base, tmp_path, capsys):
    args = ["--lean", "--no-gradient-checkpointing", "--learning-rate", "1e-3", "--iterations", "40", "-l", "0",
            "--save-precision", "fp32"]  # fmt: skip
    whole = dreambooth(base, tmp_path / "whole", *args) / "run0"
    err = capsys.readouterr().err
    assert ("--lean: --weights bf16, --fused-backward, --optimizer adafactor "
            "(set on their own: --gradient-checkpointing off)") in err  # fmt: skip
    recipe = json.loads(safetensors_metadata(whole / "ckpts" / "step-000040.safetensors")["booth.train"])
    assert {k: recipe[k] for k in ("lean", "weights", "fused_backward", "optimizer", "gradient_checkpointing")} == {
        "lean": True, "weights": "bf16", "fused_backward": True, "optimizer": "adafactor",
        "gradient_checkpointing": False}  # fmt: skip
    cmd = [sys.executable, "-m", "booth", *dreambooth_argv(base, tmp_path / "cut", *FAST, *args)]
    # bf16 is emulated on a CPU without it: under load the first steps can take minutes
    code, err = interrupt_once_logged(cmd, tmp_path / "cut" / "run0" / "metrics.jsonl", timeout=600)
    assert code == 130 and "Traceback" not in err, err
    cut = tmp_path / "cut" / "run0"
    assert 3 <= len(metrics(cut)) < 40
    assert main(["dreambooth", "-r", str(cut)]) == 0
    name = "step-000040.safetensors"
    assert (whole / "ckpts" / name).read_bytes() == (cut / "ckpts" / name).read_bytes()
    assert [r["loss"] for r in metrics(cut)] == [r["loss"] for r in metrics(whole)]


@pytest.mark.skipif(
    importlib.util.find_spec("bitsandbytes") is None, reason="needs bitsandbytes (the test extra)"
)
def test_adamw8bit_trains_with_the_fused_step(base, tmp_path):
    common = ["--optimizer", "adamw8bit", "--learning-rate", "1e-3", "-s", "2", "-l", "0", "--max-grad-norm", "0",
              "--save-precision", "fp32"]  # fmt: skip
    plain = dreambooth(base, tmp_path / "plain", "--iterations", "2", *common) / "run0"
    fused, _ = whole_and_resumed(base, tmp_path, 2, 1, "--fused-backward", *common, name="fused")
    name = "step-000002.safetensors"
    a, b = unet_of(plain / "ckpts" / name), unet_of(fused / "ckpts" / name)
    # bitsandbytes quantises each tensor's moments in blocks, the same blocks whichever way it is stepped
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], v.float()) for k, v in unet_of(base).items())


@pytest.mark.parametrize("step", [[], ["--fused-backward", "--max-grad-norm", "0"]], ids=["plain", "fused"])
def test_two_processes_equal_one_with_twice_the_batch(base, tmp_path, step):
    import numpy as np
    from PIL import Image

    # Shared class images: generated in batches of different sizes they could differ in the last bit.
    (tmp_path / "cls").mkdir()
    for i in range(4):
        pixels = np.random.default_rng(i).integers(0, 256, (40, 48, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / "cls" / f"{i:04d}.png")
    args = [
        "--iterations",
        "3",
        "--learning-rate",
        "1e-3",
        "--save-precision",
        "fp32",
        "--class-dir",
        str(tmp_path / "cls"),
        *step,
    ]
    cmd = [
        sys.executable,
        "-m",
        "booth",
        "dreambooth",
        "-c",
        "dog",
        "-i",
        str(DOG),
        "-m",
        str(base),
        *FAST,
        *args,
    ]
    one = subprocess.run(
        [*cmd, "-o", str(tmp_path / "one"), "--batch-size", "2"], env=env(), capture_output=True, text=True
    )
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([*cmd, "-o", str(tmp_path / "two"), "--batch-size", "1", "-d", "cpu", "cpu"], env=env(),
                         capture_output=True, text=True)  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = (unet_of(tmp_path / r / "run0" / "ckpts" / "step-000003.safetensors") for r in ("one", "two"))
    start = unet_of(base)
    # Batch 4 on one process and batch 2 on each of two run different CPU kernels, so gradients agree to float
    # rounding, not bitwise. Adam divides by |g|, which turns rounding in near-zero gradients into visible
    # update differences for a few weights; a wrong split of the data moves nearly every weight by ~2 x lr.
    diff = torch.cat([(a[k] - b[k]).abs().flatten() for k in a])
    assert diff.max() < 0.5 * 1e-3 * 3, diff.max()
    assert (diff < 1e-6).float().mean() > 0.97
    moved = torch.cat([(a[k] - start[k].float()).abs().flatten() for k in a])
    assert (moved > 1e-4).float().mean() > 0.5, "training changed the weights"


# ----------------------------------------------------------------------------- bad input


def test_bad_instance_folders(base, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("hello")
    (tmp_path / "junk" / "fake.jpg").write_bytes(b"not a jpeg")
    cases = {"missing": "not found", "empty": "is empty", "junk": "no readable images"}
    for name, message in cases.items():
        code = main(
            [
                "dreambooth",
                "-c",
                "dog",
                "-i",
                str(tmp_path / name),
                "-m",
                str(base),
                "-o",
                str(tmp_path / "o"),
                *FAST,
            ]
        )
        assert code == 1 and message in error_of(capsys)
    assert not (tmp_path / "o").exists()


def test_non_images_are_skipped_with_a_warning(base, tmp_path, capsys):
    """Once, and before the class images are made: a user learns of it before the long part."""
    import shutil

    shutil.copytree(DOG, tmp_path / "dog")
    (tmp_path / "dog" / "broken.png").write_bytes(b"\x89PNG broken")
    run = tmp_path / "o"
    assert main(["dreambooth", "-c", "dog", "-i", str(tmp_path / "dog"), "-m", str(base), "-o", str(run), *FAST,
                 "--iterations", "1"]) == 0  # fmt: skip
    err = capsys.readouterr().err
    assert "skipping 2 file(s)" in err and "broken.png" in err and "SOURCE.md" in err
    assert err.count("skipping") == 1 and err.index("skipping") < err.index("class images"), err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--iterations", "0"], "--iterations must be between 1 and"),
        (["--learning-rate", "-1"], "--learning-rate must be a positive"),
        (["-l", "-0.5"], "--lamb must be a non-negative"),
        (["--hw", "30", "32"], "multiples of 8"),
        (["--batch-size", "0"], "--batch-size must be at least 1"),
        (["--pyramid-noise", "1.5"], "--pyramid-noise must be between 0 and 1"),
        (["--optimizer", "adamw8bit"], "pip install 'booth[8bit]'"),
        (["-d", "tpu"], "unknown device"),
        (["--sampler", "nope"], "unknown sampler"),
        (
            ["--fused-backward", "--precision", "fp16"],
            "--fused-backward cannot skip a step after an fp16 overflow",
        ),
        (["--weights", "bf16", "--precision", "fp32"], "--weights bf16 (part of --lean) computes in bf16"),
        (["--lean", "--precision", "fp16"], "--weights bf16 (part of --lean) computes in bf16"),
        (["--weights", "bf16", "--lora", "4"], "--weights bf16 is for whole networks"),
        (["--weights", "bf16", "--optimizer", "adamw8bit"], "rounds to nearest, losing small updates"),
    ],
)
def test_bad_flags_fail_before_loading(base, tmp_path, capsys, monkeypatch, args, message):
    if args == ["--optimizer", "adamw8bit"]:  # as on a machine without it (the test extra installs it)
        real = importlib.util.find_spec
        monkeypatch.setattr("booth.options.importlib.util.find_spec",
                            lambda name, *a: None if name == "bitsandbytes" else real(name, *a))  # fmt: skip
    monkeypatch.setattr("booth.train.read_checkpoint", lambda *a, **k: pytest.fail("weights were loaded"))
    code = main(dreambooth_argv(base, tmp_path / "o", *FAST, *args))
    assert code in (1, 2) and message in error_of(capsys)


def test_run_folder_errors(base, tmp_path, capsys):
    out = tmp_path / "o"
    run = dreambooth(base, out, "--iterations", "2", "-l", "0") / "run0"
    # an existing run folder given as -o, without -r
    assert main(dreambooth_argv(base, run, *FAST)) == 1
    assert f"resume it with -r {run}" in error_of(capsys)
    # fewer iterations than already done
    assert main(["dreambooth", "-r", str(run), "--iterations", "1"]) == 1
    assert "already at step 2" in error_of(capsys)
    # a folder that is not a run, and a run with no state
    assert main(["dreambooth", "-r", str(tmp_path)]) == 1
    assert "not a DreamBooth run folder" in error_of(capsys)
    for f in (run / "state").iterdir():
        f.unlink()
    assert main(["dreambooth", "-r", str(run)]) == 1
    assert "no saved training state" in error_of(capsys)
    # changing the recipe on resume
    assert main(["dreambooth", "-r", str(run), "--learning-rate", "1"]) == 1
    assert "drop learning_rate" in error_of(capsys)
    # missing -c / -i
    assert main(["dreambooth", "-i", str(DOG)]) == 1
    assert "-c" in error_of(capsys)
    # unwritable output
    (tmp_path / "file").write_text("x")
    assert main(dreambooth_argv(base, tmp_path / "file" / "o", *FAST)) == 1
    assert "cannot write" in error_of(capsys)


def test_out_of_memory_names_the_memory_flags(base, tmp_path, capsys, monkeypatch):
    import booth.train

    real = booth.train.diffusion_loss

    def oom(*a, **k):
        if a[1].is_meta:  # the memory forecast's trace of a step allocates nothing
            return real(*a, **k)
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(booth.train, "diffusion_loss", oom)
    dreambooth(base, tmp_path, "--iterations", "2", "-l", "0", expect=1)
    message = error_of(capsys)
    for flag in ("--lean", "--weights bf16", "--fused-backward", "--optimizer adafactor", "adamw8bit",
                 "--gradient-checkpointing", "--cache-latents", "--batch-size"):  # fmt: skip
        assert flag in message


def test_options_run_and_cache_latents_matches_encoding(base, tmp_path):
    plain = ["--iterations", "2", "--no-random-resize", "--no-color-jitter", "-l", "0"]
    a = dreambooth(base, tmp_path / "a", *plain) / "run0"
    b = dreambooth(base, tmp_path / "b", *plain, "--cache-latents") / "run0"
    for x, y in zip(metrics(a), metrics(b)):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-4)
    c = dreambooth(base, tmp_path / "c", "--iterations", "2", "--noise-offset", "0.1", "--pyramid-noise", "0.3",
                   "--snr-gamma", "5", "--gradient-checkpointing", "--precision", "bf16", "--grad-accum", "2",
                   "--lr-warmup", "4",
                   "--sample-every", "2", "--sample-prompt", "a sks dog in a bucket") / "run0"  # fmt: skip
    m = metrics(c)
    assert [r["lr"] for r in m] == pytest.approx([5e-6 * 1 / 4, 5e-6 * 2 / 4])
    assert sorted(p.name for p in (c / "samples" / "step-000002").iterdir()) == ["0000.png", "0001.png"]
    assert set(m[0]) >= {"step", "loss", "instance_loss", "prior_loss", "lr", "seconds", "peak_memory_mb"}
    d = dreambooth(base, tmp_path / "d", "--iterations", "2", "-l", "0", "--precision", "fp16") / "run0"
    state = torch.load(d / "state" / "step-000002.pt", weights_only=True)
    assert state["scaler"]["scale"] > 0, "fp16 trains with loss scaling"
    assert all(v.dtype == torch.float32 for v in state["task"]["unet"].values()), "master weights stay fp32"


def test_gradient_checkpointing_gives_the_same_gradients():
    model = random_weights(TINY, seed=2)
    unet = model.unet.train().requires_grad_(True)
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([10.0, 900.0]), torch.randn(2, 77, 128)
    grads = []
    for checkpointing in (False, True):
        unet.gradient_checkpointing = checkpointing
        unet.zero_grad()
        unet(x, t, ctx).square().mean().backward()
        grads.append([p.grad.clone() for p in unet.parameters()])
    assert all(torch.allclose(g1, g2, atol=1e-6) for g1, g2 in zip(*grads))


def test_augmentations_and_odd_images(tmp_path):
    import numpy as np
    from PIL import Image

    from booth.data import Augment, find_images, prepare

    rgb = np.random.default_rng(0).integers(0, 256, (60, 90, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "a.png")
    Image.fromarray(rgb).convert("L").save(tmp_path / "gray.png")
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.jpg")
    rgba = Image.fromarray(np.dstack([rgb, np.full((60, 90), 128, np.uint8)]))
    rgba.save(tmp_path / "rgba.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated: stored landscape, shown portrait
    Image.fromarray(rgb).save(tmp_path / "rotated.jpg", exif=exif)
    paths = find_images(tmp_path)
    assert [p.name for p in paths] == ["a.png", "cmyk.jpg", "gray.png", "rgba.png", "rotated.jpg"]
    from booth.images import load_image

    assert load_image(tmp_path / "rotated.jpg").size == (60, 90)
    image = load_image(tmp_path / "a.png")
    plain = prepare(image, (32, 32))
    assert plain.shape == (3, 32, 32) and plain.min() >= -1 and plain.max() <= 1
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    assert torch.equal(prepare(image, (32, 32), Augment(), g()), prepare(image, (32, 32), Augment(), g()))
    flips = {bool(torch.equal(prepare(image, (32, 32), Augment(resize=False, jitter=False), torch.Generator().manual_seed(s)),
                              plain.flip(-1))) for s in range(8)}  # fmt: skip
    assert flips == {True, False}, "flip happens about half the time"
    off = Augment(flip=False, resize=False, jitter=False)
    assert torch.equal(prepare(image, (32, 32), off, g()), plain)


def test_frozen_networks_keep_the_base_values(tmp_path):
    base32 = tmp_path / "base32.safetensors"
    save_checkpoint(
        random_weights(TINY, seed=12).state_dict(), base32
    )  # an fp32 base, like v1-5-pruned-emaonly
    original = read_checkpoint(base32).state_dict
    for precision, expect in (("fp16", torch.float16), ("fp32", torch.float32)):
        run = dreambooth(
            base32, tmp_path / precision, "--iterations", "1", "-l", "0", "--save-precision", precision
        )
        saved = read_checkpoint(run / "run0" / "ckpts" / "step-000001.safetensors").state_dict
        for k, v in original.items():
            if not k.startswith(UNET):
                assert saved[k].dtype == expect and torch.equal(saved[k], v.to(expect)), k


def test_a_parked_text_encoder_encodes_the_class_prompt_once_and_the_run_is_the_same(
    base, tmp_path, monkeypatch
):
    """Where the frozen text encoder leaves the GPU (parks_text_encoder, on CUDA; forced here), the class prompt is
    encoded once for all the class images, which keep their bytes, as does the checkpoint."""
    import booth.pipeline
    import booth.train

    calls, real = [], booth.pipeline.encode_text
    monkeypatch.setattr(booth.pipeline, "encode_text", lambda *a, **k: calls.append(1) or real(*a, **k))
    args = ["--iterations", "1", "--gb", "1", "--save-precision", "fp32"]
    plain = dreambooth(base, tmp_path / "plain", *args) / "run0"
    assert len(calls) == 4, "once per batch of class images"
    monkeypatch.setattr(booth.train, "parks_text_encoder", lambda cfg, device: True)
    parked = dreambooth(base, tmp_path / "parked", *args) / "run0"
    assert len(calls) == 5, "once for all of them"
    for a in sorted((plain / "class-imgs").glob("*.png")):
        assert a.read_bytes() == (parked / "class-imgs" / a.name).read_bytes(), a.name
    name = "step-000001.safetensors"
    assert (plain / "ckpts" / name).read_bytes() == (parked / "ckpts" / name).read_bytes()


def test_class_images_are_topped_up_not_redone(base, tmp_path):
    from PIL import Image

    cls = tmp_path / "cls"
    cls.mkdir()
    for name in ("mine-a.png", "mine-b.jpg"):
        Image.new("RGB", (40, 40), "red").save(cls / name)
    before = {p.name: p.read_bytes() for p in cls.iterdir()}
    dreambooth(base, tmp_path / "o", "--iterations", "1", "--class-dir", str(cls))  # --class-img-count 4
    after = sorted(p.name for p in cls.iterdir())
    assert after == ["0000.png", "0001.png", "mine-a.png", "mine-b.jpg"]
    assert all((cls / n).read_bytes() == b for n, b in before.items()), "supplied images are used as they are"
    made = {n: (cls / n).read_bytes() for n in ("0000.png", "0001.png")}
    (cls / "0001.png").unlink()  # as if generation had been interrupted
    dreambooth(base, tmp_path / "o2", "--iterations", "1", "--class-dir", str(cls))
    assert (cls / "0000.png").read_bytes() == made["0000.png"], "existing images are not redone"
    assert (cls / "0001.png").read_bytes() == made["0001.png"], "the missing one is made again, the same"


def test_pyramid_noise_unit_variance_more_low_frequency_and_per_row():
    def draw(seeds, discount):
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        white = torch.cat([torch.randn((1, 4, 8, 8), generator=g) for g in gens])
        return white, pyramid_noise(white, gens, discount)

    white, noise = draw(range(3000), 0.5)
    assert abs(float(noise.var()) - 1) < 0.02
    # The image mean of each channel: 1/8 std for white 8x8 noise; with the 4x4, 2x2 and 1x1 levels (discount d)
    # its variance is (1/64 + d^2/16 + d^4/4 + d^6) / (1 + d^2 + d^4 + d^6).
    d = 0.5
    expected = ((1 / 64 + d**2 / 16 + d**4 / 4 + d**6) / (1 + d**2 + d**4 + d**6)) ** 0.5
    assert float(white.mean(dim=(2, 3)).std()) == pytest.approx(1 / 8, rel=0.05)
    assert float(noise.mean(dim=(2, 3)).std()) == pytest.approx(expected, rel=0.05)
    # Each row depends only on its own generator (batch composition does not change a row).
    _, alone = draw([7], 0.5)
    _, batch = draw([3, 7, 11], 0.5)
    assert torch.equal(alone[0], batch[1])


def test_fine_tuning_uses_the_base_models_training_noise(tmp_path, monkeypatch):
    """A booth-trained file records the noise it was trained on; dreambooth uses it unless told otherwise."""
    from dataclasses import replace

    import booth.train

    path = tmp_path / "pyramid.safetensors"
    save_checkpoint(random_weights(TINY, seed=11).state_dict(), path, config=replace(TINY, pyramid_noise=0.3))
    seen = []
    real = booth.train.pyramid_noise

    def spy(noise, gens, discount):
        if not noise.is_meta:  # not the memory forecast's trace of a step
            seen.append(discount)
        return real(noise, gens, discount)

    monkeypatch.setattr(booth.train, "pyramid_noise", spy)

    def trained_with(name, *flags):
        run = dreambooth(path, tmp_path / name, "--iterations", "1", "-l", "0", *flags)
        ckpt = read_checkpoint(run / "run0" / "ckpts" / "step-000001.safetensors")
        return json.loads(ckpt.metadata["booth.train"])["pyramid_noise"], ckpt.config.pyramid_noise

    assert trained_with("own") == (0.3, 0.3) and seen == [0.3]
    seen.clear()
    # 0 is white noise; the fine-tuned file still records the base model's own
    assert trained_with("white", "--pyramid-noise", "0") == (0.0, 0.3) and seen == []


# ----------------------------------------------------------------------------- hostile input and faults


def finite_checkpoints(run: Path) -> list[str]:
    """Names of the run's checkpoints; each is asserted to hold only finite weights."""
    names = []
    for path in sorted((run / "ckpts").glob("*.safetensors")) if (run / "ckpts").exists() else []:
        assert all(torch.isfinite(v.float()).all() for v in read_checkpoint(path).state_dict.values()), path
        names.append(path.name)
    return names


@pytest.mark.parametrize("lr", ["1e6", "1e30"])
def test_weights_that_overflow_fp16_are_never_saved_nor_called_good(base, tmp_path, capsys, lr):
    """The loss is finite, but the updated weights are beyond fp16's 65504: the fp16 checkpoint would be all inf."""
    run = dreambooth(base, tmp_path, "--iterations", "3", "-s", "1", "--learning-rate", lr, "-l", "0",
                     expect=1) / "run0"  # fmt: skip
    err = error_of(capsys)
    assert "stopping at step 1: the weights do not fit in the checkpoint's dtype" in err, err
    assert "not written yet" in err and "--save-precision fp32" in err
    assert finite_checkpoints(run) == [] and not list((run / "state").glob("*.pt"))


def test_weights_that_become_inf_are_never_saved_nor_called_good(base, tmp_path, capsys, monkeypatch):
    from torch._subclasses.fake_tensor import is_fake

    real = torch.optim.AdamW.step
    steps = []

    def step(self, *a, **k):
        out = real(self, *a, **k)
        if is_fake(self.param_groups[0]["params"][0]):  # the memory forecast's stand-in, before the run
            return out
        steps.append(1)
        if len(steps) == 2:
            self.param_groups[0]["params"][0].data[0] = float("nan")
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    run = dreambooth(base, tmp_path, "--iterations", "3", "-s", "1", "-l", "0", "--save-precision", "fp32",
                     expect=1) / "run0"  # fmt: skip
    err = error_of(capsys)
    assert "stopping at step 2: the weights became inf or NaN" in err, err
    assert f"The last good checkpoint is {run / 'ckpts' / 'step-000001.safetensors'}" in err
    assert finite_checkpoints(run) == ["step-000001.safetensors"]
    assert [p.name for p in (run / "state").glob("*.pt")] == ["step-000001.pt"]


def test_a_run_stopped_while_making_class_images_resumes_and_keeps_them(base, tmp_path):
    """Ctrl-C during class-image generation: -r makes only the missing ones, then trains."""
    cls = tmp_path / "o" / "run0" / "class-imgs"
    more = ["--class-img-count", "300", "--gb", "1", "--iterations", "1"]
    cmd = [sys.executable, "-m", "booth", *dreambooth_argv(base, tmp_path / "o", *FAST, *more)]
    code, err = interrupt_when(cmd, lambda: cls.is_dir() and len(list(cls.glob("0*.png"))) >= 3)
    assert code == 130, err
    assert f"stopped while making class images; continue with: booth dreambooth -r {cls.parent}" in err
    made = {p.name: p.read_bytes() for p in cls.glob("0*.png")}
    assert 3 <= len(made) < 300
    assert main(["dreambooth", "-r", str(cls.parent)]) == 0
    assert len(list(cls.glob("0*.png"))) == 300
    assert all((cls / n).read_bytes() == b for n, b in made.items()), (
        "the images it had are kept as they were"
    )
    assert (cls.parent / "ckpts" / "step-000001.safetensors").is_file()


@pytest.mark.parametrize(
    "args, message",
    [
        (["-m", "missing.safetensors"], "checkpoint not found"),
        (["-m", "someone/not-downloaded"], "or pass -m with a local checkpoint file"),
        (["--seed", str(2**64)], "--seed must be between 0 and"),
        (["--class-dir", "FILE"], "is a file; give a folder"),
        (["--class-img-count", "0"], "--class-img-count 0 leaves prior preservation no class images"),
    ],
)
def test_bad_input_is_refused_before_a_run_folder_is_made(base, tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "FILE").write_text("not a folder")
    argv = dreambooth_argv(base, tmp_path / "o", *FAST, *args)
    assert main(argv) == 1
    assert message in error_of(capsys)
    assert not (tmp_path / "o").exists()


def test_a_damaged_run_folder_is_a_one_line_error(base, tmp_path, capsys):
    run = dreambooth(base, tmp_path, "--iterations", "2", "-l", "0") / "run0"
    args = (run / "args.yaml").read_text()
    (run / "args.yaml").write_text("hw: [32, 32\nseed: 3\n")
    assert main(["dreambooth", "-r", str(run), "--iterations", "3"]) == 1
    assert "cannot read" in (err := error_of(capsys)) and "args.yaml: it is not valid YAML at line" in err
    (run / "args.yaml").write_bytes(b"\xff\xfe not text")
    assert main(["dreambooth", "-r", str(run), "--iterations", "3"]) == 1
    assert "it is not UTF-8 text" in error_of(capsys)
    (run / "args.yaml").write_text(args)
    state = run / "state" / "step-000002.pt"
    torch.save(
        {"format": 1, "step": 2, "task": {"unet": {}}, "optimizer": {}, "scaler": {}, "rng": {}}, state
    )
    assert main(["dreambooth", "-r", str(run), "--iterations", "3"]) == 1
    assert f"{state} does not fit this run" in error_of(capsys)
    torch.save({"format": 1, "step": "two"}, state)
    assert main(["dreambooth", "-r", str(run), "--iterations", "3"]) == 1
    assert "is not a complete booth training state" in error_of(capsys)


def test_stale_temporaries_are_removed_when_a_run_resumes(base, tmp_path):
    run = dreambooth(base, tmp_path, "--iterations", "2", "-l", "0") / "run0"
    dead = [run / "state" / ".step-000004.pt.99999999.abcd1234.tmp",
            run / "ckpts" / ".step-000004.safetensors.99999999.abcd1234.tmp"]  # fmt: skip
    for p in dead:
        p.write_bytes(b"\0" * 1000)  # what a kill -9 during a save leaves
    assert main(["dreambooth", "-r", str(run), "--iterations", "3"]) == 0
    assert not any(p.exists() for p in dead)


def test_two_processes_cannot_train_in_one_run_folder(base, tmp_path, capsys):
    from booth.atomic import locked

    run = dreambooth(base, tmp_path, "--iterations", "2", "-l", "0") / "run0"
    with locked(run, "a test"):
        assert main(["dreambooth", "-r", str(run), "--iterations", "3"]) == 1
        assert f"{run} is in use by booth process {os.getpid()}" in error_of(capsys)
    assert main(["dreambooth", "-r", str(run), "--iterations", "3"]) == 0


def test_training_from_python_runs_the_same_checks(base, tmp_path, monkeypatch):
    from booth.errors import BoothError
    from booth.train import TrainConfig, train

    monkeypatch.setattr("booth.train.read_checkpoint", lambda *a, **k: pytest.fail("weights were loaded"))
    cfg = TrainConfig(class_name="dog", instance_dir=str(DOG), model=str(base), lr_schedule="linear")
    with pytest.raises(BoothError, match="unknown --lr-schedule 'linear'"):
        train(cfg, tmp_path / "o")
    assert not (tmp_path / "o").exists()
