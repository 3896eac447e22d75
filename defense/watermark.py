"""DAWN: watermark the answers of a few queries per client, then prove a clone was stolen.

Szyller, Atli, Marchal, Asokan (2021), "DAWN: Dynamic Adversarial Watermarking of
Neural Networks", ACM Multimedia. The API answers a small, secret fraction ``r``
of each client's queries with a wrong label and records them. A clone trained
on the answers learns these wrong labels; an independently trained model does
not. Selection and wrong label come from a keyed hash of the input (Sec. 4.1):
the same input always gets the same answer, so re-asking reveals nothing, and
without the secret a client cannot tell which answers were marked::

    h = HMAC-SHA256(secret, client || input bytes)
    marked      <=>  h[0:8] / 2^64 < r
    wrong label  =   (top + 1 + h[8:16] mod (K - 1)) mod K        (never the top class)

Probability answers are marked by swapping the probabilities of the top class
and the wrong label (``mode: swap``; the rest of the vector, and so most of what
a distilling thief learns, is unchanged) or by a one-hot of the wrong label
(``mode: one_hot``, DAWN's label answer).

Verification (our test, not DAWN's fixed accuracy threshold, which it leaves to
the verifier): for ``n`` distinct marked inputs, count the ``m`` on which the
suspect predicts the watermark label. The watermark label is uniform over the
``K - 1`` labels other than the victim's and independent of any model trained
without the answers, so for such a model ``P(prediction = watermark) <= 1/(K - 1)``
on every input, and ``m`` is stochastically smaller than ``Binomial(n, 1/(K - 1))``.
The one-sided p-value ``P(Binomial(n, 1/(K - 1)) >= m)`` is therefore valid
(conservative) against every innocent model.

:func:`verify_suspects` is ``stealsim verify-watermark``: it reads a key's record
from a file or fetches it from the victim service (:class:`ServedRecord`), tests
each suspect and reports the verdicts as JSON rows or a markdown table.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from scipy import stats

__all__ = [
    "ServedRecord",
    "WatermarkRecord",
    "WatermarkReport",
    "WatermarkVerdict",
    "load_suspect",
    "mark",
    "select",
    "verify",
    "verify_suspects",
]

WatermarkMode = Literal["swap", "one_hot"]
_TWO_64 = float(2**64)


def _digests(secret: bytes, client: str, images: np.ndarray) -> list[bytes]:
    flat = np.ascontiguousarray(images.reshape(len(images), -1), dtype=np.float32)
    prefix = client.encode() + b"\x00"
    return [hmac.new(secret, prefix + row.tobytes(), hashlib.sha256).digest() for row in flat]


def select(secret: bytes, client: str, images: np.ndarray, top: np.ndarray, fraction: float,
           classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Which rows to mark (bool ``[N]``) and each row's watermark label (int64 ``[N]``, never ``top``)."""
    digests = _digests(secret, client, images)
    draw = np.array([int.from_bytes(d[:8], "big") / _TWO_64 for d in digests])
    offset = np.array([int.from_bytes(d[8:16], "big") % (classes - 1) for d in digests], np.int64)
    return draw < fraction, (top.astype(np.int64) + 1 + offset) % classes


def mark(probabilities: np.ndarray, marked: np.ndarray, labels: np.ndarray, mode: WatermarkMode) -> np.ndarray:
    """The answers with the ``marked`` rows' arg-max moved to ``labels``."""
    answer = probabilities.copy()
    rows = np.flatnonzero(marked)
    if len(rows) == 0:
        return answer
    top = probabilities[rows].argmax(axis=1)
    wrong = labels[rows]
    if mode == "one_hot":
        answer[rows] = 0.0
        answer[rows, wrong] = 1.0
    else:
        answer[rows, top] = probabilities[rows, wrong]
        answer[rows, wrong] = probabilities[rows, top]
    return answer


@dataclass(frozen=True)
class WatermarkRecord:
    """The marked queries of one client on one model: what the server kept."""

    images: np.ndarray  # [M, C, H, W] float32
    labels: np.ndarray  # [M] int64: the watermark labels served
    victim_labels: np.ndarray  # [M] int64: the labels the model gave
    classes: int

    def __len__(self) -> int:
        return len(self.labels)

    def to_bytes(self) -> bytes:
        buffer = io.BytesIO()
        np.savez(buffer, allow_pickle=False, images=self.images, labels=self.labels,
                 victim_labels=self.victim_labels, classes=np.asarray([self.classes]))
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> WatermarkRecord:
        with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
            return cls(arrays["images"].astype(np.float32), arrays["labels"].astype(np.int64),
                       arrays["victim_labels"].astype(np.int64), int(arrays["classes"][0]))

    @classmethod
    def concatenate(cls, parts: list[WatermarkRecord], input_shape: tuple[int, ...], classes: int) -> WatermarkRecord:
        if not parts:
            return cls(np.empty((0, *input_shape), np.float32), np.empty(0, np.int64), np.empty(0, np.int64),
                       classes)
        return cls(np.concatenate([p.images for p in parts]), np.concatenate([p.labels for p in parts]),
                   np.concatenate([p.victim_labels for p in parts]), parts[0].classes)

    def distinct(self) -> WatermarkRecord:
        """One entry per distinct input (a re-asked input is not independent evidence)."""
        flat = self.images.reshape(len(self.images), -1)
        _, first = np.unique(flat, axis=0, return_index=True)
        keep = np.sort(first)
        return WatermarkRecord(self.images[keep], self.labels[keep], self.victim_labels[keep], self.classes)


