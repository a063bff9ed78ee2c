#!/usr/bin/env bash
# Prepares a real Rust project nobody here wrote, for the context (issue 15) and warm-build
# (issue 9) benchmarks: ripgrep 14.1.1 from static.crates.io, its dependencies vendored with
# `cargo vendor` and a `.cargo/config.toml` that makes `cargo build --offline` use them.
#
#   scripts/bench/fetch-ripgrep.sh DEST [CACHE_DIR]
#
# DEST ends up holding the unpacked crate (Cargo.toml, Cargo.lock, crates/, ...), vendor/ and
# .cargo/config.toml. CACHE_DIR (default $LIAN_BENCH_CACHE or $HOME/.cache/lian-bench) keeps
# the downloaded .crate file and cargo's own download cache, so a second run needs no network.
# Idempotent: every step is skipped when its result is already there (nothing is added to
# DEST beyond what the steps make, so the tree is exactly what a user would have). Prints the
# tree's file count and size.
#
# Network: static.crates.io (the tarball) and index.crates.io (the sparse index, for
# `cargo vendor`); the crates.io API host is not needed.
set -euo pipefail

VERSION=14.1.1

usage() { echo "usage: $0 DEST [CACHE_DIR]" >&2; exit 2; }
[[ $# -ge 1 && $# -le 2 ]] || usage
DEST=$1
CACHE=${2:-${LIAN_BENCH_CACHE:-$HOME/.cache/lian-bench}}
CRATE_URL="https://static.crates.io/crates/ripgrep/ripgrep-$VERSION.crate"
INDEX_URL="https://index.crates.io/ri/pg/ripgrep"

for tool in curl tar cargo sha256sum jq; do
  command -v "$tool" >/dev/null || { echo "$0: needs $tool on PATH" >&2; exit 1; }
done

mkdir -p "$CACHE"
CACHE=$(cd "$CACHE" && pwd)
tmp=""
cleanup() { [[ -n $tmp ]] && rm -rf "$tmp"; return 0; }
trap cleanup EXIT

summary() {
  local files dirs bytes
  files=$(find "$DEST" -type f | wc -l)
  dirs=$(find "$DEST" -type d | wc -l)
  bytes=$(find "$DEST" -type f -printf '%s\n' | awk '{s += $1} END {print s + 0}')
  echo "ripgrep $VERSION vendored at $DEST: $files files in $dirs directories," \
    "$bytes bytes of file content ($((bytes / 1000000)) MB, $((bytes / 1048576)) MiB)"
}

# The .crate's checksum as the sparse index records it (one JSON line per version).
verify_checksum() {
  local file=$1 want got
  want=$(curl -fsSL --max-time 60 "$INDEX_URL" | jq -r --arg v "$VERSION" 'select(.vers == $v) | .cksum' || true)
  got=$(sha256sum "$file" | cut -d' ' -f1)
  if [[ -z $want ]]; then
    echo "$0: warning: could not read the checksum from $INDEX_URL; not verified" >&2
  elif [[ $want != "$got" ]]; then
    echo "$0: $file: sha256 $got, the index says $want" >&2
    return 1
  fi
}

# 1. The tarball, downloaded once into the cache (atomically: a partial download never counts).
crate="$CACHE/ripgrep-$VERSION.crate"
if [[ ! -s $crate ]]; then
  tmp=$(mktemp -d "$CACHE/.download.XXXXXX")
  echo "downloading $CRATE_URL"
  curl -fsSL --retry 3 --max-time 300 -o "$tmp/ripgrep.crate" "$CRATE_URL"
  verify_checksum "$tmp/ripgrep.crate"
  mv "$tmp/ripgrep.crate" "$crate"
  rm -rf "$tmp"; tmp=""
fi

# 2. Unpacked into DEST (the .crate is a gzipped tar of ripgrep-$VERSION/).
if [[ ! -f $DEST/Cargo.toml ]]; then
  mkdir -p "$DEST"
  tar xzf "$crate" -C "$DEST" --strip-components=1
fi
DEST=$(cd "$DEST" && pwd)

# 3. Dependencies vendored. CARGO_HOME in the cache keeps the downloaded crates for the next
# run; the index and the crates come from index.crates.io / static.crates.io.
if [[ ! -d $DEST/vendor || ! -f $DEST/.cargo/config.toml ]]; then
  mkdir -p "$DEST/.cargo"
  echo "cargo vendor (downloads the dependencies once into $CACHE/cargo-home)"
  if ! (cd "$DEST" && CARGO_HOME="$CACHE/cargo-home" cargo vendor --locked vendor \
    >"$DEST/.cargo/config.toml.new" 2>"$CACHE/cargo-vendor.log"); then
    cat "$CACHE/cargo-vendor.log" >&2
    exit 1
  fi
  mv "$DEST/.cargo/config.toml.new" "$DEST/.cargo/config.toml"
fi

# 4. The tree builds offline: metadata resolves from vendor/ with no network.
# An empty CARGO_HOME proves nothing outside DEST is used.
mkdir -p "$CACHE/cargo-home-offline"
(cd "$DEST" && CARGO_HOME="$CACHE/cargo-home-offline" cargo metadata --offline --format-version 1 >/dev/null)
summary
