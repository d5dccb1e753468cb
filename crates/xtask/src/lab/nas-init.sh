#!/bin/bash
# PID 1 of the NAS guest, in its Debian root: start an NFS server (one export with
# no_root_squash, one with root_squash) and a Samba server (one share with a user and password),
# both on loopback only, make the host's lab Ceph cluster reachable (below), then run the test
# binary from the work disk (/dev/vdb) and power off. Results go to the work disk and to the
# console.
#
# Ceph: the guest's only network device is QEMU's user-mode network, where 10.0.2.2 is the
# host's 127.0.0.1. The cluster's daemons advertise 127.0.0.1 (monitors on 3300-3302 and
# 6789-6791, the others from 6800), so connections to those ports of 127.0.0.1 are sent to
# 10.0.2.2 instead (nftables DNAT; route_localnet lets a packet leave with a loopback address
# until masquerade rewrites it). Other loopback traffic (NFS, SMB) stays in the guest.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
exec </dev/console >/dev/console 2>&1
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mountpoint -q /dev || mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm && mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /tmp
echo 1 > /proc/sys/kernel/sysrq
stop() { sync; echo o > /proc/sysrq-trigger; sleep 30; }
hostname nas
ip link set lo up
for m in virtio_net nf_tables nft_chain_nat nft_nat ceph; do
    modprobe "$m" || echo "nas-guest: modprobe $m failed"
done
if ip link set eth0 up; then
    ip addr add 10.0.2.15/24 dev eth0
    ip route add default via 10.0.2.2
    echo 1 > /proc/sys/net/ipv4/conf/all/route_localnet
    nft -f - <<'EOF' || echo "nas-guest: nft failed"
table ip nasbak_ceph {
    chain output {
        type nat hook output priority -100;
        ip daddr 127.0.0.1 tcp dport { 3300-3302, 6789-6791, 6800-7300 } dnat to 10.0.2.2
    }
    chain postrouting {
        type nat hook postrouting priority 100;
        oifname "eth0" masquerade
    }
}
EOF
else
    echo "nas-guest: no network device: the CephFS tests will fail"
fi
for m in sunrpc grace lockd nfs_acl auth_rpcgss rpcsec_gss_krb5 nfsd nfs nfsv3 nfsv4 cifs nls_utf8; do
    modprobe "$m" || echo "nas-guest: modprobe $m failed"
done
mkdir -p /run/rpcbind /run/samba /var/lib/nfs/rpc_pipefs /var/lib/nfs/v4recovery /var/lock /run/lock
mount -t rpc_pipefs sunrpc /var/lib/nfs/rpc_pipefs
rpcbind -w
mount -t nfsd nfsd /proc/fs/nfsd
# Short v4 lease and grace times: a restarted server serves within seconds, not 90 s.
echo 10 > /proc/fs/nfsd/nfsv4leasetime
echo 10 > /proc/fs/nfsd/nfsv4gracetime
exportfs -ra
rpc.mountd -p 20048
rpc.nfsd -H 127.0.0.1 4
rpc.statd --no-notify -p 32765 -o 32766
smbd -D
for i in $(seq 50); do
    (exec 3<>/dev/tcp/127.0.0.1/445) 2>/dev/null && break
    sleep 0.2
done
echo "nas-guest: ready"
mkdir -p /work
if ! mount -t ext4 /dev/vdb /work; then
    echo "nas-guest: no work disk"
    stop
fi
cd /work
./run-tests > /work/results.txt 2>&1
echo "nas-guest: tests exit $?" >> /work/results.txt
cat /work/results.txt
cd /
sync
umount /work
echo "nas-guest: done"
stop
