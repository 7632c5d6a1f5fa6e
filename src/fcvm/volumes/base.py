"""State and helpers shared by the operation handlers (entries.py, files.py).

Handlers take the decoded header and a body cursor and return the reply body (bytes,
a list of buffers, or None for "no reply"); failures are OSError(errno), which the
server turns into an error reply. Nothing here builds a host path from guest input:
names are single validated components used relative to a node's O_PATH descriptor.
"""

from __future__ import annotations

import errno
import os
import stat
from typing import NoReturn

from fcvm.volumes import hostfs
from fcvm.volumes.locks import LockTable
from fcvm.volumes.nodes import HandleTable, Node, NodeTable, TableFull
from fcvm.volumes.ownership import Ownership
from fcvm.volumes.protocol import (
    NAME_MAX,
    Attr,
    new_encode_dev,
    pack_entry,
)

# Entries and attributes are cached by the guest for at most this long, so changes made
# on the host show up within a second.
TIMEOUT = 1.0

Reply = bytes | list[bytes] | None

_RESOLVE = hostfs.RESOLVE_BENEATH | hostfs.RESOLVE_NO_SYMLINKS | hostfs.RESOLVE_NO_MAGICLINKS
_have_openat2 = True


def fail(code: int) -> NoReturn:
    raise OSError(code, os.strerror(code))


def open_beneath(dirfd: int, name: bytes, flags: int, mode: int = 0) -> int:
    """openat(dirfd, name) for one validated component, never following a symlink:
    openat2 with RESOLVE_BENEATH|RESOLVE_NO_SYMLINKS|RESOLVE_NO_MAGICLINKS where the
    kernel has it (5.6+), O_NOFOLLOW always. With O_PATH|O_NOFOLLOW a symlink itself is
    opened (and never followed)."""
    global _have_openat2
    flags |= os.O_NOFOLLOW | os.O_CLOEXEC
    if _have_openat2:
        try:
            return hostfs.openat2(dirfd, name, flags, _RESOLVE, mode)
        except OSError as e:
            if e.errno != errno.ENOSYS:
                raise
            _have_openat2 = False
    return os.open(name, flags, mode, dir_fd=dirfd)


def check_name(name: bytes) -> bytes:
    """A directory entry name as the kernel sends it: one component. The kernel never
    sends '', '.', '..' or a '/' to these operations; a guest that does gets EINVAL."""
    if not name or name in (b".", b"..") or b"/" in name:
        fail(errno.EINVAL)
    if len(name) > NAME_MAX:
        fail(errno.ENAMETOOLONG)
    return name


def dtype_of(mode: int) -> int:
    return (mode & 0o170000) >> 12  # DT_* is the S_IFMT nibble


class OpsBase:
    def __init__(
        self,
        root_fd: int,
        *,
        read_only: bool,
        writeback: bool,
        ownership: Ownership,
        max_nodes: int,
        max_handles: int,
    ) -> None:
        st = os.stat(root_fd)
        self.root_fd = root_fd
        self.read_only = read_only
        self.writeback = writeback
        self.own = ownership
        self.nodes = NodeTable(root_fd, st, max_nodes)
        self.handles = HandleTable(max_handles)
        self.locks = LockTable()
        self.flock_waiters: list[tuple[int, int, int]] = []  # (unique, fh, flock op)
        # Replies produced outside their request (a blocked SETLKW granted later);
        # the server sends them after the current request.
        self.deferred: list[bytes] = []

    # ---- lookups

    def node(self, nodeid: int) -> Node:
        node = self.nodes.get(nodeid)
        if node is None:
            fail(errno.ESTALE)  # forged, or already forgotten: never another inode
        return node

    def dir_node(self, nodeid: int) -> Node:
        node = self.node(nodeid)
        if not node.is_dir:
            fail(errno.ENOTDIR)
        return node

    def writable(self) -> None:
        if self.read_only:
            fail(errno.EROFS)

    def creatable(self) -> None:
        """Before creating an entry: writable, and room in the node table for it (so a
        full table fails before the host is changed)."""
        self.writable()
        if self.nodes.full():
            fail(errno.ENFILE)

    def intern(
        self, fd: int, st: os.stat_result | None = None, *, lookup: bool = False
    ) -> tuple[Node, os.stat_result]:
        """Count a lookup of the inode `fd` (O_PATH, ours to keep or close) refers to.
        lookup: a name lookup, where a file changed on the host gets a new node id
        (writeback cache only; see NodeTable.intern)."""
        try:
            if st is None:
                st = os.stat(fd)
            return self.nodes.intern(fd, st, renew_stale=lookup and self.writeback), st
        except TableFull:
            fail(errno.ENFILE)
        except BaseException:
            os.close(fd)
            raise

    def lookup_child(self, parent: Node, name: bytes) -> tuple[Node, os.stat_result]:
        fd = open_beneath(parent.fd, name, os.O_PATH)
        return self.intern(fd, lookup=True)

    @staticmethod
    def changed_by_us(node: Node, st: os.stat_result) -> None:
        """After our own change of a node's data: the guest knows about this one."""
        node.seen = (st.st_mtime_ns, st.st_size)

    # ---- replies

    def attr(self, st: os.stat_result) -> Attr:
        rdev = 0
        if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
            rdev = new_encode_dev(os.major(st.st_rdev), os.minor(st.st_rdev))
        return Attr(
            ino=st.st_ino, size=st.st_size, blocks=st.st_blocks,
            atime_ns=st.st_atime_ns, mtime_ns=st.st_mtime_ns, ctime_ns=st.st_ctime_ns,
            mode=st.st_mode, nlink=st.st_nlink,
            uid=self.own.guest_uid(st.st_uid), gid=self.own.guest_gid(st.st_gid),
            rdev=rdev, blksize=st.st_blksize,
        )  # fmt: skip

    def entry(self, node: Node, st: os.stat_result) -> bytes:
        return pack_entry(node.nodeid, 0, self.attr(st), TIMEOUT)

    # ---- ownership of new inodes

    def give_to_caller(self, fd: int, parent: Node, uid: int, gid: int) -> None:
        """Make a newly created inode (O_PATH or open fd) the caller's, as a local
        filesystem would at creation: the directory's group under set-group-ID."""
        if not self.own.privileged:
            return  # the host made it U's; see ownership.py
        pst = os.stat(parent.fd)
        if pst.st_mode & stat.S_ISGID:
            gid = pst.st_gid
        hostfs.fchown_empty(fd, uid, gid)

    def set_mode(self, fd: int, mode: int, is_dir: bool) -> None:
        """chmod through the magic link (fchmod refuses O_PATH fds). Never used on a
        symlink (the kernel has no symlink modes)."""
        os.chmod(hostfs.proc_path(fd), self.own.chmod_mode(mode, is_dir))
