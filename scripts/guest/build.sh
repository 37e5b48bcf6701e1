#!/usr/bin/env bash
# Builds the tiny test guest from Debian packages only and prints the folder holding it
# (kernel, initrd, info). A Debian kernel (linux-image-6.1.0-NN-amd64, the package
# linux-image-amd64 depends on) is downloaded and unpacked, not installed; the initramfs
# holds busybox-static, the modules the tests need, nbd-client and mke2fs with the
# libraries ldd lists, and scripts/guest/init.sh as /init.
#
# The guest is cached under .guest/<key>/ (git-ignored; STRATA_GUEST_CACHE overrides the
# folder), the key being a hash of the files in scripts/guest/: once built, a run prints the
# folder at once and needs no network.
# Needs: apt-get, dpkg, busybox-static, nbd-client, e2fsprogs (scripts/deps.sh test).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
cache=${STRATA_GUEST_CACHE:-$root/.guest}
key=$(cat "$here/build.sh" "$here/init.sh" | sha256sum | cut -c1-16)
out=$cache/$key
if [ -f "$out/info" ]; then echo "$out"; exit 0; fi
mkdir -p "$cache"
exec 9>"$cache/.lock"
flock -w 600 9
if [ -f "$out/info" ]; then echo "$out"; exit 0; fi

# The modules the guests load, dependencies first. crc32c_generic is a soft dependency of
# jbd2/ext4 (metadata checksums), loaded first so they find it.
wanted=(crc32c_generic virtio_pci virtio_blk ext4 virtio_net nbd)

busybox=/bin/busybox
for tool in apt-cache apt-get dpkg; do
  command -v $tool >/dev/null || { echo "guest build: $tool missing (a Debian host is needed)" >&2; exit 1; }
done
[ -x "$busybox" ] && "$busybox" --list | grep -qx cpio || { echo "guest build: busybox-static missing (scripts/deps.sh test)" >&2; exit 1; }
nbdclient=$(command -v nbd-client || echo /usr/sbin/nbd-client)
mke2fs=$(command -v mke2fs || echo /usr/sbin/mke2fs)
for b in "$nbdclient" "$mke2fs"; do
  [ -x "$b" ] || { echo "guest build: $b missing (scripts/deps.sh test installs nbd-client and e2fsprogs)" >&2; exit 1; }
done

start=$(date +%s)
work=$(mktemp -d "$cache/build.XXXXXX")
chmod 755 "$work"  # apt-get download runs as _apt where it can
trap 'rm -rf "$work"' EXIT
kernel_package() { apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}'; }
kpkg=$(kernel_package)
if [ -z "$kpkg" ] && [ "$(id -u)" -eq 0 ]; then  # a fresh machine may have no package lists yet
  apt-get update -q >&2 || true
  kpkg=$(kernel_package)
fi
[ -n "$kpkg" ] || { echo "guest build: apt-cache does not know linux-image-amd64 (run apt-get update)" >&2; exit 1; }
echo "guest build: downloading $kpkg" >&2
(cd "$work" && apt-get download "$kpkg" >&2) || {
  echo "guest build: apt-get download $kpkg failed (no network? run apt-get update)" >&2; exit 1; }
dpkg -x "$work"/"$kpkg"_*.deb "$work/pkg"
vmlinuz=$(ls "$work"/pkg/boot/vmlinuz-* | head -1)
moddir=$(ls -d "$work"/pkg/lib/modules/* | head -1)

# Load order: each module after what its .modinfo "depends=" names (what modinfo -F depends says).
declare -A seen=()
order=()
depends() { tr '\0' '\n' <"$1" | sed -n 's/^depends=//p' | tr ',' ' '; }
visit() {
  local m=$1 f d
  [ -n "${seen[$m]:-}" ] && return 0
  seen[$m]=1
  f=$(find "$moddir/kernel" -name "$m.ko" | head -1)
  [ -n "$f" ] || { echo "guest build: module $m not in $kpkg" >&2; exit 1; }
  for d in $(depends "$f"); do visit "$d"; done
  order+=("$m")
  mkdir -p "$work/root/lib/modules"
  cp "$f" "$work/root/lib/modules/$m.ko"
}
for m in "${wanted[@]}"; do visit "$m"; done
printf '%s\n' "${order[@]}" >"$work/root/modules.order"

# busybox, init, and the two dynamic binaries with their libraries.
r=$work/root
mkdir -p "$r/bin" "$r/sbin" "$r/dev" "$r/proc" "$r/sys" "$r/tmp" "$r/mnt" "$r/etc" "$r/usr/sbin"
cp "$busybox" "$r/bin/busybox"
cp "$here/init.sh" "$r/init"
chmod 755 "$r/init"
for b in "$nbdclient" "$mke2fs"; do
  cp "$b" "$r/usr/sbin/"
  for lib in $(ldd "$b" | grep -o '/[^ ]*'); do
    mkdir -p "$r$(dirname "$lib")"
    cp -L "$lib" "$r$lib"
  done
done
[ -f /etc/mke2fs.conf ] && cp /etc/mke2fs.conf "$r/etc/"
echo "root:x:0:0:root:/:/bin/sh" >"$r/etc/passwd"

mkdir -p "$work/out"
# Both are stored uncompressed: under TCG the kernel's own xz and gzip decompression takes
# seconds. The vmlinux inside the bzImage has a PVH entry note, so QEMU's -kernel boots it.
(cd "$r" && find . | "$busybox" cpio -o -H newc 2>/dev/null) >"$work/out/initrd"
off=$(grep -abo $'\xfd7zXZ' "$vmlinuz" | head -1 | cut -d: -f1)
# (xz complains about the bytes after its stream; the ELF header tells whether it worked.)
[ -n "$off" ] && { tail -c +$((off + 1)) "$vmlinuz" | xz -dc 2>/dev/null >"$work/out/kernel" || true; }
if [ -s "$work/out/kernel" ] && [ "$(head -c 4 "$work/out/kernel" | tail -c 3)" = ELF ]; then
  kernel_kind="vmlinux (PVH entry)"
else
  cp "$vmlinuz" "$work/out/kernel"
  kernel_kind="bzImage"
fi
{
  echo "kernel $kpkg $(basename "$vmlinuz")"
  echo "modules ${order[*]}"
  echo "kernel-file $kernel_kind, $(stat -c %s "$work/out/kernel") bytes"
  echo "initrd-bytes $(stat -c %s "$work/out/initrd")"
  echo "build-seconds $(($(date +%s) - start))"
} >"$work/out/info"
rm -rf "$out"
mv "$work/out" "$out"
# Guests of older versions of these scripts are of no more use.
find "$cache" -mindepth 1 -maxdepth 1 -type d ! -name "$key" ! -name 'build.*' -exec rm -rf {} +
echo "guest build: $(tr '\n' ';' <"$out/info")" >&2
echo "$out"
