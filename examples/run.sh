#!/usr/bin/env bash
# Run the main job on this machine with no cluster and no Redis. It installs what is missing
# and makes base images from Debian packages: a busybox initramfs whose init prints the network
# configuration it received, the Debian installer kernel, and an ISO mastered from both by
# `ppimage prepare-base`. Then it builds an image for every example PreprovisioningImage.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh >&2
export PATH="$PWD/.venv/bin:$PATH"

out=examples/out
bases="$out/bases"
mkdir -p "$bases"
if [[ ! -f "$bases/base.iso" ]]; then
  bash examples/make-base-images.sh "$bases" >&2
fi
cat >"$bases/catalog.yaml" <<CATALOG
architectures:
  x86_64:
    iso: base.iso
    initrd: initramfs.img
    kernel: vmlinuz
    extraKernelParams: console=ttyS0
    profile: networkmanager
CATALOG

ppimage build examples/*.yaml --config "$bases/catalog.yaml" --out "$out/images"

cat >&2 <<HELP

Images are in $out/images/NAMESPACE/NAME.iso or .initrd. Boot one under QEMU (Ctrl-A X quits):
  qemu-system-x86_64 -accel tcg -m 512 -nographic -nic none -cdrom $out/images/metal3/worker-0.iso
  qemu-system-x86_64 -accel tcg -m 512 -nographic -nic none -kernel $bases/vmlinuz \\
    -initrd $out/images/metal3/worker-1.initrd -append console=ttyS0
The busybox init prints every network configuration file it received, then powers off.
HELP
