"""Kubernetes API emulator for tests: real HTTP on 127.0.0.1 with API-server semantics.

It serves core v1 Secrets and Namespaces, coordination.k8s.io/v1 Leases and metal3.io/v1alpha1
PreprovisioningImages (with a /status subresource) plus the discovery endpoints, so the official
`kubernetes` client and kopf run against it unchanged. Every write gets a global resourceVersion
and stale writes get 409. Watches resume from a resourceVersion out of a bounded event history and
get 410 Expired once that history is compacted. Bookmarks and server-side timeouts are sent as the
API server sends them. Tests can compact the history, inject faults and read a request log.

It is written on aiohttp instead of extending kmock 0.8. kmock applies every write in one generic
handler as a plain dict merge and streams watches from a live bus without history. So
resourceVersions, preconditions, status isolation, generation, watch resumption, 410, bookmarks and
timeouts would each replace a kmock internal, which costs more than this module.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import copy
import dataclasses
import datetime
import json
import logging
import random
import re
import socket
import string
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

import jsonpatch
import jsonpointer
from aiohttp import web

logger = logging.getLogger(__name__)

JsonObject = dict[str, Any]

MERGE_PATCH = 'application/merge-patch+json'
STRATEGIC_MERGE_PATCH = 'application/strategic-merge-patch+json'
JSON_PATCH = 'application/json-patch+json'

TRUE_VALUES = frozenset({'1', 't', 'T', 'true', 'TRUE', 'True'})
DNS_SUBDOMAIN = re.compile(r'^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$')
INITIAL_EVENTS_END = 'k8s.io/initial-events-end'


# --- Resource types --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ResourceType:
    """One served resource and the server behaviour that differs between resources."""

    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool
    status_subresource: bool = False
    # CustomResources count metadata.generation. Secrets, Leases and Namespaces do not.
    tracks_generation: bool = False
    # CustomResources return the deleted object from DELETE. Most built-ins return a Status.
    returns_deleted_object: bool = False
    strategic_merge: bool = True

    @property
    def api_version(self) -> str:
        return f'{self.group}/{self.version}' if self.group else self.version

    @property
    def group_resource(self) -> str:
        """The `plural.group` spelling the API server uses in error messages."""
        return f'{self.plural}.{self.group}' if self.group else self.plural


SECRETS = ResourceType(group='', version='v1', plural='secrets', kind='Secret', namespaced=True)
NAMESPACES = ResourceType(
    group='', version='v1', plural='namespaces', kind='Namespace', namespaced=False,
    status_subresource=True,
)
LEASES = ResourceType(
    group='coordination.k8s.io', version='v1', plural='leases', kind='Lease', namespaced=True,
)
PREPROVISIONING_IMAGES = ResourceType(
    group='metal3.io', version='v1alpha1', plural='preprovisioningimages',
    kind='PreprovisioningImage', namespaced=True, status_subresource=True,
    tracks_generation=True, returns_deleted_object=True, strategic_merge=False,
)
DEFAULT_RESOURCES = (SECRETS, NAMESPACES, LEASES, PREPROVISIONING_IMAGES)


# --- Errors ----------------------------------------------------------------------------------


class ApiError(Exception):
    """A failure that the emulator returns as a Kubernetes Status object."""

    def __init__(
        self, *, code: int, reason: str, message: str, details: JsonObject | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.details = details

    def to_status(self) -> JsonObject:
        status: JsonObject = {
            'kind': 'Status', 'apiVersion': 'v1', 'metadata': {}, 'status': 'Failure',
            'message': self.message, 'reason': self.reason, 'code': self.code,
        }
        if self.details is not None:
            status['details'] = self.details
        return status


def _details(resource: ResourceType, name: str) -> JsonObject:
    details: JsonObject = {'name': name, 'kind': resource.plural}
    if resource.group:
        details['group'] = resource.group
    return details


def not_found(resource: ResourceType, name: str) -> ApiError:
    return ApiError(
        code=404, reason='NotFound', details=_details(resource, name),
        message=f'{resource.group_resource} "{name}" not found',
    )


def already_exists(resource: ResourceType, name: str) -> ApiError:
    return ApiError(
        code=409, reason='AlreadyExists', details=_details(resource, name),
        message=f'{resource.group_resource} "{name}" already exists',
    )


def conflict(resource: ResourceType, name: str, reason_text: str | None = None) -> ApiError:
    text = reason_text or (
        'the object has been modified; please apply your changes to the latest version'
        ' and try again'
    )
    return ApiError(
        code=409, reason='Conflict', details=_details(resource, name),
        message=f'Operation cannot be fulfilled on {resource.group_resource} "{name}": {text}',
    )


def invalid(resource: ResourceType, name: str, cause: str) -> ApiError:
    kind = f'{resource.kind}.{resource.group}' if resource.group else resource.kind
    return ApiError(
        code=422, reason='Invalid', details=_details(resource, name),
        message=f'{kind} "{name}" is invalid: {cause}',
    )


def bad_request(message: str) -> ApiError:
    return ApiError(code=400, reason='BadRequest', message=message)


STATUS_REASONS = {
    400: 'BadRequest', 401: 'Unauthorized', 403: 'Forbidden', 404: 'NotFound',
    405: 'MethodNotAllowed', 409: 'Conflict', 410: 'Gone', 422: 'Invalid',
    429: 'TooManyRequests', 500: 'InternalError', 503: 'ServiceUnavailable', 504: 'Timeout',
}


# --- Selectors -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Requirement:
    """One label selector term: `operator` is one of =, !=, in, notin, exists, !exists."""

    key: str
    operator: str
    values: frozenset[str] = frozenset()

    def matches(self, labels: dict[str, str]) -> bool:
        if self.operator == 'exists':
            return self.key in labels
        if self.operator == '!exists':
            return self.key not in labels
        if self.operator in ('=', 'in'):
            return self.key in labels and labels[self.key] in self.values
        # `!=` and `notin` also match objects without the key, as in the API server.
        return labels.get(self.key) not in self.values


LABEL_KEY = r'[A-Za-z0-9][-A-Za-z0-9_./]*'
SET_TERM = re.compile(rf'^({LABEL_KEY})\s+(in|notin)\s+\(([^)]*)\)$')
EQUALITY_TERM = re.compile(rf'^({LABEL_KEY})\s*(==|!=|=)\s*([-A-Za-z0-9_.]*)$')
EXISTS_TERM = re.compile(rf'^(!?)\s*({LABEL_KEY})$')


def _split_terms(selector: str) -> list[str]:
    """Split a selector on commas that are outside the parentheses of `in (a,b)`."""
    terms: list[str] = []
    depth = 0
    current = ''
    for char in selector:
        if char == ',' and depth == 0:
            terms.append(current.strip())
            current = ''
            continue
        depth += {'(': 1, ')': -1}.get(char, 0)
        current += char
    terms.append(current.strip())
    return [term for term in terms if term]


def parse_label_selector(selector: str | None) -> list[Requirement]:
    """Parse a labelSelector query value; an invalid term raises ApiError 400."""
    requirements = []
    for term in _split_terms(selector or ''):
        if match := SET_TERM.match(term):
            values = frozenset(value.strip() for value in match[3].split(',') if value.strip())
            requirements.append(Requirement(match[1], match[2], values))
        elif match := EQUALITY_TERM.match(term):
            operator = '=' if match[2] in ('=', '==') else '!='
            requirements.append(Requirement(match[1], operator, frozenset({match[3]})))
        elif match := EXISTS_TERM.match(term):
            requirements.append(Requirement(match[2], '!exists' if match[1] else 'exists'))
        else:
            raise bad_request(f'unable to parse requirement: invalid label selector "{term}"')
    return requirements


@dataclasses.dataclass(frozen=True)
class FieldRequirement:
    """One fieldSelector term on a supported field path."""

    path: str
    negated: bool
    value: str

    def matches(self, obj: JsonObject) -> bool:
        actual = _field_value(obj, self.path)
        return (actual != self.value) if self.negated else (actual == self.value)


def _field_value(obj: JsonObject, path: str) -> str:
    value: Any = obj
    for part in path.split('.'):
        value = value.get(part, '') if isinstance(value, dict) else ''
    return str(value)


def parse_field_selector(selector: str | None, resource: ResourceType) -> list[FieldRequirement]:
    """Parse a fieldSelector; fields other than name, namespace (and Secret type) raise 400."""
    supported = {'metadata.name', 'metadata.namespace'}
    if resource is SECRETS:
        supported.add('type')
    requirements = []
    for term in _split_terms(selector or ''):
        match = re.match(r'^([A-Za-z.]+)\s*(==|!=|=)\s*(.*)$', term)
        if match is None:
            raise bad_request(f'invalid field selector "{term}"')
        if match[1] not in supported:
            raise bad_request(f'field label not supported: {match[1]}')
        requirements.append(FieldRequirement(match[1], match[2] == '!=', match[3].strip()))
    return requirements


@dataclasses.dataclass(frozen=True)
class Selection:
    """The objects a list or watch request covers."""

    resource: ResourceType
    namespace: str | None = None
    labels: tuple[Requirement, ...] = ()
    fields: tuple[FieldRequirement, ...] = ()

    def matches(self, obj: JsonObject) -> bool:
        metadata = obj.get('metadata', {})
        if self.namespace is not None and metadata.get('namespace') != self.namespace:
            return False
        labels = metadata.get('labels') or {}
        if not all(requirement.matches(labels) for requirement in self.labels):
            return False
        return all(requirement.matches(obj) for requirement in self.fields)


# --- Patches ---------------------------------------------------------------------------------


def apply_merge_patch(target: Any, patch: Any) -> Any:
    """Apply an RFC 7386 JSON merge patch: null deletes a key, lists are replaced whole."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = apply_merge_patch(result.get(key), value)
    return result


