"""booth.options: one place for each default and rule, shared by the CLI and the Python API, importing no torch."""

import dataclasses
import json
import subprocess
import sys

import pytest

from booth.errors import BoothError
from booth.options import (
    LORA_LEARNING_RATE,
    SAMPLERS,
    DemoRecipe,
    Job,
    Loop,
    Settings,
    TrainConfig,
)


def test_help_and_bad_flags_answer_without_importing_torch():
    """`booth --help`, every `booth CMD --help` and a mistyped flag: no PyTorch import (about 2 s of a CLI call)."""
    script = """
import contextlib, io, json, sys
from booth.cli import main
out = {}
for argv in (["--help"], ["txt2img", "--help"], ["img2img", "--help"], ["dreambooth", "--help"], ["merge", "--help"],
             ["train-demo", "--help"], ["download", "--help"], ["txt2img", "-p", "x", "--steps", "0"],
             ["dreambooth", "-c", "dog", "-i", ".", "--lamb", "-1"], ["txt2img", "-p", "x", "--sampler", "eular"]):
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        try:
            rc = main(argv)
        except SystemExit as e:
            rc = e.code
    out[" ".join(argv)] = [rc, err.getvalue(), "torch" in sys.modules]
print(json.dumps(out))
"""
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    results = json.loads(p.stdout)
    for argv, (rc, err, torch_loaded) in results.items():
        assert not torch_loaded, f"`booth {argv}` imported torch"
        assert rc == (0 if argv.endswith("--help") else 1), (argv, rc, err)
    assert "--steps must be between 1 and 1000" in results["txt2img -p x --steps 0"][1]
    assert "unknown sampler 'eular'" in results["txt2img -p x --sampler eular"][1]


# ----------------------------------------------------------------------------- samplers own their facts


@pytest.mark.parametrize(
    "sampler, schedule, eta",
    [("ddim", "uniform", 0.0), ("plms", "uniform", None), ("euler", "karras", None), ("euler_a", "karras", 1.0),
     ("heun", "karras", None), ("lms", "karras", None), ("dpmpp_2m", "karras", None),
     ("dpmpp_2m_sde", "karras", 1.0)],
)  # fmt: skip
def test_automatic_schedule_and_default_eta_are_each_samplers_own(sampler, schedule, eta):
    """AUTOMATIC1111's "Automatic": DDIM and PLMS on the model's own timesteps, the k-diffusion samplers on Karras
    sigmas; euler_a and dpmpp_2m_sde draw noise at eta 1 unless told otherwise, ddim at 0."""
    s = Settings(sampler=sampler).resolved()
    assert (s.schedule, s.eta) == (schedule, eta)
    assert Settings(sampler=sampler, schedule="exponential").resolved().schedule == "exponential"
    given = Settings(sampler=sampler, eta=0.5).resolved().eta
    assert given == (None if eta is None else 0.5), "an eta is kept for the samplers that have one"


def test_the_sampler_functions_take_their_default_eta_from_the_facts():
    import torch

    from booth import sampling

    assert sampling.SAMPLERS.keys() == SAMPLERS.keys()
    x = torch.zeros(2, 3)
    sigmas = torch.tensor([2.0, 1.0, 0.5])
    seen = []

    def denoiser(x, sigma):
        return torch.zeros_like(x)

    for name in ("euler_a", "ddim"):
        gen = torch.Generator().manual_seed(0)
        out = sampling.SAMPLERS[name](denoiser, x, sigmas, generator=gen)
        seen.append(float(out.abs().sum()))
    assert seen[0] > 0, "euler_a adds noise by default (eta 1)"
    assert seen[1] == 0, "ddim is deterministic by default (eta 0): zero stays zero"


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(scale=-1.0), "--scale must be a non-negative number"),
        (dict(scale=float("nan")), "--scale must be a finite number"),
        (dict(steps=0), "--steps must be between 1 and 1000"),
        (dict(steps=1000, sampler="plms"), "uniform schedule takes at most 999 steps"),
        (dict(eta=-0.5), "--eta must be a non-negative number"),
        (dict(height=30, width=32), "multiples of 8"),
        (dict(sampler="eular"), "unknown sampler 'eular'"),
        (dict(schedule="cosine"), "unknown schedule 'cosine'"),
        (dict(clip_skip=0), "--clip-skip"),
    ],
)
def test_settings_validate(kwargs, message):
    with pytest.raises(BoothError, match=message.replace("(", r"\(")):
        Settings(**kwargs).validate()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(prompt="\udcff broken"), "the prompt is not valid UTF-8"),
        (dict(prompt="x", negative_prompt="\ud800"), "the negative prompt is not valid UTF-8"),
        (dict(prompt="x", seed=2**64), "--seed must be between 0 and"),
        (dict(prompt="x", seed=2**64 - 2, variations=3), "--seed must be between 0 and"),
        (dict(prompt="x", variations=0), "--variations must be at least 1"),
        (dict(prompt="x", image="in.png", strength=1.5), "--strength must be between 0 and 1"),
    ],
)
def test_job_validate(kwargs, message):
    with pytest.raises(BoothError, match=message):
        Job(**kwargs).validate()


