// Pure logic of the ComfyUI-AutoencoderKL web extension: tile grid maths mirrored from
// nodes/grid.py and vae_core/memory.py (tile_working_bytes), and the text the panels show. No DOM and no ComfyUI imports, so `node --test`
// runs it as is (tests/web/unit/). The frontend imports every .js file in web/ as an extension;
// this one only exports, so importing it registers nothing.

// -- grid maths (keep in step with nodes/grid.py and vae_core/memory.py; tests/web compares them) --

// Limits of the tile_size / overlap widgets (pixels), as in nodes/grid.py.
export const TILE_MIN = 64;
export const TILE_MAX = 4096;
export const OVERLAP_MAX = 2048;
// Every KL-VAE family downsamples by 8, so tiles align to 8 pixels.
export const ALIGN = 8;
// Measured peak / analytic peak of an untiled run (vae_core/memory.py UNTILED_CALIBRATION).
export const UNTILED_CALIBRATION = { decode: 1.2, encode: 1.6 };

const isWhole = (v) => typeof v === "number" && Number.isInteger(v);

/** null when (tileSize, overlap) are valid, else the same message nodes/grid.py gives.
 *  Either may be null/undefined (then it is not checked). */
export function checkTileParams(tileSize, overlap, align = ALIGN) {
  const problems = [];
  const hasTile = tileSize !== null && tileSize !== undefined;
  const hasOverlap = overlap !== null && overlap !== undefined;
  if (hasTile) {
    if (!isWhole(tileSize)) return `tile_size must be a whole number of pixels, got ${tileSize}`;
    if (!(TILE_MIN <= tileSize && tileSize <= TILE_MAX)) {
      problems.push(`tile_size=${tileSize} is outside ${TILE_MIN}..${TILE_MAX} pixels; use a value in that range ` +
                    "(512 is typical)");
    } else if (tileSize % align) {
      const lo = Math.floor(tileSize / align) * align;
      const hi = (Math.floor(tileSize / align) + 1) * align;
      problems.push(`tile_size=${tileSize} is not a multiple of ${align} (the VAE's downscale factor); ` +
                    `use ${Math.max(lo, TILE_MIN)} or ${hi}`);
    }
  }
  if (hasOverlap) {
    if (!isWhole(overlap)) return `overlap must be a whole number of pixels, got ${overlap}`;
    if (overlap < 0) {
      problems.push(`overlap=${overlap} is negative; use 0 or more pixels`);
    } else if (overlap % align) {
      problems.push(`overlap=${overlap} is not a multiple of ${align} (the VAE's downscale factor); ` +
                    `use ${Math.floor(overlap / align) * align} or ${(Math.floor(overlap / align) + 1) * align}`);
    } else if (hasTile && problems.length === 0 && overlap * 2 > tileSize) {
      problems.push(`overlap=${overlap} is more than half of tile_size=${tileSize}; ` +
                    `use overlap <= ${Math.floor(Math.floor(tileSize / 2) / align) * align} or a larger tile`);
    }
  }
  return problems.length ? problems.join("; ") : null;
}

// len(range(0, size, stride)) in Python.
function starts(size, stride) {
  return size > 0 ? Math.ceil(size / stride) : 0;
}

/** The memory model's fields for an SD-shaped VAE without a config (nodes/grid.py model_summary). */
export function modelSummary(latentChannels = 4, width = 128, factor = ALIGN) {
  const levels = Math.floor(Math.log2(factor)) + 1;
  const widths = Array.from({ length: levels }, (_, i) => width * Math.min(2 ** i, 4));
  return { block_out_channels: widths, latent_channels: latentChannels, in_channels: 3, out_channels: 3,
           mid_block_add_attention: true };
}

