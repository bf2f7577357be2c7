"""Render the normalized network model into the files (or kernel arguments) of one profile.

``render(config, profile=..., image_format=...)`` checks every value that could break out of
its line or file (ImageBuildInvalid), then the fields the profile can express
(UnsupportedField naming the field and the profile), and returns a ``Rendering``. A None
config (a Secret with no network data) renders no files and no kernel arguments.
"""

from __future__ import annotations

from builder.errors import ConfigurationError
from builder.model import NetworkConfig
from builder.profiles import base, dracut, glean, ignition, networkd, networkmanager
from builder.profiles.base import ALL_FIELDS, IMAGE_FORMATS, Profile
from builder.rendering import Rendering

DEFAULT_PROFILE = networkmanager.NAME

PROFILES: dict[str, Profile] = {
    networkmanager.NAME: Profile(
        name=networkmanager.NAME,
        supported_fields=ALL_FIELDS,
        render=networkmanager.render,
        summary="NetworkManager keyfiles in /etc/NetworkManager/system-connections",
    ),
    ignition.NAME: Profile(
        name=ignition.NAME,
        supported_fields=ALL_FIELDS,
        render=ignition.render,
        summary="/config.ign carrying NetworkManager keyfiles, merged with the agent's config",
    ),
    glean.NAME: Profile(
        name=glean.NAME,
        supported_fields=glean.SUPPORTED_FIELDS,
        render=glean.render,
        summary="config drive network_data.json and meta_data.json under /mnt/config",
    ),
    networkd.NAME: Profile(
        name=networkd.NAME,
        supported_fields=ALL_FIELDS,
        render=networkd.render,
        summary="systemd-networkd .network and .netdev units in /etc/systemd/network",
    ),
    dracut.NAME: Profile(
        name=dracut.NAME,
        supported_fields=dracut.SUPPORTED_FIELDS,
        render=dracut.render,
        summary="dracut ip=, bond=, vlan=, rd.route= and nameserver= kernel arguments only",
    ),
}


def render(
    config: NetworkConfig | None,
    *,
    profile: str,
    image_format: str,
    base_ignition: dict | None = None,
) -> Rendering:
    """Render ``config`` with ``profile`` for ``image_format`` ("iso" or "initrd").

    ``base_ignition`` is the agent's own Ignition config from the base image catalog; only
    the ignition profile reads it. Raises ConfigurationError for an unknown profile,
    ImageBuildInvalid for unsafe or inconsistent values and UnsupportedField for a field the
    profile cannot express.
    """
    chosen = PROFILES.get(profile)
    if chosen is None:
        raise ConfigurationError(
            f"profile {profile!r} is unknown; set the base image catalog's profile to one of "
            + ", ".join(PROFILES)
        )
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"image format {image_format!r} is not one of {IMAGE_FORMATS}")
    if config is not None:
        base.check_values(config)
        base.check_supported(chosen, config)
    return chosen.render(config, image_format=image_format, base_ignition=base_ignition)
