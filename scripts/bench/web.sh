#!/usr/bin/env bash
# Page-load benchmark of the web view (issue 12): Chromium's Navigation Timing of the
# catalog page for the 13-layer catalog/ (whole DAG) and a synthetic 10,000-layer catalog
# (filtered to a layer's lineage), against the same view fetched as JSON from
# /api/v1/catalog in the same page and run. Needs chromium and chromium-driver
# (scripts/setup.sh) and nats-server. Extra arguments go to cargo test (e.g. --release).
set -euo pipefail
cd "$(dirname "$0")/../.."
exec cargo test -p lian --test web_bench "$@" -- --ignored --nocapture
