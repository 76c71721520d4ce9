"""booth: Stable Diffusion txt2img, img2img and DreamBooth in compact, tested PyTorch.

from booth import StableDiffusion
sd = StableDiffusion.from_pretrained("sd15", device="cuda", dtype=torch.float16)
images = sd.txt2img("a photo of a dog on the beach", seeds=[1, 2, 3])
"""

__version__ = "0.1.0"

__all__ = ["StableDiffusion", "Settings", "load", "__version__"]


def __getattr__(name):
    # Lazy, so `booth --help` and `import booth.hub` do not pay for importing torch.
    if name in ("StableDiffusion", "Settings"):
        from . import pipeline

        return getattr(pipeline, name)
    if name == "load":
        from .pipeline import StableDiffusion

        return StableDiffusion.from_pretrained
    raise AttributeError(name)
