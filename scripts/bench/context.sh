#!/usr/bin/env bash
# The context-transfer benchmark of issue 15: how long a cold build context takes to reach the
# builder, on real trees, three ways:
#
#   docker  plain `docker build` (Debian's 20.10 client, DOCKER_BUILDKIT=1, host engine):
#           from the start of `docker build` until the first build step starts (the
#           Dockerfile is `FROM scratch` + `COPY . /ctx`, so the first step is the COPY,
#           which BuildKit starts once the whole context is in). The local-source cache
#           (`docker builder prune -af --filter type=source.local`) is pruned before every
#           run, so each run transfers the whole context. BuildKit's own duration of its
#           "load build context" vertex is shown beside it.
#   ssh     `tar c -C DIR . | ssh USER@127.0.0.1 tar x -C DEST` against an sshd started here
#           (own config, host key and client key in a temp dir, free port, default cipher),
#           into a fresh DEST each run; a new SSH connection each run.
#   lian    a fresh `lian up --nats-port 0` fleet per run (empty object store, so nothing is
#           deduplicated), then `lian submit --context DIR --wait --json`: from the start of
#           submit to the `at` of the build's `context_synced` event. The build is then
#           cancelled (only the transfer is measured) and the fleet stopped. A build that
#           fails or does not reach context_synced within --lian-timeout is reported with
#           its reasons, not waited on.
#
# The trees: ripgrep 14.1.1 with its dependencies vendored (scripts/bench/fetch-ripgrep.sh)
# and a synthetic tree of 20,000 files (scripts/bench/gen-tree.sh), both kept in the cache
# directory. One file, `Dockerfile.lian-ctxbench`, is added to each tree (all three ways
# move the same bytes).
#
#   scripts/bench/context.sh [--runs N] [--trees ripgrep,synth] [--ways docker,ssh,lian]
#                            [--cache DIR] [--out FILE] [--lian-timeout SECS] [--synth-files N]
#                            [--ssh-dest DIR]
#
# The ways take turns run by run. Every way writes each file of the context to disk on the
# receiving side (BuildKit's snapshot, tar x, the lease's context dir); where creating files
# is slow (a VM disk with an I/O budget) that dominates: `--ssh-dest /dev/shm` shows what the
# ssh way costs without the disk.
#
# Needs: Debian's docker (/usr/bin/docker, or DOCKER=...) with an engine, openssh-server and
# openssh-client, curl, jq, cargo (for the vendoring), python3 (a free port) and, for the lian
# way, target/debug/lian (`cargo build --bin lian`; or LIAN=path) and nats-server >= 2.10.
# Prints progress on stderr and a markdown report on stdout (and into --out FILE).
set -euo pipefail
export LC_ALL=C

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)

ARGS="$*"
RUNS=3
TREES=ripgrep,synth
WAYS=docker,ssh,lian
CACHE=${LIAN_BENCH_CACHE:-$HOME/.cache/lian-bench}
OUT=""
LIAN_TIMEOUT=240
SYNTH_FILES=20000
SSH_DEST="" # where tar x writes (default: a temp dir on the same disk as the others write to)
STEP_TIMEOUT=600 # one docker build or one tar | ssh, at most
DOCKER=${DOCKER:-/usr/bin/docker}
LIAN=${LIAN:-$REPO/target/debug/lian}
BENCH_DOCKERFILE=Dockerfile.lian-ctxbench

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2; exit 2; }
while [[ $# -gt 0 ]]; do
  case $1 in
    --runs) RUNS=$2; shift 2 ;;
    --trees) TREES=$2; shift 2 ;;
    --ways) WAYS=$2; shift 2 ;;
    --cache) CACHE=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    --lian-timeout) LIAN_TIMEOUT=$2; shift 2 ;;
    --synth-files) SYNTH_FILES=$2; shift 2 ;;
    --ssh-dest) SSH_DEST=$2; shift 2 ;;
    -h|--help) usage ;;
    *) echo "$0: unknown argument $1" >&2; usage ;;
  esac
