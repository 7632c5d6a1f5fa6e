"""Operations on names and inodes: lookup, attributes, creation and removal of
entries, links, renames, statfs and extended attributes."""

from __future__ import annotations

import errno
import os
import stat

from fcvm.volumes import hostfs
from fcvm.volumes import protocol as p
from fcvm.volumes.base import TIMEOUT, OpsBase, Reply, check_name, fail, open_beneath
from fcvm.volumes.nodes import Node
from fcvm.volumes.protocol import Body, Header

# Names may be up to the kernel's FUSE_NAME_MAX (1024) on the wire; anything longer
# cannot come from a kernel. Names over NAME_MAX are refused with ENAMETOOLONG.
WIRE_NAME_MAX = 1024
_MODIFYING_ATTRS = (
    p.FATTR_MODE | p.FATTR_UID | p.FATTR_GID | p.FATTR_SIZE | p.FATTR_ATIME | p.FATTR_MTIME
    | p.FATTR_ATIME_NOW | p.FATTR_MTIME_NOW | p.FATTR_CTIME
)  # fmt: skip
_MAX_OFF = (1 << 63) - 1
_NSEC = 1_000_000_000
_XATTR_CREATE, _XATTR_REPLACE = 1, 2


class EntryOps(OpsBase):
    # ---- lookup and attributes

    def op_lookup(self, h: Header, body: Body) -> Reply:
        parent = self.dir_node(h.nodeid)
        name = body.cstring(WIRE_NAME_MAX)
        if name == b".":
            node, st = self.intern(os.open(hostfs.proc_path(parent.fd), os.O_PATH | os.O_CLOEXEC))
        elif name == b"..":
            node, st = self._parent_of(parent)
        else:
            node, st = self.lookup_child(parent, check_name(name))
        return self.entry(node, st)

    def _parent_of(self, node: Node) -> tuple[Node, os.stat_result]:
        """'..' is the kernel's business (we offer no export support), but a guest may
        ask: the root's parent is the root, and a directory moved out of the root on
        the host has no parent we will name."""
        if node is self.nodes.root:
            fd = os.open(hostfs.proc_path(node.fd), os.O_PATH | os.O_CLOEXEC)
            return self.intern(fd)
        fd = os.open(b"..", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=node.fd)
        try:
            if not self._beneath_root(fd):
                fail(errno.ENOENT)
        except BaseException:
            os.close(fd)
            raise
        return self.intern(fd)

    def _beneath_root(self, fd: int) -> bool:
        root_key = self.nodes.root.key
        cur = os.dup(fd)
        try:
            for _ in range(4096):
                st = os.stat(cur)
                if (st.st_dev, st.st_ino) == root_key:
                    return True
                up = os.open(b"..", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=cur)
                ust = os.stat(up)
                os.close(cur)
                cur = up
                if (ust.st_dev, ust.st_ino) == (st.st_dev, st.st_ino):
                    return False  # the host's "/" is its own parent
            return False
        finally:
            os.close(cur)

    def op_getattr(self, h: Header, body: Body) -> Reply:
        node = self.node(h.nodeid)
        flags, _, fh = body.unpack(p.GETATTR_IN)
        st = None
        if flags & p.GETATTR_FH:
            handle = self.handles.get(fh, node.nodeid)
            if handle is not None:
                st = os.stat(handle.fd)
        if st is None:
            st = os.stat(node.fd)
        return p.pack_attr_out(self.attr(st), TIMEOUT)

    def op_setattr(self, h: Header, body: Body) -> Reply:
        node = self.node(h.nodeid)
        (valid, _, fh, size, _, atime, mtime, _, ansec, mnsec, _, mode, _, uid, gid, _) = (
            body.unpack(p.SETATTR_IN)
        )
        if valid & _MODIFYING_ATTRS:
            self.writable()
        handle = self.handles.get(fh, node.nodeid) if valid & p.FATTR_FH else None
        if valid & p.FATTR_SIZE:
            if size > _MAX_OFF:
                fail(errno.EINVAL)
            if node.is_dir:
                fail(errno.EISDIR)
            if not node.is_reg:
                fail(errno.EINVAL)  # never open a special file on the host
            if handle is not None and handle.writable:
                os.ftruncate(handle.fd, size)
            else:
                os.truncate(hostfs.proc_path(node.fd), size)
        if valid & (p.FATTR_UID | p.FATTR_GID):
            hu = self.own.host_uid_for(uid) if valid & p.FATTR_UID else -1
            hg = self.own.host_gid_for(gid) if valid & p.FATTR_GID else -1
            hostfs.fchown_empty(node.fd, hu, hg)
        if valid & p.FATTR_MODE:
            if node.is_symlink:
                fail(errno.EOPNOTSUPP)
            self.set_mode(node.fd, mode, node.is_dir)
        if valid & (p.FATTR_ATIME | p.FATTR_MTIME):
            at = self._time(valid, p.FATTR_ATIME, p.FATTR_ATIME_NOW, atime, ansec)
            mt = self._time(valid, p.FATTR_MTIME, p.FATTR_MTIME_NOW, mtime, mnsec)
            hostfs.utimens_empty(node.fd, at, mt)
        st = os.stat(handle.fd if handle is not None else node.fd)
        self.changed_by_us(node, st)
        return p.pack_attr_out(self.attr(st), TIMEOUT)

    @staticmethod
    def _time(valid: int, bit: int, now_bit: int, sec: int, nsec: int) -> tuple[int, int]:
        if not valid & bit:
            return (0, hostfs.UTIME_OMIT)
        if valid & now_bit:
            return (0, hostfs.UTIME_NOW)
        if nsec >= _NSEC:
            fail(errno.EINVAL)
        return (sec, nsec)

    def op_readlink(self, h: Header, body: Body) -> Reply:
        node = self.node(h.nodeid)
        if not node.is_symlink:
            fail(errno.EINVAL)
        return os.readlink(b"", dir_fd=node.fd)

    def op_statfs(self, h: Header, body: Body) -> Reply:
        sv = os.statvfs(self.node(h.nodeid).fd)
        return p.STATFS_OUT.pack(
            sv.f_blocks, sv.f_bfree, sv.f_bavail, sv.f_files, sv.f_ffree,
            sv.f_bsize, sv.f_namemax, sv.f_frsize, 0,
        )  # fmt: skip

    def op_access(self, h: Header, body: Body) -> Reply:
        # With default_permissions the kernel checks access itself and never sends this;
        # a guest that does learns only whether writing is possible at all.
        self.node(h.nodeid)
        (mask, _) = body.unpack(p.ACCESS_IN)
        if mask & os.W_OK and self.read_only:
            fail(errno.EROFS)
        return b""

    # ---- creating entries

    def op_mknod(self, h: Header, body: Body) -> Reply:
        parent = self.dir_node(h.nodeid)
        mode, rdev, _umask, _ = body.unpack(p.MKNOD_IN)
        name = check_name(body.cstring(WIRE_NAME_MAX))
        self.creatable()
        fmt = stat.S_IFMT(mode)
        if fmt == stat.S_IFDIR:
            fail(errno.EPERM)
        if fmt not in (stat.S_IFREG, stat.S_IFCHR, stat.S_IFBLK, stat.S_IFIFO, stat.S_IFSOCK):
            fail(errno.EINVAL)
        device = 0
        if fmt in (stat.S_IFCHR, stat.S_IFBLK):
            device = os.makedev(*p.new_decode_dev(rdev))
        # Created with no permissions, then given to the caller, then the exact mode:
        # fcvm's umask plays no part and chown cannot clear bits set before it.
        os.mknod(name, fmt, device, dir_fd=parent.fd)
        return self._finish_create(parent, name, fmt, mode, h)

    def op_mkdir(self, h: Header, body: Body) -> Reply:
        parent = self.dir_node(h.nodeid)
        mode, _umask = body.unpack(p.MKDIR_IN)
        name = check_name(body.cstring(WIRE_NAME_MAX))
        self.creatable()
        os.mkdir(name, 0o700, dir_fd=parent.fd)
        mode &= 0o7777
        if os.stat(parent.fd).st_mode & stat.S_ISGID:
            mode |= stat.S_ISGID  # inherited, as inode_init_owner() does
        return self._finish_create(parent, name, stat.S_IFDIR, mode, h)

    def op_symlink(self, h: Header, body: Body) -> Reply:
        parent = self.dir_node(h.nodeid)
        name = check_name(body.cstring(WIRE_NAME_MAX))
        target = body.cstring(p.PATH_MAX)
        self.creatable()
        if not target:
            fail(errno.ENOENT)
        if len(target) >= p.PATH_MAX:
            fail(errno.ENAMETOOLONG)
        # The target is data stored in the link; the host never resolves it.
        os.symlink(target, name, dir_fd=parent.fd)
        return self._finish_create(parent, name, stat.S_IFLNK, None, h)

    def _finish_create(
        self, parent: Node, name: bytes, fmt: int, mode: int | None, h: Header
    ) -> bytes:
        fd = open_beneath(parent.fd, name, os.O_PATH)
        try:
            st = os.stat(fd)
            if stat.S_IFMT(st.st_mode) != fmt:
                fail(errno.EIO)  # swapped on the host between two calls: touch nothing
            self.give_to_caller(fd, parent, h.uid, h.gid)
            if mode is not None:
                self.set_mode(fd, mode, fmt == stat.S_IFDIR)
            st = os.stat(fd)
        except BaseException:
            os.close(fd)
            raise
        node, st = self.intern(fd, st)
        return self.entry(node, st)

    def op_link(self, h: Header, body: Body) -> Reply:
        parent = self.dir_node(h.nodeid)
        (oldid,) = body.unpack(p.LINK_IN)
        name = check_name(body.cstring(WIRE_NAME_MAX))
        self.creatable()
        old = self.node(oldid)
        if old.is_dir:
            fail(errno.EPERM)
        hostfs.link_empty(old.fd, parent.fd, name)
        fd = os.open(hostfs.proc_path(old.fd), os.O_PATH | os.O_CLOEXEC)
        node, st = self.intern(fd)
        return self.entry(node, st)

    # ---- removing and renaming

    def op_unlink(self, h: Header, body: Body) -> Reply:
        parent = self.dir_node(h.nodeid)
        name = check_name(body.cstring(WIRE_NAME_MAX))
        self.writable()
        os.unlink(name, dir_fd=parent.fd)
        return b""

    def op_rmdir(self, h: Header, body: Body) -> Reply:
        parent = self.dir_node(h.nodeid)
        name = check_name(body.cstring(WIRE_NAME_MAX))
        self.writable()
        os.rmdir(name, dir_fd=parent.fd)
        return b""

    def op_rename(self, h: Header, body: Body) -> Reply:
        (newdir,) = body.unpack(p.RENAME_IN)
        return self._rename(h, body, newdir, 0)

    def op_rename2(self, h: Header, body: Body) -> Reply:
        newdir, flags, _ = body.unpack(p.RENAME2_IN)
        return self._rename(h, body, newdir, flags)

    def _rename(self, h: Header, body: Body, newdir: int, flags: int) -> Reply:
        parent = self.dir_node(h.nodeid)
        old = check_name(body.cstring(WIRE_NAME_MAX))
        new = check_name(body.cstring(WIRE_NAME_MAX))
        target = self.dir_node(newdir)
        self.writable()
        allowed = hostfs.RENAME_NOREPLACE | hostfs.RENAME_EXCHANGE
        if flags & ~allowed or flags == allowed:
            fail(errno.EINVAL)  # RENAME_WHITEOUT is overlayfs's business, not ours
        if flags:
            hostfs.renameat2(parent.fd, old, target.fd, new, flags)
        else:
            os.rename(old, new, src_dir_fd=parent.fd, dst_dir_fd=target.fd)
        return b""

    # ---- extended attributes

    def _xattr_name(self, body: Body, write: bool) -> bytes:
        name = body.cstring(WIRE_NAME_MAX)
        if not name or len(name) > p.XATTR_NAME_MAX:
            fail(errno.ERANGE)
        if name.startswith(b"user."):
            pass
        elif name.startswith(b"trusted."):
            if not self.own.privileged:
                fail(errno.EPERM)
        elif name.startswith(b"security."):
            # Readable, never writable: security.capability would grant host
            # capabilities, security.selinux/ima labels are the host's policy.
            if write:
                fail(errno.EPERM)
        else:
            # system.* (ACLs: not offered, FUSE_POSIX_ACL is off) and unknown prefixes.
            fail(errno.EOPNOTSUPP)
        return name

    def op_setxattr(self, h: Header, body: Body) -> Reply:
        node = self.node(h.nodeid)
        size, flags = body.unpack(p.SETXATTR_IN)
        name = self._xattr_name(body, write=True)
        if size > p.XATTR_SIZE_MAX:
            fail(errno.E2BIG)
        value = bytes(body.take(size))
        self.writable()
        if flags & ~(_XATTR_CREATE | _XATTR_REPLACE):
            fail(errno.EINVAL)
        os.setxattr(hostfs.proc_path(node.fd), name, value, flags)
        return b""

    def op_getxattr(self, h: Header, body: Body) -> Reply:
        node = self.node(h.nodeid)
        size, _ = body.unpack(p.GETXATTR_IN)
        name = self._xattr_name(body, write=False)
        value = os.getxattr(hostfs.proc_path(node.fd), name)
        return self._sized(value, size, p.XATTR_SIZE_MAX)

    def op_listxattr(self, h: Header, body: Body) -> Reply:
        node = self.node(h.nodeid)
        size, _ = body.unpack(p.GETXATTR_IN)
        names = [os.fsencode(n) for n in os.listxattr(hostfs.proc_path(node.fd))]
        visible = [n for n in names if n.startswith((b"user.", b"security."))]
        if self.own.privileged:
            visible += [n for n in names if n.startswith(b"trusted.")]
        blob = b"".join(n + b"\0" for n in visible)
        return self._sized(blob, size, p.XATTR_LIST_MAX)

    @staticmethod
    def _sized(value: bytes, size: int, limit: int) -> bytes:
        """size 0 asks how big; otherwise the value, or ERANGE if it does not fit."""
        if len(value) > limit:
            fail(errno.E2BIG)
        if size == 0:
            return p.GETXATTR_OUT.pack(len(value), 0)
        if len(value) > size:
            fail(errno.ERANGE)
        return value

    def op_removexattr(self, h: Header, body: Body) -> Reply:
        node = self.node(h.nodeid)
        name = self._xattr_name(body, write=True)
        self.writable()
        os.removexattr(hostfs.proc_path(node.fd), name)
        return b""
