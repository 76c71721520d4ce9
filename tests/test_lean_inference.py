"""Lean inference: a pipeline made from a file reads each network when it is first needed and lets the encoders go
when their work is done; --low-memory keeps only the network at work. The images stay bitwise those of a pipeline
that holds the whole model."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from helpers import diffusers_pipeline, error_of, perturb_norms
from PIL import Image

from booth import memory
from booth.checkpoint import load_model, read_checkpoint, read_config, read_stubs, save_checkpoint
from booth.cli import main
from booth.config import SD1, TINY
from booth.hub import find_model
from booth.lora import add_lora, save_lora
from booth.model import PARTS, part_modules, random_weights
from booth.pipeline import Settings, StableDiffusion

PROMPT = "a red circle on a blue background"
SETTINGS = Settings(steps=3, sampler="euler_a", height=32, width=32, scale=7.5)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The same tiny weights as an fp16 .safetensors file, an fp32 .ckpt and a diffusers folder."""
    tmp = tmp_path_factory.mktemp("lean")
    model = random_weights(TINY, seed=5)
    perturb_norms(model)
    st = tmp / "tiny.safetensors"
    save_checkpoint(model.state_dict(), st, dtype=torch.float16)
    ckpt = tmp / "tiny.ckpt"
    torch.save({"state_dict": model.state_dict()}, ckpt)
    folder = tmp / "diffusers"
    diffusers_pipeline(model, tmp / "tok").save_pretrained(folder, safe_serialization=True)
    return {"safetensors": st, "ckpt": ckpt, "diffusers": folder}


def resident(sd: StableDiffusion) -> set[str]:
    return {p for p in PARTS if not next(part_modules(sd.model, p)[0].parameters()).is_meta}


def eager(path) -> StableDiffusion:
    return StableDiffusion.from_checkpoint(read_checkpoint(path))


def same(a, b) -> bool:
    return len(a) == len(b) and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b))


def watch(sd: StableDiffusion) -> list[tuple[str, set[str]]]:
    """(network, the networks in memory) at each call of the UNet, the decoder and the encoders."""
    seen = []
    calls = {"unet": sd.model.unet, "vae_decoder": sd.model.vae.decoder, "vae_encoder": sd.model.vae.encoder,
             "text_encoder": sd.model.text_encoder}  # fmt: skip
    for name, module in calls.items():
        module.register_forward_pre_hook(lambda m, a, name=name: seen.append((name, resident(sd))))
    return seen


@pytest.mark.parametrize("fmt", ["safetensors", "ckpt", "diffusers"])
def test_each_network_is_read_when_needed_and_the_encoders_let_go(files, fmt):
    sd = StableDiffusion.from_pretrained(str(files[fmt]))
    assert resident(sd) == set(), "nothing is read before it is needed"
    seen = watch(sd)
    ours = sd.txt2img(PROMPT, seeds=[1, 2], settings=SETTINGS)
    assert seen[0] == ("text_encoder", {"text_encoder"})
    assert ("unet", {"unet"}) in seen, "the text encoder is freed before the UNet is read"
    assert seen[-1] == ("vae_decoder", {"unet", "vae_decoder"})
    assert resident(sd) == {"unet", "vae_decoder"}, "txt2img never reads the VAE encoder"
    assert same(ours, eager(files[fmt]).txt2img(PROMPT, seeds=[1, 2], settings=SETTINGS))


def test_img2img_reads_the_encoder_once_per_image(files, monkeypatch):
    import booth.pipeline

    reads = []
    real = booth.pipeline.load_part
    monkeypatch.setattr(
        booth.pipeline, "load_part", lambda m, s, part, *a: reads.append(part) or real(m, s, part, *a)
    )
    sd = StableDiffusion.from_pretrained(str(files["safetensors"]))
    image = Image.fromarray((np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8))
    first = sd.img2img(image, PROMPT, seeds=[1], strength=0.6, settings=SETTINGS)
    second = sd.img2img(image, PROMPT, seeds=[2], strength=0.6, settings=SETTINGS)
    assert reads == ["text_encoder", "vae_encoder", "unet", "vae_decoder"], "the second batch reads nothing"
    assert resident(sd) == {"unet", "vae_decoder"}
    ref = eager(files["safetensors"])
    assert same(first + second, ref.img2img(image, PROMPT, seeds=[1, 2], strength=0.6, settings=SETTINGS))
    sd.txt2img("another prompt", seeds=[1], settings=SETTINGS)
    assert reads[4:] == ["text_encoder"], "a new prompt reads the text encoder again"


