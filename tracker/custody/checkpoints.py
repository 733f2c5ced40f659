"""Signed checkpoints of the custody chains' heads, kept outside PostgreSQL.

A chain's records and its head live in PostgreSQL. Someone who can write it (without the key)
cannot alter, insert or reorder a record, but can delete a chain's newest records and put back an
older head with the tag that went with it (read earlier): every MAC still matches. So the heads are
anchored outside the database: every `TRACKER_CUSTODY_CHECKPOINT_S`, each instance appends the heads
of the chains it extended since its last checkpoint, one JSON line per org:

    {"org": "acme", "at": 1764240000000, "instance": "host:42",
     "heads": [["PKG-1", 3, "<head hex>"], ...], "sig": "<HMAC-SHA256 hex>"}

signed with the custody key (`chain.checkpoint_sig`), appended and fsync'd. `/verify` compares a
chain with the longest signed checkpoint of its package (`chain.against_checkpoint`): lines that do
not parse (a write cut by a crash) or whose signature fails (written without the key) are skipped;
skipping cannot hide a truncation, since the longest genuine checkpoint wins.

Layout: `<dir>/<org>/<instance>.jsonl`, names percent-encoded: one writer per file, so appends of
several instances never interleave. In production the directory is a mount of an object store
with a retention lock (write once, read many): whoever can delete these files can delete the anchor
(SECURITY.md).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import quote

import orjson

from ..clock import now_ms
from . import chain

log = logging.getLogger("tracker.custody.checkpoints")

Heads = dict[str, dict[str, tuple[int, bytes]]]  # org -> package -> (length, head)


def _name(value: str) -> str:
    encoded = quote(value, safe="").replace(".", "%2E")  # never "." nor ".."
    return encoded if len(encoded) <= 200 else "h-" + hashlib.sha256(value.encode()).hexdigest()


class Checkpoints:
    def __init__(self, folder: Path, key: bytes, instance: str) -> None:
        self.folder, self.key, self.instance = folder, key, instance
        self._dirty: Heads = {}

    def note(self, heads: Mapping[tuple[str, str], tuple[int, bytes]]) -> None:
        """Heads this instance committed (after the commit). Never awaits."""
        for (org, package), (length, head) in heads.items():
            known = self._dirty.setdefault(org, {})
            if package not in known or known[package][0] < length:
                known[package] = (length, head)

    async def flush(self) -> int:
        """Append one signed line per org with new heads (file I/O in a thread); the heads stay
        pending if the write fails. Returns the lines written."""
        batch = self.take()
        if not batch:
            return 0
        try:
            return await asyncio.to_thread(self.write, batch, now_ms())
        except OSError as exc:
            log.error("cannot write custody checkpoints to %s: %s (retrying)", self.folder, exc)
            for org, heads in batch.items():  # `note` keeps the longer of these and any noted meanwhile
                self.note({(org, package): head for package, head in heads.items()})
            return 0

    def write(self, batch: Heads, at: int) -> int:
        """Blocking: append and fsync. Also called at shutdown, with nothing else to wait for."""
        for org, heads in batch.items():
            rows = [[package, length, head.hex()] for package, (length, head) in sorted(heads.items())]
            sig = chain.checkpoint_sig(self.key, org, at, self.instance, rows)
            line = {"org": org, "at": at, "instance": self.instance, "heads": rows, "sig": sig.hex()}
            self._append(self.folder / _name(org) / (_name(self.instance) + ".jsonl"), orjson.dumps(line) + b"\n")
        return len(batch)

    def take(self) -> Heads:
        """The heads noted since the last checkpoint (no longer pending)."""
        batch, self._dirty = self._dirty, {}
        return batch

    @staticmethod
    def _append(path: Path, data: bytes) -> None:
        new_dir, new_file = not path.parent.exists(), not path.exists()
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                data = b"\n" + data  # the last write was cut short: start a line of our own
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        for folder, created in ((path.parent, new_file), (path.parent.parent, new_dir)):
            if created:  # the new name itself must survive a crash too
                dir_fd = os.open(folder, os.O_RDONLY)
                try:
                    os.fsync(dir_fd)
                finally:
                    os.close(dir_fd)

    async def latest(self, org: str, package: str) -> tuple[int, bytes, int] | None:
        """The longest signed checkpoint of a package's chain: (length, head, at), or None."""
        return await asyncio.to_thread(self._latest, org, package)

    def _latest(self, org: str, package: str) -> tuple[int, bytes, int] | None:
        best: tuple[int, bytes, int] | None = None
        folder = self.folder / _name(org)
        if not folder.is_dir():
            return None
        needle = orjson.dumps(package)
        for path in sorted(folder.glob("*.jsonl")):
            with path.open("rb") as f:
                for raw in f:
                    entry = self._entry(raw, org, needle, package)
                    if entry is not None and (best is None or entry[0] > best[0]):
                        best = entry
        return best

    def _entry(self, raw: bytes, org: str, needle: bytes, package: str) -> tuple[int, bytes, int] | None:
        if needle not in raw:
            return None  # most lines: not worth parsing (nor checking)
        try:
            line = orjson.loads(raw)
            at, instance, rows = line["at"], line["instance"], line["heads"]
            sig = bytes.fromhex(line["sig"])
            if line["org"] != org:
                return None
            if not hmac.compare_digest(chain.checkpoint_sig(self.key, org, at, instance, rows), sig):
                log.warning("a custody checkpoint of %s is not signed by the custody key: ignored", org)
                return None
            found = [(int(n), bytes.fromhex(h)) for p, n, h in rows if p == package]
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            return None  # a line cut short by a crash
        return (found[0][0], found[0][1], int(at)) if found else None