def apply_json_patch(target: JsonObject, operations: Any) -> JsonObject:
    """Apply an RFC 6902 JSON patch; malformed patches raise 400, failed operations 422."""
    if not isinstance(operations, list):
        raise bad_request('a JSON patch must be a list of operations')
    try:
        return jsonpatch.JsonPatch(operations).apply(target)
    except jsonpatch.InvalidJsonPatch as error:
        raise bad_request(f'invalid JSON patch: {error}') from error
    except (jsonpatch.JsonPatchException, jsonpointer.JsonPointerException) as error:
        raise ApiError(
            code=422, reason='Invalid', message=f'the JSON patch failed: {error}',
        ) from error


# --- Store -----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class HistoryEvent:
    """One committed change. `old` is the object before the change (None for ADDED)."""

    resource_version: int
    type: str
    resource: ResourceType
    old: JsonObject | None
    new: JsonObject


class ExpiredError(Exception):
    """The requested resourceVersion is older than the retained event history."""

    def __init__(self, requested: int, oldest: int) -> None:
        super().__init__(f'too old resource version: {requested} ({oldest})')
        self.requested = requested
        self.oldest = oldest


ObjectKey = tuple[str, str | None, str]


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime('%Y-%m-%dT%H:%M:%SZ')


def _content_outside_metadata(obj: JsonObject) -> JsonObject:
    """The part of a CustomResource whose change bumps metadata.generation (spec and the rest)."""
    ignored = ('metadata', 'status', 'kind', 'apiVersion')
    return {key: value for key, value in obj.items() if key not in ignored}