// Largest number of activation bytes alive at once in an untiled run of shape [b, c, h, w], fused
// attention (vae_core/memory.py _peak_bytes with rows = 0). Integers below 2^53, so exact.
function peakBytes(kind, [b, , h, w], model, size) {
  const ch = model.block_out_channels;
  const f = 2 ** (ch.length - 1);
  const resnet = (cin, cout, hw) => (2 * cin + cout) * hw;
  const peaks = [];
  const attention = (tokens) => 5 * ch[ch.length - 1] * tokens * size;
  if (kind === "decode") {
    const full = (h * f) * (w * f);
    let hw = h * w;
    peaks.push((model.latent_channels + ch[ch.length - 1]) * hw * size);
    peaks.push(resnet(ch[ch.length - 1], ch[ch.length - 1], hw) * size);
    if (model.mid_block_add_attention) peaks.push(attention(hw));
    const rev = [...ch].reverse();
    rev.forEach((cout, i) => {
      const cin = rev[Math.max(i - 1, 0)];
      peaks.push(resnet(cin, cout, hw) * size);
      if (i < rev.length - 1) {
        peaks.push(9 * cout * hw * size);
        hw *= 4;
      }
    });
    peaks.push((2 * rev[rev.length - 1] * full + model.out_channels * full) * size);
  } else {
    let hw = h * w;
    peaks.push((model.in_channels + ch[0]) * hw * size);
    ch.forEach((cout, i) => {
      const cin = ch[Math.max(i - 1, 0)];
      peaks.push(resnet(cin, cout, hw) * size);
      if (i < ch.length - 1) {
        peaks.push(Math.floor(cout * hw * 9 / 4) * size);
        hw = Math.floor(hw / 4);
      }
    });
    if (model.mid_block_add_attention) peaks.push(attention(hw));
    peaks.push(3 * ch[ch.length - 1] * hw * size);
  }
  return b * Math.max(...peaks);
}

/** Activation peak of one tileH x tileW px tile of `batch` images: vae_core/memory.py tile_working_bytes. */
export function tileWorkingBytes(direction, tileH, tileW, model, dtypeBytes = 4, batch = 1) {
  const f = 2 ** (model.block_out_channels.length - 1);
  const shape = direction === "decode"
    ? [batch, model.latent_channels, Math.floor(tileH / f), Math.floor(tileW / f)]
    : [batch, model.in_channels, tileH, tileW];
  // Same float product as Python, then int() truncation.
  return Math.trunc(peakBytes(direction, shape, model, dtypeBytes) * UNTILED_CALIBRATION[direction]);
}

/** The grid a tiled encode/decode of an imageH x imageW (pixels) image runs; same keys and
 *  numbers as nodes/grid.py tile_grid. Throws on invalid tile parameters. */
export function tileGrid(imageH, imageW, tileSize, overlap, {
  method = "blend", latentChannels = 4, width = 128, dtypeBytes = 4, batch = 1,
  direction = "decode", factor = ALIGN, model = null,
} = {}) {
  const err = checkTileParams(tileSize, overlap, factor);
  if (err) throw new RangeError(err);
  let rows;
  let cols;
  if (imageH <= tileSize && imageW <= tileSize) {
    rows = cols = 1;
  } else if (method === "blend") {
    const stride = tileSize - overlap;
    rows = starts(imageH, stride);
    cols = starts(imageW, stride);
  } else { // "exact": tiles of tileSize without cross-fade
    rows = Math.ceil(imageH / tileSize);
    cols = Math.ceil(imageW / tileSize);
  }
  const tileH = Math.min(tileSize, imageH);
  const tileW = Math.min(tileSize, imageW);
  const m = model ?? modelSummary(latentChannels, width, factor);
  const estimated = tileWorkingBytes(direction, tileH, tileW, m, dtypeBytes, batch);
  return {
    rows, cols, tiles: rows * cols, tile_size: tileSize, overlap, image_h: imageH, image_w: imageW,
    method, direction, latent_channels: m.latent_channels, estimated_bytes: estimated,
    model: m, dtype_bytes: dtypeBytes, batch,
  };
}

/** The grid for new widget values, sized for the image, model, dtype and batch of a previous grid
 *  (a node's akl_grid, which carries them). */
export function regrid(lastGrid, tileSize, overlap, method) {
  return tileGrid(lastGrid.image_h, lastGrid.image_w, tileSize, overlap, {
    method: method ?? lastGrid.method, model: lastGrid.model, dtypeBytes: lastGrid.dtype_bytes,
    batch: lastGrid.batch, direction: lastGrid.direction,
  });
}

// -- formatting ------------------------------------------------------------------------------

const DASH = "—";

/** Bytes in binary units: 0 B, 812 B, 3.4 KiB, 96.0 MiB, 1.25 GiB. */
export function formatBytes(n) {
  if (n === null || n === undefined || !Number.isFinite(n)) return DASH;
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let v = Math.abs(n);
  let i = 0;
  while (v >= 1024 && i < units.length - 1) { v /= 1024; i += 1; }
  const sign = n < 0 ? "-" : "";
  if (i === 0) return `${sign}${v} B`;
  return `${sign}${v >= 100 ? v.toFixed(0) : v >= 10 ? v.toFixed(1) : v.toFixed(2)} ${units[i]}`;
}

