"""Benchmark harness: plain vs Attend-and-Excite on the paper's prompt set, over one or more ComfyUI servers.

Usage::

    python scripts/evaluate.py --servers http://gpu1:8188,http://gpu2:8188 --checkpoint sd-v1-4.safetensors \\
        --prompts data/ae_benchmark_prompts.json --seeds 64 --out eval/ [--subsets animals] [--limit 10] \\
        [--clip /models/clip-vit-base-patch16] [--blip /models/blip-image-captioning-base]

    python scripts/evaluate.py --family flux --checkpoint flux1-dev.safetensors --steps 28 --size 1024 ...
    python scripts/evaluate.py --family sd3 --checkpoint sd3.5_medium.safetensors \
        --text-encoders clip_l.safetensors,clip_g.safetensors,t5xxl_fp16.safetensors --steps 40 --size 1024 ...

For every (prompt, seed, method) with method in {plain (scale_factor 0), ae (scale_factor 20)} it queues one graph
(loaders -> AttendExciteTextEncode / CLIPTextEncode("") -> empty latent -> AttendExciteKSampler -> VAEDecode ->
SaveImage + AttendExciteReport), one worker thread per server pulling from a shared queue, and writes
``OUT/images/<subset>/<method>/<slug>_<seed>.png`` and one row per image to ``OUT/runs.jsonl``. Work whose image and
row both exist is skipped (resume). Then it computes the metrics and writes ``OUT/metrics.csv`` (one row per image),
``OUT/summary.md`` (methods x subsets, as in the paper) and ``OUT/summary.png`` (grouped bars):

- always: the attention neglect rate (share of images where a subject's max attention at the last guided step is
  below ``--threshold``; plain runs are read at the same step) and the mean of the smaller subject maximum;
- ``--clip``: a local transformers ``CLIPModel`` folder (with its processor; the paper uses ViT-B/16):
  full-prompt and minimum-object similarity with the 80 ImageNet templates;
- ``--blip``: a local ``BlipForConditionalGeneration`` folder (with its processor): captions, and their CLIP
  text-text similarity to the templated prompt (needs ``--clip``).

``--family`` picks the loaders and sampling settings (``FAMILIES``; the paper's are those of ``sd``):

- ``sd`` (default; SD1.x, SD2.x, SDXL): CheckpointLoaderSimple, EmptyLatentImage, cfg 7.5, euler / normal.
- ``flux`` (Flux.1 dev): UNETLoader (``--checkpoint`` is the diffusion model's file), DualCLIPLoader type flux
  (``--text-encoders``, default ``clip_l.safetensors,t5xxl_fp16.safetensors``), VAELoader (``--vae``, default
  ``ae.safetensors``), FluxGuidance 3.5 on the prompt, cfg 1 (one model call per step), euler / simple.
- ``sd3`` (SD3 / SD3.5): CheckpointLoaderSimple, and a TripleCLIPLoader when ``--text-encoders`` names three files
  (otherwise the checkpoint's own text encoders), cfg 4.5, euler / sgm_uniform.

``flux`` and ``sd3`` use EmptySD3LatentImage (16 channels). From Python, ``main(argv, loader=...)`` (or
``generate`` / ``build_graph``) takes another loader: a function of the :class:`Settings` that returns the loader
nodes and the MODEL, CLIP and VAE outputs (:data:`Loaded`), as the tests do with their tiny model node.

transformers is imported only when ``--clip``/``--blip`` is given.
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import logging
import queue
import re
import statistics
import sys
import threading
import time
import urllib.error
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
for _p in (str(Path(__file__).resolve().parent), str(REPO_ROOT)):
    if _p not in sys.path:
        sys.path.append(_p)

import torch  # noqa: E402
from comfy_server import ComfyClient, ComfyError  # noqa: E402
from PIL import Image, ImageDraw, ImageFont  # noqa: E402

from attention.metrics import (  # noqa: E402
    full_prompt_similarity,
    min_object_similarity,
    split_subjects,
    subject_nouns,
    templated_text_embedding,
    text_text_similarity,
)

log = logging.getLogger("evaluate")

METHODS: dict[str, float] = {"plain": 0.0, "ae": 20.0}  # method -> scale_factor
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
SAVE_NODE, REPORT_NODE = "8", "9"


@dataclass(frozen=True)
class Job:
    subset: str
    prompt: str
    seed: int
    method: str

    @property
    def key(self) -> tuple[str, int, str]:
        return (self.prompt, self.seed, self.method)

    @property
    def image(self) -> str:
        """Image path relative to the output folder."""
        slug = re.sub(r"[^a-z0-9]+", "_", self.prompt.lower()).strip("_")
        return f"images/{self.subset}/{self.method}/{slug}_{self.seed}.png"


@dataclass(frozen=True)
class Settings:
    checkpoint: str
    steps: int = 50
    size: int = 512
    threshold: float = 0.2
    max_refinement_steps: int = 20
    timeout: float = 3600.0
    family: str = "sd"
    text_encoders: tuple[str, ...] = ()  # DualCLIPLoader (flux) / TripleCLIPLoader (sd3) files; () = the defaults
    vae: str = ""  # flux: VAELoader file ("" = ae.safetensors)


# API-format nodes of the loaders, and the (node, slot) of their MODEL, CLIP and VAE outputs
Loaded = tuple[dict[str, dict[str, Any]], list, list, list]
Loader = Callable[[Settings], Loaded]


def sd_loader(s: Settings) -> Loaded:
    """One checkpoint with its text encoders and VAE (SD1.x, SD2.x, SDXL; SD3 checkpoints that include them)."""
    return {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": s.checkpoint}}}, ["1", 0], \
        ["1", 1], ["1", 2]


def flux_loader(s: Settings) -> Loaded:
    """Flux as ComfyUI's examples load it: the diffusion model, CLIP-L + T5-XXL, the 16-channel VAE."""
    clip_l, t5 = s.text_encoders or ("clip_l.safetensors", "t5xxl_fp16.safetensors")
    return {"1": {"class_type": "UNETLoader", "inputs": {"unet_name": s.checkpoint, "weight_dtype": "default"}},
            "10": {"class_type": "DualCLIPLoader", "inputs": {"clip_name1": clip_l, "clip_name2": t5,
                                                              "type": "flux"}},
            "11": {"class_type": "VAELoader", "inputs": {"vae_name": s.vae or "ae.safetensors"}}}, \
        ["1", 0], ["10", 0], ["11", 0]


