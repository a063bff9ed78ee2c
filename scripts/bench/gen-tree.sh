#!/usr/bin/env bash
# Generates a synthetic build context for the context benchmarks and tests (issue 15):
#
#   scripts/bench/gen-tree.sh DEST N [SEED]
#
# N regular files (e.g. 20000) spread over nested directories (1 to 3 levels, about 10 files
# per directory), sizes log-uniform between 32 B and 32 KiB, every 500th file between 256 KiB
# and 1 MiB, every 997th empty; text content from a seeded generator (the same N and SEED
# give byte-identical trees on any machine: the generator is Park-Miller in awk, integer-exact
# in doubles, LC_ALL=C). Plus what a context must carry faithfully: empty directories (one
# nested), an executable script (0755), a 0600 and a 0640 file, a symlink to a file and one to
# a directory, and a `Dockerfile` that needs no parent image (`FROM scratch`, `COPY . /ctx`),
# so the image's /ctx can be compared with DEST.
#
# With N around 20000 the tree holds about 100 MB. DEST must not exist or be empty, or be a
# tree this script made with the same N and SEED (then nothing is done). Prints the counts.
set -euo pipefail

usage() { echo "usage: $0 DEST N [SEED]" >&2; exit 2; }
[[ $# -ge 2 && $# -le 3 ]] || usage
DEST=$1
N=$2
SEED=${3:-1}
[[ $N =~ ^[0-9]+$ && $N -ge 1 ]] || { echo "$0: N must be a positive integer" >&2; exit 2; }
[[ $SEED =~ ^[0-9]+$ && $SEED -ge 1 && $SEED -lt 2147483647 ]] ||
  { echo "$0: SEED must be an integer in 1..2147483646" >&2; exit 2; }

STAMP_NAME=.lian-bench-tree
STAMP="format=1 files=$N seed=$SEED"

summary() {
  local files dirs links empty bytes
  files=$(find "$DEST" -type f | wc -l)
  dirs=$(find "$DEST" -type d | wc -l)
  links=$(find "$DEST" -type l | wc -l)
  empty=$(find "$DEST" -type d -empty | wc -l)
  bytes=$(find "$DEST" -type f -printf '%s\n' | awk '{s += $1} END {print s + 0}')
  echo "synthetic tree at $DEST ($STAMP): $files files, $dirs directories ($empty empty)," \
    "$links symlinks, $bytes bytes of file content ($((bytes / 1000000)) MB)"
}

if [[ -d $DEST ]] && [[ -n $(ls -A "$DEST") ]]; then
  if [[ -f $DEST/$STAMP_NAME && $(cat "$DEST/$STAMP_NAME") == "$STAMP" ]]; then
    summary
    exit 0
  fi
  echo "$0: $DEST exists and is not a tree made with N=$N SEED=$SEED; remove it or choose another DEST" >&2
  exit 1
fi
mkdir -p "$DEST"
DEST=$(cd "$DEST" && pwd)

tmp=$(mktemp -d)
done_ok=0
cleanup() {
  rm -rf "$tmp"
  # A half-written tree would pass for a complete one on the next run: remove it.
  if [[ $done_ok -ne 1 ]]; then rm -rf "$DEST"; fi
}
trap cleanup EXIT

export LC_ALL=C

# 1. The plan: one line per file, "path<TAB>size", and the directories it needs.
awk -v n="$N" -v seed="$SEED" '
  function rnd() { state = (state * 16807) % 2147483647; return state }
  BEGIN {
    state = seed
    split("rs toml md txt json c h", exts, " ")
    for (i = 0; i < n; i++) {
      u = rnd() / 2147483647
      if (i % 997 == 996) size = 0
      else if (i % 500 == 499) size = int(262144 * 4 ^ u)
      else size = int(32 * 1024 ^ u)
      # Depth 1, 2 or 3; about 10 files per directory.
      a = sprintf("d%02d", i % 20); b = sprintf("s%02d", int(i / 20) % 10); c = sprintf("t%02d", int(i / 200) % 10)
      k = rnd() % 10
      if (k == 0) dir = a
      else if (k < 3) dir = a "/" b
      else dir = a "/" b "/" c
      printf "%s/f%06d.%s\t%d\n", dir, i, exts[1 + rnd() % 7], size
    }
  }' >"$tmp/plan"
cut -f1 "$tmp/plan" | sed 's:/[^/]*$::' | sort -u | (cd "$DEST" && xargs mkdir -p)

# 2. The content: a pool of 4096 pseudo-random 63-character lines, each file a header naming
# it (so no two files are equal) and then pool lines picked at random, cut to its size.
awk -F '\t' -v seed="$SEED" -v dest="$DEST" '
  function rnd() { state = (state * 16807) % 2147483647; return state }
  BEGIN {
    state = seed + 7919
    alpha = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 {}();=_-+*/<>,.:#\"!?&|"
    m = length(alpha)
    for (p = 0; p < 4096; p++) {
      s = ""
      for (j = 0; j < 63; j++) s = s substr(alpha, 1 + rnd() % m, 1)
      pool[p] = s "\n"
    }
  }
  {
    path = dest "/" $1; size = $2 + 0
    printf "" > path
    left = size
    if (left > 0) {
      h = "// lian-bench synthetic " $1 " seed " seed "\n"
      if (length(h) > left) h = substr(h, 1, left)
      printf "%s", h > path; left -= length(h)
    }
    while (left > 0) {
      l = pool[rnd() % 4096]
      if (length(l) > left) l = substr(l, 1, left)
      printf "%s", l > path; left -= length(l)
    }
    close(path)
  }' "$tmp/plan"

# 3. What a context must carry besides regular files.
mkdir -p "$DEST/empty" "$DEST/d00/empty-nested/deeper"
printf '#!/bin/sh\necho "lian-bench tree %s"\n' "$STAMP" >"$DEST/run.sh"
chmod 0755 "$DEST/run.sh"
printf 'private\n' >"$DEST/d01/secret-0600.txt"
chmod 0600 "$DEST/d01/secret-0600.txt"
printf 'group-readable\n' >"$DEST/d01/group-0640.txt"
chmod 0640 "$DEST/d01/group-0640.txt"
first=$(head -n1 "$tmp/plan" | cut -f1)
ln -s "$first" "$DEST/link-to-file"
ln -s d02/s00 "$DEST/link-to-dir"
cat >"$DEST/Dockerfile" <<'EOF'
# lian-bench synthetic tree: no parent image to pull; /ctx is the context as the builder saw it.
FROM scratch
COPY . /ctx
EOF
printf '%s\n' "$STAMP" >"$DEST/$STAMP_NAME"

done_ok=1
summary