done
[[ $RUNS =~ ^[1-9][0-9]*$ ]] || { echo "$0: --runs takes a positive integer" >&2; exit 2; }
[[ $LIAN_TIMEOUT =~ ^[1-9][0-9]*$ ]] || { echo "$0: --lian-timeout takes seconds" >&2; exit 2; }
has() { [[ ,$2, == *,$1,* ]]; }

log() { printf '[context-bench %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

mkdir -p "$CACHE"
CACHE=$(cd "$CACHE" && pwd)
# Short on purpose: a docker_local lease's engine puts unix sockets under the fleet's state
# dir (runners/<lease>/exec/containerd/containerd-debug.sock), and a socket path over 104
# characters makes its containerd fail to start.
WORK=$(mktemp -d /tmp/lcb.XXXXXX)
IMAGE="lian-bench-ctx:$$"

# Everything started here is recorded and stopped on exit, whatever the exit.
SSHD_PID=""
UP_PID=""
SUBMIT_PID=""
UP_STATE=""
STAMP_PIDS=()
cleanup() {
  local rc=$?
  set +e
  [[ -n $SUBMIT_PID ]] && kill "$SUBMIT_PID" 2>/dev/null && wait "$SUBMIT_PID" 2>/dev/null
  [[ -n $UP_PID ]] && stop_fleet
  for p in "${STAMP_PIDS[@]}"; do kill "$p" 2>/dev/null; done
  if [[ -n $SSHD_PID ]]; then kill "$SSHD_PID" 2>/dev/null; wait "$SSHD_PID" 2>/dev/null; fi
  "$DOCKER" rmi -f "$IMAGE" >/dev/null 2>&1
  for t in ripgrep synth; do "$DOCKER" rmi -f "lian-bench/ctx-$t:latest" >/dev/null 2>&1; done
  unmount_under "$WORK"
  rm -rf "$WORK" 2>/dev/null || log "could not remove all of $WORK"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# A lease engine that failed to start can leave its data root bind-mounted under the fleet's
# state dir; only mounts under our own temp dir are touched (deepest first).
unmount_under() {
  local m
  findmnt -rn -o TARGET | awk -v d="$1/" 'index($0, d) == 1' | sort -r | while read -r m; do
    log "unmounting $m, left by a lease"
    umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true
  done
}

# Waits (at most SECS) until FILE has a line matching the extended regex; 0 if it came.
# tail -F follows the file as it grows (inotify), so this waits for the event, not a timer.
wait_for_line() {
  local file=$1 pattern=$2 secs=$3 rc=0
  timeout "$secs" grep -E -q -m1 -- "$pattern" <(tail -n +1 -F "$file" 2>/dev/null) || rc=$?
  kill $! 2>/dev/null || true
  return "$rc"
}

# Prefixes each line with the time it was read (seconds since the epoch, microseconds).
stamp() { local line; while IFS= read -r line; do printf '%s %s\n' "$EPOCHREALTIME" "$line"; done; }

sub() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", a - b }'; }
stats() { # "min / median / max" of the numbers on stdin
  sort -g | awk '{ v[NR] = $1 } END {
    if (NR == 0) { print "-"; exit }
    m = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2
    printf "%.2f s / %.2f s / %.2f s", v[1], m, v[NR] }'
}
median() { sort -g | awk '{ v[NR] = $1 } END { if (NR == 0) print ""; else printf "%.3f", (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }

# ---------------------------------------------------------------------------------------
# The trees.
declare -A TREE_DIR TREE_DESC
prepare_trees() {
  if has ripgrep "$TREES"; then
    log "ripgrep tree (scripts/bench/fetch-ripgrep.sh)"
    "$HERE/fetch-ripgrep.sh" "$CACHE/ripgrep-14.1.1" "$CACHE" >&2
    TREE_DIR[ripgrep]=$CACHE/ripgrep-14.1.1
    TREE_DESC[ripgrep]="ripgrep 14.1.1, vendored"
  fi
  if has synth "$TREES"; then
    log "synthetic tree (scripts/bench/gen-tree.sh, $SYNTH_FILES files)"
    "$HERE/gen-tree.sh" "$CACHE/synth-$SYNTH_FILES-seed1" "$SYNTH_FILES" 1 >&2
    TREE_DIR[synth]=$CACHE/synth-$SYNTH_FILES-seed1
    TREE_DESC[synth]="synthetic, $SYNTH_FILES files (seed 1)"
  fi
  local t
  for t in "${!TREE_DIR[@]}"; do
    printf '# lian context benchmark: no parent image; the first step needs the whole context.\nFROM scratch\nCOPY . /ctx\n' \
      >"${TREE_DIR[$t]}/$BENCH_DOCKERFILE"
  done
}
tree_counts() { # "files<TAB>bytes" of regular files, as docker would send them (no .dockerignore here)
  find "$1" -type f -printf '%s\n' | awk '{ s += $1 } END { printf "%d\t%d\n", NR, s }'
}

# ---------------------------------------------------------------------------------------
# (a) docker build.
docker_check() {
  [[ -x $DOCKER ]] || die "$DOCKER not found (DOCKER=path to Debian's docker 20.10 client)"
  "$DOCKER" version --format '{{.Server.Version}}' >/dev/null 2>&1 || die "$DOCKER: no engine answers"
  [[ ! -e ${TREE_DIR[ripgrep]:-/nonexistent}/.dockerignore && ! -e ${TREE_DIR[synth]:-/nonexistent}/.dockerignore ]] ||
    log "note: a tree has a .dockerignore; docker sends less than ssh does"
}
# One cold run; prints "seconds_to_first_step<TAB>buildkit_context_seconds<TAB>transferred".
docker_once() {
  local tree=$1 out=$2 t0 first ctx_vertex ctx_secs sent rc=0
  "$DOCKER" builder prune -af --filter type=source.local >/dev/null
  t0=$EPOCHREALTIME
  DOCKER_BUILDKIT=1 timeout "$STEP_TIMEOUT" "$DOCKER" build --progress=plain \
    -f "$tree/$BENCH_DOCKERFILE" -t "$IMAGE" "$tree" 2>&1 </dev/null | stamp >"$out" || rc=$?
  [[ $rc -eq 0 ]] || { sed 's/^[^ ]* //' "$out" | tail -20 >&2; die "docker build failed ($rc) on $tree"; }
  first=$(grep -E -m1 '^[0-9.]+ #[0-9]+ \[[0-9]+/[0-9]+\] ' "$out" | cut -d' ' -f1)
  [[ -n $first ]] || die "no build step in the docker build output ($out)"
  ctx_vertex=$(grep -E -m1 '^[0-9.]+ #[0-9]+ \[internal\] load build context' "$out" | awk '{ print $2 }')
  ctx_secs=$(grep -E "^[0-9.]+ $ctx_vertex DONE " "$out" | tail -1 | awk '{ sub(/s$/, "", $4); print $4 }')
  sent=$(grep -E "^[0-9.]+ $ctx_vertex transferring context: " "$out" | tail -1 | awk '{ print $5 }')
  "$DOCKER" rmi -f "$IMAGE" >/dev/null
  printf '%s\t%s\t%s\n' "$(sub "$first" "$t0")" "${ctx_secs:--}" "${sent:--}"
}

# ---------------------------------------------------------------------------------------
# (b) tar | ssh.
SSH_OPTS=()
start_sshd() {
  local d=$WORK/sshd port user
  mkdir -p "$d"
  ssh-keygen -q -t ed25519 -N '' -f "$d/host_key"
  ssh-keygen -q -t ed25519 -N '' -f "$d/client_key"
  cp "$d/client_key.pub" "$d/authorized_keys"
  port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  cat >"$d/sshd_config" <<EOF
Port $port
ListenAddress 127.0.0.1
HostKey $d/host_key
PidFile $d/sshd.pid
AuthorizedKeysFile $d/authorized_keys
StrictModes no
UsePAM no
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
PubkeyAuthentication yes
LogLevel INFO
EOF
  mkdir -p /run/sshd # privilege separation; packages create it at boot only
  /usr/sbin/sshd -D -e -f "$d/sshd_config" 2>"$d/sshd.log" &
  SSHD_PID=$!
  wait_for_line "$d/sshd.log" 'Server listening on 127\.0\.0\.1' 15 ||
    { cat "$d/sshd.log" >&2; die "sshd did not start"; }
  user=$(id -un)
  printf '[127.0.0.1]:%s %s\n' "$port" "$(cut -d' ' -f1,2 "$d/host_key.pub")" >"$d/known_hosts"
  SSH_OPTS=(-p "$port" -i "$d/client_key" -o BatchMode=yes -o StrictHostKeyChecking=yes
    -o UserKnownHostsFile="$d/known_hosts" -o LogLevel=ERROR "$user@127.0.0.1")
  ssh "${SSH_OPTS[@]}" true || die "cannot log in to the sshd on $port"
  SSH_CIPHER=$(ssh -G "${SSH_OPTS[@]}" 2>/dev/null | awk '$1 == "ciphers" { split($2, c, ","); print c[1] }')
  log "sshd on 127.0.0.1:$port (pid $SSHD_PID), as $user, cipher $SSH_CIPHER"
}
# One run; prints seconds. The first run of a tree also checks the copy is complete.
ssh_once() {
  local tree=$1 check=$2 d t0 t1 want got
  d=$(mktemp -d "${SSH_DEST:-$WORK}/lcb-ssh-dest.XXXXXX")
  t0=$EPOCHREALTIME
  tar c -C "$tree" . | timeout "$STEP_TIMEOUT" ssh "${SSH_OPTS[@]}" "tar x -C '$d'"
  t1=$EPOCHREALTIME
  if [[ $check == 1 ]]; then
    want=$(tree_counts "$tree"); got=$(tree_counts "$d")
    [[ $want == "$got" ]] || die "tar | ssh copied $got (files, bytes), the tree has $want"
  fi
  rm -rf "$d"
  sub "$t1" "$t0"
}

# ---------------------------------------------------------------------------------------
# (c) lian.
NATS_URL=""
start_fleet() {
  UP_STATE=$(mktemp -d "$WORK/s.XXXXXX")
  : >"$WORK/lian.toml"
  # From a directory of its own, so no lian.toml of the caller's is read.
  (cd "$WORK" && exec "$LIAN" --config "$WORK/lian.toml" up --nats-port 0 --state-dir "$UP_STATE" \
    --catalog "$REPO/examples/catalog" >"$UP_STATE.up.log" 2>&1) &
  UP_PID=$!
  if ! wait_for_line "$UP_STATE.up.log" '^Ctrl-C stops everything' 60; then
    cat "$UP_STATE.up.log" >&2; die "lian up did not start"
  fi
  NATS_URL=$(awk '$1 == "nats" { print $2; exit }' "$UP_STATE.up.log")
  local w
  for w in 1 2; do
    wait_for_line "$UP_STATE/logs/worker-$w.log" 'serving build requests' 60 ||
      { tail -20 "$UP_STATE/logs/worker-$w.log" >&2; die "worker-$w did not start"; }
  done
}
stop_fleet() {
  [[ -n $UP_PID ]] || return 0
  # lian up's own child is the shell that exec'd lian; SIGTERM stops the fleet in order.
  kill -TERM "$UP_PID" 2>/dev/null || true
  # Bounded: each of its children gets 10 s before SIGKILL.
  timeout 90 tail --pid="$UP_PID" -f /dev/null || { log "lian up did not stop in 90 s; killing it"; kill -KILL "$UP_PID" 2>/dev/null || true; }
  wait "$UP_PID" 2>/dev/null || true
  UP_PID=""
}
lian_client() { "$LIAN" --config "$WORK/lian.toml" --nats-url "$NATS_URL" "$@"; }
epoch_of() { date -d "$1" +%s.%N; }
# One cold run on a fresh fleet; writes RESULT_FILE: "ok<TAB>seconds<TAB>upload_s<TAB>leased_s
# <TAB>files<TAB>bytes<TAB>staging_s" (staging_s: the worker's `seconds` in context_synced) or
# "fail<TAB>reason". Runs in this shell (not in $(...)), so the exit
# trap knows the fleet and the submit it started.
lian_once() {
  local t=$1 tree=$2 run=$3 result=$4 dir=$WORK/lian-$t-$run t0 id synced at line reasons up_done
  mkdir -p "$dir"
  cat >"$dir/directives.ncl" <<EOF
let D = import "defaults/build_directives.ncl" in
D.make_ci_build {
  workspace = "lian-bench",
  artifact = { image = "lian-bench/ctx-$t:latest", dockerfile = "$BENCH_DOCKERFILE", language = 'other },
}
EOF
  start_fleet
  mkfifo "$dir/out.fifo" "$dir/err.fifo"
  stamp <"$dir/out.fifo" >"$dir/submit.out" &
  STAMP_PIDS=($!)
  stamp <"$dir/err.fifo" >"$dir/submit.err" &
  STAMP_PIDS+=($!)
  t0=$EPOCHREALTIME
  "$LIAN" --config "$WORK/lian.toml" --nats-url "$NATS_URL" submit "$dir/directives.ncl" --context "$tree" \
    --wait --json --timeout "$LIAN_TIMEOUT" </dev/null >"$dir/out.fifo" 2>"$dir/err.fifo" &
  SUBMIT_PID=$!
  # The transfer ends with context_synced; a build that cannot get there ends failed; submit
  # itself gives up after --timeout. Whichever comes first.
  wait_for_line "$dir/submit.out" '"type":"(context_synced|failed|completed)"' "$((LIAN_TIMEOUT + 30))" || true
  id=$(grep -m1 -o '"build_id":"[^"]*"' "$dir/submit.out" | cut -d'"' -f4 || true)
  synced=$(grep -m1 '"type":"context_synced"' "$dir/submit.out" || true)
  if [[ -n $synced && -n $id ]]; then
    lian_client cancel "$id" --reason "context benchmark: only the transfer is measured" >/dev/null 2>&1 || true
  fi
  # submit --wait ends when the build does (cancelled, failed, or its own --timeout).
  timeout "$((LIAN_TIMEOUT + 60))" tail --pid="$SUBMIT_PID" -f /dev/null || kill "$SUBMIT_PID" 2>/dev/null || true
  wait "$SUBMIT_PID" 2>/dev/null || true
  SUBMIT_PID=""
  # The two readers end at the fifos' end of file, i.e. when submit has exited.
  wait "${STAMP_PIDS[@]}" 2>/dev/null || true
  STAMP_PIDS=()
  if [[ -n $synced ]]; then
    line=$(printf '%s\n' "$synced" | cut -d' ' -f2-)
    at=$(jq -r .at <<<"$line")
    local leased files bytes
    up_done=$(grep -m1 '^[0-9.]* context ' "$dir/submit.err" | cut -d' ' -f1 || true)
    leased=$(grep -m1 '"type":"runner_leased"' "$dir/submit.out" | cut -d' ' -f2- | jq -r .at || true)
    files=$(jq -r .files <<<"$line"); bytes=$(jq -r .bytes <<<"$line")
    printf 'ok\t%s\t%s\t%s\t%s\t%s\t%s\n' "$(sub "$(epoch_of "$at")" "$t0")" \
      "$([[ -n $up_done ]] && sub "$up_done" "$t0" || echo -)" \
      "$([[ -n $leased && $leased != null ]] && sub "$(epoch_of "$leased")" "$t0" || echo -)" "$files" "$bytes" \
      "$(jq -r '.seconds // "-"' <<<"$line")" >"$result"
  else
    # Why: the step failures and the end, as the build's history says, and submit's own words.
    reasons=$(cut -d' ' -f2- "$dir/submit.out" | jq -r 'select(.type == "step_failed" or .type == "failed") |
        .reason // .step // ""' 2>/dev/null | sort -u | paste -sd ';' || true)
    [[ -n $reasons ]] || reasons="no context_synced and no failure within ${LIAN_TIMEOUT} s"
    up_done=$(grep -m1 '^[0-9.]* context ' "$dir/submit.err" || true)
    if [[ -n $up_done ]]; then
      reasons="$reasons; upload done at $(sub "${up_done%% *}" "$t0") s: ${up_done#* }"
    else
      reasons="$reasons; submit: $(cut -d' ' -f2- "$dir/submit.err" | tail -2 | paste -sd ' ')"
    fi
    # The workers' own words (the events only say where the build stopped), most frequent first.
    local why
    why=$(cat "$UP_STATE"/logs/worker-*.log 2>/dev/null | sed 's/\x1b\[[0-9;]*m//g' | grep -E 'ERROR|WARN' |
      sed -E 's/^[0-9TZ:.-]+ +//; s/[0-9a-z]{26}/<id>/g' | cut -c1-200 | sort | uniq -c | sort -rn | head -3 |
      sed 's/^ *//' | paste -sd ';' || true)
    [[ -z $why ]] || reasons="$reasons; worker logs (count, line): $why"
    printf 'fail\t%s\n' "$(tr '|\n' '/ ' <<<"$reasons" | cut -c1-1500)" >"$result"
  fi
  cp "$UP_STATE"/logs/worker-*.log "$dir/" 2>/dev/null || true
  stop_fleet
  unmount_under "$UP_STATE"
  rm -rf "$UP_STATE" "$UP_STATE.up.log" 2>/dev/null || log "could not remove $UP_STATE"
}

# ---------------------------------------------------------------------------------------
prepare_trees
has docker "$WAYS" && docker_check
has ssh "$WAYS" && start_sshd
if has lian "$WAYS"; then
  [[ -x $LIAN ]] || die "$LIAN not found: cargo build --bin lian (or LIAN=path)"
fi

REPORT=$WORK/report.md
ROWS=$WORK/rows.md
>"$ROWS"

for t in ripgrep synth; do
  [[ -n ${TREE_DIR[$t]:-} ]] || continue
  tree=${TREE_DIR[$t]}
  IFS=$'\t' read -r nfiles nbytes < <(tree_counts "$tree")
  ndirs=$(find "$tree" -type d | wc -l)
  size="$nfiles files, $((nbytes / 1000000)) MB"
  log "$t: $tree ($size, $ndirs directories)"
  : >"$WORK/docker-$t.tsv"; : >"$WORK/ssh-$t.tsv"; : >"$WORK/lian-$t.tsv"
  lian_failed=""
  # The ways take turns run by run (docker, ssh, lian, docker, ...), so a drift of the
  # machine (other jobs, the disk's write budget) falls on all of them alike; `sync` before
  # each run, so no run pays for the writeback of the one before.
  for run in $(seq 1 "$RUNS"); do
    if has docker "$WAYS"; then
      sync
      r=$(docker_once "$tree" "$WORK/docker-$t-$run.log")
      log "$t docker run $run: $(cut -f1 <<<"$r") s to the first step (BuildKit: context loaded in $(cut -f2 <<<"$r") s, $(cut -f3 <<<"$r"))"
      printf '%s\n' "$r" >>"$WORK/docker-$t.tsv"
    fi
    if has ssh "$WAYS"; then
      sync
      r=$(ssh_once "$tree" "$([[ $run == 1 ]] && echo 1 || echo 0)")
      log "$t tar | ssh run $run: $r s"
      printf '%s\n' "$r" >>"$WORK/ssh-$t.tsv"
    fi
    if has lian "$WAYS" && [[ -z $lian_failed ]]; then
      sync
      log "$t lian run $run: fresh fleet, submit (bounded by ${LIAN_TIMEOUT} s)"
      lian_once "$t" "$tree" "$run" "$WORK/lian-result"
      r=$(cat "$WORK/lian-result")
      if [[ $(cut -f1 <<<"$r") == ok ]]; then
        log "$t lian run $run: context_synced after $(cut -f2 <<<"$r") s (upload done $(cut -f3 <<<"$r") s, runner leased $(cut -f4 <<<"$r") s; $(cut -f5 <<<"$r") files, $(cut -f6 <<<"$r") bytes; the worker staged it in $(cut -f7 <<<"$r") s)"
        printf '%s\n' "$(cut -f2- <<<"$r")" >>"$WORK/lian-$t.tsv"
      else
        lian_failed=$(cut -f2- <<<"$r")
        log "$t lian run $run: FAILED: $lian_failed"
        log "$t lian: not repeated (a build that cannot sync this context fails the same way again)"
      fi
    fi
  done

  best=""
  if has docker "$WAYS"; then
    best=$(cut -f1 "$WORK/docker-$t.tsv" | median)
    printf '| %s (%s) | docker build, start to first step | %s | %s | BuildKit load build context %s s; sent %s |\n' \
      "${TREE_DESC[$t]}" "$size" "$RUNS" "$(cut -f1 "$WORK/docker-$t.tsv" | stats)" \
      "$(cut -f2 "$WORK/docker-$t.tsv" | paste -sd, -)" "$(cut -f3 "$WORK/docker-$t.tsv" | head -1)" >>"$ROWS"
  fi
  if has ssh "$WAYS"; then
    m=$(median <"$WORK/ssh-$t.tsv")
    if [[ -z $best ]] || awk -v a="$m" -v b="$best" 'BEGIN { exit !(a < b) }'; then best=$m; fi
    printf '| %s (%s) | tar c \\| ssh tar x (%s) | %s | %s | runs in order: %s s; new connection each run |\n' \
      "${TREE_DESC[$t]}" "$size" "$SSH_CIPHER" "$RUNS" "$(stats <"$WORK/ssh-$t.tsv")" \
      "$(paste -sd, "$WORK/ssh-$t.tsv")" >>"$ROWS"
  fi
  if has lian "$WAYS"; then
    if [[ -n $lian_failed ]]; then
      printf '| %s (%s) | lian submit to context_synced | %s | **failed** | %s |\n' "${TREE_DESC[$t]}" "$size" \
        "$(wc -l <"$WORK/lian-$t.tsv") ok of $(($(wc -l <"$WORK/lian-$t.tsv") + 1))" "$lian_failed" >>"$ROWS"
    else
      m=$(cut -f1 "$WORK/lian-$t.tsv" | median)
      ratio=""
      [[ -n $best ]] && ratio=$(awk -v a="$m" -v b="$best" 'BEGIN { printf "; %.2fx the faster of docker and ssh (target <= 1.5x)", a / b }')
      printf '| %s (%s) | lian submit to context_synced | %s | %s | upload done at %s s, runner leased at %s s, worker staging %s s (medians)%s |\n' \
        "${TREE_DESC[$t]}" "$size" "$RUNS" "$(cut -f1 "$WORK/lian-$t.tsv" | stats)" \
        "$(cut -f2 "$WORK/lian-$t.tsv" | median)" "$(cut -f3 "$WORK/lian-$t.tsv" | median)" \
        "$(cut -f6 "$WORK/lian-$t.tsv" | median)" "$ratio" >>"$ROWS"
    fi
  fi
done

{
  echo "## Context transfer, cold ($(date -u +%Y-%m-%d), $(nproc) cores, $(uname -r))"
  echo
  echo "Command: \`scripts/bench/context.sh $ARGS\` (runs $RUNS, trees $TREES, ways $WAYS)"
  echo
  echo "| tree | way | runs | min / median / max | notes |"
  echo "| --- | --- | --- | --- | --- |"
  cat "$ROWS"
  echo
  echo "docker: $("$DOCKER" version --format 'client {{.Client.Version}}, engine {{.Server.Version}}'), DOCKER_BUILDKIT=1, --progress=plain;" \
    "time from starting \`docker build\` to the line of its first step (the plain printer's ticks make this" \
    "up to ~0.1 s late); the local-source cache pruned before each run."
  if has ssh "$WAYS"; then echo "ssh: $(ssh -V 2>&1), sshd on 127.0.0.1, cipher $SSH_CIPHER, tar x into $(df --output=fstype "${SSH_DEST:-$WORK}" | tail -1) (${SSH_DEST:-a temp dir on the disk})."; fi
  if has lian "$WAYS"; then echo "lian: $("$LIAN" --version) ($LIAN); a fresh fleet (empty object store) per run; the time is submit start to the context_synced event's \`at\`."; fi
} >"$REPORT"
cat "$REPORT"
if [[ -n $OUT ]]; then cp "$REPORT" "$OUT"; log "report written to $OUT"; fi
