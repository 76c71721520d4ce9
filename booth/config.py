"""Model configurations: small dataclasses with Stable Diffusion v1 defaults, plus a tiny preset for tests.

Field names follow the original CompVis configs (`model_channels`, `channel_mult`, `attention_resolutions`,
...) so a reader can hold them against `v1-inference.yaml`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field


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
    transformer_depth: int = 1
    context_dim: int = 768
    norm_groups: int = 32  # GroupNorm groups; small models need fewer so each group spans several channels

    def __post_init__(self):
        # One spelling per config, so configs read from different sources compare equal.
        object.__setattr__(
            self, "attention_resolutions", tuple(sorted(set(self.attention_resolutions), reverse=True))
        )


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


@dataclass(frozen=True)
class CLIPConfig:
    vocab_size: int = 49408
    width: int = 768
    layers: int = 12
    heads: int = 12
    intermediate: int = 3072
    max_positions: int = 77
    act: str = "quick_gelu"


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

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ModelConfig:
        d = json.loads(text)
        parts = {"unet": UNetConfig, "vae": VAEConfig, "clip": CLIPConfig}
        kwargs = {}
        for name, value in d.items():
            if name in parts:
                value = parts[name](**{k: tuple(v) if isinstance(v, list) else v for k, v in value.items()})
            kwargs[name] = value
        return cls(**kwargs)


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

PRESETS = {"sd1": SD1, "tiny": TINY}
