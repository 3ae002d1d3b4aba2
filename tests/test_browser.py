"""The pack in ComfyUI's own web front end, driven in headless chromium like a person would.

ComfyUI 0.3.75 serves its pinned front end (``comfyui-frontend-package==1.32.9``); the browser is Debian's
``chromium`` over the DevTools protocol (``tests/browser.py``). Both are installed by
``scripts/bootstrap_browser.sh`` when missing. What is checked:

1. the page loads without console errors that come from the pack (others are listed, not failed);
2. double-clicking the canvas opens the node search, and "attend" lists the pack's nodes;
3. each workflow in ``workflows/`` dropped onto the canvas as a file loads with every node known (no
   missing-node dialog) and no two nodes overlapping as the front end lays them out;
4. the shipped workflow runs from the Run button and its output images appear on the canvas; to keep it
   small on a CPU the test first sets, through the page, the checkpoint to the tiny test model, 4 steps,
   128 x 128 px and at most 2 refinement steps per refinement point;
5. a subject that is not in the prompt shows ComfyUI's error dialog with the node's message;
6. after a run the Text Encode node shows its token table and the Report node its numbers;
7. a workflow saved before the expert settings moved to the Options node keeps its values: those of the
   sampler's own widgets, and a changed expert setting on an Options node the pack's extension adds.

Screenshots go to ``$AE_BROWSER_SHOTS`` or a temporary folder; the folder is printed in the test output.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from browser import Browser, ConsoleEntry, Page, ensure_browser
from comfy_server import ComfyServer
from tiny_checkpoint import DEFAULT_NAME as CKPT

pytestmark = [pytest.mark.host, pytest.mark.slow, pytest.mark.browser]

REPO_ROOT = Path(__file__).resolve().parent.parent
WORKFLOWS = sorted((REPO_ROOT / "workflows").glob("*.json"))
# the workflow that runs on the tiny SD1.5 test checkpoint
RUN_WORKFLOW = REPO_ROOT / "workflows" / "A&E text to image (SD1.5).json"
FRONTEND_VERSION = "1.32.9"
OUR_NODES = ("AttendExciteTextEncode", "AttendExciteSampler", "AttendExciteKSampler", "AttendExciteOptions",
             "AttendExciteVisualize", "AttendExciteReport")
# a workflow saved when the expert settings were widgets of the sampler nodes
EARLIER_WORKFLOW = REPO_ROOT / "tests" / "data" / "workflow_sd15_before_options_node.json"
# What marks a console entry as the pack's own: its node ids, display names, module or web folder.
PACK_MARKS = re.compile(r"attend|comfyui_attend_excite", re.IGNORECASE)
# The front end asks the online node registry where each custom node comes from; offline, its content
# security policy blocks the request and logs an error naming the node. That is not the pack's doing.
REGISTRY_LOOKUP = re.compile(r"api\.comfy\.org")
RUN_TIMEOUT_S = 300

# widget values that make a workflow cheap on a CPU: (node type or "*", widget name, value)
SMALL_RUN = (
    ("CheckpointLoaderSimple", "ckpt_name", CKPT),
    ("EmptyLatentImage", "width", 128),
    ("EmptyLatentImage", "height", 128),
    ("*", "steps", 4),
    ("*", "max_refinement_steps", 2),
)

# ------------------------------------------------------------------ page scripts
APP = "(window.app ?? window.comfyAPI.app.app)"

# A point of the canvas, in viewport pixels, with no node, group or other element above it.
FIND_EMPTY_CANVAS = f"""(() => {{
  const app = {APP}, c = app.canvas.canvas, r = c.getBoundingClientRect();
  for (let y = r.top + r.height * 0.85; y > r.top + 120; y -= 37)
    for (let x = r.left + 120; x < r.left + r.width * 0.6; x += 41) {{
      if (document.elementFromPoint(x, y) !== c) continue;
      const p = app.canvas.convertEventToCanvasOffset({{clientX: x, clientY: y}});
      if (!app.graph.getNodeOnPos(p[0], p[1]) && !app.graph.getGroupOnPos?.(p[0], p[1])) return [x, y];
    }}
  return null;
}})()"""

NODE_RECTS = f"""{APP}.graph.nodes.map(n => ({{
  id: n.id, type: n.type, title: n.title, rect: [...n.boundingRect],
  known: !!LiteGraph.registered_node_types[n.type], errors: !!n.has_errors}}))"""

SEARCH_INPUT = "document.querySelector('input[placeholder^=Search][role=combobox]')"

OPEN_DIALOGS = """[...document.querySelectorAll('.p-dialog')]
  .filter(d => d.getClientRects().length).map(d => d.innerText.trim())"""

# Records the server's execution messages as the page receives them.
RECORD_EVENTS = """(() => {
  const api = window.comfyAPI.api.api;
  window.__aeEvents = [];
  if (!window.__aeListening) {
    for (const ev of ['execution_start', 'executed', 'execution_success', 'execution_error',
                      'execution_interrupted'])
      api.addEventListener(ev, e => window.__aeEvents.push([ev, e.detail]));
    window.__aeListening = true;
  }
  return true;
})()"""

RUN_BUTTON = """(() => {
  const b = [...document.querySelectorAll('button')].find(b => b.innerText.trim() === 'Run' && !b.disabled);
  if (!b) return null;
  const r = b.getBoundingClientRect(), x = r.x + r.width / 2, y = r.y + r.height / 2;
  return b.contains(document.elementFromPoint(x, y)) ? [x, y] : null;
})()"""

FINISHED = """(window.__aeEvents || []).find(e => ['execution_success', 'execution_error',
  'execution_interrupted'].includes(e[0])) || null"""

OUTPUT_IMAGES = f"""{APP}.graph.nodes.filter(n => n.type === 'SaveImage' || n.type === 'PreviewImage')
  .map(n => ({{id: n.id, title: n.title, prefix: n.widgets?.find(w => w.name === 'filename_prefix')?.value,
              imgs: (n.imgs || []).map(i => [i.complete, i.naturalWidth, i.naturalHeight])}}))"""


def set_widgets(page: Page, values: tuple[tuple[str, str, Any], ...]) -> list[str]:
    """Set widget values of the loaded graph through the page; returns ``node_id.widget=value`` per change."""
    script = f"""(() => {{
      const app = {APP}, done = [];
      for (const [type, name, value] of {json.dumps(values)})
        for (const n of app.graph.nodes.filter(n => type === '*' || n.type === type)) {{
          const w = (n.widgets || []).find(w => w.name === name);
          if (!w) continue;
          w.value = value;
          w.callback?.(value);
          done.push(`${{n.id}}.${{name}}=${{value}}`);
        }}
      app.graph.setDirtyCanvas(true, true);
      return done;
    }})()"""
    return list(page.evaluate(script))


def fit_view(page: Page) -> None:
    """Zoom the canvas so that the whole graph is visible (the front end's "Zoom to fit" command)."""
    page.evaluate(f"""(async () => {{
      const app = {APP};
      app.canvas.deselectAll?.();
      await app.extensionManager.command.execute('Comfy.Canvas.FitView');
      app.graph.setDirtyCanvas(true, true);
      return true;
    }})()""")
    time.sleep(0.5)


def overlaps(nodes: list[dict[str, Any]]) -> list[str]:
    """Pairs of nodes whose bounding boxes (title bar included) share area."""
    out = []
    for i, a in enumerate(nodes):
        ax, ay, aw, ah = a["rect"]
        for b in nodes[i + 1:]:
            bx, by, bw, bh = b["rect"]
            dx = min(ax + aw, bx + bw) - max(ax, bx)
            dy = min(ay + ah, by + bh) - max(ay, by)
            if dx > 0 and dy > 0:
                out.append(f"#{a['id']} {a['type']} {a['rect']} and #{b['id']} {b['type']} {b['rect']}: "
                           f"{dx:.0f} x {dy:.0f} px")
    return out


def pack_errors(entries: list[ConsoleEntry]) -> list[ConsoleEntry]:
    """Console errors that come from the pack (see ``PACK_MARKS``), registry look-ups left out."""
    return [e for e in entries if e.level in ("error", "assert")
            and PACK_MARKS.search(f"{e.text}\n{e.url}\n{e.stack}") and not REGISTRY_LOOKUP.search(e.text)]


# ---------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def report(pytestconfig: pytest.Config):
    """Writes a line to the terminal, also when output is captured."""
    reporter = pytestconfig.pluginmanager.get_plugin("terminalreporter")
    capture = pytestconfig.pluginmanager.get_plugin("capturemanager")

    def write(line: str) -> None:
        if reporter is None:
            return
        if capture is None:
            reporter.write_line(line)
            return
        with capture.global_and_fixture_disabled():
            reporter.write_line(line)

    return write


@pytest.fixture(scope="module")
def chromium(comfy_root: Path) -> str:
    """The browser binary; installs it and the front end (``scripts/bootstrap_browser.sh``) when missing."""
    pins = re.findall(r"^comfyui-frontend-package==(\S+)", (comfy_root / "requirements.txt").read_text(), re.M)
    if pins and pins[0] != FRONTEND_VERSION:
        pytest.skip(f"this ComfyUI pins front end {pins[0]}; the browser test uses {FRONTEND_VERSION} (0.3.75's)")
    try:
        binary = ensure_browser()
    except subprocess.CalledProcessError as err:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"scripts/bootstrap_browser.sh failed:\n{err.stderr}")
    assert importlib.metadata.version("comfyui-frontend-package") == FRONTEND_VERSION
    return binary


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory, report) -> Path:
    """Folder for the screenshots: ``$AE_BROWSER_SHOTS`` or a temporary one."""
    env = os.environ.get("AE_BROWSER_SHOTS")
    folder = Path(env) if env else tmp_path_factory.mktemp("browser_shots")
    folder.mkdir(parents=True, exist_ok=True)
    report(f"\nbrowser screenshots: {folder}")
    return folder


