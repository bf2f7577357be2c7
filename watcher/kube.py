"""Kubernetes API access for the watcher, on the official client, returning plain dicts.

Lists are read page by page (``limit`` and ``continue``) and parsed straight from JSON without
building client models, so 10,000 objects never exist as models at once. Watches use
``kubernetes.watch.Watch``; callers read each event's ``raw_object``. NOTE: the client's
``deserialize=False`` mode (kubernetes 37.0.1) fails with KeyError 'raw_object' on an ERROR
event such as 410 Expired, so watches keep the default deserialization. Errors are the
client's ``ApiException`` (with ``status``) and urllib3's connection errors.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import kubernetes.client
import kubernetes.watch
from kubernetes.client.exceptions import ApiException

GROUP = "metal3.io"
VERSION = "v1alpha1"
PLURAL = "preprovisioningimages"
MERGE_PATCH = "application/merge-patch+json"
PAGE_SIZE = 500


def is_status(error: BaseException, *codes: int) -> bool:
    """Return whether ``error`` is an API error with one of the HTTP ``codes``."""
    return isinstance(error, ApiException) and error.status in codes


class KubeAccess:
    """The reads, watches and writes the watcher makes, on one ApiClient."""

    def __init__(self, api_client: kubernetes.client.ApiClient, *, request_timeout: float = 30):
        self.custom = kubernetes.client.CustomObjectsApi(api_client)
        self.core = kubernetes.client.CoreV1Api(api_client)
        self.request_timeout = request_timeout

    # -- PreprovisioningImages

    def _image_list_call(self, namespace: str | None):
        if namespace is None:
            return self.custom.list_cluster_custom_object, (GROUP, VERSION, PLURAL)
        return self.custom.list_namespaced_custom_object, (GROUP, VERSION, namespace, PLURAL)

    def list_images(self, namespace: str | None) -> tuple[list[dict], str]:
        """List PreprovisioningImages in ``namespace`` (None: all); return them and the list's
        resourceVersion."""
        function, args = self._image_list_call(namespace)
        return self._list_pages(function, args, {})

    def watch_images(
        self, namespace: str | None, *, resource_version: str, timeout_seconds: int
    ) -> tuple[kubernetes.watch.Watch, Iterator[dict]]:
        function, args = self._image_list_call(namespace)
        return self._watch(function, args, {}, resource_version, timeout_seconds)

    def read_image(self, namespace: str, name: str) -> dict | None:
        """Return one PreprovisioningImage, or None when it does not exist."""
        try:
            response = self.custom.get_namespaced_custom_object(
                GROUP, VERSION, namespace, PLURAL, name,
                _preload_content=False, _request_timeout=self.request_timeout,
            )
        except ApiException as error:
            if error.status == 404:
                return None
            raise
        return json.loads(response.data)

    def patch_finalizers(
        self, namespace: str, name: str, *, finalizers: list[str], resource_version: str
    ) -> dict:
        """Set ``metadata.finalizers``; raise ApiException 409 when the object changed since
        ``resource_version``."""
        body = {"metadata": {"finalizers": finalizers, "resourceVersion": resource_version}}
        response = self.custom.patch_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, name, body,
            _content_type=MERGE_PATCH, _preload_content=False,
            _request_timeout=self.request_timeout,
        )
        return json.loads(response.data)

    # -- Secrets

    def _secret_list_call(self, namespace: str | None):
        if namespace is None:
            return self.core.list_secret_for_all_namespaces, ()
        return self.core.list_namespaced_secret, (namespace,)

    def list_secrets(self, namespace: str | None, *, label_selector: str) -> tuple[list[dict], str]:
        function, args = self._secret_list_call(namespace)
        return self._list_pages(function, args, {"label_selector": label_selector})

    def watch_secrets(
        self, namespace: str | None, *, label_selector: str, resource_version: str,
        timeout_seconds: int,
    ) -> tuple[kubernetes.watch.Watch, Iterator[dict]]:
        function, args = self._secret_list_call(namespace)
        options = {"label_selector": label_selector}
        return self._watch(function, args, options, resource_version, timeout_seconds)

    def read_secret(self, namespace: str, name: str) -> dict | None:
        """Return one Secret, or None when it does not exist."""
        try:
            response = self.core.read_namespaced_secret(
                name, namespace, _preload_content=False, _request_timeout=self.request_timeout
            )
        except ApiException as error:
            if error.status == 404:
                return None
            raise
        return json.loads(response.data)

    # -- shared

    def _list_pages(self, function, args: tuple, options: dict[str, Any]) -> tuple[list[dict], str]:
        items: list[dict] = []
        token = None
        while True:
            page_options = dict(options, limit=PAGE_SIZE)
            if token:
                page_options["_continue"] = token
            response = function(
                *args, **page_options, _preload_content=False,
                _request_timeout=self.request_timeout,
            )
            document = json.loads(response.data)
            items.extend(document.get("items") or [])
            metadata = document.get("metadata") or {}
            token = metadata.get("continue")
            if not token:
                return items, str(metadata.get("resourceVersion") or "")

    def _watch(
        self, function, args: tuple, options: dict[str, Any], resource_version: str,
        timeout_seconds: int,
    ) -> tuple[kubernetes.watch.Watch, Iterator[dict]]:
        # The client-side read timeout is longer than the server-side one, so a silent
        # connection ends the watch instead of blocking the thread forever.
        watch = kubernetes.watch.Watch()
        stream = watch.stream(
            function, *args, **options,
            resource_version=resource_version,
            timeout_seconds=timeout_seconds,
            allow_watch_bookmarks=True,
            _request_timeout=(self.request_timeout, timeout_seconds + 30),
        )
        return watch, stream
