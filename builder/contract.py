"""The contract between watcher, workers and image servers: task, queues, Redis keys, tokens.

The watcher and the workers never import each other; both import this module. A build message
is the task ``ppimage.build`` with the JSON keyword arguments ``namespace``, ``name``, ``uid``
and ``token`` and nothing else, so Secret contents never enter the broker.

The *desired build token* of a PreprovisioningImage is a hash of everything its image depends
on: the spec fields, an HMAC of the Secret's content (keyed, so the token reveals nothing about
the content), the chosen base image's digest and the renderer version. Equal tokens mean equal
images, so a restart never rebuilds or changes a URL for unchanged inputs.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Mapping
from pathlib import Path

from builder.catalog import DEFAULT_PROFILE, Catalog, canonical_architecture
from builder.errors import ImageBuildInvalid
from builder.images import digest_file
from builder.secret import decode_secret_data

TASK_NAME = "ppimage.build"
QUEUE_PREFIX = "build."

# Bump when rendering or packing changes the bytes of an image for the same inputs, so every
# image is rebuilt once after an upgrade.
RENDERER_VERSION = "1"

KEY_PREFIX = "ppimage:"
# A random HMAC key shared by every watcher and worker, created once in Redis.
HMAC_KEY = KEY_PREFIX + "hmac-key"
# Sorted set of "namespace/name/uid" members scored by the time a waiting retry is due.
RETRY_SCHEDULE = KEY_PREFIX + "retry"


def queue_name(architecture: str) -> str:
    """Return the Celery queue for ``architecture``: aliases share one queue."""
    return QUEUE_PREFIX + canonical_architecture(architecture)


def desired_key(uid: str) -> str:
    """Return the Redis key holding the latest desired token of the object ``uid``."""
    return f"{KEY_PREFIX}desired:{uid}"


def built_key(uid: str) -> str:
    """Return the Redis key holding the token of the image last published for ``uid``."""
    return f"{KEY_PREFIX}built:{uid}"


def waiting_key(uid: str) -> str:
    """Return the Redis key set while a build message for ``uid`` waits in a queue."""
    return f"{KEY_PREFIX}waiting:{uid}"


def lease_key(uid: str) -> str:
    """Return the Redis key of the lease a worker takes while it builds ``uid``."""
    return f"{KEY_PREFIX}lease:{uid}"


def redeliveries_key(uid: str, token: str) -> str:
    """Return the Redis counter of deliveries of one (uid, token) build."""
    return f"{KEY_PREFIX}redeliveries:{uid}:{token}"


def task_kwargs(*, namespace: str, name: str, uid: str, token: str) -> dict[str, str]:
    """Return the keyword arguments of a build message: references only."""
    return {"namespace": namespace, "name": name, "uid": uid, "token": token}


def secret_digest(data: Mapping[str, bytes] | None, *, key: bytes) -> str:
    """Return an HMAC-SHA256 of a Secret's decoded data, or "none" when there is no Secret."""
    if data is None:
        return "none"
    mac = hmac.new(key, digestmod=hashlib.sha256)
    for name in sorted(data):
        value = data[name]
        mac.update(len(name).to_bytes(4, "big") + name.encode())
        mac.update(len(value).to_bytes(8, "big") + value)
    return mac.hexdigest()


