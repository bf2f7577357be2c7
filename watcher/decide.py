"""Decide whether a PreprovisioningImage needs a build message: a pure function of its records.

An image is out of date when its desired build token differs from the token last built, or
when its status fails a check the BareMetalHost controller makes before it uses the image.
Two states wait instead of enqueueing: a permanent error (ImageBuildInvalid,
ConfigurationError) already reported for the current inputs and generation, and a missing
Secret already reported as MissingNetworkData, which the retry schedule or a Secret event
brings back.
"""

from __future__ import annotations

from dataclasses import dataclass

from watcher.state import ImageState, SecretState

PERMANENT_REASONS = frozenset({"ImageBuildInvalid", "ConfigurationError"})
MISSING_NETWORK_DATA = "MissingNetworkData"


@dataclass(frozen=True)
class Decision:
    """Whether to send a build message, and why (for the log)."""

    enqueue: bool
    reason: str


def status_mismatch(image: ImageState, secret: SecretState | None) -> str | None:
    """Return the first status check the BareMetalHost controller would fail, or None.

    ``secret`` is the record of the Secret named by ``networkDataName``, or None when the spec
    names none. Its resourceVersion is the live version the status must report.
    """
    status = image.status
    if status.architecture != image.architecture:
        return f"status architecture {status.architecture!r} is not {image.architecture!r}"
    if status.image_format not in image.accept_formats:
        return f"status format {status.image_format!r} is not in acceptFormats"
    if status.network_data_name != image.network_data_name:
        return (
            f"status networkData.name {status.network_data_name!r} is not "
            f"{image.network_data_name!r}"
        )
    if image.network_data_name:
        live_version = secret.resource_version if secret and secret.exists else ""
        if status.network_data_version != live_version:
            return (
                f"status networkData.version {status.network_data_version!r} is not the "
                f"Secret's resourceVersion {live_version!r}"
            )
    if status.error_status == "True":
        return f"Error is True ({status.error_reason})"
    if status.ready_status != "True" or not status.image_url:
        return "Ready is not True"
    if status.ready_generation != image.generation:
        return (
            f"Ready observedGeneration {status.ready_generation} is not generation "
            f"{image.generation}"
        )
    return None


def _reports_error(image: ImageState, reasons: frozenset[str]) -> bool:
    status = image.status
    return (
        status.error_status == "True"
        and status.error_reason in reasons
        and status.error_generation == image.generation
    )


def waits_for_secret(image: ImageState, secret: SecretState | None) -> bool:
    """Return whether the status already reports the Secret that is still missing."""
    if not image.network_data_name:
        return False
    if secret is not None and secret.exists:
        return False
    return _reports_error(image, frozenset({MISSING_NETWORK_DATA}))


def decide(
    *,
    image: ImageState,
    secret: SecretState | None,
    desired_token: str,
    built_token: str | None,
    retry_due: bool = False,
) -> Decision:
    """Decide whether ``image`` needs a build message.

    ``built_token`` is the token in Redis of the image last published (None when nothing was
    built). ``retry_due`` is True when the retry schedule brings the object back, which
    overrides the wait for a missing Secret.
    """
    built = built_token == desired_token
    if built and _reports_error(image, PERMANENT_REASONS):
        return Decision(False, f"permanent error {image.status.error_reason} for these inputs")
    if not retry_due and waits_for_secret(image, secret):
        return Decision(False, "Secret still missing; waiting for the retry schedule")
    if not built:
        if built_token is None:
            return Decision(True, "no image built yet")
        return Decision(True, "inputs changed")
    mismatch = status_mismatch(image, secret)
    if mismatch is not None:
        return Decision(True, mismatch)
    return Decision(False, "up to date")
