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
row both exist is skipped (resume). Then it computes the metrics (``scripts/eval_metrics.py``) and writes
``OUT/metrics.csv`` (one row per image), ``OUT/summary.md`` (methods x subsets, as in the paper) and
``OUT/summary.png`` (grouped bars):

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
import json
import logging
import queue
import re
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
from eval_metrics import CSV_FIELDS, Models, Progress, image_metrics, summary_chart, summary_markdown  # noqa: E402

from attention.metrics import subject_nouns  # noqa: E402

log = logging.getLogger("evaluate")

METHODS: dict[str, float] = {"plain": 0.0, "ae": 20.0}  # method -> scale_factor
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
    (out / "summary.md").write_text(summary_markdown(records, subsets, list(METHODS)))
    summary_chart(records, subsets, list(METHODS), out / "summary.png")
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
