#!/usr/bin/env bash
# Issue 9's benchmark: warm builds of a real Rust project nobody here wrote (ripgrep 14.1.1 from
# static.crates.io, vendored), with a typical cargo-chef Dockerfile (planner / cooker / final,
# then a small runtime stage) FROM the Rust base `lian catalog bootstrap` makes, and sccache
# over S3 through the BuildKit secret `lian-sccache`. Three scenarios, each two ways:
#
#   cold   nothing cached (a fresh sccache prefix, a fresh registry namespace, a first RUN step
#          that names this bench run so no layer of an earlier run matches on the host engine)
#   warm   a one-line change in ripgrep's main crate (a string in crates/core/main.rs)
#   bump   one dependency's version changed in Cargo.lock (`cargo update -p CRATE --precise V`,
#          then re-vendored; index.crates.io and static.crates.io must answer)
#
#   plain  /usr/bin/docker build on the host engine (DOCKER_BUILDKIT=1), its layer cache kept
#          between the scenarios, sccache through the same S3 store under the prefix
#          plain/<run>/ (so plain builds never warm lian's cache)
#   lian   `lian submit --wait --json` to a `lian up` fleet with its registry and S3 store:
#          a fresh docker_local lease (a new dockerd) for every build, which starts from the
#          namespace's engine store when the previous build left one (ADR lian-044); a CI
#          build of workspace rgbench-<run> (namespace ci/rgbench-<run>, the sccache prefix too)
#
#   scripts/bench/warm.sh [--state-dir DIR] [--warm-runs N] [--bump CRATE@VERSION]
#       [--timeout SECS] [--cache DIR] [--out FILE]
#
# --state-dir keeps the fleet's state (registry data, S3 data, and the bootstrap's rootfs and
# cargo-chef) in DIR across bench runs, so the Rust base is made once (about 3 to 6 minutes
# the first time); keep DIR short (lease engines put unix sockets under it). Without it a
# temporary /tmp/lwb.XXXX is made and removed. --warm-runs N repeats the warm pair N times
# (each after another one-line change), for a machine whose load disturbs single figures.
#
# Needs: target/debug/lian (or LIAN=path), what `lian up` needs (nats-server >= 2.10,
# docker-registry, weed), /usr/bin/docker and a host engine, debootstrap (first bootstrap),
# cargo, curl, jq. Prints progress on stderr and a markdown report on stdout (and into --out).
# On exit: the fleet is stopped, temp dirs removed, and the images this run tagged on the host
# engine removed (the base image stays when --state-dir is given).
set -euo pipefail
export LC_ALL=C

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)

ARGS="$*"
STATE_DIR=""
WARM_RUNS=1
BUMP=anyhow@1.0.88
TIMEOUT=3600
CACHE=${LIAN_BENCH_CACHE:-$HOME/.cache/lian-bench}
OUT=""
LIAN=${LIAN:-$REPO/target/debug/lian}
DOCKER=/usr/bin/docker

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2; exit 2; }
while [[ $# -gt 0 ]]; do
  case $1 in
    --state-dir) STATE_DIR=$2; shift 2 ;;
    --warm-runs) WARM_RUNS=$2; shift 2 ;;
    --bump) BUMP=$2; shift 2 ;;
    --timeout) TIMEOUT=$2; shift 2 ;;
    --cache) CACHE=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    -h|--help) usage ;;
    *) echo "$0: unknown argument $1" >&2; usage ;;
  esac
