"""SDXL (issue 13): a model in SGM's layout (`conditioner.embedders.0.transformer.*` CLIP-L,
`conditioner.embedders.1.model.*` OpenCLIP bigG, a UNet with label_emb and per-level depths) loads from a single
file with strict=True, and its UNet, its conditioning and its images equal diffusers' StableDiffusionXLPipeline
on the same weights (tests/test_families.py: diffusers' own from_single_file reads booth's file to the same
images)."""

import dataclasses

import numpy as np
import pytest
import torch
from helpers import diffusers_sdxl_pipeline, diffusers_unet, error_of, saved_model

from booth.checkpoint import infer_config, read_checkpoint, read_safetensors, to_layout
from booth.cli import main
from booth.config import SDXL, TINY_SDXL
from booth.model import build, size_features, unet_inputs
from booth.pipeline import Settings, StableDiffusion

PROMPT, NEGATIVE, SEED, STEPS = "a photo of a red circle on a blue background", "blurry", 7, 8


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    return saved_model(TINY_SDXL, 11, tmp_path_factory.mktemp("sdxl") / "sdxl.safetensors")


@pytest.fixture(scope="module")
def theirs(sdxl, tmp_path_factory):
    return diffusers_sdxl_pipeline(sdxl[1], tmp_path_factory.mktemp("tok"))


def close(a, b, tol=1e-5):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def test_an_sdxl_file_loads_strictly_under_the_original_names(sdxl):
    path, model = sdxl
    ckpt = read_checkpoint(path)
    assert ckpt.config == TINY_SDXL
    for key in ("model.diffusion_model.label_emb.0.0.weight", "conditioner.embedders.0.transformer.text_model."
                "encoder.layers.0.self_attn.q_proj.weight", "conditioner.embedders.1.model.text_projection",
                "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"):  # fmt: skip
        assert key in ckpt.state_dict
    assert "conditioner.embedders.1.model.logit_scale" not in ckpt.state_dict, (
        "CLIP's temperature is not a weight"
    )
    build(TINY_SDXL, device="cpu").load_state_dict(ckpt.state_dict, strict=True)


def test_the_full_size_sdxl_config_is_read_from_its_shapes():
    """sd_xl_base_1.0's shapes (on the meta device): 2.57 B UNet parameters, depths 0/2/10, bigG's projection."""
    with torch.device("meta"):
        state = build(SDXL).state_dict()
    state["conditioner.embedders.1.model.logit_scale"] = torch.empty((), device="meta")
    state["denoiser.sigmas"] = torch.empty(1000, device="meta")
    assert infer_config(to_layout(state)) == SDXL
    with torch.device("meta"):
        unet = build(SDXL).unet
    assert round(sum(p.numel() for p in unet.parameters()) / 1e9, 2) == 2.57


def test_the_sdxl_unet_equals_diffusers(sdxl):
    """label_emb of the pooled text and booth's size features = diffusers' add_embedding of its time ids."""
    _, model = sdxl
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 8, 12, generator=g), torch.tensor([981.0, 3.0])
    context, pooled = torch.randn(2, 77, 160, generator=g), torch.randn(2, 32, generator=g)
    size = (64, 96)
    ours = model.unet(x, t, **unet_inputs({"context": context, "pooled": pooled}, size))
    time_ids = torch.tensor([[*size, 0, 0, *size]] * 2, dtype=torch.float32)
    with torch.no_grad():
        ref = diffusers_unet(model)(
            x, t, context, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}
        )
    close(ours, ref.sample, 1e-4)
    assert size_features(size, (0, 0), size).shape == (1, 6 * 256)


@pytest.mark.parametrize("negative", [NEGATIVE, ""])
def test_sdxl_conditioning_equals_diffusers(sdxl, theirs, negative):
    """Both tokenizers' padding, the two penultimate layers side by side, bigG's pooled output, and zeros for an
    empty negative prompt (SDXL base's force_zeros_for_empty_prompt)."""
    path, _ = sdxl
    cond, uncond = StableDiffusion.from_pretrained(str(path)).encode_prompt(PROMPT, negative)
    ref = theirs.encode_prompt(PROMPT, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True,
                               negative_prompt=negative or None)  # fmt: skip
    close(cond["context"], ref[0])
    close(uncond["context"], ref[1])
    close(cond["pooled"], ref[2])
    close(uncond["pooled"], ref[3])
    if not negative:
        assert not uncond["context"].any() and not uncond["pooled"].any()