def sd3_loader(s: Settings) -> Loaded:
    """An SD3 checkpoint; its text encoders from a TripleCLIPLoader when three files are given."""
    nodes, model, clip, vae = sd_loader(s)
    if s.text_encoders:
        names = dict(zip(("clip_name1", "clip_name2", "clip_name3"), s.text_encoders, strict=True))
        nodes["10"], clip = {"class_type": "TripleCLIPLoader", "inputs": names}, ["10", 0]
    return nodes, model, clip, vae


@dataclass(frozen=True)
class Family:
    loader: Loader
    latent: str
    cfg: float
    scheduler: str
    flux_guidance: float | None = None


FAMILIES = {
    "sd": Family(sd_loader, "EmptyLatentImage", 7.5, "normal"),
    "flux": Family(flux_loader, "EmptySD3LatentImage", 1.0, "simple", flux_guidance=3.5),
    "sd3": Family(sd3_loader, "EmptySD3LatentImage", 4.5, "sgm_uniform"),
}


def load_jobs(prompts_path: Path, subsets: Sequence[str] | None, limit: int | None, seeds: int) -> list[Job]:
    """Jobs in a stable order: subset, prompt, seed, method."""
    data: dict[str, list[str]] = json.loads(prompts_path.read_text())
    chosen = list(subsets) if subsets else list(data)
    unknown = [s for s in chosen if s not in data]
    if unknown:
        raise SystemExit(f"unknown subsets {unknown}; the prompt file has {list(data)}")
    return [Job(subset, prompt, seed, method)
            for subset in chosen for prompt in data[subset][:limit] for seed in range(seeds) for method in METHODS]


