#!/usr/bin/env python3
"""Submits a lian-build build with a context, as a client that is not lian: only nats-py and
what subjects.md documents ("Build contexts", `lian.<ws>.build.request`, the events).

    submit_with_context.py --nats-url nats://127.0.0.1:4222 --workspace ws \
        --image example/app:1 --context DIR [--build-id ID] [--timeout 300]

Stores the context in LIAN_CONTEXTS (chunked blobs for contents of 64 KiB or more, packs for
the others, markers, the manifest), publishes the request, waits (bounded) for the build's
`completed` or `failed` event and prints it as JSON; exit 0 on `completed`, 1 otherwise.
Then it computes the same context again and checks, with the batched direct get, that
nothing of it needs sending (a line `resubmit: 0 of N objects to send, 0 bytes`).

Contexts with a `.dockerignore` are refused: subjects.md asks the client to apply it as
BuildKit does, which this small client does not attempt.
"""

import argparse
import asyncio
import datetime
import hashlib
import json
import os
import secrets
import stat
import sys
import time

import nats
from nats.errors import TimeoutError as NatsTimeout

CHUNK = 262144  # a blob's messages: 256 KiB each but the last
LARGE = 65536  # contents of 64 KiB or more are blobs of their own; smaller ones go in packs
PACK_MAX = 262144  # a pack is one chunk
MULTI_LAST_MAX = 1024  # subjects in one batched direct get
MARKER_MAX_AGE = datetime.timedelta(days=6)
MAX_ENTRIES = 100_000
MAX_BYTES = 4 << 30
MAX_MANIFEST = 64 << 20
STREAMS = ("LIAN_CONTEXTS", "LIAN_REQUESTS", "LIAN_EVENTS")


class Refused(Exception):
    pass


def sha256(data):
    return hashlib.sha256(data).hexdigest()


def walk(root):
    """Manifest entries (without packs) and the contents by sha256."""
    if os.path.lexists(os.path.join(root, ".dockerignore")):
        raise Refused(".dockerignore: this client does not apply it; remove it or use `lian submit`")
    root = os.path.realpath(root)
    entries, contents = [], {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in sorted(dirnames + filenames):
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, root).replace(os.sep, "/")
            try:
                rel.encode("utf-8")
            except UnicodeEncodeError:
                raise Refused(f"{rel!r}: the name is not UTF-8")
            st = os.lstat(full)
            mode = stat.S_IMODE(st.st_mode)
            if stat.S_ISLNK(st.st_mode):
                target = os.readlink(full)
                resolved = os.path.normpath(os.path.join(os.path.dirname(full), target))
                if os.path.isabs(target) or not (resolved == root or resolved.startswith(root + os.sep)):
                    raise Refused(f"{rel}: a symlink leaving the context ({target})")
                entries.append({"path": rel, "kind": "symlink", "target": target})
            elif stat.S_ISDIR(st.st_mode):
                entries.append({"path": rel, "kind": "dir", "mode": mode})
            elif stat.S_ISREG(st.st_mode):
                with open(full, "rb") as f:
                    data = f.read()
                digest = sha256(data)
                contents[digest] = data
                entries.append({"path": rel, "kind": "file", "sha256": digest, "size": len(data), "mode": mode})
            else:
                raise Refused(f"{rel}: a FIFO, socket or device file")
    entries.sort(key=lambda e: e["path"])
    files = [e for e in entries if e["kind"] == "file"]
    total = sum(e["size"] for e in files)
    if len(entries) > MAX_ENTRIES:
        raise Refused(f"{len(entries)} entries, over the limit of {MAX_ENTRIES}")
    if total > MAX_BYTES:
        raise Refused(f"{total} bytes of file content, over the limit of {MAX_BYTES}")
    return entries, contents