/** Parameter counts: 950, 34.2 k, 83.65 M, 1.20 B. */
export function formatCount(n) {
  if (n === null || n === undefined || !Number.isFinite(n)) return DASH;
  if (n < 1e3) return String(n);
  if (n < 1e6) return `${(n / 1e3).toFixed(1)} k`;
  if (n < 1e9) return `${(n / 1e6).toFixed(2)} M`;
  return `${(n / 1e9).toFixed(2)} B`;
}

/** Durations: 45 ms, 0.84 s, 12.3 s, 2 min 05 s. */
export function formatSeconds(s) {
  if (s === null || s === undefined || !Number.isFinite(s)) return DASH;
  if (s < 0.1) return `${Math.round(s * 1000)} ms`;
  if (s < 10) return `${s.toFixed(2)} s`;
  if (s < 60) return `${s.toFixed(1)} s`;
  const m = Math.floor(s / 60);
  return `${m} min ${String(Math.round(s - 60 * m)).padStart(2, "0")} s`;
}

function formatFactor(v) {
  if (v === null || v === undefined) return "none";
  return String(Number(v.toPrecision(6)));
}

// -- panel rows: [label, value] pairs, in display order ------------------------------------------

/** Rows of a model card (the loader's / attention node's akl_card). */
export function cardRows(card) {
  const rows = [
    ["Family", card.family ?? "unknown"],
    ["Latent channels", String(card.latent_channels)],
    ["Scaling factor", formatFactor(card.scaling_factor)],
    ["Shift factor", formatFactor(card.shift_factor)],
    ["Dtype", card.device ? `${card.dtype} on ${card.device}` : String(card.dtype)],
    ["Parameters", formatCount(card.parameters)],
    ["Format", [card.format, card.layout && `${card.layout} keys`].filter(Boolean).join(", ") || "unknown"],
  ];
  if (card.attention) rows.push(["Attention", String(card.attention)]);
  if (card.description) rows.push(["About", String(card.description)]);  // the file's own description
  return rows;
}

/** Rows of a tile grid (akl_grid, or regrid's result); `error` replaces them for bad settings. */
export function gridRows(grid) {
  return [
    ["Grid", `${grid.rows} × ${grid.cols} (${grid.tiles} tile${grid.tiles === 1 ? "" : "s"})`],
    ["Tile / overlap", grid.method === "exact" ? `${grid.tile_size} px, exact (no overlap)`
                                                : `${grid.tile_size} px / ${grid.overlap} px`],
    ["Image", `${grid.image_w} × ${grid.image_h} px (last run)`],
    ["Est. peak memory", `${formatBytes(grid.estimated_bytes)} per tile`],
  ];
}

/** What tiling a run did, in words: "no", "yes, 6 tiles", "auto: 12 tiles (reason)". */
export function tilingText(report) {
  if (!report.tiled) return "no";
  const tiles = report.tiles ? `${report.tiles} tile${report.tiles === 1 ? "" : "s"} of ${report.tile_size} px`
                             : `${report.tile_size} px tiles`;
  // The plain nodes tile only on their own (planner or out-of-memory fallback).
  if (report.planner || report.reason) return `auto, ${tiles}${report.reason ? ` (${report.reason})` : ""}`;
  return `yes, ${tiles}`;
}

/** Measured peak and the estimate; the host measures peaks on accelerators only. */
export function peakText(report) {
  const est = `est. ${formatBytes(report.estimated_bytes)}`;
  if (report.peak_bytes === null || report.peak_bytes === undefined) {
    return `not measured${report.device ? ` on ${report.device}` : ""} (${est})`;
  }
  return `${formatBytes(report.peak_bytes)} (${est})`;
}

/** Rows of a run report (akl_run). `manualTiles`: the node tiles by its widgets (tiled nodes). */
export function runRows(report, { manualTiles = false } = {}) {
  const rows = [
    ["Run", `${report.direction} ${report.batch} × ${report.image_w} × ${report.image_h} px`],
    ["Time", formatSeconds(report.seconds)],
    ["Peak memory", peakText(report)],
  ];
  if (!manualTiles) rows.push(["Auto tiling", tilingText(report)]);
  rows.push(["fp32 retry", report.fp32_retry ? `yes (${report.dtype} gave non-finite values)` : "no"]);
  if (report.batch_runs > 1) {
    rows.push(["Batch split", `${report.batch_runs} runs of up to ${report.batch_chunk} images (memory)`]);
  }
  if (!manualTiles && report.reason && !report.tiled) rows.push(["Planner", String(report.reason)]);
  for (const w of report.warnings ?? []) rows.push(["Warning", String(w)]);
  return rows;
}
