"""The image towers booth's DreamBooth metrics score with: CLIP (image and text features, ViT-B/32 by default)
and DINO (ViT-S/16), with the preprocessing each metric is defined with.

Attribute names are those of transformers' `CLIPModel` and `ViTModel`, which is how their Hugging Face folders
store them, so a folder loads with no renaming. CLIP's image tower is booth's text-encoder layers
(booth.clip) attending over every patch instead of causally; its text tower is booth's text encoder itself.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from . import clip
from .config import CLIPConfig
from .errors import BoothError
from .formats import TOWER_WEIGHTS
from .layers import attention
from .tokenizer import BOS, CONTEXT_LEN, EOS, get_tokenizer


@dataclass(frozen=True)
class Preprocess:
    """torchvision's Resize(resize, bicubic) of the shorter side, CenterCrop(crop), then Normalize(mean, std)."""

    resize: int
    crop: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


DINO_PREPROCESS = Preprocess(256, 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))  # ImageNet's
CLIP_PREPROCESS = Preprocess(
    224, 224, (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
)


def preprocess(images: Sequence[Image.Image], how: Preprocess) -> torch.Tensor:
    """PIL images -> (N, 3, crop, crop) float32, as the metrics' torchvision reference code computes it."""
    out = []
    for image in images:
        image = image.convert("RGB")
        w, h = image.size
        short, long = (w, h) if w <= h else (h, w)
        new_short, new_long = how.resize, int(how.resize * long / short)
        image = image.resize((new_short, new_long) if w <= h else (new_long, new_short), Image.BICUBIC)
        w, h = image.size
        top, left = int(round((h - how.crop) / 2.0)), int(round((w - how.crop) / 2.0))
        image = image.crop((left, top, left + how.crop, top + how.crop))
        x = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).reshape(how.crop, how.crop, 3)
        out.append(x.permute(2, 0, 1).float() / 255)
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in (how.mean, how.std))
    return (torch.stack(out) - mean) / std


@dataclass(frozen=True)
class Tower:
    """A vision transformer's shape, as its Hugging Face config.json gives it."""

    width: int
    layers: int
    heads: int
    intermediate: int
    patch: int
    image_size: int
    act: str
    eps: float

    @property
    def positions(self) -> int:
        return (self.image_size // self.patch) ** 2 + 1

    def layer_config(self) -> CLIPConfig:
        return CLIPConfig(width=self.width, layers=self.layers, heads=self.heads, intermediate=self.intermediate,
                          act=self.act)  # fmt: skip


# ----------------------------------------------------------------------------- CLIP


class CLIPVisionEmbeddings(nn.Module):
    def __init__(self, t: Tower):
        super().__init__()
        self.class_embedding = nn.Parameter(torch.empty(t.width))
        self.patch_embedding = nn.Conv2d(3, t.width, t.patch, stride=t.patch, bias=False)
        self.position_embedding = nn.Embedding(t.positions, t.width)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embedding(pixels).flatten(2).transpose(1, 2)
        cls = self.class_embedding.expand(len(pixels), 1, -1)
        return torch.cat([cls, patches], dim=1) + self.position_embedding.weight


class CLIPVisionTransformer(nn.Module):
    def __init__(self, t: Tower):
        super().__init__()
        self.embeddings = CLIPVisionEmbeddings(t)
        self.pre_layrnorm = nn.LayerNorm(t.width, eps=t.eps)  # sic: transformers' name
        self.encoder = clip.Encoder(t.layer_config(), causal=False)
        self.post_layernorm = nn.LayerNorm(t.width, eps=t.eps)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        h = self.encoder(self.pre_layrnorm(self.embeddings(pixels)))
        return self.post_layernorm(h[:, 0])


class CLIPModel(nn.Module):
    """`image_features(pixels)` and `text_features(ids)`, projected into CLIP's shared space (not normalised)."""

    def __init__(self, text: CLIPConfig, vision: Tower, projection: int):
        super().__init__()
        self.text_model = clip.TextModel(text)
        self.vision_model = CLIPVisionTransformer(vision)
        self.visual_projection = nn.Linear(vision.width, projection, bias=False)
        self.text_projection = nn.Linear(text.width, projection, bias=False)
        self.logit_scale = nn.Parameter(torch.empty(()))

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.visual_projection(self.vision_model(pixels))

    def text_features(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, 77) token ids, each row with an end token: the text's feature is read there (the padding after it
        is never attended to: the attention is causal)."""
        tm = self.text_model
        h = tm.final_layer_norm(tm.encoder(tm.embeddings(ids)))
        eos = (ids == EOS).int().argmax(-1)  # the first end token
        return self.text_projection(h[torch.arange(len(ids)), eos])


def clip_ids(texts: Sequence[str]) -> torch.Tensor:
    """Texts -> (B, 77) ids as CLIP's tokenizer gives them: start, at most 75 tokens (truncated), end, padding."""
    tok = get_tokenizer()
    rows = []
    for text in texts:
        ids = [BOS, *tok.encode(text)[: CONTEXT_LEN - 2], EOS]
        rows.append(ids + [EOS] * (CONTEXT_LEN - len(ids)))
    return torch.tensor(rows, dtype=torch.int64)


