#!/usr/bin/env python3
"""Writes the initramfs that boots the flotilla test VMs: a static busybox, a few kernel modules and an /init
script that loads them, mounts root= and switch_roots into it.

    mkinitrd.py --busybox BUSYBOX --kernel DIR --kver KVER --output initrd.gz MODULE...

DIR is an extracted linux-image .deb (dpkg-deb -x). Debian builds virtio_pci, virtio_blk and ext4 as modules, so
the guest needs them before it can see its disk. The modules named on the command line are taken with everything
their .modinfo `depends=` lists, loaded dependencies first. Plain Python on purpose: the host has neither cpio nor
depmod, and needs neither.
"""

import argparse
import gzip
import io
import os
import struct
import sys

# Applets /init calls, installed as symlinks to busybox.
APPLETS = ["sh", "cat", "insmod", "mount", "umount", "sleep", "switch_root", "poweroff"]

INIT = r"""#!/bin/sh
# /init of the flotilla test VM initramfs, written by tests/vm/mkinitrd.py.
# Honours root=, rw/ro and init= from the kernel command line. On any failure it says why on the console and
# powers off, so that a harness sees qemu exit instead of a silent hang; initrd.shell on the command line gives a
# shell instead.
modules="@MODULES@"

fail() {
    echo "initrd: ERROR: $*"
    case " $(cat /proc/cmdline 2>/dev/null) " in
        *" initrd.shell "*)
            echo "initrd: starting a shell (initrd.shell is on the kernel command line)"
            exec sh
            ;;
    esac
    echo "initrd: powering off (add initrd.shell to the kernel command line to get a shell instead)"
    poweroff -f
    # PID 1 must not exit, or the kernel panics and the message above scrolls away.
    while :; do sleep 3600; done
}

mount -t proc proc /proc || fail "cannot mount /proc"
mount -t sysfs sysfs /sys || fail "cannot mount /sys"
mount -t devtmpfs devtmpfs /dev || fail "cannot mount /dev"

root= mode=ro init=/sbin/init
for arg in $(cat /proc/cmdline); do
    case $arg in
        root=*) root=${arg#root=} ;;
        rw | ro) mode=$arg ;;
        init=*) init=${arg#init=} ;;
    esac
done
[ -n "$root" ] || fail "no root= on the kernel command line"

for m in $modules; do
    insmod "/lib/modules/$m.ko" || fail "cannot load kernel module $m"
done

# virtio_blk probes asynchronously: give the disk a few seconds to show up.
tries=0
while [ ! -b "$root" ]; do
    tries=$((tries + 1))
    [ "$tries" -le 100 ] || fail "root device $root did not appear within 10 s (loaded: $modules)"
    sleep 0.1
done

mount -o "$mode" "$root" /newroot || fail "cannot mount $root ($mode) on /newroot"
[ -x "/newroot$init" ] || [ -L "/newroot$init" ] || fail "$init does not exist on $root"

mount --move /dev /newroot/dev || fail "cannot move /dev into the root file system"
umount /sys
umount /proc
exec switch_root /newroot "$init" "$@"
fail "switch_root to $root ($init) failed"
"""


def elf_section(data, wanted):
    """Returns the contents of the ELF section named `wanted` (32- or 64-bit, little-endian), or None."""
    if data[:4] != b"\x7fELF" or data[5] != 1:
        raise ValueError("not a little-endian ELF file")
    if data[4] == 2:
        shoff, = struct.unpack_from("<Q", data, 0x28)
        shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
        header = lambda i: struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize)
    else:
        shoff, = struct.unpack_from("<I", data, 0x20)
        shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x2E)
        header = lambda i: struct.unpack_from("<IIIIII", data, shoff + i * shentsize)
    names_offset, names_size = header(shstrndx)[4:6]
    names = data[names_offset:names_offset + names_size]
    for i in range(shnum):
        name, _, _, _, offset, size = header(i)
        if names[name:names.index(b"\0", name)].decode() == wanted:
            return data[offset:offset + size]
    return None


