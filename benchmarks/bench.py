#!/usr/bin/env python3
"""Speed and memory of Attend-and-Excite sampling in ComfyUI, against plain sampling and diffusers' A&E pipeline.

One process sets ComfyUI up in-process, builds random-weight UNets with ComfyUI's own ``UNetModel`` (real SD1.5 /
SDXL layouts on CUDA, tiny ones on the CPU), loads them with ``comfy.sd.load_diffusion_model_state_dict`` and
times ``comfy.sample.sample_custom`` inside ``torch.inference_mode()`` (as ComfyUI's executor runs nodes) in three
modes per architecture and batch size:

- ``plain``: the built-in euler sampler;
- ``ae_no_refine``: this pack's A&E sampler without iterative refinement;
- ``ae_refine_cap``: with the default refinement thresholds. Random weights never reach them, so every refinement
  step runs to its iteration cap: the worst case (50 steps: 25 guided passes + 3 x 20 refinement passes).

Each mode gets an untimed warm-up run; the timed runs then go in rounds (plain, A&E, A&E at cap, plain, ...;
``--order sequential``: all runs of one mode, then the next), and each row reports the median, the fastest run,
the peak memory and the ratios to plain sampling of the same measurement.

With ``--diffusers`` (sd15 only) the same weights also run through diffusers' ``StableDiffusionPipeline`` and
``StableDiffusionAttendAndExcitePipeline`` via ``benchmarks/diffusers_bridge.py``.

Output: one JSON object per measurement on stdout, then a Markdown table (``--out``/``--markdown`` write them to
files as well, after every measurement, so a run cut short keeps what it measured). Everything else goes to
stderr through ``logging``.

Examples::

    python benchmarks/bench.py --device cpu --arch sd15,sdxl --batch 1 --steps 6 --repeats 1
    python benchmarks/bench.py --device cuda --arch sd15 --batch 1,4 --steps 50 --repeats 3 --diffusers \\
        --out results.jsonl --markdown table.md
    python benchmarks/bench.py --table-from results.jsonl --markdown table.md
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import importlib.machinery
import importlib.util
import json
import logging
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

REPO = Path(__file__).resolve().parent.parent
PACK = "comfyui_attend_excite"
GIB = 1024**3
MODES = ("plain", "ae_no_refine", "ae_refine_cap")
CFG_SCALE = 7.5
SUBJECT_INDICES = (2, 5)
PROMPT_POSITIONS = tuple(range(1, 7))
NUM_KEYS = 77

log = logging.getLogger("ae_bench")


# ----------------------------------------------------------------------------------------------------------------
# command line


def _csv(kind: Callable[[str], Any]) -> Callable[[str], list]:
    def parse(text: str) -> list:
        items = [kind(s.strip()) for s in text.split(",") if s.strip()]
        if not items:
            raise argparse.ArgumentTypeError("empty list")
        return items

    return parse


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--arch", type=_csv(str), default=["sd15"], help="comma list of sd15, sdxl")
    p.add_argument("--batch", type=_csv(int), default=[1], help="comma list of batch sizes")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (median reported)")
    p.add_argument("--warmup-steps", type=int, default=0,
                   help="steps of the untimed warm-up run per measurement (0 = same as --steps)")
    p.add_argument("--size", default="auto",
                   help="image side in pixels (latent = size / 8); auto: sd15 512 and sdxl 1024 on CUDA, 128 on CPU")
    p.add_argument("--model", choices=("auto", "full", "tiny", "narrow"), default="auto",
                   help="UNet layout: full = the real architecture, tiny = a small one of the same family, "
                        "narrow = the real depths at width 32 (on a CPU its timings are host overhead: the "
                        "regime of a launch-bound GPU); auto = full on CUDA, tiny on CPU")
    p.add_argument("--modes", type=_csv(str), default=list(MODES), help=f"comma list of {', '.join(MODES)}")
    p.add_argument("--diffusers", action="store_true", help="also time diffusers' pipelines (sd15 only)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--weights", choices=("reference", "copy"), default="reference",
                   help="gradient-pass weights: reference = normal tensors aliasing the model's own weights (no "
                        "copy, the default) or copy = one copy per run")
    p.add_argument("--blocks", choices=("all", "down_mid"), default="all",
                   help="AEParams.attention_blocks: which cross-attention layers of the level feed the loss")
    p.add_argument("--recompute", choices=("auto", "off", "blocks"), default="auto",
                   help="AEParams.recompute: transformer blocks recomputed in the backward (auto: as needed)")
    p.add_argument("--cuda-graph", choices=("on", "off"), default="on",
                   help="AEParams.cuda_graph: replay the gradient pass from a CUDA graph (CUDA only)")
    p.add_argument("--record-maps", action="store_true",
                   help="timed A&E runs record the attention maps and losses as the nodes do by default (the "
                        "visualizer's input); without it they record nothing")
    p.add_argument("--check-graph", action="store_true",
                   help="CUDA: after each A&E measurement, one run without the CUDA graph; reports the largest "
                        "difference of the results (graph_vs_eager_max_abs)")
    p.add_argument("--order", choices=("interleaved", "sequential"), default="interleaved",
                   help="ComfyUI modes of one arch and batch: interleaved = after each mode's warm-up, the timed runs "
                        "go in rounds (plain, A&E, A&E at cap, plain, ...), so a drift of the host's speed hits every "
                        "mode alike (rows then also carry paired_ratio_to_plain: the median over rounds of a run's "
                        "time over the same round's plain run); sequential = all runs of one mode, then the next")
    p.add_argument("--gc", choices=("freeze", "on"), default="freeze",
                   help="cyclic garbage collector during the timed runs: freeze = objects that exist before them are "
                        "left out of its scans (gc.freeze; a full scan of a process with torch, ComfyUI and diffusers "
                        "imported took 0.4 s on a 2-core CPU and would land in a random repeat), on = as is; either "
                        "way the collector's pauses in each run are reported (gc_s)")
    p.add_argument("--threads", type=int, default=0,
                   help="CPU threads for torch (0 = torch's default); fewer than the cores helps on a busy machine")
    p.add_argument("--budget-s", type=float, default=0.0,
                   help="start no new measurement (and no new repeat) after this many seconds; 0 = no limit")
    p.add_argument("--out", type=Path, help="write the JSON lines here too")
    p.add_argument("--append", action="store_true", help="append to --out instead of overwriting it")
    p.add_argument("--markdown", type=Path, help="write the Markdown table here too")
    p.add_argument("--profile", type=Path,
                   help="folder: after the timed runs of each A&E mode, profile one more run with torch.profiler "
                        "and write its top operators and kernels there (not part of the timings)")
    p.add_argument("--table-from", type=Path, help="only turn an existing JSONL file into the Markdown table")
    p.add_argument("--comfy-root", help="ComfyUI source folder (default: $COMFYUI_ROOT, else <repo>/.comfyui)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging, including the pack's own")
    args = p.parse_args(argv)
    check_args(p, args, ARCHS, MODES, 8)
    return args


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace, archs, modes, size_multiple: int) -> None:
    """The checks a benchmark script's common options share: known ``--arch`` and modes, ``--size`` 'auto' or a
    multiple of ``size_multiple`` pixels, positive steps, repeats and batch sizes (``p.error`` otherwise)."""
    for arch in args.arch:
        if arch not in archs:
            p.error(f"unknown --arch {arch!r}; choose from {', '.join(archs)}")
    for mode in args.modes:
        if mode not in modes:
            p.error(f"unknown mode {mode!r}; choose from {', '.join(modes)}")
    if args.size != "auto" and (not args.size.isdigit() or int(args.size) % size_multiple):
        p.error(f"--size must be 'auto' or a pixel size divisible by {size_multiple}")
    if args.steps < 1 or args.repeats < 1 or min(args.batch) < 1:
        p.error("--steps, --repeats and --batch must be positive")


# ----------------------------------------------------------------------------------------------------------------
# architectures (ComfyUI UNetModel keyword arguments)

_COMMON = {"image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": 320, "use_checkpoint": False,
           "use_spatial_transformer": True, "legacy": False, "use_temporal_attention": False,
           "use_temporal_resblock": False}

# the real SD1.5 UNet (859.5 M parameters) and the real SDXL base UNet (2.57 B parameters)
_SD15_FULL = {"channel_mult": [1, 2, 4, 4], "num_res_blocks": [2, 2, 2, 2],
              "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "transformer_depth_middle": 1,
              "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0]}
_SDXL_FULL = {"channel_mult": [1, 2, 4], "num_res_blocks": [2, 2, 2],
              "transformer_depth": [0, 0, 2, 2, 10, 10], "transformer_depth_middle": 10,
              "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10]}
# "narrow": every block and transformer layer of the real layout, at width 32 with a 64-wide text context: the same
# operators per step as "full" with almost no arithmetic, so on a CPU its timings measure host overhead (Python,
# dispatch, autograd), the cost that bounds a small model on a big GPU.
_NARROW = {"model_channels": 32, "context_dim": 64}

ARCHS: dict[str, dict[str, Any]] = {
    "sd15": {
        "pooled": False,
        "auto_size": {"cuda": 512, "cpu": 128},
        "base": {**_COMMON, "context_dim": 768, "num_heads": 8, "num_head_channels": -1,
                 "use_linear_in_transformer": False, "adm_in_channels": None},
        "full": _SD15_FULL,
        # same family (detected as SD15), one res block and width 320 at every level
        "tiny": {"channel_mult": [1, 1, 1, 1], "num_res_blocks": [1, 1, 1, 1],
                 "transformer_depth": [1, 1, 1, 0], "transformer_depth_middle": 1,
                 "transformer_depth_output": [1, 1, 1, 1, 1, 1, 0, 0]},
        "narrow": {**_SD15_FULL, **_NARROW},
    },
    "sdxl": {
        "pooled": True,
        "auto_size": {"cuda": 1024, "cpu": 128},
        "base": {**_COMMON, "context_dim": 2048, "num_heads": -1, "num_head_channels": 64,
                 "use_linear_in_transformer": True, "adm_in_channels": 2816, "num_classes": "sequential"},
        "full": _SDXL_FULL,
        # Segmind-Vega depths at width 320 everywhere (detected as an SDXL-family model)
        "tiny": {"channel_mult": [1, 1, 1], "num_res_blocks": [2, 2, 2],
                 "transformer_depth": [0, 0, 1, 1, 2, 2], "transformer_depth_middle": -1,
                 "transformer_depth_output": [0, 0, 0, 1, 1, 1, 2, 2, 2]},
        "narrow": {**_SDXL_FULL, **_NARROW, "num_head_channels": 8},
    },
}


def unet_config(arch: str, variant: str) -> dict[str, Any]:
    """ComfyUI ``UNetModel`` keyword arguments of ``arch`` in layout ``variant`` (full, tiny or narrow)."""
    return {**ARCHS[arch]["base"], **ARCHS[arch][variant]}


# ----------------------------------------------------------------------------------------------------------------
# output


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _mode_label(row: dict) -> str:
    mode = str(row.get("mode"))
    if mode == "plain" or row.get("system") != "comfyui":
        return mode
    notes = []
    if row.get("attention_blocks", "all") != "all":
        notes.append(row["attention_blocks"])
    if row.get("weights") == "copy":
        notes.append("weight copy")
    if row.get("recompute", "auto") != "auto":
        notes.append(f"recompute {row['recompute']}")
    if row.get("blocks_recomputed"):
        notes.append(f"{row['blocks_recomputed']} blocks recomputed")
    if row.get("cuda_graph") == "off" and row.get("device") == "cuda":
        notes.append("no CUDA graph")
    if row.get("record_maps"):
        notes.append("maps recorded")
    return f"{mode} ({', '.join(notes)})" if notes else mode


def markdown_table(rows: list[dict]) -> str:
    if not rows:
        return "_no measurements_\n"
    head = rows[0]
    lines = [f"Device: {head.get('device_name')}; torch {head.get('torch')}; commit {head.get('commit')}; "
             f"weights {head.get('dtype')}; peak = {head.get('peak_kind')}", ""]
    cols = ["system", "arch", "model", "batch", "size", "steps", "mode", "median s", "× plain", "paired × plain",
            "grad passes", "extra s / pass", "peak GiB", "÷ diffusers"]
    lines.append("| " + " | ".join(cols) + " |")
    lines.append("|" + "|".join("---" for _ in cols) + "|")
    for r in rows:
        ratio_d = r.get("ratio_ours_to_diffusers")
        lines.append("| " + " | ".join([
            str(r.get("system")), str(r.get("arch")), str(r.get("model")), str(r.get("batch")),
            f"{r.get('size')}²", str(r.get("steps")), _mode_label(r), _fmt(r.get("median_s"), 3),
            _fmt(r.get("ratio_to_plain")), _fmt(r.get("paired_ratio_to_plain")), _fmt(r.get("grad_passes")),
            _fmt(r.get("extra_s_per_pass"), 4),
            _fmt(r.get("peak_gib")), _fmt(ratio_d),
        ]) + " |")
    lines.append("")
    lines.append("`÷ diffusers` (diffusers rows): this pack's median ÷ diffusers' median for the same mode and batch. "
                 "`paired × plain` (timed runs interleaved with plain ones, `--order interleaved`): the median over "
                 "rounds of a run's time ÷ the same round's plain run. "
                 "`grad passes`: latent-gradient computations per run; `extra s / pass`: (median − plain) ÷ passes.")
    return "\n".join(lines) + "\n"


def simple_table(columns: list[tuple[str, Callable[[dict], Any]]], rows: list[dict]) -> str:
    """Markdown table: one ``(header, cell of a row)`` pair per column."""
    lines = ["| " + " | ".join(h for h, _ in columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(str(cell(r)) for _, cell in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_results(rows: list[dict], table: str, markdown: Path | None, stream: TextIO) -> None:
    """JSON lines (floats rounded to 4 places), then the Markdown ``table``, to ``stream``; the table to ``markdown``
    too."""
    for r in rows:
        stream.write(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()}) + "\n")
    stream.write(table)
    if markdown is not None:
        markdown.write_text(table, encoding="utf-8")


class Emitter:
    """Writes each measurement as it is made: stdout, the JSONL file and a rewritten Markdown file."""

    def __init__(self, stream: TextIO, out: Path | None, markdown: Path | None, append: bool,
                 table=None) -> None:
        self.table = table if table is not None else markdown_table  # rows -> the Markdown table
        self.stream = stream
        self.rows: list[dict] = []
        self.markdown = markdown
        self.out = None
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
            self.out = open(out, "a" if append else "w", encoding="utf-8")

    def emit(self, row: dict) -> None:
        line = json.dumps(row, sort_keys=False)
        self.stream.write(line + "\n")
        self.stream.flush()
        if self.out is not None:
            self.out.write(line + "\n")
            self.out.flush()
        self.rows.append(row)
        self._write_markdown()

    def _write_markdown(self) -> None:
        if self.markdown is not None:
            self.markdown.parent.mkdir(parents=True, exist_ok=True)
            self.markdown.write_text(self.table(self.rows), encoding="utf-8")

    def finish(self) -> None:
        self.stream.write("\n" + self.table(self.rows))
        self.stream.flush()
        self._write_markdown()
        if self.out is not None:
            self.out.close()


# ----------------------------------------------------------------------------------------------------------------
# environment


def git_commit() -> tuple[str | None, bool | None]:
    """The code's commit and whether the tree differs from it; ``BENCH_COMMIT`` wins (a copied tree may carry a
    stale ``.git``)."""
    if os.environ.get("BENCH_COMMIT"):
        return os.environ["BENCH_COMMIT"], None
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10,
                             check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                                    capture_output=True, text=True, timeout=10, check=True).stdout.strip())
        return sha or None, dirty
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("BENCH_COMMIT") or None, None


def register_bare_packages() -> None:
    """Make ``comfyui_attend_excite`` importable without running the root or ``nodes`` ``__init__.py``.

    Those import ``comfy_api.latest`` (which needs PyAV); the sampler modules do not.
    """
    for name, path in ((PACK, REPO), (f"{PACK}.nodes", REPO / "nodes")):
        if name not in sys.modules:
            mod = types.ModuleType(name)
            mod.__path__ = [str(path)]
            mod.__package__ = name
            sys.modules[name] = mod


@contextlib.contextmanager
def torchvision_stand_in():
    """ComfyUI imports ``torchvision`` at top level (``comfy/sd.py`` -> Stable Cascade's coder) but SD1.x/SDXL never
    use it. Where it is not installed, an empty stand-in is registered while ComfyUI is imported and removed again
    afterwards, so that transformers/diffusers still see torchvision as absent."""
    if importlib.util.find_spec("torchvision") is not None:
        yield
        return
    log.warning("torchvision is not installed: an empty stand-in serves ComfyUI's import (SD1.5/SDXL do not use it)")
    names = ("torchvision", "torchvision.transforms", "torchvision.models")
    for name in names:
        mod = types.ModuleType(name)
        mod.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
        mod.__path__ = []
        sys.modules[name] = mod
    sys.modules["torchvision"].transforms = sys.modules["torchvision.transforms"]
    sys.modules["torchvision"].models = sys.modules["torchvision.models"]
    try:
        yield
    finally:
        for name in names:
            sys.modules.pop(name, None)
        iu = sys.modules.get("transformers.utils.import_utils")
        for fn in ("is_torchvision_available", "is_torchvision_v2_available"):
            clear = getattr(getattr(iu, fn, None), "cache_clear", None)
            if clear is not None:
                clear()


def setup_comfy(comfy_root: str | None, cpu: bool) -> None:
    register_bare_packages()
    inprocess = importlib.import_module(f"{PACK}.scripts.comfy_inprocess")
    inprocess.setup(comfy_root, cpu=cpu)
    with torchvision_stand_in():
        for name in ("comfy.model_management", "comfy.sd", "comfy.samplers", "comfy.sample"):
            importlib.import_module(name)


def import_pack() -> types.SimpleNamespace:
    return types.SimpleNamespace(
        sampling=importlib.import_module(f"{PACK}.nodes.sampling"),
        gradient_pass=importlib.import_module(f"{PACK}.nodes.gradient_pass"),
        families=importlib.import_module(f"{PACK}.nodes.families"),
        capture=importlib.import_module(f"{PACK}.nodes.capture"),
        loss=importlib.import_module(f"{PACK}.attention.loss"),
        guidance=importlib.import_module(f"{PACK}.attention.guidance"),
        weights=importlib.import_module(f"{PACK}.attention.weights"),
        tokens=importlib.import_module(f"{PACK}.attention.tokens"),
        record=importlib.import_module(f"{PACK}.attention.record"),
        schedule=importlib.import_module(f"{PACK}.attention.schedule"),
    )


def load_bridge():
    """``benchmarks/diffusers_bridge.py`` as a module, or ``None`` (with the reason logged)."""
    if importlib.util.find_spec("diffusers") is None:
        log.warning("--diffusers: diffusers is not importable; skipping the diffusers comparison")
        return None
    if not (REPO / "benchmarks" / "diffusers_bridge.py").is_file():
        log.warning("--diffusers: benchmarks/diffusers_bridge.py is missing; skipping the diffusers comparison")
        return None
    try:
        return importlib.import_module(f"{PACK}.benchmarks.diffusers_bridge")
    except ImportError:
        log.exception("--diffusers: could not import benchmarks/diffusers_bridge.py; skipping")
        return None


# ----------------------------------------------------------------------------------------------------------------
# measurement helpers


class PeakMemory:
    """CUDA: ``max_memory_allocated``. CPU: the process's resident-set high-water mark (VmHWM), reset per
    measurement through ``/proc/self/clear_refs`` where Linux allows it; ``None`` elsewhere."""

    def __init__(self, device) -> None:
        import torch

        self.torch = torch
        self.cuda = device.type == "cuda"
        self.kind: str | None = "cuda_max_memory_allocated" if self.cuda else None
        if not self.cuda and self._hwm_kib() is not None:
            self.kind = "process_rss_peak" if self._clear() else "process_rss_peak_since_start"

    @staticmethod
    def _hwm_kib() -> int | None:
        try:
            with open("/proc/self/status", encoding="ascii") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1])
        except (OSError, ValueError):
            return None
        return None

    @staticmethod
    def _clear() -> bool:
        try:
            with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
                f.write("5")
            return True
        except OSError:
            return False

    def reset(self) -> None:
        if self.cuda:
            self.torch.cuda.reset_peak_memory_stats()
        elif self.kind == "process_rss_peak":
            self._clear()

    def read(self) -> float | None:
        if self.cuda:
            return self.torch.cuda.max_memory_allocated() / GIB
        kib = self._hwm_kib() if self.kind else None
        return None if kib is None else kib * 1024 / GIB


class GradForwardCounter:
    """Counts calls of ``module`` made with autograd enabled (forward pre-hook)."""

    def __init__(self, module) -> None:
        import torch

        self.count = 0
        self._torch = torch
        self._handle = module.register_forward_pre_hook(self._hook)

    def _hook(self, _module, _args) -> None:
        if self._torch.is_grad_enabled():
            self.count += 1

    def close(self) -> None:
        self._handle.remove()


def fingerprint(t) -> list[float]:
    """Mean, standard deviation and largest magnitude of a result, to compare runs that should agree."""
    d = t.double()
    return [round(float(v), 6) for v in (d.mean(), d.std(), d.abs().max())]


class PassCounter(logging.Handler):
    """Counts the A&E sampler's gradient passes from its end-of-run log record (``ae_passes``): passes replayed
    from a CUDA graph never call the UNet module, so a forward hook would miss them."""

    def __init__(self, logger: logging.Logger) -> None:
        super().__init__(logging.INFO)
        self.count, self.graphed, self.recomputed, self.reused = 0, [], [], []
        self.logger, self.level_before = logger, logger.level
        if logger.getEffectiveLevel() > logging.INFO:
            logger.setLevel(logging.INFO)
        logger.addHandler(self)

    def emit(self, record: logging.LogRecord) -> None:
        self.count += getattr(record, "ae_passes", 0)
        if hasattr(record, "ae_graphed"):
            self.graphed.append(record.ae_graphed)
            self.recomputed.append(getattr(record, "ae_recomputed", False))
            self.reused.append(getattr(record, "ae_graph_reused", False))

    def close(self) -> None:
        self.logger.removeHandler(self)
        self.logger.setLevel(self.level_before)
        super().close()


class _ModeRuns:
    """One ComfyUI mode's runs within a measurement: its sampler and what its timed runs gave."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.make: Callable | None = None
        self.run: Callable | None = None
        self.sampler: Any = None
        self.record: Any = None
        self.warm_forwards = 0
        self.times: list[float] = []
        self.gc_s: list[float] = []
        self.peak: float | None = None
        self.out: Any = None
        self.forwards = 0
        self.graphed: list[bool] = []
        self.recomputed: list[bool] = []
        self.reused: list[bool] = []
        self.first_run_s: float | None = None  # the warm-up: the mode's first run with the model


class Deadline:
    def __init__(self, budget_s: float) -> None:
        self.end = time.monotonic() + budget_s if budget_s > 0 else None

    def passed(self) -> bool:
        return self.end is not None and time.monotonic() > self.end


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device) -> None:
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