done
[[ $WARM_RUNS =~ ^[1-9][0-9]*$ ]] || { echo "$0: --warm-runs takes a positive integer" >&2; exit 2; }
[[ $BUMP == *@* ]] || { echo "$0: --bump takes CRATE@VERSION" >&2; exit 2; }
log() { printf '[warm %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

[[ -x $LIAN ]] || die "$LIAN not found: cargo build --bin lian (or LIAN=path)"
for tool in jq curl cargo; do command -v "$tool" >/dev/null || die "$tool not found"; done
[[ -x $DOCKER ]] || die "$DOCKER not found (Debian's docker.io: BuildKit without buildx)"
export DOCKER_BUILDKIT=1

RUN_ID=$(date +%m%d%H%M%S)
WS=rgbench-$RUN_ID
WORK=$(mktemp -d /tmp/lwbw.XXXX)
KEEP_STATE=1
if [[ -z $STATE_DIR ]]; then
  STATE_DIR=$(mktemp -d /tmp/lwb.XXXX)
  KEEP_STATE=0
fi
mkdir -p "$STATE_DIR" "$CACHE"
STATE_DIR=$(cd "$STATE_DIR" && pwd)
CACHE=$(cd "$CACHE" && pwd)
(( ${#STATE_DIR} <= 24 )) || log "warning: $STATE_DIR is long; lease sockets under it may not fit 108 bytes"

UP_PID=""
HOST_IMAGES=()
cleanup() {
  local rc=$?
  set +e
  if [[ -n $UP_PID ]]; then
    kill -TERM "$UP_PID" 2>/dev/null
    timeout 90 tail --pid="$UP_PID" -f /dev/null || kill -KILL "$UP_PID" 2>/dev/null
    wait "$UP_PID" 2>/dev/null
    cp "$STATE_DIR"/logs/worker-*.log "$WORK/" 2>/dev/null
  fi
  local m
  findmnt -rn -o TARGET | awk -v d="$STATE_DIR/" 'index($0, d) == 1' | sort -r | while read -r m; do
    umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null
  done
  for img in "${HOST_IMAGES[@]}"; do "$DOCKER" rmi -f "$img" >/dev/null 2>&1; done
  if (( rc != 0 )); then
    log "failed; logs kept in $WORK (worker logs copied there)"
  else
    rm -rf "$WORK"
  fi
  if (( KEEP_STATE == 0 )); then
    [[ -n ${BASE:-} ]] && "$DOCKER" rmi -f "$BASE" >/dev/null 2>&1
    rm -rf "$STATE_DIR"
  else
    # The registry, the S3 store and the bootstrap cache stay for the next run; the engine
    # stores are this run's namespace's only (ADR lian-044), useless to the next.
    rm -rf "$STATE_DIR/runners/.stores"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

wait_for_line() {
  local file=$1 pattern=$2 secs=$3 rc=0
  timeout "$secs" grep -E -q -m1 -- "$pattern" <(tail -n +1 -F "$file" 2>/dev/null) || rc=$?
  kill $! 2>/dev/null || true
  return "$rc"
}
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2fx", a / b; else print "-" }'; }
loadavg() { cut -d' ' -f1-3 /proc/loadavg; }

# ---------------------------------------------------------------------------------------
# (a) The fleet, with its registry and S3 store, and the Rust base in the registry.
# One binary for the whole run: a cargo build elsewhere in the tree must not swap the client
# under a running fleet (a client and workers of different builds can disagree).
cp "$LIAN" "$WORK/lian"
LIAN=$WORK/lian
: >"$WORK/lian.toml"
log "lian up (state in $STATE_DIR)"
(cd "$WORK" && exec "$LIAN" --config "$WORK/lian.toml" up --nats-port 0 --state-dir "$STATE_DIR" \
  --catalog "$REPO/catalog" >"$WORK/up.log" 2>&1) &
UP_PID=$!
wait_for_line "$WORK/up.log" '^Ctrl-C stops everything' 90 || { cat "$WORK/up.log" >&2; die "lian up did not start"; }
NATS_URL=$(awk '$1 == "nats" { print $2; exit }' "$WORK/up.log")
REGISTRY=$(awk '$1 == "registry" { print $2; exit }' "$WORK/up.log")
S3=$(awk '$1 == "s3" { print $2; exit }' "$WORK/up.log")
[[ $REGISTRY == http://* && $S3 == http://* ]] || { cat "$WORK/up.log" >&2; die "no registry or S3 URL printed"; }
REG_HOST=${REGISTRY#http://}
S3_KEY_ID=$(cat "$STATE_DIR/s3/access_key_id")
S3_SECRET_FILE=$STATE_DIR/s3/secret_access_key
for w in 1 2; do
  wait_for_line "$STATE_DIR/logs/worker-$w.log" 'serving build requests' 90 ||
    { tail -20 "$STATE_DIR/logs/worker-$w.log" >&2; die "worker-$w did not start"; }
done
BASE=$REG_HOST/lamina/rust-base:bookworm
if curl -fsS -o /dev/null -H 'Accept: application/vnd.docker.distribution.manifest.v2+json' \
  "$REGISTRY/v2/lamina/rust-base/manifests/bookworm" 2>/dev/null; then
  log "the Rust base is in the registry already ($BASE)"
else
  log "lian catalog bootstrap (the first time: debootstrap, cargo-chef; minutes)"
  t0=$EPOCHREALTIME
  "$LIAN" --config "$WORK/lian.toml" catalog bootstrap --catalog "$REPO/catalog" --state-dir "$STATE_DIR" \
    --registry "$REGISTRY" >"$WORK/bootstrap.log" 2>&1 || { cat "$WORK/bootstrap.log" >&2; die "bootstrap failed"; }
  log "bootstrap took $(awk -v a="$EPOCHREALTIME" -v b="$t0" 'BEGIN { printf "%.0f", a - b }') s"
fi
# The host engine builds FROM the same reference (plain's cold build pulls it if missing).
"$DOCKER" pull -q "$BASE" >/dev/null

# ---------------------------------------------------------------------------------------
# (b) The project and its Dockerfile.
"$HERE/fetch-ripgrep.sh" "$CACHE/ripgrep-14.1.1" "$CACHE" >&2
CTX=$WORK/ripgrep
cp -a "$CACHE/ripgrep-14.1.1" "$CTX"
rm -f "$CTX"/Dockerfile.* # left by other benches
MAIN=crates/core/main.rs
grep -q 'fn main()' "$CTX/$MAIN" || die "$MAIN has no main"

SECRET='--mount=type=secret,id=lian-sccache,target=/run/secrets/lian-sccache'
cat >"$CTX/Dockerfile" <<EOF
# cargo-chef planner / cooker / final, then a runtime stage with the binary and the libraries it
# links (a stand-in for distroless/cc: no image can be pulled from Docker Hub here).
FROM $BASE AS chef
ENV CARGO_HOME=/usr/local/cargo
WORKDIR /src
# Names this bench run, so a cold build is cold on an engine that built an earlier run.
RUN echo 'lian warm-build bench $RUN_ID' > /etc/lian-bench-run

FROM chef AS planner
COPY . .
RUN cargo chef prepare --recipe-path recipe.json

FROM chef AS cooker
COPY --from=planner /src/recipe.json recipe.json
COPY .cargo .cargo
COPY vendor vendor
RUN $SECRET sh -c '. /run/secrets/lian-sccache && cargo chef cook --release --offline --recipe-path recipe.json && sccache --show-stats && sccache --stop-server >/dev/null'

FROM cooker AS builder
COPY . .
RUN $SECRET sh -c '. /run/secrets/lian-sccache && cargo build --release --offline && sccache --show-stats && sccache --stop-server >/dev/null' \\
 && mkdir -p /out/usr/local/bin && cp target/release/rg /out/usr/local/bin/rg \\
 && ldd target/release/rg | grep -o '/[^ ]*' | xargs -I{} cp --parents -L {} /out \\
 && /out/usr/local/bin/rg --version

FROM scratch
COPY --from=builder /out /
ENTRYPOINT ["/usr/local/bin/rg"]
EOF

# sccache for plain builds: the same store, its own prefix.
PLAIN_SECRET=$WORK/plain-sccache.env
(
  umask 077
  cat >"$PLAIN_SECRET" <<EOF
export SCCACHE_BUCKET='sccache'
export SCCACHE_ENDPOINT='$S3'
export SCCACHE_REGION='us-east-1'
export SCCACHE_S3_USE_SSL='false'
export SCCACHE_S3_KEY_PREFIX='plain/$RUN_ID'
export AWS_ACCESS_KEY_ID='$S3_KEY_ID'
export AWS_SECRET_ACCESS_KEY='$(cat "$S3_SECRET_FILE")'
export RUSTC_WRAPPER='sccache'
export CARGO_INCREMENTAL='0'
EOF
)

cat >"$WORK/ripgrep.ncl" <<EOF
let D = import "defaults/build_directives.ncl" in
D.make_ci_build {
  workspace = "$WS",
  artifact = { image = "lian-bench/ripgrep:latest", dockerfile = "Dockerfile" },
}
EOF
HOST_IMAGES+=("lian-bench/ripgrep:latest")

# ---------------------------------------------------------------------------------------
# (c) The scenarios. Each result: "secs steps cached hits misses cooker" in $WORK/<label>.res.
# sccache figures of a plain build: the sum over the RUN steps that printed them (one
# sccache server per RUN step).
sccache_sum() { # LOG LABEL -> the sum of "LABEL N" over the stats tables in a plain log
  awk -v l="$2" '{ $1 = ""; $2 = ""; s = $0; sub(/^ +/, "", s) }
    index(s, l) == 1 { n = s; sub(l, "", n); gsub(/ /, "", n); if (n ~ /^[0-9]+$/) t += n }
    END { print t + 0 }' "$1"
}
plain_build() {
  local label=$1 tag=lian-warmbench/plain-ripgrep:$1-$RUN_ID t0 t1 rc=0
  HOST_IMAGES+=("$tag")
  log "plain $label (load $(loadavg))"
  t0=$EPOCHREALTIME
  "$DOCKER" build --progress=plain --network host --secret "id=lian-sccache,src=$PLAIN_SECRET" \
    -t "$tag" "$CTX" >"$WORK/plain-$label.log" 2>&1 || rc=$?
  t1=$EPOCHREALTIME
  (( rc == 0 )) || { tail -30 "$WORK/plain-$label.log" >&2; die "plain $label failed"; }
  local steps cached
  # Steps as lian counts them: the "#N [stage k/n] ..." steps, and those CACHED.
  steps=$(awk '$1 ~ /^#[0-9]+$/ && $2 ~ /^\[/ && $2 != "[internal]" { print $1 }' "$WORK/plain-$label.log" | sort -u)
  cached=$(awk '$1 ~ /^#[0-9]+$/ && $2 == "CACHED" { print $1 }' "$WORK/plain-$label.log" | sort -u |
    comm -12 - <(printf '%s\n' "$steps") | grep -c . || true)
  steps=$(printf '%s\n' "$steps" | grep -c . || true)
  printf '%s %s %s %s %s -\n' "$(awk -v a="$t1" -v b="$t0" 'BEGIN { printf "%.1f", a - b }')" "$steps" "$cached" \
    "$(sccache_sum "$WORK/plain-$label.log" 'Cache hits')" "$(sccache_sum "$WORK/plain-$label.log" 'Cache misses')" \
    >"$WORK/plain-$label.res"
  log "plain $label: $(cat "$WORK/plain-$label.res")"
}
lian_build() {
  local label=$1 t0 t1 rc=0 done
  log "lian $label (load $(loadavg))"
  t0=$EPOCHREALTIME
  "$LIAN" --config "$WORK/lian.toml" --nats-url "$NATS_URL" submit "$WORK/ripgrep.ncl" --context "$CTX" \
    --wait --json --timeout "$TIMEOUT" </dev/null >"$WORK/lian-$label.out" 2>"$WORK/lian-$label.err" || rc=$?
  t1=$EPOCHREALTIME
  done=$(grep '"type":"completed"' "$WORK/lian-$label.out" | tail -1 || true)
  if (( rc != 0 )) || [[ -z $done ]]; then
    grep -E '"type":"(step_failed|failed)"' "$WORK/lian-$label.out" >&2 || true
    tail -5 "$WORK/lian-$label.err" >&2
    die "lian $label failed (exit $rc): worker logs in $STATE_DIR/logs/"
  fi
  jq -c '.cache // .payload.cache // empty' <<<"$done" >"$WORK/lian-$label.cache.json"
  local c=$WORK/lian-$label.cache.json
  printf '%s %s %s %s %s %s %s\n' "$(awk -v a="$t1" -v b="$t0" 'BEGIN { printf "%.1f", a - b }')" \
    "$(jq -r '.steps // "-"' "$c")" "$(jq -r '.cached_steps // "-"' "$c")" \
    "$(jq -r '.sccache_hits // "-"' "$c")" "$(jq -r '.sccache_misses // "-"' "$c")" \
    "$(jq -r 'if .cooker then (if .cooker.hit then "hit" else "miss" end) else "-" end' "$c")" \
    "$(jq -r 'if .engine_store then (if .engine_store.hit then "hit" else "miss" end) else "-" end' "$c")" \
    >"$WORK/lian-$label.res"
  log "lian $label: $(cat "$WORK/lian-$label.res")"
}
one_line_change() { # a string in ripgrep's main crate
  sed -i "0,/fn main() -> ExitCode {/s//fn main() -> ExitCode {\n    let _lian_bench = \"warm-build bench change $1\";/" "$CTX/$MAIN"
  grep -q "warm-build bench change $1" "$CTX/$MAIN" || die "the one-line change did not apply"
}
bump_dependency() {
  local crate=${BUMP%@*} version=${BUMP#*@} before
  before=$(awk -v c="$crate" '$1 == "name" && $3 == "\"" c "\"" { getline; print $3; exit }' "$CTX/Cargo.lock" | tr -d '"')
  log "dependency bump: $crate $before -> $version (cargo update --precise, cargo vendor)"
  mv "$CTX/.cargo/config.toml" "$WORK/cargo-config.toml"
  (cd "$CTX" && CARGO_HOME="$CACHE/cargo-home" cargo update -p "$crate" --precise "$version" &&
    CARGO_HOME="$CACHE/cargo-home" cargo vendor --locked vendor >/dev/null) >"$WORK/bump.log" 2>&1 ||
    { mv "$WORK/cargo-config.toml" "$CTX/.cargo/config.toml"; cat "$WORK/bump.log" >&2; die "the bump failed"; }
  mv "$WORK/cargo-config.toml" "$CTX/.cargo/config.toml"
  # crates.io packs every file with the mtime 2006-07-24, and the bumped crate's Cargo.toml
  # keeps its size (1.0.87 -> 1.0.88): BuildKit's context transfer, which compares size and
  # mtime, would keep the old file and the offline build would not find the new version.
  find "$CTX/vendor/$crate" -type f -exec touch {} +
  grep -q "version = \"$version\"" "$CTX/Cargo.lock" || die "Cargo.lock does not name $crate $version"
  BUMP_FROM=$before
}

LOAD_START=$(loadavg)
SCEN=(cold)
plain_build cold
lian_build cold
for i in $(seq 1 "$WARM_RUNS"); do
  label=warm; (( WARM_RUNS > 1 )) && label=warm$i
  one_line_change "$i"
  plain_build "$label"
  lian_build "$label"
  SCEN+=("$label")
done
bump_dependency
plain_build bump
lian_build bump
SCEN+=(bump)
LOAD_END=$(loadavg)

# ---------------------------------------------------------------------------------------
REPORT=$WORK/report.md
{
  echo "Command: \`scripts/bench/warm.sh $ARGS\` ($(date -u +%Y-%m-%d), $(nproc) cores, load average $LOAD_START at the start, $LOAD_END at the end; lian: $LIAN)"
  echo
  echo "| scenario | plain \`docker build\` | lian submit --wait | lian / plain | plain steps cached | lian steps cached | lian engine store | lian cooker | plain sccache hits / misses | lian sccache hits / misses |"
  echo "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
  for s in "${SCEN[@]}"; do
    read -r ps pst pc ph pm _ <"$WORK/plain-$s.res"
    read -r ls lst lc lh lm lk le <"$WORK/lian-$s.res"
    echo "| $s | ${ps} s | ${ls} s | $(ratio "$ls" "$ps") | $pc/$pst | $lc/$lst | $le | $lk | $ph / $pm | $lh / $lm |"
  done
  echo
  echo "Bump: ${BUMP%@*} ${BUMP_FROM:-?} -> ${BUMP#*@}. Completed events' cache (lian):"
  echo
  for s in "${SCEN[@]}"; do echo "- $s: \`$(cat "$WORK/lian-$s.cache.json")\`"; done
} >"$REPORT"
cat "$REPORT"
[[ -n $OUT ]] && cp "$REPORT" "$OUT"
if [[ -n $OUT ]]; then
  mkdir -p "$OUT.logs"
  cp "$WORK"/plain-*.log "$WORK"/lian-*.out "$WORK"/lian-*.cache.json "$WORK/ripgrep/Dockerfile" "$OUT.logs/"
  cp "$STATE_DIR"/logs/worker-*.log "$OUT.logs/" 2>/dev/null || true
fi
exit 0