def build_graph(job: Job, s: Settings, loader: Loader | None = None) -> dict[str, dict[str, Any]]:
    """API-format prompt of one image (node ids fixed: SaveImage is ``8``, the report ``9``); the loader nodes come
    from ``loader`` (default: the family's)."""
    family = FAMILIES[s.family]
    nodes, model, clip, vae = (loader or family.loader)(s)
    positive = ["5", 0] if family.flux_guidance is not None else ["2", 0]
    ksampler = {
        "model": model, "seed": job.seed, "steps": s.steps, "cfg": family.cfg, "sampler_name": "euler",
        "scheduler": family.scheduler, "positive": positive, "negative": ["3", 0], "latent_image": ["4", 0],
        "denoise": 1.0,
        "scale_factor": METHODS[job.method], "guided_fraction": 0.5, "scale_start": 1.0, "scale_end": 0.5,
        "refinement": "0:0.05, 0.2:0.5, 0.4:0.8", "max_refinement_steps": s.max_refinement_steps,
        "smoothing": True, "kernel_size": 3, "smoothing_sigma": 0.5, "attention_resolution": 0,
        "token_slots": "auto", "record_maps": True,
    }
    prefix = f"ae_eval/{job.subset}/{job.method}/{Path(job.image).stem}"
    if family.flux_guidance is not None:
        nodes["5"] = {"class_type": "FluxGuidance", "inputs": {"conditioning": ["2", 0],
                                                               "guidance": family.flux_guidance}}
    return {
        **nodes,
        "2": {"class_type": "AttendExciteTextEncode",
              "inputs": {"clip": clip, "text": job.prompt, "subjects": ", ".join(subject_nouns(job.prompt))}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": clip, "text": ""}},
        "4": {"class_type": family.latent, "inputs": {"width": s.size, "height": s.size, "batch_size": 1}},
        "6": {"class_type": "AttendExciteKSampler", "inputs": ksampler},
        "7": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": vae}},
        SAVE_NODE: {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": prefix}},
        REPORT_NODE: {"class_type": "AttendExciteReport", "inputs": {"attention_maps": ["6", 1],
                                                                     "threshold": s.threshold}},
    }


def read_rows(path: Path) -> dict[tuple[str, int, str], dict[str, Any]]:
    """Rows of ``runs.jsonl`` by (prompt, seed, method); a torn last line (interrupted run) is ignored."""
    rows: dict[tuple[str, int, str], dict[str, Any]] = {}
    if not path.is_file():
        return rows
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            log.warning("%s:%d: unreadable row skipped", path, n)
            continue
        rows[(row["prompt"], int(row["seed"]), row["method"])] = row
    return rows


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


def check_settings(out: Path, s: Settings) -> None:
    """Record the settings in ``OUT/settings.json``; refuse to resume a folder made with other settings (settings
    added since a folder was made count with their defaults)."""
    path = out / "settings.json"
    current = json.loads(json.dumps({k: v for k, v in vars(s).items() if k != "timeout"}))  # tuples as lists
    if path.is_file():
        defaults = {f.name: f.default for f in fields(Settings) if f.name not in ("checkpoint", "timeout")}
        previous = json.loads(json.dumps({**defaults, **json.loads(path.read_text())}))
        if previous != current:
            raise SystemExit(f"{out} was made with other settings {previous}, not {current}: use another --out")
    else:
        path.write_text(json.dumps(current, indent=1) + "\n")


def generate(clients: Sequence[ComfyClient], jobs: Sequence[Job], out: Path, s: Settings,
             loader: Loader | None = None) -> tuple[int, list[str]]:
    """Render the jobs that lack an image or a row (``loader``: see :func:`build_graph`). Returns (number queued,
    error messages)."""
    runs = out / "runs.jsonl"
    rows = read_rows(runs)
    pending = [j for j in jobs if not ((out / j.image).is_file() and j.key in rows)]
    log.info("%d of %d images to render on %d server(s)", len(pending), len(jobs), len(clients))
    work: queue.Queue[Job] = queue.Queue()
    for job in pending:
        work.put(job)
    lock = threading.Lock()
    progress = Progress(len(pending))
    errors: list[str] = []

    def worker(client: ComfyClient) -> None:
        while True:
            try:
                job = work.get_nowait()
            except queue.Empty:
                return
            t0 = time.monotonic()
            try:
                history = client.run(build_graph(job, s, loader), timeout=s.timeout)
                outputs = history["outputs"]
                png = client.image_bytes(outputs[SAVE_NODE]["images"][0])
                report = outputs[REPORT_NODE]["attend_excite"][0]
            except (ComfyError, TimeoutError, urllib.error.HTTPError, KeyError) as err:  # this job failed
                with lock:
                    errors.append(f"{job.key} on {client.url}: {err}")
                log.error("%s on %s failed: %s", job.key, client.url, err)
                continue
            except (urllib.error.URLError, ConnectionError) as err:  # the server is gone: leave its work to others
                work.put(job)
                log.error("%s unreachable (%s); its worker stops", client.url, err)
                with lock:
                    dead.add(client.url)
                return
            path = out / job.image
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(png)
            row = {"subset": job.subset, "prompt": job.prompt, "seed": job.seed, "method": job.method,
                   "image": job.image, "labels": report["labels"], "step": report["step"],
                   "max_attention": report["max_attention"][0], "neglected": report["neglected"][0],
                   "threshold": report["threshold"], "server": client.url,
                   "seconds": round(time.monotonic() - t0, 3)}
            with lock:
                with runs.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                progress.step()

    dead: set[str] = set()
    live = list(clients)
    while live and not work.empty():  # a job handed back by a dead server goes to the live ones in another round
        threads = [threading.Thread(target=worker, args=(c,), name=f"eval-{i}") for i, c in enumerate(live)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        live = [c for c in live if c.url not in dead]
    if not work.empty():
        errors.append(f"{work.qsize()} images not rendered: no server left")
    return len(pending), errors


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


def summary_markdown(records: Sequence[dict[str, Any]], subsets: Sequence[str]) -> str:
    methods = [m for m in METHODS if any(r["method"] == m for r in records)]
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


def summary_chart(records: Sequence[dict[str, Any]], subsets: Sequence[str], path: Path) -> None:
    """One panel per metric: groups = subsets, one bar per method (Pillow only)."""
    metrics = present_metrics(records)
    methods = [m for m in METHODS if any(r["method"] == m for r in records)]
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


def write_reports(out: Path, jobs: Sequence[Job], clip_path: str | None, blip_path: str | None,
                  device: str) -> list[dict[str, Any]]:
    rows = read_rows(out / "runs.jsonl")
    wanted = [rows[j.key] for j in jobs if j.key in rows and (out / j.image).is_file()]
    models = Models(clip_path, blip_path, device) if clip_path else None
    records = image_metrics(wanted, out, models)
    with (out / "metrics.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(records)
    subsets = list(dict.fromkeys(j.subset for j in jobs))
    (out / "summary.md").write_text(summary_markdown(records, subsets))
    summary_chart(records, subsets, out / "summary.png")
    return records


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--servers", default="", help="comma-separated ComfyUI base URLs (one worker each)")
    p.add_argument("--checkpoint", required=True, help="ckpt_name as the servers list it (SD1.4 for the paper; "
                   "flux: the diffusion model's unet_name)")
    p.add_argument("--family", choices=list(FAMILIES), default="sd", help="model family: loaders, latent, cfg and "
                   "scheduler (default: sd, the paper's setting)")
    p.add_argument("--text-encoders", default="", help="comma-separated text encoder files: flux: CLIP-L and T5 "
                   "(default clip_l.safetensors,t5xxl_fp16.safetensors); sd3: three for a TripleCLIPLoader (default: "
                   "the checkpoint's own)")
    p.add_argument("--vae", default="", help="flux: the VAE file (default ae.safetensors)")
    p.add_argument("--prompts", type=Path, default=REPO_ROOT / "data" / "ae_benchmark_prompts.json")
    p.add_argument("--seeds", type=int, default=64, help="seeds 0..N-1 per prompt (paper: 64)")
    p.add_argument("--subsets", default="", help="comma-separated subsets (default: all in the prompt file)")
    p.add_argument("--limit", type=int, default=None, help="first K prompts of each subset")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--threshold", type=float, default=0.2, help="neglect threshold on the max attention")
    p.add_argument("--max-refinement-steps", type=int, default=20)
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds to wait for one image")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--clip", help="local transformers CLIPModel folder (paper: ViT-B/16)")
    p.add_argument("--blip", help="local transformers BlipForConditionalGeneration folder (needs --clip)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="for CLIP/BLIP")
    p.add_argument("--skip-generation", action="store_true", help="only recompute the metrics")
    args = p.parse_args(argv)
    if args.blip and not args.clip:
        p.error("--blip needs --clip (captions are compared with CLIP text embeddings)")
    if not args.servers.strip() and not args.skip_generation:
        p.error("--servers is required unless --skip-generation")
    wanted = {"sd": (0,), "flux": (0, 2), "sd3": (0, 3)}[args.family]
    given = len([t for t in args.text_encoders.split(",") if t.strip()])
    if given not in wanted:
        p.error(f"--text-encoders: --family {args.family} takes {' or '.join(map(str, wanted))} files, not {given}")
    if args.vae and args.family != "flux":
        p.error("--vae is for --family flux (the other families' checkpoints include their VAE)")
    return args


def main(argv: Sequence[str] | None = None, loader: Loader | None = None) -> int:
    """The command line; ``loader`` replaces the family's loader nodes (see :func:`build_graph`)."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[evaluate] %(message)s")
    subsets = [s.strip() for s in args.subsets.split(",") if s.strip()]
    jobs = load_jobs(args.prompts, subsets, args.limit, args.seeds)
    args.out.mkdir(parents=True, exist_ok=True)
    settings = Settings(args.checkpoint, args.steps, args.size, args.threshold, args.max_refinement_steps,
                        args.timeout, args.family, tuple(t.strip() for t in args.text_encoders.split(",") if t.strip()),
                        args.vae)
    queued, errors = 0, []
    if not args.skip_generation:
        clients = [ComfyClient(u.strip()) for u in args.servers.split(",") if u.strip()]
        check_settings(args.out, settings)
        queued, errors = generate(clients, jobs, args.out, settings, loader)
    records = write_reports(args.out, jobs, args.clip, args.blip, args.device)
    print(json.dumps({"queued": queued, "failed": len(errors), "images": len(records), "jobs": len(jobs),
                      "summary": str(args.out / "summary.md")}))
    for e in errors:
        print(f"failed: {e}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