def plan(root):
    """The blobs to store (sha256 -> bytes: large contents, packs, the manifest last), the
    manifest's name and the request's context counts."""
    entries, contents = walk(root)
    blobs = {}
    packs, pack, placed = [], bytearray(), {}
    for e in entries:  # sorted by path, so the same context gives the same packs
        if e["kind"] != "file":
            continue
        digest = e["sha256"]
        if e["size"] == 0:
            continue  # an empty file is stored nowhere: no pack, no blob
        if e["size"] >= LARGE:
            blobs[digest] = contents[digest]
            continue
        if digest not in placed:
            if len(pack) + e["size"] > PACK_MAX:
                packs.append(pack)
                pack = bytearray()
            placed[digest] = (len(packs), len(pack))
            pack += contents[digest]
    if pack:
        packs.append(pack)
    pack_names = []
    for p in packs:
        name = sha256(bytes(p))
        blobs[name] = bytes(p)
        pack_names.append(name)
    for e in entries:
        if e["kind"] == "file" and 0 < e["size"] < LARGE:
            index, offset = placed[e["sha256"]]
            e["pack"] = {"blob": pack_names[index], "offset": offset}
    manifest = json.dumps({"version": 2, "entries": entries}, separators=(",", ":")).encode()
    if len(manifest) > MAX_MANIFEST:
        raise Refused(f"a manifest of {len(manifest)} bytes, over the limit of {MAX_MANIFEST}")
    manifest_sha = sha256(manifest)
    blobs[manifest_sha] = manifest
    files = [e for e in entries if e["kind"] == "file"]
    return blobs, manifest_sha, len(files), sum(e["size"] for e in files)


def parse_nats_time(text):
    # RFC 3339 with up to nanoseconds: 2026-11-21T23:06:07.398234873Z
    text = text.strip().replace("Z", "+00:00")
    if "." in text:
        head, rest = text.split(".", 1)
        digits = rest[:len(rest) - len(rest.lstrip("0123456789"))]
        zone = rest[len(digits):]
        text = f"{head}.{digits[:6]}{zone}"
    return datetime.datetime.fromisoformat(text)


async def stored(nc, shas, timeout=10.0):
    """The shas among `shas` whose `lian-ctx.have.<sha>` marker exists and is not stale, by
    batched direct gets on LIAN_CONTEXTS (up to 1,024 subjects a request)."""
    have = set()
    shas = list(shas)
    now = datetime.datetime.now(datetime.timezone.utc)
    for start in range(0, len(shas), MULTI_LAST_MAX):
        part = shas[start:start + MULTI_LAST_MAX]
        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox)
        body = json.dumps({"multi_last": [f"lian-ctx.have.{s}" for s in part], "batch": len(part)})
        await nc.publish("$JS.API.DIRECT.GET.LIAN_CONTEXTS", body.encode(), reply=inbox)
        try:
            while True:
                msg = await sub.next_msg(timeout=timeout)
                headers = msg.headers or {}
                status = headers.get("Status")
                if status == "204" or status == "404":  # end of batch, or none exists
                    break
                if status:
                    raise RuntimeError(f"direct get answered {status} {headers.get('Description', '')}")
                subject = headers["Nats-Subject"]
                stamp = headers.get("Nats-Time-Stamp")
                if stamp and now - parse_nats_time(stamp) > MARKER_MAX_AGE:
                    continue  # stale: send again
                have.add(subject.rsplit(".", 1)[1])
        finally:
            await sub.unsubscribe()
    return have


async def wait_for_streams(js, within=60.0):
    """The streams are created by lian's own commands (a worker, `lian submit`); a foreign
    client only uses them. Waits, bounded, until they exist."""
    deadline = time.monotonic() + within
    for name in STREAMS:
        while True:
            try:
                await js.stream_info(name)
                break
            except Exception as err:  # not found yet, or JetStream not answering yet
                if time.monotonic() > deadline:
                    raise RuntimeError(f"stream {name} does not exist after {within:.0f} s "
                                       f"(is a lian worker running on this server?): {err}")
                await asyncio.sleep(0.2)


