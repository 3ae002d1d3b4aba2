"""A small Chrome DevTools Protocol client: headless Debian ``chromium`` driven from synchronous tests.

The websocket runs on an asyncio loop in a background thread (aiohttp, installed with ComfyUI's own
packages); :class:`Page` offers blocking calls on top of it::

    with Browser.launch(tmp_dir) as browser:
        page = browser.page
        page.navigate("http://127.0.0.1:8188/")
        title = page.evaluate("document.title")
        page.screenshot(tmp_dir / "page.png")

Every console message, uncaught exception and browser log entry of the page is kept in
:attr:`Page.console` (``Runtime.consoleAPICalled``, ``Runtime.exceptionThrown``, ``Log.entryAdded``).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import aiohttp

REPO_ROOT = Path(__file__).resolve().parent.parent
BOOTSTRAP = REPO_ROOT / "scripts" / "bootstrap_browser.sh"


class CDPError(RuntimeError):
    """The browser answered a command with an error, or a page script threw."""


def ensure_browser() -> str:
    """Path of a chromium binary; runs ``scripts/bootstrap_browser.sh`` (installs what is missing)."""
    out = subprocess.run(["bash", str(BOOTSTRAP)], check=True, capture_output=True, text=True)
    return out.stdout.strip().splitlines()[-1]


@dataclass
class ConsoleEntry:
    """One console message, uncaught exception or browser log entry."""

    source: str  # "console", "exception" or "log"
    level: str  # "error", "warning", "info", ...
    text: str
    url: str = ""
    stack: str = ""

    def __str__(self) -> str:
        where = f" ({self.url})" if self.url else ""
        return f"[{self.source}:{self.level}] {self.text}{where}"


@dataclass
class _Events:
    """Events received so far, shared between the websocket thread and the test thread."""

    items: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    cond: threading.Condition = field(default_factory=threading.Condition)


def _console_entry(method: str, params: dict[str, Any]) -> ConsoleEntry | None:
    if method == "Runtime.consoleAPICalled":
        parts = []
        for arg in params.get("args", []):
            if "value" in arg:
                parts.append(str(arg["value"]))
            else:
                parts.append(str(arg.get("description", arg.get("type", ""))))
        frames = (params.get("stackTrace") or {}).get("callFrames") or []
        return ConsoleEntry(
            "console",
            params.get("type", "log"),
            " ".join(parts),
            frames[0].get("url", "") if frames else "",
            "\n".join(f"{f.get('functionName')} {f.get('url')}:{f.get('lineNumber')}" for f in frames),
        )
    if method == "Runtime.exceptionThrown":
        details = params.get("exceptionDetails", {})
        exc = details.get("exception") or {}
        frames = (details.get("stackTrace") or {}).get("callFrames") or []
        return ConsoleEntry(
            "exception",
            "error",
            f"{details.get('text', '')} {exc.get('description', '')}".strip(),
            details.get("url", "") or (frames[0].get("url", "") if frames else ""),
            "\n".join(f"{f.get('functionName')} {f.get('url')}:{f.get('lineNumber')}" for f in frames),
        )
    if method == "Log.entryAdded":
        entry = params.get("entry", {})
        return ConsoleEntry("log", entry.get("level", ""), entry.get("text", ""), entry.get("url", ""))
    return None


class Page:
    """One page target over its own websocket; all methods block the calling thread."""

    def __init__(self, ws_url: str, timeout: float = 30.0) -> None:
        self.timeout = timeout
        self.console: list[ConsoleEntry] = []
        self._events = _Events()
        self._next_id = 0
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="cdp", daemon=True)
        self._thread.start()
        self._http: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._reader: asyncio.Task[None] | None = None
        self._run(self._connect(ws_url))

    # ---------------------------------------------------------------- plumbing
    def _run(self, coro: Any, timeout: float | None = None) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout or self.timeout)

    async def _connect(self, ws_url: str) -> None:
        self._http = aiohttp.ClientSession(trust_env=False)
        self._ws = await self._http.ws_connect(ws_url, max_msg_size=0, autoping=True)
        self._reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        assert self._ws is not None
        async for msg in self._ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                continue
            data = json.loads(msg.data)
            if "id" in data:
                fut = self._pending.pop(data["id"], None)
                if fut is not None and not fut.done():
                    fut.set_result(data)
                continue
            method, params = data.get("method", ""), data.get("params", {})
            entry = _console_entry(method, params)
            with self._events.cond:
                if entry is not None:
                    self.console.append(entry)
                self._events.items.append((method, params))
                self._events.cond.notify_all()
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(CDPError("the browser closed the connection"))

    async def _send(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        assert self._ws is not None
        self._next_id += 1
        fut: asyncio.Future[dict[str, Any]] = self._loop.create_future()
        self._pending[self._next_id] = fut
        await self._ws.send_str(json.dumps({"id": self._next_id, "method": method, "params": params}))
        return await fut

    async def _close(self) -> None:
        if self._ws is not None:
            await self._ws.close()
        if self._reader is not None:
            await asyncio.wait([self._reader], timeout=5)
        if self._http is not None:
            await self._http.close()

    def close(self) -> None:
        """Close the websocket and stop the background loop."""
        if not self._loop.is_running():
            return
        try:
            self._run(self._close(), timeout=10)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)

    # ----------------------------------------------------------------- commands
    def send(self, method: str, params: dict[str, Any] | None = None, timeout: float | None = None) -> dict[str, Any]:
        """Send one CDP command and return its ``result``.

        Raises:
            CDPError: the browser answered with an error.
        """
        answer = self._run(self._send(method, params or {}), timeout)
        if "error" in answer:
            raise CDPError(f"{method}: {answer['error']}")
        return answer.get("result", {})

    def evaluate(self, expression: str, timeout: float | None = None) -> Any:
        """Evaluate a JavaScript expression (promises are awaited) and return its JSON value.

        Raises:
            CDPError: the script threw or the promise rejected.
        """
        result = self.send(
            "Runtime.evaluate",
            {"expression": expression, "awaitPromise": True, "returnByValue": True, "userGesture": True},
            timeout=timeout,
        )
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            desc = (details.get("exception") or {}).get("description") or details.get("text")
            raise CDPError(f"script threw: {desc}\n--- script ---\n{expression[:2000]}")
        return result.get("result", {}).get("value")

    def wait_for(self, expression: str, timeout: float = 30.0, poll: float = 0.2, what: str = "") -> Any:
        """Evaluate ``expression`` until it returns a truthy value; returns that value.

        Raises:
            TimeoutError: still falsy after ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"after {timeout:.0f} s still {value!r}: {what or expression}")
            time.sleep(poll)

    def wait_event(self, predicate: Callable[[str, dict[str, Any]], bool], timeout: float = 30.0) -> dict[str, Any]:
        """Wait for an event (``method, params``) matching ``predicate``, counting those already received."""
        deadline = time.monotonic() + timeout
        seen = 0
        with self._events.cond:
            while True:
                for method, params in self._events.items[seen:]:
                    if predicate(method, params):
                        return params
                seen = len(self._events.items)
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("no matching DevTools event")
                self._events.cond.wait(left)

    def navigate(self, url: str, timeout: float = 60.0) -> None:
        """Load ``url`` and wait for its ``load`` event."""
        with self._events.cond:
            self._events.items = [e for e in self._events.items if e[0] != "Page.loadEventFired"]
        self.send("Page.navigate", {"url": url})
        self.wait_event(lambda m, _: m == "Page.loadEventFired", timeout=timeout)

    def screenshot(self, path: str | os.PathLike[str]) -> Path:
        """Write a PNG of the viewport to ``path``."""
        data = self.send("Page.captureScreenshot", {"format": "png"}, timeout=60)["data"]
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(base64.b64decode(data))
        return out

    # -------------------------------------------------------------------- input
    def mouse(self, kind: str, x: float, y: float, button: str = "left", clicks: int = 1) -> None:
        """One ``Input.dispatchMouseEvent`` (``mousePressed``, ``mouseReleased``, ``mouseMoved``)."""
        params: dict[str, Any] = {"type": kind, "x": x, "y": y}
        if kind != "mouseMoved":
            params.update(button=button, clickCount=clicks, buttons=1 if kind == "mousePressed" else 0)
        self.send("Input.dispatchMouseEvent", params)

    def click(self, x: float, y: float) -> None:
        """A left click at viewport coordinates."""
        self.mouse("mouseMoved", x, y)
        self.mouse("mousePressed", x, y)
        self.mouse("mouseReleased", x, y)

    def double_click(self, x: float, y: float) -> None:
        """A left double click at viewport coordinates (two clicks, the second with ``clickCount`` 2)."""
        self.mouse("mouseMoved", x, y)
        for clicks in (1, 2):
            self.mouse("mousePressed", x, y, clicks=clicks)
            self.mouse("mouseReleased", x, y, clicks=clicks)

    def type_text(self, text: str) -> None:
        """Type ``text`` into the focused element, one key event per character."""
        for ch in text:
            self.send("Input.dispatchKeyEvent", {"type": "keyDown", "text": ch, "key": ch, "unmodifiedText": ch})
            self.send("Input.dispatchKeyEvent", {"type": "keyUp", "key": ch})

    def press(self, key: str, code: str | None = None, key_code: int = 0) -> None:
        """Press and release a named key such as ``Escape`` (``key_code``: its Windows virtual-key code)."""
        params = {"key": key, "code": code or key, "windowsVirtualKeyCode": key_code}
        self.send("Input.dispatchKeyEvent", {"type": "rawKeyDown", **params})
        self.send("Input.dispatchKeyEvent", {"type": "keyUp", **params})

    def drop_files(self, x: float, y: float, paths: list[str | os.PathLike[str]]) -> None:
        """Drag files from outside the browser and drop them at ``(x, y)`` (``Input.dispatchDragEvent``)."""
        data = {"items": [], "files": [str(Path(p).resolve()) for p in paths], "dragOperationsMask": 1}
        for kind in ("dragEnter", "dragOver", "drop"):
            self.send("Input.dispatchDragEvent", {"type": kind, "x": x, "y": y, "data": data})