def _merge_string_data(obj: JsonObject) -> None:
    """Move a Secret's stringData into base64-encoded data, as the API server does on write."""
    string_data = obj.pop('stringData', None) or {}
    if string_data:
        data = obj.setdefault('data', {})
        for key, value in string_data.items():
            data[key] = base64.b64encode(str(value).encode()).decode()


class ObjectStore:
    """Thread-safe object storage with a global resourceVersion and a bounded event history.

    Objects are stored and returned as deep copies, so callers never share state with the store.
    Every committed change appends one HistoryEvent. Once the history contains more than
    `history_limit` events the oldest are dropped, and watches from before them get 410.
    """

    def __init__(self, *, resources: Iterable[ResourceType], history_limit: int = 1000) -> None:
        self.resources = {resource.plural: resource for resource in resources}
        self.history_limit = history_limit
        self._lock = threading.Lock()
        self._objects: dict[ObjectKey, JsonObject] = {}
        self._resource_version = 1
        # Watches from a resourceVersion lower than this one cannot be served from history.
        self._compacted_version = 1
        self._history: deque[HistoryEvent] = deque()
        self._listeners: list[Callable[[], None]] = []

    # -- lookups

    def resource(self, name: str | ResourceType) -> ResourceType:
        if isinstance(name, ResourceType):
            return name
        try:
            return self.resources[name]
        except KeyError:
            known = sorted(self.resources)
            raise ValueError(f'unknown resource {name!r}: use one of {known}') from None

    @property
    def resource_version(self) -> int:
        with self._lock:
            return self._resource_version

    def get(self, resource: ResourceType, namespace: str | None, name: str) -> JsonObject:
        with self._lock:
            return copy.deepcopy(self._get_locked(resource, namespace, name))

    def list(self, selection: Selection) -> tuple[list[JsonObject], int]:
        """Return the matching objects sorted by namespace and name, and the current version."""
        with self._lock:
            items = [
                copy.deepcopy(obj)
                for (plural, _, _), obj in sorted(self._objects.items(), key=_sort_key)
                if plural == selection.resource.plural and selection.matches(obj)
            ]
            return items, self._resource_version

    def events_since(self, resource_version: int) -> tuple[list[HistoryEvent], int]:
        """Return the events after `resource_version` and the current version.

        Raises ExpiredError when events after `resource_version` were already dropped.
        """
        with self._lock:
            if resource_version < self._compacted_version:
                raise ExpiredError(resource_version, self._compacted_version)
            events = [
                event for event in self._history if event.resource_version > resource_version
            ]
            return events, self._resource_version

    # -- history control

    def compact(self, *, keep: int = 0) -> int:
        """Drop all but the last `keep` events and return the oldest version still watchable."""
        with self._lock:
            while len(self._history) > keep:
                self._compacted_version = self._history.popleft().resource_version
            if keep == 0:
                self._compacted_version = self._resource_version
            return self._compacted_version

    def add_listener(self, listener: Callable[[], None]) -> None:
        with self._lock:
            self._listeners.append(listener)

    def remove_listener(self, listener: Callable[[], None]) -> None:
        with self._lock:
            self._listeners.remove(listener)

    # -- writes

    def create(
        self, resource: ResourceType, namespace: str | None, body: Any,
    ) -> JsonObject:
        """Create an object; the result has uid, creationTimestamp and resourceVersion set."""
        obj = self._prepare_new_object(resource, namespace, body)
        name = obj['metadata']['name']
        with self._lock:
            key = (resource.plural, obj['metadata'].get('namespace'), name)
            if key in self._objects:
                raise already_exists(resource, name)
            self._resource_version += 1
            obj['metadata']['resourceVersion'] = str(self._resource_version)
            self._objects[key] = obj
            self._record_locked('ADDED', resource, None, obj)
            return copy.deepcopy(obj)

    def replace(
        self, resource: ResourceType, namespace: str | None, name: str, body: Any,
        *, subresource: str | None = None,
    ) -> JsonObject:
        """Replace an object (PUT); a non-empty metadata.resourceVersion must be current."""
        if not isinstance(body, dict) or not isinstance(body.get('metadata', {}), dict):
            raise bad_request('the request body must be a JSON object')
        body_name = body.get('metadata', {}).get('name')
        if body_name and body_name != name:
            raise bad_request(
                f'the name of the object ({body_name}) does not match the name on the URL ({name})'
            )
        with self._lock:
            old = self._get_locked(resource, namespace, name)
            expected = body.get('metadata', {}).get('resourceVersion')
            if expected and expected != old['metadata']['resourceVersion']:
                raise conflict(resource, name)
            return self._commit_update_locked(resource, old, body, subresource=subresource)

    def patch(
        self, resource: ResourceType, namespace: str | None, name: str, patch: Any,
        *, content_type: str = MERGE_PATCH, subresource: str | None = None,
    ) -> JsonObject:
        """Patch an object. A metadata.resourceVersion or uid in a merge patch is a precondition."""
        with self._lock:
            old = self._get_locked(resource, namespace, name)
            if content_type == JSON_PATCH:
                candidate = apply_json_patch(copy.deepcopy(old), patch)
            elif content_type in (MERGE_PATCH, STRATEGIC_MERGE_PATCH):
                if not isinstance(patch, dict):
                    raise bad_request('a merge patch must be a JSON object')
                self._check_preconditions(resource, old, patch.get('metadata') or {})
                # NOTE: a strategic merge patch is applied as a JSON merge patch, so list merge
                # strategies (metadata.finalizers, ownerReferences) and $patch directives are
                # not honoured: lists are replaced whole.
                candidate = apply_merge_patch(old, patch)
            else:
                raise _unsupported_media_type(content_type)

            # A JSON patch may also rewrite metadata.resourceVersion. Check it as a precondition.
            self._check_preconditions(resource, old, candidate.get('metadata') or {})
            return self._commit_update_locked(resource, old, candidate, subresource=subresource)

    def delete(
        self, resource: ResourceType, namespace: str | None, name: str,
        *, preconditions: JsonObject | None = None,
    ) -> tuple[JsonObject, bool]:
        """Delete an object, or mark it with deletionTimestamp while finalizers remain.

        Returns the object and whether it is gone from the store.
        """
        with self._lock:
            old = self._get_locked(resource, namespace, name)
            self._check_preconditions(resource, old, preconditions or {})
            metadata = old['metadata']
            if metadata.get('finalizers'):
                if metadata.get('deletionTimestamp'):
                    return copy.deepcopy(old), False
                marked = copy.deepcopy(old)
                marked['metadata']['deletionTimestamp'] = _now()
                marked['metadata']['deletionGracePeriodSeconds'] = 0
                # The API server also bumps a non-zero generation when it first sets
                # deletionTimestamp (k8s.io/apiserver registry/rest/delete.go, BeforeDelete).
                if resource.tracks_generation:
                    marked['metadata']['generation'] = metadata.get('generation', 0) + 1
                return self._store_locked(resource, old, marked), False
            return self._remove_locked(resource, old), True

    # -- internals (callers hold self._lock)

    def _get_locked(self, resource: ResourceType, namespace: str | None, name: str) -> JsonObject:
        key = (resource.plural, namespace if resource.namespaced else None, name)
        try:
            return self._objects[key]
        except KeyError:
            raise not_found(resource, name) from None

    def _prepare_new_object(
        self, resource: ResourceType, namespace: str | None, body: Any,
    ) -> JsonObject:
        if not isinstance(body, dict) or not isinstance(body.get('metadata', {}), dict):
            raise bad_request('the request body must be a JSON object')
        obj = copy.deepcopy(body)
        metadata = obj.setdefault('metadata', {})
        self._check_type_meta(resource, obj)

        name = metadata.get('name') or ''
        if not name and metadata.get('generateName'):
            suffix = ''.join(random.choices(string.ascii_lowercase + string.digits, k=5))
            name = metadata['name'] = metadata['generateName'] + suffix
        if not name:
            raise invalid(
                resource, '', 'metadata.name: Required value: name or generateName is required',
            )
        if len(name) > 253 or not DNS_SUBDOMAIN.match(name):
            raise invalid(
                resource, name,
                f'metadata.name: Invalid value: "{name}": a lowercase RFC 1123 subdomain'
                ' is required',
            )
        if metadata.get('resourceVersion'):
            # NOTE: the API server rejects this too. Its exact status code was not checked here.
            raise bad_request('resourceVersion should not be set on objects to be created')

        if resource.namespaced:
            body_namespace = metadata.get('namespace')
            if body_namespace and namespace and body_namespace != namespace:
                raise bad_request(
                    f'the namespace of the provided object ({body_namespace}) does not match'
                    f' the namespace sent on the request ({namespace})'
                )
            metadata['namespace'] = namespace or body_namespace
            if not metadata['namespace']:
                raise bad_request(f'{resource.kind} "{name}": a namespace is required')
        else:
            metadata.pop('namespace', None)

        for field in ('deletionTimestamp', 'deletionGracePeriodSeconds', 'managedFields'):
            metadata.pop(field, None)
        metadata['uid'] = str(uuid.uuid4())
        metadata['creationTimestamp'] = _now()
        if resource.tracks_generation:
            metadata['generation'] = 1
        else:
            metadata.pop('generation', None)
        # With a status subresource, writes to the main resource (create included) drop status.
        if resource.status_subresource:
            obj.pop('status', None)
        if resource is SECRETS:
            _merge_string_data(obj)
            obj.setdefault('type', 'Opaque')
        return obj

    @staticmethod
    def _check_type_meta(resource: ResourceType, obj: JsonObject) -> None:
        for field, expected in (('apiVersion', resource.api_version), ('kind', resource.kind)):
            if obj.get(field) and obj[field] != expected:
                raise bad_request(f'{field} {obj[field]!r} does not match the URL ({expected})')
            obj[field] = expected

    @staticmethod
    def _check_preconditions(
        resource: ResourceType, current: JsonObject, expected: JsonObject,
    ) -> None:
        metadata = current['metadata']
        name = metadata['name']
        expected_version = expected.get('resourceVersion')
        if expected_version and expected_version != metadata['resourceVersion']:
            raise conflict(resource, name)
        expected_uid = expected.get('uid')
        if expected_uid and expected_uid != metadata['uid']:
            raise conflict(
                resource, name,
                f'Precondition failed: UID in precondition: {expected_uid},'
                f' UID in object meta: {metadata["uid"]}',
            )

    def _commit_update_locked(
        self, resource: ResourceType, old: JsonObject, candidate: JsonObject,
        *, subresource: str | None,
    ) -> JsonObject:
        if subresource == 'status':
            # A write to /status changes status only. Spec and metadata changes are ignored.
            new = copy.deepcopy(old)
            new.pop('status', None)
            if candidate.get('status') is not None:
                new['status'] = copy.deepcopy(candidate['status'])
        else:
            new = copy.deepcopy(candidate)
            if not isinstance(new.get('metadata'), dict):
                raise bad_request('metadata must be a JSON object')
            self._check_type_meta(resource, new)
            if resource.status_subresource:
                new.pop('status', None)
                if 'status' in old:
                    new['status'] = copy.deepcopy(old['status'])
            if resource is SECRETS:
                _merge_string_data(new)

        # System fields come from the stored object whatever the request carries.
        metadata = new['metadata']
        old_metadata = old['metadata']
        system_fields = (
            'name', 'namespace', 'uid', 'creationTimestamp', 'deletionTimestamp',
            'deletionGracePeriodSeconds', 'generation', 'resourceVersion',
        )
        for field in system_fields:
            metadata.pop(field, None)
            if field in old_metadata:
                metadata[field] = old_metadata[field]

        name = old_metadata['name']
        if old_metadata.get('deletionTimestamp'):
            old_finalizers = set(old_metadata.get('finalizers') or [])
            added = set(metadata.get('finalizers') or []) - old_finalizers
            if added:
                raise invalid(
                    resource, name,
                    'metadata.finalizers: Forbidden: no new finalizers can be added if the object'
                    f' is being deleted, found new finalizers {sorted(added)}',
                )
        if resource.tracks_generation:
            if _content_outside_metadata(new) != _content_outside_metadata(old):
                metadata['generation'] = old_metadata.get('generation', 0) + 1

        # A write that changes nothing keeps the resourceVersion and emits no event.
        if new == old:
            return copy.deepcopy(old)
        if metadata.get('deletionTimestamp') and not metadata.get('finalizers'):
            return self._remove_locked(resource, new)
        return self._store_locked(resource, old, new)

    def _store_locked(self, resource: ResourceType, old: JsonObject, new: JsonObject) -> JsonObject:
        self._resource_version += 1
        new['metadata']['resourceVersion'] = str(self._resource_version)
        metadata = new['metadata']
        self._objects[(resource.plural, metadata.get('namespace'), metadata['name'])] = new
        self._record_locked('MODIFIED', resource, old, new)
        return copy.deepcopy(new)

    def _remove_locked(self, resource: ResourceType, obj: JsonObject) -> JsonObject:
        metadata = obj['metadata']
        old = self._objects.pop((resource.plural, metadata.get('namespace'), metadata['name']))
        removed = copy.deepcopy(obj)
        self._resource_version += 1
        removed['metadata']['resourceVersion'] = str(self._resource_version)
        self._record_locked('DELETED', resource, old, removed)
        return copy.deepcopy(removed)

    def _record_locked(
        self, event_type: str, resource: ResourceType, old: JsonObject | None, new: JsonObject,
    ) -> None:
        event = HistoryEvent(self._resource_version, event_type, resource, old, copy.deepcopy(new))
        self._history.append(event)
        while len(self._history) > self.history_limit:
            self._compacted_version = self._history.popleft().resource_version
        for listener in self._listeners:
            listener()


