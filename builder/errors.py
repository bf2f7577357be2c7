"""Exceptions raised by the builder.

``ImageBuildInvalid`` and ``ConfigurationError`` carry the condition reason the status
reports; every message names the offending field and value and the fix.
"""


class BuilderError(Exception):
    """Base class of every error the builder raises on purpose."""

    reason = "ImageBuildInvalid"


class ImageBuildInvalid(BuilderError):
    """The network data or its rendering cannot produce an image (reason ``ImageBuildInvalid``)."""

    reason = "ImageBuildInvalid"


class UnsupportedField(ImageBuildInvalid):
    """A field is valid for its format but the model or the chosen profile cannot express it."""


class ConfigurationError(BuilderError):
    """The base images cannot serve the spec (reason ``ConfigurationError``)."""

    reason = "ConfigurationError"


class BaseImageError(BuilderError):
    """A base image is missing, unreadable or lacks what the builder needs (a command error)."""

    reason = "ConfigurationError"
