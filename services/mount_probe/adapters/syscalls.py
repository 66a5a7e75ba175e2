"""The Linux mount syscalls the probe needs, through ctypes (Python 3.11 has no ``os.unshare``).

Every call raises ``OSError`` with the errno and the call's name on failure. Numbers are x86_64's
(``open_tree`` 428, ``move_mount`` 429, ``mount_setattr`` 442; the same on arm64 and every
architecture that uses the generic syscall table, which all new syscalls share since 5.1).
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
from typing import Final

CLONE_NEWNS: Final = 0x00020000
CLONE_NEWUSER: Final = 0x10000000
MS_RDONLY: Final = 0x1
MS_REC: Final = 0x4000
MS_PRIVATE: Final = 1 << 18
MNT_DETACH: Final = 0x2
AT_FDCWD: Final = -100
AT_EMPTY_PATH: Final = 0x1000
AT_RECURSIVE: Final = 0x8000
OPEN_TREE_CLONE: Final = 0x1
OPEN_TREE_CLOEXEC: Final = os.O_CLOEXEC
MOVE_MOUNT_F_EMPTY_PATH: Final = 0x4
MOUNT_ATTR_IDMAP: Final = 0x00100000
PR_SET_PDEATHSIG: Final = 1

# The new mount API's syscalls come from the generic table, the same number on every architecture.
SYS_OPEN_TREE: Final = 428
SYS_MOVE_MOUNT: Final = 429
SYS_MOUNT_SETATTR: Final = 442

# What the kernel answers when it will not id-map a mount (filesystem without FS_ALLOW_IDMAP, an old
# kernel, no permission over the user namespace).
IDMAP_REFUSALS: Final = frozenset({errno.EINVAL, errno.EPERM, errno.ENOSYS, errno.EOPNOTSUPP})


class MountAttr(ctypes.Structure):
    """``struct mount_attr`` (linux/mount.h), the argument of ``mount_setattr``."""

    _fields_ = (
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    )


class Syscalls:
    """libc's ``mount``, ``umount2``, ``unshare``, ``prctl`` and the raw new-mount-API syscalls."""

    def __init__(self) -> None:
        if platform.system() != "Linux":
            raise OSError(errno.ENOSYS, "mount namespaces need Linux")
        self._libc = ctypes.CDLL(None, use_errno=True)  # its functions release the GIL during the call
        self._libc.syscall.restype = ctypes.c_long

    def _check(self, result: int, call: str) -> int:
        if result < 0:
            code = ctypes.get_errno()
            raise OSError(code, f"{call}: {os.strerror(code)}")
        return result

    def unshare(self, flags: int) -> None:
        self._check(self._libc.unshare(ctypes.c_int(flags)), "unshare")

    def mount(self, source: str, target: str, fstype: str | None, flags: int, data: str | None) -> None:
        self._check(
            self._libc.mount(
                source.encode(),
                target.encode(),
                fstype.encode() if fstype else None,
                ctypes.c_ulong(flags),
                data.encode() if data else None,
            ),
            f"mount({fstype or 'bind/propagation'} on {target})",
        )

    def umount2(self, target: str, flags: int = 0) -> None:
        self._check(self._libc.umount2(target.encode(), ctypes.c_int(flags)), f"umount2({target})")

    def open_tree(self, path: str, flags: int = OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC) -> int:
        return self._check(
            self._libc.syscall(
                ctypes.c_long(SYS_OPEN_TREE), ctypes.c_int(AT_FDCWD), path.encode(), ctypes.c_uint(flags)
            ),
            f"open_tree({path})",
        )

    def mount_setattr_idmap(self, fd: int, userns_fd: int) -> None:
        attr = MountAttr(MOUNT_ATTR_IDMAP, 0, 0, userns_fd)
        self._check(
            self._libc.syscall(
                ctypes.c_long(SYS_MOUNT_SETATTR),
                ctypes.c_int(fd),
                b"",
                ctypes.c_uint(AT_EMPTY_PATH),
                ctypes.byref(attr),
                ctypes.c_size_t(ctypes.sizeof(attr)),
            ),
            "mount_setattr(MOUNT_ATTR_IDMAP)",
        )

    def move_mount(self, fd: int, target: str) -> None:
        self._check(
            self._libc.syscall(
                ctypes.c_long(SYS_MOVE_MOUNT),
                ctypes.c_int(fd),
                b"",
                ctypes.c_int(AT_FDCWD),
                target.encode(),
                ctypes.c_uint(MOVE_MOUNT_F_EMPTY_PATH),
            ),
            f"move_mount(-> {target})",
        )

    def die_with_parent(self, signal: int) -> None:
        self._check(self._libc.prctl(ctypes.c_int(PR_SET_PDEATHSIG), ctypes.c_ulong(signal)), "prctl")


def make_userns_fd(calls: Syscalls, host_uid: int = 100_000, count: int = 65_536) -> int:
    """A user namespace mapping ids 0..count-1 to host_uid.., as an open ``/proc/<pid>/ns/user`` fd.

    A forked child unshares a user namespace (``unshare -U``) and waits; we write its uid and gid maps
    (we are privileged in the parent namespace), open its namespace file and let the child go. The fd
    keeps the namespace alive. Fork before starting any thread: ``CLONE_NEWUSER`` wants one thread.
    """
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: unshare, say so, wait for the parent, exit without Python's cleanup
        os.close(ready_r)
        os.close(go_w)
        try:
            calls.unshare(CLONE_NEWUSER)
            os.write(ready_w, b"1")
        except OSError as exc:
            os.write(ready_w, f"0{exc.errno}".encode())
        os.read(go_r, 1)
        os._exit(0)
    os.close(ready_w)
    os.close(go_r)
    try:
        answer = os.read(ready_r, 16)
        if not answer.startswith(b"1"):
            code = int(answer[1:] or errno.EPERM)
            raise OSError(code, f"unshare(CLONE_NEWUSER): {os.strerror(code)}")
        mapping = f"0 {host_uid} {count}\n"
        for name in ("uid_map", "gid_map"):
            with open(f"/proc/{pid}/{name}", "w") as f:
                f.write(mapping)
        return os.open(f"/proc/{pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        os.write(go_w, b"x")
        os.close(go_w)
        os.close(ready_r)
        os.waitpid(pid, 0)
