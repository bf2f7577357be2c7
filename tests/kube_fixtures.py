"""Pytest fixture `kube_api`: a Kubernetes API emulator on a free 127.0.0.1 port for one test.

The fixture yields a KubeApi with the server URL, a kubeconfig file, a factory of official
`kubernetes` ApiClients (closed at teardown) and helpers that change objects directly, without
HTTP. Watches get a bookmark every BOOKMARK_INTERVAL seconds, so tests need not wait a minute.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path

import kubernetes.client
import pytest

# The tests directory is imported either as top-level modules or as the `tests` package.
if __package__:
    from .kube_emulator import EmulatorServer, JsonObject, KubeEmulator, ResourceType
else:
    from kube_emulator import EmulatorServer, JsonObject, KubeEmulator, ResourceType

BOOKMARK_INTERVAL = 0.5


@dataclasses.dataclass
class KubeApi:
    """A running emulator: where it listens and how to reach it."""

    emulator: KubeEmulator
    url: str
    kubeconfig_path: Path
    _clients: list[kubernetes.client.ApiClient] = dataclasses.field(default_factory=list)

    def configuration(self) -> kubernetes.client.Configuration:
        configuration = kubernetes.client.Configuration()
        configuration.host = self.url
        return configuration

    def api_client(self) -> kubernetes.client.ApiClient:
        """Create an official client connected to the emulator; the fixture closes it."""
        client = kubernetes.client.ApiClient(self.configuration())
        self._clients.append(client)
        return client

    def create(
        self, resource: str | ResourceType, body: JsonObject, *, namespace: str | None = None,
    ) -> JsonObject:
        """Create an object directly, with the same checks and events as a POST."""
        return self.emulator.create_object(resource, body, namespace=namespace)

    def get(
        self, resource: str | ResourceType, name: str, *, namespace: str | None = None,
    ) -> JsonObject:
        return self.emulator.get_object(resource, name, namespace=namespace)

    def patch(
        self, resource: str | ResourceType, name: str, patch: JsonObject,
        *, namespace: str | None = None, subresource: str | None = None,
    ) -> JsonObject:
        """Apply a JSON merge patch directly, to /status when `subresource` is 'status'."""
        return self.emulator.patch_object(
            resource, name, patch, namespace=namespace, subresource=subresource,
        )

    def delete(
        self, resource: str | ResourceType, name: str, *, namespace: str | None = None,
    ) -> JsonObject:
        return self.emulator.delete_object(resource, name, namespace=namespace)

    def close(self) -> None:
        for client in self._clients:
            client.close()
        self._clients.clear()


def write_kubeconfig(path: Path, url: str) -> Path:
    """Write a kubeconfig whose current context points at `url` (JSON is valid YAML)."""
    config = {
        'apiVersion': 'v1',
        'kind': 'Config',
        'clusters': [{'name': 'kube-emulator', 'cluster': {'server': url}}],
        'users': [{'name': 'kube-emulator', 'user': {'token': 'kube-emulator'}}],
        'contexts': [{
            'name': 'kube-emulator',
            'context': {
                'cluster': 'kube-emulator', 'user': 'kube-emulator', 'namespace': 'default',
            },
        }],
        'current-context': 'kube-emulator',
    }
    path.write_text(json.dumps(config, indent=2))
    return path


@pytest.fixture
def kube_api(tmp_path: Path) -> Iterator[KubeApi]:
    """Start a fresh emulator for the test and stop it, with its clients, afterwards."""
    emulator = KubeEmulator(bookmark_interval=BOOKMARK_INTERVAL)
    with EmulatorServer(emulator) as server:
        api = KubeApi(
            emulator=emulator,
            url=server.url,
            kubeconfig_path=write_kubeconfig(tmp_path / 'kubeconfig', server.url),
        )
        try:
            yield api
        finally:
            api.close()
