// Evaluates web/akl_lib.js on cases read as JSON from stdin and prints the results as JSON,
// so tests/web/test_js_logic.py can compare them with nodes/grid.py.
// Case: {image_h, image_w, tile_size, overlap, method, width, dtype_bytes, batch, direction, model?}
// Result: tileGrid's dict, or {error} with checkTileParams' message.
import { checkTileParams, tileGrid } from "../../web/akl_lib.js";

let input = "";
for await (const chunk of process.stdin) input += chunk;
const results = JSON.parse(input).map((c) => {
  const error = checkTileParams(c.tile_size, c.overlap);
  if (error) return { error };
  return tileGrid(c.image_h, c.image_w, c.tile_size, c.overlap, {
    method: c.method, latentChannels: c.latent_channels ?? 4, width: c.width, dtypeBytes: c.dtype_bytes,
    batch: c.batch, direction: c.direction, model: c.model ?? null,
  });
});
process.stdout.write(JSON.stringify(results));
