"""The metrics' image towers and formulas: booth's CLIP and DINO give transformers' features on the same random
weights, the preprocessing is the metrics' definition, and the formulas match a hand computation."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from booth import metrics, vision
from booth.errors import BoothError

PHOTOS = sorted((Path(__file__).resolve().parents[2] / "shared" / "data" / "dreambooth-dog").glob("*.jpg"))
if not PHOTOS:  # a clean checkout without the shared folder: the test photos of the same dog
    PHOTOS = sorted((Path(__file__).parent / "data" / "dog").glob("*.jpg"))


def tensor(out):
    """transformers 5 returns a model output where 4 returned the features."""
    return out if torch.is_tensor(out) else out.pooler_output


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                         vocab_size=49408, max_position_embeddings=77),
        vision_config=dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
                           patch_size=32, image_size=224),
        projection_dim=32,
    )  # fmt: skip
    model = CLIPModel(config).eval()
    folder = tmp_path_factory.mktemp("clip")
    model.save_pretrained(folder)
    return folder, model


@pytest.fixture(scope="module")
def dino_folder(tmp_path_factory):
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(1)
    config = ViTConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
                       patch_size=16, image_size=224, hidden_act="gelu", layer_norm_eps=1e-12)  # fmt: skip
    model = ViTModel(config, add_pooling_layer=True).eval()
    folder = tmp_path_factory.mktemp("dino")
    model.save_pretrained(folder)
    return folder, model


def test_clip_image_and_text_features_equal_transformers(clip_folder):
    folder, theirs = clip_folder
    ours = vision.load_clip(folder)
    pixels = torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    ids = vision.clip_ids(["a dog in the snow", "a photo of a red cube shaped dog on a beach", ""])
    with torch.no_grad():
        want_image = tensor(theirs.get_image_features(pixel_values=pixels))
        want_text = tensor(theirs.get_text_features(input_ids=ids))
        got_image, got_text = ours.image_features(pixels), ours.text_features(ids)
    assert got_image.shape == want_image.shape == (3, 32)
    torch.testing.assert_close(got_image, want_image, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got_text, want_text, rtol=1e-4, atol=1e-5)


def test_clip_ids_equal_the_transformers_tokenizer(tmp_path):
    from helpers import transformers_tokenizer

    tok = transformers_tokenizer(tmp_path)
    texts = ["a dog in the snow", "A Shiny DOG, wearing a rainbow scarf!", "word " * 100]
    want = tok(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    assert torch.equal(vision.clip_ids(texts), want)


def test_dino_cls_equals_transformers(dino_folder):
    folder, theirs = dino_folder
    ours = vision.load_dino(folder)
    pixels = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = theirs(pixel_values=pixels).last_hidden_state[:, 0]
        got = ours.features(pixels)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_pickled_weights_and_a_vit_prefix_load_too(dino_folder, tmp_path):
    from safetensors.torch import load_file

    folder, _ = dino_folder
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    stored = load_file(folder / "model.safetensors")  # the Hub's names (transformers 5 renames in memory)
    torch.save({f"vit.{k}": v for k, v in stored.items()}, tmp_path / "pytorch_model.bin")
    pixels = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(
            vision.load_dino(tmp_path).features(pixels), vision.load_dino(folder).features(pixels)
        )


@pytest.mark.parametrize("how", [vision.DINO_PREPROCESS, vision.CLIP_PREPROCESS], ids=["dino", "clip"])
def test_preprocessing_equals_the_reference_definition(how):
    """transformers' CLIPImageProcessor with the metric's sizes, mean and std: shorter side resized (PIL bicubic),
    centre crop, normalised; on the real photos, and on one cut to a landscape shape."""
    from transformers import CLIPImageProcessor

    reference = CLIPImageProcessor(size={"shortest_edge": how.resize}, crop_size={"height": how.crop, "width": how.crop},
                                   image_mean=list(how.mean), image_std=list(how.std), do_convert_rgb=True)  # fmt: skip
    photos = [Image.open(p) for p in PHOTOS]
    photos.append(photos[0].crop((0, 0, photos[0].width, photos[0].height * 2 // 3)))
    for photo in photos:
        want = reference(images=photo, return_tensors="pt").pixel_values
        got = vision.preprocess([photo], how)
        assert got.shape == want.shape == (1, 3, how.crop, how.crop)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_preprocessing_takes_odd_shapes_and_modes():
    gray = Image.fromarray(
        np.arange(300 * 200, dtype=np.uint32).reshape(200, 300).astype(np.uint8) % 251, "L"
    )
    rgba = Image.new("RGBA", (231, 500), (10, 20, 30, 0))
    out = vision.preprocess([gray, rgba], vision.DINO_PREPROCESS)
    assert out.shape == (2, 3, 224, 224) and torch.isfinite(out).all()


def test_metric_formulas_by_hand():
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    b = torch.tensor([[3.0, 3.0], [1.0, 0.0]])
    # cosines: a0.b0 = 1/sqrt2, a0.b1 = 1, a1.b0 = 1/sqrt2, a1.b1 = 0
    assert metrics.subject_similarity(a, b) == pytest.approx((2 / 2**0.5 + 1) / 4)
    assert metrics.prompt_similarity(a, b) == pytest.approx((1 / 2**0.5 + 0) / 2)
    assert metrics.prompt_similarity(a, b[:1]) == pytest.approx(1 / 2**0.5)
    assert metrics.subject_similarity(b, b) == pytest.approx((1 + 2 / 2**0.5 + 1) / 4)


def test_clip_t_prompts_drop_the_identifier():
    assert metrics.without_identifier("a sks dog in the snow", "sks") == "a dog in the snow"
    assert metrics.without_identifier("sks dog, sks-style", "sks") == "dog, -style"
    assert metrics.without_identifier("a sksdog", "sks") == "a sksdog", "only the whole word"
    assert metrics.without_identifier("a dog", "") == "a dog"


def test_bad_tower_folders(clip_folder, tmp_path):
    with pytest.raises(BoothError, match="not a CLIP model folder \\(no config.json\\)"):
        vision.load_clip(tmp_path)
    (tmp_path / "config.json").write_text("{nope")
    with pytest.raises(BoothError, match="cannot read .*config.json"):
        vision.load_dino(tmp_path)
    (tmp_path / "config.json").write_text('{"hidden_size": 48, "num_attention_heads": 5}')
    with pytest.raises(BoothError, match="not a ViT model config booth can read"):
        vision.load_dino(tmp_path)
    (tmp_path / "config.json").write_text('{"hidden_size": 48, "num_attention_heads": 4}')
    with pytest.raises(BoothError, match="no weights in"):
        vision.load_dino(tmp_path)
    (tmp_path / "config.json").write_text((clip_folder[0] / "config.json").read_text())
    (tmp_path / "model.safetensors").write_bytes((clip_folder[0] / "model.safetensors").read_bytes())
    with pytest.raises(BoothError, match="is not a DINO model booth can load: .* weights missing"):
        vision.load_dino(tmp_path)