def test_the_last_seed_of_a_job_is_allowed():
    Job("x", seed=2**64 - 3, variations=3).validate()
    assert list(Job("x", seed=5, variations=5, batch_size=2).batches()) == [[5, 6], [7, 8], [9]]


DOG = dict(class_name="dog", instance_dir="photos")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(lr_schedule="linear"), "unknown --lr-schedule 'linear'"),
        (dict(learning_rate=0.0), "--learning-rate must be a positive number"),
        (dict(lamb=-1.0), "--lamb must be a non-negative number"),
        (dict(seed=2**64), "--seed must be between 0 and"),
        (dict(class_img_count=0), "--class-img-count 0 leaves prior preservation no class images"),
        (dict(iterations=0), "--iterations must be between 1 and"),
        (dict(iterations=10**23), "--iterations must be between 1 and"),
        (dict(pyramid_noise=2.0), "--pyramid-noise must be between 0 and 1"),
        (dict(ddim_steps=5000), "--ddim-steps must be between 1 and 1000"),
        (dict(token="two words"), "--token must be one word"),
        (dict(class_name="\udcff"), "--class-name is not valid UTF-8"),
        (dict(lora_alpha=4.0), "--lora-alpha only apply with --lora RANK"),
        (dict(lora=4, train_text_encoder=True), "with --lora use --lora-text-encoder"),
        (dict(precision="fp8"), "unknown --precision 'fp8'"),
        # from Python, any value can reach any field
        (dict(devices="cpu"), "--devices should be list, not 'cpu'"),
        (dict(flip="yes"), "--flip should be bool, not 'yes'"),
        (dict(instance_dir=5), "--instance-dir should be str, not 5"),
        (dict(hw=(64.0, 64.0)), "height and width must be positive multiples of 8"),
        (dict(cache_latents=1), "--cache-latents should be bool, not 1"),
    ],
)
def test_train_config_validate(kwargs, message):
    with pytest.raises(BoothError, match=message):
        TrainConfig(**{**DOG, **kwargs}).validate()


def test_paths_from_python_are_taken_as_the_text_args_yaml_records(tmp_path):
    from pathlib import Path

    cfg = TrainConfig(
        **{**DOG, "instance_dir": tmp_path / "dog", "class_dir": Path("cls"), "model": tmp_path / "m"}
    )
    cfg.validate()
    assert (
        cfg.instance_dir == str(tmp_path / "dog")
        and cfg.class_dir == "cls"
        and cfg.model == str(tmp_path / "m")
    )
    assert TrainConfig.from_yaml(cfg.to_yaml()) == cfg


def test_train_config_defaults_and_what_is_derived_from_the_fields():
    assert TrainConfig(**DOG).learning_rate == 5e-6
    assert TrainConfig(**DOG, lora=8).learning_rate == LORA_LEARNING_RATE
    assert TrainConfig(**DOG, lora=8, learning_rate=3e-4).learning_rate == 3e-4
    cfg = TrainConfig(**DOG)
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    assert set(TrainConfig.RESUMABLE) <= names and set(TrainConfig.LOCATIONS) <= names
    assert set(cfg.recipe()) == names - set(TrainConfig.RESUMABLE) - set(TrainConfig.LOCATIONS)
    assert json.loads(json.dumps(cfg.recipe()))["lamb"] == 1.0


def test_train_config_yaml_round_trip_and_damage(tmp_path):
    cfg = TrainConfig(**DOG, hw=(64, 48), devices=["cpu"])
    back = TrainConfig.from_yaml(cfg.to_yaml())
    assert back == cfg and back.hw == (64, 48)
    for text, message in (("hw: [1, 2\n", "not valid YAML at line"), ("- a\n- b\n", "expected a mapping"),
                          ("class_name: dog\ninstance_dir: x\nsampler: nope\n", "unknown sampler")):  # fmt: skip
        with pytest.raises(BoothError, match=message) as e:
            TrainConfig.from_yaml(text, "RUN/args.yaml")
        assert "RUN/args.yaml" in str(e.value) and "\n" not in str(e.value)


def test_demo_recipe_validate_and_yaml():
    DemoRecipe().validate()
    assert DemoRecipe.from_yaml(DemoRecipe(seed=3).to_yaml()) == DemoRecipe(seed=3)
    with pytest.raises(BoothError, match="--unet-steps must be at least 1"):
        DemoRecipe(unet_steps=0).validate()
    with pytest.raises(BoothError, match="unknown setting 'unet_stpes'"):
        DemoRecipe.from_yaml("seed: 0\nunet_stpes: 10\n")
    assert DemoRecipe().unet_loop() == Loop(4500, 1e-3, 100, "cosine", save_every=500, sample_every=500)


