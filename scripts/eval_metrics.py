"""The evaluation's metrics and reports (``scripts/evaluate.py`` renders the images and writes the files).

Per image (:func:`image_metrics`, one ``metrics.csv`` record per ``runs.jsonl`` row): the smaller subject maximum of
the attention and whether a subject was neglected (as the report node read it), and with a CLIP folder
(:class:`Models`) the full-prompt and minimum-object CLIP similarities, with a BLIP folder its caption and the
caption's CLIP text-text similarity to the prompt; model scores are cached in ``OUT/scores.jsonl``
(:class:`ScoreCache`). Over the images: mean and std per method and subset (:func:`aggregate`), as a Markdown table
(:func:`summary_markdown`) and grouped bars (:func:`summary_chart`). Also the progress line both stages print
(:class:`Progress`).

transformers is imported only when a model is loaded.
"""

from __future__ import annotations

import functools
import json
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw, ImageFont

from attention.metrics import (
    full_prompt_similarity,
    min_object_similarity,
    split_subjects,
    templated_text_embedding,
    text_text_similarity,
)

SUBSET_TITLES = {"animals": "Animal-Animal", "animals_objects": "Animal-Object", "objects": "Object-Object"}
METRIC_TITLES = {
    "neglected": "Neglect rate (lower is better)",
    "min_attention": "Smaller subject max attention",
    "full_prompt_sim": "CLIP full-prompt similarity",
    "min_object_sim": "CLIP minimum-object similarity",
    "text_text_sim": "BLIP-CLIP text-text similarity",
}
CSV_FIELDS = ["subset", "method", "prompt", "seed", "image", "step", "min_attention", "neglected",
              "full_prompt_sim", "min_object_sim", "caption", "text_text_sim"]


