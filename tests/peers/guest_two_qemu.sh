#!/bin/sh
# Runs INSIDE the source guest of test_two_qemu_migration.py (host root over 9p, chroot).
#
#   sh guest_two_qemu.sh GUEST_IP PEER_IP PEER_MAC PING_INTERVAL SAMPLE_INTERVAL
#
# Loads virtio_net (the NIC is virtio-net-pci on a vhost-user netdev served by
# `ifcvf serve --device sim`), gives it GUEST_IP with a permanent neighbour
# entry for PEER_IP (the host's reflector answers no ARP), and leaves
# /run/ifcvf/after-hold.sh for the guest's init (ifcvf_hold=1): once the 9p
# shares are unmounted (QEMU refuses to migrate with them mounted), the
# initramfs busybox runs it, and it
#   - pings PEER_IP every PING_INTERVAL seconds (the reflector sends each
#     request back with the MACs swapped: a frame the VF writes into an RX
#     buffer of this guest), and
#   - prints "RXC <uptime> <rx_packets> <tx_packets>" on the second serial
#     port (ttyS1, a socket the host reads in real time) every
#     SAMPLE_INTERVAL seconds.
set -eu
guest_ip=$1 peer_ip=$2 peer_mac=$3 ping_interval=$4 sample_interval=$5
modprobe virtio_net
for dev in /sys/bus/pci/devices/*/virtio*/net/*; do iface=${dev##*/}; done
ip link set dev "$iface" up
ip addr add "$guest_ip/24" dev "$iface"
ip neigh replace "$peer_ip" lladdr "$peer_mac" dev "$iface" nud permanent
cat > /run/ifcvf/after-hold.sh <<EOF
exec 3>/dev/ttyS1
ping -q -i $ping_interval $peer_ip >/dev/null 2>&1 &
while :; do
    read up idle < /proc/uptime
    read rx < /sys/class/net/$iface/statistics/rx_packets
    read tx < /sys/class/net/$iface/statistics/tx_packets
    echo "RXC \$up \$rx \$tx" >&3
    sleep $sample_interval
done
EOF
echo "TWO-QEMU READY $iface $(cat /sys/class/net/$iface/address)"
