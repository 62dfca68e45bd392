"""Two model slots (A/B) on disk, a pointer to the live one, and the follower of a published champion.

Why two slots and a pointer: the agent must never score with a half-written model and must be
able to go back. A new champion is downloaded into the slot that is *not* live (through
:func:`core.files.atomic_directory`, so the slot is either the old complete folder or the new
complete folder), then checked:

1. :func:`core.contract.load_metadata` with ``verify_sha256`` (a truncated or corrupt download fails);
2. :meth:`core.scoring.Scorer.from_dir` (the graph's input shape must match the metadata: a model
   exported for another input size fails here);
3. parity: each reference image shipped with the champion (``reference.json``:
   ``{"images": [{"file": "reference/0.png", "score": 0.42}, ...]}``) must score within
   ``model.parity_tolerance`` of its expected score on this machine's ONNX Runtime.

Only then is ``current.json`` (``{"slot": "b", ...}``) replaced (temp + fsync + rename) and the
in-memory scorer swapped under a lock, between two images. A version that fails a check is
remembered in ``rejected.json`` (by the sha256 of its ``metadata.json``, which names the model's
sha256, so a re-published threshold is a new version too) and not tried again; a download whose
sha256 does not match (truncated, corrupt, or a publisher still copying) is never used and is
retried at the next poll, up to ``DOWNLOAD_ATTEMPTS`` times. After a switch,
``rollback_after_errors`` consecutive scoring failures put the previous slot back (it was left
untouched) and reject the new version. At start the pointer's slot is verified the same way; if it
fails, the other slot is used. The published folder is a local path or ``s3://bucket/prefix/``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from core.contract import METADATA_FILE, ModelMetadataError, load_metadata
from core.files import atomic_directory
from core.scoring import Scorer, ScoringError
from edge.config import ModelConfig
from edge.outbox import fsync_dir, write_durable

log = logging.getLogger("edge.models")
REFERENCE_FILE = "reference.json"
SLOTS = ("a", "b")
DOWNLOAD_ATTEMPTS = 3


class ModelRejected(RuntimeError):
    """A candidate model failed a check; the message says which."""


@dataclass(frozen=True)
class LiveModel:
    """The scorer in use and what names it in every result."""

    scorer: Scorer
    slot: str
    version: str
    sha256: str  # of the model file
    digest: str  # of metadata.json (names the model's sha256): a new threshold is a new version too


def write_reference(model_dir: Path, images: list[Path], scorer: Scorer | None = None) -> Path:
    """Publisher side: copy reference images into ``model_dir/reference/`` with their expected scores.

    The expected score is what this model gives them here; the agent checks it gets the same.
    """
    scorer = scorer or Scorer.from_dir(model_dir, intra_op_threads=1)
    folder = model_dir / "reference"
    folder.mkdir(exist_ok=True)
    entries = []
    for i, image in enumerate(images):
        target = folder / f"{i}{image.suffix.lower()}"
        shutil.copyfile(image, target)
        entries.append({"file": f"reference/{target.name}", "score": scorer.score(target.read_bytes()).score})
    path = model_dir / REFERENCE_FILE
    path.write_text(json.dumps({"images": entries}, indent=2), encoding="utf-8")
    return path


class _Source:
    """Read a published champion folder: local path or ``s3://bucket/prefix/``."""

    def __init__(self, uri: str, s3_client: Any = None) -> None:
        self.uri = uri
        self.s3 = s3_client
        if uri.startswith("s3://"):
            bucket, _, prefix = uri[5:].partition("/")
            self.bucket, self.prefix = (
                bucket,
                (prefix if not prefix or prefix.endswith("/") else prefix + "/"),
            )
            if self.s3 is None:
                import boto3
                from botocore.config import Config

                # Short timeouts: a poll while the network is down must not hang the follow thread.
                config = Config(connect_timeout=5, read_timeout=60, retries={"total_max_attempts": 2})
                self.s3 = boto3.client("s3", config=config)
        elif "://" in uri:
            raise ModelRejected(f"model.follow {uri!r}: only local folders and s3:// are supported")

    def read(self, name: str) -> bytes:
        if self.uri.startswith("s3://"):
            return self.s3.get_object(Bucket=self.bucket, Key=self.prefix + name)["Body"].read()
        return (Path(self.uri) / name).read_bytes()

    def download(self, target: Path, names: list[str]) -> None:
        for name in names:
            path = target / name
            path.parent.mkdir(parents=True, exist_ok=True)
            if self.uri.startswith("s3://"):
                self.s3.download_file(self.bucket, self.prefix + name, str(path))
            else:
                shutil.copyfile(Path(self.uri) / name, path)


