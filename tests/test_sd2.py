"""SD 2.x (issue 13): a model with OpenCLIP's text encoder (`cond_stage_model.model.*`) and SD 2.x's UNet loads
from a single file with strict=True, and gives the images of diffusers' StableDiffusionPipeline built from the
same file by diffusers' own converters; its config is read from an SD 2.x file's shapes."""

import numpy as np
import pytest
import torch
from helpers import TINY_SD2 as SD2_TINY
from helpers import diffusers_sd2_pipeline, saved_model

from booth.checkpoint import infer_config, load_part, read_checkpoint, to_layout
from booth.cli import main
from booth.config import SD2
from booth.model import build
from booth.pipeline import Settings, StableDiffusion

TEXT = SD2_TINY.clip
PROMPT, NEGATIVE, SEED, STEPS = "a photo of a red circle on a blue background", "blurry", 7, 8


@pytest.fixture(scope="module")
def sd2(tmp_path_factory):
    return saved_model(SD2_TINY, 6, tmp_path_factory.mktemp("sd2") / "sd2.safetensors")


def test_an_sd2_file_loads_strictly_under_the_original_names(sd2):
    path, model = sd2
    ckpt = read_checkpoint(path)
    assert ckpt.config == SD2_TINY
    assert "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight" in ckpt.state_dict
    assert "cond_stage_model.model.logit_scale" not in ckpt.state_dict, "CLIP's temperature is not a weight"
    built = build(SD2_TINY, device="cpu")
    built.load_state_dict(ckpt.state_dict, strict=True)


@pytest.mark.parametrize("source", ["file", "diffusers folder"])
def test_sd2_images_equal_diffusers(sd2, tmp_path, source):
    """From booth's single file, and from the diffusers folder of the same weights (whose text encoder lacks
    OpenCLIP's last layer and projection, as diffusers' SD 2.x folders do)."""
    path, model = sd2
    gens = [torch.Generator().manual_seed(SEED + i) for i in range(2)]
    pipe = diffusers_sd2_pipeline(model, tmp_path / "tok")
    theirs = pipe(
        prompt=PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=7.5, height=32, width=48,
        generator=gens, num_images_per_prompt=2, output_type="np",
    ).images  # fmt: skip
    if source == "diffusers folder":
        pipe.save_pretrained(tmp_path / "sd2-folder")
        path = tmp_path / "sd2-folder"
    sd = StableDiffusion.from_pretrained(str(path))
    settings = Settings(steps=STEPS, sampler="ddim", schedule="uniform", height=32, width=48)
    images = sd.txt2img(PROMPT, NEGATIVE, [SEED, SEED + 1], settings)
    ours = np.stack([np.asarray(im, dtype=np.float32) / 255 for im in images])
    diff = np.abs(ours - theirs)
    assert diff.max() <= 2 / 255 and diff.mean() < 1e-3, f"max {diff.max() * 255:.1f}/255"


def test_the_cli_renders_an_sd2_file(sd2, tmp_path, capsys):
    path, _ = sd2
    assert main(["txt2img", "-c", str(path), "-p", PROMPT, "--hw", "32", "32", "--steps", "2", "--seed", "1",
                 "-o", str(tmp_path)]) == 0  # fmt: skip
    assert capsys.readouterr().out.split() == [str(tmp_path / "run0" / "samples" / "0000.png")]


def test_an_sd2_config_is_read_from_the_shapes_of_a_full_size_file():
    """SD 2.x's published shapes (on the meta device): OpenCLIP ViT-H (1024 wide, 24 layers, 16 heads, a 1024
    projection), a UNet of linear projections and 64-channel heads attending to 1024-wide text."""
    with torch.device("meta"):
        state = build(SD2).state_dict()
    state["cond_stage_model.model.logit_scale"] = torch.empty((), device="meta")
    assert infer_config(to_layout(state)) == SD2
    unet = build(SD2).unet
    assert round(sum(p.numel() for p in unet.parameters()) / 1e6) == 866, "SD 2.x's 865.9 M"


def test_dreambooth_on_an_sd2_file_saves_a_file_that_loads_back(sd2, tmp_path, capsys):
    """Two steps of the whole UNet and the text encoder (-t): the checkpoint is an SD 2.x file in the original
    layout, its trained text encoder under cond_stage_model.model.; a LoRA of the OpenCLIP encoder too
    (--lora-text-encoder) is saved under kohya's (transformers') names."""
    from helpers import dreambooth_argv

    path, model = sd2
    fast = ["--hw", "32", "32", "--class-img-count", "2", "--gb", "2", "--ddim-steps", "2", "--iterations", "2",
            "--save-precision", "fp32"]  # fmt: skip
    assert main(dreambooth_argv(path, tmp_path / "o", *fast, "-t")) == 0
    ckpt = read_checkpoint(tmp_path / "o" / "run0" / "ckpts" / "step-000002.safetensors")
    assert ckpt.config == SD2_TINY
    key = "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"
    assert not torch.equal(ckpt.state_dict[key], model.state_dict()[key]), "the text encoder trained"
    build(SD2_TINY, device="cpu").load_state_dict(ckpt.state_dict, strict=True)
    assert main(dreambooth_argv(path, tmp_path / "l", *fast, "--lora", "4", "--lora-text-encoder")) == 0
    from booth.lora import read_lora

    names = read_lora(tmp_path / "l" / "run0" / "ckpts" / "step-000002.safetensors").layers
    for part in ("self_attn_q_proj", "self_attn_v_proj", "self_attn_out_proj", "mlp_fc1", "mlp_fc2"):
        assert f"lora_te_text_model_encoder_layers_0_{part}" in names, "kohya's names for the OpenCLIP layers"


