// Drives headless Chromium (Debian's /usr/bin/chromium, via playwright-core) against a running
// ComfyUI server that has this pack installed, and prints one JSON object of observations on
// stdout. tests/web/test_browser.py starts the server and asserts on the JSON; this script only
// observes (a failed step is recorded under "errors" and later steps still run where they can).
//
//   node tests/web/browser_test.mjs --url http://127.0.0.1:8188 --artifacts tests/artifacts \
//        [--workflow example_workflows/akl_tiled_round_trip.json]
//        [--workflow2 example_workflows/akl_attention_processor.json] [--vae-name NAME]
//        [--tile-size 512] [--timeout 90]
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { parseArgs } from "node:util";

import { chromium } from "playwright-core";

const { values: opts } = parseArgs({
  options: {
    url: { type: "string" },
    artifacts: { type: "string", default: "tests/artifacts" },
    workflow: { type: "string", default: "example_workflows/akl_tiled_round_trip.json" },
    workflow2: { type: "string", default: "example_workflows/akl_attention_processor.json" },
    // The loader's vae_name; default: the one the workflow names (the shipped demo VAE).
    "vae-name": { type: "string" },
    "tile-size": { type: "string", default: "512" },
    "vue-tile-size": { type: "string", default: "128" },
    timeout: { type: "string", default: "90" },
    chromium: { type: "string", default: "/usr/bin/chromium" },
    // The pack's folder name under custom_nodes: the Templates dialog lists our templates under it.
    module: { type: "string", default: "ComfyUI-AutoencoderKL" },
    // Comma-separated template names to open from the Templates dialog and run as loaded.
    templates: { type: "string", default: "akl_round_trip,akl_tiled_round_trip,akl_attention_processor" },
    // Comma-separated step groups to run: panels (the panel checks), templates, subgraph, vue.
    groups: { type: "string", default: "panels,templates,subgraph,vue" },
  },
});
const GROUPS = new Set(opts.groups.split(",").filter(Boolean));
if (!opts.url) {
  console.error("usage: browser_test.mjs --url URL [--artifacts DIR] [--workflow FILE]");
  process.exit(2);
}
const URL = opts.url.replace(/\/$/, "");
const RUN_TIMEOUT_MS = Number(opts.timeout) * 1000;
const NEW_TILE = Number(opts["tile-size"]);
// The tile size the Nodes 2.0 step sets before its run.
const VUE_TILE = Number(opts["vue-tile-size"]);
// The tile size of the subgraph step (unlike every other run, so the host runs it afresh).
const SUBGRAPH_TILE = 192;
// The flags the project runs Chromium with (the user-data-dir is a fresh temporary folder).
const CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
  "--disable-background-networking", "--disable-component-update", "--disable-sync"];
const PANEL_MODULE = "/extensions/ComfyUI-AutoencoderKL/akl_extension.js";
const OUR_NODES = {
  AutoencoderKLLoader: "Load VAE (AutoencoderKL)",
  AutoencoderKLEncode: "VAE Encode (AutoencoderKL)",
  AutoencoderKLDecode: "VAE Decode (AutoencoderKL)",
  AutoencoderKLEncodeTiled: "VAE Encode Tiled (AutoencoderKL)",
  AutoencoderKLDecodeTiled: "VAE Decode Tiled (AutoencoderKL)",
  AutoencoderKLSetAttentionProcessor: "Set VAE Attention Processor (AutoencoderKL)",
  AutoencoderKLSampleImage: "AutoencoderKL Sample Image",
};

const result = { steps: {}, timings_s: {}, errors: [], console_errors: [], page_errors: [], artifacts: [],
  template_requests: [] };
const t0 = Date.now();

async function step(name, fn) {
  const start = Date.now();
  try {
    result.steps[name] = await fn();
  } catch (err) {
    result.errors.push({ step: name, message: String(err?.stack ?? err).slice(0, 2000) });
  } finally {
    result.timings_s[name] = (Date.now() - start) / 1000;
  }
}

