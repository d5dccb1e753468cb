#!/bin/busybox sh
# PID 1 of the NAS guest's initramfs: load virtio and ext4, mount the root disk, switch to it.
/bin/busybox --install -s /bin
export PATH=/bin:/sbin
mkdir -p /proc /sys /dev /newroot
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in $(cat /etc/modules-order); do
    insmod "/lib/modules/$m.ko" 2>/dev/null
done
i=0
while [ $i -lt 100 ] && [ ! -b /dev/vda ]; do sleep 0.1; i=$((i+1)); done
mount -t ext4 -o rw /dev/vda /newroot || { echo "nas-guest: cannot mount /dev/vda"; poweroff -f; }
umount /proc /sys
mount --move /dev /newroot/dev 2>/dev/null || umount /dev
exec switch_root /newroot /sbin/nas-init