@pytest.mark.parametrize("lazy", [False, True])
def test_an_sd2_diffusers_folder_reads_as_its_single_file_with_openclips_last_layer_passing_through(
    sd2, tmp_path, lazy
):
    """Every weight the folder holds equals the file's under OpenCLIP's names; the last layer diffusers dropped
    is zeros (so it passes its input through) and the conditioning, the penultimate layer's, is the file's."""
    from booth.checkpoint import read_diffusers
    from booth.model import encode_text

    path, model = sd2
    diffusers_sd2_pipeline(model, tmp_path / "tok").save_pretrained(tmp_path / "sd2-folder")
    ckpt = read_diffusers(tmp_path / "sd2-folder", lazy=lazy)
    assert ckpt.config.text_encoder == "openclip" and ckpt.config.clip.layers == TEXT.layers
    built = build(ckpt.config, device="cpu")
    for part in ("unet", "vae_encoder", "vae_decoder", "text_encoder"):
        load_part(built, ckpt.state_dict, part, "cpu", torch.float32)
    ours, theirs = built.state_dict(), model.state_dict()
    last = f"cond_stage_model.model.transformer.resblocks.{TEXT.layers - 1}."
    for key, value in ours.items():
        if key.startswith(last) or key.endswith("text_projection"):
            assert not value.any(), key
        else:
            assert torch.equal(value, theirs[key]), key
    ids = torch.randint(0, TEXT.vocab_size, (2, 77))
    assert torch.allclose(encode_text(built.text_encoder, ids)["context"],
                          encode_text(model.text_encoder, ids)["context"], atol=1e-6)  # fmt: skip
    assert main(["txt2img", "-c", str(tmp_path / "sd2-folder"), "-p", PROMPT, "--hw", "32", "32", "--steps", "1",
                 "-o", str(tmp_path / "o")]) == 0  # fmt: skip


@pytest.mark.parametrize("bias, prediction, size", [(-5.0, "v", 768), (5.0, "eps", 512)])
def test_an_unmarked_sd2_file_is_told_v_or_eps_by_running_its_unet(sd2, tmp_path, bias, prediction, size):
    """SD 2.x 768-v files carry no mark; as AUTOMATIC1111, booth runs the UNet once on a grey latent at t=999:
    a mean output more than 1 below the input is a v model (and SD 2.x's v models are 768 ones). The UNet's
    output bias sets that mean here, so each answer can be forced."""
    from safetensors.torch import save_file

    from booth.checkpoint import read_config

    _, model = sd2
    tensors = {k: v.clone().contiguous() for k, v in model.state_dict().items()}
    tensors["model.diffusion_model.out.2.bias"].fill_(bias)
    path = tmp_path / "unmarked.safetensors"
    save_file(tensors, str(path))  # no booth header, no v_pred key
    for cfg in (read_config(path), read_checkpoint(path, lazy=True).config):
        assert (cfg.prediction, cfg.sample_size) == (prediction, size)


@pytest.mark.parametrize(
    "damage, message",
    [
        ({"num_hidden_layers": 10**30}, "layers is 1000000000000000000000000000000, more than any model has"),
        ({"hidden_size": "x"}, "width must be a positive whole number"),
        (b'{"hidden_size": "\xff"}', "config.json is not valid JSON"),
        ("drop layer 0", "is missing the weight text_model.encoder.layers.0.self_attn.q_proj.weight"),
    ],
    ids=["huge", "not-a-number", "invalid-utf8", "missing-weights"],
)
def test_a_damaged_sd2_diffusers_folder_is_one_line_and_nothing_is_made(
    sd2, tmp_path, capsys, damage, message
):
    """Refused from its config before a module of its size is built (10**30 layers once took all memory)."""
    import json

    import safetensors.torch
    from helpers import error_of

    folder = tmp_path / "sd2-folder"
    diffusers_sd2_pipeline(sd2[1], tmp_path / "tok").save_pretrained(folder)
    config, weights = folder / "text_encoder" / "config.json", folder / "text_encoder" / "model.safetensors"
    if isinstance(damage, dict):
        config.write_text(json.dumps({**json.loads(config.read_text()), **damage}))
    elif isinstance(damage, bytes):
        config.write_bytes(damage)
    else:
        kept = {k: v for k, v in safetensors.torch.load_file(weights).items() if ".layers.0." not in k}
        safetensors.torch.save_file(kept, weights)
    assert main(["txt2img", "-c", str(folder), "-p", PROMPT, "-o", str(tmp_path / "o")]) == 1
    assert message in error_of(capsys)
    assert not (tmp_path / "o").exists()
