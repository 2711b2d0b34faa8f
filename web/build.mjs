// Builds the dashboard into the folder the server serves at / (or into the folder given as the first argument,
// which is how tests/test_web_bundle.py checks that the committed bundle is not stale).
// The output must depend on the sources alone: no timestamps, no absolute paths, no source maps.
import { copyFileSync, mkdirSync } from "node:fs";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import * as esbuild from "esbuild";

const web = dirname(fileURLToPath(import.meta.url));
const root = resolve(web, "..");
const out = resolve(process.argv[2] ?? join(root, "server", "jobstate", "server", "static"));
mkdirSync(out, { recursive: true });

await esbuild.build({
  absWorkingDir: root,
  entryPoints: { app: "web/src/main.ts" },
  outdir: out,
  bundle: true,
  minify: true,
  format: "iife",
  target: ["es2020", "chrome100", "firefox100", "safari15"],
  charset: "utf8",
  legalComments: "none",
  sourcemap: false,
  logLevel: "warning",
});
copyFileSync(join(web, "index.html"), join(out, "index.html"));