// Panels of the pack's nodes in the page: rows (label -> value), text and raw outputs.
async function panels(page) {
  return page.evaluate(async (moduleUrl) => {
    const { live, isAttached } = await import(moduleUrl);
    // The execution id of a node: the ids of the subgraph nodes above it, then its own.
    const executionIdOf = (node) => {
      if (node.graph === app.rootGraph) return String(node.id);
      const holder = [...app.rootGraph._nodes].find((n) => n.subgraph === node.graph);
      return holder ? `${holder.id}:${node.id}` : null;
    };
    const out = {};
    for (const [node, state] of live) {
      const rows = {};
      for (const tr of state.element.querySelectorAll("tr")) rows[tr.cells[0].textContent] = tr.cells[1].textContent;
      const r = state.element.getBoundingClientRect();
      if (!isAttached(node)) continue; // a node of a closed or replaced workflow
      out[node.id] = {
        type: node.comfyClass, kind: state.kind, shown_grid: state.shownGrid ?? null, rows, text: state.element.innerText,
        has_card: !!state.card, has_grid: !!state.grid, has_run: !!state.run, card: state.card,
        grid: state.grid, run: state.run, statuses: state.seenStatuses ?? [],
        in_subgraph: node.graph !== app.rootGraph, execution_id: executionIdOf(node),
        visible: r.width > 0 && r.height > 0 && getComputedStyle(state.element).display !== "none",
      };
    }
    return out;
  }, PANEL_MODULE);
}

async function main() {
  // Mark the tutorial done so that the first visit does not open the Templates dialog.
  const res = await fetch(`${URL}/settings/Comfy.TutorialCompleted`, { method: "POST", body: "true" });
  if (!res.ok) throw new Error(`POST /settings/Comfy.TutorialCompleted: HTTP ${res.status}`);

  fs.mkdirSync(opts.artifacts, { recursive: true });
  const userDataDir = fs.mkdtempSync(path.join(os.tmpdir(), "akl-chromium-"));
  // launchPersistentContext is how playwright takes a user-data-dir: a fresh one per run.
  const context = await chromium.launchPersistentContext(userDataDir, {
    executablePath: opts.chromium, headless: true, args: CHROMIUM_FLAGS, viewport: { width: 1600, height: 1000 },
  });
  try {
    const page = context.pages()[0] ?? await context.newPage();
    page.on("console", (m) => { if (m.type() === "error") result.console_errors.push(m.text().slice(0, 500)); });
    page.on("pageerror", (e) => result.page_errors.push(String(e.message).slice(0, 500)));
    // What the Templates dialog fetched from the pack's example_workflows folder.
    page.on("response", (r) => {
      if (r.url().includes("/workflow_templates/")) result.template_requests.push([r.url(), r.status()]);
    });
    await run(page);
  } finally {
    await context.close();
    fs.rmSync(userDataDir, { recursive: true, force: true });
  }
}

async function run(page) {
  await step("load_ui", async () => {
    await page.goto(URL, { waitUntil: "load" });
    await page.waitForFunction(() => window.app?.graph && window.app?.canvas &&
      window.LiteGraph?.registered_node_types?.AutoencoderKLLoader, null, { timeout: 60000 });
    await page.waitForFunction((name) => window.app.extensions?.some((e) => e.name === name),
      "ComfyUI-AutoencoderKL.NodePanels", { timeout: 20000 });
    return page.evaluate(() => ({
      extensions: app.extensions.map((e) => e.name).filter((n) => n.startsWith("ComfyUI-AutoencoderKL")),
    }));
  });

  // Every status line a panel shows while its node runs (the page keeps them for the checks).
  await step("hooks", () => page.evaluate(async (moduleUrl) => {
    const { live, isAttached } = await import(moduleUrl);
    window.__aklLive = live;
    window.__aklIsAttached = isAttached;
    window.__aklProgressIds = [];
    const { api } = await import("/scripts/api.js");
    api.addEventListener("progress", ({ detail }) => {
      window.__aklProgressIds.push(String(detail?.node));
      setTimeout(() => {
        for (const state of live.values()) {
          if (state.status) (state.seenStatuses ??= []).push(state.status);
        }
      }, 0);
    });
    return true;
  }, PANEL_MODULE));

  // Templates first: on a fresh server they run as a new user's first runs do.
  if (GROUPS.has("templates")) await templateSteps(page);
  if (GROUPS.has("panels")) await panelSteps(page);
  if (GROUPS.has("subgraph")) await subgraphSteps(page);
  if (GROUPS.has("vue")) await vueSteps(page);
}