async def upload(js, nc, blobs, manifest_sha):
    """Stores every blob whose marker is missing; returns the file content bytes sent (large
    contents and packs, not the manifest: the request's `sent_bytes`) and how many objects."""
    have = await stored(nc, blobs.keys())
    sent = 0
    for digest, data in blobs.items():
        if digest in have:
            continue
        chunks = max(1, -(-len(data) // CHUNK))
        for index in range(chunks):
            await js.publish(f"lian-ctx.blob.{digest}.{index}", data[index * CHUNK:(index + 1) * CHUNK])
        await js.publish(f"lian-ctx.have.{digest}", b"")
        if digest != manifest_sha:
            sent += len(data)
    return sent, len(blobs) - len(have)


async def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nats-url", required=True)
    ap.add_argument("--workspace", required=True)
    ap.add_argument("--image", required=True)
    ap.add_argument("--context", required=True)
    ap.add_argument("--build-id", default="py-" + secrets.token_hex(8))
    ap.add_argument("--timeout", type=float, default=300.0)
    args = ap.parse_args()
    ws, build = args.workspace, args.build_id

    try:
        blobs, manifest_sha, files, total = plan(args.context)
    except Refused as err:
        print(f"context refused: {err}", file=sys.stderr)
        return 2

    nc = await nats.connect(args.nats_url)
    js = nc.jetstream()
    try:
        await wait_for_streams(js)
        sent, objects = await upload(js, nc, blobs, manifest_sha)
        print(f"upload: {objects} of {len(blobs)} objects sent, {sent} bytes", file=sys.stderr)
        # lian-ctx.last.<token>: the workspace's latest manifest, for clients reusing packs.
        token = sha256(ws.encode())[:16]
        await js.publish(f"lian-ctx.last.{token}", f"manifest-{manifest_sha}".encode())

        events = await nc.subscribe(f"lian.{ws}.build.{build}.*")
        request = {
            "build_id": build,
            "directives": {
                "workspace": ws,
                "artifact": {"image": args.image, "dockerfile": "Dockerfile", "build_args": {}, "language": "other"},
                "compute_provider": "docker_local",
                "registry_provider": "zot",
                "cache_policy": {"actor": "ci", "cache_from": [], "cache_to": []},
            },
            "context": {"manifest": f"manifest-{manifest_sha}", "files": files, "bytes": total, "sent_bytes": sent},
        }
        ack = await js.publish(f"lian.{ws}.build.request", json.dumps(request).encode(),
                               headers={"Nats-Msg-Id": build})
        print(f"request: build {build}, stream {ack.stream} seq {ack.seq}", file=sys.stderr)

        deadline = time.monotonic() + args.timeout
        terminal = None
        while terminal is None:
            left = deadline - time.monotonic()
            if left <= 0:
                print(f"build {build}: no completed or failed event within {args.timeout:.0f} s", file=sys.stderr)
                return 1
            try:
                msg = await events.next_msg(timeout=left)
            except NatsTimeout:
                continue
            event = json.loads(msg.data)
            print(f"event: {event.get('type')}", file=sys.stderr)
            if event.get("type") in ("completed", "failed"):
                terminal = event
        await events.unsubscribe()
        print(json.dumps(terminal))

        # The same context again: every object is already stored, nothing to send.
        again, again_sha, _, _ = plan(args.context)
        resent, to_send = await upload(js, nc, again, again_sha)
        print(f"resubmit: {to_send} of {len(again)} objects to send, {resent} bytes", file=sys.stderr)
        if again_sha != manifest_sha or to_send or resent:
            print(f"resubmit sent {to_send} objects (manifest {again_sha} vs {manifest_sha})", file=sys.stderr)
            return 1
        return 0 if terminal["type"] == "completed" else 1
    finally:
        await nc.close()


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
