"""LoRA: files diffusers reads the same way booth does (both directions), merging, LoRA DreamBooth, bad input."""

import copy
import hashlib
import json
from pathlib import Path

import pytest
import torch
from helpers import diffusers_pipeline, dreambooth_argv, error_of, perturb_norms
from PIL import Image

from booth.checkpoint import UNET, read_checkpoint, read_safetensors, save_checkpoint
from booth.cli import main
from booth.config import SD1, TINY, UNetConfig
from booth.images import parse_infotext
from booth.lora import LoRALayer, add_lora, merge, read_lora, save_lora, target_paths, updates
from booth.model import build, random_weights

DOG = Path(__file__).parent / "data" / "dog"
FAST = ["--hw", "32", "32", "--class-img-count", "2", "--gb", "2", "--ddim-steps", "2", "--seed", "3"]
IMG = ["-p", "a sks dog", "--hw", "16", "16", "--steps", "2", "--seed", "5"]


@pytest.fixture(scope="module")
def model():
    m = random_weights(TINY, seed=21)
    perturb_norms(m)
    return m.eval()


@pytest.fixture(scope="module")
def base(model, tmp_path_factory):
    """The model in fp32, so booth and diffusers start from identical weights."""
    path = tmp_path_factory.mktemp("base") / "base.safetensors"
    save_checkpoint(model.state_dict(), path)
    return path


def random_lora(model, path, rank=4, alpha=None, targets="attn", text_encoder=False, seed=0, dtype=torch.float32,
                metadata=None):  # fmt: skip
    """A LoRA with random (not zero) up weights, saved as training saves it; returns (file, runtime model)."""
    runtime = copy.deepcopy(model)
    layers = add_lora(runtime, rank, alpha, targets, text_encoder, seed)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for layer in layers.values():
            layer.up.weight.copy_(torch.randn(layer.up.weight.shape, generator=g) * 0.2)
    return save_lora(layers, path, model.config, dtype, metadata), runtime


def merged(model, *loras):
    out = copy.deepcopy(model)
    merge(out.state_dict(), [(read_lora(p), w) for p, w in loras], model.config)
    return out


INPUTS = dict(x=torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0)), t=torch.tensor([50.0, 700.0]),
              ctx=torch.randn(2, 77, 128, generator=torch.Generator().manual_seed(1)),
              ids=torch.randint(0, 49407, (2, 77), generator=torch.Generator().manual_seed(2)))  # fmt: skip


@torch.no_grad()
def ours(m):
    i = INPUTS
    return m.unet(i["x"], i["t"], i["ctx"]), m.text_encoder(i["ids"])


@torch.no_grad()
def theirs(pipe):
    i = INPUTS
    return pipe.unet(i["x"], i["t"], encoder_hidden_states=i["ctx"]).sample, pipe.text_encoder(i["ids"])[0]


def assert_close(a, b, base=None):
    scale = b.abs().max()
    assert (a - b).abs().max() <= 1e-4 * scale, ((a - b).abs().max(), scale)
    if base is not None:  # the LoRA changes the output far beyond the tolerance, so the test can fail
        assert (b - base).abs().max() > 100 * 1e-4 * scale


def lora_layers_in(module) -> int:
    return sum(1 for m in module.modules() if hasattr(m, "lora_A") and len(m.lora_A) > 0)


# ----------------------------------------------------------------------------- booth -> diffusers


@pytest.mark.parametrize("targets, text_encoder, alpha", [("attn", False, None), ("all", True, 2.0)])
def test_saved_file_gives_diffusers_the_same_model(model, tmp_path, targets, text_encoder, alpha):
    """diffusers' load_lora_weights (its kohya converter) on our file computes what booth computes, merged or at
    runtime, and adapts exactly the layers we trained (a misnamed one would be dropped with only a warning)."""
    file, runtime = random_lora(model, tmp_path / "x.safetensors", 4, alpha, targets, text_encoder)
    tensors, meta = read_safetensors(file)
    n_unet = sum(k.endswith(".lora_down.weight") and k.startswith("lora_unet_") for k in tensors)
    n_te = sum(k.endswith(".lora_down.weight") and k.startswith("lora_te_") for k in tensors)
    assert n_unet == len(target_paths(model, targets)) and (n_te > 0) == text_encoder
    assert "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in tensors
    assert all(k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for k in tensors)
    data = file.read_bytes()
    assert (
        meta["sshs_model_hash"] == hashlib.sha256(data[8 + int.from_bytes(data[:8], "little") :]).hexdigest()
    )
    pipe = diffusers_pipeline(model, tmp_path / "tok")
    before = theirs(pipe)
    pipe.load_lora_weights(str(file))
    assert lora_layers_in(pipe.unet) == n_unet and lora_layers_in(pipe.text_encoder) == n_te
    reference = theirs(pipe)
    adapted = (True, text_encoder)  # UNet, text encoder
    results = zip(ours(merged(model, (file, 1.0))), ours(runtime), reference, before, adapted)
    for got, runtime_got, want, was, changed in results:
        assert_close(got, want, was if changed else None)
        assert_close(runtime_got, want)
        assert changed or torch.equal(got, was)