class GcPauses:
    """Seconds the cyclic garbage collector held the process while the ``with`` body ran, and how many of its
    collections were full ones (generation 2), from ``gc.callbacks``."""

    def __init__(self) -> None:
        self.total, self.full, self._start = 0.0, 0, None

    def __call__(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._start = time.perf_counter()
            self.full += info.get("generation") == 2
        elif self._start is not None:
            self.total += time.perf_counter() - self._start
            self._start = None

    def __enter__(self) -> GcPauses:
        gc.callbacks.append(self)
        return self

    def __exit__(self, *exc) -> None:
        gc.callbacks.remove(self)


def timed_runs(run: Callable[[], Any], repeats: int, device, peak: PeakMemory, deadline: Deadline,
               freeze_gc: bool = True) -> tuple[list[float], float | None, Any, list[float]]:
    """``repeats`` timed calls of ``run`` (fewer if the deadline passes after the first): times, peak, last output
    and the garbage collector's pauses in each run. ``freeze_gc``: the objects that exist before the timed runs are
    frozen (``gc.freeze``) while they run, so a collection scans only what the runs made."""
    times: list[float] = []
    peaks: list[float] = []
    pauses: list[float] = []
    out = None
    gc.collect()
    if freeze_gc:
        gc.freeze()
    try:
        for r in range(repeats):
            if r and deadline.passed():
                log.warning("budget exhausted: %d of %d repeats done", r, repeats)
                break
            out = None
            gc.collect()  # not torch.cuda.empty_cache(): re-allocating the cache would be timed too
            peak.reset()
            sync(device)
            with GcPauses() as paused:
                t0 = time.perf_counter()
                out = run()
                sync(device)
                times.append(time.perf_counter() - t0)
            pauses.append(paused.total)
            if paused.full:
                log.info("%d full garbage collection(s) in timed run %d: %.3f s", paused.full, r + 1, paused.total)
            p = peak.read()
            if p is not None:
                peaks.append(p)
    finally:
        if freeze_gc:
            gc.unfreeze()  # frozen objects are never collected: only while timing
    return times, (max(peaks) if peaks else None), out, pauses


def profile_table(run: Callable[[], Any], device, path: Path, row_limit: int) -> None:
    """Profile ``run()`` with torch.profiler and write its operators by self device time (self CPU time on the CPU)
    to ``path``."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        run()
        sync(device)
    path.parent.mkdir(parents=True, exist_ok=True)
    sort = "self_device_time_total" if cuda else "self_cpu_time_total"
    path.write_text(prof.key_averages().table(sort_by=sort, row_limit=row_limit, max_name_column_width=70))
    log.info("profile written to %s (torch %s)", path, torch.__version__)


def target_layers(call: Callable[[dict], Any], pack, target_hw: tuple[int, int], keys: list, attention) -> list:
    """The layers the sampler's first gradient pass finds: those of ``keys`` that run at ``target_hw``.

    ``call(attn2_patches)`` runs the UNet once (the caller picks the grad mode)."""
    probe = pack.capture.GradCapture(target_hw, None, attention)
    try:
        call({k: probe.patch(k) for k in keys})
    except pack.capture.StopForward:
        pass
    return [k for k in keys if probe.seen.get(k) == target_hw]


def pass_forward(call: Callable[[Any, dict], Any], pack, target_hw: tuple[int, int], targets: list, attention,
                 slots) -> Callable:
    """The sampler's gradient-pass forward around ``call(x, attn2_patches)`` (one UNet run): capture the target
    layers, stop after the last, the sampler's objective. Returns ``forward(leaf) -> (loss (B,), maxima (B, S))``."""
    capture, loss = pack.capture, pack.loss
    cap = capture.GradCapture(target_hw, targets[-1], attention)
    patches = {k: cap.patch(k) for k in targets}

    def forward(leaf):
        try:
            call(leaf, patches)
        except capture.StopForward:
            pass
        return loss.attend_excite_objective(cap.aggregate(), SUBJECT_INDICES, slots)

    return forward


def load_unet(sd: dict, arch: str, variant: str, dtype):
    """A ModelPatcher for the UNet state dict ``sd``, as the UNet loader node makes it (call in inference mode).

    ComfyUI recognises a model family by its widths too, so the ``narrow`` twin is built with the family's model
    config class directly (same model class, sampling and conditioning as the real family)."""
    import comfy.sd

    if variant != "narrow":
        return comfy.sd.load_diffusion_model_state_dict(sd, model_options={"dtype": dtype})
    import comfy.model_detection
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models

    family = {"sd15": comfy.supported_models.SD15, "sdxl": comfy.supported_models.SDXL}[arch]
    config = family(comfy.model_detection.detect_unet_config(sd, ""))
    config.set_inference_dtype(dtype, None)
    model = config.get_model(sd, "")
    model.load_model_weights(sd, "")
    return comfy.model_patcher.ModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                            offload_device=comfy.model_management.unet_offload_device())