# ----------------------------------------------------------------------------- DINO (transformers' ViTModel)


class ViTPatchEmbeddings(nn.Module):
    def __init__(self, t: Tower):
        super().__init__()
        self.projection = nn.Conv2d(3, t.width, t.patch, stride=t.patch)


class ViTEmbeddings(nn.Module):
    def __init__(self, t: Tower):
        super().__init__()
        self.cls_token = nn.Parameter(torch.empty(1, 1, t.width))
        self.position_embeddings = nn.Parameter(torch.empty(1, t.positions, t.width))
        self.patch_embeddings = ViTPatchEmbeddings(t)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embeddings.projection(pixels).flatten(2).transpose(1, 2)
        return (
            torch.cat([self.cls_token.expand(len(pixels), -1, -1), patches], dim=1) + self.position_embeddings
        )


class ViTSelfAttention(nn.Module):
    def __init__(self, t: Tower):
        super().__init__()
        self.heads = t.heads
        self.query, self.key, self.value = (nn.Linear(t.width, t.width) for _ in range(3))


class Dense(nn.Module):
    """transformers' one-layer wrappers (`ViTSelfOutput`, `ViTIntermediate`, `ViTOutput`): a `dense` inside."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.dense = nn.Linear(n_in, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense(x)


class ViTAttention(nn.Module):
    def __init__(self, t: Tower):
        super().__init__()
        self.attention = ViTSelfAttention(t)
        self.output = Dense(t.width, t.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.attention
        return self.output(attention(a.query(x), a.key(x), a.value(x), a.heads))


class ViTLayer(nn.Module):
    def __init__(self, t: Tower):
        super().__init__()
        self.attention = ViTAttention(t)
        self.intermediate = Dense(t.width, t.intermediate)
        self.output = Dense(t.intermediate, t.width)
        self.layernorm_before = nn.LayerNorm(t.width, eps=t.eps)
        self.layernorm_after = nn.LayerNorm(t.width, eps=t.eps)
        self.act = F.gelu if t.act == "gelu" else clip.quick_gelu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.layernorm_before(x))
        return x + self.output(self.act(self.intermediate(self.layernorm_after(x))))


class ViTEncoder(nn.Module):
    def __init__(self, t: Tower):
        super().__init__()
        self.layer = nn.ModuleList([ViTLayer(t) for _ in range(t.layers)])


class ViTModel(nn.Module):
    """`features(pixels)`: the final layer-normed CLS token, DINO's image embedding."""

    def __init__(self, t: Tower):
        super().__init__()
        self.embeddings = ViTEmbeddings(t)
        self.encoder = ViTEncoder(t)
        self.layernorm = nn.LayerNorm(t.width, eps=t.eps)

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.embeddings(pixels)
        for layer in self.encoder.layer:
            x = layer(x)
        return self.layernorm(x)[:, 0]


# ----------------------------------------------------------------------------- loading Hugging Face folders