def test_low_memory_keeps_only_the_network_at_work(files):
    sd = StableDiffusion.from_pretrained(str(files["ckpt"]), low_memory=True)
    seen = watch(sd)
    image = Image.fromarray((np.random.default_rng(1).random((32, 32, 3)) * 255).astype(np.uint8))
    ours = sd.txt2img(PROMPT, seeds=[3], settings=SETTINGS) + sd.txt2img(PROMPT, seeds=[4], settings=SETTINGS)
    ours += sd.img2img(image, PROMPT, seeds=[5], strength=0.5, settings=SETTINGS)
    assert {(name, frozenset(parts)) for name, parts in seen} == {(p, frozenset({p})) for p in PARTS}, (
        "each network runs alone in memory"
    )
    ref = eager(files["ckpt"])
    theirs = ref.txt2img(PROMPT, seeds=[3, 4], settings=SETTINGS)
    assert same(ours, theirs + ref.img2img(image, PROMPT, seeds=[5], strength=0.5, settings=SETTINGS))


def test_loras_are_merged_into_networks_read_later(files, tmp_path):
    model = load_model(read_checkpoint(files["safetensors"]))
    layers = add_lora(model, 4, targets="all", text_encoder=True, seed=1)
    with torch.no_grad():
        for layer in layers.values():
            layer.up.weight.normal_(0, 0.2, generator=torch.Generator().manual_seed(2))
    from booth.lora import read_lora

    lora = read_lora(save_lora(layers, tmp_path / "l.safetensors", model.config))
    ref = eager(files["safetensors"])
    ref.set_loras([(lora, 0.7)])
    want = ref.txt2img(PROMPT, seeds=[1], settings=SETTINGS) + ref.txt2img("x", seeds=[1], settings=SETTINGS)
    for low in (False, True):  # with low_memory every network is read again, and merged again, each batch
        sd = StableDiffusion.from_pretrained(str(files["safetensors"]), low_memory=low)
        sd.txt2img(PROMPT, seeds=[1], settings=SETTINGS)  # some networks in memory, some not
        sd.set_loras([(lora, 0.7)])
        got = sd.txt2img(PROMPT, seeds=[1], settings=SETTINGS) + sd.txt2img("x", seeds=[1], settings=SETTINGS)
        assert same(got, want), f"low_memory={low}"
        sd.set_loras([])
        assert same(sd.txt2img(PROMPT, seeds=[1], settings=SETTINGS), eager(files["safetensors"]).txt2img(
            PROMPT, seeds=[1], settings=SETTINGS)), "taking the LoRA off gives the base back"  # fmt: skip


def test_a_file_changed_under_a_lazy_pipeline_is_an_error(files, tmp_path):
    path = tmp_path / "m.safetensors"
    path.write_bytes(files["safetensors"].read_bytes())
    sd = StableDiffusion.from_pretrained(str(path))
    sd.encode_prompt(PROMPT)
    path.write_bytes(path.read_bytes()[:-8] + b"\0" * 8)  # a new save over it
    with pytest.raises(Exception, match="changed or went away while booth was using it; run booth again"):
        sd.txt2img(PROMPT, seeds=[1], settings=SETTINGS)