@pytest.mark.parametrize("negative", [NEGATIVE, ""])
def test_sdxl_images_equal_diffusers(sdxl, theirs, negative):
    path, _ = sdxl
    gens = [torch.Generator().manual_seed(SEED + i) for i in range(2)]
    ref = theirs(prompt=PROMPT, negative_prompt=negative or None, num_inference_steps=STEPS, guidance_scale=7.5,
                 height=32, width=48, generator=gens, num_images_per_prompt=2, output_type="np").images  # fmt: skip
    sd = StableDiffusion.from_pretrained(str(path))
    settings = Settings(steps=STEPS, sampler="ddim", schedule="uniform", height=32, width=48)
    images = sd.txt2img(PROMPT, negative, [SEED, SEED + 1], settings)
    ours = np.stack([np.asarray(im, dtype=np.float32) / 255 for im in images])
    diff = np.abs(ours - ref)
    assert diff.max() <= 2 / 255 and diff.mean() < 1e-3, f"max {diff.max() * 255:.1f}/255"


def test_the_cli_renders_an_sdxl_file(sdxl, tmp_path, capsys):
    path, _ = sdxl
    assert main(["txt2img", "-c", str(path), "-p", PROMPT, "--hw", "32", "32", "--steps", "2", "--seed", "1",
                 "-o", str(tmp_path)]) == 0  # fmt: skip
    assert capsys.readouterr().out.split() == [str(tmp_path / "run0" / "samples" / "0000.png")]
    assert (
        main(["txt2img", "-c", str(path), "-p", PROMPT, "--clip-skip", "3", "-o", str(tmp_path / "x")]) == 1
    )
    assert "--clip-skip 3 is more than the 2 layers" in error_of(capsys)


def test_an_sdxl_config_without_its_second_encoder_is_refused():
    with pytest.raises(ValueError, match="second text encoder"):
        dataclasses.replace(TINY_SDXL, clip2=None).validate()
    with pytest.raises(ValueError, match="label_emb"):
        dataclasses.replace(TINY_SDXL, unet=dataclasses.replace(TINY_SDXL.unet, adm_in_channels=7)).validate()


# ----------------------------------------------------------------------------- LoRA


