// ComfyUI-AutoencoderKL's editor extension: a panel on each of the pack's nodes showing the
// model card (loader, attention node), the tile grid (tiled nodes, live as tile_size/overlap
// change) and the last run (time, peak memory, auto tiling, fp32 retry). It reads the nodes' UI
// outputs (akl_card, akl_grid, akl_run); all maths and wording live in akl_lib.js.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { cardRows, checkTileParams, gridRows, regrid, runRows } from "./akl_lib.js";

const EXTENSION = "ComfyUI-AutoencoderKL.NodePanels";
const PANEL_WIDGET = "akl_info";

// Which panel each node type shows.
const CARD_NODES = new Set(["AutoencoderKLLoader", "AutoencoderKLSetAttentionProcessor"]);
const RUN_NODES = new Set(["AutoencoderKLEncode", "AutoencoderKLDecode"]);
const TILED_NODES = new Set(["AutoencoderKLEncodeTiled", "AutoencoderKLDecodeTiled"]);
const TILE_WIDGETS = ["tile_size", "overlap", "method"];

const HINTS = {
  card: "Run the workflow to see the model card.",
  run: "Run the workflow to see time and memory.",
  grid: "Run once: the grid needs the image size.",
};

/** Panel state of every live node of the pack, by node object (tests/web reads its size). */
export const live = new Map();

function injectStyle() {
  if (document.getElementById("akl-style")) return;
  const style = document.createElement("style");
  style.id = "akl-style";
  style.textContent = `
.akl-panel { font: 11px/1.45 system-ui, sans-serif; color: var(--input-text, #ddd);
  background: var(--comfy-input-bg, #222); border-radius: 6px; padding: 4px 6px;
  box-sizing: border-box; overflow: hidden; cursor: default; user-select: text; }
.akl-panel table { border-collapse: collapse; width: 100%; }
.akl-panel td { padding: 0 4px 0 0; vertical-align: top; white-space: nowrap; }
.akl-panel td.akl-label { opacity: 0.65; }
.akl-panel td.akl-value { white-space: normal; word-break: break-word; }
.akl-panel .akl-title { font-weight: 600; opacity: 0.85; }
.akl-panel .akl-hint { opacity: 0.6; font-style: italic; }
.akl-panel .akl-error { color: #f87171; white-space: normal; }
.akl-panel .akl-status { color: #7dd3fc; }
.akl-panel.akl-collapsed table { display: none; }`;
  document.head.appendChild(style);
}

// -- rendering -------------------------------------------------------------------------------

function section(title, rows) {
  return { title, rows };
}

/** The sections a node shows now, from its last outputs and current widget values. */
function sections(node, state) {
  const out = [];
  if (state.kind === "card") {
    out.push(state.card ? section(state.card.name ?? "Model card", cardRows(state.card)) : { hint: HINTS.card });
  } else if (state.kind === "grid") {
    const w = Object.fromEntries(TILE_WIDGETS.map((n) => [n, node.widgets?.find((x) => x.name === n)?.value]));
    const err = checkTileParams(w.tile_size, w.overlap);
    state.shownGrid = null;
    if (err) {
      out.push({ error: err });
    } else if (state.grid) {
      let g = state.grid;
      const method = w.method ?? g.method;
      if (g.tile_size !== w.tile_size || g.overlap !== w.overlap || g.method !== method) {
        g = regrid(state.grid, w.tile_size, w.overlap, method);
      }
      state.shownGrid = g;
      out.push(section("Tile grid", gridRows(g)));
    } else {
      out.push({ hint: HINTS.grid });
    }
  }
  if (state.kind === "run" || state.kind === "grid") {
    if (state.run) out.push(section("Last run", runRows(state.run, { manualTiles: state.kind === "grid" })));
    else if (state.kind === "run") out.push({ hint: HINTS.run });
  }
  return out;
}

