"""Evaluation metrics of the Attend-and-Excite paper (pure: torch only, no ComfyUI, no model code).

The protocol (official ``metrics/`` code, see the README's evaluation section):

- a prompt's text embedding is the mean of its L2-normalised embeddings in the 80 ImageNet templates of CLIP's
  prompt-engineering notebook, renormalised (:func:`templated_text_embedding`);
- *full-prompt similarity*: cosine between the image embedding and the templated prompt;
- *minimum-object similarity*: the prompt split on ``' and '`` (else ``' with '``), the smaller of the two halves'
  similarities to the image;
- *text-text similarity*: cosine between a caption's (un-templated) embedding and the templated prompt;
- *neglect rate* (this pack's addition): share of samples where some subject's max attention is below a threshold.

Model calls are passed in as functions (``encode_text_fn(list[str]) -> (N, D)``), so this module stays testable with
tiny tensors.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence

import torch

IMAGENET_TEMPLATES: tuple[str, ...] = (
    "a bad photo of a {}.",
    "a photo of many {}.",
    "a sculpture of a {}.",
    "a photo of the hard to see {}.",
    "a low resolution photo of the {}.",
    "a rendering of a {}.",
    "graffiti of a {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
    "a tattoo of a {}.",
    "the embroidered {}.",
    "a photo of a hard to see {}.",
    "a bright photo of a {}.",
    "a photo of a clean {}.",
    "a photo of a dirty {}.",
    "a dark photo of the {}.",
    "a drawing of a {}.",
    "a photo of my {}.",
    "the plastic {}.",
    "a photo of the cool {}.",
    "a close-up photo of a {}.",
    "a black and white photo of the {}.",
    "a painting of the {}.",
    "a painting of a {}.",
    "a pixelated photo of the {}.",
    "a sculpture of the {}.",
    "a bright photo of the {}.",
    "a cropped photo of a {}.",
    "a plastic {}.",
    "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "a rendering of the {}.",
    "a {} in a video game.",
    "a photo of one {}.",
    "a doodle of a {}.",
    "a close-up photo of the {}.",
    "a photo of a {}.",
    "the origami {}.",
    "the {} in a video game.",
    "a sketch of a {}.",
    "a doodle of the {}.",
    "a origami {}.",
    "a low resolution photo of a {}.",
    "the toy {}.",
    "a rendition of the {}.",
    "a photo of the clean {}.",
    "a photo of a large {}.",
    "a rendition of a {}.",
    "a photo of a nice {}.",
    "a photo of a weird {}.",
    "a blurry photo of a {}.",
    "a cartoon {}.",
    "art of a {}.",
    "a sketch of the {}.",
    "a embroidered {}.",
    "a pixelated photo of a {}.",
    "itap of the {}.",
    "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.",
    "a plushie {}.",
    "a photo of the nice {}.",
    "a photo of the small {}.",
    "a photo of the weird {}.",
    "the cartoon {}.",
    "art of the {}.",
    "a drawing of the {}.",
    "a photo of the large {}.",
    "a black and white photo of a {}.",
    "the plushie {}.",
    "a dark photo of a {}.",
    "itap of a {}.",
    "graffiti of the {}.",
    "a toy {}.",
    "itap of my {}.",
    "a photo of a cool {}.",
    "a photo of a small {}.",
    "a tattoo of the {}.",
)

EncodeTextFn = Callable[[list[str]], torch.Tensor]

_DOUBLE_ARTICLE = re.compile(r"\b(?:a|the) a\b")


def clean_prompt(text: str) -> str:
    """Collapse the doubled articles that templating creates: ``'a a'`` and ``'the a'`` become ``'a'``.

    Whole words only, so ``'a apple'`` stays as it is.
    """
    return _DOUBLE_ARTICLE.sub("a", text)


def templated_prompts(text: str) -> list[str]:
    """``text`` in each of the 80 templates, cleaned."""
    return [clean_prompt(t.format(text)) for t in IMAGENET_TEMPLATES]


def split_subjects(prompt: str) -> tuple[str, str] | None:
    """The two halves of a benchmark prompt: split on ``' and '``, else ``' with '``; ``None`` if neither."""
    for sep in (" and ", " with "):
        if sep in prompt:
            first, second = prompt.split(sep, 1)
            return first.strip(), second.strip()
    return None


def subject_nouns(prompt: str) -> list[str]:
    """The nouns to excite in a benchmark prompt: the last word of each half (``'a red car'`` -> ``'car'``)."""
    halves = split_subjects(prompt)
    if halves is None:
        raise ValueError(f"prompt {prompt!r} has no ' and ' / ' with ': cannot find its two subjects")
    return [half.split()[-1] for half in halves]


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def templated_text_embedding(encode_text_fn: EncodeTextFn, text: str) -> torch.Tensor:
    """``(D,)`` unit vector: mean of the L2-normalised embeddings of ``text`` in the 80 templates, renormalised."""
    emb = encode_text_fn(templated_prompts(text)).float()
    if emb.ndim != 2 or emb.shape[0] != len(IMAGENET_TEMPLATES):
        raise ValueError(f"encode_text_fn returned shape {tuple(emb.shape)}, expected ({len(IMAGENET_TEMPLATES)}, D)")
    return l2_normalize(l2_normalize(emb).mean(0))


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity over the last dimension (broadcasting)."""
    return (l2_normalize(a.float()) * l2_normalize(b.float())).sum(-1)