def test_all_targets_cover_the_layers_kohya_and_a1111_name():
    m = build(TINY)
    names = {p[len(UNET) :] for p in target_paths(m, "all")}
    assert {"time_embed.0", "time_embed.2", "input_blocks.1.0.in_layers.2", "input_blocks.1.0.emb_layers.1",
            "input_blocks.3.0.op", "input_blocks.4.0.skip_connection", "output_blocks.2.2.conv",
            "input_blocks.4.1.proj_in", "input_blocks.4.1.transformer_blocks.0.ff.net.2"} <= names  # fmt: skip
    assert "input_blocks.0.0" not in names and "out.2" not in names, "conv_in/conv_out stay out, as in kohya"
    per_block = ["attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k",
                 "attn2.to_v", "attn2.to_out.0"]  # fmt: skip
    transformers = 6  # TINY: two down, one middle, three up
    for targets, layers in (("attn", per_block), ("attn-ff", [*per_block, "ff.net.0.proj", "ff.net.2"])):
        found = sorted(p.split("transformer_blocks.0.")[1] for p in target_paths(m, targets))
        assert found == sorted(layers * transformers)
    te = [p for p in target_paths(m, "attn", text_encoder=True) if "cond_stage_model" in p]
    assert len(te) == TINY.clip.layers * 6  # q, k, v, out_proj, fc1, fc2


# ----------------------------------------------------------------------------- diffusers / peft -> booth


def peft_pipeline(model, tmp):
    """diffusers' pipeline with peft adapters on the UNet (diffusers' add_adapter) and on the text encoder."""
    from peft import LoraConfig, inject_adapter_in_model

    pipe = diffusers_pipeline(model, tmp)
    unet_cfg = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=[
        "to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1", "conv2", "conv_shortcut", "time_emb_proj", "ff.net.2"])  # fmt: skip
    te_cfg = LoraConfig(
        r=2, lora_alpha=3, init_lora_weights=False, target_modules=["q_proj", "v_proj", "fc1"]
    )
    pipe.unet.add_adapter(unet_cfg)
    # transformers' own add_adapter wants a newer peft than this one; peft's injection is the same layers
    inject_adapter_in_model(te_cfg, pipe.text_encoder)
    pipe.text_encoder.peft_config = {"default": te_cfg}
    return pipe, unet_cfg, te_cfg


def test_peft_lora_gives_booth_the_same_model(model, tmp_path):
    from diffusers import StableDiffusionPipeline
    from peft.utils import get_peft_model_state_dict

    pipe, unet_cfg, te_cfg = peft_pipeline(model, tmp_path / "tok")
    unet_sd, te_sd = get_peft_model_state_dict(pipe.unet), get_peft_model_state_dict(pipe.text_encoder)
    # alpha != rank, known only from the metadata diffusers writes
    StableDiffusionPipeline.save_lora_weights(tmp_path / "meta", unet_lora_layers=unet_sd, text_encoder_lora_layers=te_sd,
                                              unet_lora_adapter_metadata=unet_cfg.to_dict(),
                                              text_encoder_lora_adapter_metadata=te_cfg.to_dict())  # fmt: skip
    base_out = ours(model)
    for got, want, was in zip(ours(merged(model, (tmp_path / "meta", 1.0))), theirs(pipe), base_out):
        assert_close(got, want, was)
    # without metadata (alpha = rank, as diffusers assumes too) and without the unet./text_encoder. prefixes
    plain = tmp_path / "plain"
    StableDiffusionPipeline.save_lora_weights(plain, unet_lora_layers=unet_sd, text_encoder_lora_layers=te_sd)
    fresh = diffusers_pipeline(model, tmp_path / "tok2")
    fresh.load_lora_weights(str(plain / "pytorch_lora_weights.safetensors"))
    for got, want, was in zip(ours(merged(model, (plain, 1.0))), theirs(fresh), base_out):
        assert_close(got, want, was)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in unet_sd.items()}, tmp_path / "bare.safetensors")
    a = updates(read_lora(tmp_path / "bare.safetensors"), TINY, shapes(model))
    b = updates(read_lora(plain), TINY, shapes(model))
    assert a.keys() <= b.keys() and all(
        torch.equal(a[k][0][1], b[k][0][1]) and a[k][0][2] == b[k][0][2] for k in a
    )