def unet_out(unet, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([50.0, 700.0])
    context, pooled = torch.randn(2, 77, 160, generator=g), torch.randn(2, 32, generator=g)
    with torch.no_grad():
        if hasattr(unet, "label_emb"):
            return unet(x, t, **unet_inputs({"context": context, "pooled": pooled}, (64, 64)))
        time_ids = torch.tensor([[64, 64, 0, 0, 64, 64]] * 2, dtype=torch.float32)
        return unet(x, t, context, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample


def test_a_booth_sdxl_lora_is_read_by_diffusers_to_the_same_unet(sdxl, tmp_path):
    """booth writes SDXL LoRAs under SGM's block names, as kohya does (`lora_unet_input_blocks_4_1_...`);
    diffusers' load_lora_weights maps them onto its UNet to the same output as booth's merge."""
    import copy

    from booth.lora import add_lora, merge, read_lora, save_lora

    _, model = sdxl
    runtime = copy.deepcopy(model)
    layers = add_lora(runtime, 4, 4, "attn-ff", seed=1)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for layer in layers.values():
            layer.up.weight.copy_(torch.randn(layer.up.weight.shape, generator=g) * 0.2)
    file = save_lora(layers, tmp_path / "xl.safetensors", TINY_SDXL, torch.float32)
    keys = read_safetensors(file)[0]
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight" in keys
    assert "lora_unet_middle_block_1_transformer_blocks_1_ff_net_2.lora_up.weight" in keys
    pipe = diffusers_sdxl_pipeline(model, tmp_path / "tok")
    before = unet_out(pipe.unet)
    pipe.load_lora_weights(str(file))
    reference = unet_out(pipe.unet)
    merged = copy.deepcopy(model)
    merge(merged.state_dict(), [(read_lora(file), 1.0)], TINY_SDXL)
    ours = unet_out(merged.unet)
    scale = reference.abs().max()
    assert (ours - reference).abs().max() <= 1e-4 * scale
    assert (reference - before).abs().max() > 1e-2 * scale, "the LoRA changed the UNet beyond the tolerance"
    close(unet_out(runtime.unet), reference, 1e-4)


def test_a_kohya_sdxl_lora_on_both_text_encoders_merges_as_diffusers_reads_it(sdxl, theirs, tmp_path):
    """kohya's `lora_te1_` (CLIP-L) and `lora_te2_` (bigG, named as transformers names it: q/k/v_proj, which
    booth adds into thirds of OpenCLIP's fused in_proj) layers give the conditioning diffusers computes."""
    import copy

    from safetensors.torch import save_file

    path, model = sdxl
    g, tensors = torch.Generator().manual_seed(5), {}
    for te, width, layers in (("te1", 64, 2), ("te2", 96, 3)):
        for i in range(layers):
            for name, (i_n, o_n) in {"self_attn_q_proj": (width, width), "self_attn_v_proj": (width, width),
                                     "self_attn_k_proj": (width, width), "mlp_fc1": (width, 4 * width),
                                     "self_attn_out_proj": (width, width), "mlp_fc2": (4 * width, width)}.items():  # fmt: skip
                key = f"lora_{te}_text_model_encoder_layers_{i}_{name}"
                tensors[key + ".lora_down.weight"] = torch.randn(2, i_n, generator=g) * 0.3
                tensors[key + ".lora_up.weight"] = torch.randn(o_n, 2, generator=g) * 0.3
                tensors[key + ".alpha"] = torch.tensor(1.0)
    file = tmp_path / "kohya_te.safetensors"
    save_file(tensors, file)
    pipe = copy.deepcopy(theirs)
    pipe.load_lora_weights(str(file))
    ref = pipe.encode_prompt(PROMPT, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)
    sd = StableDiffusion.from_pretrained(str(path))
    before = sd.encode_prompt(PROMPT)[0]
    from booth.lora import read_lora

    sd.set_loras([(read_lora(file), 1.0)])
    cond = sd.encode_prompt(PROMPT)[0]
    close(cond["context"], ref[0], 1e-4)
    close(cond["pooled"], ref[2], 1e-4)
    assert (cond["context"] - before["context"]).abs().max() > 1e-2


# ----------------------------------------------------------------------------- DreamBooth

FAST = ["--hw", "32", "32", "--class-img-count", "2", "--gb", "2", "--ddim-steps", "2", "--seed", "3",
        "--save-precision", "fp32"]  # fmt: skip


def test_dreambooth_lora_on_sdxl_resumes_bitwise_and_diffusers_reads_its_lora(sdxl, tmp_path):
    """SDXL LoRA DreamBooth with prior preservation: resumed with -r it writes the same bytes as a run in one go,
    its loss is finite, and the LoRA is one diffusers loads (every layer placed) to the same UNet as booth's."""
    from helpers import dreambooth_argv, read_jsonl

    from booth.lora import merge, read_lora

    path, model = sdxl
    args = [*FAST, "--lora", "4", "--learning-rate", "1e-3", "-s", "2"]
    assert main(dreambooth_argv(path, tmp_path / "whole", *args, "--iterations", "4")) == 0
    assert main(dreambooth_argv(path, tmp_path / "part", *args, "--iterations", "2")) == 0
    assert main(["dreambooth", "-r", str(tmp_path / "part" / "run0"), "--iterations", "4"]) == 0
    whole, part = (tmp_path / d / "run0" / "ckpts" / "step-000004.safetensors" for d in ("whole", "part"))
    assert whole.read_bytes() == part.read_bytes()
    log = read_jsonl(tmp_path / "whole" / "run0" / "metrics.jsonl")
    assert len(log) == 4 and all(np.isfinite(r["loss"]) and r["prior_loss"] > 0 for r in log)
    lora = read_lora(whole)
    assert lora.metadata["ss_base_model_version"] == "sdxl_base_v1-0"
    pipe = diffusers_sdxl_pipeline(model, tmp_path / "tok")
    pipe.load_lora_weights(str(whole))
    import copy

    merged = copy.deepcopy(model)
    merge(merged.state_dict(), [(lora, 1.0)], TINY_SDXL)
    close(unet_out(merged.unet), unet_out(pipe.unet), 1e-4)
    assert not torch.allclose(unet_out(merged.unet), unet_out(model.unet)), "the LoRA trained"


def test_dreambooth_on_sdxl_trains_both_text_encoders_and_saves_a_file_diffusers_reads(
    sdxl, theirs, tmp_path
):
    """The whole UNet and both text encoders (-t): the checkpoint is an SDXL file in SGM's layout that loads back
    strictly in booth and that diffusers' from_single_file reads to the same UNet and conditioning."""
    from diffusers import StableDiffusionXLPipeline
    from helpers import dreambooth_argv

    path, model = sdxl
    assert main(dreambooth_argv(path, tmp_path / "o", *FAST, "-t", "--iterations", "2")) == 0
    ckpt = read_checkpoint(tmp_path / "o" / "run0" / "ckpts" / "step-000002.safetensors")
    assert ckpt.config == TINY_SDXL
    for key in ("conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight",
                "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"):  # fmt: skip
        assert not torch.equal(ckpt.state_dict[key], model.state_dict()[key]), f"{key} trained"
    trained = build(TINY_SDXL, device="cpu")
    trained.load_state_dict(ckpt.state_dict, strict=True)
    theirs.save_pretrained(tmp_path / "config")
    pipe = StableDiffusionXLPipeline.from_single_file(ckpt.path, config=str(tmp_path / "config"),
                                                      local_files_only=True)  # fmt: skip
    close(unet_out(trained.unet), unet_out(pipe.unet), 1e-4)
    ref = pipe.encode_prompt(PROMPT, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)
    cond = StableDiffusion.from_pretrained(str(ckpt.path)).encode_prompt(PROMPT)[0]
    close(cond["context"], ref[0], 1e-4)
    close(cond["pooled"], ref[2], 1e-4)


@pytest.mark.parametrize("lazy", [False, True])
def test_an_sdxl_diffusers_folder_reads_to_the_same_weights_and_images(sdxl, theirs, tmp_path, lazy):
    """diffusers' own SDXL folder (text_encoder_2 a CLIPTextModelWithProjection, its q/k/v apart): booth reads it
    into SGM's layout, bigG's attention fused back into in_proj, to the same weights as the file it came from."""
    from booth.checkpoint import read_stubs

    path, model = sdxl
    theirs.save_pretrained(tmp_path / "xl")
    ckpt = read_checkpoint(tmp_path / "xl", lazy=lazy)
    assert ckpt.config == TINY_SDXL
    weights = dict(read_stubs(ckpt.state_dict)) if lazy else ckpt.state_dict
    expected = model.state_dict()
    assert weights.keys() == expected.keys()
    for k, v in expected.items():
        torch.testing.assert_close(weights[k], v, rtol=0, atol=0, msg=k)
    if lazy:
        settings = Settings(steps=2, sampler="ddim", schedule="uniform", height=32, width=32)
        a, b = (StableDiffusion.from_pretrained(str(p)).txt2img(PROMPT, NEGATIVE, [SEED], settings)[0]
                for p in (tmp_path / "xl", path))  # fmt: skip
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_a_lora_of_both_sdxl_text_encoders_trains_and_diffusers_reads_it_to_the_same_conditioning(sdxl, theirs,
                                                                                                  tmp_path):  # fmt: skip
    """--lora-text-encoder on SDXL: LoRA on CLIP-L (lora_te1_) and on bigG (lora_te2_, its q/k/v trained as
    thirds of OpenCLIP's fused in_proj); diffusers' load_lora_weights places every layer and computes the
    conditioning booth computes from the same file, which differs from the base's."""
    import copy

    from helpers import dreambooth_argv

    from booth.lora import read_lora

    path, _ = sdxl
    args = [*FAST, "--lora", "4", "--lora-text-encoder", "--learning-rate", "1e-2", "--iterations", "2"]
    assert main(dreambooth_argv(path, tmp_path / "o", *args)) == 0
    file = tmp_path / "o" / "run0" / "ckpts" / "step-000002.safetensors"
    lora = read_lora(file)
    for name in ("lora_te1_text_model_encoder_layers_1_self_attn_q_proj", "lora_te2_text_model_encoder_layers_2_mlp_fc2",
                 "lora_te2_text_model_encoder_layers_0_self_attn_k_proj"):  # fmt: skip
        assert name in lora.layers
    assert lora.layers["lora_te2_text_model_encoder_layers_0_self_attn_v_proj"]["up"].abs().sum() > 0, (
        "it trained"
    )
    pipe = copy.deepcopy(theirs)
    pipe.load_lora_weights(str(file))
    ref = pipe.encode_prompt(PROMPT, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)
    sd = StableDiffusion.from_pretrained(str(path))
    before = sd.encode_prompt(PROMPT)[0]
    sd.set_loras([(lora, 1.0)])
    cond = sd.encode_prompt(PROMPT)[0]
    close(cond["context"], ref[0], 1e-4)
    close(cond["pooled"], ref[2], 1e-4)
    assert (cond["pooled"] - before["pooled"]).abs().max() > 1e-3