def full_prompt_similarity(image_emb: torch.Tensor, prompt_emb: torch.Tensor) -> torch.Tensor:
    """Cosine between image embeddings ``(..., D)`` and the templated prompt embedding ``(D,)``."""
    return cosine(image_emb, prompt_emb)


def min_object_similarity(image_emb: torch.Tensor, subject_embs: Sequence[torch.Tensor]) -> torch.Tensor:
    """The smallest cosine between image embeddings ``(..., D)`` and each subject's templated embedding."""
    if not subject_embs:
        raise ValueError("min_object_similarity needs at least one subject embedding")
    return torch.stack([cosine(image_emb, s) for s in subject_embs]).min(0).values


def text_text_similarity(caption_emb: torch.Tensor, prompt_emb: torch.Tensor) -> torch.Tensor:
    """Cosine between caption embeddings ``(..., D)`` (un-templated) and the templated prompt embedding."""
    return cosine(caption_emb, prompt_emb)


def neglected(maxima: torch.Tensor, threshold: float) -> torch.Tensor:
    """``(B,)`` bool: some subject of the sample has max attention below ``threshold``. ``maxima`` is ``(B, S)``."""
    if maxima.ndim != 2:
        raise ValueError(f"maxima must be (B, S), got shape {tuple(maxima.shape)}")
    return (maxima < threshold).any(-1)


def neglect_rate(maxima: torch.Tensor, threshold: float) -> float:
    """Share of samples in ``(B, S)`` ``maxima`` with a neglected subject (0 for an empty batch)."""
    flags = neglected(maxima, threshold)
    return float(flags.float().mean()) if flags.numel() else 0.0


def report_text(report: Mapping) -> str:
    """The Report node's numbers as lines for people: the step read, then per image each subject's max attention,
    ``← neglected`` where one is below the threshold. ``report`` has the keys the Report node outputs."""
    step, n = int(report["step"]), int(report["num_steps"])
    which = "the last guided step" if report["guided_steps"] else "where the guided half would end (plain run)"
    lines = [f"Max attention per subject at step {step + 1} of {n} ({which}); neglected below "
             f"{float(report['threshold']):.2f}."]
    for b, (row, flag) in enumerate(zip(report["max_attention"], report["neglected"]), 1):
        values = ", ".join(f"{label} {float(v):.2f}" for label, v in zip(report["labels"], row))
        lines.append(f"image {b}: {values}" + ("  ← neglected" if flag else ""))
    return "\n".join(lines)
