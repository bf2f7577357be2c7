"""Tests of the status computation against baremetal-operator's rules."""

from datetime import UTC, datetime

import pytest

from builder.status import (
    REASON_PATTERN,
    ErrorOutcome,
    ImageOutcome,
    compute_status,
    condition,
    config_changed_status,
    status_patch,
)

EARLIER = datetime(2026, 1, 1, 10, 0, 0, tzinfo=UTC)
LATER = datetime(2026, 1, 1, 11, 0, 0, tzinfo=UTC)


def make_image(generation=3, status=None):
    return {
        "metadata": {"name": "worker-0", "namespace": "metal3", "generation": generation},
        "spec": {
            "architecture": "x86_64",
            "acceptFormats": ["iso", "initrd"],
            "networkDataName": "worker-0-network",
        },
        "status": status or {},
    }


def success(**overrides):
    values = dict(
        image_url="http://images.example/metal3/worker-0.iso",
        image_format="iso",
        architecture="x86_64",
        network_data_name="worker-0-network",
        network_data_version="48213",
    )
    values.update(overrides)
    return ImageOutcome(**values)


def test_success_sets_ready_and_clears_error():
    status = compute_status(make_image(), success(), now=EARLIER)
    ready = condition(status, "Ready")
    error = condition(status, "Error")
    assert ready["status"] == "True"
    assert ready["reason"] == "ImageSuccess"
    assert ready["message"] == "Generated image"
    assert ready["observedGeneration"] == 3
    assert error["status"] == "False"
    assert error["reason"] == "ImageSuccess"
    assert error["observedGeneration"] == 3
    assert status["imageUrl"] == "http://images.example/metal3/worker-0.iso"
    assert status["format"] == "iso"
    assert status["architecture"] == "x86_64"
    assert status["networkData"] == {"name": "worker-0-network", "version": "48213"}
    assert "kernelUrl" not in status


def test_success_initrd_carries_kernel_fields():
    outcome = success(
        image_format="initrd",
        kernel_url="http://images.example/bases/x86_64/kernel",
        extra_kernel_params="console=ttyS0 rd.neednet=1",
    )
    status = compute_status(make_image(), outcome, now=EARLIER)
    assert status["kernelUrl"] == "http://images.example/bases/x86_64/kernel"
    assert status["extraKernelParams"] == "console=ttyS0 rd.neednet=1"
    assert status["format"] == "initrd"


def test_architecture_string_is_repeated_unchanged():
    image = make_image()
    image["spec"]["architecture"] = "amd64"
    status = compute_status(image, success(architecture="amd64"), now=EARLIER)
    assert status["architecture"] == "amd64"


def test_error_clears_image_url_and_sets_error():
    previous = compute_status(make_image(), success(), now=EARLIER)
    outcome = ErrorOutcome(reason="MissingNetworkData", message="NetworkData secret not found")
    status = compute_status(make_image(status=previous), outcome, now=LATER)
    ready = condition(status, "Ready")
    error = condition(status, "Error")
    assert "imageUrl" not in status
    assert ready["status"] == "False"
    assert ready["reason"] == "MissingNetworkData"
    assert ready["message"] == ""
    assert error["status"] == "True"
    assert error["message"] == "NetworkData secret not found"
    assert error["lastTransitionTime"] == "2026-01-01T11:00:00Z"


def test_transition_time_kept_when_status_unchanged():
    first = compute_status(make_image(generation=1), success(), now=EARLIER)
    second = compute_status(make_image(generation=2, status=first), success(), now=LATER)
    assert condition(second, "Ready")["lastTransitionTime"] == "2026-01-01T10:00:00Z"
    assert condition(second, "Error")["lastTransitionTime"] == "2026-01-01T10:00:00Z"
    assert condition(second, "Ready")["observedGeneration"] == 2


def test_config_changed_withdraws_ready():
    first = compute_status(make_image(), success(), now=EARLIER)
    status = config_changed_status(make_image(generation=4, status=first), now=LATER)
    ready = condition(status, "Ready")
    assert ready["status"] == "False"
    assert ready["reason"] == "ImageSuccess"
    assert ready["message"] == "Config changed"
    assert ready["observedGeneration"] == 4
    assert ready["lastTransitionTime"] == "2026-01-01T11:00:00Z"
    assert condition(status, "Error")["status"] == "False"


def test_patch_sends_null_for_cleared_fields():
    outcome = ErrorOutcome(reason="ImageBuildInvalid", message="Cannot generate image: x")
    status = compute_status(make_image(), outcome, now=EARLIER)
    body = status_patch(status, resource_version="77")
    assert body["metadata"] == {"resourceVersion": "77"}
    assert body["status"]["imageUrl"] is None
    assert body["status"]["kernelUrl"] is None
    assert body["status"]["extraKernelParams"] is None
    assert len(body["status"]["conditions"]) == 2


@pytest.mark.parametrize(
    "reason",
    ["ImageSuccess", "ConfigurationError", "MissingNetworkData", "ImageBuildInvalid"],
)
def test_reasons_match_kubernetes_pattern(reason):
    assert REASON_PATTERN.match(reason)


def test_invalid_reason_raises():
    with pytest.raises(ValueError, match="does not match"):
        compute_status(make_image(), ErrorOutcome(reason="bad reason", message="x"), now=EARLIER)