@pytest.fixture(scope="module")
def ui_server(chromium: str, comfy_root: Path, tiny_checkpoint: Path,
              tmp_path_factory: pytest.TempPathFactory) -> Iterator[ComfyServer]:
    """A ComfyUI server that serves its web front end, with this pack and the tiny checkpoint.

    The user's settings mark the first-run tutorial as done, so the page opens on the default graph instead of
    the template browser, and keep node text drawn at any zoom, so that screenshots of a whole graph are readable.
    """
    base = tmp_path_factory.mktemp("comfy_ui_base")
    (base / "user" / "default").mkdir(parents=True)
    settings = {"Comfy.TutorialCompleted": True, "LiteGraph.Canvas.MinFontSizeForLOD": 0}
    (base / "user" / "default" / "comfy.settings.json").write_text(json.dumps(settings))
    server = ComfyServer(base, comfy_root=comfy_root, web_ui=True)
    server.link_checkpoint(tiny_checkpoint, CKPT)
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def page(chromium: str, ui_server: ComfyServer, shots: Path, report,
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[Page]:
    """The front end loaded in headless chromium; its console is listed at the end."""
    profile = tmp_path_factory.mktemp("chromium_profile")
    with Browser.launch(profile, binary=chromium, width=1920, height=1200) as browser:
        pg = browser.page
        try:
            pg.navigate(ui_server.url + "/")
            pg.wait_for(f"!!(window.comfyAPI?.app?.app?.graph && {APP}.graph.nodes.length)", 90,
                        what="the front end's default graph")
            pg.wait_for(f"{APP}.canvas && !document.querySelector('.p-progressspinner')", 30)
            yield pg
        finally:
            lines = [str(e) for e in pg.console if e.level in ("error", "assert", "warning")]
            (shots / "console.txt").write_text("\n".join(str(e) for e in pg.console) + "\n")
            others = [line for line in lines if not PACK_MARKS.search(line) or REGISTRY_LOOKUP.search(line)]
            report(f"\nbrowser console: {len(lines)} errors/warnings, {len(others)} not from the pack "
                   f"(all entries in {shots / 'console.txt'}):")
            for line in others:
                report("  " + line.splitlines()[0][:300])


@pytest.fixture(autouse=True)
def screenshot_on_failure(request: pytest.FixtureRequest, page: Page, shots: Path) -> Iterator[None]:
    """A screenshot named after a test that failed, with the page's open dialogs."""
    failed = request.session.testsfailed
    yield
    if request.session.testsfailed > failed:
        name = re.sub(r"[^\w.-]+", "_", request.node.name)
        page.screenshot(shots / f"failed_{name}.png")
        page.press("Escape", key_code=27)
        close_dialogs(page)


def drop_workflow(page: Page, path: Path) -> list[dict[str, Any]]:
    """Drop a workflow file onto an empty spot of the canvas; returns the loaded nodes (``NODE_RECTS``)."""
    wanted = sorted(int(n["id"]) for n in json.loads(path.read_text())["nodes"])
    page.evaluate(f"{APP}.graph.clear(), true")
    xy = page.wait_for(FIND_EMPTY_CANVAS, 10, what="an empty spot of the canvas")
    page.drop_files(xy[0], xy[1], [path])
    page.wait_for(f"JSON.stringify({APP}.graph.nodes.map(n => n.id).sort((a, b) => a - b)) === "
                  f"{json.dumps(json.dumps(wanted, separators=(',', ':')))}", 30, what=f"{path.name} loaded")
    time.sleep(1.0)  # dialogs and node sizes settle after the graph is configured
    return list(page.evaluate(NODE_RECTS))


def click_run(page: Page) -> None:
    """Click the front end's Run button with the mouse."""
    xy = page.wait_for(RUN_BUTTON, 10, what="an enabled, visible Run button")
    page.click(*xy)


def close_dialogs(page: Page) -> None:
    """Close every open dialog with its close button."""
    for _ in range(5):
        xy = page.evaluate("""(() => {
          const b = [...document.querySelectorAll('.p-dialog .p-dialog-close-button, .p-dialog [aria-label=Close]')]
            .find(b => b.getClientRects().length);
          if (!b) return null;
          const r = b.getBoundingClientRect();
          return [r.x + r.width / 2, r.y + r.height / 2];
        })()""")
        if xy is None:
            return
        page.click(*xy)
        time.sleep(0.5)


# ------------------------------------------------------------------------- tests
def test_page_loads_without_errors_from_the_pack(page: Page, ui_server: ComfyServer, shots: Path):
    assert page.evaluate(f"typeof {APP}.graph") == "object"
    defs = page.evaluate("Object.keys(LiteGraph.registered_node_types).filter(t => t.startsWith('AttendExcite'))")
    assert sorted(defs) == sorted(OUR_NODES)
    page.screenshot(shots / "01_loaded.png")
    assert not pack_errors(page.console), "\n".join(map(str, pack_errors(page.console)))


def test_node_search_lists_the_pack_nodes(page: Page, ui_server: ComfyServer, shots: Path):
    info = ui_server.object_info()
    names = {info[n]["display_name"] for n in OUR_NODES}
    start = len(page.console)
    xy = page.wait_for(FIND_EMPTY_CANVAS, 10, what="an empty spot of the canvas")
    page.double_click(*xy)
    page.wait_for(f"{SEARCH_INPUT} === document.activeElement", 10, what="the node search box focused")
    try:
        page.type_text("attend")
        options = page.wait_for(f"""(() => {{
          const o = [...document.querySelectorAll('[role=listbox] [role=option]')]
            .map(e => e.innerText.split('\\n')[0].trim()).filter(t => t);
          return {SEARCH_INPUT}?.value === 'attend' && /attend/i.test(o[0] ?? '') && o;
        }})()""", 10, what="results for 'attend'")
        page.screenshot(shots / "02_search_attend.png")
    finally:
        page.press("Escape", key_code=27)
    page.wait_for(f"!{SEARCH_INPUT}", 10, what="the search box closed")
    assert set(options[:len(names)]) == names, f"first results: {options[:8]}"
    assert not pack_errors(page.console[start:]), "\n".join(map(str, pack_errors(page.console[start:])))


@pytest.mark.parametrize("workflow", WORKFLOWS, ids=[w.stem for w in WORKFLOWS])
def test_dropped_workflow_loads_complete_without_overlaps(page: Page, shots: Path, workflow: Path):
    start = len(page.console)
    nodes = drop_workflow(page, workflow)
    fit_view(page)
    page.screenshot(shots / f"03_graph_{workflow.stem}.png")
    dialogs = page.evaluate(OPEN_DIALOGS)
    close_dialogs(page)
    assert not dialogs, f"dialog after loading {workflow.name}: {dialogs}"
    assert [n for n in nodes if not n["known"] or n["errors"]] == []
    assert overlaps(nodes) == [], f"overlapping nodes in {workflow.name} (screenshot in {shots})"
    assert not pack_errors(page.console[start:]), "\n".join(map(str, pack_errors(page.console[start:])))


def test_missing_node_dialog_is_seen_when_a_node_is_unknown(page: Page, tmp_path: Path):
    """Control for the check above: a workflow with an unknown node type does open the missing-node dialog."""
    data = json.loads(RUN_WORKFLOW.read_text())
    data["nodes"][0]["type"] = "NoSuchNodeForTheBrowserTest"
    broken = tmp_path / "unknown_node.json"
    broken.write_text(json.dumps(data))
    drop_workflow(page, broken)
    dialogs = page.wait_for(OPEN_DIALOGS + ".length && " + OPEN_DIALOGS, 10, what="the missing-node dialog")
    close_dialogs(page)
    assert any("NoSuchNodeForTheBrowserTest" in d for d in dialogs), dialogs


def test_run_from_the_ui_shows_the_output_images(page: Page, shots: Path, report):
    start = len(page.console)
    drop_workflow(page, RUN_WORKFLOW)
    changed = set_widgets(page, SMALL_RUN)
    report(f"small run settings: {', '.join(changed)}")
    page.evaluate(RECORD_EVENTS)
    t0 = time.monotonic()
    click_run(page)
    finished = page.wait_for(FINISHED, RUN_TIMEOUT_S, poll=0.5, what="the prompt to finish")
    report(f"run from the UI: {finished[0]} after {time.monotonic() - t0:.1f} s")
    assert finished[0] == "execution_success", json.dumps(finished[1])[:3000]
    outputs = page.wait_for(f"""(() => {{
      const o = {OUTPUT_IMAGES};
      return o.every(n => n.imgs.length && n.imgs.every(i => i[0] && i[1] > 0)) && o;
    }})()""", 30, what="output images on the canvas")
    fit_view(page)
    page.screenshot(shots / "04_results.png")
    sizes = {n["prefix"].split("/")[-1]: tuple(n["imgs"][0][1:]) for n in outputs}
    assert sizes == {"plain": (128, 128), "ae": (128, 128), "plain_maps": (384, 128), "ae_maps": (384, 128)}
    assert not pack_errors(page.console[start:]), "\n".join(map(str, pack_errors(page.console[start:])))


def test_subject_not_in_the_prompt_shows_the_error_dialog(page: Page, shots: Path):
    drop_workflow(page, RUN_WORKFLOW)
    set_widgets(page, (*SMALL_RUN, ("AttendExciteTextEncode", "subjects", "cat, horse")))
    page.evaluate(RECORD_EVENTS)
    click_run(page)
    finished = page.wait_for(FINISHED, RUN_TIMEOUT_S, poll=0.5, what="the prompt to finish")
    assert finished[0] == "execution_error", finished
    assert finished[1]["node_type"] == "AttendExciteTextEncode"
    dialogs = page.wait_for(OPEN_DIALOGS + ".length && " + OPEN_DIALOGS, 10, what="the error dialog")
    page.screenshot(shots / "05_error_dialog.png")
    close_dialogs(page)
    assert any("AttendExciteTextEncode" in d and "'horse'" in d and "not in the prompt" in d for d in dialogs), dialogs


WIDGET_VALUES = f"""(id => {{
  const n = {APP}.graph.getNodeById(id);
  return n && Object.fromEntries((n.widgets || []).filter(w => w.name).map(w => [w.name, w.value]));
}})"""


def test_token_table_and_report_show_on_their_nodes(page: Page, shots: Path):
    drop_workflow(page, RUN_WORKFLOW)
    added = page.evaluate(f"""(() => {{
      const app = {APP}, report = LiteGraph.createNode('AttendExciteReport'), ks = app.graph.getNodeById(11);
      report.pos = [ks.pos[0] + 380, ks.pos[1] + 430];
      app.graph.add(report);
      ks.connect(1, report, 0);
      return report.id;
    }})()""")
    # another prompt text than the other runs of this page, so that the encode node runs again (not cached)
    set_widgets(page, (*SMALL_RUN, ("AttendExciteTextEncode", "text", "a cat and a frog on grass")))
    page.evaluate(RECORD_EVENTS)
    click_run(page)
    finished = page.wait_for(FINISHED, RUN_TIMEOUT_S, poll=0.5, what="the prompt to finish")
    assert finished[0] == "execution_success", json.dumps(finished[1])[:3000]
    encode = next(n["id"] for n in page.evaluate(NODE_RECTS) if n["type"] == "AttendExciteTextEncode")
    table = page.wait_for(f"{WIDGET_VALUES}({encode})?.ae_text", 10, what="the token table on the node")
    numbers = page.wait_for(f"{WIDGET_VALUES}({added})?.ae_text", 10, what="the numbers on the Report node")
    fit_view(page)
    page.screenshot(shots / "06_token_table_and_report.png")
    assert table.splitlines() == ["- 1: a", "- 2: cat  ← excited", "- 3: and", "- 4: a", "- 5: frog  ← excited",
                                  "- 6: on", "- 7: grass"]
    assert numbers.startswith("Max attention per subject at step ") and "\nimage 1: cat " in numbers


def test_workflow_saved_before_the_options_node_keeps_its_settings(page: Page, shots: Path, tmp_path: Path):
    data = json.loads(EARLIER_WORKFLOW.read_text())
    next(n for n in data["nodes"] if n["id"] == 6)["widgets_values"][19] = "down_mid"  # attention_blocks
    path = tmp_path / "earlier_layout.json"
    path.write_text(json.dumps(data))
    page.evaluate(f"{APP}.graph.clear(), true")
    xy = page.wait_for(FIND_EMPTY_CANVAS, 10, what="an empty spot of the canvas")
    page.drop_files(xy[0], xy[1], [path])
    options = page.wait_for(f"""(() => {{
      const g = {APP}.graph, ks = g.getNodeById(6), opts = g.nodes.filter(n => n.type === 'AttendExciteOptions');
      if (!ks || !opts.length) return null;
      const slot = ks.inputs.find(i => i.name === 'options'), link = slot && g.links.get(slot.link);
      return opts.map(o => ({{id: o.id, origin: link?.origin_id}}));
    }})()""", 30, what="an Options node for the changed expert setting")
    time.sleep(1.0)
    fit_view(page)
    page.screenshot(shots / "07_earlier_workflow.png")
    assert not page.evaluate(OPEN_DIALOGS)
    assert len(options) == 1 and options[0]["origin"] == options[0]["id"]  # only node 6 changed a setting
    values = page.evaluate(f"{WIDGET_VALUES}({options[0]['id']})")
    assert values["attention_blocks"] == "down_mid" and values["max_refinement_steps"] == 20
    plain, guided = page.evaluate(f"{WIDGET_VALUES}(5)"), page.evaluate(f"{WIDGET_VALUES}(6)")
    assert (plain["scale_factor"], guided["scale_factor"]) == (0.0, 20.0)
    assert guided["refinement"] == "0:0.05, 0.2:0.5, 0.4:0.8" and guided["seed"] == 42 and guided["steps"] == 50
    assert "cuda_graph" not in guided


# A template card of the templates browser: its thumbnail and the text of the card around it.
TEMPLATE_CARDS = """[...document.querySelectorAll('.p-dialog img')].map(i => {
  let c = i;
  for (let k = 0; k < 8 && c && !(c.innerText || '').trim(); k++) c = c.parentElement;
  return {complete: i.complete, size: [i.naturalWidth, i.naturalHeight], text: c ? c.innerText.trim() : ''};
})"""


def test_templates_browser_shows_each_workflow_with_its_thumbnail(page: Page, shots: Path):
    """Workflow > Browse Templates lists every workflow of ``workflows/`` by its file name with its ``.jpg``
    thumbnail (the front end fetches ``/api/workflow_templates/<pack>/<name>.jpg``); a card opens its workflow."""
    page.evaluate(f"{APP}.graph.clear(), true")
    page.evaluate(f"(async () => {{ await {APP}.extensionManager.command.execute('Comfy.BrowseTemplates'); "
                  "return true; })()")
    titles = [w.stem for w in WORKFLOWS]
    cards = page.wait_for(f"""(() => {{
      const cards = {TEMPLATE_CARDS}.filter(c => {json.dumps(titles)}.some(t => c.text.startsWith(t)));
      return cards.length === {len(titles)} && cards.every(c => c.complete && c.size[0]) && cards;
    }})()""", 30, what="a card with a loaded thumbnail for every workflow")
    page.screenshot(shots / "06_templates.png")
    assert sorted(c["text"].splitlines()[0] for c in cards) == sorted(titles)
    assert all(c["size"] == [512, 512] for c in cards)
    sdxl = next(w for w in WORKFLOWS if "SDXL" in w.stem)
    xy = page.evaluate(f"""(() => {{
      const i = [...document.querySelectorAll('.p-dialog img')].find(i => {{
        let c = i;
        for (let k = 0; k < 8 && c && !(c.innerText || '').trim(); k++) c = c.parentElement;
        return c && c.innerText.trim().startsWith({json.dumps(sdxl.stem)});
      }});
      const r = i.getBoundingClientRect();
      return [r.x + r.width / 2, r.y + r.height / 2];
    }})()""")
    page.click(*xy)
    wanted = len(json.loads(sdxl.read_text())["nodes"])
    nodes = page.wait_for(f"{APP}.graph.nodes.length === {wanted} && {NODE_RECTS}", 30, what="the SDXL template")
    time.sleep(1.0)
    assert not page.evaluate(OPEN_DIALOGS)
    assert [n for n in nodes if not n["known"] or n["errors"]] == []