function render(node, state) {
  const parts = sections(node, state);
  const el = state.element;
  el.replaceChildren();
  let lines = 0;
  for (const part of parts) {
    if (part.hint || part.error) {
      const div = document.createElement("div");
      div.className = part.error ? "akl-error" : "akl-hint";
      div.textContent = part.error ?? part.hint;
      el.appendChild(div);
      lines += part.error ? Math.ceil(part.error.length / 40) : 1;
      continue;
    }
    const title = document.createElement("div");
    title.className = "akl-title";
    title.textContent = part.title;
    const table = document.createElement("table");
    for (const [label, value] of part.rows) {
      const tr = table.insertRow();
      const l = tr.insertCell();
      l.className = "akl-label";
      l.textContent = label;
      const v = tr.insertCell();
      v.className = "akl-value";
      v.textContent = value;
      tr.dataset.aklRow = label;
    }
    el.append(title, table);
    lines += 1 + (el.classList.contains("akl-collapsed") ? 0 : part.rows.length);
  }
  if (state.status) {
    const div = document.createElement("div");
    div.className = "akl-status";
    div.textContent = state.status;
    el.appendChild(div);
    lines += 1;
  }
  // Content (16 px a line, 8 px padding) plus the 20 px margin the frontend keeps around DOM widgets;
  // the measured height wins once the panel is laid out (long values wrap).
  const measured = el.isConnected ? [...el.children].reduce((sum, c) => sum + c.offsetHeight, 0) : 0;
  state.height = Math.max(28 + 16 * Math.max(1, lines), measured ? measured + 30 : 0);
  // Grow the node to fit the panel (never shrink what the user sized).
  const need = node.computeSize?.();
  if (need && need[1] > node.size[1]) node.setSize([Math.max(node.size[0], need[0]), need[1]]);
  node.setDirtyCanvas?.(true, true);
}

// -- per-node wiring -------------------------------------------------------------------------

/** Whether a graph is the root graph or the subgraph of a node reachable from it. */
function reachable(graph, from = app.rootGraph ?? app.graph, depth = 0) {
  if (!graph || !from) return false;
  if (graph === from) return true;
  if (depth > 16) return false; // subgraphs nest; this bounds a malformed cycle
  return (from._nodes ?? []).some((n) => n.subgraph && reachable(graph, n.subgraph, depth + 1));
}

/** Whether a node is still part of the loaded workflow (nodes inside a subgraph are not always
 * told when a new workflow replaces theirs). */
export function isAttached(node) {
  return node.graph?.getNodeById?.(node.id) === node && reachable(node.graph);
}

/**
 * The node an execution id names, or null. The server names a node inside a subgraph by the path
 * of subgraph-node ids down to it ("12:5": node 5 of the subgraph that node 12 of the root graph
 * holds); the frontend resolves "executed" events the same way before calling onExecuted. One
 * subgraph node object can stand for several instances, so identity, not the last id, decides.
 */
export function nodeForExecutionId(executionId) {
  if (executionId === undefined || executionId === null) return null;
  const path = String(executionId).split(":");
  let graph = app.rootGraph ?? app.graph;
  for (const id of path.slice(0, -1)) {
    graph = graph?.getNodeById?.(id)?.subgraph;
    if (!graph) return null;
  }
  return graph?.getNodeById?.(path[path.length - 1]) ?? null;
}

function kindOf(comfyClass) {
  if (CARD_NODES.has(comfyClass)) return "card";
  if (TILED_NODES.has(comfyClass)) return "grid";
  return "run";
}

