#!/bin/busybox sh
# PID 1 of the nasbak lab guest: load virtio and ext4, mount the first ext4 data disk on /data
# so that fsfreeze has a real file system to freeze, and keep the QEMU guest agent running.
/bin/busybox --install -s /bin
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mkdir -p /proc /sys /dev /run /var/run /tmp /data
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in $(cat /etc/modules-order); do
    insmod "/lib/modules/$m.ko" 2>/dev/null
done
echo "nasbak-guest: modules loaded"
# Wait for the block devices, then mount the first one holding ext4.
i=0
while [ $i -lt 50 ] && ! ls /sys/block | grep -q '^vd'; do sleep 0.1; i=$((i+1)); done
for dev in $(ls /sys/block | grep '^vd' | sort); do
    if mount -t ext4 "/dev/$dev" /data 2>/dev/null; then
        echo "nasbak-guest: mounted /dev/$dev on /data"
        break
    fi
done
# The agent port is found by name; its vportNpM number depends on the devices.
port=""
i=0
while [ -z "$port" ] && [ $i -lt 100 ]; do
    for p in /sys/class/virtio-ports/*; do
        [ -f "$p/name" ] && [ "$(cat "$p/name")" = "org.qemu.guest_agent.0" ] && port=$(basename "$p")
    done
    [ -z "$port" ] && sleep 0.1
    i=$((i+1))
done
if [ -n "$port" ]; then
    echo "nasbak-guest: starting qemu-ga on /dev/$port"
    while true; do
        /usr/sbin/qemu-ga -m virtio-serial -p "/dev/$port" -t /run
        sleep 0.5
    done &
else
    echo "nasbak-guest: no guest agent channel"
fi
echo "nasbak-guest: ready"
while true; do sleep 3600; done
