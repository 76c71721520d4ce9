"""The DreamBooth paper's metrics (Ruiz et al., CVPR 2023) over embeddings, each a mean of cosine similarities:

- DINO and CLIP-I: every generated image against every real subject image (DINO ViT-S/16 CLS embeddings; CLIP
  image embeddings);
- CLIP-T: each generated image against its prompt, with the subject's identifier removed ("a sks dog in the
  snow" is scored as "a dog in the snow", so the rare token's own embedding does not count);
- PRES: DINO of the plain class prompt's images against the real subject: lower means the class did not
  collapse onto the subject.
"""

from __future__ import annotations

import re

import torch


def mean_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """The mean cosine similarity over all pairs of rows of `a` (N, D) and `b` (M, D)."""
    a, b = (torch.nn.functional.normalize(t.double(), dim=-1) for t in (a, b))
    return float((a @ b.T).mean())


def paired_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """The mean cosine similarity of row i of `a` with row i of `b` (one row of `b` stands for all of them)."""
    a, b = (torch.nn.functional.normalize(t.double(), dim=-1) for t in (a, b))
    return float((a * b.expand_as(a)).sum(-1).mean())


def subject_similarity(generated: torch.Tensor, real: torch.Tensor) -> float:
    """DINO or CLIP-I (by which tower made the embeddings): generated x real pairs."""
    return mean_cosine(generated, real)


def prompt_similarity(images: torch.Tensor, text: torch.Tensor) -> float:
    """CLIP-T: image i against text row i, or against the one text row."""
    return paired_cosine(images, text)


def without_identifier(prompt: str, identifier: str) -> str:
    """The prompt CLIP-T is computed with: `identifier` (the rare token, e.g. "sks") removed as a whole word."""
    if not identifier:
        return prompt
    text = re.sub(rf"(?<!\w){re.escape(identifier)}(?!\w)", " ", prompt)
    return re.sub(r"\s+", " ", text).strip()
