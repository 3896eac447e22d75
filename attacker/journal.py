"""The answers journal: every answered request of a run, on disk before the run counts it.

``RUN/answers.journal`` is append-only: one record per answered request (the
images sent and the answers received, with the query count at which the request
started: the images paid for before it), written and flushed to the operating system, and ``fsync``'d, before
the meter counts the request and the ledger is rewritten. A run killed in any
way (Ctrl-C, a crash, SIGKILL) has on disk every answer it was charged for,
except at most the one request whose answer was arriving at the kill (the
server's count finds that one: ``lost_queries``).

The checkpoint covers everything before it, so the loop empties the journal
after each checkpoint; records older than the checkpoint (a kill between the two)
are skipped by their start count. On ``--resume`` the attack restarts from the
checkpoint and its requests are answered from the journal, in order, as long as
they are the images of the journal (exactly, or within :data:`IMAGE_TOLERANCE`):
the resumed training is the one the uninterrupted run would have done, and no
answer is bought twice (:class:`~attacker.victims.BudgetedVictim`).

A record is ``MAGIC``, the lengths of a JSON header and of the payload, a CRC-32
of both, then the header (start, shapes, dtypes) and the raw little-endian
tensors. A record cut short by a kill fails its length or CRC check: it and
anything after it are dropped (the file is truncated there) when the journal is
read back.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from torch import Tensor

__all__ = ["IMAGE_TOLERANCE", "AnswerJournal", "JournalRecord"]

logger = logging.getLogger(__name__)

MAGIC = b"SSJ1"
_PREFIX = struct.Struct("<4sIQI")  # magic, header bytes, payload bytes, crc32(header + payload)

IMAGE_TOLERANCE = 1e-4
"""Largest pixel difference (pixels in [0, 1]; a 40th of an 8-bit grey level) at which a resumed
request still counts as the journal's: float rounding that differs between processes (another
thread count, a GPU) moves images by far less; a training that went elsewhere moves them by far more."""


@dataclass(frozen=True)
class JournalRecord:
    """One answered request: ``images`` sent at query count ``start``, and the ``answers``."""

    start: int
    images: Tensor
    answers: Tensor

    @property
    def count(self) -> int:
        return int(self.images.shape[0])

    @property
    def end(self) -> int:
        return self.start + self.count

    def matches(self, images: Tensor) -> bool:
        """Whether ``images`` are this record's (same shape; equal, or within :data:`IMAGE_TOLERANCE`)."""
        if tuple(images.shape) != tuple(self.images.shape):
            return False
        images = images.detach().to("cpu", torch.float32)
        if torch.equal(images, self.images):
            return True
        return bool((images - self.images).abs().max() <= IMAGE_TOLERANCE)


def _encode(tensor: Tensor) -> tuple[dict[str, object], bytes]:
    array = np.ascontiguousarray(tensor.detach().cpu().numpy())
    array = array.astype(array.dtype.newbyteorder("<"), copy=False)
    return {"shape": list(array.shape), "dtype": array.dtype.str}, array.tobytes()


def _decode(spec: dict[str, object], data: bytes) -> Tensor:
    shape = [int(n) for n in spec["shape"]]  # type: ignore[attr-defined]
    array = np.frombuffer(data, dtype=np.dtype(str(spec["dtype"]))).reshape(shape)
    return torch.from_numpy(array.astype(array.dtype.newbyteorder("="), copy=True))


class AnswerJournal:
    """Appends answered requests to ``path`` and reads them back (see the module docstring).

    Args:
        path: the journal file (created on the first append).
        fsync: ``fsync`` every record (survives a crash of the machine, not only of the
            process); off, a record is still flushed to the operating system at once.
    """

    def __init__(self, path: Path, fsync: bool = True) -> None:
        self.path = path
        self.fsync = fsync
        self._handle: BinaryIO | None = None

    def append(self, start: int, images: Tensor, answers: Tensor) -> None:
        """Write one record; it is on disk when this returns."""
        image_spec, image_bytes = _encode(images.to(torch.float32))
        answer_spec, answer_bytes = _encode(answers)
        header = json.dumps({"start": int(start), "images": image_spec, "answers": answer_spec}).encode()
        payload = image_bytes + answer_bytes
        prefix = _PREFIX.pack(MAGIC, len(header), len(payload), zlib.crc32(payload, zlib.crc32(header)))
        if self._handle is None:
            self._handle = self.path.open("ab", buffering=0)
        self._handle.write(prefix + header + payload)
        if self.fsync:
            os.fsync(self._handle.fileno())

    def clear(self) -> None:
        """Empty the journal (a checkpoint now covers every record in it)."""
        if self._handle is not None:
            os.ftruncate(self._handle.fileno(), 0)
        elif self.path.exists():
            self.path.write_bytes(b"")

    def keep_first(self, count: int) -> None:
        """Keep the first ``count`` records only (atomically: a new file renamed over the old)."""
        kept = self.read()[:count]
        self.close()
        temporary = self.path.with_name(f".{self.path.name}.tmp")
        temporary.unlink(missing_ok=True)
        writer = AnswerJournal(temporary, fsync=False)
        for record in kept:
            writer.append(record.start, record.images, record.answers)
        writer.close()
        temporary.touch()
        os.replace(temporary, self.path)

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def read(self, repair: bool = False) -> list[JournalRecord]:
        """Every complete record, in order; ``repair``: cut a torn tail (a kill mid-write) off the file
        (only when no process writes to it: a reader of a live run sees a record being written as torn)."""
        if not self.path.is_file():
            return []
        data = self.path.read_bytes()
        records: list[JournalRecord] = []
        offset = 0
        while offset + _PREFIX.size <= len(data):
            magic, header_size, payload_size, crc = _PREFIX.unpack_from(data, offset)
            body = offset + _PREFIX.size
            end = body + header_size + payload_size
            if magic != MAGIC or end > len(data):
                break
            header_bytes, payload = data[body:body + header_size], data[body + header_size:end]
            if zlib.crc32(payload, zlib.crc32(header_bytes)) != crc:
                break
            header = json.loads(header_bytes)
            image_size = int(np.prod(header["images"]["shape"])) * np.dtype(header["images"]["dtype"]).itemsize
            records.append(JournalRecord(int(header["start"]), _decode(header["images"], payload[:image_size]),
                                         _decode(header["answers"], payload[image_size:])))
            offset = end
        if offset < len(data) and repair:
            logger.warning("%s: dropped %d bytes of a record cut short (the run was killed while writing it)",
                           self.path, len(data) - offset)
            with self.path.open("r+b") as handle:
                handle.truncate(offset)
        return records

    def answered_until(self) -> int:
        """The query count at the end of the last record (0 for an empty journal)."""
        records = self.read()
        return records[-1].end if records else 0