def modinfo(path):
    """The key=value pairs of a module's .modinfo section."""
    with open(path, "rb") as f:
        section = elf_section(f.read(), ".modinfo")
    if section is None:
        raise ValueError(f"{path}: no .modinfo section")
    info = {}
    for entry in section.split(b"\0"):
        key, sep, value = entry.decode(errors="replace").partition("=")
        if sep:
            info.setdefault(key, value)
    return info


def canonical(name):
    return name.replace("-", "_")


def module_files(modules_dir):
    """Module name -> path, for every .ko under modules_dir."""
    files = {}
    for dirpath, _, names in os.walk(modules_dir):
        for n in names:
            if n.endswith(".ko"):
                files[canonical(n[:-3])] = os.path.join(dirpath, n)
    if not files:
        sys.exit(f"mkinitrd.py: no .ko files under {modules_dir} (compressed modules are not supported)")
    return files


def load_order(wanted, files):
    """The wanted modules and their dependencies, each after everything it depends on."""
    order, done, active = [], set(), set()

    def visit(name, wanted_by):
        name = canonical(name)
        if name in done:
            return
        if name in active:
            sys.exit(f"mkinitrd.py: module dependency cycle through {name}")
        if name not in files:
            sys.exit(f"mkinitrd.py: module {name} (needed by {wanted_by}) is not in the kernel package")
        active.add(name)
        for dep in filter(None, modinfo(files[name]).get("depends", "").split(",")):
            visit(dep, name)
        active.discard(name)
        done.add(name)
        order.append(name)

    for name in wanted:
        visit(name, "the command line")
    return order


class Cpio:
    """A newc ("070701") archive, as the kernel unpacks an initramfs."""

    def __init__(self):
        self.out = io.BytesIO()
        self.ino = 0

    def add(self, name, mode, data=b"", rdev=(0, 0)):
        self.ino += 1
        encoded = name.encode() + b"\0"
        fields = [self.ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(encoded), 0]
        self.out.write(b"070701" + b"".join(b"%08X" % v for v in fields) + encoded)
        self._pad()
        self.out.write(data)
        self._pad()

    def _pad(self):
        self.out.write(b"\0" * (-self.out.tell() % 4))

    def finish(self):
        self.add("TRAILER!!!", 0)
        return self.out.getvalue()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--busybox", required=True, help="a static busybox for the guest architecture")
    parser.add_argument("--kernel", required=True, help="an extracted linux-image .deb")
    parser.add_argument("--kver", required=True, help="the kernel release, e.g. 6.1.0-50-arm64")
    parser.add_argument("--output", required=True, help="the gzip-compressed cpio to write")
    parser.add_argument("modules", nargs="+", help="modules to load at boot, dependencies are added")
    args = parser.parse_args()

    candidates = [os.path.join(args.kernel, sub, args.kver) for sub in ("lib/modules", "usr/lib/modules")]
    modules_dir = next((d for d in candidates if os.path.isdir(d)), None)
    if modules_dir is None:
        sys.exit(f"mkinitrd.py: {args.kernel} has no lib/modules/{args.kver}")
    files = module_files(modules_dir)
    order = load_order(args.modules, files)

    archive = Cpio()
    for d in ["bin", "dev", "lib", "lib/modules", "newroot", "proc", "sys"]:
        archive.add(d, 0o040755)
    # The kernel opens /dev/console for /init before devtmpfs is mounted; without the node, /init has no output.
    archive.add("dev/console", 0o020600, rdev=(5, 1))
    with open(args.busybox, "rb") as f:
        archive.add("bin/busybox", 0o100755, f.read())
    for applet in APPLETS:
        archive.add(f"bin/{applet}", 0o120777, b"busybox")
    for name in order:
        with open(files[name], "rb") as f:
            archive.add(f"lib/modules/{name}.ko", 0o100644, f.read())
    archive.add("init", 0o100755, INIT.replace("@MODULES@", " ".join(order)).encode())

    tmp = args.output + ".tmp"
    with open(tmp, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=9, mtime=0) as gz:
        gz.write(archive.finish())
    os.replace(tmp, args.output)
    print(f"mkinitrd.py: {args.output}: {os.path.getsize(args.output)} bytes, modules: {' '.join(order)}",
          file=sys.stderr)


if __name__ == "__main__":
    main()
