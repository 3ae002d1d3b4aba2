"""Run a headless ComfyUI server in a subprocess and drive it over HTTP (stdlib only).

Typical use (tests, demos)::

    with ComfyServer(tmp_dir) as server:
        name = server.link_checkpoint(tiny_checkpoint_path)
        history = server.run(prompt, timeout=300)
        png = server.image_bytes(history["outputs"]["9"]["images"][0])

Also provides :func:`ui_to_api`, which converts a UI-format workflow (what the frontend saves,
e.g. the pack's ``workflows/*.json``) into an API-format prompt for ``POST /prompt``.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Self

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
PACK_NAME = "comfyui_attend_excite"
READY_TIMEOUT_S = 120.0
BASE_SUBDIRS = ("models/checkpoints", "custom_nodes", "input", "output", "temp", "user")


class ComfyError(RuntimeError):
    """ComfyUI refused a prompt or reported an execution error."""


def default_comfy_root() -> Path:
    """``$COMFYUI_ROOT`` if set, else ``<repo>/.comfyui``."""
    env = os.environ.get("COMFYUI_ROOT")
    return Path(env).resolve() if env else REPO_ROOT / ".comfyui"


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that is free on ``host`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class ComfyClient:
    """HTTP client of a running ComfyUI server (``url`` such as ``http://127.0.0.1:8188``)."""

    def __init__(self, url: str) -> None:
        self._url = url.rstrip("/")
        # never route a local server through an http_proxy from the environment
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    @property
    def url(self) -> str:
        return self._url

    # ---------------------------------------------------------------------- HTTP
    def _request(self, path: str, body: Any = None, method: str | None = None, timeout: float = 60) -> bytes:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        with self._opener.open(req, timeout=timeout) as resp:
            return resp.read()

    def get_json(self, path: str, timeout: float = 60) -> Any:
        """``GET path`` and decode the JSON answer."""
        return json.loads(self._request(path, timeout=timeout))

    def post_json(self, path: str, body: Any, timeout: float = 60) -> Any:
        """``POST`` a JSON body; returns the decoded answer, or ``None`` for an empty one."""
        raw = self._request(path, body=body, method="POST", timeout=timeout)
        return json.loads(raw) if raw.strip() else None

    def object_info(self, node_id: str | None = None) -> dict[str, Any]:
        """``/object_info`` (all nodes) or ``/object_info/{node_id}``."""
        return self.get_json("/object_info" if node_id is None else f"/object_info/{urllib.parse.quote(node_id)}")

    def queue(self, prompt: Mapping[str, Any], client_id: str | None = None) -> str:
        """Queue an API-format prompt; returns its ``prompt_id``.

        Raises:
            ComfyError: validation failed (HTTP 400); the message includes ``node_errors``.
        """
        body = {"prompt": prompt, "client_id": client_id or uuid.uuid4().hex}
        try:
            answer = self.post_json("/prompt", body)
        except urllib.error.HTTPError as err:
            detail = err.read().decode(errors="replace")
            try:
                parsed = json.loads(detail)
                errors = json.dumps(parsed.get("node_errors"), indent=1)
                detail = f"error={json.dumps(parsed.get('error'))}\nnode_errors={errors}"
            except json.JSONDecodeError:
                pass
            raise ComfyError(f"POST /prompt failed with HTTP {err.code}: {detail}") from None
        return str(answer["prompt_id"])

    def wait(self, prompt_id: str, timeout: float = 600, poll: float = 0.25) -> dict[str, Any]:
        """Poll ``/history/{prompt_id}`` until the prompt finished; returns its history entry.

        Raises:
            ComfyError: execution failed (the message lists ComfyUI's status messages).
            TimeoutError: not finished within ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        while True:
            entry = self.get_json(f"/history/{urllib.parse.quote(prompt_id)}").get(prompt_id)
            if entry is not None:
                status = entry.get("status") or {}
                if status.get("status_str") == "error":
                    raise ComfyError(f"prompt {prompt_id} failed:\n{_format_messages(status.get('messages', []))}")
                if status.get("completed"):
                    return entry
            if time.monotonic() > deadline:
                raise TimeoutError(f"prompt {prompt_id} not finished after {timeout:.0f} s")
            time.sleep(poll)

    def run(self, prompt: Mapping[str, Any], timeout: float = 600) -> dict[str, Any]:
        """Queue a prompt and wait for it; returns the history entry."""
        return self.wait(self.queue(prompt), timeout=timeout)

    def image_bytes(self, image_ref: Mapping[str, str]) -> bytes:
        """Fetch an image listed in ``outputs[node]["images"]`` via ``/view``."""
        query = urllib.parse.urlencode(
            {
                "filename": image_ref["filename"],
                "subfolder": image_ref.get("subfolder", ""),
                "type": image_ref.get("type", "output"),
            }
        )
        return self._request(f"/view?{query}")

    def interrupt(self) -> None:
        """Interrupt the running prompt (``POST /interrupt``)."""
        self.post_json("/interrupt", {})


class ComfyServer(ComfyClient):
    """A ComfyUI ``main.py`` subprocess with its own base directory; a context manager.

    Args:
        base_dir: holds ``models/checkpoints``, ``custom_nodes``, ``input``, ``output``, ``temp``,
            ``user``, an empty front-end folder and ``server.log``.
        comfy_root: ComfyUI source folder (default: :func:`default_comfy_root`).
        python: interpreter that runs ``main.py``.
        extra_args: appended to the ComfyUI command line.
        custom_node_dirs: node packs to symlink into ``custom_nodes`` (the repository root is
            linked as ``comfyui_attend_excite``, others under their folder name).
        env: extra environment variables for the server process (e.g. ``OMP_NUM_THREADS``).
        cpu: pass ``--cpu`` (default); ``False`` lets ComfyUI use its GPU.
        web_ui: serve ComfyUI's own web front end (needs ``comfyui-frontend-package`` in the server's
            Python, see ``scripts/bootstrap_browser.sh``); default ``False`` serves an empty folder.
    """

    host = "127.0.0.1"

    def __init__(
        self,
        base_dir: str | os.PathLike[str],
        comfy_root: str | os.PathLike[str] | None = None,
        python: str = sys.executable,
        extra_args: Sequence[str] = (),
        custom_node_dirs: Iterable[str | os.PathLike[str]] = (REPO_ROOT,),
        env: Mapping[str, str] | None = None,
        cpu: bool = True,
        web_ui: bool = False,
    ) -> None:
        self.base_dir = Path(base_dir).resolve()
        self.comfy_root = Path(comfy_root).resolve() if comfy_root is not None else default_comfy_root()
        self.python = python
        self.extra_args = tuple(extra_args)
        self.custom_node_dirs = [Path(d).resolve() for d in custom_node_dirs]
        self.env = dict(env or {})
        self.cpu = cpu
        self.web_ui = web_ui
        self.port: int | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.base_dir / "server.log"
        super().__init__("")

    # ----------------------------------------------------------------- lifecycle
    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:PORT``."""
        if self.port is None:
            raise RuntimeError("server not started")
        return f"http://{self.host}:{self.port}"

    def prepare_base_dir(self) -> None:
        """Create the base-directory layout and link the node packs into ``custom_nodes``."""
        for sub in BASE_SUBDIRS:
            (self.base_dir / sub).mkdir(parents=True, exist_ok=True)
        (self.base_dir / "frontend_empty").mkdir(exist_ok=True)
        for src in self.custom_node_dirs:
            name = PACK_NAME if src == REPO_ROOT else src.name
            link = self.base_dir / "custom_nodes" / name
            if link.is_symlink() or link.exists():
                if link.resolve() == src:
                    continue
                raise FileExistsError(f"{link} exists and does not point to {src}")
            link.symlink_to(src, target_is_directory=True)

    def command(self) -> list[str]:
        """The ComfyUI command line (run with ``cwd=comfy_root``)."""
        return [
            self.python,
            "main.py",
            *(["--cpu"] if self.cpu else []),
            "--listen",
            self.host,
            "--port",
            str(self.port),
            "--base-directory",
            str(self.base_dir),
            "--disable-api-nodes",
            "--database-url",
            "sqlite:///:memory:",
            *([] if self.web_ui else ["--front-end-root", str(self.base_dir / "frontend_empty")]),
            "--preview-method",
            "none",
            *self.extra_args,
        ]

    def start(self, timeout: float = READY_TIMEOUT_S) -> None:
        """Start ComfyUI and wait until ``/object_info/CheckpointLoaderSimple`` answers."""
        if self.proc is not None:
            raise RuntimeError("server already started")
        if not (self.comfy_root / "main.py").is_file():
            raise FileNotFoundError(f"no ComfyUI main.py in {self.comfy_root}")
        self.prepare_base_dir()
        self.port = free_port(self.host)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        with open(self.log_path, "ab") as logf:
            self.proc = subprocess.Popen(
                self.command(),
                cwd=self.comfy_root,
                stdout=logf,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
            )
        log.info("ComfyUI pid %d on %s (log %s)", self.proc.pid, self.url, self.log_path)
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, timeout: float) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"ComfyUI exited with code {self.proc.returncode} during startup:\n{self.log_tail()}"
                )
            try:
                if "CheckpointLoaderSimple" in self.get_json("/object_info/CheckpointLoaderSimple", timeout=5):
                    return
            except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"ComfyUI not ready after {timeout:.0f} s:\n{self.log_tail()}")
            time.sleep(0.25)

    def stop(self) -> None:
        """Terminate the server (kill after 10 s); safe to call more than once."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)

    def log_tail(self, lines: int = 60) -> str:
        """The last lines of ``server.log``."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no server log)"
        return "\n".join(text.splitlines()[-lines:])

    def link_checkpoint(self, path: str | os.PathLike[str], name: str | None = None) -> str:
        """Symlink a checkpoint into ``<base>/models/checkpoints``; returns its ``ckpt_name``."""
        src = Path(path).resolve()
        name = name or src.name
        folder = self.base_dir / "models" / "checkpoints"
        folder.mkdir(parents=True, exist_ok=True)
        link = folder / name
        if link.is_symlink() or link.exists():
            if link.resolve() == src:
                return name
            link.unlink()
        link.symlink_to(src)
        return name