def shapes(m):
    return {k: v.shape for k, v in m.state_dict().items()}


def test_older_diffusers_spellings_read_the_same(model, tmp_path):
    """`attn1.processor.to_q_lora.down.weight` (diffusers before peft) and `self_attn.to_q_lora` for CLIP."""
    file, _ = random_lora(model, tmp_path / "k.safetensors", targets="attn", text_encoder=True)
    tensors, _ = read_safetensors(file)
    old = {}
    for k, v in tensors.items():
        if k.endswith(".alpha"):
            continue
        module, ending = k.split(".", 1)
        name = {"lora_down.weight": "down.weight", "lora_up.weight": "up.weight"}[ending]
        if module.startswith("lora_unet_"):
            dotted = _diffusers_path(module)
            parent, proj = (
                dotted.rsplit(".", 1) if not dotted.endswith("to_out.0") else (dotted[:-9], "to_out")
            )
            old[f"unet.{parent}.processor.{proj}_lora.{name}"] = v
        else:
            dotted = _diffusers_path(module).replace("q_proj", "to_q").replace("k_proj", "to_k")
            dotted = dotted.replace("v_proj", "to_v").replace("out_proj", "to_out")
            if "self_attn" in dotted:
                old[f"text_encoder.{dotted}_lora.{name}"] = v
    save_checkpoint(old, tmp_path / "old.safetensors")
    a, b = (updates(read_lora(p), TINY, shapes(model)) for p in (tmp_path / "old.safetensors", file))
    assert a and a.keys() <= b.keys() and all(torch.equal(a[k][0][0], b[k][0][0]) for k in a)


def _diffusers_path(kohya: str) -> str:
    from booth.lora import kohya_names

    ours_path = {k: p for p, k in kohya_names(TINY).items()}[kohya]
    from booth.checkpoint import diffusers_name, diffusers_rules

    return (
        diffusers_name(ours_path + ".weight", diffusers_rules(TINY)).split(":", 1)[1].removesuffix(".weight")
    )


# ----------------------------------------------------------------------------- merging


@pytest.mark.filterwarnings("ignore:Already found a `peft_config`")  # two adapters, on purpose
def test_merge_command_equals_the_loras_stacked_in_diffusers(model, base, tmp_path, capsys):
    a, _ = random_lora(model, tmp_path / "a.safetensors", 4, 2.0, "attn-ff", True, seed=1)
    b, _ = random_lora(model, tmp_path / "b.safetensors", 8, None, "all", False, seed=2)
    out = tmp_path / "merged.safetensors"
    assert main(["merge", "-m", str(base), "--lora", f"{a}:0.7", "--lora", f"{b}:-0.5", "-o", str(out),
                 "--save-precision", "fp32"]) == 0  # fmt: skip
    assert capsys.readouterr().out.strip() == str(out)
    ckpt = read_checkpoint(out)
    assert ckpt.state_dict.keys() == model.state_dict().keys() and ckpt.config == TINY
    assert [d["weight"] for d in json.loads(ckpt.metadata["booth.loras"])] == [0.7, -0.5]
    vae = [k for k in ckpt.state_dict if k.startswith("first_stage_model.")]
    assert all(torch.equal(ckpt.state_dict[k], model.state_dict()[k]) for k in vae)
    baked = random_weights(TINY)
    baked.load_state_dict(ckpt.state_dict)
    pipe = diffusers_pipeline(model, tmp_path / "tok")
    pipe.load_lora_weights(str(a), adapter_name="a")
    pipe.load_lora_weights(str(b), adapter_name="b")
    pipe.set_adapters(["a", "b"], adapter_weights=[0.7, -0.5])
    for got, in_memory, want, was in zip(
        ours(baked), ours(merged(model, (a, 0.7), (b, -0.5))), theirs(pipe), ours(model)
    ):
        assert_close(got, want, was)
        assert torch.equal(got, in_memory), "the file holds exactly the in-memory merge"
    half = tmp_path / "half.safetensors"
    assert main(["merge", "-m", str(base), "--lora", str(a), "-o", str(half)]) == 0
    assert {v.dtype for v in read_checkpoint(half).state_dict.values()} == {torch.float16}


