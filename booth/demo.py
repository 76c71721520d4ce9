"""booth's built-in demo model: Stable Diffusion's architecture at a tiny size, trained by booth itself, from
scratch, on the synthetic shapes of `booth.shapes`. It ships in the package (booth/data/demo.safetensors, with
its config in the file's metadata), so `booth txt2img -m demo ...` works anywhere, in seconds, with no download.

Training has two stages, both run by `booth.train.fit` (the DreamBooth loop):
  1. the KL autoencoder: L1 reconstruction plus a small KL term;
  2. the UNet and a small CLIP-architecture text encoder together, on the diffusion loss, with the VAE frozen.

    booth train-demo -o outputs --seed 0          # reproduces the shipped weights (about an hour on 2 CPU cores)
"""

from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path

import torch

from .atomic import clean_stale, locked
from .checkpoint import read_checkpoint, save_checkpoint
from .config import CLIPConfig, ModelConfig, UNetConfig, VAEConfig
from .data import Cycler, prepare
from .device import autocast
from .formats import CHECKPOINT_FOLDER
from .images import save_png
from .model import build
from .options import DemoRecipe, Settings
from .pipeline import StableDiffusion
from .sampling import randn
from .shapes import COLORS, SHAPES, draw, partial_caption, random_sample
from .tokenizer import get_tokenizer
from .train import Dist, diffusion_loss, fit

SIZE = 64
MEMORY_HINT = "while training the demo model: it needs about 1 GB; close other programs, or use -d cuda"

DEMO = ModelConfig(
    unet=UNetConfig(
        model_channels=32,
        channel_mult=(1, 2, 4),
        num_res_blocks=1,
        attention_resolutions=(2, 4),
        num_heads=4,
        context_dim=64,
        norm_groups=8,
    ),  # fmt: skip
    vae=VAEConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, norm_groups=8),
    clip=CLIPConfig(width=64, layers=3, heads=2, intermediate=256),
    sample_size=SIZE,
)


class ShapeStream:
    """Endless random scenes and captions; the scene for each image comes from `gen`, so it resumes exactly."""

    def __init__(self, gen: torch.Generator, batch: int, captions: bool):
        self.gen, self.batch, self.captions = gen, batch, captions

    def next(self) -> tuple[torch.Tensor, list[str], list[torch.Generator]]:
        seeds = torch.randint(0, 2**62, (self.batch,), generator=self.gen).tolist()
        images, captions, gens = [], [], []
        for s in seeds:
            rng = random.Random(s)
            sample = random_sample(rng)
            images.append(prepare(draw(sample, SIZE), (SIZE, SIZE)))
            captions.append(partial_caption(sample, rng) if self.captions else sample.caption)
            gens.append(torch.Generator().manual_seed(s))
        return torch.stack(images), captions, gens


