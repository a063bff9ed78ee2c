#!/usr/bin/env bash
# P6 end to end (issue 11): `lian catalog plan --changed` as a user runs it, on synthetic
# catalog directories of 1,000 and 10,000 layers (trees of 100 layers, layer i built on
# (i-1)/2, every tree's root on the first tree's root, as lian_catalog::synthetic), against
# `lian --version` (the process alone) in the same farm-bench call. The first load of a
# catalog evaluates every workflow.ncl through Nickel (timed once, "cold"); later loads read
# the evaluation cache (~/.cache/lian) and are what farm-bench times.
#
#   scripts/bench/plan-cli.sh [LIAN_BINARY]     (default: target/release/lian, else debug)
#   TREES="100" scripts/bench/plan-cli.sh        (only the 10,000-layer catalog)
set -euo pipefail
cd "$(dirname "$0")/../.."
LIAN=${1:-target/release/lian}
[ -x "$LIAN" ] || LIAN=target/debug/lian
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
export XDG_CACHE_HOME="$WORK/cache"

gen() { # gen DIR TREES
  python3 - "$1" "$2" <<'PY'
import os, sys
out, trees = sys.argv[1], int(sys.argv[2])
for t in range(trees):
    for i in range(100):
        name = f"t{t:03}-n{i:03}"
        if i > 0:
            base = f'{{ layer = "t{t:03}-n{(i - 1) // 2:03}" }}'
        elif t > 0:
            base = '{ layer = "t000-n000" }'
        else:
            base = '{ image = "rust:slim-bookworm" }'
        os.makedirs(f"{out}/{name}", exist_ok=True)
        with open(f"{out}/{name}/workflow.ncl", "w") as f:
            f.write(f'''{{
  name = "{name}",
  class = 'toolchain,
  description = "synthetic",
  build_base = {base},
  runtime_base = {{ image = "debian:bookworm-slim" }},
  tools_provided = [],
  artifact_paths = ["/opt/{name}"],
  native_deps = [],
}}
''')
PY
}

echo "binary: $LIAN ($(git rev-parse --short HEAD))"
for trees in ${TREES:-10 100}; do
  dir="$WORK/catalog-$trees"
  gen "$dir" "$trees"
  layers=$((trees * 100))
  start=$(date +%s.%N)
  "$LIAN" catalog --catalog "$dir" plan --changed t000-n001 > /dev/null
  end=$(date +%s.%N)
  echo "== $layers layers: cold load (every workflow.ncl through Nickel, once): $(echo "$end - $start" | bc) s"
  farm-bench -n 11 --timeout 600 --vs "$LIAN --version" -- \
    "$LIAN" catalog --catalog "$dir" plan --changed t000-n001
  farm-bench -n 11 --timeout 600 --vs "$LIAN --version" -- \
    "$LIAN" catalog --catalog "$dir" plan --changed t000-n000
done
