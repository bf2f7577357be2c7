"""The ``ppimage`` command line: offline build, render and prepare-base commands.

Exit status 0 means every object was processed, even when some got ``Error=True`` in their
status. Exit status 2 means the command itself could not run: bad options, unreadable
manifests or unusable base images. Its message on stderr names the file and the fix.
"""

from __future__ import annotations

import importlib
import logging
import sys
from pathlib import Path

import click
import yaml

from builder import build, images, prepare_base
from builder.catalog import DEFAULT_EMBED_PATH, PROFILE_NAMES, Catalog
from builder.errors import BaseImageError, BuilderError
from builder.manifests import ManifestError, load_manifests, name_of
from builder.settings import CommandError, catalog_from_options, with_base_image_options
from builder.status import ErrorOutcome, ImageOutcome, compute_status

log = logging.getLogger("ppimage")


def _configure_logging(verbose: int, *, service: bool) -> None:
    # Offline commands print their result on stdout and log only problems; services log
    # their starts, stops and each object they handle.
    level = (logging.INFO if service else logging.WARNING) - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


class LazyGroup(click.Group):
    """A command group whose service commands are imported only when invoked.

    The offline commands need only the builder; the watcher, worker and image server pull in
    celery and kubernetes, which ``ppimage build`` must not need.
    """

    lazy_commands = {
        "watcher": "watcher.cli:command",
        "worker": "worker.cli:command",
        "rebuild": "watcher.cli:rebuild_command",
        "status": "watcher.cli:status_command",
        "flower": "worker.cli:flower_command",
        "serve": "server.cli:command",
    }

    def list_commands(self, ctx):
        return sorted({*super().list_commands(ctx), *self.lazy_commands})

    def get_command(self, ctx, cmd_name):
        if cmd_name in self.lazy_commands:
            module_name, attribute = self.lazy_commands[cmd_name].split(":")
            try:
                module = importlib.import_module(module_name)
            except ModuleNotFoundError as error:
                raise CommandError(
                    f"ppimage {cmd_name} is not available: {error}; install the project with "
                    "its service dependencies (pip install -e .)"
                ) from error
            return getattr(module, attribute)
        return super().get_command(ctx, cmd_name)


@click.group(cls=LazyGroup)
@click.option("-v", "--verbose", count=True, help="Log more: -v for info, -vv for debug.")
@click.pass_context
def main(ctx: click.Context, verbose: int) -> None:
    """Build Metal3 PreprovisioningImage boot images with per-host network configuration."""
    service = ctx.invoked_subcommand in ("watcher", "worker", "serve", "flower")
    _configure_logging(verbose, service=service)


def _load(manifest_paths: tuple[Path, ...]):
    if not manifest_paths:
        raise CommandError("no manifest files given")
    try:
        return load_manifests(manifest_paths)
    except ManifestError as error:
        raise CommandError(str(error)) from error


@main.command("build")
@click.argument("manifests", nargs=-1, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--out",
    "out_dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Directory for the images, written as OUT/NAMESPACE/NAME.iso or .initrd.",
)
@with_base_image_options
def build_command(manifests, out_dir, config, iso, initrd, kernel, arch, profile) -> None:
    """Build the image of every PreprovisioningImage in MANIFESTS and print their statuses.

    The output is one YAML document of kind List with each PreprovisioningImage and the status
    the service would write. Its imageUrl is a file:// URL of the written image.
    """
    loaded = _load(manifests)
    catalog = catalog_from_options(
        config=config, iso=iso, initrd=initrd, kernel=kernel, arch=arch, profile=profile
    )
    items = []
    for image in loaded.images:
        outcome = _build_one(
            image, loaded.secret_for(image), catalog, out_dir=out_dir, profile=profile
        )
        result = dict(image)
        result["status"] = compute_status(image, outcome)
        items.append(result)
    listing = {
        "apiVersion": "v1",
        "kind": "List",
        "metadata": {"resourceVersion": ""},
        "items": items,
    }
    yaml.safe_dump(listing, sys.stdout, sort_keys=False, default_flow_style=False)


