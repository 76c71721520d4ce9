"""Model configurations: small dataclasses with Stable Diffusion v1 defaults, plus a tiny preset for tests.

Field names follow the original CompVis configs (`model_channels`, `channel_mult`, `attention_resolutions`,
...) so a reader can hold them against `v1-inference.yaml`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field

# What a UNet can be trained to predict: the noise, or v = alpha * eps - sigma * x0 (Salimans & Ho 2022).
PREDICTIONS = ("eps", "v")
# SD1's CLIP-L, SD 2.x's OpenCLIP ViT-H, or SDXL's two (CLIP-L and OpenCLIP ViT-bigG, concatenated)
TEXT_ENCODERS = ("clip", "openclip", "sdxl")
SIZE_FEATURES = 256  # SDXL embeds each of its six size numbers with this many sinusoidal features


@dataclass(frozen=True)
class UNetConfig:
    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    # Downsampling factors (1, 2, 4, ...) of the levels that get a spatial transformer.
    attention_resolutions: tuple[int, ...] = (4, 2, 1)
    num_heads: int = 8
    # Transformer blocks per spatial transformer: one number, or one per level (SDXL: 0, 2, 10; a level
    # without attention counts 0); the middle block's is transformer_depth_middle, by default the last level's.
    transformer_depth: int | tuple[int, ...] = 1
    transformer_depth_middle: int | None = None
    context_dim: int = 768
    norm_groups: int = 32  # GroupNorm groups; small models need fewer so each group spans several channels
    # SD 2.x and SDXL: heads of this many channels each (num_heads is then unused), and linear proj_in/proj_out
    # in the spatial transformers (CompVis' use_linear_in_transformer) instead of 1x1 convolutions
    num_head_channels: int | None = None
    linear_proj: bool = False
    # SDXL: the width of the vector `y` (pooled text and size features) that label_emb adds to the time
    # embedding (CompVis' adm_in_channels with num_classes "sequential"); 0 for none
    adm_in_channels: int = 0

    def heads(self, channels: int) -> int:
        """The attention heads of a transformer over `channels`."""
        return channels // self.num_head_channels if self.num_head_channels else self.num_heads

    def depth(self, level: int | None) -> int:
        """The transformer blocks at a level of the UNet (`None`: the middle block)."""
        d = self.transformer_depth
        if level is None:
            return self.transformer_depth_middle or (d if isinstance(d, int) else d[-1])
        return d if isinstance(d, int) else d[level]

    def __post_init__(self):
        # One spelling per config, so configs read from different sources compare equal.
        object.__setattr__(
            self, "attention_resolutions", tuple(sorted(set(self.attention_resolutions), reverse=True))
        )
        if (
            self.num_head_channels is not None
        ):  # num_heads is then unused: its default, whatever a source said
            object.__setattr__(self, "num_heads", UNetConfig.num_heads)
        self._canonical_depths()

    def _canonical_depths(self) -> None:
        """One spelling of the depths: 0 at levels without attention, the middle's None when it is the default
        (the last level's), and one number when every transformer has the same."""
        d, middle = self.transformer_depth, self.transformer_depth_middle
        d = tuple(d) if isinstance(d, list) else d
        if type(d) is int and middle == d:
            object.__setattr__(self, "transformer_depth_middle", None)
        if not (isinstance(d, tuple) and len(d) == len(self.channel_mult) and all(type(v) is int for v in d)):
            return  # validate() says what is wrong
        middle = d[-1] if middle is None else middle  # CompVis' default, before levels are zeroed
        d = tuple(v if 2**i in self.attention_resolutions else 0 for i, v in enumerate(d))
        used = {v for i, v in enumerate(d) if 2**i in self.attention_resolutions}
        if used <= {middle}:
            d, middle = middle, None
        elif middle == d[-1]:
            middle = None
        object.__setattr__(self, "transformer_depth", d)
        object.__setattr__(self, "transformer_depth_middle", middle)

    def validate(self) -> None:
        _positive(
            self, "in_channels", "out_channels", "model_channels", "num_heads", "context_dim", "norm_groups"
        )
        _positive(self, "num_res_blocks", most=MOST)
        if self.num_head_channels is not None:
            _positive(self, "num_head_channels")
        if self.transformer_depth_middle is not None:
            _positive(self, "transformer_depth_middle", most=MOST)
        if self.adm_in_channels:
            _positive(self, "adm_in_channels")
        self._validate_depth()
        _positive_ints("unet.channel_mult", self.channel_mult)
        _positive_ints("unet.attention_resolutions", self.attention_resolutions, allow_empty=True)
        last = len(self.channel_mult) - 1
        for width in (self.model_channels * m for m in (1, *self.channel_mult)):
            if width % self.norm_groups:
                raise ValueError(
                    f"the UNet's {width} channels are not a multiple of {self.norm_groups} groups"
                )
        for level, mult in enumerate(self.channel_mult):  # the middle block attends at the last level
            width = self.model_channels * mult
            attends = 2**level in self.attention_resolutions or level == last
            split = self.num_head_channels or self.num_heads
            if attends and width % split:
                what = f"heads of {split} channels" if self.num_head_channels else f"{split} heads"
                raise ValueError(f"{what} do not divide the {width} channels of UNet level {level}")

    def _validate_depth(self) -> None:
        d = self.transformer_depth
        if isinstance(d, int):
            _positive(self, "transformer_depth", most=MOST)
            return
        _positive_ints("unet.transformer_depth", d, allow_zero=True)
        if len(d) != len(self.channel_mult):
            raise ValueError(f"unet.transformer_depth needs one depth per level ({len(self.channel_mult)})")
        if any(d[i] < 1 for i in range(len(d)) if 2**i in self.attention_resolutions):
            raise ValueError("unet.transformer_depth must be positive at every level with attention")
        if self.depth(None) < 1:
            raise ValueError("the UNet's middle block needs a transformer depth of at least 1")


@dataclass(frozen=True)
class VAEConfig:
    in_channels: int = 3
    out_ch: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 4
    embed_dim: int = 4
    norm_groups: int = 32

    @property
    def downscale(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    def validate(self) -> None:
        _positive(self, "in_channels", "out_ch", "ch", "z_channels", "embed_dim", "norm_groups")
        _positive(self, "num_res_blocks", most=MOST)
        _positive_ints("vae.ch_mult", self.ch_mult)
        for width in (self.ch * m for m in self.ch_mult):
            if width % self.norm_groups:
                raise ValueError(
                    f"the VAE's {width} channels are not a multiple of {self.norm_groups} groups"
                )


@dataclass(frozen=True)
class CLIPConfig:
    vocab_size: int = 49408
    width: int = 768
    layers: int = 12
    heads: int = 12
    intermediate: int = 3072
    max_positions: int = 77
    act: str = "quick_gelu"
    projection: int = 0  # OpenCLIP's text_projection width (SD 2.x: 1024); 0 for SD1's CLIP-L, which has none

    def validate(self) -> None:
        _positive(self, "width", "heads", "intermediate", "max_positions")
        _positive(self, "vocab_size", most=1 << 20)
        _positive(self, "layers", most=MOST)
        if type(self.projection) is not int or not 0 <= self.projection <= WIDEST:
            raise ValueError(
                f"projection must be a whole number from 0 to {WIDEST} (got {self.projection!r})"
            )
        if self.width % self.heads:
            raise ValueError(f"{self.heads} text encoder heads do not divide its width {self.width}")
        if self.vocab_size < 49408 or self.max_positions < 77:  # CLIP's token ids and its 77-token windows
            raise ValueError("the text encoder needs a vocabulary of at least 49408 and 77 positions")
        if self.act not in ("quick_gelu", "gelu"):
            raise ValueError(f"unknown text encoder activation {self.act!r}")


@dataclass(frozen=True)
class ModelConfig:
    unet: UNetConfig = field(default_factory=UNetConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    clip: CLIPConfig = field(default_factory=CLIPConfig)
    scale_factor: float = 0.18215  # latents are scaled to roughly unit variance before diffusion
    beta_start: float = 0.00085
    beta_end: float = 0.012
    num_train_timesteps: int = 1000
    # The training noise's multi-resolution discount (train.pyramid_noise; SD: 0, white noise). Fine-tuning
    # defaults to it: a model fine-tuned on other noise than it was trained on learns its subject badly.
    pyramid_noise: float = 0.0
    sample_size: int = 512  # the image side the model was trained at: the default --hw
    prediction: str = "eps"  # what the UNet predicts (PREDICTIONS): v for SD 2.x 768-v and v fine-tunes
    zero_snr: bool = (
        False  # trained on a schedule rescaled to zero terminal SNR (Lin et al. 2023): v models only
    )
    text_encoder: str = "clip"  # TEXT_ENCODERS: SD1's CLIP-L, SD 2.x's OpenCLIP ViT-H, or SDXL's pair
    clip2: CLIPConfig | None = None  # SDXL's second text encoder (OpenCLIP ViT-bigG); `clip` is then CLIP-L

    @property
    def family(self) -> str:
        """ "sd1", "sd2" or "sdxl": what the model is, for messages and defaults."""
        return {"clip": "sd1", "openclip": "sd2", "sdxl": "sdxl"}[self.text_encoder]

    @property
    def context_width(self) -> int:
        """The width of the text the UNet attends to (SDXL: both encoders' hidden states side by side)."""
        return self.clip.width + (self.clip2.width if self.clip2 else 0)

    def validate(self) -> None:
        """ValueError for a config no model can be built from (a damaged or hand-edited file's header)."""
        self.unet.validate()
        self.vae.validate()
        self.clip.validate()
        if self.text_encoder not in TEXT_ENCODERS:
            raise ValueError(
                f"text_encoder must be one of {', '.join(TEXT_ENCODERS)} (got {self.text_encoder!r})"
            )
        if (self.text_encoder == "sdxl") != isinstance(self.clip2, CLIPConfig):
            raise ValueError(
                "an SDXL model (text_encoder sdxl), and only one, has a second text encoder clip2"
            )
        if self.clip2 is not None:
            self.clip2.validate()
        if self.unet.context_dim != self.context_width:
            raise ValueError(
                f"the UNet attends to {self.unet.context_dim}-wide text, the encoder is {self.context_width}"
            )
        if self.unet.adm_in_channels != self.adm_width:
            raise ValueError(
                f"the UNet's label_emb takes {self.unet.adm_in_channels} features, the model gives {self.adm_width}"
            )
        _positive(self, "num_train_timesteps", "sample_size")  # at most WIDEST: 131072 steps, pixels a side
        if self.sample_size % 8 or self.num_train_timesteps < 2:
            raise ValueError("sample_size must be a multiple of 8 and num_train_timesteps at least 2")
        for name in ("scale_factor", "beta_start", "beta_end", "pyramid_noise"):
            if not isinstance(getattr(self, name), (int, float)) or not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be a finite number")
        openclip = self.clip2 if self.text_encoder == "sdxl" else self.clip
        if self.text_encoder != "clip" and openclip.projection < 1:
            raise ValueError("an OpenCLIP text encoder needs its projection width (projection)")
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {', '.join(PREDICTIONS)} (got {self.prediction!r})")
        if self.zero_snr is not False and (self.zero_snr is not True or self.prediction != "v"):
            raise ValueError("zero_snr must be true or false, and true only for a v-prediction model")
        if not (
            0 < self.beta_start < self.beta_end < 1 and self.scale_factor > 0 and 0 <= self.pyramid_noise <= 1
        ):
            raise ValueError(
                "need 0 < beta_start < beta_end < 1, scale_factor > 0 and pyramid_noise in [0, 1]"
            )

    @property
    def adm_width(self) -> int:
        """What SDXL's label_emb reads: the pooled text and six size features of SIZE_FEATURES channels each."""
        return self.clip2.projection + 6 * SIZE_FEATURES if self.text_encoder == "sdxl" else 0

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ModelConfig:
        d = json.loads(text)
        if not isinstance(d, dict):
            raise ValueError("not a JSON object")
        parts = {"unet": UNetConfig, "vae": VAEConfig, "clip": CLIPConfig, "clip2": CLIPConfig}
        kwargs = {}
        for name, value in d.items():
            if name in parts and not (name == "clip2" and value is None):
                if not isinstance(value, dict):
                    raise ValueError(f"{name} is not a JSON object")
                value = parts[name](**{k: tuple(v) if isinstance(v, list) else v for k, v in value.items()})
            kwargs[name] = value
        return cls(**kwargs)


# Bounds far above any published model's (SDXL: 32 layers of 5120 features), so that a damaged or hostile config
# is refused before a module tree of its size is built: widths, and counts of layers, blocks and levels
WIDEST, MOST = 1 << 17, 1 << 8


def _positive(cfg, *names: str, most: int = WIDEST) -> None:
    for name in names:
        value = getattr(cfg, name)
        if type(value) is not int or value < 1:
            raise ValueError(f"{name} must be a positive whole number (got {value!r})")
        if value > most:
            raise ValueError(f"{name} is {value}, more than any model has (at most {most})")


def _positive_ints(name: str, values, allow_empty: bool = False, allow_zero: bool = False) -> None:
    if not isinstance(values, tuple) or (not values and not allow_empty) or len(values) > MOST:
        raise ValueError(f"{name} must be a list of positive whole numbers (got {values!r})")
    if any(type(v) is not int or v < (0 if allow_zero else 1) or v > MOST for v in values):
        raise ValueError(f"{name} must hold positive whole numbers up to {MOST} (got {values!r})")


SD1 = ModelConfig()

# Small enough for CPU tests in milliseconds, yet it exercises every code path of SD1: a level with and one
# without attention, several heads, a resampling level in both the UNet and the VAE.
TINY = ModelConfig(
    unet=UNetConfig(
        model_channels=32, channel_mult=(1, 2), attention_resolutions=(2,), num_heads=8, context_dim=128
    ),
    vae=VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1),
    clip=CLIPConfig(width=128, layers=2, heads=2, intermediate=512),
)

# SD 2.x at 512 (v2-inference.yaml): SD1's UNet with linear projections and 64-channel heads, attending to OpenCLIP
# ViT-H's 1024-wide penultimate layer. The 768 ones (v2-inference-v.yaml) are v models: prediction "v", 768.
SD2 = ModelConfig(
    unet=dataclasses.replace(SD1.unet, context_dim=1024, num_head_channels=64, linear_proj=True),
    clip=CLIPConfig(width=1024, layers=24, heads=16, intermediate=4096, act="gelu", projection=1024),
    text_encoder="openclip",
)

# SDXL base 1.0 (SGM's sd_xl_base.yaml): a three-level UNet with 2 and 10 transformer blocks at its two lower
# levels, attending to CLIP-L's and OpenCLIP ViT-bigG's hidden states side by side (768 + 1280).
SDXL = ModelConfig(
    unet=UNetConfig(channel_mult=(1, 2, 4), attention_resolutions=(4, 2), transformer_depth=(0, 2, 10),
                    context_dim=2048, num_head_channels=64, linear_proj=True, adm_in_channels=2816),
    clip=CLIPConfig(),
    clip2=CLIPConfig(width=1280, layers=32, heads=20, intermediate=5120, act="gelu", projection=1280),
    scale_factor=0.13025,
    sample_size=1024,
    text_encoder="sdxl",
)  # fmt: skip

# SDXL's every feature at TINY's scale: a level without attention, per-level depths, label_emb, two encoders.
TINY_SDXL = ModelConfig(
    unet=UNetConfig(model_channels=32, channel_mult=(1, 2, 2), attention_resolutions=(4, 2),
                    transformer_depth=(0, 1, 2), context_dim=64 + 96, num_head_channels=16, linear_proj=True,
                    adm_in_channels=32 + 6 * SIZE_FEATURES),
    vae=TINY.vae,
    clip=CLIPConfig(width=64, layers=2, heads=2, intermediate=256),
    # widths unlike CLIP-L's, as in SDXL (diffusers tells the two encoders of a file apart by them)
    clip2=CLIPConfig(width=96, layers=3, heads=4, intermediate=384, act="gelu", projection=32),
    scale_factor=0.13025,
    sample_size=1024,
    text_encoder="sdxl",
)  # fmt: skip
