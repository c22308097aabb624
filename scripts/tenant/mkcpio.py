#!/usr/bin/env python3
"""Writes an uncompressed newc cpio archive of a directory tree, for a Linux initramfs.

Usage: mkcpio.py <root-dir> <out.cpio> [--char NAME:MAJOR:MINOR]...

Why not cpio(1): entries must be owned by root and may include device nodes (dev/console, which
the kernel opens for init's stdio before /init could mount devtmpfs) without running as root or
calling mknod. Timestamps are fixed (SOURCE_DATE_EPOCH, default 0) so the output is reproducible.
Format: cpio(5) "New ASCII Format" (magic 070701), as the kernel's init/initramfs.c reads it.
"""
import os
import stat
import sys

MAGIC = b"070701"


def header(ino, mode, nlink, mtime, size, rdev_major, rdev_minor, name):
    encoded = name.encode() + b"\0"
    fields = [ino, mode, 0, 0, nlink, mtime, size, 0, 0, rdev_major, rdev_minor, len(encoded), 0]
    head = MAGIC + b"".join(b"%08x" % f for f in fields) + encoded
    return head + b"\0" * (-len(head) % 4)


def main(argv):
    args = argv[1:]
    chars = []
    while "--char" in args:
        i = args.index("--char")
        name, major, minor = args[i + 1].split(":")
        chars.append((name, int(major), int(minor)))
        del args[i : i + 2]
    if len(args) != 2:
        sys.exit(__doc__)
    root, out = args
    mtime = int(os.environ.get("SOURCE_DATE_EPOCH", "0"))

    entries = []  # (name, st_mode, data, rdev)
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        rel_dir = os.path.relpath(dirpath, root)
        if rel_dir != ".":
            entries.append((rel_dir, stat.S_IFDIR | 0o755, b"", (0, 0)))
        for name in sorted(filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]):
            path = os.path.join(dirpath, name)
            rel = os.path.normpath(os.path.join(rel_dir, name))
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                entries.append((rel, stat.S_IFLNK | 0o777, os.readlink(path).encode(), (0, 0)))
            elif stat.S_ISREG(st.st_mode):
                with open(path, "rb") as f:
                    data = f.read()
                perm = 0o755 if st.st_mode & 0o111 else 0o644
                entries.append((rel, stat.S_IFREG | perm, data, (0, 0)))
            else:
                sys.exit(f"mkcpio: {path}: unsupported file type")
    for name, major, minor in chars:
        entries.append((name, stat.S_IFCHR | 0o600, b"", (major, minor)))

    with open(out + ".tmp", "wb") as f:
        for ino, (name, mode, data, (major, minor)) in enumerate(entries, start=1):
            nlink = 2 if stat.S_ISDIR(mode) else 1
            f.write(header(ino, mode, nlink, mtime, len(data), major, minor, name))
            f.write(data)
            f.write(b"\0" * (-len(data) % 4))
        f.write(header(0, 0, 1, 0, 0, 0, 0, "TRAILER!!!"))
    os.replace(out + ".tmp", out)
    print(f"{out}: {len(entries)} entries, {os.path.getsize(out)} bytes")


if __name__ == "__main__":
    main(sys.argv)
