#!/usr/bin/env bash
# Install what ppimage and its tests need on a Debian machine: the Debian packages that provide
# the image tools, base images and test oracles, then a virtual environment in .venv with the
# project installed in editable mode. Safe to run again: it installs only what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

debian_packages=(
  xorriso cpio initramfs-tools-core zstd mtools dosfstools
  isolinux syslinux-common grub-pc-bin grub-efi-amd64-bin grub-common
  busybox-static debian-installer-12-netboot-amd64
  qemu-system-x86 ovmf
  network-manager python3-gi gir1.2-nm-1.0
  redis-server docker-compose
)

if command -v dpkg-query >/dev/null 2>&1; then
  missing=()
  for package in "${debian_packages[@]}"; do
    status=$(dpkg-query -W -f='${Status}' "$package" 2>/dev/null || true)
    [[ "$status" == "install ok installed" ]] || missing+=("$package")
  done
  if ((${#missing[@]})); then
    echo "setup: installing Debian packages: ${missing[*]}"
    if [[ $(id -u) -ne 0 ]]; then
      echo "setup: run as root or install them with: sudo apt-get install ${missing[*]}" >&2
      exit 1
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
  fi
else
  echo "setup: not a Debian system; install the equivalents of: ${debian_packages[*]}" >&2
fi

python=${PYTHON:-python3}
if [[ ! -x .venv/bin/python ]]; then
  "$python" -m venv .venv
fi
log=.venv/setup-pip.log
if ! { .venv/bin/python -m pip install --upgrade pip \
    && .venv/bin/python -m pip install -e '.[test]'; } >"$log" 2>&1; then
  tail -n 30 "$log" >&2
  echo "setup: pip install failed; the full output is in $log" >&2
  exit 1
fi
echo "setup: ready; the command line is .venv/bin/ppimage"