def backend_facts(device) -> dict[str, Any]:
    """Kernel choices that change the timings: ComfyUI's attention function and, on CUDA, cuDNN's settings."""
    import torch
    from comfy.ldm.modules import attention as comfy_attention

    fn = comfy_attention.optimized_attention
    facts: dict[str, Any] = {"attention": getattr(fn, "__name__", type(fn).__name__)}
    if device.type == "cuda":
        facts.update({"cudnn": torch.backends.cudnn.version(), "cudnn_benchmark": torch.backends.cudnn.benchmark,
                      "flash_sdp": torch.backends.cuda.flash_sdp_enabled()})
    return facts


def random_state_dict(arch: str, variant: str, device, dtype, seed: int) -> dict:
    """UNet state dict of ComfyUI's ``UNetModel`` for ``arch``/``variant`` with deterministic random weights.

    Biases 0, 1-D weights (norm scales) 1, every other weight ``N(0, std)`` with ``std = min(0.02, fan_in^-1/2)``:
    small enough for fp16 activations. The layout comes from a ``UNetModel`` built on the meta device.
    """
    import comfy.ops
    import torch
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    config = unet_config(arch, variant)
    meta = UNetModel(**config, dtype=dtype, device="meta", operations=comfy.ops.disable_weight_init)
    shapes = {k: (tuple(v.shape), v.dtype) for k, v in meta.state_dict().items()}
    del meta
    gen = torch.Generator(device=device).manual_seed(seed)
    sd = {}
    for key, (shape, dt) in shapes.items():
        if not dt.is_floating_point:
            sd[key] = torch.zeros(shape, dtype=dt, device=device)
            continue
        t = torch.empty(shape, dtype=dtype, device=device)
        if key.endswith("bias"):
            t.zero_()
        elif len(shape) <= 1:
            t.fill_(1.0)
        else:
            fan_in = math.prod(shape[1:])
            t.normal_(0.0, min(0.02, fan_in**-0.5), generator=gen)
        sd[key] = t
    return sd