def _sort_key(item: tuple[ObjectKey, JsonObject]) -> tuple[str, str, str]:
    (plural, namespace, name), _ = item
    return plural, namespace or '', name


def _unsupported_media_type(content_type: str) -> ApiError:
    return ApiError(
        code=415, reason='UnsupportedMediaType',
        message=(
            f'the body of the request was in an unknown format ({content_type}) - accepted media'
            f' types include: {JSON_PATCH}, {MERGE_PATCH}'
        ),
    )


def translate_event(event: HistoryEvent, selection: Selection) -> str | None:
    """Return the watch event type that a watch of `selection` receives for `event`, or None.

    As in the API server, an object that stops matching a selector is sent as DELETED and one that
    starts matching as ADDED.
    """
    if event.resource is not selection.resource:
        return None
    new_matches = selection.matches(event.new)
    old_matches = event.old is not None and selection.matches(event.old)
    if event.type == 'MODIFIED':
        if old_matches and new_matches:
            return 'MODIFIED'
        if old_matches:
            return 'DELETED'
        return 'ADDED' if new_matches else None
    return event.type if new_matches else None


# --- Faults and request log ------------------------------------------------------------------


@dataclasses.dataclass
class Fault:
    """Fail the next `count` requests matching `method` and `path` with an error Status."""

    path: str | re.Pattern[str]
    status: int
    count: int = 1
    method: str | None = None
    message: str = 'injected fault'

    def matches(self, method: str, path: str) -> bool:
        if self.method is not None and self.method.upper() != method:
            return False
        if isinstance(self.path, re.Pattern):
            return self.path.fullmatch(path) is not None
        return self.path == path


