#!/bin/sh
# Build test base images on Debian from installed packages: a busybox initramfs that prints
# the payload files it received, the Debian installer kernel, and a hybrid base ISO made by
# `ppimage prepare-base`. Installs nothing; a missing package is named and the script exits 1.
#
# Usage: make-base-images.sh [--initramfs-only] OUTDIR
#   writes OUTDIR/initramfs.img (gzip newc), and unless --initramfs-only also OUTDIR/vmlinuz
#   and OUTDIR/base.iso. The ppimage command is $PPIMAGE if set, otherwise `ppimage` on PATH.
set -eu

KERNEL=/usr/lib/debian-installer/images/12/amd64/text/debian-installer/amd64/linux
BUSYBOX=/bin/busybox

usage() {
    echo "usage: $0 [--initramfs-only] OUTDIR" >&2
    exit 2
}

initramfs_only=false
if [ "${1:-}" = "--initramfs-only" ]; then
    initramfs_only=true
    shift
fi
[ $# -eq 1 ] || usage
outdir=$1

# Each check names the Debian package that provides what is missing.
missing=""
need() {
    if ! [ -e "$1" ] && ! command -v "$1" >/dev/null 2>&1; then
        missing="$missing $2"
    fi
}
need cpio cpio
need gzip gzip
need "$BUSYBOX" busybox-static
if ! $initramfs_only; then
    need "$KERNEL" debian-installer-12-netboot-amd64
    need xorriso xorriso
    need /usr/lib/ISOLINUX/isolinux.bin isolinux
    need /usr/lib/syslinux/modules/bios/ldlinux.c32 syslinux-common
    need /usr/lib/ISOLINUX/isohdpfx.bin isolinux
    need grub-mkstandalone grub-efi-amd64-bin
    need /usr/lib/grub/x86_64-efi/linux.mod grub-efi-amd64-bin
    need mkfs.vfat dosfstools
    need mcopy mtools
fi
if [ -n "$missing" ]; then
    echo "missing packages; install them with: apt-get install$missing" >&2
    exit 1
fi
if [ -x "$BUSYBOX" ] && "$BUSYBOX" ldd "$BUSYBOX" >/dev/null 2>&1; then
    echo "$BUSYBOX is dynamically linked; install busybox-static" >&2
    exit 1
fi

mkdir -p "$outdir"
outdir=$(cd "$outdir" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# The initramfs mirrors a merged-/usr system: /lib is a symlink to usr/lib.
root=$work/root
mkdir -p "$root/bin" "$root/dev" "$root/proc" "$root/sys" "$root/etc" "$root/mnt" \
    "$root/usr/lib"
ln -s usr/lib "$root/lib"
cp "$BUSYBOX" "$root/bin/busybox"
cat >"$root/init" <<'EOF'
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
# The initramfs has no /dev/console node, so the kernel started init without a console.
exec </dev/console >/dev/console 2>&1
echo "ppimage-boot: files received"
for top in /etc/NetworkManager/system-connections /etc/systemd/network \
        /etc/coreos-firstboot-network /config.ign /mnt/config /openstack; do
    [ -e "$top" ] || continue
    find "$top" -type f | sort | while read -r file; do
        echo "ppimage-boot: file $file mode $(stat -c %a "$file") owner $(stat -c %u:%g "$file")"
        cat "$file"
        echo
        echo "ppimage-boot: end $file"
    done
done
echo "ppimage-boot: /lib is $(readlink /lib || echo "not a symlink")"
echo "ppimage-boot: cmdline $(cat /proc/cmdline)"
echo "ppimage-boot: done"
# Let the UART drain before the machine stops.
sleep 1
poweroff -f
EOF
chmod 0755 "$root/init"
(cd "$root" && find . | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0 --reproducible) \
    | gzip -n -9 >"$outdir/initramfs.img"
echo "wrote $outdir/initramfs.img"
$initramfs_only && exit 0

cp "$KERNEL" "$outdir/vmlinuz"
echo "wrote $outdir/vmlinuz"
${PPIMAGE:-ppimage} prepare-base --kernel "$outdir/vmlinuz" --initrd "$outdir/initramfs.img" \
    -o "$outdir/base.iso"
echo "wrote $outdir/base.iso"
