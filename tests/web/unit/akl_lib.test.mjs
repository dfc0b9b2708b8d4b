// Unit tests of web/akl_lib.js (node --test). Parity with nodes/grid.py (vae_core/memory.py) is checked from pytest
// (tests/web/test_js_logic.py feeds both the same cases); these pin the behaviour in JS alone.
import assert from "node:assert/strict";
import { test } from "node:test";

import {
  cardRows, checkTileParams, formatBytes, formatCount, formatSeconds, gridRows, regrid,
  runRows, tileGrid, tileWorkingBytes, tilingText,
} from "../../../web/akl_lib.js";

test("a 1024 x 768 decode with 256 px tiles and 32 px overlap runs a 4 x 5 grid", () => {
  // starts every 224 px: rows 0,224,448,672 (768 px) and cols 0..896 (1024 px)
  const g = tileGrid(768, 1024, 256, 32);
  assert.equal(g.rows, 4);
  assert.equal(g.cols, 5);
  assert.equal(g.tiles, 20);
  // SD-shaped default model: the decoder's top resnet (256 -> 128 channels: input, norm, conv1) at the
  // tile's full resolution is the largest layer, times the untiled calibration 1.2
  assert.equal(g.estimated_bytes, Math.trunc((2 * 256 + 128) * 256 * 256 * 4 * 1.2));
});

test("an image that fits in one tile runs untiled", () => {
  const g = tileGrid(512, 384, 512, 64);
  assert.deepEqual([g.rows, g.cols, g.tiles], [1, 1, 1]);
  assert.equal(g.estimated_bytes, Math.trunc((2 * 256 + 128) * 512 * 384 * 4 * 1.2)); // clipped to the image
});

test("exact tiling ignores the overlap", () => {
  const g = tileGrid(1000, 600, 256, 64, { method: "exact", direction: "encode" });
  assert.deepEqual([g.rows, g.cols], [4, 3]);
  // the encoder's first resnet (128 channels: input, norm, conv1) at full resolution, calibration 1.6
  assert.equal(g.estimated_bytes, Math.trunc(3 * 128 * 256 * 256 * 4 * 1.6));
});

test("invalid tile settings are reported, never rewritten", () => {
  assert.equal(checkTileParams(512, 64), null);
  assert.equal(checkTileParams(null, null), null);
  assert.match(checkTileParams(500, 64), /not a multiple of 8.*use 496 or 504/);
  assert.match(checkTileParams(32, 0), /outside 64\.\.4096/);
  assert.match(checkTileParams(256, 136), /more than half of tile_size=256; use overlap <= 128/);
  assert.match(checkTileParams(256, -8), /negative/);
  assert.throws(() => tileGrid(100, 100, 256, 200), RangeError);
});

test("regrid keeps the model, dtype and batch of the last grid", () => {
  const last = tileGrid(768, 1024, 256, 32, { width: 64, dtypeBytes: 2, batch: 3, direction: "encode" });
  const now = regrid(last, 512, 64);
  const direct = tileGrid(768, 1024, 512, 64, { width: 64, dtypeBytes: 2, batch: 3, direction: "encode" });
  assert.deepEqual(now, direct);
  assert.deepEqual([now.rows, now.cols], [2, 3]);
});

test("tileWorkingBytes walks the model's layers", () => {
  const tiny = { block_out_channels: [8, 16], latent_channels: 4, in_channels: 3, out_channels: 3,
                 mid_block_add_attention: true };
  // decode, f = 2: the top resnet (16 -> 8 channels) at 64 x 64 px, for a batch of 2
  assert.equal(tileWorkingBytes("decode", 64, 64, tiny, 4, 2), Math.trunc(2 * (2 * 16 + 8) * 64 * 64 * 4 * 1.2));
  // encode: the first resnet (8 -> 8 channels) at 64 x 64 px, bf16, calibration 1.6
  assert.equal(tileWorkingBytes("encode", 64, 64, tiny, 2), Math.trunc((2 * 8 + 8) * 64 * 64 * 2 * 1.6));
});