# ----------------------------------------------------------------------------- LoRA DreamBooth


def dreambooth(base, out, *args, expect=0):
    code = main(dreambooth_argv(base, out, *FAST, *args))
    assert code == expect
    return out / "run0"


def test_lora_dreambooth_learns_and_leaves_the_base_alone(base, model, tmp_path):
    from booth.train import Batches, Dist, DreamBooth, TrainConfig, class_images, fit, image_sets, load_base

    cfg = TrainConfig(class_name="dog", instance_dir=str(DOG), model=str(base), lora=8, lora_targets="all",
                      lora_text_encoder=True, learning_rate=3e-3, lamb=0, iterations=40, hw=(32, 32), batch_size=2,
                      random_resize=False, color_jitter=False, seed=3)  # fmt: skip
    run, dist = tmp_path / "run", Dist()
    run.mkdir()
    # train() step by step, to look at the task's modules afterwards
    base_model = load_base(cfg, base, dist)
    batches = Batches(cfg, image_sets(cfg, class_images(cfg, run, base_model, dist)), base_model, dist)
    task = DreamBooth(cfg, base_model, batches, dist)
    fit(task, cfg, run, dist)
    m = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    first, last = (sum(r["instance_loss"] for r in rows) / len(rows) for rows in (m[:8], m[-8:]))
    assert last < 0.8 * first, (first, last)
    frozen = {k.replace(".base.", "."): v for k, v in task.model.state_dict().items() if not k.endswith((".down.weight", ".up.weight"))}  # fmt: skip
    assert frozen.keys() == model.state_dict().keys()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in frozen.items()), "the base did not move"
    assert {p.dtype for p in task.params} == {torch.float32} and all(p.requires_grad for p in task.params)
    assert all(not p.requires_grad for n, p in task.model.named_parameters() if ".base." in n)
    tensors, meta = read_safetensors(run / "ckpts" / "step-000040.safetensors")
    assert all("lora_" in k for k in tensors) and any(k.startswith("lora_te_") for k in tensors)
    assert {v.dtype for k, v in tensors.items() if not k.endswith(".alpha")} == {torch.float16}
    assert meta["ss_network_dim"] == "8" and meta["ss_network_module"] == "networks.lora"
    assert meta["booth.base_model"] == str(base.resolve()) and meta["booth.step"] == "40"
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "8", "conv_alpha": "8.0"}
    # the saved file is the trained model: merged into the base it computes what the trained modules compute
    got = ours(merged(model, (run / "ckpts" / "step-000040.safetensors", 1.0)))
    task.model.eval()
    for a, b in zip(got, ours(task.model)):
        assert (a - b).abs().max() < 1e-2 * b.abs().max()  # fp16 file


def test_resume_gives_a_bitwise_identical_lora(base, tmp_path):
    common = ["--lora", "4", "--lora-targets", "all", "--lora-text-encoder", "--save-precision", "fp32",
              "--learning-rate", "1e-3", "-s", "2", "-l", "0.5"]  # fmt: skip
    whole = dreambooth(base, tmp_path / "whole", "--iterations", "6", *common)
    part = dreambooth(base, tmp_path / "part", "--iterations", "2", *common)
    assert main(["dreambooth", "-r", str(part), "--iterations", "4"]) == 0
    assert main(["dreambooth", "-r", str(part), "--iterations", "6"]) == 0
    for step in (2, 4, 6):  # the same bytes: tensors, and metadata written in a fixed order
        name = f"step-{step:06d}.safetensors"
        assert (whole / "ckpts" / name).read_bytes() == (part / "ckpts" / name).read_bytes(), name
    state = torch.load(part / "state" / "step-000006.pt", weights_only=True)
    n_layers = len(read_lora(part / "ckpts" / "step-000006.safetensors").layers)
    assert set(state["task"]) == {"lora", "data"} and len(state["task"]["lora"]) == 2 * n_layers
    assert len(state["optimizer"]["state"]) == 2 * n_layers, "the optimizer holds the adapters only"