def _format_messages(messages: Iterable[Any]) -> str:
    """Render ``history[...]["status"]["messages"]`` ([event, data] pairs) readably."""
    out = []
    for event, data in messages:
        if event == "execution_error":
            out.append(
                f"execution_error in node {data.get('node_id')} ({data.get('node_type')}): "
                f"{data.get('exception_type')}: {data.get('exception_message')}\n{''.join(data.get('traceback', []))}"
            )
        else:
            out.append(f"{event}: {json.dumps(data)[:500]}")
    return "\n".join(out)


# --------------------------------------------------------------------- ui_to_api
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
# Expert settings the pack's sampler nodes had as widgets before they moved to the Attend-and-Excite Options
# node, in their saved order; workflows saved then list their values after the widgets the nodes kept. They are
# passed on by name (the nodes still take them from the prompt), as the pack's front-end extension keeps them.
EARLIER_SETTINGS = ("max_refinement_steps", "smoothing", "kernel_size", "smoothing_sigma", "attention_resolution",
                    "token_slots", "record_maps", "attention_blocks", "cuda_graph")
EARLIER_LAYOUT = {"AttendExciteKSampler": EARLIER_SETTINGS, "AttendExciteSampler": EARLIER_SETTINGS}
FRONTEND_ONLY = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}
MUTED, BYPASSED = 2, 4