def desired_token(*, spec: Mapping, secret_hmac: str, base_digest: str, profile: str) -> str:
    """Return the desired build token from the spec, Secret HMAC, base digest and profile."""
    material = {
        # Missing and empty fields hash alike, as the watcher stores them.
        "architecture": spec.get("architecture") or "",
        "acceptFormats": list(spec.get("acceptFormats") or []),
        "networkDataName": spec.get("networkDataName") or "",
        "secret": secret_hmac,
        "base": base_digest,
        "profile": profile,
        "renderer": RENDERER_VERSION,
    }
    encoded = json.dumps(material, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(encoded).hexdigest()[:32]


# Shared by watcher and workers: both must derive the same token from the same live objects.


def chosen_base_file(spec: Mapping, catalog: Catalog) -> tuple[str, Path] | None:
    """Return the image format and base file that ``spec`` selects, or None when none fits.

    The format is the first of ``spec.acceptFormats`` the architecture has base images for,
    the same choice ``builder.build.choose_format`` makes.
    """
    base = catalog.lookup(str(spec.get("architecture") or ""))
    if base is None:
        return None
    for accepted in spec.get("acceptFormats") or []:
        if accepted == "iso" and base.supports("iso"):
            return "iso", base.iso
        if accepted == "initrd" and base.supports("initrd"):
            return "initrd", base.initrd
    return None


def live_token(
    *,
    image: Mapping,
    secret: Mapping | None,
    hmac_key: bytes,
    catalog: Catalog,
    profile: str | None = None,
) -> str:
    """Return the build token of a PreprovisioningImage from its live spec and Secret.

    ``secret`` is the Secret named by ``spec.networkDataName``, or None when it does not exist;
    one with a ``deletionTimestamp`` counts as absent. A Secret whose data does not decode is
    hashed as its raw text, so fixing it changes the token. ``profile`` overrides the catalog's
    profile. Raises BaseImageError when the chosen base file cannot be read.
    """
    spec = image.get("spec") or {}
    data: Mapping[str, bytes] | None = None
    if spec.get("networkDataName") and secret is not None:
        if not (secret.get("metadata") or {}).get("deletionTimestamp"):
            data = _secret_values(secret)

    chosen = chosen_base_file(spec, catalog)
    base_digest = digest_file(chosen[1]) if chosen else "none"
    base = catalog.lookup(str(spec.get("architecture") or ""))
    profile_name = profile or (base.profile if base else DEFAULT_PROFILE)
    return desired_token(
        spec=spec,
        secret_hmac=secret_digest(data, key=hmac_key),
        base_digest=base_digest,
        profile=profile_name,
    )


def _secret_values(secret: Mapping) -> Mapping[str, bytes]:
    try:
        return decode_secret_data(dict(secret))
    except ImageBuildInvalid:
        raw = {"data": secret.get("data"), "stringData": secret.get("stringData")}
        return {"\0undecodable": json.dumps(raw, sort_keys=True, default=str).encode()}


def retry_member(*, namespace: str, name: str, uid: str) -> str:
    """Return the RETRY_SCHEDULE member of one object: ``namespace/name/uid``."""
    return f"{namespace}/{name}/{uid}"


# Waits of the retry schedule for a missing Secret: the first, doubled per attempt up to the max.
RETRY_FIRST_SECONDS = 10.0
RETRY_MAX_SECONDS = 600.0


def retry_delay_key(uid: str) -> str:
    """Return the Redis key holding the last retry wait, in seconds, of the object ``uid``."""
    return f"{KEY_PREFIX}retry-delay:{uid}"


# The same token in two steps, for a watcher that keeps only each Secret's HMAC in memory.


def secret_hmac(secret: Mapping | None, *, hmac_key: bytes) -> str:
    """Return the Secret part of the build token, as ``live_token`` computes it.

    "none" stands for no Secret or one with a ``deletionTimestamp``. Pair it with
    ``token_from_parts`` only for a spec that names the Secret; without ``networkDataName``
    the Secret part is always "none".
    """
    if secret is None or (secret.get("metadata") or {}).get("deletionTimestamp"):
        return "none"
    return secret_digest(_secret_values(secret), key=hmac_key)


def token_from_parts(
    *, spec: Mapping, secret_hmac: str, catalog: Catalog, profile: str | None = None
) -> str:
    """Return the same token as ``live_token`` from the spec and a precomputed Secret HMAC.

    Raises BaseImageError when the chosen base file cannot be read.
    """
    if not spec.get("networkDataName"):
        secret_hmac = "none"
    chosen = chosen_base_file(spec, catalog)
    base_digest = digest_file(chosen[1]) if chosen else "none"
    base = catalog.lookup(str(spec.get("architecture") or ""))
    profile_name = profile or (base.profile if base else DEFAULT_PROFILE)
    return desired_token(
        spec=spec, secret_hmac=secret_hmac, base_digest=base_digest, profile=profile_name
    )