@dataclasses.dataclass
class RequestRecord:
    """One served request. `status` stays None while a watch stream is open."""

    method: str
    path: str
    query: dict[str, str]
    content_type: str
    body: Any
    status: int | None = None


# --- HTTP server -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Target:
    """The resource, namespace, name and subresource addressed by a request path."""

    resource: ResourceType
    namespace: str | None
    name: str | None
    subresource: str | None


class KubeEmulator:
    """The aiohttp application and the test controls around one ObjectStore.

    Bookmarks go to every watch that asked for them each `bookmark_interval` seconds. A watch
    without timeoutSeconds ends after `default_watch_timeout` seconds, like the API server's
    --min-request-timeout of 1800 s (the real server also randomises it up to twice that).
    """

    def __init__(
        self, *, resources: Iterable[ResourceType] = DEFAULT_RESOURCES,
        history_limit: int = 1000, bookmark_interval: float = 60.0,
        default_watch_timeout: float = 1800.0,
    ) -> None:
        self.store = ObjectStore(resources=resources, history_limit=history_limit)
        self.bookmark_interval = bookmark_interval
        self.default_watch_timeout = default_watch_timeout
        self._faults: list[Fault] = []
        self._requests: list[RequestRecord] = []
        self._control_lock = threading.Lock()
        self._closing = threading.Event()
        self._wakers: set[Callable[[], None]] = set()

    # -- test controls (thread-safe, callable from any thread)

    def create_object(
        self, resource: str | ResourceType, body: JsonObject, *, namespace: str | None = None,
    ) -> JsonObject:
        target = self.store.resource(resource)
        namespace = namespace or body.get('metadata', {}).get('namespace')
        return self.store.create(target, namespace, body)

    def get_object(
        self, resource: str | ResourceType, name: str, *, namespace: str | None = None,
    ) -> JsonObject:
        return self.store.get(self.store.resource(resource), namespace, name)

    def patch_object(
        self, resource: str | ResourceType, name: str, patch: JsonObject,
        *, namespace: str | None = None, subresource: str | None = None,
    ) -> JsonObject:
        """Apply a JSON merge patch, to /status when `subresource` is 'status'."""
        target = self.store.resource(resource)
        return self.store.patch(target, namespace, name, patch, subresource=subresource)

    def delete_object(
        self, resource: str | ResourceType, name: str, *, namespace: str | None = None,
    ) -> JsonObject:
        obj, _ = self.store.delete(self.store.resource(resource), namespace, name)
        return obj

    def compact_history(self, *, keep: int = 0) -> int:
        """Drop the event history so that watches from older resourceVersions get 410."""
        return self.store.compact(keep=keep)

    def inject_fault(
        self, path: str | re.Pattern[str], *, status: int, count: int = 1,
        method: str | None = None, message: str = 'injected fault',
    ) -> Fault:
        fault = Fault(path=path, status=status, count=count, method=method, message=message)
        with self._control_lock:
            self._faults.append(fault)
        return fault

    def request_log(self) -> list[RequestRecord]:
        with self._control_lock:
            return [dataclasses.replace(record) for record in self._requests]

    def clear_request_log(self) -> None:
        with self._control_lock:
            self._requests.clear()

    def close(self) -> None:
        """End all open watch streams."""
        self._closing.set()
        for waker in list(self._wakers):
            waker()

    # -- aiohttp application

    def make_app(self) -> web.Application:
        app = web.Application(middlewares=[self._log_and_inject_faults])
        app.router.add_route('*', '/{path:.*}', self._dispatch)
        return app

    @web.middleware
    async def _log_and_inject_faults(
        self, request: web.Request, handler: Callable[[web.Request], Any],
    ) -> web.StreamResponse:
        body: Any = None
        if request.can_read_body:
            raw = await request.read()
            try:
                body = json.loads(raw) if raw else None
            except ValueError:
                body = raw.decode(errors='replace')
        record = RequestRecord(
            method=request.method, path=request.path, query=dict(request.query),
            content_type=request.headers.get('Content-Type', ''), body=body,
        )
        with self._control_lock:
            self._requests.append(record)
            fault = next((f for f in self._faults if f.matches(request.method, request.path)), None)
            if fault is not None:
                fault.count -= 1
                if fault.count <= 0:
                    self._faults.remove(fault)

        if fault is not None:
            logger.info('Injecting HTTP %s into %s %s', fault.status, request.method, request.path)
            error = ApiError(
                code=fault.status, reason=STATUS_REASONS.get(fault.status, 'Unknown'),
                message=fault.message,
            )
            response = _status_response(error)
        else:
            try:
                response = await handler(request)
            except ApiError as error:
                logger.info('%s %s failed with HTTP %s %s: %s', request.method, request.path,
                            error.code, error.reason, error.message)
                response = _status_response(error)
        record.status = response.status
        return response

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        path = request.path.rstrip('/') or '/'
        discovery = self._discovery(path)
        if discovery is not None:
            if request.method != 'GET':
                raise ApiError(code=405, reason='MethodNotAllowed', message='only GET is allowed')
            return web.json_response(discovery)

        target = self._parse_target(path)
        method = request.method
        if target.subresource is not None and (
            target.subresource != 'status' or not target.resource.status_subresource
        ):
            raise ApiError(code=404, reason='NotFound', message=f'the server could not find {path}')
        if target.name is None:
            if method == 'GET':
                if request.query.get('watch') in TRUE_VALUES:
                    return await self._watch(request, target)
                return web.json_response(self._list(request, target))
            if method == 'POST':
                if target.resource.namespaced and target.namespace is None:
                    raise ApiError(
                        code=405, reason='MethodNotAllowed', message='a namespace is required',
                    )
                body = await _read_json(request)
                created = self.store.create(target.resource, target.namespace, body)
                return web.json_response(created, status=201)
            raise ApiError(
                code=405, reason='MethodNotAllowed',
                message=f'{method} is not supported on a collection by this emulator',
            )

        if target.resource.namespaced and target.namespace is None:
            raise ApiError(code=404, reason='NotFound', message=f'the server could not find {path}')
        if method == 'GET':
            return web.json_response(self.store.get(target.resource, target.namespace, target.name))
        if method == 'PUT':
            body = await _read_json(request)
            replaced = self.store.replace(
                target.resource, target.namespace, target.name, body,
                subresource=target.subresource,
            )
            return web.json_response(replaced)
        if method == 'PATCH':
            return web.json_response(await self._patch(request, target))
        if method == 'DELETE' and target.subresource is None:
            options = await _read_json(request) if request.can_read_body else None
            preconditions = options.get('preconditions') if isinstance(options, dict) else None
            obj, removed = self.store.delete(
                target.resource, target.namespace, target.name, preconditions=preconditions,
            )
            if removed and not target.resource.returns_deleted_object:
                details = _details(target.resource, target.name)
                details['uid'] = obj['metadata']['uid']
                return web.json_response({
                    'kind': 'Status', 'apiVersion': 'v1', 'metadata': {}, 'status': 'Success',
                    'details': details,
                })
            return web.json_response(obj)
        raise ApiError(code=405, reason='MethodNotAllowed', message=f'{method} is not supported')

    async def _patch(self, request: web.Request, target: Target) -> JsonObject:
        content_type = request.content_type
        if content_type == STRATEGIC_MERGE_PATCH and not target.resource.strategic_merge:
            # CustomResources reject strategic merge patches in the API server as well.
            raise _unsupported_media_type(content_type)
        if content_type not in (MERGE_PATCH, STRATEGIC_MERGE_PATCH, JSON_PATCH):
            # TODO: server-side apply (application/apply-patch+yaml) is not emulated.
            raise _unsupported_media_type(content_type)
        body = await _read_json(request)
        assert target.name is not None
        return self.store.patch(
            target.resource, target.namespace, target.name, body,
            content_type=content_type, subresource=target.subresource,
        )

    def _list(self, request: web.Request, target: Target) -> JsonObject:
        # NOTE: `limit` is ignored and the whole list comes back without a continue token, which
        # the API allows. A list always reads the latest state, whatever resourceVersion it names.
        selection = self._selection(request, target)
        items, resource_version = self.store.list(selection)
        return {
            'kind': f'{target.resource.kind}List', 'apiVersion': target.resource.api_version,
            'metadata': {'resourceVersion': str(resource_version)}, 'items': items,
        }

    def _selection(self, request: web.Request, target: Target) -> Selection:
        labels = parse_label_selector(request.query.get('labelSelector'))
        fields = parse_field_selector(request.query.get('fieldSelector'), target.resource)
        return Selection(target.resource, target.namespace, tuple(labels), tuple(fields))

    # -- watch

    async def _watch(self, request: web.Request, target: Target) -> web.StreamResponse:
        selection = self._selection(request, target)
        query = request.query
        bookmarks = query.get('allowWatchBookmarks') in TRUE_VALUES
        requested = query.get('resourceVersion', '')
        timeout = self.default_watch_timeout
        if query.get('timeoutSeconds'):
            timeout = _parse_int(query['timeoutSeconds'], 'timeoutSeconds')
        # Without a resourceVersion (or with "0") a watch starts with the current objects.
        send_initial = requested in ('', '0') or query.get('sendInitialEvents') in TRUE_VALUES
        position = 0 if send_initial else _parse_int(requested, 'resourceVersion')

        response = web.StreamResponse(headers={'Content-Type': 'application/json'})
        response.enable_chunked_encoding()
        await response.prepare(request)

        loop = asyncio.get_running_loop()
        wakeup = asyncio.Event()

        def wake() -> None:
            loop.call_soon_threadsafe(wakeup.set)

        self.store.add_listener(wake)
        self._wakers.add(wake)
        deadline = loop.time() + timeout
        next_bookmark = loop.time() + self.bookmark_interval
        logger.debug('Watch of %s started at version %s', target.resource.group_resource, requested)
        try:
            if send_initial:
                items, position = self.store.list(selection)
                for item in items:
                    await _write_event(response, 'ADDED', item)
                if query.get('sendInitialEvents') in TRUE_VALUES and bookmarks:
                    await _write_event(
                        response, 'BOOKMARK',
                        _bookmark(target.resource, position, initial_events_end=True),
                    )

            while not self._closing.is_set():
                wakeup.clear()
                try:
                    events, current = self.store.events_since(position)
                except ExpiredError as error:
                    expired = ApiError(code=410, reason='Expired', message=str(error))
                    await _write_event(response, 'ERROR', expired.to_status())
                    break
                for event in events:
                    event_type = translate_event(event, selection)
                    if event_type is not None:
                        await _write_event(response, event_type, event.new)
                position = max(position, current)

                now = loop.time()
                if now >= deadline:
                    break
                if bookmarks and now >= next_bookmark:
                    await _write_event(response, 'BOOKMARK', _bookmark(target.resource, position))
                    next_bookmark = now + self.bookmark_interval
                wait = deadline - now
                if bookmarks:
                    wait = min(wait, next_bookmark - now)
                try:
                    await asyncio.wait_for(wakeup.wait(), timeout=max(wait, 0.0))
                except TimeoutError:
                    pass
        except ConnectionResetError:
            logger.debug('Watch of %s closed by the client', target.resource.group_resource)
        finally:
            self.store.remove_listener(wake)
            self._wakers.discard(wake)
        return response

    # -- paths and discovery

    def _parse_target(self, path: str) -> Target:
        parts = path.strip('/').split('/')
        if parts[0] == 'api' and len(parts) >= 3:
            group, version, rest = '', parts[1], parts[2:]
        elif parts[0] == 'apis' and len(parts) >= 4:
            group, version, rest = parts[1], parts[2], parts[3:]
        else:
            raise ApiError(code=404, reason='NotFound', message=f'the server could not find {path}')

        served = {
            resource.plural: resource for resource in self.store.resources.values()
            if resource.group == group and resource.version == version
        }
        # /api/v1/namespaces/NS/secrets is a namespaced collection, /api/v1/namespaces/NS a
        # Namespace, so the segment after the namespace decides.
        namespace = None
        if len(rest) >= 3 and rest[0] == 'namespaces' and rest[2] in served:
            if served[rest[2]].namespaced:
                namespace, rest = rest[1], rest[2:]
        if rest[0] not in served or len(rest) > 3:
            raise ApiError(code=404, reason='NotFound', message=f'the server could not find {path}')
        return Target(
            resource=served[rest[0]], namespace=namespace,
            name=rest[1] if len(rest) > 1 else None,
            subresource=rest[2] if len(rest) > 2 else None,
        )

    def _discovery(self, path: str) -> JsonObject | None:
        resources = list(self.store.resources.values())
        groups: dict[str, list[str]] = {}
        for resource in resources:
            if resource.group and resource.version not in groups.setdefault(resource.group, []):
                groups[resource.group].append(resource.version)

        if path == '/version':
            # The official client requires every field of VersionInfo.
            return {
                'major': '1', 'minor': '31', 'gitVersion': 'v1.31.0-kube-emulator',
                'gitCommit': '', 'gitTreeState': 'clean', 'buildDate': '1970-01-01T00:00:00Z',
                'goVersion': '', 'compiler': 'gc', 'platform': 'linux/amd64',
            }
        if path == '/api':
            return {'kind': 'APIVersions', 'versions': ['v1'], 'serverAddressByClientCIDRs': []}
        if path == '/apis':
            return {
                'kind': 'APIGroupList', 'apiVersion': 'v1',
                'groups': [_api_group(group, versions) for group, versions in groups.items()],
            }
        parts = path.strip('/').split('/')
        if parts[0] == 'apis' and len(parts) == 2 and parts[1] in groups:
            group = _api_group(parts[1], groups[parts[1]])
            return {'kind': 'APIGroup', 'apiVersion': 'v1', **group}
        if path == '/api/v1':
            return _api_resource_list('', 'v1', resources)
        if parts[0] == 'apis' and len(parts) == 3 and parts[2] in groups.get(parts[1], []):
            return _api_resource_list(parts[1], parts[2], resources)
        return None


