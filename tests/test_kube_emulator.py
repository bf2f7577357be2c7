"""Tests of the Kubernetes API emulator through the official `kubernetes` client and kopf.

Every test talks real HTTP to an emulator on 127.0.0.1, so a passing test means the client's own
request and response handling accepted what the emulator sent.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
from typing import Any

import kopf
import kubernetes.client
import kubernetes.watch
import pytest
from kubernetes.client.exceptions import ApiException

if __package__:
    from . import kube_fixtures
else:
    import kube_fixtures

KubeApi = kube_fixtures.KubeApi
kube_api = kube_fixtures.kube_api

GROUP = 'metal3.io'
VERSION = 'v1alpha1'
PLURAL = 'preprovisioningimages'
NAMESPACE = 'metal3'
FINALIZER = 'preprovisioningimage.metal3.io'


def ppi_body(name: str, *, labels: dict[str, str] | None = None, **extra: Any) -> dict[str, Any]:
    metadata: dict[str, Any] = {'name': name, 'labels': labels or {}}
    metadata.update(extra.pop('metadata', {}))
    return {
        'apiVersion': f'{GROUP}/{VERSION}',
        'kind': 'PreprovisioningImage',
        'metadata': metadata,
        'spec': {'architecture': 'x86_64', 'acceptFormats': ['iso'], 'networkDataName': 'nd'},
        **extra,
    }


@pytest.fixture
def client(kube_api: KubeApi) -> kubernetes.client.ApiClient:
    return kube_api.api_client()


@pytest.fixture
def custom(client: kubernetes.client.ApiClient) -> kubernetes.client.CustomObjectsApi:
    return kubernetes.client.CustomObjectsApi(client)


@pytest.fixture
def core(client: kubernetes.client.ApiClient) -> kubernetes.client.CoreV1Api:
    return kubernetes.client.CoreV1Api(client)


def create_ppi(
    custom: kubernetes.client.CustomObjectsApi, name: str, **kwargs: Any,
) -> dict[str, Any]:
    return custom.create_namespaced_custom_object(
        GROUP, VERSION, NAMESPACE, PLURAL, ppi_body(name, **kwargs),
    )


def patch_ppi(
    custom: kubernetes.client.CustomObjectsApi, name: str, patch: dict[str, Any],
) -> dict[str, Any]:
    return custom.patch_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, name, patch)


def patch_ppi_status(
    custom: kubernetes.client.CustomObjectsApi, name: str, patch: dict[str, Any],
) -> dict[str, Any]:
    return custom.patch_namespaced_custom_object_status(
        GROUP, VERSION, NAMESPACE, PLURAL, name, patch,
    )


def watch_ppis(
    custom: kubernetes.client.CustomObjectsApi, **kwargs: Any,
) -> list[dict[str, Any]]:
    """Collect the events of one watch request, which the server ends after timeoutSeconds."""
    watch = kubernetes.watch.Watch()
    stream = watch.stream(
        custom.list_namespaced_custom_object, GROUP, VERSION, NAMESPACE, PLURAL, **kwargs,
    )
    return [{'type': event['type'], 'object': event['raw_object']} for event in stream]


def error_status(error: ApiException) -> dict[str, Any]:
    return json.loads(error.body)


def version_of(obj: dict[str, Any]) -> int:
    return int(obj['metadata']['resourceVersion'])


# --- create and get --------------------------------------------------------------------------


def test_create_returns_201_with_server_metadata(
    custom: kubernetes.client.CustomObjectsApi,
) -> None:
    created, status_code, _ = custom.create_namespaced_custom_object_with_http_info(
        GROUP, VERSION, NAMESPACE, PLURAL, ppi_body('host-0'),
    )

    assert status_code == 201
    assert created['metadata']['namespace'] == NAMESPACE
    assert re.fullmatch(r'[0-9a-f-]{36}', created['metadata']['uid'])
    timestamp = created['metadata']['creationTimestamp']
    assert re.fullmatch(r'\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ', timestamp)
    assert created['metadata']['generation'] == 1
    assert version_of(created) > 0


def test_create_drops_status_of_custom_resource(
    custom: kubernetes.client.CustomObjectsApi,
) -> None:
    created = create_ppi(custom, 'host-0', status={'imageUrl': 'http://example.invalid/x.iso'})

    assert 'status' not in created


def test_create_duplicate_returns_409_already_exists(
    custom: kubernetes.client.CustomObjectsApi,
) -> None:
    create_ppi(custom, 'host-0')

    with pytest.raises(ApiException) as raised:
        create_ppi(custom, 'host-0')

    status = error_status(raised.value)
    assert raised.value.status == 409
    assert status['kind'] == 'Status'
    assert status['reason'] == 'AlreadyExists'
    assert status['details']['name'] == 'host-0'


def test_create_invalid_name_returns_422(custom: kubernetes.client.CustomObjectsApi) -> None:
    with pytest.raises(ApiException) as raised:
        create_ppi(custom, 'Host_0')

    assert raised.value.status == 422
    assert error_status(raised.value)['reason'] == 'Invalid'


def test_get_missing_returns_404_status(
    custom: kubernetes.client.CustomObjectsApi, core: kubernetes.client.CoreV1Api,
) -> None:
    with pytest.raises(ApiException) as raised:
        custom.get_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, 'missing')
    with pytest.raises(ApiException) as raised_secret:
        core.read_namespaced_secret('missing', NAMESPACE)

    status = error_status(raised.value)
    assert raised.value.status == 404
    assert status['kind'] == 'Status'
    assert status['status'] == 'Failure'
    assert status['reason'] == 'NotFound'
    assert status['code'] == 404
    assert status['message'] == 'preprovisioningimages.metal3.io "missing" not found'
    assert status['details'] == {'name': 'missing', 'group': GROUP, 'kind': PLURAL}
    assert raised_secret.value.status == 404
    assert error_status(raised_secret.value)['message'] == 'secrets "missing" not found'


def test_get_is_namespaced(kube_api: KubeApi, custom: kubernetes.client.CustomObjectsApi) -> None:
    kube_api.create(PLURAL, ppi_body('host-0'), namespace='other')

    with pytest.raises(ApiException) as raised:
        custom.get_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, 'host-0')

    assert raised.value.status == 404


# --- resourceVersion and generation ----------------------------------------------------------


def test_resource_version_increments_across_resources(
    custom: kubernetes.client.CustomObjectsApi, core: kubernetes.client.CoreV1Api,
) -> None:
    first = create_ppi(custom, 'host-0')
    secret = core.create_namespaced_secret(NAMESPACE, {'metadata': {'name': 'nd'}})
    patched = patch_ppi(custom, 'host-0', {'metadata': {'labels': {'a': 'b'}}})

    assert int(secret.metadata.resource_version) == version_of(first) + 1
    assert version_of(patched) == version_of(first) + 2


def test_noop_patch_keeps_resource_version(custom: kubernetes.client.CustomObjectsApi) -> None:
    created = create_ppi(custom, 'host-0', labels={'a': 'b'})

    patched = patch_ppi(custom, 'host-0', {'metadata': {'labels': {'a': 'b'}}})

    assert patched['metadata']['resourceVersion'] == created['metadata']['resourceVersion']


def test_generation_bumps_on_spec_change_only(custom: kubernetes.client.CustomObjectsApi) -> None:
    create_ppi(custom, 'host-0')

    labelled = patch_ppi(custom, 'host-0', {'metadata': {'labels': {'a': 'b'}}})
    with_status = patch_ppi_status(custom, 'host-0', {'status': {'format': 'iso'}})
    changed = patch_ppi(custom, 'host-0', {'spec': {'architecture': 'aarch64'}})
    unchanged_spec = patch_ppi(custom, 'host-0', {'spec': {'architecture': 'aarch64'}})

    assert labelled['metadata']['generation'] == 1
    assert with_status['metadata']['generation'] == 1
    assert changed['metadata']['generation'] == 2
    assert unchanged_spec['metadata']['generation'] == 2


def test_secret_data_change_bumps_version_not_generation(
    core: kubernetes.client.CoreV1Api,
) -> None:
    created = core.create_namespaced_secret(
        NAMESPACE, {'metadata': {'name': 'nd'}, 'stringData': {'nmstate': 'interfaces: []'}},
    )

    patched = core.patch_namespaced_secret('nd', NAMESPACE, {'data': {'nmstate': 'e30='}})

    assert created.data == {'nmstate': 'aW50ZXJmYWNlczogW10='}
    assert created.metadata.generation is None
    assert patched.metadata.generation is None
    assert int(patched.metadata.resource_version) > int(created.metadata.resource_version)
    assert patched.data == {'nmstate': 'e30='}


# --- status subresource ----------------------------------------------------------------------


def test_status_patch_ignores_spec_and_metadata(
    custom: kubernetes.client.CustomObjectsApi,
) -> None:
    create_ppi(custom, 'host-0')

    patched = patch_ppi_status(custom, 'host-0', {
        'spec': {'architecture': 'aarch64'},
        'metadata': {'labels': {'a': 'b'}},
        'status': {'format': 'iso', 'architecture': 'x86_64'},
    })

    assert patched['status'] == {'format': 'iso', 'architecture': 'x86_64'}
    assert patched['spec']['architecture'] == 'x86_64'
    assert patched['metadata']['labels'] == {}


def test_main_patch_ignores_status(custom: kubernetes.client.CustomObjectsApi) -> None:
    create_ppi(custom, 'host-0')
    patch_ppi_status(custom, 'host-0', {'status': {'format': 'iso'}})

    patched = patch_ppi(custom, 'host-0', {
        'spec': {'architecture': 'aarch64'}, 'status': {'format': 'initrd'},
    })

    assert patched['spec']['architecture'] == 'aarch64'
    assert patched['status'] == {'format': 'iso'}


def test_status_replace_ignores_spec(custom: kubernetes.client.CustomObjectsApi) -> None:
    current = create_ppi(custom, 'host-0')
    current['spec']['architecture'] = 'aarch64'
    current['status'] = {'format': 'initrd'}

    replaced = custom.replace_namespaced_custom_object_status(
        GROUP, VERSION, NAMESPACE, PLURAL, 'host-0', current,
    )

    assert replaced['status'] == {'format': 'initrd'}
    assert replaced['spec']['architecture'] == 'x86_64'
    assert replaced['metadata']['generation'] == 1


def test_status_merge_patch_null_clears_key(custom: kubernetes.client.CustomObjectsApi) -> None:
    create_ppi(custom, 'host-0')
    patch_ppi_status(custom, 'host-0', {'status': {'imageUrl': 'http://a/x.iso', 'format': 'iso'}})

    patched = patch_ppi_status(custom, 'host-0', {'status': {'imageUrl': None}})

    assert patched['status'] == {'format': 'iso'}


# --- conflicts -------------------------------------------------------------------------------


def test_status_patch_with_stale_version_returns_409(
    custom: kubernetes.client.CustomObjectsApi,
) -> None:
    created = create_ppi(custom, 'host-0')
    patch_ppi(custom, 'host-0', {'spec': {'architecture': 'aarch64'}})
    stale = {'metadata': {'resourceVersion': created['metadata']['resourceVersion']},
             'status': {'format': 'iso'}}

    with pytest.raises(ApiException) as raised:
        patch_ppi_status(custom, 'host-0', stale)

    current = custom.get_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, 'host-0')
    assert raised.value.status == 409
    assert error_status(raised.value)['reason'] == 'Conflict'
    assert 'status' not in current


def test_status_patch_with_current_version_succeeds(
    custom: kubernetes.client.CustomObjectsApi,
) -> None:
    created = create_ppi(custom, 'host-0')
    patch = {'metadata': {'resourceVersion': created['metadata']['resourceVersion']},
             'status': {'format': 'iso'}}

    patched = patch_ppi_status(custom, 'host-0', patch)

    assert patched['status'] == {'format': 'iso'}
    assert version_of(patched) == version_of(created) + 1


def test_replace_with_stale_version_returns_409(
    custom: kubernetes.client.CustomObjectsApi,
) -> None:
    stale = create_ppi(custom, 'host-0')
    patch_ppi(custom, 'host-0', {'metadata': {'labels': {'a': 'b'}}})
    stale['spec']['architecture'] = 'aarch64'

    with pytest.raises(ApiException) as raised:
        custom.replace_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, 'host-0', stale)

    assert raised.value.status == 409


def test_lease_update_with_stale_version_returns_409(client: kubernetes.client.ApiClient) -> None:
    leases = kubernetes.client.CoordinationV1Api(client)
    created = leases.create_namespaced_lease(NAMESPACE, {
        'metadata': {'name': 'watcher'},
        'spec': {'holderIdentity': 'pod-a', 'leaseDurationSeconds': 15},
    })
    created.spec.holder_identity = 'pod-b'
    renewed = leases.replace_namespaced_lease('watcher', NAMESPACE, created)
    created.spec.holder_identity = 'pod-c'

    with pytest.raises(ApiException) as raised:
        leases.replace_namespaced_lease('watcher', NAMESPACE, created)

    current = leases.read_namespaced_lease('watcher', NAMESPACE)
    assert renewed.spec.holder_identity == 'pod-b'
    assert int(renewed.metadata.resource_version) > int(created.metadata.resource_version)
    assert raised.value.status == 409
    assert current.spec.holder_identity == 'pod-b'
    assert current.metadata.generation is None


# --- patch formats ---------------------------------------------------------------------------


def test_json_patch_applies_and_failed_test_returns_422(
    custom: kubernetes.client.CustomObjectsApi,
) -> None:
    create_ppi(custom, 'host-0')
    operations = [{'op': 'replace', 'path': '/spec/architecture', 'value': 'aarch64'}]
    failing = [{'op': 'test', 'path': '/spec/architecture', 'value': 'x86_64'}]

    patched = custom.patch_namespaced_custom_object(
        GROUP, VERSION, NAMESPACE, PLURAL, 'host-0', operations,
        _content_type='application/json-patch+json',
    )
    with pytest.raises(ApiException) as raised:
        custom.patch_namespaced_custom_object(
            GROUP, VERSION, NAMESPACE, PLURAL, 'host-0', failing,
            _content_type='application/json-patch+json',
        )

    assert patched['spec']['architecture'] == 'aarch64'
    assert patched['metadata']['generation'] == 2
    assert raised.value.status == 422


def test_strategic_merge_patch_on_custom_resource_returns_415(
    custom: kubernetes.client.CustomObjectsApi,
) -> None:
    create_ppi(custom, 'host-0')

    with pytest.raises(ApiException) as raised:
        custom.patch_namespaced_custom_object(
            GROUP, VERSION, NAMESPACE, PLURAL, 'host-0', {'spec': {'architecture': 'aarch64'}},
            _content_type='application/strategic-merge-patch+json',
        )

    assert raised.value.status == 415


# --- list ------------------------------------------------------------------------------------


def test_list_label_selectors(
    kube_api: KubeApi, custom: kubernetes.client.CustomObjectsApi,
) -> None:
    kube_api.create(PLURAL, ppi_body('a', labels={'env': 'baremetal', 'role': 'worker'}),
                    namespace=NAMESPACE)
    kube_api.create(PLURAL, ppi_body('b', labels={'env': 'baremetal'}), namespace=NAMESPACE)
    kube_api.create(PLURAL, ppi_body('c', labels={'env': 'virtual'}), namespace=NAMESPACE)

    def names(selector: str) -> list[str]:
        listed = custom.list_namespaced_custom_object(
            GROUP, VERSION, NAMESPACE, PLURAL, label_selector=selector,
        )
        return [item['metadata']['name'] for item in listed['items']]

    assert names('env=baremetal') == ['a', 'b']
    assert names('env==virtual') == ['c']
    assert names('env!=baremetal') == ['c']
    assert names('role') == ['a']
    assert names('!role') == ['b', 'c']
    assert names('env=baremetal,!role') == ['b']
    assert names('env in (virtual, other)') == ['c']
    assert names('env notin (virtual),role') == ['a']


def test_list_invalid_label_selector_returns_400(
    custom: kubernetes.client.CustomObjectsApi,
) -> None:
    with pytest.raises(ApiException) as raised:
        custom.list_namespaced_custom_object(
            GROUP, VERSION, NAMESPACE, PLURAL, label_selector='env=(',
        )

    assert raised.value.status == 400


def test_list_field_selector_metadata_name(
    kube_api: KubeApi, core: kubernetes.client.CoreV1Api,
) -> None:
    kube_api.create('secrets', {'metadata': {'name': 'nd-0'}}, namespace=NAMESPACE)
    kube_api.create('secrets', {'metadata': {'name': 'nd-1'}}, namespace=NAMESPACE)

    listed = core.list_namespaced_secret(NAMESPACE, field_selector='metadata.name=nd-1')
    excluded = core.list_namespaced_secret(NAMESPACE, field_selector='metadata.name!=nd-1')

    assert [item.metadata.name for item in listed.items] == ['nd-1']
    assert [item.metadata.name for item in excluded.items] == ['nd-0']


def test_list_all_namespaces_and_per_namespace(
    kube_api: KubeApi, custom: kubernetes.client.CustomObjectsApi,
) -> None:
    kube_api.create(PLURAL, ppi_body('a'), namespace=NAMESPACE)
    last = kube_api.create(PLURAL, ppi_body('b'), namespace='other')

    everywhere = custom.list_cluster_custom_object(GROUP, VERSION, PLURAL)
    namespaced = custom.list_namespaced_custom_object(GROUP, VERSION, 'other', PLURAL)

    assert [item['metadata']['name'] for item in everywhere['items']] == ['a', 'b']
    assert [item['metadata']['name'] for item in namespaced['items']] == ['b']
    assert everywhere['kind'] == 'PreprovisioningImageList'
    assert everywhere['metadata']['resourceVersion'] == last['metadata']['resourceVersion']


def test_namespaces_are_cluster_scoped(core: kubernetes.client.CoreV1Api) -> None:
    created = core.create_namespace({'metadata': {'name': 'metal3'}})
    core.create_namespaced_secret('metal3', {'metadata': {'name': 'nd'}})

    namespaces = core.list_namespace()
    read = core.read_namespace('metal3')
    secrets = core.list_namespaced_secret('metal3')

    assert created.metadata.namespace is None
    assert [item.metadata.name for item in namespaces.items] == ['metal3']
    assert read.metadata.uid == created.metadata.uid
    assert [item.metadata.name for item in secrets.items] == ['nd']


# --- delete ----------------------------------------------------------------------------------


def test_delete_with_finalizers_marks_then_removes(
    custom: kubernetes.client.CustomObjectsApi,
) -> None:
    created = create_ppi(custom, 'host-0', metadata={'finalizers': [FINALIZER]})

    marked = custom.delete_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, 'host-0')
    still_there = custom.get_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, 'host-0')
    released = patch_ppi(custom, 'host-0', {'metadata': {'finalizers': None}})
    with pytest.raises(ApiException) as raised:
        custom.get_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, 'host-0')
    events = watch_ppis(custom, resource_version=created['metadata']['resourceVersion'],
                        timeout_seconds=1)

    assert marked['metadata']['deletionTimestamp']
    # The API server bumps a tracked generation when it starts a graceful deletion.
    assert marked['metadata']['generation'] == 2
    assert still_there['metadata']['deletionTimestamp'] == marked['metadata']['deletionTimestamp']
    assert 'finalizers' not in released['metadata']
    assert raised.value.status == 404
    assert [event['type'] for event in events] == ['MODIFIED', 'DELETED']
    assert version_of(events[1]['object']) == version_of(released)


def test_delete_rejects_new_finalizer_while_deleting(
    custom: kubernetes.client.CustomObjectsApi,
) -> None:
    create_ppi(custom, 'host-0', metadata={'finalizers': [FINALIZER]})
    custom.delete_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, 'host-0')

    with pytest.raises(ApiException) as raised:
        patch_ppi(custom, 'host-0', {'metadata': {'finalizers': [FINALIZER, 'other.io/x']}})

    assert raised.value.status == 422


def test_delete_without_finalizers_removes_at_once(
    custom: kubernetes.client.CustomObjectsApi, core: kubernetes.client.CoreV1Api,
) -> None:
    create_ppi(custom, 'host-0')
    core.create_namespaced_secret(NAMESPACE, {'metadata': {'name': 'nd'}})

    deleted = custom.delete_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, 'host-0')
    secret_status = core.delete_namespaced_secret('nd', NAMESPACE)

    assert deleted['metadata']['name'] == 'host-0'
    assert secret_status['kind'] == 'Status'
    assert secret_status['status'] == 'Success'
    assert core.list_namespaced_secret(NAMESPACE).items == []


def test_delete_missing_returns_404(custom: kubernetes.client.CustomObjectsApi) -> None:
    with pytest.raises(ApiException) as raised:
        custom.delete_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, 'missing')

    assert raised.value.status == 404
    assert error_status(raised.value)['reason'] == 'NotFound'


# --- watch -----------------------------------------------------------------------------------


def test_watch_from_version_sees_only_later_events(
    custom: kubernetes.client.CustomObjectsApi,
) -> None:
    first = create_ppi(custom, 'host-0')
    create_ppi(custom, 'host-1')
    patch_ppi(custom, 'host-0', {'spec': {'architecture': 'aarch64'}})

    events = watch_ppis(custom, resource_version=first['metadata']['resourceVersion'],
                        timeout_seconds=1)

    seen = [(event['type'], event['object']['metadata']['name']) for event in events]
    assert seen == [('ADDED', 'host-1'), ('MODIFIED', 'host-0')]
    assert events[1]['object']['spec']['architecture'] == 'aarch64'


def test_watch_without_version_starts_with_current_objects(
    custom: kubernetes.client.CustomObjectsApi,
) -> None:
    create_ppi(custom, 'host-0')

    events = watch_ppis(custom, timeout_seconds=1)

    assert [(event['type'], event['object']['metadata']['name']) for event in events] == [
        ('ADDED', 'host-0'),
    ]


def test_watch_streams_events_as_they_happen(
    kube_api: KubeApi, custom: kubernetes.client.CustomObjectsApi,
) -> None:
    start = kube_api.emulator.store.resource_version
    timer = threading.Timer(0.3, kube_api.create, args=(PLURAL, ppi_body('late')),
                            kwargs={'namespace': NAMESPACE})
    timer.start()

    events = watch_ppis(custom, resource_version=str(start), timeout_seconds=1)
    timer.join()

    assert [(event['type'], event['object']['metadata']['name']) for event in events] == [
        ('ADDED', 'late'),
    ]


def test_watch_timeout_seconds_ends_stream(custom: kubernetes.client.CustomObjectsApi) -> None:
    started = time.monotonic()

    events = watch_ppis(custom, resource_version='1', timeout_seconds=1)

    elapsed = time.monotonic() - started
    assert events == []
    assert 0.9 <= elapsed < 2.5


def test_watch_sends_bookmarks(
    kube_api: KubeApi, custom: kubernetes.client.CustomObjectsApi,
) -> None:
    created = create_ppi(custom, 'host-0')
    kube_api.create('secrets', {'metadata': {'name': 'nd'}}, namespace=NAMESPACE)

    events = watch_ppis(custom, resource_version=created['metadata']['resourceVersion'],
                        timeout_seconds=2, allow_watch_bookmarks=True)

    bookmarks = [event for event in events if event['type'] == 'BOOKMARK']
    # The fixture sends a bookmark every 0.5 s, so a 2 s watch gets at least two.
    assert len(bookmarks) >= 2
    assert [event['type'] for event in events if event['type'] != 'BOOKMARK'] == []
    # A bookmark carries the latest version, here that of the Secret the watch does not cover.
    assert version_of(bookmarks[0]['object']) == version_of(created) + 1
    assert bookmarks[0]['object']['kind'] == 'PreprovisioningImage'


def test_watch_without_bookmark_request_gets_none(
    custom: kubernetes.client.CustomObjectsApi,
) -> None:
    events = watch_ppis(custom, resource_version='1', timeout_seconds=1)

    assert [event for event in events if event['type'] == 'BOOKMARK'] == []


def test_watch_after_compaction_gets_410_event(
    kube_api: KubeApi, custom: kubernetes.client.CustomObjectsApi,
) -> None:
    first = create_ppi(custom, 'host-0')
    create_ppi(custom, 'host-1')
    kube_api.emulator.compact_history()

    response = custom.list_namespaced_custom_object(
        GROUP, VERSION, NAMESPACE, PLURAL, watch=True,
        resource_version=first['metadata']['resourceVersion'], _preload_content=False,
    )
    lines = [json.loads(line) for line in response.data.splitlines() if line.strip()]

    assert response.status == 200
    assert len(lines) == 1
    assert lines[0]['type'] == 'ERROR'
    assert lines[0]['object']['code'] == 410
    assert lines[0]['object']['reason'] == 'Expired'
    assert lines[0]['object']['message'].startswith('too old resource version: ')


def test_watch_after_compaction_raises_410_in_client(
    kube_api: KubeApi, custom: kubernetes.client.CustomObjectsApi,
) -> None:
    first = create_ppi(custom, 'host-0')
    create_ppi(custom, 'host-1')
    kube_api.emulator.compact_history()

    with pytest.raises(ApiException) as raised:
        watch_ppis(custom, resource_version=first['metadata']['resourceVersion'], timeout_seconds=1)
    current = watch_ppis(custom, resource_version=str(kube_api.emulator.store.resource_version),
                         timeout_seconds=1)

    assert raised.value.status == 410
    assert current == []


def test_watch_history_limit_expires_old_versions(
    kube_api: KubeApi, custom: kubernetes.client.CustomObjectsApi,
) -> None:
    kube_api.emulator.store.history_limit = 2
    first = create_ppi(custom, 'host-0')
    for index in range(1, 4):
        create_ppi(custom, f'host-{index}')

    with pytest.raises(ApiException) as raised:
        watch_ppis(custom, resource_version=first['metadata']['resourceVersion'], timeout_seconds=1)
    recent = watch_ppis(custom, resource_version=str(version_of(first) + 1), timeout_seconds=1)

    assert raised.value.status == 410
    assert [event['object']['metadata']['name'] for event in recent] == ['host-2', 'host-3']


def test_watch_label_selector_follows_label_changes(
    custom: kubernetes.client.CustomObjectsApi,
) -> None:
    start = create_ppi(custom, 'other', labels={'env': 'virtual'})
    create_ppi(custom, 'host-0')
    patch_ppi(custom, 'host-0', {'metadata': {'labels': {'env': 'baremetal'}}})
    patch_ppi(custom, 'host-0', {'spec': {'architecture': 'aarch64'}})
    patch_ppi(custom, 'other', {'spec': {'architecture': 'aarch64'}})
    patch_ppi(custom, 'host-0', {'metadata': {'labels': {'env': 'virtual'}}})

    events = watch_ppis(custom, resource_version=start['metadata']['resourceVersion'],
                        label_selector='env=baremetal', timeout_seconds=1)

    seen = [(event['type'], event['object']['metadata']['name']) for event in events]
    assert seen == [('ADDED', 'host-0'), ('MODIFIED', 'host-0'), ('DELETED', 'host-0')]


def test_watch_secrets_with_label_selector(
    kube_api: KubeApi, core: kubernetes.client.CoreV1Api,
) -> None:
    selector = 'environment.metal3.io=baremetal'
    kube_api.create('secrets', {'metadata': {'name': 'plain'}}, namespace=NAMESPACE)
    kube_api.create('secrets', {
        'metadata': {'name': 'nd', 'labels': {'environment.metal3.io': 'baremetal'}},
    }, namespace=NAMESPACE)

    watch = kubernetes.watch.Watch()
    events = list(watch.stream(core.list_namespaced_secret, NAMESPACE, label_selector=selector,
                               timeout_seconds=1))

    assert [event['type'] for event in events] == ['ADDED']
    assert isinstance(events[0]['object'], kubernetes.client.V1Secret)
    assert events[0]['object'].metadata.name == 'nd'


def test_watch_initial_events_end_with_bookmark(
    client: kubernetes.client.ApiClient, custom: kubernetes.client.CustomObjectsApi,
) -> None:
    create_ppi(custom, 'host-0')
    # The generated list method has no sendInitialEvents argument, so build the request by hand.
    method, url, headers, body, _ = client.param_serialize(
        'GET', f'/apis/{GROUP}/{VERSION}/namespaces/{NAMESPACE}/{PLURAL}',
        query_params=[('watch', 'true'), ('timeoutSeconds', '1'), ('allowWatchBookmarks', 'true'),
                      ('sendInitialEvents', 'true'), ('resourceVersionMatch', 'NotOlderThan')],
    )

    response = client.call_api(method, url, headers, body)
    lines = [json.loads(line) for line in response.read().splitlines() if line.strip()]

    assert lines[0]['type'] == 'ADDED'
    assert lines[1]['type'] == 'BOOKMARK'
    assert lines[1]['object']['metadata']['annotations'] == {'k8s.io/initial-events-end': 'true'}


# --- discovery, faults, request log, kubeconfig ----------------------------------------------


def test_discovery_lists_served_resources(client: kubernetes.client.ApiClient) -> None:
    groups = kubernetes.client.ApisApi(client).get_api_versions()
    resources = kubernetes.client.CustomObjectsApi(client).get_api_resources(GROUP, VERSION)
    core_versions = kubernetes.client.CoreApi(client).get_api_versions()
    version = kubernetes.client.VersionApi(client).get_code()

    assert sorted(group.name for group in groups.groups) == ['coordination.k8s.io', GROUP]
    assert [resource.name for resource in resources.resources] == [PLURAL, f'{PLURAL}/status']
    assert resources.resources[0].namespaced is True
    assert core_versions.versions == ['v1']
    assert version.major == '1'


def test_fault_injection_fails_next_requests(
    kube_api: KubeApi, custom: kubernetes.client.CustomObjectsApi,
) -> None:
    create_ppi(custom, 'host-0')
    status_path = f'/apis/{GROUP}/{VERSION}/namespaces/{NAMESPACE}/{PLURAL}/host-0/status'
    kube_api.emulator.inject_fault(status_path, status=500, count=2, method='PATCH')

    failures = []
    for _ in range(2):
        with pytest.raises(ApiException) as raised:
            patch_ppi_status(custom, 'host-0', {'status': {'format': 'iso'}})
        failures.append(raised.value)
    patched = patch_ppi_status(custom, 'host-0', {'status': {'format': 'iso'}})

    assert [failure.status for failure in failures] == [500, 500]
    assert error_status(failures[0])['reason'] == 'InternalError'
    assert patched['status'] == {'format': 'iso'}


def test_fault_injection_matches_path_pattern(
    kube_api: KubeApi, core: kubernetes.client.CoreV1Api,
) -> None:
    kube_api.emulator.inject_fault(re.compile(r'/api/v1/namespaces/[^/]+/secrets/.*'),
                                   status=409, count=1)

    with pytest.raises(ApiException) as raised:
        core.read_namespaced_secret('nd', NAMESPACE)
    with pytest.raises(ApiException) as after:
        core.read_namespaced_secret('nd', NAMESPACE)

    assert raised.value.status == 409
    assert after.value.status == 404


def test_request_log_records_status_patch(
    kube_api: KubeApi, custom: kubernetes.client.CustomObjectsApi,
) -> None:
    created = create_ppi(custom, 'host-0')
    kube_api.emulator.clear_request_log()
    patch = {'metadata': {'resourceVersion': created['metadata']['resourceVersion']},
             'status': {'format': 'iso'}}

    patch_ppi_status(custom, 'host-0', patch)

    log = kube_api.emulator.request_log()
    assert len(log) == 1
    assert log[0].method == 'PATCH'
    assert log[0].path.endswith('/host-0/status')
    assert log[0].content_type == 'application/merge-patch+json'
    assert log[0].body == patch
    assert log[0].status == 200


def test_kubeconfig_loads_in_official_client(kube_api: KubeApi) -> None:
    configuration = kubernetes.client.Configuration()
    kubernetes.config.load_kube_config(config_file=str(kube_api.kubeconfig_path),
                                       client_configuration=configuration)
    kube_api.create('secrets', {'metadata': {'name': 'nd'}}, namespace='default')

    with kubernetes.client.ApiClient(configuration) as client:
        secret = kubernetes.client.CoreV1Api(client).read_namespaced_secret('nd', 'default')

    assert configuration.host == kube_api.url
    assert secret.metadata.name == 'nd'


# --- kopf ------------------------------------------------------------------------------------


def test_kopf_on_event_receives_events(kube_api: KubeApi) -> None:
    kube_api.create(PLURAL, ppi_body('existing'), namespace=NAMESPACE)
    registry = kopf.OperatorRegistry()
    seen: list[tuple[str | None, str]] = []

    @kopf.on.login(registry=registry)
    def login(**_: Any) -> kopf.ConnectionInfo:
        return kopf.ConnectionInfo(server=kube_api.url)

    @kopf.on.startup(registry=registry)
    def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
        settings.posting.enabled = False
        # A short server timeout makes kopf reconnect from its last resourceVersion mid-test.
        settings.watching.server_timeout = 1
        settings.watching.reconnect_backoff = 0.1

    @kopf.on.event(GROUP, VERSION, PLURAL, registry=registry)
    def on_event(event: dict[str, Any], name: str, **_: Any) -> None:
        seen.append((event['type'], name))

    async def wait_for(expected: tuple[str | None, str]) -> None:
        deadline = time.monotonic() + 10
        while expected not in seen and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    async def run() -> None:
        stop_flag = asyncio.Event()
        operator = asyncio.create_task(kopf.operator(
            registry=registry, clusterwide=True, standalone=True, stop_flag=stop_flag,
        ))
        await wait_for((None, 'existing'))
        # Wait past one server timeout so the next event arrives on a resumed watch.
        await asyncio.sleep(1.5)
        kube_api.create(PLURAL, ppi_body('new'), namespace=NAMESPACE)
        await wait_for(('ADDED', 'new'))
        kube_api.delete(PLURAL, 'existing', namespace=NAMESPACE)
        await wait_for(('DELETED', 'existing'))
        stop_flag.set()
        await asyncio.wait_for(operator, timeout=10)

    asyncio.run(run())

    writes = [record for record in kube_api.emulator.request_log()
              if record.method in ('PATCH', 'PUT', 'POST', 'DELETE')]
    watches = [record for record in kube_api.emulator.request_log()
               if record.path.endswith(f'/{PLURAL}') and record.query.get('watch') == 'true']
    lists = [record for record in kube_api.emulator.request_log()
             if record.path.endswith(f'/{PLURAL}') and 'watch' not in record.query]
    assert seen == [(None, 'existing'), ('ADDED', 'new'), ('DELETED', 'existing')]
    assert writes == []
    # kopf resumed after the server timeout from a resourceVersion instead of listing again.
    assert len(watches) >= 2
    assert len(lists) == 1
    assert all('resourceVersion' in record.query for record in watches)