async function panelSteps(page) {
  // The pack's nodes in the node library sidebar, and their tooltips.
  await step("node_library", async () => {
    await page.getByRole("button", { name: /Node Library/ }).first().click();
    const search = page.locator(".node-lib-search-box input, input[placeholder*='Search' i]").first();
    await search.waitFor({ timeout: 10000 });
    await search.fill("AutoencoderKL");
    const listed = {};
    for (const [id, display] of Object.entries(OUR_NODES)) {
      const item = page.getByText(display, { exact: true }).first();
      try {
        await item.waitFor({ timeout: 5000 });
        listed[id] = await item.isVisible();
      } catch {
        listed[id] = false;
      }
    }
    // Hovering an entry shows the node's preview: its description and inputs.
    await page.getByText(OUR_NODES.AutoencoderKLEncodeTiled, { exact: true }).first().hover();
    await page.waitForTimeout(600);
    const preview = await page.locator(".node-lib-node-preview, ._sb_node_preview").first().innerText()
      .catch(() => "");
    const defs = await page.evaluate((ids) => Object.fromEntries(ids.map((id) => {
      const def = LiteGraph.registered_node_types[id]?.nodeData;
      const inputs = Object.values(def?.inputs ?? {});
      return [id, {
        description: def?.description ?? "",
        inputs: inputs.length,
        input_tooltips: inputs.filter((i) => i.tooltip).length,
        output_tooltips: (def?.outputs ?? []).filter((o) => o.tooltip).length,
        outputs: (def?.outputs ?? []).length,
        tile_size_tooltip: def?.inputs?.tile_size?.tooltip ?? null,
      }];
    })), Object.keys(OUR_NODES));
    await page.getByRole("button", { name: /Node Library/ }).first().click(); // close the sidebar
    return { listed, preview, defs };
  });

  await step("load_workflow", async () => {
    await page.evaluate(async (wf) => { await app.loadGraphData(wf); }, readWorkflow(opts.workflow));
    await page.waitForTimeout(500);
    return page.evaluate(() => ({
      nodes: app.graph._nodes.map((n) => ({ id: n.id, type: n.comfyClass ?? n.type })),
    }));
  });

  await step("panels_before_run", () => panels(page));

  // A widget tooltip on the canvas: hover the tiled encoder's tile_size widget.
  await step("widget_tooltip", async () => {
    const point = await widgetPoint(page, "AutoencoderKLEncodeTiled", "tile_size", 0.3);
    await page.mouse.move(point.x, point.y);
    await page.waitForTimeout(100);
    await page.mouse.move(point.x + 2, point.y);
    const tip = page.locator(".node-tooltip").first();
    await tip.waitFor({ state: "visible", timeout: 5000 });
    const text = await tip.innerText();
    await page.mouse.move(5, 500);
    return { text };
  });

  await step("queue_and_run", async () => {
    const before = await historyIds();
    const queued = await page.evaluate(async () => {
      const r = await app.queuePrompt(0, 1);
      return r ?? null;
    });
    await waitForPanels(page, [["AutoencoderKLLoader", "card"], ["AutoencoderKLEncodeTiled", "grid"],
      ["AutoencoderKLDecodeTiled", "grid"], ["AutoencoderKLDecodeTiled", "run"]]);
    return { queued: queued !== null, prompt_id: await waitForNewHistory(before) };
  });

  await step("panels_after_run", () => panels(page));

  await step("screenshot", async () => {
    await showWholeGraph(page);
    await page.waitForTimeout(400);
    const file = path.join(opts.artifacts, "web_tiled_round_trip.png");
    await page.screenshot({ path: file });
    result.artifacts.push(file);
    return { file };
  });

  // Change tile_size the way a user does: click the widget's value, type, press Enter.
  await step("change_tile_size", async () => {
    const point = await widgetPoint(page, "AutoencoderKLDecodeTiled", "tile_size", 0.5);
    await page.mouse.click(point.x, point.y);
    const prompt = page.locator(".graphdialog input, .comfy-modal input, dialog input").first();
    await prompt.waitFor({ state: "visible", timeout: 5000 });
    await prompt.fill(String(NEW_TILE));
    await prompt.press("Enter");
    await page.waitForTimeout(400);
    const widgetValue = await page.evaluate(() => app.graph._nodes
      .find((n) => n.comfyClass === "AutoencoderKLDecodeTiled").widgets.find((w) => w.name === "tile_size").value);
    const file = path.join(opts.artifacts, "web_tile_size_changed.png");
    await page.screenshot({ path: file });
    result.artifacts.push(file);
    return { widget_value: widgetValue, panels: await panels(page) };
  });

  // Removing a node removes its listeners (the panel registry entry goes with them).
  await step("remove_node", async () => page.evaluate(async (moduleUrl) => {
    const { live } = await import(moduleUrl);
    const node = app.graph._nodes.find((n) => n.comfyClass === "AutoencoderKLEncodeTiled");
    const state = live.get(node);
    const before = live.size;
    app.graph.remove(node);
    return { before, after: live.size, aborted: state.abort.signal.aborted, still_listed: live.has(node) };
  }, PANEL_MODULE));

  // The plain Encode/Decode nodes and the attention node, from a second example workflow.
  await step("second_workflow", async () => {
    await page.evaluate(async (wf) => { await app.loadGraphData(wf); }, readWorkflow(opts.workflow2));
    await page.waitForTimeout(500);
    const before = await historyIds();
    await page.evaluate(() => app.queuePrompt(0, 1));
    await waitForPanels(page, [["AutoencoderKLSetAttentionProcessor", "card"], ["AutoencoderKLEncode", "run"],
      ["AutoencoderKLDecode", "run"]]);
    const promptId = await waitForNewHistory(before);
    await showWholeGraph(page);
    await page.waitForTimeout(300);
    const file = path.join(opts.artifacts, "web_attention_round_trip.png");
    await page.screenshot({ path: file });
    result.artifacts.push(file);
    return { prompt_id: promptId, panels: await panels(page) };
  });
}

