#!/bin/busybox sh
# /init of the Strata test guest (scripts/guest/build.sh puts it into the initramfs).
# Loads the modules listed in /modules.order, finds the job disk (a virtio disk whose first
# line is "#!strata-job"), runs it with DISK set to the first other virtio disk, prints
# "STRATA-GUEST-EXIT <status>" on the serial console and powers off.
/bin/busybox --install -s /bin
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t devtmpfs dev /dev
exec </dev/console >/dev/console 2>&1
mount -t proc proc /proc
mount -t sysfs sys /sys
mkdir -p /tmp /mnt && mount -t tmpfs tmp /tmp
for m in $(cat /modules.order); do
  insmod "/lib/modules/$m.ko" || echo "STRATA-GUEST-WARN insmod $m failed"
done
echo "STRATA-GUEST-UP $(cut -d' ' -f1 /proc/uptime)"
JOBDISK=""
i=0
while [ -z "$JOBDISK" ] && [ $i -lt 50 ]; do
  for d in /dev/vd[a-z]; do
    [ -b "$d" ] && [ "$(head -c 12 "$d" 2>/dev/null)" = "#!strata-job" ] && JOBDISK=$d
  done
  [ -n "$JOBDISK" ] || { i=$((i + 1)); sleep 0.1; }
done
if [ -z "$JOBDISK" ]; then
  echo "STRATA-GUEST-EXIT nojob"
else
  DISK=""
  for d in /dev/vd[a-z]; do
    [ "$d" != "$JOBDISK" ] && [ -z "$DISK" ] && DISK=$d
  done
  export DISK JOBDISK
  tr -d '\000' <"$JOBDISK" >/tmp/job.sh
  sh /tmp/job.sh
  echo "STRATA-GUEST-EXIT $?"
fi
sync
poweroff -f
