"""In-process ComfyUI bootstrap for tests, benchmarks and helper scripts.

ComfyUI is not an installable package: its source folder must be on ``sys.path``, and
``comfy.cli_args.args.cpu`` must be set *before* anything imports ``comfy.model_management``
(otherwise CUDA initialisation fails on machines without a GPU).

Note: the ComfyUI folder contains top-level modules such as ``nodes``, ``utils``, ``server`` and
``execution``. It is inserted at the front of ``sys.path`` so that ComfyUI's own imports resolve
to them; code in the same process should not expect ``import nodes`` to mean this repository's
``nodes`` package afterwards.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent

_done_root: Path | None = None


def repo_root() -> Path:
    """Return the repository root (the folder above ``scripts/``)."""
    return REPO_ROOT


def comfy_root() -> Path:
    """Return the ComfyUI source folder: ``$COMFYUI_ROOT`` if set, else ``<repo>/.comfyui``."""
    env = os.environ.get("COMFYUI_ROOT")
    return Path(env).resolve() if env else REPO_ROOT / ".comfyui"


# `setup` shadows the name `comfy_root` with its parameter; keep an alias for the default.
_default_comfy_root = comfy_root


def setup(comfy_root: str | os.PathLike[str] | None = None, cpu: bool = True) -> None:
    """Make ComfyUI importable in this process and force CPU mode (idempotent).

    Args:
        comfy_root: ComfyUI source folder; defaults to :func:`comfy_root`.
        cpu: set ``comfy.cli_args.args.cpu`` before ``comfy.model_management`` is imported.

    Raises:
        FileNotFoundError: the folder has no ``main.py``/``comfy`` package.
        RuntimeError: called again with a different folder.
    """
    global _done_root
    root = Path(comfy_root if comfy_root is not None else _default_comfy_root()).resolve()
    if _done_root is not None:
        if root != _done_root:
            raise RuntimeError(f"ComfyUI already set up from {_done_root}, not {root}")
        return
    if not (root / "main.py").is_file() or not (root / "comfy").is_dir():
        raise FileNotFoundError(f"no ComfyUI source at {root} (run scripts/bootstrap.sh or set COMFYUI_ROOT)")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))

    import comfy.cli_args  # parses an empty argv unless comfy.options enabled parsing

    if cpu:
        if "comfy.model_management" in sys.modules and not comfy.cli_args.args.cpu:
            log.warning("comfy.model_management was imported before setup(); CPU mode may not apply")
        comfy.cli_args.args.cpu = True
    _done_root = root
    log.debug("ComfyUI set up in-process from %s (cpu=%s)", root, cpu)


def load_checkpoint(path: str | os.PathLike[str]) -> tuple[object, object, object]:
    """Load a checkpoint like ``CheckpointLoaderSimple``: returns ``(model, clip, vae)``.

    :func:`setup` must have been called.
    """
    import comfy.sd

    out = comfy.sd.load_checkpoint_guess_config(str(path), output_vae=True, output_clip=True)
    return out[0], out[1], out[2]


def load_pack(name: str = "comfyui_attend_excite"):
    """Import this repository as the package ``name`` (as ComfyUI's loader does) and return the module."""
    import importlib.util

    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(
        name, REPO_ROOT / "__init__.py", submodule_search_locations=[str(REPO_ROOT)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