class AutoencoderTask:
    """Stage 1 for `fit`: the VAE alone."""

    def __init__(self, recipe: DemoRecipe, dist: Dist):
        self.recipe, self.device = recipe, dist.device
        self.amp_dtype, self.memory_hint = None, MEMORY_HINT
        torch.manual_seed(recipe.seed)
        self.model = build(DEMO, device=dist.device)
        self.vae = self.model.vae.float().train()
        self.params = list(self.vae.parameters())
        self.gens = {"data": torch.Generator().manual_seed(recipe.seed)}
        self.data = ShapeStream(self.gens["data"], recipe.vae_batch, captions=False)

    def losses(self) -> dict[str, torch.Tensor]:
        x, _, gens = self.data.next()
        x = x.to(self.device)
        mean, logvar = self.vae.encode(x)
        noise = randn(mean.shape, gens, self.device)
        z = mean + torch.exp(0.5 * logvar) * noise
        rec = (self.vae.decode(z) - x).abs().mean()
        kl = 0.5 * (mean**2 + logvar.exp() - 1 - logvar).sum(dim=(1, 2, 3)).mean()
        return {"loss": rec + self.recipe.kl_weight * kl, "reconstruction": rec, "kl": kl}

    def save(self, run: Path, step: int) -> Path:
        path = run / CHECKPOINT_FOLDER / f"vae-{step:06d}.safetensors"
        path.parent.mkdir(exist_ok=True)
        sd = {k: v for k, v in self.model.state_dict().items() if k.startswith("first_stage_model.")}
        save_checkpoint(sd, path, config=DEMO)
        return path

    def state_dict(self) -> dict:
        return {"vae": self.vae.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.vae.load_state_dict(state["vae"])

    def preview(self, run: Path, step: int) -> None:
        pass


class TextToImageTask:
    """Stage 2 for `fit`: UNet and text encoder from scratch on captioned scenes, the VAE of stage 1 frozen.
    The scenes are a fixed set whose latents are encoded once; captions are re-drawn each time a scene is used."""

    def __init__(self, recipe: DemoRecipe, vae_file: Path, dist: Dist):
        self.recipe, self.noise, self.device = recipe, recipe.noise(), dist.device
        # fp32, no autocast: the recipe then reproduces bit for bit on a CPU
        self.amp_dtype, self.memory_hint = None, MEMORY_HINT
        self.amp = autocast(dist.device, self.amp_dtype)
        torch.manual_seed(recipe.seed + 1)
        model = build(DEMO, device=dist.device)
        model.load_state_dict(read_checkpoint(vae_file).state_dict, strict=False)
        model.vae.requires_grad_(False).eval()
        rng = random.Random(recipe.seed + 1)
        self.scenes = [random_sample(rng) for _ in range(recipe.scenes)]
        self.moments = self._encode_scenes(model)  # (N, 2 [mean, std], 4, h, w)
        scale = round(recipe.latent_std / float(self.moments[:, 0].std()), 5)
        self.model = model = _with_config(
            model, replace(DEMO, scale_factor=scale, pyramid_noise=recipe.pyramid_noise)
        )
        model.unet.train()
        model.text_encoder.train()
        self.params = list(model.unet.parameters()) + list(model.text_encoder.parameters())
        self.gens = {"data": torch.Generator().manual_seed(recipe.seed + 1)}
        self.order = Cycler(len(self.scenes), self.gens["data"])
        self.tokenizer = get_tokenizer()
        self.sd = StableDiffusion(model, dist.device, torch.float32, "demo")
        self.alphas_cumprod = self.sd.schedule.alphas_cumprod.to(dist.device)

    @torch.no_grad()
    def _encode_scenes(self, model) -> torch.Tensor:
        out = []
        for k in range(0, len(self.scenes), 64):
            x = torch.stack([prepare(draw(s, SIZE), (SIZE, SIZE)) for s in self.scenes[k : k + 64]])
            mean, logvar = model.vae.encode(x.to(self.device))
            out.append(torch.stack([mean, torch.exp(0.5 * logvar)], dim=1).cpu())
        return torch.cat(out)

    def losses(self) -> dict[str, torch.Tensor]:
        idx = self.order.take(self.recipe.unet_batch)
        seeds = torch.randint(0, 2**62, (len(idx),), generator=self.gens["data"]).tolist()
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        captions = [partial_caption(self.scenes[i], random.Random(s)) for i, s in zip(idx, seeds)]
        mean, std = self.moments[idx, 0], self.moments[idx, 1]
        noise = randn(mean.shape, gens)
        x0 = ((mean + std * noise) * self.model.config.scale_factor).to(self.device)
        ids = self.tokenizer(captions).to(self.device)
        with self.amp:
            context = self.model.text_encoder(ids)
        loss, _, _ = diffusion_loss(
            self.noise, x0, gens, context, len(x0), self.model.unet, self.alphas_cumprod, self.amp
        )
        return {"loss": loss}

    def save(self, run: Path, step: int) -> Path:
        path = run / CHECKPOINT_FOLDER / f"demo-{step:06d}.safetensors"
        path.parent.mkdir(exist_ok=True)
        meta = {"booth.demo_recipe": repr(self.recipe), "booth.step": str(step)}
        save_checkpoint(
            self.model.state_dict(), path, metadata=meta, config=self.model.config, dtype=torch.float16
        )
        return path

    def state_dict(self) -> dict:
        return {"unet": self.model.unet.state_dict(), "text_encoder": self.model.text_encoder.state_dict(),
                "order": self.order.state_dict()}  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        self.model.unet.load_state_dict(state["unet"])
        self.model.text_encoder.load_state_dict(state["text_encoder"])
        self.order.load_state_dict(state["order"])

    def preview(self, run: Path, step: int) -> None:
        """One image per shape, in fixed colours and seeds."""
        folder = run / "samples" / f"step-{step:06d}"
        folder.mkdir(parents=True, exist_ok=True)
        self.model.eval()
        colors = list(COLORS)
        for i, shape in enumerate(SHAPES):
            prompt = f"a {colors[i]} {shape} on a {colors[(i + 2) % len(colors)]} background"
            image = self.sd.txt2img(prompt, seeds=[i], settings=Settings(height=SIZE, width=SIZE))[0]
            save_png(image, folder / f"{i:04d}.png", prompt)
        self.model.train()
        self.model.vae.eval()


def _with_config(model, cfg: ModelConfig):
    model.config = cfg
    return model


def train_demo(recipe: DemoRecipe, run: Path, dist: Dist, resume: bool = False) -> Path:
    """Both stages in `run/vae` and `run/unet`; resumes whichever stage is unfinished. Returns the model file."""
    recipe.validate()
    vae_run, unet_run = run / "vae", run / "unet"
    for folder in (vae_run, unet_run):
        folder.mkdir(parents=True, exist_ok=True)
    with locked(run, "training the demo model"):
        clean_stale(run, recursive=True)
        vae_file = vae_run / CHECKPOINT_FOLDER / f"vae-{recipe.vae_steps:06d}.safetensors"
        command = f"booth train-demo -r {run}"
        if not vae_file.exists():
            fit(AutoencoderTask(recipe, dist), recipe.vae_loop(), vae_run, dist, _has_state(vae_run, resume),
                name="train-demo (vae)", resume_command=command)  # fmt: skip
        return fit(TextToImageTask(recipe, vae_file, dist), recipe.unet_loop(), unet_run, dist,
                   _has_state(unet_run, resume), name="train-demo (unet)", resume_command=command)  # fmt: skip


def _has_state(stage: Path, resume: bool) -> bool:
    return resume and any((stage / "state").glob("*.pt"))