def load_clip(folder: str | Path) -> CLIPModel:
    """A transformers `CLIPModel` folder (config.json and its weights) as booth's CLIPModel, in eval mode."""
    folder = Path(folder)
    config = _config(folder, "CLIP")
    try:
        t, v = config["text_config"], config["vision_config"]
        text = CLIPConfig(vocab_size=t.get("vocab_size", 49408), width=t.get("hidden_size", 512),
                          layers=t.get("num_hidden_layers", 12), heads=t.get("num_attention_heads", 8),
                          intermediate=t.get("intermediate_size", 2048),
                          max_positions=t.get("max_position_embeddings", 77), act=t.get("hidden_act", "quick_gelu"))  # fmt: skip
        text.validate()
        vision = _tower(v, {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
                            "intermediate_size": 3072, "patch_size": 32, "hidden_act": "quick_gelu"}, 1e-5)  # fmt: skip
        with torch.device("meta"):
            model = CLIPModel(text, vision, int(config.get("projection_dim", 512)))
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as e:
        raise BoothError(
            f"{folder / 'config.json'} is not a CLIP model config booth can read ({e})"
        ) from None
    for part, eps in (
        (model.text_model, float(t.get("layer_norm_eps", 1e-5))),
        (model.vision_model, vision.eps),
    ):
        for m in part.modules():  # booth's text-encoder layers are built with LayerNorm's default eps
            if isinstance(m, nn.LayerNorm):
                m.eps = eps
    weights = {k: v for k, v in _weights(folder).items() if not k.endswith("position_ids")}
    return _assign(model, weights, folder, "CLIP")


def load_dino(folder: str | Path) -> ViTModel:
    """A transformers `ViTModel` folder (DINO's, e.g. facebook/dino-vits16) as booth's ViTModel, in eval mode."""
    folder = Path(folder)
    config = _config(folder, "DINO")
    try:
        tower = _tower(config, {"hidden_size": 384, "num_hidden_layers": 12, "num_attention_heads": 6,
                                "intermediate_size": 1536, "patch_size": 16, "hidden_act": "gelu"}, 1e-12)  # fmt: skip
        with torch.device("meta"):
            model = ViTModel(tower)
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as e:
        raise BoothError(f"{folder / 'config.json'} is not a ViT model config booth can read ({e})") from None
    weights = {k.removeprefix("vit."): v for k, v in _weights(folder).items()}
    weights = {k: v for k, v in weights.items() if not k.startswith(("pooler.", "classifier."))}
    return _assign(model, weights, folder, "DINO")


def _tower(c: dict, defaults: dict, eps: float) -> Tower:
    get = lambda key: c.get(key, defaults.get(key))  # noqa: E731
    t = Tower(width=int(get("hidden_size")), layers=int(get("num_hidden_layers")), heads=int(get("num_attention_heads")),
              intermediate=int(get("intermediate_size")), patch=int(get("patch_size")),
              image_size=int(c.get("image_size", 224)), act=str(get("hidden_act")),
              eps=float(c.get("layer_norm_eps", eps)))  # fmt: skip
    if min(t.width, t.layers, t.heads, t.intermediate, t.patch, t.image_size) <= 0 or t.width % t.heads:
        raise ValueError("sizes must be positive and the heads must divide the width")
    if t.act not in ("gelu", "quick_gelu") or not math.isfinite(t.eps) or t.eps <= 0:
        raise ValueError(f"unsupported activation {t.act!r} or layer-norm eps {t.eps}")
    return t


def _config(folder: Path, what: str) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise BoothError(f"{folder} is not a {what} model folder (no config.json)")
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise BoothError(f"cannot read {path} ({e})") from None
    if not isinstance(config, dict):
        raise BoothError(f"{path} is not a JSON object")
    return config


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from .checkpoint import read_pickle, read_safetensors

    for name in TOWER_WEIGHTS:
        if (folder / name).is_file():
            f = folder / name
            return read_safetensors(f)[0] if f.suffix == ".safetensors" else read_pickle(f)
    raise BoothError(f"no weights in {folder} (expected {' or '.join(TOWER_WEIGHTS)})")


def _assign(model: nn.Module, weights: dict[str, torch.Tensor], folder: Path, what: str):
    expected = model.state_dict()
    missing = [k for k in expected if k not in weights]
    wrong = [k for k, v in expected.items() if k in weights and weights[k].shape != v.shape]
    if missing or wrong:
        k = (missing or wrong)[0]
        raise BoothError(f"{folder} is not a {what} model booth can load: {len(missing)} weights missing and "
                         f"{len(wrong)} wrongly shaped (e.g. {k})")  # fmt: skip
    model.load_state_dict({k: weights[k].float() for k in expected}, strict=True, assign=True)
    return model.eval().requires_grad_(False)
