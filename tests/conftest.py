"""Shared fixtures: ComfyUI host (in-process and HTTP server) and the tiny SD1.5 checkpoint."""

from __future__ import annotations

import os
import subprocess
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import pytest

# One intra-op thread unless the caller chose otherwise (inherited by the ComfyUI subprocess).
# On small shared CPU machines torch's default (one thread per core) collapses when another
# process holds a core: measured 10-20x slower (CLIP encode 7 s vs 0.7 s, 2 euler steps 16 s vs 0.8 s).
# Set before torch is imported anywhere in this process.
os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = REPO_ROOT / "scripts"
if str(SCRIPTS) not in sys.path:
    sys.path.insert(0, str(SCRIPTS))
# The pure math package ``attention`` is importable on its own (appended, so that ComfyUI's top-level ``nodes``
# module, not this pack's ``nodes/`` package, wins in in-process tests).
if str(REPO_ROOT) not in sys.path:
    sys.path.append(str(REPO_ROOT))

# aliases: the fixtures below use the module names
import comfy_inprocess as inprocess_mod
import comfy_server as server_mod
import tiny_checkpoint as tiny_checkpoint_mod


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    """Keep pytest from importing the repository's root ``__init__.py`` (the node-pack entry point).

    The root folder holds ``__init__.py``, so pytest collects it as a ``Package`` and imports that
    file while setting up every test; it imports ``comfy_api``, which exists only inside ComfyUI.
    """
    for node in {n for item in items for n in item.listchain()}:
        if isinstance(node, pytest.Package) and node.path == REPO_ROOT:
            node.setup = lambda: None  # type: ignore[method-assign]


@pytest.fixture(scope="session")
def comfy_root() -> Path:
    """The ComfyUI source folder (``$COMFYUI_ROOT`` or ``<repo>/.comfyui``); skips if absent."""
    root = inprocess_mod.comfy_root()
    if not (root / "main.py").is_file():
        pytest.skip(f"ComfyUI not found at {root}: run scripts/bootstrap.sh or set COMFYUI_ROOT")
    return root


@pytest.fixture(scope="session")
def tiny_checkpoint(comfy_root: Path) -> Path:
    """Path of the tiny SD1.5 checkpoint (``ensure_checkpoint()``), generated once if missing.

    Generation runs in a subprocess so that merely needing the file does not import ComfyUI
    (and its top-level ``nodes``/``utils`` modules) into the test process.
    """
    path = tiny_checkpoint_mod.default_path()
    if not path.is_file():
        subprocess.run([sys.executable, str(SCRIPTS / "tiny_checkpoint.py"), "--out", str(path)], check=True)
    return tiny_checkpoint_mod.ensure_checkpoint(path)


@pytest.fixture(scope="session")
def comfy_server(
    comfy_root: Path, tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[server_mod.ComfyServer]:
    """A running ComfyUI server (CPU) with this pack and ``ae_tiny_sd15.safetensors``; stopped at the end."""
    server = server_mod.ComfyServer(tmp_path_factory.mktemp("comfy_base"), comfy_root=comfy_root)
    server.link_checkpoint(tiny_checkpoint, tiny_checkpoint_mod.DEFAULT_NAME)
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def tiny_dit_server(comfy_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[server_mod.ComfyServer]:
    """A running ComfyUI server (CPU) with this pack and the test-only tiny Flux/SD3 loader node
    (``AETinyTransformerLoader``, tests/fixtures/ae_tiny_loaders); stopped at the end."""
    import tiny_dit

    server = server_mod.ComfyServer(tmp_path_factory.mktemp("comfy_tiny_dit"), comfy_root=comfy_root,
                                    custom_node_dirs=(REPO_ROOT, tiny_dit.LOADER_NODE_DIR))
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def comfy_inprocess(comfy_root: Path) -> types.SimpleNamespace:
    """ComfyUI importable in this process, CPU mode.

    Returns a namespace with ``root`` (ComfyUI folder), ``comfy`` (the package) and
    ``load_checkpoint(path) -> (model, clip, vae)``.
    """
    inprocess_mod.setup(comfy_root)
    import comfy
    import comfy.model_management  # CPU mode is fixed from here on

    return types.SimpleNamespace(root=comfy_root, comfy=comfy, load_checkpoint=inprocess_mod.load_checkpoint)
