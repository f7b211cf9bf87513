#!/bin/sh
# Second stage of a flotilla test VM image. tests/vm/build-image copies this into the root file system that
# `debootstrap --foreign` unpacked on the host and boots the guest with init=/stage2.sh, so the package scripts run
# on the guest's own (emulated) CPU and kernel instead of under binfmt on the host. It finishes debootstrap,
# configures the guest for the test driver (serial autologin, DHCP, 9p/overlay modules) and powers off.
# build-image looks for the "stage2: complete" line in the console log; anything else is a failed build.
set -eu
export PATH=/usr/sbin:/usr/bin:/sbin:/bin LC_ALL=C DEBIAN_FRONTEND=noninteractive

# PID 1 must never just exit: the kernel would panic and qemu would sit there until build-image's timeout.
finish() {
    rc=$?
    set +e
    if [ "$rc" -ne 0 ]; then
        echo "stage2: FAILED (exit status $rc)"
        [ -f /debootstrap/debootstrap.log ] && tail -n 40 /debootstrap/debootstrap.log
    fi
    sync
    if [ -w /proc/sysrq-trigger ]; then
        # Emergency read-only remount first, so that the host's e2fsck finds a clean file system.
        echo u > /proc/sysrq-trigger
        sleep 2
        echo o > /proc/sysrq-trigger
    fi
    sleep 60
}
trap finish EXIT

# debootstrap saw a container on the host and made /proc a symlink to the host's /proc.
if [ -L /proc ]; then
    rm /proc
    mkdir /proc
fi
mount -t proc proc /proc
mount -t sysfs sysfs /sys
# Whatever the package scripts leave in /run must not end up in the image.
mount -t tmpfs tmpfs /run

/debootstrap/debootstrap --second-stage
# debootstrap unmounts /proc and /sys when it exits.
[ -e /proc/self ] || mount -t proc proc /proc
[ -e /sys/kernel ] || mount -t sysfs sysfs /sys

# build-image copied the modules of the kernel this guest runs from the host-extracted kernel package.
depmod -a "$(uname -r)"

echo flotilla-vm > /etc/hostname
cat > /etc/hosts <<'EOF'
127.0.0.1	localhost
127.0.1.1	flotilla-vm
::1	localhost ip6-localhost ip6-loopback
EOF
# debootstrap copied the build host's resolver; slirp's is the one the guest can reach.
echo 'nameserver 10.0.2.3' > /etc/resolv.conf
echo '/dev/vda / ext4 rw,errors=remount-ro 0 1' > /etc/fstab
passwd -d root

# The test driver types commands on the serial console, so root is logged in there without a prompt.
mkdir -p /etc/systemd/system/serial-getty@ttyAMA0.service.d
cat > /etc/systemd/system/serial-getty@ttyAMA0.service.d/autologin.conf <<'EOF'
[Service]
ExecStart=
ExecStart=-/sbin/agetty --autologin root --noclear --keep-baud 115200,57600,38400,9600 - $TERM
EOF
# bash 5.2 wraps every prompt in bracketed-paste escapes; the driver reads the console as plain text.
echo 'set enable-bracketed-paste off' > /root/.inputrc

cat > /etc/systemd/network/80-dhcp.network <<'EOF'
[Match]
Name=en* eth*

[Network]
DHCP=ipv4
# slirp answers router solicitations, but nothing in the tests uses IPv6: do not let it hold up network-online.
IPv6AcceptRA=no
EOF
systemctl enable systemd-networkd.service systemd-networkd-wait-online.service
# A timer-started apt run in the middle of a test would hold apt's locks while the driver installs the agent.
systemctl disable apt-daily.timer apt-daily-upgrade.timer
# e2scrub checks LVM snapshots, and the guest has no LVM; under emulation e2scrub_reap alone adds seconds to boot.
systemctl disable e2scrub_reap.service e2scrub_all.timer

# The driver reads command output from the serial console; kernel messages (a module loading, say) must not land
# in the middle of it. Errors and worse still show.
echo 'kernel.printk = 3 4 1 3' > /etc/sysctl.d/50-quiet-console.conf

mkdir -p /etc/systemd/journald.conf.d
printf '[Journal]\nStorage=persistent\n' > /etc/systemd/journald.conf.d/persistent.conf

# The test driver mounts its 9p share here.
mkdir -p /mnt/host

apt-get clean
rm -f /stage2.sh
# The unpacked .debs were deleted; give their blocks back to the sparse disk file (the drive has discard=unmap).
fstrim -v /
sync
echo "stage2: complete"
