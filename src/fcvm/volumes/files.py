"""Operations on open files and directories: open/create, read/write, flush, fsync,
release, readdir(plus), fallocate, lseek and locks."""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from collections.abc import Callable

from fcvm.volumes import hostfs
from fcvm.volumes import protocol as p
from fcvm.volumes.base import TIMEOUT, OpsBase, Reply, check_name, dtype_of, fail, open_beneath
from fcvm.volumes.entries import WIRE_NAME_MAX
from fcvm.volumes.locks import OFFSET_MAX, RDLCK, UNLCK, WRLCK, Lock, TooManyLocks, Waiter
from fcvm.volumes.nodes import Handle, Node, TableFull
from fcvm.volumes.protocol import Body, Header

# Open flags passed on to the host. O_CREAT/O_EXCL are ours to set, O_NOFOLLOW cannot
# apply (we reopen through /proc/self/fd), O_DIRECT is the guest kernel's business,
# O_NOATIME is a hint whose ownership rule the guest already applied.
_PASSED_FLAGS = os.O_ACCMODE | os.O_TRUNC | os.O_APPEND | os.O_SYNC | os.O_DSYNC
MAX_DIR_ENTRIES = 1 << 20  # a readdir snapshot larger than this is cut (logged by caller)
_DT_DIR = 4


