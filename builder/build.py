"""Plan one PreprovisioningImage's boot image: choose the format, render, pack and lay it out.

``plan_image`` is the single entry point that the offline ``ppimage build`` command and the
workers share. It reads nothing from Kubernetes: the caller passes the PreprovisioningImage and
its Secret as dictionaries shaped like the API returns them. It raises a ``BuilderError`` whose
``reason`` is the condition reason for the status (ConfigurationError, MissingNetworkData,
ImageBuildInvalid); ``BaseImageError`` means the base images themselves are unusable.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path

from builder import images, payload, profiles
from builder.catalog import FORMATS, BaseImages, Catalog
from builder.errors import BuilderError, ConfigurationError, ImageBuildInvalid
from builder.manifests import name_of, namespace_of
from builder.rendering import Rendering
from builder.secret import decode_secret_data, parse_secret

log = logging.getLogger(__name__)


class MissingNetworkData(BuilderError):
    """The Secret named by ``networkDataName`` does not exist or is being deleted."""

    reason = "MissingNetworkData"


MESSAGE_ARCHITECTURE = "Architecture not supported"
MESSAGE_NO_FORMAT = "No acceptable image format supported"
MESSAGE_MISSING_SECRET = "NetworkData secret not found"


@dataclass(frozen=True)
class ImagePlan:
    """Everything needed to publish one host's image and report it in the status."""

    namespace: str
    name: str
    architecture: str
    image_format: str
    base: BaseImages
    rendering: Rendering
    payload: payload.Payload | None
    layout: images.Layout
    network_data_name: str | None
    network_data_version: str | None
    kernel_url: str | None
    extra_kernel_params: str | None


def choose_format(image: dict, base: BaseImages) -> str:
    """Return the first format of ``spec.acceptFormats`` that ``base`` has base images for."""
    for accepted in (image.get("spec") or {}).get("acceptFormats") or []:
        if accepted in FORMATS and base.supports(accepted):
            return accepted
    raise ConfigurationError(MESSAGE_NO_FORMAT)


def read_network_config(image: dict, secret: dict | None):
    """Parse the image's network data Secret into the model; None means the base image.

    Raises MissingNetworkData when the Secret is named but absent or being deleted, and
    ImageBuildInvalid (message prefixed "Cannot generate image") when its content is unusable.
    """
    secret_name = (image.get("spec") or {}).get("networkDataName")
    if not secret_name:
        return None
    if secret is None or (secret.get("metadata") or {}).get("deletionTimestamp"):
        raise MissingNetworkData(MESSAGE_MISSING_SECRET)
    where = f"Secret {namespace_of(image)}/{secret_name}"
    try:
        return parse_secret(decode_secret_data(secret), secret_name=where)
    except ImageBuildInvalid as error:
        # The secret module starts every message with the Secret's name.
        raise type(error)(f"Cannot generate image: {error}") from error


@functools.lru_cache(maxsize=64)
def _symlinked_dirs(path: Path, mtime_ns: int, size: int) -> frozenset[str]:
    return payload.symlinked_dirs(path)


def base_symlinked_dirs(base: BaseImages) -> frozenset[str]:
    """Return the directories that are symlinks in the base initramfs, cached per file state."""
    if base.initrd is None:
        return frozenset()
    stat = base.initrd.stat()
    return _symlinked_dirs(base.initrd, stat.st_mtime_ns, stat.st_size)


def plan_image(
    image: dict, secret: dict | None, catalog: Catalog, *, profile: str | None = None
) -> ImagePlan:
    """Render, pack and lay out the boot image of ``image``; raise a BuilderError on failure.

    ``profile`` overrides the catalog's profile for the architecture.
    """
    spec = image.get("spec") or {}
    architecture = str(spec.get("architecture") or "")
    base = catalog.lookup(architecture)
    if base is None:
        raise ConfigurationError(MESSAGE_ARCHITECTURE)
    image_format = choose_format(image, base)
    config = read_network_config(image, secret)
    profile_name = profile or base.profile

    try:
        rendering = profiles.render(
            config, profile=profile_name, image_format=image_format, base_ignition=base.ignition
        )
    except ImageBuildInvalid as error:
        raise type(error)(f"Cannot generate image: {error}") from error

    built = None
    if rendering.files:
        built = payload.pack_payload(rendering.files, skip_dirs=base_symlinked_dirs(base))
    try:
        layout = _layout(base, image_format, built)
    except ImageBuildInvalid as error:
        raise type(error)(f"Cannot generate image: {error}") from error

    network_data_name = spec.get("networkDataName") or None
    network_data_version = None
    if network_data_name and secret is not None:
        network_data_version = str((secret.get("metadata") or {}).get("resourceVersion") or "")
    kernel_url = None
    extra_kernel_params = None
    if image_format == "initrd":
        kernel_url = base.published_kernel_url()
        params = [base.extra_kernel_params.strip(), *rendering.kernel_params]
        extra_kernel_params = " ".join(param for param in params if param) or None

    log.debug("%s: planned %s image with profile %s", name_of(image), image_format, profile_name)
    return ImagePlan(
        namespace=namespace_of(image),
        name=(image.get("metadata") or {}).get("name", ""),
        architecture=architecture,
        image_format=image_format,
        base=base,
        rendering=rendering,
        payload=built,
        layout=layout,
        network_data_name=network_data_name,
        network_data_version=network_data_version,
        kernel_url=kernel_url,
        extra_kernel_params=extra_kernel_params,
    )


def _layout(base: BaseImages, image_format: str, built: payload.Payload | None) -> images.Layout:
    if image_format == "iso":
        assert base.iso is not None
        if built is None:
            return images.base_layout(base.iso)
        area = images.find_embed_area(base.iso, embed_path=base.embed_path)
        return images.iso_layout(base.iso, area, built.archive)
    assert base.initrd is not None
    if built is None:
        return images.base_layout(base.initrd)
    return images.initrd_layout(base.initrd, built.archive)