def test_lora_learning_rate_default_and_txt2img_of_the_run(base, tmp_path, capsys):
    run = dreambooth(base, tmp_path / "t", "--lora", "4", "--iterations", "2", "-s", "1", "-l", "0")
    assert [json.loads(line)["lr"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [
        1e-4,
        1e-4,
    ]
    capsys.readouterr()
    # the run's ckpts/ folder of LoRAs compares them over the base the files record
    assert main(["txt2img", "-c", str(run / "ckpts"), *IMG, "-o", str(tmp_path / "grid")]) == 0
    images = capsys.readouterr().out.split()
    assert [Path(p).relative_to(tmp_path / "grid" / "run0").as_posix() for p in images] == [
        "samples/step-000001/0000.png", "samples/step-000002/0000.png", "grid.png"]  # fmt: skip


# ----------------------------------------------------------------------------- using LoRAs


def test_txt2img_with_loras_stacks_them_and_records_their_hashes(model, base, tmp_path, capsys):
    a, _ = random_lora(
        model, tmp_path / "style.safetensors", seed=4, metadata={"booth.base_model": str(base)}
    )
    b, _ = random_lora(model, tmp_path / "subject.safetensors", 2, targets="all", seed=5)
    out = tmp_path / "o"
    assert (
        main(["txt2img", "-m", str(base), "--lora", f"{a}:0.8", "--lora", str(b), *IMG, "-o", str(out)]) == 0
    )
    png = Path(capsys.readouterr().out.split()[0])
    params = parse_infotext(Image.open(png).text["parameters"])[2]

    def a1111_hash(f):  # SHA-256 of what follows the safetensors header, first 12 digits
        data = f.read_bytes()
        return hashlib.sha256(data[8 + int.from_bytes(data[:8], "little") :]).hexdigest()[:12]

    assert params["Lora hashes"] == f"style: {a1111_hash(a)}, subject: {a1111_hash(b)}"
    assert params["Model"] == "base"
    # the same image as a model merged by `booth merge`
    assert main(["merge", "-m", str(base), "--lora", f"{a}:0.8", "--lora", str(b), "-o", str(tmp_path / "m.safetensors"),
                 "--save-precision", "fp32"]) == 0  # fmt: skip
    capsys.readouterr()
    assert main(["txt2img", "-m", str(tmp_path / "m.safetensors"), *IMG, "-o", str(out)]) == 0
    png2 = Path(capsys.readouterr().out.split()[0])
    assert Image.open(png).tobytes() == Image.open(png2).tobytes()
    # img2img takes LoRAs too
    assert main(["img2img", "-i", str(png), "-m", str(base), "--lora", f"{a}:-1", *IMG, "-o", str(out)]) == 0


def test_a_folder_of_loras_is_compared_over_the_base(model, base, tmp_path, capsys):
    folder = tmp_path / "loras"
    folder.mkdir()
    files = [random_lora(model, folder / f"{n}.safetensors", seed=s)[0] for n, s in (("a", 6), ("b", 7))]
    capsys.readouterr()
    assert main(["txt2img", "-c", str(folder), "-m", str(base), *IMG, "-o", str(tmp_path / "grid")]) == 0
    rows = capsys.readouterr().out.split()
    assert rows[-1].endswith("grid.png") and len(rows) == 3
    for file, row in zip(
        files, rows
    ):  # each row is the base plus that LoRA alone: the previous one is undone
        assert main(["txt2img", "-m", str(base), "--lora", str(file), *IMG, "-o", str(tmp_path / "one")]) == 0
        alone = capsys.readouterr().out.split()[0]
        assert Image.open(alone).tobytes() == Image.open(row).tobytes()
    assert Image.open(rows[0]).tobytes() != Image.open(rows[1]).tobytes()


def test_a_folder_of_loras_whose_base_is_gone(model, tmp_path, capsys):
    folder = tmp_path / "loras"
    folder.mkdir()
    random_lora(
        model, folder / "a.safetensors", metadata={"booth.base_model": str(tmp_path / "gone.safetensors")}
    )
    assert (
        main(["txt2img", "-c", str(folder), *IMG, "-o", str(tmp_path / "o")]) == 1
    )  # sd15 is not cached here
    err = capsys.readouterr().err
    assert (
        f"base model {tmp_path / 'gone.safetensors'} is not here; using sd15 (give the base with -m)" in err
    )


def test_sd1_lora_file_sizes(tmp_path):
    """Only the adapters go in the file: a rank-4 SD1 attention LoRA is 1.6 MB in fp16 (3.2 MB with ff)."""
    model = build(SD1)  # meta: no weights are made, only the adapters
    sizes = {}
    for targets, rank in (("attn", 4), ("attn", 16), ("attn-ff", 4)):
        paths = target_paths(model, targets)
        layers = {p: LoRALayer(model.get_submodule(p), rank, rank, torch.Generator()) for p in paths}
        file = save_lora(layers, tmp_path / f"{targets}{rank}.safetensors", SD1)
        data = file.stat().st_size - 8 - int.from_bytes(file.read_bytes()[:8], "little")
        weights = sum(
            rank * (w[0].numel() + w.shape[0]) for w in (model.get_submodule(p).weight for p in paths)
        )
        assert data == 2 * weights + 4 * len(paths), "fp16 down and up, an fp32 alpha: nothing else"
        sizes[targets, rank] = file.stat().st_size
    assert 1.5e6 < sizes["attn", 4] < 1.8e6 and 3.0e6 < sizes["attn-ff", 4] < 3.5e6, sizes


# ----------------------------------------------------------------------------- bad input


def test_bad_lora_files(model, base, tmp_path, capsys, monkeypatch):
    wide = random_weights(TINY.__class__(unet=UNetConfig(model_channels=64, channel_mult=(1, 2), attention_resolutions=(2,),
                                                          num_heads=8, context_dim=128), vae=TINY.vae, clip=TINY.clip))  # fmt: skip
    unfit, _ = random_lora(wide, tmp_path / "wide.safetensors")
    save_checkpoint({"lora_unet_x.hada_w1_a": torch.zeros(2, 2)}, tmp_path / "loha.safetensors")
    save_checkpoint({"lora_unet_down_blocks_7_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 8),
                     "lora_unet_down_blocks_7_attentions_0_proj_in.lora_up.weight": torch.zeros(8, 4)},
                    tmp_path / "xl.safetensors")  # fmt: skip
    save_checkpoint({"lora_unet_conv_in.lora_down.weight": torch.zeros(4, 8)}, tmp_path / "half.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    key = "lora_unet_down_blocks_0_attentions_0_proj_in"
    save_checkpoint({f"{key}.lora_down.weight": torch.zeros(0, 32), f"{key}.lora_up.weight": torch.zeros(32, 0)},
                    tmp_path / "rank0.safetensors")  # fmt: skip
    save_checkpoint({f"{key}.lora_down.weight": torch.zeros(4, 32), f"{key}.lora_up.weight": torch.zeros(32, 4),
                     f"{key}.alpha": torch.zeros(0)}, tmp_path / "noalpha.safetensors")  # fmt: skip
    peft = {f"unet.{key[10:].replace('_', '.')}.lora_A.weight": torch.zeros(4, 32),
            f"unet.{key[10:].replace('_', '.')}.lora_B.weight": torch.zeros(32, 4)}  # fmt: skip
    for name, meta in (("peft-json", "{not json"), ("peft-list", "[1, 2]"), ("peft-alpha", '{"unet.lora_alpha": "x"}'),
                       ("peft-pattern", '{"unet.alpha_pattern": {"(": 4}}')):  # fmt: skip
        save_checkpoint(peft, tmp_path / f"{name}.safetensors", metadata={"lora_adapter_metadata": meta})
    (tmp_path / "folder.safetensors").mkdir()
    cases = {"wide.safetensors": "does not fit this model", "loha.safetensors": "unknown key layout",
             "xl.safetensors": "this model does not have", "half.safetensors": "has no up weight",
             "junk.safetensors": "not a valid safetensors file", "missing.safetensors": "LoRA not found",
             "wide.safetensors:11": "out of range", "wide.safetensors:nan": "out of range",
             "wide.safetensors:-10.5": "out of range", "wide.safetensors:abc": "the weight after ':' must be a number",
             "rank0.safetensors": "has rank 0",
             "noalpha.safetensors": "alpha is not one finite number",
             **{f"peft-{k}.safetensors": "malformed peft metadata" for k in ("json", "list", "alpha", "pattern")},
             "folder.safetensors": "LoRA not found"}  # fmt: skip
    monkeypatch.chdir(tmp_path)
    for spec, message in cases.items():
        assert main(["txt2img", "-m", str(base), "--lora", spec, *IMG, "-o", str(tmp_path / "o")]) == 1
        assert message in error_of(capsys), spec
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir()), (
        "no run folder is left behind"
    )


def test_lora_where_a_model_is_expected(model, base, tmp_path, capsys):
    lora, _ = random_lora(model, tmp_path / "l.safetensors")
    for argv in (["txt2img", "-c", str(lora), *IMG], ["merge", "-m", str(lora), "--lora", str(lora), "-o", "x.safetensors"],
                 ["dreambooth", "-c", "dog", "-i", str(DOG), "-m", str(lora), *FAST]):  # fmt: skip
        assert main([*argv, *(["-o", str(tmp_path / "o")] if argv[0] != "merge" else [])]) == 1
        assert f"is a LoRA (adapter weights), not a full model: give a base model here and the LoRA with --lora {lora}" in error_of(capsys)  # fmt: skip


def test_a_model_where_a_lora_is_expected(base, tmp_path, capsys):
    assert main(["merge", "-m", str(base), "--lora", str(base), "-o", str(tmp_path / "m.safetensors")]) == 1
    assert f"{base} is a full model, not a LoRA: give it as the model (-m)" in error_of(capsys)


def test_merge_refuses_to_overwrite(model, base, tmp_path, capsys):
    lora, _ = random_lora(model, tmp_path / "l.safetensors")
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"precious")
    assert main(["merge", "-m", str(base), "--lora", str(lora), "-o", str(out)]) == 1
    assert "exists; give --force" in error_of(capsys) and out.read_bytes() == b"precious"
    assert main(["merge", "-m", str(base), "--lora", str(lora), "-o", str(tmp_path / "out.ckpt")]) == 1
    assert ".safetensors file" in error_of(capsys)
    assert main(["merge", "-m", str(base), "--lora", str(lora), "-o", str(out), "--force"]) == 0
    assert read_checkpoint(out).config == TINY


@pytest.mark.parametrize(
    "args, message",
    [
        (["--lora-alpha", "2"], "--lora-alpha only apply with --lora RANK"),
        (["--lora-targets", "all", "--lora-text-encoder"], "--lora-targets, --lora-text-encoder only apply"),
        (["--lora", "4", "-t"], "with --lora use --lora-text-encoder"),
        (["--lora", "0"], "--lora (the rank) must be between 1 and 4096"),
        (["--lora", "4", "--lora-alpha", "0"], "--lora-alpha must be a positive"),
        (["--lora", "4", "--lora-targets", "everything"], "invalid choice"),
    ],
)
def test_bad_lora_training_flags(base, tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.setattr("booth.train.read_checkpoint", lambda *a, **k: pytest.fail("weights were loaded"))
    argv = dreambooth_argv(base, tmp_path / "o", *FAST, *args)
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own errors (an invalid choice) exit from the parser
        code = e.code
    assert code in (1, 2) and message in capsys.readouterr().err


def test_an_unreadable_lora_file(model, base, tmp_path, capsys, monkeypatch):
    """What a chmod 000 file gives a non-root user, simulated so that it runs as root too."""
    lora, _ = random_lora(model, tmp_path / "locked.safetensors")

    def denied(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr("booth.lora.read_safetensors", denied)
    assert main(["txt2img", "-m", str(base), "--lora", str(lora), *IMG, "-o", str(tmp_path / "o")]) == 1
    assert "cannot read the LoRA" in (err := error_of(capsys)) and "Permission denied" in err


def test_merge_never_overwrites_its_own_inputs(model, base, tmp_path, capsys):
    lora, _ = random_lora(model, tmp_path / "l.safetensors")
    before = {p: p.read_bytes() for p in (lora, base)}
    for target in (lora, base):
        assert main(["merge", "-m", str(base), "--lora", f"{lora}:0.5", "-o", str(target), "--force"]) == 1
        assert "is one of the merge's inputs" in error_of(capsys)
    assert all(p.read_bytes() == b for p, b in before.items())