@dataclass(frozen=True)
class WatermarkVerdict:
    marked: int
    """Distinct marked inputs tested."""
    matches: int
    """Inputs on which the suspect predicts the watermark label."""
    victim_agreement: float
    """Share of the marked inputs on which the suspect predicts the victim's own label."""
    null_rate: float
    """1/(K - 1): the most an innocent model matches the watermark label on average."""
    p_value: float
    alpha: float

    @property
    def match_rate(self) -> float:
        return self.matches / self.marked if self.marked else 0.0

    @property
    def stolen(self) -> bool:
        return self.p_value < self.alpha


def verify(record: WatermarkRecord, suspect_labels: np.ndarray, alpha: float = 1e-3) -> WatermarkVerdict:
    """Test whether a suspect's predictions ``[M]`` on ``record.images`` carry the watermark."""
    if len(suspect_labels) != len(record):
        raise ValueError(f"{len(suspect_labels)} predictions for {len(record)} marked inputs")
    n = len(record)
    matches = int(np.sum(suspect_labels == record.labels))
    null_rate = 1.0 / (record.classes - 1)
    p_value = float(stats.binom.sf(matches - 1, n, null_rate)) if n else 1.0
    agreement = float(np.mean(suspect_labels == record.victim_labels)) if n else 0.0
    return WatermarkVerdict(n, matches, agreement, null_rate, p_value, alpha)


def load_suspect(path: Path) -> Callable[[np.ndarray], np.ndarray]:
    """A suspected clone as ``images [N, C, H, W] -> labels [N]``.

    ``path``: a run directory of ``stealsim attack`` (its ``clone.ts``), a TorchScript
    file, or a checkpoint directory of ``stealsim train`` (``model.json``).
    """
    import torch

    from stealsim.checkpoint import META_FILE, load_checkpoint
    from stealsim.errors import ConfigError

    if path.is_dir() and (path / META_FILE).is_file():
        module, _ = load_checkpoint(path, "cpu")
    else:
        file = path / "clone.ts" if path.is_dir() else path
        if not file.is_file():
            raise ConfigError(f"{path}: neither a checkpoint directory (model.json), a run directory "
                              "with clone.ts, nor a TorchScript file")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                module = torch.jit.load(str(file), map_location="cpu")
        except (RuntimeError, ValueError) as exc:
            raise ConfigError(f"{file}: not a TorchScript model: {exc}") from exc
    module.eval()

    def predict(images: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            batches = [module(torch.from_numpy(np.ascontiguousarray(images[i : i + 512], np.float32)))
                       for i in range(0, len(images), 512)]
        return torch.cat(batches).argmax(dim=1).numpy() if batches else np.empty(0, np.int64)

    return predict


@dataclass(frozen=True)
class ServedRecord:
    """A key's watermark record held by a running victim service, fetched with the admin key."""

    url: str
    admin_key: str
    key_id: str
    model: str

    def fetch(self) -> bytes:
        """The record's ``.npz`` bytes (``GET /v1/admin/keys/{key_id}/watermark``)."""
        from stealsim.errors import APIRequestError, ConfigError
        from stealsim.service_client import ServiceClient

        try:
            with ServiceClient(self.url, self.admin_key, timeout=60.0) as service:
                return service.watermark_record(self.key_id, self.model)
        except APIRequestError as exc:
            if exc.status == 0:
                raise ConfigError(f"cannot reach {self.url}: {exc}") from exc
            raise ConfigError(f"fetching the watermark record failed: {exc}") from exc


@dataclass(frozen=True)
class WatermarkReport:
    """The verdict on each suspect, tested against one record's distinct marked inputs."""

    marked: int
    """Distinct watermarked inputs in the record."""
    alpha: float
    verdicts: tuple[tuple[Path, WatermarkVerdict], ...]

    def rows(self) -> list[dict[str, Any]]:
        """One JSON-ready row per suspect."""
        return [{"suspect": str(suspect), "marked": verdict.marked, "matches": verdict.matches,
                 "match_rate": verdict.match_rate, "victim_agreement": verdict.victim_agreement,
                 "null_rate": verdict.null_rate, "p_value": verdict.p_value, "stolen": verdict.stolen}
                for suspect, verdict in self.verdicts]

    def markdown(self) -> str:
        """A sentence on the test, then a markdown table of the verdicts (one line each, no final newline)."""
        rows = self.rows()
        lines = [f"{self.marked} distinct watermarked inputs; an innocent model matches at most "
                 f"{rows[0]['null_rate']:.3f} of them on average; verdict at p < {self.alpha:g}",
                 "| suspect | matches | match rate | victim agreement | p-value | verdict |",
                 "|---|---:|---:|---:|---:|---|"]
        lines += [f"| {row['suspect']} | {row['matches']}/{row['marked']} | {row['match_rate']:.3f} | "
                  f"{row['victim_agreement']:.3f} | {row['p_value']:.2e} | "
                  f"{'copy (watermark found)' if row['stolen'] else 'no evidence'} |" for row in rows]
        return "\n".join(lines)


def verify_suspects(suspects: Sequence[Path], record: Path | ServedRecord, alpha: float = 1e-3,
                    save_record: Path | None = None) -> WatermarkReport:
    """Test each suspect (see :func:`load_suspect`) for the watermark of ``record``: a ``.npz``
    file, or a record on the victim service (written to ``save_record`` when given)."""
    from stealsim.errors import ConfigError

    if isinstance(record, ServedRecord):
        data = record.fetch()
        if save_record is not None:
            save_record.write_bytes(data)
    else:
        data = record.read_bytes()
    try:
        marked = WatermarkRecord.from_bytes(data).distinct()
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"not a watermark record: {exc}") from exc
    if len(marked) == 0:
        raise ConfigError("the record holds no watermarked answers: nothing to verify")
    verdicts = tuple((suspect, verify(marked, load_suspect(suspect)(marked.images), alpha)) for suspect in suspects)
    return WatermarkReport(len(marked), alpha, verdicts)
