// Front-end part of the Attend-and-Excite nodes.
//
// 1. Text on the nodes: the text a node returns in its UI output (`ui={"text": [...]}`) is shown in a read-only
//    box on the node, as core's Preview Any does: the Text Encode node's token table, the Report node's numbers.
//    The box is not a saved widget, so workflows keep their widget values unchanged.
// 2. Workflows saved before the expert settings moved to the Attend-and-Excite Options node: ComfyUI assigns
//    saved widget values by position, so the sampler nodes keep their first inputs in the earlier order and the
//    values after them are the expert settings. When some differ from the defaults, an Options node with those
//    values is added and connected, so the workflow runs as it was saved.
import { app } from "../../scripts/app.js";

const TEXT_NODES = new Set(["AttendExciteTextEncode", "AttendExciteReport"]);
const TEXT_WIDGET = "ae_text";
// Widget values each sampler node keeps (seed and its "control after generate" value count as two).
const KEPT_VALUES = { AttendExciteKSampler: 12, AttendExciteSampler: 6 };
// The expert settings in the order the earlier sampler nodes saved them (= the Options node's inputs).
const EXPERT_SETTINGS = ["max_refinement_steps", "smoothing", "kernel_size", "smoothing_sigma",
  "attention_resolution", "token_slots", "record_maps", "attention_blocks", "cuda_graph"];

function textWidget(node) {
  const found = node.widgets?.find((w) => w.name === TEXT_WIDGET);
  if (found) return found;
  const el = document.createElement("textarea");
  el.className = "comfy-multiline-input";
  el.readOnly = true;
  el.spellcheck = false;
  el.style.whiteSpace = "pre-wrap";
  el.style.overflow = "auto";
  // tall enough for the text as it wraps at the node's width, up to 10 lines (then it scrolls)
  const lines = () => {
    const perLine = Math.max(Math.floor((node.size[0] - 40) / 6.5), 20);
    const rows = el.value.split("\n").reduce((n, line) => n + Math.max(Math.ceil(line.length / perLine), 1), 0);
    return Math.min(Math.max(rows, 2), 10);
  };
  const widget = node.addDOMWidget(TEXT_WIDGET, "customtext", el, {
    getValue: () => el.value,
    setValue: (v) => { el.value = v; },
    getMinHeight: () => 12 + lines() * 15,
    serialize: false,
  });
  widget.serialize = false;
  return widget;
}

function showText(nodeType) {
  const onExecuted = nodeType.prototype.onExecuted;
  nodeType.prototype.onExecuted = function (message) {
    onExecuted?.apply(this, arguments);
    const lines = message?.text;
    if (!Array.isArray(lines) || !lines.length) return;
    textWidget(this).value = lines.join("\n");
    const [w, h] = this.computeSize();
    this.setSize([Math.max(this.size[0], w), Math.max(this.size[1], h)]);
    this.setDirtyCanvas(true, true);
  };
}

function noteEarlierLayout(nodeType, kept) {
  const onConfigure = nodeType.prototype.onConfigure;
  nodeType.prototype.onConfigure = function (info) {
    onConfigure?.apply(this, arguments);
    const values = info?.widgets_values;
    if (Array.isArray(values) && values.length > kept) {
      this.aeEarlierSettings = Object.fromEntries(values.slice(kept).map((v, i) => [EXPERT_SETTINGS[i], v]));
    }
  };
}

function addOptionsNodes(graph) {
  for (const node of graph?.nodes ?? []) {
    const settings = node.aeEarlierSettings;
    if (!settings) continue;
    delete node.aeEarlierSettings;
    const slot = node.findInputSlot("options");
    if (slot < 0 || node.inputs[slot].link != null) continue;
    const options = LiteGraph.createNode("AttendExciteOptions");
    if (!options) continue;
    let changed = false;
    for (const [name, value] of Object.entries(settings)) {
      const widget = options.widgets?.find((w) => w.name === name);
      if (widget && value !== undefined && widget.value !== value) {
        widget.value = value;
        changed = true;
      }
    }
    if (!changed) continue;
    options.pos = [node.pos[0] - options.size[0] - 40, node.pos[1]];
    graph.add(options);
    options.connect(0, node, slot);
  }
}

app.registerExtension({
  name: "AttendExcite.Nodes",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (TEXT_NODES.has(nodeData.name)) showText(nodeType);
    if (nodeData.name in KEPT_VALUES) noteEarlierLayout(nodeType, KEPT_VALUES[nodeData.name]);
  },
  async afterConfigureGraph() {
    addOptionsNodes(app.graph);
  },
});