class ModelManager:
    """Holds the live model; :meth:`install` verifies and switches; :meth:`poll` follows the champion."""

    def __init__(self, root: Path, config: ModelConfig, *, metrics: Any, s3_client: Any = None) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.config = config
        self.metrics = metrics
        self.s3_client = s3_client
        self._lock = threading.Lock()
        self._live: LiveModel | None = None
        self._previous: str | None = None  # slot to roll back to after a switch
        self._errors = 0
        self._failures: dict[str, int] = {}  # failed downloads per publication (metadata digest)
        self.last_check: dict[str, Any] = {}

    # -- state files ------------------------------------------------------------------------
    def _read_json(self, name: str, default: Any) -> Any:
        try:
            return json.loads((self.root / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return default

    def _write_json(self, name: str, data: Any) -> None:
        write_durable(self.root / name, json.dumps(data).encode())

    @property
    def rejected(self) -> set[str]:
        return set(self._read_json("rejected.json", []))

    def _reject(self, digest: str, reason: str) -> None:
        """Remember a metadata digest that failed, so the same publication is not tried again."""
        self._write_json("rejected.json", sorted(self.rejected | {digest}))
        self.metrics.inc("vi_edge_model_rejected_total")
        log.error("model rejected", extra={"metadata_sha256": digest, "reason": reason})

    # -- live model -------------------------------------------------------------------------
    @property
    def live(self) -> LiveModel:
        live = self._live
        if live is None:
            raise ScoringError("no model is installed yet")
        return live

    def start(self) -> LiveModel | None:
        """Load the pointer's slot (verified), else the other slot, else install ``model.dir``."""
        pointer = self._read_json("current.json", {})
        order = [pointer.get("slot")] if pointer.get("slot") in SLOTS else []
        order += [s for s in SLOTS if s not in order]
        for slot in order:
            try:
                live = self._verify(self.root / slot, slot)
            except (ModelRejected, ModelMetadataError, ScoringError, OSError) as exc:
                if slot == pointer.get("slot"):
                    log.error(
                        "live slot failed verification; trying the other",
                        extra={"slot": slot, "error": str(exc)},
                    )
                continue
            self._switch(live)
            return live
        if self.config.dir is not None:
            self.install(str(self.config.dir), require_reference=False)
        return self._live

    def _verify(
        self, folder: Path, slot: str, *, reference: bool = False, require_reference: bool | None = None
    ) -> LiveModel:
        if not (folder / METADATA_FILE).is_file():
            raise ModelRejected(f"{folder}: no model")
        meta = load_metadata(folder, verify_sha256=True)
        scorer = Scorer.from_dir(folder, verify_sha256=False, intra_op_threads=1)
        if reference:
            required = self.config.require_reference if require_reference is None else require_reference
            self._check_parity(folder, scorer, required)
        digest = hashlib.sha256((folder / METADATA_FILE).read_bytes()).hexdigest()
        return LiveModel(
            scorer=scorer, slot=slot, version=meta.registry_version, sha256=meta.model_sha256, digest=digest
        )

    def _check_parity(self, folder: Path, scorer: Scorer, required: bool) -> None:
        path = folder / REFERENCE_FILE
        if not path.is_file():
            if required:
                raise ModelRejected(f"{folder}: no {REFERENCE_FILE}: the champion must ship reference images")
            return
        try:
            images = json.loads(path.read_text(encoding="utf-8"))["images"]
        except (ValueError, KeyError, TypeError) as exc:
            raise ModelRejected(f"{path}: not a reference list ({exc})") from exc
        if not images and required:
            raise ModelRejected(f"{path}: lists no reference images")
        for ref in images:
            score = scorer.score((folder / ref["file"]).read_bytes()).score
            if abs(score - float(ref["score"])) > self.config.parity_tolerance:
                raise ModelRejected(
                    f"{ref['file']}: scores {score:.6f} here, {float(ref['score']):.6f} when published "
                    f"(tolerance {self.config.parity_tolerance})"
                )

    def _switch(self, live: LiveModel) -> None:
        with self._lock:
            self._previous = (
                self._live.slot if self._live and self._live.slot != live.slot else self._previous
            )
            self._live = live
            self._errors = 0
        self._write_json("current.json", {"slot": live.slot, "version": live.version, "digest": live.digest})
        self.metrics.set("vi_edge_model_version_info", 1, {"version": live.version, "slot": live.slot})
        log.info(
            "model live",
            extra={"slot": live.slot, "model_version": live.version, "model_sha256": live.sha256},
        )

    # -- updates ----------------------------------------------------------------------------
    def install(self, uri: str, *, require_reference: bool | None = None) -> LiveModel | None:
        """Download ``uri`` into the idle slot, verify, switch; ``None`` when it is already live.

        ``require_reference`` defaults to ``model.require_reference``; the operator's own
        ``model.dir`` is installed without requiring reference images (they are checked if present).
        """
        source = _Source(uri, self.s3_client)
        try:
            raw = source.read(METADATA_FILE)
            published = json.loads(raw)
        except Exception as exc:
            raise RuntimeError(f"{uri}: cannot read {METADATA_FILE} ({exc})") from exc
        sha = hashlib.sha256(raw).hexdigest()  # the version's identity: its metadata digest
        live = self._live
        if live is not None and live.digest == sha:
            return None
        if sha in self.rejected:
            return None
        names = [METADATA_FILE, str(published.get("model_file", "model.onnx"))]
        try:
            reference = json.loads(source.read(REFERENCE_FILE))
            names += [REFERENCE_FILE, *(str(r["file"]) for r in reference.get("images", []))]
        except Exception:  # absent: _check_parity decides whether that is allowed
            pass
        slot = next(s for s in SLOTS if live is None or s != live.slot)
        target = self.root / slot
        with self._lock:
            if self._previous == slot:  # about to be overwritten: no longer a rollback target
                self._previous = None
        try:
            if any(".." in Path(n).parts or Path(n).is_absolute() for n in names):
                raise ModelRejected("published file names must stay inside the folder")
            with atomic_directory(target) as staging:
                source.download(staging, names)
            fsync_dir(self.root)
            candidate = self._verify(target, slot, reference=True, require_reference=require_reference)
        except ModelMetadataError as exc:  # a ValueError, but mostly a sha256 mismatch: see below
            self._download_failed(uri, sha, target, exc)
        except (ModelRejected, ScoringError, KeyError, ValueError) as exc:
            # The model itself is wrong (input size, parity, no reference, bad outputs): final.
            shutil.rmtree(target, ignore_errors=True)
            self.last_check = {"uri": uri, "sha256": sha, "ok": False, "error": str(exc)}
            self._reject(sha, str(exc))
            raise ModelRejected(str(exc)) from exc
        except Exception as exc:
            self._download_failed(uri, sha, target, exc)
        self.last_check = {"uri": uri, "sha256": sha, "ok": True}
        self._switch(candidate)
        self.metrics.inc("vi_edge_model_updates_total")
        return candidate

    def _download_failed(self, uri: str, sha: str, target: Path, exc: Exception) -> NoReturn:
        """sha256 mismatch, truncated or failed download: possibly transient (a publisher still
        copying, a dropped connection). Never used; retried at the next poll, and rejected for good
        only after ``DOWNLOAD_ATTEMPTS`` failures of the same publication."""
        shutil.rmtree(target, ignore_errors=True)
        self.last_check = {"uri": uri, "sha256": sha, "ok": False, "error": f"{type(exc).__name__}: {exc}"}
        self.metrics.inc("vi_edge_model_download_failures_total")
        self._failures[sha] = self._failures.get(sha, 0) + 1
        if self._failures[sha] >= DOWNLOAD_ATTEMPTS:
            self._reject(sha, f"{DOWNLOAD_ATTEMPTS} failed downloads: {exc}")
        raise ModelRejected(str(exc)) from exc

    def poll(self) -> None:
        """One check of ``model.follow`` (errors are logged, never raised: the live model stays)."""
        if not self.config.follow:
            return
        try:
            self.install(self.config.follow)
        except Exception as exc:
            log.warning("model update not applied", extra={"error": str(exc)})

    def scoring_failed(self) -> None:
        """Count a scoring failure of the live model; roll back after too many in a row."""
        with self._lock:
            self._errors += 1
            bad = self._errors >= self.config.rollback_after_errors and self._previous is not None
            live, previous = self._live, self._previous
        if not bad or live is None or previous is None:
            return
        try:
            restored = self._verify(self.root / previous, previous)
        except Exception as exc:
            log.error("rollback impossible: the previous slot failed verification", extra={"error": str(exc)})
            return
        self._reject(live.digest, f"{self.config.rollback_after_errors} scoring failures in a row")
        self._switch(restored)
        with self._lock:
            self._previous = None  # the bad slot is not a rollback target
        self.metrics.inc("vi_edge_model_rollbacks_total")

    def scoring_ok(self) -> None:
        self._errors = 0
