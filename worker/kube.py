"""Kubernetes access of the workers with the official client: reads and status writes.

Objects come back as plain dictionaries shaped like the API's JSON, which is what
``builder.build.plan_image`` expects. Every API failure becomes a KubeError that carries only the
HTTP status and the object name, because the client's ApiException text includes response bodies
and headers, which must not reach logs, Celery or Flower.
"""

from __future__ import annotations

import json
import logging

import kubernetes.client
import kubernetes.config
import urllib3.exceptions
from kubernetes.client.exceptions import ApiException
from kubernetes.config.config_exception import ConfigException

log = logging.getLogger(__name__)

GROUP = "metal3.io"
VERSION = "v1alpha1"
PLURAL = "preprovisioningimages"
MERGE_PATCH = "application/merge-patch+json"
# Seconds to connect and to read one response.
REQUEST_TIMEOUT = (5.0, 30.0)


class KubeError(Exception):
    """A Kubernetes API call failed; ``status`` is the HTTP status, None when none arrived."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class Conflict(KubeError):
    """A write carried a stale resourceVersion (HTTP 409)."""


class ConfigurationMissing(KubeError):
    """Neither a kubeconfig nor an in-cluster service account is available."""


def load_configuration() -> kubernetes.client.Configuration:
    """Load the client configuration from KUBECONFIG (or ~/.kube/config), else in-cluster.

    Raises ConfigurationMissing naming both places that were tried.
    """
    configuration = kubernetes.client.Configuration()
    try:
        kubernetes.config.load_kube_config(client_configuration=configuration)
        return configuration
    except (ConfigException, OSError) as kubeconfig_error:
        try:
            kubernetes.config.load_incluster_config(client_configuration=configuration)
        except ConfigException as incluster_error:
            raise ConfigurationMissing(
                f"no Kubernetes configuration: kubeconfig ({kubeconfig_error}) and in-cluster"
                f" service account ({incluster_error}); set KUBECONFIG or run in a pod"
            ) from None
        return configuration


class KubeClient:
    """Reads PreprovisioningImages and Secrets and patches the status subresource."""

    def __init__(self, configuration: kubernetes.client.Configuration) -> None:
        self.api_client = kubernetes.client.ApiClient(configuration)
        self.custom = kubernetes.client.CustomObjectsApi(self.api_client)
        self.core = kubernetes.client.CoreV1Api(self.api_client)

    def close(self) -> None:
        self.api_client.close()

    def check_access(self) -> None:
        """Read the metal3.io/v1alpha1 discovery document; raise KubeError unless it serves PPIs."""
        where = f"{GROUP}/{VERSION} discovery at {self.api_client.configuration.host}"
        with _translated(where):
            resources = self.custom.get_api_resources(
                GROUP, VERSION, _request_timeout=REQUEST_TIMEOUT
            )
        names = {resource.name for resource in resources.resources or []}
        if PLURAL not in names:
            raise KubeError(
                f"{where} has no {PLURAL}; install the PreprovisioningImage CRD"
                " (baremetal-operator ships it)"
            )

    def read_image(self, namespace: str, name: str) -> dict | None:
        """Return the PreprovisioningImage, or None when it does not exist."""
        with _translated(f"PreprovisioningImage {namespace}/{name}", missing_ok=True) as result:
            result.value = self.custom.get_namespaced_custom_object(
                GROUP, VERSION, namespace, PLURAL, name, _request_timeout=REQUEST_TIMEOUT
            )
        return result.value

    def read_secret(self, namespace: str, name: str) -> dict | None:
        """Return the Secret as API JSON, or None when it is absent or being deleted."""
        with _translated(f"Secret {namespace}/{name}", missing_ok=True) as result:
            # The raw response keeps the API's JSON shape (base64 data, camelCase metadata).
            response = self.core.read_namespaced_secret(
                name, namespace, _preload_content=False, _request_timeout=REQUEST_TIMEOUT
            )
            result.value = json.loads(response.data)
        secret = result.value
        if secret is None or (secret.get("metadata") or {}).get("deletionTimestamp"):
            return None
        return secret

    def patch_image_status(self, namespace: str, name: str, body: dict) -> dict:
        """Apply ``body`` as a JSON merge patch to the status subresource; raise Conflict on 409."""
        with _translated(f"status of PreprovisioningImage {namespace}/{name}") as result:
            # The client picks merge-patch for this call by default; the header is set
            # explicitly so a client upgrade cannot turn it into another patch type.
            result.value = self.custom.patch_namespaced_custom_object_status(
                GROUP,
                VERSION,
                namespace,
                PLURAL,
                name,
                body,
                _content_type=MERGE_PATCH,
                _request_timeout=REQUEST_TIMEOUT,
            )
        return result.value


class _Result:
    value = None


class _translated:
    """Context manager turning client and transport errors into KubeError without bodies."""

    def __init__(self, target: str, *, missing_ok: bool = False) -> None:
        self.target = target
        self.missing_ok = missing_ok
        self.result = _Result()

    def __enter__(self) -> _Result:
        return self.result

    def __exit__(self, exc_type, exc, traceback) -> bool:
        if exc is None:
            return False
        if isinstance(exc, ApiException):
            if exc.status == 404 and self.missing_ok:
                self.result.value = None
                return True
            error_type = Conflict if exc.status == 409 else KubeError
            raise error_type(
                f"{self.target}: API request failed with HTTP {exc.status} {exc.reason}",
                status=exc.status,
            ) from None
        if isinstance(exc, urllib3.exceptions.HTTPError | OSError | ValueError):
            raise KubeError(f"{self.target}: API request failed: {type(exc).__name__}") from None
        return False