// -- templates, subgraphs, Nodes 2.0 ----------------------------------------------------------

async function historyIds() {
  const res = await fetch(`${URL}/history`);
  return new Set(Object.keys(await res.json()));
}

/** The id of the prompt that appears in the server's history after `before` was taken. */
async function waitForNewHistory(before) {
  const deadline = Date.now() + RUN_TIMEOUT_MS;
  while (Date.now() < deadline) {
    const now = await historyIds();
    const added = [...now].filter((id) => !before.has(id));
    if (added.length) return added[0];
    await new Promise((r) => setTimeout(r, 250));
  }
  throw new Error(`no new prompt in /history within ${RUN_TIMEOUT_MS / 1000} s`);
}

// Open each template from the Templates dialog the way a user does, press Run, and read the image
// the SaveImage node shows.
async function templateSteps(page) {
  for (const name of opts.templates.split(",").filter(Boolean)) {
    await step(`template_${name}`, async () => {
      await page.evaluate(() => app.extensionManager.command.execute("Comfy.BrowseTemplates"));
      const content = page.locator('[data-testid="template-workflows-content"]');
      await content.waitFor({ timeout: 20000 });
      await page.getByRole("dialog").getByText(opts.module, { exact: true }).last().click();
      const card = page.locator(`[data-testid="template-workflow-${name}"]`);
      await card.waitFor({ timeout: 10000 });
      const img = card.locator("img").first();
      await img.waitFor({ timeout: 10000 });
      await page.waitForFunction((el) => el.complete && el.naturalWidth > 0, await img.elementHandle(),
        { timeout: 10000 });
      const thumbnail = await img.evaluate((el) => ({ width: el.naturalWidth, height: el.naturalHeight }));
      const cardText = await card.innerText();
      await card.click();
      await content.waitFor({ state: "detached", timeout: 20000 });
      await page.waitForFunction(() => app.rootGraph._nodes.some((n) => n.comfyClass === "SaveImage"), null,
        { timeout: 20000 });
      const nodes = await page.evaluate(() => app.rootGraph._nodes.map((n) => n.comfyClass ?? n.type));
      const before = await historyIds();
      await page.locator('[data-testid="queue-button"]').first().click(); // the Run button
      const promptId = await waitForNewHistory(before);
      // The image the SaveImage node shows once the run is done.
      await page.waitForFunction(() => {
        const im = app.rootGraph._nodes.find((n) => n.comfyClass === "SaveImage")?.imgs?.[0];
        return im?.complete && im.naturalWidth > 0;
      }, null, { timeout: RUN_TIMEOUT_MS, polling: 250 });
      const shown = await page.evaluate(() => {
        const im = app.rootGraph._nodes.find((n) => n.comfyClass === "SaveImage").imgs[0];
        return { src: im.src, width: im.naturalWidth, height: im.naturalHeight };
      });
      const file = path.join(opts.artifacts, `web_template_${name}.png`);
      await showWholeGraph(page);
      await page.waitForTimeout(300);
      await page.screenshot({ path: file });
      result.artifacts.push(file);
      return { thumbnail, card_text: cardText, nodes, prompt_id: promptId, shown };
    });
  }
}