def test_options_imports_no_torch():
    p = subprocess.run([sys.executable, "-c", "import sys, booth.options, booth.formats, booth.hub, booth.atomic; "
                        "print('torch' in sys.modules)"], capture_output=True, text=True, timeout=60)  # fmt: skip
    assert p.stdout.strip() == "False", p.stderr


def test_train_config_resolve_fills_in_what_was_left_to_the_model_and_the_sampler():
    cfg = TrainConfig(**DOG, sampler="ddim").resolve(sample_size=64, pyramid_noise=0.35)
    assert (cfg.hw, cfg.pyramid_noise, cfg.schedule, cfg.ddim_eta) == ((64, 64), 0.35, "uniform", 0.0)
    given = TrainConfig(**DOG, hw=(32, 48), pyramid_noise=0.0, schedule="karras", ddim_eta=0.5)
    cfg = given.resolve(sample_size=512, pyramid_noise=0.35)
    assert (cfg.hw, cfg.pyramid_noise, cfg.schedule, cfg.ddim_eta) == ((32, 48), 0.0, "karras", None)


@pytest.mark.parametrize(
    "line, message",
    [("hw: 5", "hw should be tuple, not 5"), ("devices: cpu", "devices should be list"),
     ("flip: sometimes", "flip should be bool"), ("sampler: [a, b]", "sampler should be str"),
     ("iterations: true", "iterations should be int, not True"), ("learning_rate: fast", "should be float")],
)  # fmt: skip
def test_a_hand_edited_args_yaml_with_the_wrong_types_is_one_line(line, message):
    with pytest.raises(BoothError, match=message):
        TrainConfig.from_yaml(f"class_name: dog\ninstance_dir: x\n{line}\n", "RUN/args.yaml")


def test_yaml_numbers_without_a_dot_are_numbers():
    """YAML 1.1 reads 1e-4 as text; it is the learning rate it spells."""
    assert (
        TrainConfig.from_yaml("class_name: dog\ninstance_dir: x\nlearning_rate: 1e-4\n").learning_rate == 1e-4
    )


def test_every_precision_name_has_a_dtype():
    import torch

    from booth.device import pick_dtype
    from booth.options import PRECISIONS

    cpu = torch.device("cpu")
    assert {p: pick_dtype(p, cpu) for p in PRECISIONS} == {"fp32": torch.float32, "fp16": torch.float16,
        "bf16": torch.bfloat16, "full": torch.float32, "autocast": torch.float32}  # fmt: skip
    assert pick_dtype(None, cpu) == torch.float32


def test_the_fused_step_defaults_to_bf16_on_a_gpu_else_fp32(monkeypatch):
    """It cannot use fp16 loss scaling; a GPU without bf16 trains it in fp32 (no CUDA is needed to decide)."""
    import torch

    import booth.device
    from booth.device import training_precision

    gpu, cpu = torch.device("cuda"), torch.device("cpu")
    monkeypatch.setattr(booth.device.torch.cuda, "is_bf16_supported", lambda: True)
    assert training_precision(None, gpu, fused=True) == "bf16"
    assert training_precision(None, gpu, fused=False) is None  # fp16 autocast, as before
    assert training_precision(None, cpu, fused=True) is None
    assert training_precision("fp32", gpu, fused=True) == "fp32"
    monkeypatch.setattr(booth.device.torch.cuda, "is_bf16_supported", lambda: False)
    assert training_precision(None, gpu, fused=True) == "fp32"


def test_lean_fills_only_the_parts_not_given_and_leaves_lora_weights_fp32():
    base = dict(class_name="dog", instance_dir="x")
    lean = TrainConfig(**base, lean=True)
    assert (lean.weights, lean.fused_backward, lean.optimizer, lean.gradient_checkpointing) == (
        "bf16", True, "adafactor", True)  # fmt: skip
    plain = TrainConfig(**base)
    assert (plain.weights, plain.fused_backward, plain.optimizer, plain.gradient_checkpointing) == (
        "fp32", False, "adamw", False)  # fmt: skip
    own = TrainConfig(**base, lean=True, optimizer="adamw", gradient_checkpointing=False)
    assert (own.weights, own.fused_backward, own.optimizer, own.gradient_checkpointing) == (
        "bf16", True, "adamw", False)  # fmt: skip
    assert own.lean_summary() == (
        "--lean: --weights bf16, --fused-backward (set on their own: --optimizer adamw, --gradient-checkpointing off)"
    )
    lora = TrainConfig(**base, lean=True, lora=4)
    assert lora.weights == "fp32" and lora.fused_backward and lora.optimizer == "adafactor"
    # what args.yaml records is the resolved recipe: read back, nothing changes
    assert TrainConfig.from_yaml(own.to_yaml()) == own