class Browser:
    """A headless chromium process with one page; a context manager (:meth:`launch`)."""

    def __init__(self, proc: subprocess.Popen[bytes], profile: Path, port: int, page: Page) -> None:
        self.proc = proc
        self.profile = profile
        self.port = port
        self.page = page

    @classmethod
    def launch(
        cls,
        profile: str | os.PathLike[str],
        binary: str | None = None,
        width: int = 1600,
        height: int = 1000,
        timeout: float = 60.0,
    ) -> Self:
        """Start ``chromium --headless=new --remote-debugging-port=0`` with its own profile folder.

        The DevTools port is read from ``<profile>/DevToolsActivePort``; the page target's websocket is
        found through ``/json/list``. Console, log and page events are enabled on it.
        """
        binary = binary or shutil.which("chromium") or ensure_browser()
        prof = Path(profile).resolve()
        prof.mkdir(parents=True, exist_ok=True)
        (prof / "DevToolsActivePort").unlink(missing_ok=True)
        args = [
            binary,
            "--headless=new",
            "--remote-debugging-port=0",
            "--remote-debugging-address=127.0.0.1",
            f"--user-data-dir={prof}",
            f"--window-size={width},{height}",
            "--no-sandbox",  # needed when running as root
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-extensions",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--metrics-recording-only",
            "--mute-audio",
            "--proxy-server=direct://",
            "--proxy-bypass-list=*",
            "about:blank",
        ]
        log = open(prof / "chromium.log", "wb")  # the process keeps its own copy of the descriptor
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()
        try:
            port = cls._wait_port(proc, prof, timeout)
            page = Page(cls._page_ws_url(port, timeout))
            for domain in ("Page", "Runtime", "Log"):
                page.send(f"{domain}.enable")
            page.send("Emulation.setDeviceMetricsOverride",
                      {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})
        except BaseException:
            proc.kill()
            proc.wait(timeout=10)
            raise
        return cls(proc, prof, port, page)

    @staticmethod
    def _wait_port(proc: subprocess.Popen[bytes], prof: Path, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        port_file = prof / "DevToolsActivePort"
        while True:
            if port_file.is_file():
                first = port_file.read_text().splitlines()[:1]
                if first and first[0].strip().isdigit():
                    return int(first[0])
            if proc.poll() is not None:
                text = (prof / "chromium.log").read_text(errors="replace")[-4000:]
                raise RuntimeError(f"chromium exited with code {proc.returncode}:\n{text}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"chromium wrote no DevToolsActivePort within {timeout:.0f} s")
            time.sleep(0.1)

    @staticmethod
    def _page_ws_url(port: int, timeout: float) -> str:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        deadline = time.monotonic() + timeout
        while True:
            with opener.open(f"http://127.0.0.1:{port}/json/list", timeout=10) as resp:
                targets = json.loads(resp.read())
            pages = [t for t in targets if t.get("type") == "page" and t.get("webSocketDebuggerUrl")]
            if pages:
                return str(pages[0]["webSocketDebuggerUrl"])
            if time.monotonic() > deadline:
                raise TimeoutError("chromium lists no page target")
            time.sleep(0.1)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the page connection and end the browser (killed after 10 s)."""
        try:
            self.page.close()
        finally:
            if self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(timeout=10)