// The tiled pair moved into a subgraph: the server names them "<subgraph node>:<inner id>" in its
// progress and executed events; the panels must still follow their own node.
async function subgraphSteps(page) {
  await step("subgraph", async () => {
    await page.evaluate(async (wf) => { await app.loadGraphData(wf); }, readWorkflow(opts.workflow));
    await page.waitForTimeout(300);
    await setTileSize(page, SUBGRAPH_TILE); // a prompt the host has not cached
    const made = await page.evaluate(() => {
      const picked = app.rootGraph._nodes.filter((n) =>
        ["AutoencoderKLEncodeTiled", "AutoencoderKLDecodeTiled"].includes(n.comfyClass));
      const { node } = app.rootGraph.convertToSubgraph(new Set(picked));
      return { subgraph_node: String(node.id), inner: node.subgraph._nodes.map((n) => [String(n.id), n.comfyClass]) };
    });
    await page.evaluate(() => { window.__aklProgressIds = []; });
    const before = await historyIds();
    await page.evaluate(() => app.queuePrompt(0, 1));
    const promptId = await waitForNewHistory(before);
    await waitForPanels(page, [["AutoencoderKLEncodeTiled", "grid"], ["AutoencoderKLDecodeTiled", "grid"],
      ["AutoencoderKLDecodeTiled", "run"]]);
    const progressIds = await page.evaluate(() => window.__aklProgressIds);
    return { ...made, prompt_id: promptId, progress_ids: progressIds, panels: await panels(page) };
  });
}

