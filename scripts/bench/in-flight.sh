#!/usr/bin/env bash
# A worker's builds_in_flight on real work (issue 11): two cold builds of ripgrep 14.1.1
# (vendored, scripts/bench/fetch-ripgrep.sh) FROM the Rust base `lian catalog bootstrap`
# makes, submitted at once, in two workspaces, to a `lian up` fleet of ONE worker started
# with LIAN_BUILDS_IN_FLIGHT=2. Each build gets its own docker_local lease (its own dockerd
# under its tier's cgroup). Prints each build's wall time and result, and whether the one
# worker held both at once: the second build's `started` came before the first one ended,
# both appended by worker-1.
#
#   scripts/bench/in-flight.sh [--state-dir DIR]
#
# --state-dir keeps the fleet's state (registry, S3, the bootstrap's cache) for the next run;
# the first bootstrap takes minutes. Needs target/release/lian (or LIAN=path) and what `lian
# up` and the bootstrap need (./scripts/setup.sh). On this 2-core machine the two builds share
# the cores: the point is one worker driving both to the end, not speed.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
LIAN=${LIAN:-$REPO/target/release/lian}
CACHE=${LIAN_BENCH_CACHE:-$HOME/.cache/lian-bench}
STATE_DIR=""
[[ ${1:-} == --state-dir ]] && STATE_DIR=$2
log() { printf '[in-flight %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }
[[ -x $LIAN ]] || die "$LIAN not found: cargo build -p lian --release (or LIAN=path)"

RUN_ID=$(date +%m%d%H%M%S)
WORK=$(mktemp -d /tmp/lif.XXXX)
[[ -n $STATE_DIR ]] || STATE_DIR=$WORK/st
mkdir -p "$STATE_DIR" "$CACHE"
STATE_DIR=$(cd "$STATE_DIR" && pwd)
UP_PID=""
cleanup() {
  local rc=$?
  set +e
  [[ -n $UP_PID ]] && { kill -TERM "$UP_PID"; timeout 90 tail --pid="$UP_PID" -f /dev/null; }
  (( rc == 0 )) && rm -rf "$WORK" || log "logs kept in $WORK"
  exit "$rc"
}
trap cleanup EXIT

cp "$LIAN" "$WORK/lian" && LIAN=$WORK/lian
: >"$WORK/lian.toml"
(cd "$WORK" && LIAN_BUILDS_IN_FLIGHT=2 exec "$LIAN" --config "$WORK/lian.toml" up --workers 1 \
  --nats-port 0 --state-dir "$STATE_DIR" --catalog "$REPO/catalog" >"$WORK/up.log" 2>&1) &
UP_PID=$!
timeout 90 grep -q -m1 '^Ctrl-C stops everything' <(tail -n +1 -F "$WORK/up.log") || die "lian up did not start"
NATS_URL=$(awk '$1 == "nats" { print $2; exit }' "$WORK/up.log")
REGISTRY=$(awk '$1 == "registry" { print $2; exit }' "$WORK/up.log")
BASE=${REGISTRY#http://}/lamina/rust-base:bookworm
client() { "$LIAN" --config "$WORK/lian.toml" --nats-url "$NATS_URL" "$@"; }
if ! curl -fsS -o /dev/null -H 'Accept: application/vnd.docker.distribution.manifest.v2+json' \
  "$REGISTRY/v2/lamina/rust-base/manifests/bookworm"; then
  log "lian catalog bootstrap (minutes, the first time)"
  client catalog bootstrap --catalog "$REPO/catalog" --state-dir "$STATE_DIR" --registry "$REGISTRY" \
    >"$WORK/bootstrap.log" 2>&1 || die "bootstrap failed (see $WORK/bootstrap.log)"
fi

"$HERE/fetch-ripgrep.sh" "$CACHE/ripgrep-14.1.1" "$CACHE" >&2
CTX=$WORK/ripgrep
cp -a "$CACHE/ripgrep-14.1.1" "$CTX"
rm -f "$CTX"/Dockerfile.*
cat >"$CTX/Dockerfile" <<DOCKERFILE
FROM $BASE
WORKDIR /src
RUN echo 'lian in-flight bench $RUN_ID' > /etc/lian-bench-run
COPY . .
RUN cargo build --release --offline && ./target/release/rg --version
DOCKERFILE

for ws in a b; do
  cat >"$WORK/$ws.ncl" <<NCL
let D = import "defaults/build_directives.ncl" in
D.make_ci_build { workspace = "inflight-$ws-$RUN_ID", artifact = { image = "lian-bench/rg-inflight-$ws:latest" } }
NCL
done
log "two builds at once to one worker (LIAN_BUILDS_IN_FLIGHT=2)"
start=$EPOCHREALTIME
submits=()
for ws in a b; do
  client --output json submit "$WORK/$ws.ncl" --context "$CTX" --wait --timeout 3600 \
    >"$WORK/$ws.out" 2>"$WORK/$ws.err" &
  submits+=($!)
done
for pid in "${submits[@]}"; do wait "$pid" || true; done
end=$EPOCHREALTIME
echo "| build | result | worker(s) | started (s after submit) | ended (s after submit) |"
echo "| --- | --- | --- | ---: | ---: |"
for ws in a b; do
  # Each line of --output json --wait is one event, as stored.
  jq -rs --argjson t0 "$start" '
    def secs: sub("\\.[0-9]+"; "") | fromdate;
    map(select(.type)) | (map(select(.type == "completed" or .type == "failed")) | last) as $last
    | "| \(.[0].workspace) | \($last.type) | \([.[] | .worker] | unique | join(", ")) | \((map(select(.type == "started")) | first | .at | secs) - ($t0 | floor)) | \(($last.at | secs) - ($t0 | floor)) |"
  ' "$WORK/$ws.out"
done
log "both submitted and ended within $(awk -v a="$end" -v b="$start" 'BEGIN { printf "%.0f", a - b }') s"
grep -q '"type":"completed"' "$WORK/a.out" && grep -q '"type":"completed"' "$WORK/b.out" || die "a build did not complete"