def _api_group(group: str, versions: list[str]) -> JsonObject:
    listed = [{'groupVersion': f'{group}/{version}', 'version': version} for version in versions]
    return {'name': group, 'versions': listed, 'preferredVersion': listed[0]}


def _api_resource_list(group: str, version: str, resources: list[ResourceType]) -> JsonObject:
    verbs = ['create', 'delete', 'get', 'list', 'patch', 'update', 'watch']
    entries = []
    for resource in resources:
        if resource.group != group or resource.version != version:
            continue
        common = {'namespaced': resource.namespaced, 'kind': resource.kind}
        entries.append({
            'name': resource.plural, 'singularName': resource.kind.lower(), 'verbs': verbs,
            **common,
        })
        if resource.status_subresource:
            entries.append({
                'name': f'{resource.plural}/status', 'singularName': '',
                'verbs': ['get', 'patch', 'update'], **common,
            })
    return {
        'kind': 'APIResourceList', 'apiVersion': 'v1',
        'groupVersion': f'{group}/{version}' if group else version, 'resources': entries,
    }


def _bookmark(
    resource: ResourceType, resource_version: int, *, initial_events_end: bool = False,
) -> JsonObject:
    metadata: JsonObject = {'resourceVersion': str(resource_version)}
    if initial_events_end:
        metadata['annotations'] = {INITIAL_EVENTS_END: 'true'}
    return {'kind': resource.kind, 'apiVersion': resource.api_version, 'metadata': metadata}