// Nodes 2.0: the frontend draws nodes as Vue components and moves DOM widgets into them.
async function vueSteps(page) {
  await step("vue_nodes", async () => {
    await page.evaluate(() => app.extensionManager.setting.set("Comfy.VueNodes.Enabled", true));
    await page.evaluate(async (wf) => { await app.loadGraphData(wf); }, readWorkflow(opts.workflow));
    await page.waitForSelector("[data-node-id]", { timeout: 15000 });
    // A widget edit as the Vue widgets make it (set the value, call the widget's callback); it also
    // makes the tiled nodes run again instead of coming from the host's cache.
    await setTileSize(page, VUE_TILE);
    const before = await historyIds();
    await page.evaluate(() => app.queuePrompt(0, 1));
    const promptId = await waitForNewHistory(before);
    await waitForPanels(page, [["AutoencoderKLEncodeTiled", "grid"], ["AutoencoderKLDecodeTiled", "grid"],
      ["AutoencoderKLDecodeTiled", "run"]]);
    await page.waitForTimeout(300);
    const placement = await page.evaluate(async (moduleUrl) => {
      const { live } = await import(moduleUrl);
      return [...live].filter(([n]) => n.graph === app.rootGraph).map(([n, s]) => ({
        type: n.comfyClass, vue_node_id: s.element.closest("[data-node-id]")?.dataset.nodeId ?? null,
        node_id: String(n.id),
      }));
    }, PANEL_MODULE);
    await showWholeGraph(page);
    await page.waitForTimeout(300);
    const file = path.join(opts.artifacts, "web_vue_nodes.png");
    await page.screenshot({ path: file });
    result.artifacts.push(file);
    const nodes = await page.locator("[data-node-id]").count();
    await page.evaluate(() => app.extensionManager.setting.set("Comfy.VueNodes.Enabled", false));
    return { prompt_id: promptId, vue_nodes: nodes, placement, panels: await panels(page) };
  });
}

/** Set tile_size on both tiled nodes of the root graph, calling each widget's callback. */
async function setTileSize(page, tile) {
  await page.evaluate((t) => {
    for (const node of app.rootGraph._nodes.filter((n) => n.comfyClass?.endsWith("Tiled"))) {
      const w = node.widgets.find((x) => x.name === "tile_size");
      w.value = t;
      w.callback?.(t);
    }
  }, tile);
}

function readWorkflow(file) {
  const workflow = JSON.parse(fs.readFileSync(file, "utf8"));
  if (opts["vae-name"]) {
    for (const node of workflow.nodes) {
      if (node.type === "AutoencoderKLLoader") node.widgets_values[0] = opts["vae-name"];
    }
  }
  return workflow;
}

/** Wait until, for each [comfyClass, key], a node of the current graph has that output. */
async function waitForPanels(page, wanted) {
  await page.waitForFunction((want) => {
    const states = [...window.__aklLive.entries()].filter(([n]) => window.__aklIsAttached(n));
    return want.every(([t, k]) => states.some(([n, s]) => n.comfyClass === t && s[k]));
  }, wanted, { timeout: RUN_TIMEOUT_MS, polling: 250 });
}

/** Place the graph below the top bars and beside the sidebar, a little zoomed out. */
async function showWholeGraph(page) {
  await page.evaluate(() => {
    app.canvas.ds.scale = 0.85;
    app.canvas.ds.offset = [70, 190];
    app.canvas.setDirty(true, true);
  });
}

/** Client coordinates of a point on a node's widget (fraction along its width). */
async function widgetPoint(page, comfyClass, widgetName, fraction) {
  const p = await page.evaluate(([cls, name, frac]) => {
    const node = app.graph._nodes.find((n) => n.comfyClass === cls);
    const w = node.widgets.find((x) => x.name === name);
    const h = w.computedHeight ?? w.height ?? LiteGraph.NODE_WIDGET_HEIGHT;
    const graphPos = [node.pos[0] + node.size[0] * frac, node.pos[1] + w.y + h / 2];
    const [cx, cy] = app.canvas.ds.convertOffsetToCanvas(graphPos);
    const rect = app.canvas.canvas.getBoundingClientRect();
    const dpr = window.devicePixelRatio || 1;
    return { x: rect.left + cx / dpr, y: rect.top + cy / dpr };
  }, [comfyClass, widgetName, fraction]);
  return p;
}

try {
  await main();
} catch (err) {
  result.errors.push({ step: "browser", message: String(err?.stack ?? err).slice(0, 2000) });
}
result.timings_s.total = (Date.now() - t0) / 1000;
process.stdout.write(JSON.stringify(result, null, 1) + "\n");