function attach(node, comfyClass) {
  injectStyle();
  const element = document.createElement("div");
  element.className = "akl-panel";
  element.dataset.aklKind = kindOf(comfyClass);
  const state = {
    kind: kindOf(comfyClass), element, card: null, grid: null, run: null, status: null, height: 28, shownGrid: null,
    abort: new AbortController(), restore: [],
  };
  const widget = node.addDOMWidget(PANEL_WIDGET, "akl-panel", element, {
    serialize: false, hideOnZoom: false, getValue: () => "", setValue: () => {},
    getMinHeight: () => state.height, getMaxHeight: () => state.height,
  });
  widget.serialize = false; // not part of widgets_values: saved workflows stay as the nodes define them
  const { signal } = state.abort;

  // Click the panel to fold its tables (a DOM listener, removed with the node).
  element.addEventListener("click", () => {
    element.classList.toggle("akl-collapsed");
    render(node, state);
  }, { signal });

  // Live grid: recompute when a tile widget changes (callbacks restored on removal).
  if (state.kind === "grid") {
    for (const name of TILE_WIDGETS) {
      const w = node.widgets?.find((x) => x.name === name);
      if (!w) continue;
      const original = w.callback;
      w.callback = function (...args) {
        const r = original?.apply(this, args);
        render(node, state);
        return r;
      };
      state.restore.push(() => { w.callback = original; });
    }
  }

  // Progress of this node's run while it executes: steps are tiles (blend), tiles of every pass
  // and attention chunks (exact), or blocks (untiled), as the core reports them.
  const matches = (detail) => {
    if (!isAttached(node)) { detach(node); return false; } // its workflow was replaced
    return !!detail && nodeForExecutionId(detail.display_node || detail.node) === node;
  };
  api.addEventListener("progress", ({ detail }) => {
    if (!matches(detail)) return;
    state.status = `Running: ${detail.value} / ${detail.max} steps`;
    render(node, state);
  }, { signal });
  // A cached loader does not run again, so the server sends no card: show the one this browser
  // saw for the same widget values (the loader's output depends on them alone).
  if (comfyClass === "AutoencoderKLLoader") {
    api.addEventListener("execution_cached", ({ detail }) => {
      if (!isAttached(node)) { detach(node); return; }
      if (state.card || !detail?.nodes?.some((id) => nodeForExecutionId(id) === node)) return;
      state.card = rememberedCard(node);
      if (state.card) render(node, state);
    }, { signal });
  }
  api.addEventListener("executed", ({ detail }) => {
    if (matches(detail) && state.status) { state.status = null; render(node, state); }
  }, { signal });

  live.set(node, state);
  render(node, state);
  return state;
}

const CARD_STORE = "ComfyUI-AutoencoderKL.cards";

function cardKey(node) {
  return JSON.stringify((node.widgets ?? []).filter((w) => w.name !== PANEL_WIDGET).map((w) => w.value));
}

function rememberCard(node, card) {
  try {
    const cards = JSON.parse(localStorage.getItem(CARD_STORE) ?? "{}");
    cards[cardKey(node)] = card;
    const keys = Object.keys(cards);
    for (const k of keys.slice(0, Math.max(0, keys.length - 20))) delete cards[k]; // keep the last 20
    localStorage.setItem(CARD_STORE, JSON.stringify(cards));
  } catch (err) {
    console.warn(`${EXTENSION}: could not keep the model card in localStorage:`, err);
  }
}

function rememberedCard(node) {
  try {
    return JSON.parse(localStorage.getItem(CARD_STORE) ?? "{}")[cardKey(node)] ?? null;
  } catch {
    return null;
  }
}

function detach(node) {
  const state = live.get(node);
  if (!state) return;
  state.abort.abort();
  for (const undo of state.restore) undo();
  live.delete(node);
}

app.registerExtension({
  name: EXTENSION,

  async beforeRegisterNodeDef(nodeType, nodeData) {
    const comfyClass = nodeData.name;
    if (!(CARD_NODES.has(comfyClass) || RUN_NODES.has(comfyClass) || TILED_NODES.has(comfyClass))) return;
    const proto = nodeType.prototype;

    const onNodeCreated = proto.onNodeCreated;
    proto.onNodeCreated = function (...args) {
      const r = onNodeCreated?.apply(this, args);
      attach(this, comfyClass);
      return r;
    };

    const onExecuted = proto.onExecuted;
    proto.onExecuted = function (output) {
      onExecuted?.apply(this, [output]);
      const state = live.get(this);
      if (!state || !output) return;
      if (output.akl_card?.[0]) {
        state.card = output.akl_card[0];
        if (comfyClass === "AutoencoderKLLoader") rememberCard(this, state.card);
      }
      if (output.akl_grid?.[0]) state.grid = output.akl_grid[0];
      if (output.akl_run?.[0]) state.run = output.akl_run[0];
      state.status = null;
      render(this, state);
    };

    // Canvas edits (drag, arrows, prompt) report here too; render is idempotent.
    const onWidgetChanged = proto.onWidgetChanged;
    proto.onWidgetChanged = function (name, ...rest) {
      const r = onWidgetChanged?.apply(this, [name, ...rest]);
      const state = live.get(this);
      if (state?.kind === "grid" && TILE_WIDGETS.includes(name)) render(this, state);
      return r;
    };

    const onRemoved = proto.onRemoved;
    proto.onRemoved = function (...args) {
      detach(this);
      return onRemoved?.apply(this, args);
    };
  },
});