def _build_one(image: dict, secret: dict | None, catalog: Catalog, *, out_dir: Path, profile):
    object_name = name_of(image)
    spec = image.get("spec") or {}
    try:
        plan = build.plan_image(image, secret, catalog, profile=profile)
    except BaseImageError as error:
        raise CommandError(f"{object_name}: {error}") from error
    except BuilderError as error:
        log.warning("%s: %s: %s", object_name, error.reason, error)
        version = None
        if secret is not None and spec.get("networkDataName"):
            version = str((secret.get("metadata") or {}).get("resourceVersion") or "")
        return ErrorOutcome(
            reason=error.reason,
            message=str(error),
            network_data_name=spec.get("networkDataName") or None,
            network_data_version=version,
        )
    target = out_dir / plan.namespace / f"{plan.name}.{plan.image_format}"
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        images.materialize(plan.layout, target)
    except OSError as error:
        raise CommandError(f"{object_name}: cannot write {target}: {error}") from error
    log.info("%s: wrote %s", object_name, target)
    return ImageOutcome(
        image_url=target.resolve().as_uri(),
        image_format=plan.image_format,
        architecture=plan.architecture,
        network_data_name=plan.network_data_name,
        network_data_version=plan.network_data_version,
        kernel_url=plan.kernel_url,
        extra_kernel_params=plan.extra_kernel_params,
    )


@main.command("render")
@click.argument("manifests", nargs=-1, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--format",
    "image_format",
    type=click.Choice(("iso", "initrd")),
    default="iso",
    show_default=True,
    help="Image format to render for (profiles place some files differently).",
)
@click.option(
    "--profile", type=click.Choice(PROFILE_NAMES), default="networkmanager", show_default=True
)
def render_command(manifests, image_format, profile) -> None:
    """Print the files a profile would put in each PreprovisioningImage's payload.

    Secret contents appear on stdout: do not redirect it anywhere logs are collected.
    """
    from builder import profiles

    loaded = _load(manifests)
    for image in loaded.images:
        object_name = name_of(image)
        try:
            config = build.read_network_config(image, loaded.secret_for(image))
            rendering = profiles.render(config, profile=profile, image_format=image_format)
        except BuilderError as error:
            click.echo(f"# {object_name}: {error.reason}: {error}")
            continue
        count = len(rendering.files)
        noun = "file" if count == 1 else "files"
        click.echo(f"# {object_name}: profile {profile}, {count} {noun}")
        for payload_file in rendering.files:
            click.echo(f"## {payload_file.path} (mode {payload_file.mode:04o})")
            click.echo(payload_file.data.decode("utf-8", errors="replace"), nl=False)
        if rendering.kernel_params:
            click.echo(f"## kernel command line: {' '.join(rendering.kernel_params)}")


@main.command("prepare-base")
@click.argument(
    "source", required=False, type=click.Path(exists=True, dir_okay=False, path_type=Path)
)
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="ISO file to write.",
)
@click.option(
    "--kernel",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Kernel of a new ISO (with --initrd).",
)
@click.option(
    "--initrd",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Initramfs of a new ISO (with --kernel).",
)
@click.option(
    "--embed-size",
    type=int,
    default=None,
    help="Size of the embed area in bytes, rounded up to 2048. Default: 262144 (256 KiB).",
)
@click.option("--embed-path", default=DEFAULT_EMBED_PATH, show_default=True)
@click.option(
    "--cmdline",
    default="console=tty0 console=ttyS0",
    show_default=True,
    help="Kernel command line for a mastered ISO.",
)
def prepare_base_command(source, output, kernel, initrd, embed_size, embed_path, cmdline) -> None:
    """Add an embed area to SOURCE ISO, or master a new ISO from --kernel and --initrd."""
    size = prepare_base.DEFAULT_EMBED_SIZE if embed_size is None else embed_size
    try:
        if source is not None:
            if kernel or initrd:
                raise CommandError("give either SOURCE.iso or --kernel and --initrd, not both")
            prepare_base.add_embed_area(source, output, size=size, embed_path=embed_path)
        elif kernel and initrd:
            prepare_base.master_iso(
                kernel=kernel,
                initrd=initrd,
                dst=output,
                size=size,
                embed_path=embed_path,
                cmdline=cmdline,
            )
        else:
            raise CommandError("give SOURCE.iso, or both --kernel and --initrd")
    except BaseImageError as error:
        raise CommandError(str(error)) from error
    area = images.find_embed_area(output, embed_path=embed_path)
    click.echo(f"{output}: embed area {embed_path} of {area.size} bytes at offset {area.offset}")


if __name__ == "__main__":
    main()