def test_cli_low_memory_gives_the_same_images(files, tmp_path, capsys):
    args = [
        "-c",
        str(files["diffusers"]),
        "-p",
        PROMPT,
        "--hw",
        "32",
        "32",
        "--steps",
        "2",
        "--seed",
        "3",
        "-v",
        "2",
    ]
    assert main(["txt2img", *args, "-o", str(tmp_path / "a")]) == 0
    assert main(["txt2img", *args, "--low-memory", "-o", str(tmp_path / "b")]) == 0
    a, b = (sorted((tmp_path / x / "run0" / "samples").glob("*.png")) for x in "ab")
    assert len(a) == 2 and [Image.open(p).tobytes() for p in a] == [Image.open(p).tobytes() for p in b]


def test_the_forecast_turns_low_memory_on_where_the_model_would_not_fit(files, tmp_path, capsys, monkeypatch):
    import booth.render

    config = read_config(find_model("demo").path)
    parts = memory.part_bytes(config, 4)
    acts = memory.sampling_bytes(config, 64, 64, 1, 4, guidance=True, encode=False)
    whole = max(parts["text_encoder"], parts["unet"] + parts["vae_decoder"]) + acts
    lean = parts["unet"] + acts  # the demo's largest network
    assert lean < whole
    args = ["-c", "demo", "-p", PROMPT, "--steps", "1", "-d", "cpu"]
    seen = []
    real = booth.render.StableDiffusion.from_checkpoint
    monkeypatch.setattr(booth.render.StableDiffusion, "from_checkpoint",
                        lambda *a, **k: seen.append(a[-1]) or real(*a, **k))  # fmt: skip
    monkeypatch.setattr(booth.render, "available_bytes", lambda device: (whole + lean) // 2)
    assert main(["txt2img", *args, "-o", str(tmp_path / "a")]) == 0
    assert seen == [True]
    assert "keeping only the network at work there (--low-memory)" in capsys.readouterr().err
    monkeypatch.setattr(booth.render, "available_bytes", lambda device: lean - 1)
    assert main(["txt2img", *args, "-o", str(tmp_path / "b")]) == 1
    assert "give a smaller --hw" in error_of(capsys)
    assert not (tmp_path / "b").exists()


def test_part_bytes_partition_the_weights():
    model = random_weights(TINY)
    for part, n in memory.part_bytes(TINY, 2).items():
        assert n == 2 * sum(p.numel() for m in part_modules(model, part) for p in m.parameters())
    assert sum(memory.part_bytes(SD1, 4).values()) == memory.weights_bytes(SD1, 4)


def test_a_pickle_is_read_without_holding_its_pages(tmp_path):
    """A memory-mapped .ckpt read into tensors of its own: the pages read are given back as each tensor is copied,
    so the peak is the copies, not the copies and the file."""
    path = tmp_path / "big.ckpt"
    torch.save({f"model.diffusion_model.w{i}": torch.ones(16 << 20) for i in range(6)}, path)  # 6 x 64 MB
    script = textwrap.dedent(f"""
        import json, pathlib, torch
        from booth.checkpoint import _pickle_stubs, read_stubs
        def status(key):
            line = next(ln for ln in pathlib.Path("/proc/self/status").read_text().splitlines() if ln.startswith(key))
            return int(line.split()[1]) * 1024
        stubs = _pickle_stubs(pathlib.Path({str(path)!r}))
        base = status("VmRSS")
        pathlib.Path("/proc/self/clear_refs").write_text("5")
        out = dict(read_stubs(stubs))
        assert all(bool((t == 1).all()) for t in out.values())
        print(json.dumps({{"grew": status("VmHWM") - base}}))
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    grew = json.loads(run.stdout.splitlines()[-1])["grew"]
    assert grew < 1.25 * (6 * 64 << 20), f"{grew / 2**20:.0f} MB for 384 MB of tensors"


def test_read_stubs_gives_the_eager_tensors(files):
    for fmt in files:
        lazy, full = read_checkpoint(files[fmt], lazy=True), read_checkpoint(files[fmt])
        got = dict(read_stubs(lazy.state_dict))
        assert got.keys() == full.state_dict.keys()
        assert all(torch.equal(got[k], v) and got[k].dtype == v.dtype for k, v in full.state_dict.items())