class Progress:
    """done/total, rate and ETA on stderr (at most every ``every`` seconds, and at the end)."""

    def __init__(self, total: int, every: float = 5.0) -> None:
        self.total, self.done, self.every = total, 0, every
        self.start = self.last = time.monotonic()

    def step(self, what: str = "images") -> None:
        self.done += 1
        now = time.monotonic()
        if now - self.last < self.every and self.done < self.total:
            return
        self.last = now
        rate = self.done / max(now - self.start, 1e-9)
        eta = (self.total - self.done) / rate
        print(f"[evaluate] {self.done}/{self.total} {what}, {rate * 60:.1f}/min, ETA {eta:.0f} s",
              file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------ model metrics
def _features(out: Any) -> torch.Tensor:
    """transformers 4 returns the projected features, 5 an output object with them as ``pooler_output``."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class ClipScorer:
    """CLIP text/image embeddings from a local transformers folder (model + processor)."""

    def __init__(self, path: str, device: str) -> None:
        from transformers import CLIPModel, CLIPProcessor

        self.model = CLIPModel.from_pretrained(path).to(device).eval()
        self.processor = CLIPProcessor.from_pretrained(path)
        self.device = device
        self._text_cache: dict[str, torch.Tensor] = {}

    @torch.inference_mode()
    def encode_text(self, texts: list[str]) -> torch.Tensor:
        inputs = self.processor(text=texts, padding=True, truncation=True, return_tensors="pt").to(self.device)
        return _features(self.model.get_text_features(**inputs)).float().cpu()

    @torch.inference_mode()
    def encode_image(self, image: Image.Image) -> torch.Tensor:
        inputs = self.processor(images=image, return_tensors="pt").to(self.device)
        return _features(self.model.get_image_features(**inputs)).float().cpu()[0]

    def templated(self, text: str) -> torch.Tensor:
        if text not in self._text_cache:
            self._text_cache[text] = templated_text_embedding(self.encode_text, text)
        return self._text_cache[text]


class BlipCaptioner:
    def __init__(self, path: str, device: str) -> None:
        from transformers import BlipForConditionalGeneration, BlipProcessor

        self.model = BlipForConditionalGeneration.from_pretrained(path).to(device).eval()
        self.processor = BlipProcessor.from_pretrained(path)
        self.device = device

    @torch.inference_mode()
    def caption(self, image: Image.Image) -> str:
        inputs = self.processor(images=image, return_tensors="pt").to(self.device)
        ids = self.model.generate(**inputs, max_new_tokens=30)
        return self.processor.decode(ids[0], skip_special_tokens=True).strip()


class Models:
    """CLIP and BLIP, loaded on first use (so a run whose scores are all cached needs neither)."""

    def __init__(self, clip_path: str | None, blip_path: str | None, device: str) -> None:
        self.clip_path, self.blip_path, self.device = clip_path, blip_path, device

    @functools.cached_property
    def clip(self) -> ClipScorer:
        assert self.clip_path is not None
        return ClipScorer(self.clip_path, self.device)

    @functools.cached_property
    def blip(self) -> BlipCaptioner:
        assert self.blip_path is not None
        return BlipCaptioner(self.blip_path, self.device)

    def scores(self, image_path: Path, prompt: str) -> dict[str, Any]:
        """CLIP similarities (and BLIP caption + text-text similarity) of one image."""
        with Image.open(image_path) as im:
            image = im.convert("RGB")
        clip = self.clip
        img = clip.encode_image(image)
        prompt_emb = clip.templated(prompt)
        out: dict[str, Any] = {"full_prompt_sim": float(full_prompt_similarity(img, prompt_emb))}
        halves = split_subjects(prompt)
        if halves is not None:
            out["min_object_sim"] = float(min_object_similarity(img, [clip.templated(h) for h in halves]))
        if self.blip_path:
            out["caption"] = self.blip.caption(image)
            caption_emb = clip.encode_text([out["caption"]])[0]
            out["text_text_sim"] = float(text_text_similarity(caption_emb, prompt_emb))
        return out


class ScoreCache:
    """Model scores per image in ``OUT/scores.jsonl``, keyed by the image file (path, size, mtime) and the model
    folders, so rerunning the metrics after a resume scores only new or re-rendered images."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.entries: dict[str, dict[str, Any]] = {}
        if path.is_file():
            for line in path.read_text().splitlines():
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:
                    continue
                self.entries[entry["key"]] = entry["scores"]

    @staticmethod
    def key(out: Path, image: str, clip_path: str | None, blip_path: str | None) -> str:
        st = (out / image).stat()
        return json.dumps([image, st.st_size, st.st_mtime_ns, clip_path, blip_path])

    def get(self, key: str) -> dict[str, Any] | None:
        return self.entries.get(key)

    def put(self, key: str, scores: dict[str, Any]) -> None:
        self.entries[key] = scores
        with self.path.open("a") as f:
            f.write(json.dumps({"key": key, "scores": scores}) + "\n")


def image_metrics(rows: Sequence[dict[str, Any]], out: Path, models: Models | None) -> list[dict[str, Any]]:
    """One metrics.csv record per run row; model scores only with ``models`` (CLIP given)."""
    cache = ScoreCache(out / "scores.jsonl")
    progress = Progress(len(rows)) if models is not None else None
    records = []
    for row in rows:
        rec: dict[str, Any] = {k: row[k] for k in ("subset", "method", "prompt", "seed", "image", "step")}
        rec["min_attention"] = min(row["max_attention"])
        rec["neglected"] = int(bool(row["neglected"]))
        if models is not None:
            key = ScoreCache.key(out, row["image"], models.clip_path, models.blip_path)
            scores = cache.get(key)
            if scores is None:
                scores = models.scores(out / row["image"], row["prompt"])
                cache.put(key, scores)
            rec.update(scores)
            assert progress is not None
            progress.step("scored")
        records.append({k: round(v, 6) if isinstance(v, float) else v for k, v in rec.items()})
    return records


# ------------------------------------------------------------------------------------------------------ reports
def aggregate(records: Sequence[dict[str, Any]], metric: str) -> dict[tuple[str, str], tuple[float, float, int]]:
    """(method, subset or 'all') -> (mean, std, n) over the records that have ``metric``."""
    groups: dict[tuple[str, str], list[float]] = {}
    for r in records:
        if r.get(metric) in (None, ""):
            continue
        for subset in (r["subset"], "all"):
            groups.setdefault((r["method"], subset), []).append(float(r[metric]))
    return {k: (statistics.fmean(v), statistics.pstdev(v), len(v)) for k, v in groups.items()}


def present_metrics(records: Sequence[dict[str, Any]]) -> list[str]:
    return [m for m in METRIC_TITLES if any(r.get(m) not in (None, "") for r in records)]


def summary_markdown(records: Sequence[dict[str, Any]], subsets: Sequence[str], methods: Sequence[str]) -> str:
    """Methods x subsets per metric; ``methods`` in their row order (those without records are left out)."""
    methods = [m for m in methods if any(r["method"] == m for r in records)]
    cols = [*subsets, "all"]
    lines = ["# Attend-and-Excite evaluation", "",
             f"{len(records)} images; cells are mean (std) over images; n = images per method.", ""]
    for metric in present_metrics(records):
        agg = aggregate(records, metric)
        n = {c: max((agg.get((m, c), (0, 0, 0))[2] for m in methods), default=0) for c in cols}
        lines += [f"## {METRIC_TITLES[metric]}", "",
                  "| method | " + " | ".join(f"{SUBSET_TITLES.get(c, c)} (n={n[c]})" for c in cols) + " |",
                  "|---|" + "---|" * len(cols)]
        for m in methods:
            cells = [f"{agg[(m, c)][0]:.3f} ({agg[(m, c)][1]:.3f})" if (m, c) in agg else "-" for c in cols]
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


PALETTE = {"plain": (120, 144, 156), "ae": (229, 115, 0)}


def summary_chart(records: Sequence[dict[str, Any]], subsets: Sequence[str], methods: Sequence[str],
                  path: Path) -> None:
    """One panel per metric: groups = subsets, one bar per method in ``methods``' order (Pillow only)."""
    metrics = present_metrics(records)
    methods = [m for m in methods if any(r["method"] == m for r in records)]
    pw, ph, margin = 420, 300, 40
    img = Image.new("RGB", (pw * max(len(metrics), 1), ph + 30), "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    for k, metric in enumerate(metrics):
        agg = aggregate(records, metric)
        values = [v[0] for v in agg.values()]
        lo, hi = min(0.0, *values), max(1e-9, *values)
        x0, y_top, y_base = k * pw + margin, 30, ph - margin
        draw.text((k * pw + 10, 8), METRIC_TITLES[metric], fill="black", font=font)

        def y_of(v: float, lo: float = lo, hi: float = hi, y_base: int = y_base, y_top: int = y_top) -> float:
            return y_base - (v - lo) / (hi - lo) * (y_base - y_top)

        draw.line([(x0, y_of(0.0)), (k * pw + pw - 10, y_of(0.0))], fill="black")
        draw.text((k * pw + 4, y_top - 6), f"{hi:.2f}", fill="black", font=font)
        group_w = (pw - margin - 20) / max(len(subsets), 1)
        bar_w = group_w * 0.8 / max(len(methods), 1)
        for g, subset in enumerate(subsets):
            gx = x0 + g * group_w + group_w * 0.1
            for b, m in enumerate(methods):
                if (m, subset) not in agg:
                    continue
                v = agg[(m, subset)][0]
                bx = gx + b * bar_w
                top, bottom = sorted((y_of(v), y_of(0.0)))
                draw.rectangle([bx, top, bx + bar_w - 2, bottom], fill=PALETTE.get(m, (90, 90, 90)))
                draw.text((bx, top - 12), f"{v:.2f}", fill="black", font=font)
            draw.text((gx, y_base + 6), SUBSET_TITLES.get(subset, subset)[:16], fill="black", font=font)
    for b, m in enumerate(methods):
        x = 10 + b * 90
        draw.rectangle([x, ph + 10, x + 12, ph + 22], fill=PALETTE.get(m, (90, 90, 90)))
        draw.text((x + 16, ph + 10), m, fill="black", font=font)
    img.save(path)
