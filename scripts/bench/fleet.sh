#!/usr/bin/env bash
# The fleet benchmarks of issue 11 (P1, P2, P7, and P1/P2 on a 3-node R3 cluster), each
# against its anchor measured in the same run on the same nats-server: builds the release
# `lian` (its workers serve the benchmark-only noop provider) and runs
# crates/lian-bus/benches/fleet.rs, which prints Markdown tables. Needs nats-server >= 2.11.
# Arguments go to the bench: --builds N (P1, 200), --in-flight N (P2, 500), --workers N (P2's
# fleet, 4), --builds-per-slot N (P2's append path, 4), --rss-in-flight N (P7, 100),
# --slots N (each worker's builds_in_flight, 100),
# --only single|cluster.
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --quiet -p lian --release
exec cargo bench --quiet -p lian-bus --bench fleet -- "$@"