def _widget_inputs(info: Mapping[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    """``(name, type, options)`` of a node's widget inputs, in ``input_order`` (required, optional)."""
    order = info.get("input_order") or {s: list(info.get("input", {}).get(s, {})) for s in ("required", "optional")}
    out = []
    for section in ("required", "optional"):
        specs = info.get("input", {}).get(section, {})
        for name in order.get(section, []):
            spec = specs.get(name)
            if not spec:
                continue
            kind = spec[0]
            opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            kind = "COMBO" if isinstance(kind, list) else kind
            if kind in WIDGET_TYPES and not opts.get("forceInput"):
                out.append((name, kind, opts))
    return out


def _has_control_widget(name: str, kind: str, opts: Mapping[str, Any]) -> bool:
    """Whether the frontend adds a hidden "control after generate" value after this widget."""
    return kind == "INT" and (name in ("seed", "noise_seed") or bool(opts.get("control_after_generate")))


def ui_to_api(workflow: Mapping[str, Any], object_info: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Convert a UI-format workflow to an API-format prompt.

    - Widget values (``widgets_values``) map to the widget inputs in ``input_order`` order; the
      frontend stores one extra value after seed-like INT widgets ("fixed"/"randomize"/...) and
      after upload combos, both skipped. A widget input that is also fed by a link takes the link.
      Values after the last widget are dropped, as the frontend drops them, except on the pack's
      sampler nodes saved with the earlier layout (``EARLIER_LAYOUT``): they become named inputs.
    - Nodes with mode 2 (muted) are dropped, and so are inputs fed by them. Nodes with mode 4
      (bypassed) are dropped and their consumers are wired to the bypassed node's input of the
      same type (as the frontend does).
    - Frontend-only nodes (Note, MarkdownNote, Reroute, PrimitiveNode) are dropped; reroutes are
      followed to their source; inputs fed by a PrimitiveNode keep the widget value.

    Raises:
        ValueError: a node type is unknown to ``object_info``.
    """
    nodes = {int(n["id"]): n for n in workflow.get("nodes", [])}
    links: dict[int, tuple[int, int, str]] = {}
    for link in workflow.get("links", []):
        if isinstance(link, Mapping):
            lid, src, slot, typ = link["id"], link["origin_id"], link["origin_slot"], link.get("type", "*")
        else:
            lid, src, slot, typ = link[0], link[1], link[2], link[5] if len(link) > 5 else "*"
        links[int(lid)] = (int(src), int(slot), str(typ))

    def resolve(link_id: int | None, seen: frozenset[int] = frozenset()) -> tuple[int, int] | None:
        """Follow a link through reroutes/bypassed nodes; ``None`` if it leads to no real output."""
        if link_id is None or int(link_id) not in links or int(link_id) in seen:
            return None
        seen = seen | {int(link_id)}
        src, slot, typ = links[int(link_id)]
        node = nodes.get(src)
        if node is None or node.get("mode", 0) == MUTED or node["type"] == "PrimitiveNode":
            return None
        if node["type"] == "Reroute":
            ins = node.get("inputs") or []
            return resolve(ins[0].get("link"), seen) if ins else None
        if node.get("mode", 0) == BYPASSED:
            ins = node.get("inputs") or []
            outs = node.get("outputs") or []
            out_type = outs[slot].get("type", typ) if slot < len(outs) else typ
            same_slot = [ins[slot]] if slot < len(ins) and ins[slot].get("type") == out_type else []
            for inp in same_slot + [i for i in ins if i.get("type") == out_type]:
                if inp.get("link") is not None:
                    return resolve(inp["link"], seen)
            return None
        return src, slot

    prompt: dict[str, dict[str, Any]] = {}
    for nid, node in nodes.items():
        ntype = node["type"]
        if ntype in FRONTEND_ONLY or node.get("mode", 0) in (MUTED, BYPASSED):
            continue
        info = object_info.get(ntype)
        if info is None:
            raise ValueError(f"node {nid}: type {ntype!r} is not in object_info (missing custom node?)")
        inputs: dict[str, Any] = {}
        values = node.get("widgets_values")
        widgets = _widget_inputs(info)
        if isinstance(values, Mapping):  # some nodes save widgets by name
            inputs.update({name: values[name] for name, _, _ in widgets if name in values})
        elif values:
            pos = 0
            for name, kind, opts in widgets:
                if pos >= len(values):
                    break
                inputs[name] = values[pos]
                pos += 1
                if _has_control_widget(name, kind, opts) or opts.get("image_upload"):
                    pos += 1
            if ntype in EARLIER_LAYOUT and not any(inp.get("name") == "options" and inp.get("link") is not None
                                                   for inp in node.get("inputs") or []):
                inputs.update(zip(EARLIER_LAYOUT[ntype], values[pos:]))
        for inp in node.get("inputs") or []:
            src = resolve(inp.get("link"))
            if src is not None:
                inputs[inp["name"]] = [str(src[0]), src[1]]
        prompt[str(nid)] = {"class_type": ntype, "inputs": inputs}
    return prompt