test("formatting", () => {
  assert.equal(formatBytes(0), "0 B");
  assert.equal(formatBytes(3 * 1024), "3.00 KiB");
  assert.equal(formatBytes(96 * 1024 ** 2), "96.0 MiB");
  assert.equal(formatBytes(1.25 * 1024 ** 3), "1.25 GiB");
  assert.equal(formatBytes(null), "—");
  assert.equal(formatCount(83653863), "83.65 M");
  assert.equal(formatCount(950), "950");
  assert.equal(formatSeconds(0.045), "45 ms");
  assert.equal(formatSeconds(0.84), "0.84 s");
  assert.equal(formatSeconds(125), "2 min 05 s");
});

test("card rows give family, channels, factors, dtype, parameters and format", () => {
  const rows = Object.fromEntries(cardRows({
    name: "sdxl.safetensors", family: "sdxl", latent_channels: 4, scaling_factor: 0.13025, shift_factor: null,
    dtype: "fp32", device: "cpu", parameters: 83653863, format: "safetensors", layout: "ldm", attention: "sdpa",
  }));
  assert.equal(rows.Family, "sdxl");
  assert.equal(rows["Latent channels"], "4");
  assert.equal(rows["Scaling factor"], "0.13025");
  assert.equal(rows["Shift factor"], "none");
  assert.equal(rows.Dtype, "fp32 on cpu");
  assert.equal(rows.Parameters, "83.65 M");
  assert.equal(rows.Format, "safetensors, ldm keys");
  assert.equal(rows.Attention, "sdpa");
});

test("card rows show the file's own description, and no About row without one", () => {
  const base = { family: "demo", latent_channels: 4, scaling_factor: 0.5, shift_factor: null, dtype: "fp32",
                 parameters: 10, format: "safetensors", layout: "ldm" };
  const about = "Demo/test VAE; not SD-compatible.";
  const rows = Object.fromEntries(cardRows({ ...base, description: about }));
  assert.equal(rows.Family, "demo");
  assert.equal(rows.About, about);
  assert.equal(Object.fromEntries(cardRows(base)).About, undefined);
});

test("grid rows say rows x columns, overlap and estimated memory", () => {
  const rows = Object.fromEntries(gridRows(tileGrid(768, 1024, 256, 32)));
  assert.equal(rows.Grid, "4 × 5 (20 tiles)");
  assert.equal(rows["Tile / overlap"], "256 px / 32 px");
  assert.equal(rows.Image, "1024 × 768 px (last run)");
  assert.equal(rows["Est. peak memory"], "192 MiB per tile");
});

test("run rows say time, peak memory, auto tiling and fp32 retry", () => {
  const base = {
    direction: "decode", batch: 1, image_h: 512, image_w: 512, seconds: 1.5, peak_bytes: 3 << 20,
    estimated_bytes: 4 << 20, tiled: false, tiles: null, tile_size: null, fp32_retry: false, dtype: "fp16",
    planner: false, reason: null,
  };
  let rows = Object.fromEntries(runRows(base));
  assert.equal(rows.Time, "1.50 s");
  assert.equal(rows["Peak memory"], "3.00 MiB (est. 4.00 MiB)");
  assert.equal(rows["Auto tiling"], "no");
  assert.equal(rows["fp32 retry"], "no");
  assert.equal(rows.Run, "decode 1 × 512 × 512 px");
  assert.equal(runRows({ ...base, peak_bytes: null, device: "cpu" })[2][1], "not measured on cpu (est. 4.00 MiB)");
  rows = Object.fromEntries(runRows({ ...base, tiled: true, tiles: 4, tile_size: 512, planner: true,
                                      reason: "does not fit in free memory", fp32_retry: true }));
  assert.equal(rows["Auto tiling"], "auto, 4 tiles of 512 px (does not fit in free memory)");
  assert.equal(rows["fp32 retry"], "yes (fp16 gave non-finite values)");
  rows = Object.fromEntries(runRows({ ...base, tiled: true, tiles: 6, tile_size: 256 }, { manualTiles: true }));
  assert.equal(rows["Auto tiling"], undefined);
  assert.equal(tilingText({ ...base, tiled: true, tiles: 6, tile_size: 256 }), "yes, 6 tiles of 256 px");
  assert.equal(rows["Batch split"], undefined);
  rows = Object.fromEntries(runRows({ ...base, batch: 16, batch_chunk: 6, batch_runs: 3,
                                      warnings: ["long run: 20000 steps"] }));
  assert.equal(rows["Batch split"], "3 runs of up to 6 images (memory)");
  assert.equal(rows.Warning, "long run: 20000 steps");
});
