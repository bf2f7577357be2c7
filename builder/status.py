"""Compute the PreprovisioningImage status the service writes, as baremetal-operator defines it.

Every status carries both conditions, ``Ready`` and ``Error``, each with
``observedGeneration = metadata.generation``. ``lastTransitionTime`` moves only when a
condition's status flips. ``status_patch`` turns a status into the JSON merge patch body for
the ``/status`` subresource: lists are replaced whole and cleared fields are sent as null.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime

REASON_SUCCESS = "ImageSuccess"
REASON_CONFIGURATION = "ConfigurationError"
REASON_MISSING_NETWORK_DATA = "MissingNetworkData"
REASON_BUILD_INVALID = "ImageBuildInvalid"

MESSAGE_GENERATED = "Generated image"
MESSAGE_CONFIG_CHANGED = "Config changed"

# The Kubernetes rule for metav1.Condition reasons.
REASON_PATTERN = re.compile(r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$")

# Fields the image-related part of the status may carry; any not set is cleared.
_IMAGE_FIELDS = ("imageUrl", "kernelUrl", "extraKernelParams", "format", "architecture")


@dataclass(frozen=True)
class ImageOutcome:
    """A published image: what the status reports when the build succeeded."""

    image_url: str
    image_format: str
    architecture: str
    network_data_name: str | None = None
    network_data_version: str | None = None
    kernel_url: str | None = None
    extra_kernel_params: str | None = None


@dataclass(frozen=True)
class ErrorOutcome:
    """A failed build: the condition reason and the message for the ``Error`` condition."""

    reason: str
    message: str
    network_data_name: str | None = None
    network_data_version: str | None = None


def _timestamp(now: datetime) -> str:
    return now.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _condition(
    previous: list[dict],
    *,
    condition_type: str,
    status: str,
    reason: str,
    message: str,
    generation: int,
    now: datetime,
) -> dict:
    if not REASON_PATTERN.match(reason):
        raise ValueError(f"condition reason {reason!r} does not match {REASON_PATTERN.pattern}")
    transition = _timestamp(now)
    for old in previous:
        if old.get("type") == condition_type and old.get("status") == status:
            transition = old.get("lastTransitionTime") or transition
    return {
        "type": condition_type,
        "status": status,
        "reason": reason,
        "message": message,
        "observedGeneration": generation,
        "lastTransitionTime": transition,
    }


def compute_status(
    image: dict, outcome: ImageOutcome | ErrorOutcome, *, now: datetime | None = None
) -> dict:
    """Return the full status for ``image`` after ``outcome``, keeping unflipped transition times.

    The result mirrors baremetal-operator's controller: success sets ``Ready=True`` (message
    "Generated image") and ``Error=False``; an error clears ``imageUrl``, sets ``Ready=False``
    and ``Error=True`` with the reason and message.
    """
    now = now or datetime.now(UTC)
    previous_status = image.get("status") or {}
    previous = previous_status.get("conditions") or []
    generation = int((image.get("metadata") or {}).get("generation") or 0)

    if isinstance(outcome, ImageOutcome):
        status: dict = {
            "imageUrl": outcome.image_url,
            "format": outcome.image_format,
            "architecture": outcome.architecture,
        }
        if outcome.kernel_url:
            status["kernelUrl"] = outcome.kernel_url
        if outcome.extra_kernel_params:
            status["extraKernelParams"] = outcome.extra_kernel_params
        ready = ("True", REASON_SUCCESS, MESSAGE_GENERATED)
        error = ("False", REASON_SUCCESS, "")
    else:
        # Keep what the previous image reported except the URLs, so format and architecture
        # still describe the last image until a new one is published.
        status = {
            key: previous_status[key]
            for key in ("format", "architecture")
            if previous_status.get(key)
        }
        ready = ("False", outcome.reason, "")
        error = ("True", outcome.reason, outcome.message)

    if outcome.network_data_name:
        status["networkData"] = {
            "name": outcome.network_data_name,
            "version": outcome.network_data_version or "",
        }

    status["conditions"] = [
        _condition(
            previous,
            condition_type=condition_type,
            status=values[0],
            reason=values[1],
            message=values[2],
            generation=generation,
            now=now,
        )
        for condition_type, values in (("Ready", ready), ("Error", error))
    ]
    return status


def config_changed_status(image: dict, *, now: datetime | None = None) -> dict:
    """Return the status that withdraws a ready image while its inputs are rebuilt.

    Every other field stays as it was. The conditions become ``Ready=False`` with reason
    ImageSuccess and message "Config changed", and ``Error=False``. Hosts then stop using the
    old image before the new one exists.
    """
    now = now or datetime.now(UTC)
    previous_status = dict(image.get("status") or {})
    previous = previous_status.get("conditions") or []
    generation = int((image.get("metadata") or {}).get("generation") or 0)
    previous_status["conditions"] = [
        _condition(
            previous,
            condition_type="Ready",
            status="False",
            reason=REASON_SUCCESS,
            message=MESSAGE_CONFIG_CHANGED,
            generation=generation,
            now=now,
        ),
        _condition(
            previous,
            condition_type="Error",
            status="False",
            reason=REASON_SUCCESS,
            message="",
            generation=generation,
            now=now,
        ),
    ]
    return previous_status


def status_patch(status: dict, *, resource_version: str | None = None) -> dict:
    """Return the JSON merge patch body that makes the live status equal ``status``.

    Image fields and ``networkData`` that ``status`` lacks are sent as null so the merge
    removes them; ``metadata.resourceVersion`` makes a stale write fail with 409.
    """
    body: dict = {"status": dict(status)}
    for key in (*_IMAGE_FIELDS, "networkData"):
        body["status"].setdefault(key, None)
    if resource_version is not None:
        body["metadata"] = {"resourceVersion": resource_version}
    return body


def condition(status: dict, condition_type: str) -> dict | None:
    """Return the condition of ``condition_type`` in ``status``, or None."""
    for entry in status.get("conditions") or []:
        if entry.get("type") == condition_type:
            return entry
    return None