# ----------------------------------------------------------------------------------------------------------------
# the benchmark


class Bench:
    def __init__(self, args: argparse.Namespace, emitter: Emitter) -> None:
        import torch

        self.args = args
        self.emitter = emitter
        self.torch = torch
        self.device = torch.device("cuda" if args.device == "cuda" else "cpu")
        self.dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        self.pack = import_pack()
        self.peak = PeakMemory(self.device)
        self.deadline = Deadline(args.budget_s)
        commit, dirty = git_commit()
        try:
            import comfyui_version

            comfy_version = comfyui_version.__version__
        except ImportError:
            comfy_version = None
        if self.device.type == "cuda":
            device_name = torch.cuda.get_device_name(self.device)
        else:
            device_name = f"CPU {platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"
        self.meta = {"device_name": device_name, "torch": torch.__version__, "commit": commit, "dirty": dirty,
                     "comfyui": comfy_version, "device": self.device.type, "dtype": str(self.dtype).split(".")[-1],
                     "peak_kind": self.peak.kind, **backend_facts(self.device)}
        self.ours: dict[tuple, float] = {}  # (arch, batch, mode) -> median of this pack / ComfyUI
        self.failed = False

    # ---- rows ----

    def row(self, system: str, arch: str, batch: int, mode: str, times: list[float], peak_gib: float | None,
            plain: float | None, passes: int | None, **extra) -> dict:
        median = statistics.median(times)
        row = {"system": system, "arch": arch, "batch": batch, "steps": self.args.steps, "mode": mode,
               "median_s": round(median, 5), "min_s": round(min(times), 5), "times_s": [round(t, 5) for t in times],
               "peak_gib": None if peak_gib is None else round(peak_gib, 4),
               "ratio_to_plain": round(median / plain, 4) if plain else (1.0 if mode == "plain" else None),
               "grad_passes": passes,
               "extra_s_per_pass": round((median - plain) / passes, 6) if plain and passes else None}
        row.update(extra)
        row.update({k: self.meta[k] for k in ("device_name", "torch", "commit")})
        row.update({k: v for k, v in self.meta.items() if k not in row})
        return row

    # ---- ComfyUI ----

    def run_arch(self, arch: str) -> None:
        import comfy.model_management
        import comfy.samplers

        torch = self.torch
        args = self.args
        spec = ARCHS[arch]
        variant = args.model if args.model != "auto" else ("full" if self.device.type == "cuda" else "tiny")
        size = spec["auto_size"][self.device.type] if args.size == "auto" else int(args.size)
        side = size // 8
        t0 = time.perf_counter()
        sd = random_state_dict(arch, variant, self.device, self.dtype, args.seed)
        with torch.inference_mode():  # the loader node runs in inference mode too: weights are inference tensors
            model = load_unet(sd, arch, variant, self.dtype)
        del sd
        free_memory(self.device)
        if model is None:
            raise RuntimeError(f"ComfyUI did not recognise the random {arch}/{variant} UNet")
        model_class = type(model.model.model_config).__name__
        params = sum(p.numel() for p in model.model.diffusion_model.parameters())
        log.info("%s/%s: ComfyUI model %s, %.1f M parameters, %s, latent %dx%d (built in %.1f s)", arch, variant,
                 model_class, params / 1e6, self.meta["dtype"], side, side, time.perf_counter() - t0)
        info = {"model": variant, "model_class": model_class, "unet_params_m": round(params / 1e6, 1),
                "size": size, "latent": side, "sampler": "euler/normal", "weights": args.weights,
                "attention_blocks": args.blocks, "recompute": args.recompute, "cuda_graph": args.cuda_graph,
                "record_maps": args.record_maps, "gc": args.gc}
        sampling = self.pack.sampling
        target = self.pack.families.target_resolution((side, side), 0)
        ms = model.get_model_object("model_sampling")
        sigmas = comfy.samplers.calculate_sigmas(ms, "normal", args.steps).cpu()
        warm_steps = args.warmup_steps or args.steps
        warm_sigmas = comfy.samplers.calculate_sigmas(ms, "normal", warm_steps).cpu()
        sched = self.pack.schedule.build_schedule(args.steps)
        cap = cap_passes(sched, sampling.AEParams())

        for batch in args.batch:
            with torch.inference_mode():
                pos, neg, latent, noise = self.comfy_inputs(arch, variant, batch, side)
            ctx = (model, arch, batch, (pos, neg, latent, noise), sigmas, warm_sigmas, info, target, cap)
            self.measure_comfy_modes(ctx, [m for m in MODES if m in args.modes])

        if args.diffusers:
            if arch != "sd15":
                log.info("--diffusers: %s skipped (the diffusers A&E pipeline is SD1.x/SD2.x only)", arch)
            elif not self.deadline.passed():
                comfy.model_management.unload_all_models()
                free_memory(self.device)
                self.run_diffusers(arch, model, info, size, side, target, sched)
        del model
        comfy.model_management.unload_all_models()
        comfy.model_management.soft_empty_cache()
        free_memory(self.device)

    def measure_comfy_modes(self, ctx: tuple, modes: list[str]) -> None:
        """Warm-up and timed runs of ``modes`` on one model, arch and batch (in rounds with ``--order interleaved``),
        then one row per mode. A mode that fails is reported and left out; the others go on."""
        arch, batch = ctx[1], ctx[2]

        def attempt(what: str, mode: str, fn: Callable[..., Any], *fn_args) -> bool:
            try:
                fn(*fn_args)
                return True
            except Exception:  # noqa: BLE001 - report it (the sampler is under development), go on
                log.exception("comfyui %s batch %d %s failed (%s)", arch, batch, mode, what)
                self.failed = True
                return False

        def skipped(mode: str) -> bool:
            if self.deadline.passed():
                log.warning("budget exhausted: skipping comfyui %s batch %d %s", arch, batch, mode)
                return True
            return False

        if self.args.order == "interleaved":
            states = []
            for mode in modes:
                st = _ModeRuns(mode)
                if not skipped(mode) and attempt("warm-up", mode, self.comfy_warm_up, ctx, st):
                    states.append(st)
            for r in range(self.args.repeats):
                if r and self.deadline.passed():
                    log.warning("budget exhausted: %d of %d rounds done", r, self.args.repeats)
                    break
                states = [st for st in states if attempt("timed run", st.mode, self.comfy_timed_run, st, 1)]
            plain = next((st for st in states if st.mode == "plain"), None)
            for st in states:
                attempt("results", st.mode, self.comfy_row, ctx, st, plain)
        else:
            plain = None
            for mode in modes:
                st = _ModeRuns(mode)
                if skipped(mode) or not attempt("warm-up", mode, self.comfy_warm_up, ctx, st):
                    continue
                if attempt("timed runs", mode, self.comfy_timed_run, st, self.args.repeats):
                    plain = st if mode == "plain" else plain
                    attempt("results", mode, self.comfy_row, ctx, st, plain)
                free_memory(self.device)
        free_memory(self.device)

    def comfy_warm_up(self, ctx: tuple, st: _ModeRuns) -> None:
        """The untimed warm-up run of a mode (with an AttentionRecord, to count its passes) and the sampler for its
        timed runs."""
        model, arch, batch, inputs, sigmas, warm_sigmas = ctx[:6]
        torch, args = self.torch, self.args
        pos, neg, latent, noise = inputs
        st.make = self.sampler_factory(st.mode)

        def run(sampler, sig=sigmas):
            with torch.inference_mode():  # as ComfyUI's executor runs every node
                return sample_comfy(model, noise, sampler, sig, pos, neg, latent, args.seed)

        st.run = run
        st.record = self.pack.record.AttentionRecord() if st.mode != "plain" else None
        counter = PassCounter(self.pack.sampling.log)
        try:
            tw = time.perf_counter()
            run(st.make(st.record), warm_sigmas)
            sync(self.device)
            st.first_run_s = time.perf_counter() - tw
            log.info("comfyui %s b%d %s: warm-up %.2f s", arch, batch, st.mode, st.first_run_s)
        finally:
            counter.close()
        st.warm_forwards = counter.count
        st.sampler = st.make(self.pack.record.AttentionRecord() if args.record_maps and st.mode != "plain" else None)

    def comfy_timed_run(self, st: _ModeRuns, repeats: int) -> None:
        """``repeats`` timed runs of a mode (fewer where the budget ends), added to its results."""
        counter = PassCounter(self.pack.sampling.log)
        try:
            times, peak, out, gc_s = timed_runs(lambda: st.run(st.sampler), repeats, self.device, self.peak,
                                                self.deadline, self.args.gc == "freeze")
        finally:
            counter.close()
        st.times += times
        st.gc_s += gc_s
        st.out = out
        st.forwards += counter.count
        st.graphed += counter.graphed
        st.recomputed += counter.recomputed
        st.reused += counter.reused
        if peak is not None:
            st.peak = peak if st.peak is None else max(st.peak, peak)

    def comfy_row(self, ctx: tuple, st: _ModeRuns, plain: _ModeRuns | None) -> None:
        """Profile and graph-check runs where asked, then the mode's row."""
        arch, batch, _, sigmas, warm_sigmas, info, target, cap = ctx[1:]
        torch, args, mode, out = self.torch, self.args, st.mode, st.out
        if args.profile and mode != "plain":
            self.profile(lambda: st.run(st.make(None)), f"{arch}_b{batch}_{mode}_{args.blocks}_{args.weights}")
        forwards = st.forwards // max(len(st.times), 1)
        record_passes = None
        if st.record is not None and len(warm_sigmas) == len(sigmas) and hasattr(st.record, "losses"):
            record_passes = sum(len(v) for v in st.record.losses.values())
            if record_passes != forwards:
                log.warning("%s b%d %s: the record counts %d gradient passes, the UNet hook %d", arch, batch, mode,
                            record_passes, forwards)
        extra = dict(info)
        extra.update({"order": args.order, "grad_forwards": forwards, "record_passes": record_passes,
                      "warmup_grad_forwards": st.warm_forwards, "gc_s": [round(t, 4) for t in st.gc_s],
                      "output_finite": bool(torch.isfinite(out).all()), "attention_level": f"{target[0]}x{target[1]}",
                      "output_fingerprint": fingerprint(out),
                      "graph_replayed": all(st.graphed) if st.graphed else None,
                      "blocks_recomputed": max(st.recomputed) if st.recomputed else None,
                      "later_runs_replay_kept_pass": all(st.reused) if st.reused else None})
        if st.first_run_s is not None and len(warm_sigmas) == len(sigmas):  # first run vs the later (timed) runs
            extra["first_run_s"] = round(st.first_run_s, 4)
            extra["first_run_vs_later"] = round(st.first_run_s / statistics.median(st.times), 4)
        if args.order == "interleaved" and plain is not None:
            pairs = [t / p for t, p in zip(st.times, plain.times)]
            extra["paired_ratio_to_plain"] = round(statistics.median(pairs), 4) if pairs else None
        if args.check_graph and mode != "plain" and self.device.type == "cuda" and args.cuda_graph == "on":
            eager = st.run(self.sampler_factory(mode, cuda_graph=False)(None))
            diff = (out.float() - eager.float()).abs()
            extra["graph_vs_eager_max_abs"] = round(float(diff.max()), 6)
            extra["eager_max_abs"] = round(float(eager.float().abs().max()), 6)
        if mode == "ae_refine_cap":
            extra["cap_passes"] = cap
            if forwards != cap:
                log.warning("%s b%d: %d gradient passes at the refinement cap, expected %d (a random model reached "
                            "a threshold, or the sampler counts differently)", arch, batch, forwards, cap)
        if st.record is not None and getattr(st.record, "losses", None):
            first = st.record.losses[min(st.record.losses)][0]
            extra["first_loss"] = round(float(first.float().mean()), 4)
        median = statistics.median(st.times)
        self.ours[(arch, batch, mode)] = median
        plain_median = statistics.median(plain.times) if plain is not None else None
        self.emitter.emit(self.row("comfyui", arch, batch, mode, st.times, st.peak, plain_median,
                                   forwards if mode != "plain" else 0, **extra))

    def profile(self, run: Callable[[], Any], name: str) -> None:
        """One profiled run into ``--profile``."""
        profile_table(run, self.device, self.args.profile / f"{name}.txt", row_limit=40)

    def comfy_inputs(self, arch: str, variant: str, batch: int, side: int):
        import comfy.sample

        torch = self.torch
        spec = ARCHS[arch]
        gen = torch.Generator().manual_seed(self.args.seed + 1)
        ctx = unet_config(arch, variant)["context_dim"]
        subjects = self.pack.tokens.SubjectTokens(indices=SUBJECT_INDICES, labels=("a", "b"),
                                                  prompt_positions=PROMPT_POSITIONS, num_keys=NUM_KEYS, family="l")
        pos_extra: dict[str, Any] = {"attend_excite": subjects}
        neg_extra: dict[str, Any] = {}
        pos_ctx = torch.randn(1, NUM_KEYS, ctx, generator=gen)
        neg_ctx = torch.randn(1, NUM_KEYS, ctx, generator=gen)
        if spec["pooled"]:
            pos_extra["pooled_output"] = torch.randn(1, 1280, generator=gen)
            neg_extra["pooled_output"] = torch.randn(1, 1280, generator=gen)
        latent = torch.zeros(batch, 4, side, side)
        noise = comfy.sample.prepare_noise(latent, self.args.seed)
        return [[pos_ctx, pos_extra]], [[neg_ctx, neg_extra]], latent, noise

    def sampler_factory(self, mode: str, cuda_graph: bool | None = None) -> Callable:
        import comfy.samplers

        sampling = self.pack.sampling
        if mode == "plain":
            return lambda record: comfy.samplers.sampler_object("euler")
        kw = {"refinement": ()} if mode == "ae_no_refine" else {}
        params = sampling.AEParams(sampler_name="euler", record_maps=self.args.record_maps,
                                attention_blocks=self.args.blocks, recompute=self.args.recompute,
                                weights_by_reference=self.args.weights == "reference",
                                cuda_graph=self.args.cuda_graph == "on" if cuda_graph is None else cuda_graph, **kw)
        return lambda record: sampling.make_sampler(params, record)

    # ---- diffusers ----

    def run_diffusers(self, arch: str, model, info: dict, size: int, side: int, target: tuple[int, int],
                      sched) -> None:
        bridge = load_bridge()
        if bridge is None:
            return
        import diffusers

        torch = self.torch
        args = self.args
        try:
            unet = bridge.diffusers_unet_from_comfy(model, self.device, self.dtype)
            ae_pipe = bridge.build_ae_pipeline(unet, device=self.device, dtype=self.dtype)
            try:
                plain_pipe = diffusers.StableDiffusionPipeline.from_pipe(ae_pipe)
            except Exception:  # noqa: BLE001 - older/newer diffusers without from_pipe for this pair
                c = ae_pipe.components
                plain_pipe = diffusers.StableDiffusionPipeline(
                    vae=c["vae"], text_encoder=c["text_encoder"], tokenizer=c["tokenizer"], unet=c["unet"],
                    scheduler=c["scheduler"], safety_checker=None, feature_extractor=None,
                    requires_safety_checker=False)
            plain_pipe.set_progress_bar_config(disable=True)
        except Exception:  # noqa: BLE001 - keep the ComfyUI numbers
            log.exception("--diffusers: could not build the diffusers pipelines; skipping")
            self.failed = True
            return
        updates = {"n": 0}
        update_latent = ae_pipe._update_latent

        def counting_update(*a, **kw):
            updates["n"] += 1
            return update_latent(*a, **kw)

        ae_pipe._update_latent = counting_update
        gen = torch.Generator().manual_seed(args.seed + 1)
        ctx = unet_config(arch, info["model"])["context_dim"]
        pe = torch.randn(1, NUM_KEYS, ctx, generator=gen).to(self.device, self.dtype)
        ne = torch.randn(1, NUM_KEYS, ctx, generator=gen).to(self.device, self.dtype)
        scheduler_name = type(ae_pipe.scheduler).__name__
        d_info = {**info, "sampler": scheduler_name, "diffusers": diffusers.__version__,
                  "attention_level": f"{target[0]}x{target[1]}"}

        for batch in args.batch:
            plain_median = None
            for mode in [m for m in MODES if m in args.modes]:
                if self.deadline.passed():
                    log.warning("budget exhausted: skipping diffusers %s batch %d %s", arch, batch, mode)
                    continue
                pipe = plain_pipe if mode == "plain" else ae_pipe

                def call(steps, pipe=pipe, mode=mode, batch=batch):
                    kw = dict(prompt=None, prompt_embeds=pe, negative_prompt_embeds=ne, height=size, width=size,
                              num_inference_steps=steps, guidance_scale=CFG_SCALE, num_images_per_prompt=batch,
                              output_type="latent",
                              generator=torch.Generator(self.device).manual_seed(args.seed))
                    if mode != "plain":
                        s = self.pack.schedule.build_schedule(steps)
                        kw.update(token_indices=list(SUBJECT_INDICES), max_iter_to_alter=s.guided_steps,
                                  scale_factor=20, attn_res=target,
                                  thresholds={} if mode == "ae_no_refine" else dict(s.refinement))
                    return pipe(**kw).images

                counter = GradForwardCounter(ae_pipe.unet)
                try:
                    tw = time.perf_counter()
                    call(args.warmup_steps or args.steps)
                    sync(self.device)
                    log.info("diffusers %s b%d %s: warm-up %.2f s", arch, batch, mode, time.perf_counter() - tw)
                    counter.count = 0
                    updates["n"] = 0
                    times, peak, out, gc_s = timed_runs(lambda: call(args.steps), args.repeats, self.device,
                                                        self.peak, self.deadline, args.gc == "freeze")
                except Exception:  # noqa: BLE001 - keep what was measured
                    log.exception("diffusers %s b%d %s failed", arch, batch, mode)
                    self.failed = True
                    continue
                finally:
                    counter.close()
                n = max(len(times), 1)
                median = statistics.median(times)
                if mode == "plain":
                    plain_median = median
                ours = self.ours.get((arch, batch, mode))
                extra = dict(d_info)
                extra.update({"grad_forwards": counter.count // n, "output_finite": bool(torch.isfinite(out).all()),
                              "gc_s": [round(t, 4) for t in gc_s],
                              "ratio_ours_to_diffusers": round(ours / median, 4) if ours else None})
                self.emitter.emit(self.row("diffusers", arch, batch, mode, times, peak, plain_median,
                                           updates["n"] // n, **extra))
        del ae_pipe, plain_pipe, unet
        free_memory(self.device)


def cap_passes(sched, params) -> int:
    """Gradient passes of one run when every refinement step hits its cap: one per guided step, plus
    ``max_refinement_steps`` per refinement step (the first pass is shared, one final re-evaluation)."""
    return sched.guided_steps + len(sched.refinement) * params.max_refinement_steps


def sample_comfy(model, noise, sampler, sigmas, positive, negative, latent, seed):
    """ComfyUI's public sampling entry point (what SamplerCustom calls), CFG 7.5, no progress bar."""
    import comfy.sample

    return comfy.sample.sample_custom(model, noise, CFG_SCALE, sampler, sigmas, positive, negative, latent,
                                      disable_pbar=True, seed=seed)


# ----------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        logging.getLogger(PACK).setLevel(logging.WARNING)
    stdout = sys.stdout
    sys.stdout = sys.stderr  # anything else that prints (ComfyUI, diffusers) must not mix into the results
    try:
        if args.table_from is not None:
            rows = [json.loads(line) for line in args.table_from.read_text(encoding="utf-8").splitlines()
                    if line.strip()]
            table = markdown_table(rows)
            if args.markdown is not None:
                args.markdown.write_text(table, encoding="utf-8")
            stdout.write(table)
            return 0
        return run_architectures(args, stdout, Bench)
    finally:
        sys.stdout = stdout


def run_architectures(args, stdout: TextIO, make_runner, table=None) -> int:
    """The body of a benchmark script's ``main``: ComfyUI set up, threads, the CUDA check, then
    ``make_runner(args, emitter).run_arch(arch)`` for each of ``args.arch`` (a failing one is logged and the next
    runs), rows through an :class:`Emitter` on ``stdout`` (``table``: its Markdown table). Exit code 1 if any
    failed."""
    setup_comfy(args.comfy_root, cpu=args.device == "cpu")
    import torch

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        log.error("--device cuda: torch sees no CUDA device")
        return 2
    emitter = Emitter(stdout, args.out, args.markdown, args.append, table)
    runner = make_runner(args, emitter)
    log.info("device %s, torch %s, ComfyUI %s, commit %s", runner.meta["device_name"], torch.__version__,
             runner.meta["comfyui"], runner.meta["commit"])
    try:
        for arch in args.arch:
            try:
                runner.run_arch(arch)
            except Exception:  # noqa: BLE001 - report, go on with the next architecture
                log.exception("benchmark of %s failed", arch)
                runner.failed = True
    finally:
        emitter.finish()
    return 1 if runner.failed else 0


if __name__ == "__main__":
    sys.exit(main())
