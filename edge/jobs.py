"""What a source hands the scorer: a :class:`Job` (a decoded request and who to tell when it is done).

Kept apart from :mod:`edge.agent` so the sources and the HTTP API, which make jobs, and the agent,
which runs them, import this module instead of each other.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

from edge.outbox import Entry
from serving.events import RequestLimits, ScoringRequest, decode_image


@dataclass
class JobResult:
    """What the scorer made of a job: the stored entry (maybe a replay) or the error."""

    entry: Entry | None = None
    replayed: bool = False
    mask_png: bytes | None = None
    error: BaseException | None = None


@dataclass
class Job:
    """One image to score; ``done`` runs on the scoring thread once the result is durable (or failed)."""

    request: ScoringRequest
    source: str  # "folder" | "stream" | "http"
    done: Callable[[JobResult], None]


def make_request(
    camera_id: str,
    image_bytes: bytes,
    *,
    request_id: str,
    captured_at: str,
    limits: RequestLimits,
) -> ScoringRequest:
    """A request for a folder file or a stream frame, decoded exactly as the Lambda decodes a body.

    Raises :class:`serving.events.RequestError` for an image the Lambda would refuse too.
    """
    image, content_type, original_size = decode_image(image_bytes, limits)
    return ScoringRequest(
        image=image,
        image_bytes=image_bytes,
        content_type=content_type,
        camera_id=camera_id,
        captured_at=captured_at,
        request_id=request_id,
        original_size=original_size,
        image_sha256=hashlib.sha256(image_bytes).hexdigest(),
    )