async def _write_event(response: web.StreamResponse, event_type: str, obj: JsonObject) -> None:
    line = json.dumps({'type': event_type, 'object': obj}) + '\n'
    await response.write(line.encode())


async def _read_json(request: web.Request) -> Any:
    raw = await request.read()
    try:
        return json.loads(raw) if raw else None
    except ValueError as error:
        raise bad_request(f'the request body is not valid JSON: {error}') from error


def _parse_int(value: str, name: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise bad_request(f'{name}: invalid value "{value}": an integer is required') from None


def _status_response(error: ApiError) -> web.Response:
    return web.json_response(error.to_status(), status=error.code)


class EmulatorServer:
    """Serve a KubeEmulator on 127.0.0.1 from an event loop in a background thread."""

    def __init__(self, emulator: KubeEmulator, *, port: int = 0) -> None:
        self.emulator = emulator
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind(('127.0.0.1', port))
        self.port: int = self._socket.getsockname()[1]
        self.url = f'http://127.0.0.1:{self.port}'
        self._loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                        name=f'kube-emulator-{self.port}')

    def start(self) -> None:
        self._thread.start()
        future = asyncio.run_coroutine_threadsafe(self._start_site(), self._loop)
        future.result(timeout=10)
        logger.info('Kubernetes API emulator listening on %s', self.url)

    async def _start_site(self) -> None:
        self._runner = web.AppRunner(
            self.emulator.make_app(), handle_signals=False, shutdown_timeout=1.0,
            handler_cancellation=True, access_log=None,
        )
        await self._runner.setup()
        await web.SockSite(self._runner, self._socket).start()

    def stop(self) -> None:
        self.emulator.close()
        if self._runner is not None:
            future = asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop)
            future.result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()
        self._socket.close()
        logger.info('Kubernetes API emulator on %s stopped', self.url)

    def __enter__(self) -> EmulatorServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def main() -> None:
    """Run the emulator in the foreground on 127.0.0.1 until interrupted."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--port', type=int, default=8001, help='TCP port on 127.0.0.1')
    parser.add_argument('--bookmark-interval', type=float, default=60.0,
                        help='seconds between watch bookmarks')
    parser.add_argument('--history-limit', type=int, default=1000,
                        help='watch events kept before the oldest are dropped (410 after that)')
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    emulator = KubeEmulator(bookmark_interval=args.bookmark_interval,
                            history_limit=args.history_limit)
    with EmulatorServer(emulator, port=args.port) as server:
        print(f'serving on {server.url}; press Ctrl-C to stop', flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass


if __name__ == '__main__':
    main()
