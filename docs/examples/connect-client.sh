# esbuild (make node-deps) strips the types and bundles the packages; node runs the bundle from stdin.
node_modules/.bin/esbuild docs/examples/connect-client.ts --bundle --platform=node --format=esm --log-level=warning \
  | node --input-type=module