class FileOps(OpsBase):
    # ---- open and create

    def _host_flags(self, flags: int) -> tuple[int, bool]:
        acc = flags & os.O_ACCMODE
        if acc == os.O_ACCMODE:
            fail(errno.EINVAL)
        if self.read_only and (acc != os.O_RDONLY or flags & os.O_TRUNC):
            fail(errno.EROFS)
        out = flags & _PASSED_FLAGS
        if self.writeback:
            # The guest's page cache positions appends itself and may read pages of a
            # file opened write-only; pwrite on an O_APPEND fd would ignore the offset.
            out &= ~os.O_APPEND
        return out | os.O_CLOEXEC, acc != os.O_RDONLY

    def _reopen(self, node: Node, hflags: int) -> int:
        """A real open file description of a regular node, through its O_PATH fd (the
        magic link reaches exactly that inode). Never a special file."""
        if node.is_dir:
            fail(errno.EISDIR)
        if not node.is_reg:
            fail(errno.EACCES)  # device, fifo or socket: never opened on the host
        path = hostfs.proc_path(node.fd)
        if self.writeback and hflags & os.O_ACCMODE == os.O_WRONLY:
            try:
                return os.open(path, (hflags & ~os.O_ACCMODE) | os.O_RDWR)
            except PermissionError:
                pass  # write-only file (unprivileged server): the guest reads less
        return os.open(path, hflags)

    def _new_handle(self, node: Node, fd: int, writable: bool) -> Handle:
        try:
            return self.handles.add(node, fd, writable)
        except TableFull:
            fail(errno.EMFILE)

    def op_open(self, h: Header, body: Body) -> Reply:
        node = self.node(h.nodeid)
        flags, _ = body.unpack(p.OPEN_IN)
        hflags, writable = self._host_flags(flags)
        if self.handles.full():
            fail(errno.EMFILE)
        handle = self._new_handle(node, self._reopen(node, hflags), writable)
        if hflags & os.O_TRUNC:
            self._truncated(h, node, handle.fd)
        return p.OPEN_OUT.pack(handle.fh, 0, 0)

    def _truncated(self, h: Header, node: Node, fd: int) -> None:
        """An open truncated the file on the host. Under ATOMIC_O_TRUNC the guest kernel
        leaves to us what it would do for a truncating open by a caller without
        CAP_FSETID (taken as: not root): clear set-user-ID, and set-group-ID on a
        group-executable file, as a local filesystem does."""
        st = os.fstat(fd)
        mode = st.st_mode & 0o7777
        kill = stat.S_ISUID | (stat.S_ISGID if mode & stat.S_IXGRP else 0)
        if h.uid != 0 and mode & kill:
            os.fchmod(fd, mode & ~kill)
            st = os.fstat(fd)
        self.changed_by_us(node, st)

    def op_create(self, h: Header, body: Body) -> Reply:
        parent = self.dir_node(h.nodeid)
        flags, mode, _umask, _ = body.unpack(p.CREATE_IN)
        name = check_name(body.cstring(WIRE_NAME_MAX))
        self.creatable()
        if self.handles.full():
            fail(errno.EMFILE)
        hflags, writable = self._host_flags(flags)
        if stat.S_IFMT(mode) not in (0, stat.S_IFREG):
            fail(errno.EINVAL)
        cflags = hflags
        if self.writeback and hflags & os.O_ACCMODE == os.O_WRONLY:
            # As in _reopen: the guest's page cache reads pages through this handle to
            # fill partial writes (a new file is ours to open for reading too).
            cflags = (hflags & ~os.O_ACCMODE) | os.O_RDWR
        try:
            fd = open_beneath(parent.fd, name, cflags | os.O_CREAT | os.O_EXCL, 0)
        except FileExistsError:
            if flags & os.O_EXCL:
                raise
            # The guest's cache said the name was free; the host has a file there now.
            node, st = self.lookup_child(parent, name)
            try:
                handle = self._new_handle(node, self._reopen(node, hflags), writable)
                if hflags & os.O_TRUNC:
                    self._truncated(h, node, handle.fd)
                    st = os.fstat(handle.fd)
            except BaseException:
                self.nodes.forget(node.nodeid, 1)
                raise
            return [self.entry(node, st), p.OPEN_OUT.pack(handle.fh, 0, 0)]
        try:
            self.give_to_caller(fd, parent, h.uid, h.gid)
            os.fchmod(fd, self.own.chmod_mode(mode, False))
            node, st = self.intern(os.open(hostfs.proc_path(fd), os.O_PATH | os.O_CLOEXEC))
        except BaseException:
            os.close(fd)
            raise
        handle = self._new_handle(node, fd, writable)
        return [self.entry(node, st), p.OPEN_OUT.pack(handle.fh, 0, 0)]

    def op_opendir(self, h: Header, body: Body) -> Reply:
        node = self.node(h.nodeid)
        if not node.is_dir:
            fail(errno.ENOTDIR)
        if self.handles.full():
            fail(errno.EMFILE)
        fd = os.open(hostfs.proc_path(node.fd), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        handle = self._new_handle(node, fd, False)
        return p.OPEN_OUT.pack(handle.fh, 0, 0)

    def handle(self, h: Header, fh: int) -> Handle:
        handle = self.handles.get(fh, h.nodeid)
        if handle is None:
            fail(errno.EBADF)  # forged or released: never another file
        return handle

    # ---- data

    def op_read(self, h: Header, body: Body) -> Reply:
        fh, offset, size, *_ = body.unpack(p.READ_IN)
        handle = self.handle(h, fh)
        if offset > OFFSET_MAX:
            fail(errno.EINVAL)
        return os.pread(handle.fd, min(size, p.MAX_READ), offset)

    def op_write(self, h: Header, body: Body) -> Reply:
        fh, offset, size, wflags, *_ = body.unpack(p.WRITE_IN)
        data = body.take(size)
        handle = self.handle(h, fh)
        self.writable()
        if not handle.writable:
            fail(errno.EBADF)
        if offset > OFFSET_MAX or offset + size > OFFSET_MAX:
            fail(errno.EFBIG)
        n = os.pwrite(handle.fd, data, offset)
        if wflags & p.WRITE_KILL_SUIDGID:
            self._kill_suidgid(handle)
        if self.writeback:
            self.changed_by_us(handle.node, os.fstat(handle.fd))
        return p.WRITE_OUT.pack(n, 0)

    def _kill_suidgid(self, handle: Handle) -> None:
        # Only asked for with FUSE_HANDLE_KILLPRIV_V2, which we do not offer; honoured
        # anyway as the kernel would (set-group-ID only with group execute).
        mode = os.fstat(handle.fd).st_mode
        new = mode & ~stat.S_ISUID
        if mode & stat.S_IXGRP:
            new &= ~stat.S_ISGID
        if new != mode:
            os.fchmod(handle.fd, stat.S_IMODE(new))

    def op_flush(self, h: Header, body: Body) -> Reply:
        fh, _, _, owner = body.unpack(p.FLUSH_IN)
        self.handle(h, fh)
        # close() of any descriptor drops that process's POSIX locks on the file, and a
        # request of that owner still queued (another thread's F_SETLKW) must not be
        # granted after it.
        self.drop_waiters(lambda w: w.nodeid == h.nodeid and w.lock.owner == owner, errno.EINTR)
        if self.locks.release_owner(h.nodeid, owner):
            self.wake(h.nodeid)
        return b""

    def op_release(self, h: Header, body: Body) -> Reply:
        fh, _, _, _ = body.unpack(p.RELEASE_IN)
        handle = self.handle(h, fh)
        if self.locks.release_fh(h.nodeid, fh):  # OFD locks live as long as the open file
            self.wake(h.nodeid)
        self.drop_flock_waiters(fh)
        self.drop_waiters(lambda w: w.lock.fh == fh, errno.EBADF)
        self.handles.release(fh)  # closing the host fd drops its flock
        del handle
        return b""

    op_releasedir = op_release

    def op_fsync(self, h: Header, body: Body) -> Reply:
        fh, flags, _ = body.unpack(p.FSYNC_IN)
        handle = self.handle(h, fh)
        if flags & p.FSYNC_FDATASYNC:
            os.fdatasync(handle.fd)
        else:
            os.fsync(handle.fd)
        return b""

    op_fsyncdir = op_fsync

    def op_fallocate(self, h: Header, body: Body) -> Reply:
        fh, offset, length, mode, _ = body.unpack(p.FALLOCATE_IN)
        handle = self.handle(h, fh)
        self.writable()
        if offset > OFFSET_MAX or length > OFFSET_MAX or offset + length > OFFSET_MAX:
            fail(errno.EFBIG)
        hostfs.fallocate(handle.fd, mode, offset, length)
        self.changed_by_us(handle.node, os.fstat(handle.fd))
        return b""

    def op_lseek(self, h: Header, body: Body) -> Reply:
        fh, offset, whence, _ = body.unpack(p.LSEEK_IN)
        handle = self.handle(h, fh)
        if self.writeback:
            # Data still in the guest's page cache is not here yet, and the kernel does
            # not flush before asking: our holes could hide it (a sparse-aware copy
            # would lose data). ENOSYS makes the kernel answer itself, treating the
            # whole file as data, which POSIX allows.
            fail(errno.ENOSYS)
        if whence not in (os.SEEK_DATA, os.SEEK_HOLE) or offset > OFFSET_MAX:
            fail(errno.EINVAL)  # SEEK_SET/CUR/END never leave the guest kernel
        return p.LSEEK_OUT.pack(os.lseek(handle.fd, offset, whence))

    # ---- directories

    def op_readdir(self, h: Header, body: Body) -> Reply:
        return self._readdir(h, body, plus=False)

    def op_readdirplus(self, h: Header, body: Body) -> Reply:
        return self._readdir(h, body, plus=True)

    def _snapshot(self, handle: Handle) -> list[tuple[bytes, int, int]]:
        """The whole directory, read once per rewind: offsets are indexes into it, so
        they stay valid however the directory changes while it is being read."""
        node = handle.node
        st = os.stat(node.fd)
        if node is self.nodes.root:
            parent_ino = st.st_ino  # the root's parent is the root
        else:
            try:
                parent_ino = os.stat(b"..", dir_fd=node.fd).st_ino
            except OSError:
                parent_ino = st.st_ino  # removed directory
        out = [(b".", _DT_DIR, st.st_ino), (b"..", _DT_DIR, parent_ino)]
        os.lseek(handle.fd, 0, os.SEEK_SET)
        with os.scandir(handle.fd) as it:
            for ent in it:
                if len(out) >= MAX_DIR_ENTRIES:
                    break
                if ent.is_symlink():
                    dt = 10
                elif ent.is_dir(follow_symlinks=False):
                    dt = _DT_DIR
                elif ent.is_file(follow_symlinks=False):
                    dt = 8
                else:
                    try:
                        dt = dtype_of(ent.stat(follow_symlinks=False).st_mode)
                    except OSError:
                        continue  # gone since it was listed
                out.append((os.fsencode(ent.name), dt, ent.inode()))
        return out

    def _readdir(self, h: Header, body: Body, plus: bool) -> Reply:
        fh, offset, size, *_ = body.unpack(p.READ_IN)
        handle = self.handle(h, fh)
        if not handle.node.is_dir:
            fail(errno.ENOTDIR)
        if offset == 0 or handle.entries is None:
            handle.entries = self._snapshot(handle)
        entries = handle.entries
        size = min(size, p.MAX_READ)
        parts: list[bytes] = []
        used = 0
        idx = offset
        while 0 <= idx < len(entries):
            name, dt, ino = entries[idx]
            need = p.dirent_size(name, plus)
            if used + need > size:
                break
            if plus:
                parts.append(self._plus_entry(handle.node, name))
            parts.append(p.pack_dirent(ino, idx + 1, dt, name))
            used += need
            idx += 1
        return b"".join(parts)

    def _plus_entry(self, parent: Node, name: bytes) -> bytes:
        """The entry half of a direntplus. Each one counts as a lookup; nodeid 0 tells the
        kernel "no entry for this name" (for '.', '..', vanished names, a full table)."""
        if name in (b".", b".."):
            return p.pack_entry(0, 0, None, 0)
        try:
            node, st = self.lookup_child(parent, name)
        except OSError:
            return p.pack_entry(0, 0, None, 0)
        return p.pack_entry(node.nodeid, 0, self.attr(st), TIMEOUT)

    # ---- locks

    def _lock_args(self, h: Header, body: Body) -> tuple[Handle, Lock, bool]:
        fh, owner, start, end, ltype, pid, lk_flags, _ = body.unpack(p.LK_IN)
        handle = self.handle(h, fh)
        if ltype not in (RDLCK, WRLCK, UNLCK) or start > end or end > OFFSET_MAX:
            fail(errno.EINVAL)
        return handle, Lock(owner, start, end, ltype, pid, fh), bool(lk_flags & p.LK_FLOCK)

    def op_getlk(self, h: Header, body: Body) -> Reply:
        _, req, _ = self._lock_args(h, body)
        held = self.locks.conflict(h.nodeid, req) if req.type != UNLCK else None
        if held is None:
            return p.LK_OUT.pack(req.start, req.end, UNLCK, 0)
        return p.LK_OUT.pack(held.start, held.end, held.type, held.pid)

    def op_setlk(self, h: Header, body: Body) -> Reply:
        return self._setlk(h, body, wait=False)

    def op_setlkw(self, h: Header, body: Body) -> Reply:
        return self._setlk(h, body, wait=True)

    def _setlk(self, h: Header, body: Body, wait: bool) -> Reply:
        handle, req, is_flock = self._lock_args(h, body)
        if is_flock:
            return self._flock(h, handle, req.type, wait)
        if req.type != UNLCK and self.locks.conflict(h.nodeid, req) is not None:
            if not wait:
                fail(errno.EAGAIN)
            if len(self.locks.waiters) >= self.locks.max_waiters:
                fail(errno.ENOLCK)
            self.locks.waiters.append(Waiter(h.unique, h.nodeid, req))
            return None  # answered when granted, interrupted, or never (mapping ends)
        try:
            self.locks.apply(h.nodeid, req)
        except TooManyLocks:
            fail(errno.ENOLCK)
        self.wake(h.nodeid)
        return b""

    def drop_waiters(self, pred: Callable[[Waiter], bool], code: int) -> None:
        for w in [w for w in self.locks.waiters if pred(w)]:
            self.locks.waiters.remove(w)
            self.deferred.append(p.error_reply(w.unique, code))

    def wake(self, nodeid: int) -> None:
        """Grant queued F_SETLKW requests on `nodeid` that no longer conflict, in order."""
        for w in list(self.locks.waiters):
            if w.nodeid != nodeid or self.locks.conflict(nodeid, w.lock) is not None:
                continue
            self.locks.waiters.remove(w)
            if self.handles.get(w.lock.fh, nodeid) is None:
                self.deferred.append(p.error_reply(w.unique, errno.EBADF))
                continue
            try:
                self.locks.apply(nodeid, w.lock)
            except TooManyLocks:
                self.deferred.append(p.error_reply(w.unique, errno.ENOLCK))
                continue
            self.deferred.append(p.reply(w.unique))

    # flock: the host's own flock on our open file description of that guest open file,
    # so its semantics (and conflicts with host processes) are the kernel's.
    _FLOCK_OPS = {RDLCK: fcntl.LOCK_SH, WRLCK: fcntl.LOCK_EX, UNLCK: fcntl.LOCK_UN}

    def _flock(self, h: Header, handle: Handle, ltype: int, wait: bool) -> Reply:
        op = self._FLOCK_OPS[ltype]
        try:
            fcntl.flock(handle.fd, op | fcntl.LOCK_NB)
        except BlockingIOError:
            if not wait:
                raise
            if len(self.flock_waiters) >= self.locks.max_waiters:
                fail(errno.ENOLCK)
            self.flock_waiters.append((h.unique, handle.fh, op))
            return None
        return b""

    def retry_flocks(self) -> None:
        """flock waiters wait on the host kernel, which cannot tell us when a lock goes:
        the server retries them every few milliseconds while any are queued."""
        for item in list(self.flock_waiters):
            unique, fh, op = item
            handle = self.handles.get(fh)
            try:
                if handle is None:
                    fail(errno.EBADF)
                fcntl.flock(handle.fd, op | fcntl.LOCK_NB)
            except BlockingIOError:
                continue
            except OSError as e:
                self.deferred.append(p.error_reply(unique, e.errno or errno.EIO))
            else:
                self.deferred.append(p.reply(unique))
            self.flock_waiters.remove(item)

    def drop_flock_waiters(self, fh: int) -> None:
        for item in [w for w in self.flock_waiters if w[1] == fh]:
            self.flock_waiters.remove(item)
            self.deferred.append(p.error_reply(item[0], errno.EBADF))

    def interrupt(self, unique: int) -> None:
        """INTERRUPT of a queued lock request: it fails with EINTR. Anything else was
        answered already (we handle one request at a time) and needs nothing."""
        for w in self.locks.waiters:
            if w.unique == unique:
                self.locks.waiters.remove(w)
                self.deferred.append(p.error_reply(unique, errno.EINTR))
                return
        for item in self.flock_waiters:
            if item[0] == unique:
                self.flock_waiters.remove(item)
                self.deferred.append(p.error_reply(unique, errno.EINTR))
                return
