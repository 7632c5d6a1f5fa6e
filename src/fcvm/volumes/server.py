"""VolumeServer: one mapped host directory, served as raw FUSE messages on a stream.

`serve(sock)` reads requests back to back (each starts with fuse_in_header, whose
first u32 is the whole message's length), handles them one at a time in order, and
writes each reply (fuse_out_header first, same framing) before reading on. It returns
at EOF, after `stop()`, or when the guest sends something no kernel would (a length
out of bounds, a truncated message, a body too short for its opcode, an unterminated
name): that ends this mapping only, with the reason logged and kept in `end_reason`.
Nothing the guest sends makes it raise; a bug in a handler answers EIO and is logged.

One thread is enough: the guest's requests wait in the socket while one is handled,
and the only request that may block (F_SETLKW) is queued instead, answered when the
lock is free or INTERRUPTed.
"""

from __future__ import annotations

import contextlib
import errno
import os
import resource
import select
import socket
import threading
from collections.abc import Callable
from pathlib import Path

from fcvm.log import get as get_logger
from fcvm.volumes import protocol as p
from fcvm.volumes.base import Reply
from fcvm.volumes.entries import EntryOps
from fcvm.volumes.files import FileOps
from fcvm.volumes.ownership import Ownership
from fcvm.volumes.protocol import Body, Header, Malformed, Op

log = get_logger("fcvm.volumes")

# What the server asks the guest kernel for (and gets, where offered).
_WANTED = (
    p.ASYNC_READ | p.POSIX_LOCKS | p.ATOMIC_O_TRUNC | p.BIG_WRITES | p.FLOCK_LOCKS
    | p.AUTO_INVAL_DATA | p.DO_READDIRPLUS | p.READDIRPLUS_AUTO | p.PARALLEL_DIROPS
    | p.MAX_PAGES_FLAG | p.ASYNC_DIO
)  # fmt: skip
_NO_REPLY = frozenset({Op.FORGET, Op.BATCH_FORGET, Op.INTERRUPT, Op.NOTIFY_REPLY})
_FLOCK_RETRY_S = 0.01
DEFAULT_MAX_NODES = 32768
DEFAULT_MAX_HANDLES = 4096
FD_RESERVE = 512  # descriptors left for the rest of the process


def fd_budget(max_nodes: int, max_handles: int) -> tuple[int, int]:
    """The caps, lowered to fit this process's RLIMIT_NOFILE soft limit (minus a
    reserve for the rest of fcvm): every node and handle is one descriptor, and running
    the whole process out of them would break more than this mapping. The owner should
    raise the soft limit (see DESIGN.md, Volumes) and, with several maps, pass caps."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return max_nodes, max_handles
    budget = max(64, soft - FD_RESERVE)
    if max_nodes + max_handles <= budget:
        return max_nodes, max_handles
    handles = max(16, min(max_handles, budget // 4))
    return max(32, min(max_nodes, budget - handles)), handles


def writeback_from_env() -> bool:
    """Whether a --map offers the guest the writeback cache: only when
    FCVM_WRITEBACK_CACHE=1 asks for it, and never with FCVM_NO_WRITEBACK_CACHE=1 (any
    value but "" or "0" counts). Off by default because under it the guest kernel keeps
    its own idea of a file's size and places appends at the end it knows: a host process
    appending to or truncating a file the container writes has its data overwritten (a
    shared log, logrotate's copytruncate), and `tail -f` in the container never sees
    what the host appends. Without it every write is on the host when it returns."""

    def on(name: str) -> bool:
        return os.environ.get(name, "") not in ("", "0")

    return on("FCVM_WRITEBACK_CACHE") and not on("FCVM_NO_WRITEBACK_CACHE")


class _Ops(EntryOps, FileOps):
    pass


class VolumeServer:
    """Serves `root` (an existing directory) to one guest FUSE mount.

    read_only: every modifying request fails with EROFS here, whatever the guest's
      mount says.
    writeback: offer the guest kernel FUSE_WRITEBACK_CACHE (buffered writes reach the
      host at fsync/close/writeback, not at write(2)); fcvm passes writeback_from_env().
    max_nodes / max_handles: caps on inodes the guest may hold (each an O_PATH fd) and
      on open files; past them the guest gets ENFILE / EMFILE. Lowered to fit the
      RLIMIT_NOFILE soft limit (fd_budget); the effective values are attributes.
    """

    def __init__(
        self,
        root: Path,
        *,
        read_only: bool = False,
        writeback: bool = False,
        max_nodes: int = DEFAULT_MAX_NODES,
        max_handles: int = DEFAULT_MAX_HANDLES,
    ) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise NotADirectoryError(f"{self.root} is not a directory")
        self.read_only = read_only
        self.writeback = writeback and not read_only
        self.max_nodes, self.max_handles = fd_budget(max_nodes, max_handles)
        self.ownership = Ownership.current()
        self.end_reason: str | None = None  # why serve() returned, once it has
        self.negotiated: tuple[int, int, int] | None = None  # (minor, flags, max_write)
        self._sock: socket.socket | None = None
        self._stopping = threading.Event()
        self._ops: _Ops | None = None
        self._initialized = False

    # ---- public

    def serve(self, sock: socket.socket) -> None:
        """Handle FUSE messages from `sock` until EOF, stop() or a protocol violation.
        Never raises for anything the peer sends. Closes nothing it did not open."""
        self._sock = sock
        root_fd = os.open(self.root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        ops = _Ops(
            root_fd,
            read_only=self.read_only,
            writeback=self.writeback,
            ownership=self.ownership,
            max_nodes=self.max_nodes,
            max_handles=self.max_handles,
        )
        self._ops = ops
        try:
            self.end_reason = self._loop(sock, ops)
        except Exception as e:  # a bug of ours; the process must stay up
            log.exception("map %s: server failed", self.root)
            self.end_reason = f"internal error: {e!r}"
        finally:
            ops.handles.close_all()
            ops.nodes.close_all()
            os.close(root_fd)
        level = log.info if self.end_reason in ("EOF", "stopped") else log.warning
        level("map %s: serving ended: %s", self.root, self.end_reason)

    def stop(self) -> None:
        """Make serve() return soon (from any thread)."""
        self._stopping.set()
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)

    # ---- the loop

    def _loop(self, sock: socket.socket, ops: _Ops) -> str:
        buf = bytearray(2 * p.MAX_REQUEST)
        view = memoryview(buf)
        start = end = 0
        while not self._stopping.is_set():
            # Every complete message in the buffer, in order.
            while end - start >= p.IN_HEADER_SIZE:
                try:
                    hdr = p.parse_header(view[start:end])
                except Malformed as e:
                    return f"malformed message: {e}"
                if end - start < hdr.length:
                    break
                body = view[start + p.IN_HEADER_SIZE : start + hdr.length - hdr.extlen * 8]
                try:
                    self._handle(hdr, Body(body), ops)
                except Malformed as e:
                    return f"malformed {_opname(hdr.opcode)} message: {e}"
                except _Ended as e:
                    return str(e)
                except OSError as e:  # the peer went away while we answered
                    return f"send failed: {e}"
                start += hdr.length
            if start == end:
                start = end = 0
            elif len(buf) - start < p.MAX_REQUEST:
                # Not enough room after `start` for a whole message: slide the partial
                # message (less than one message) to the front.
                view[: end - start] = view[start:end]
                end -= start
                start = 0
            if ops.flock_waiters and not select.select([sock], [], [], _FLOCK_RETRY_S)[0]:
                ops.retry_flocks()
                self._flush_deferred(ops)
                continue
            try:
                n = sock.recv_into(view[end:])
            except ConnectionResetError:
                n = 0  # the relay exited with our reply unread: an end like EOF
            except OSError as e:
                return "stopped" if self._stopping.is_set() else f"receive failed: {e}"
            if n == 0:
                if self._stopping.is_set():
                    return "stopped"
                return "EOF" if start == end else f"truncated message at EOF ({end - start} bytes)"
            end += n
        return "stopped"

    def _send(self, parts: list[bytes]) -> None:
        """One whole reply. sendmsg gathers header and data without joining them (a READ
        reply is up to 1 MiB); a short send, rare on a stream socket, sends the rest."""
        assert self._sock is not None
        if len(parts) == 1:
            self._sock.sendall(parts[0])
            return
        sent = self._sock.sendmsg(parts)
        total = sum(len(x) for x in parts)
        if sent < total:
            self._sock.sendall(b"".join(parts)[sent:])

    def _flush_deferred(self, ops: _Ops) -> None:
        while ops.deferred:
            self._send([ops.deferred.pop(0)])

    def _handle(self, hdr: Header, body: Body, ops: _Ops) -> None:
        op = hdr.opcode
        if op == Op.INIT:
            self._send([self._init(hdr, body)])
            return
        if not self._initialized:
            if op not in _NO_REPLY:
                self._send([p.error_reply(hdr.unique, errno.EIO)])
            return
        if op == Op.FORGET:
            (nlookup,) = body.unpack(p.FORGET_IN)
            ops.nodes.forget(hdr.nodeid, nlookup)
            return
        if op == Op.BATCH_FORGET:
            count, _ = body.unpack(p.BATCH_FORGET_IN)
            if count * p.FORGET_ONE.size > body.remaining():
                raise Malformed(f"BATCH_FORGET of {count} entries in a short body")
            for _ in range(count):
                nodeid, nlookup = body.unpack(p.FORGET_ONE)
                ops.nodes.forget(nodeid, nlookup)
            return
        if op == Op.INTERRUPT:
            (unique,) = body.unpack(p.INTERRUPT_IN)
            ops.interrupt(unique)
            self._flush_deferred(ops)
            return
        if op == Op.NOTIFY_REPLY:
            return
        if op == Op.DESTROY:
            self._send([p.reply(hdr.unique)])
            return
        handler = _HANDLERS.get(op)
        if handler is None:
            self._send([p.error_reply(hdr.unique, errno.ENOSYS)])
            return
        try:
            result = handler(ops, hdr, body)
        except Malformed:
            raise
        except OSError as e:
            self._send([p.error_reply(hdr.unique, e.errno or errno.EIO)])
            self._flush_deferred(ops)
            return
        except Exception:
            log.exception("map %s: %s failed", self.root, _opname(op))
            self._send([p.error_reply(hdr.unique, errno.EIO)])
            return
        if result is not None:
            parts = result if isinstance(result, list) else [result]
            length = p.OUT_HEADER_SIZE + sum(len(x) for x in parts)
            self._send([p.out_header(length, 0, hdr.unique), *parts])
        self._flush_deferred(ops)

    def _init(self, hdr: Header, body: Body) -> bytes:
        if self._initialized:
            return p.error_reply(hdr.unique, errno.EPROTO)
        major, minor, max_readahead, flags = body.unpack(p.INIT_IN_COMPAT)
        if major > p.KERNEL_MAJOR:
            # Protocol: answer with our major only; the kernel retries with ours.
            return p.reply(hdr.unique, p.INIT_OUT.pack(p.KERNEL_MAJOR, p.OUR_MINOR, *[0] * 10))
        if major < p.KERNEL_MAJOR or minor < p.MIN_MINOR:
            self._send([p.error_reply(hdr.unique, errno.EPROTO)])
            raise _Ended(f"kernel speaks FUSE {major}.{minor}, need 7.{p.MIN_MINOR}+")
        if flags & p.INIT_EXT and body.remaining() >= 4:
            (flags2,) = body.unpack(p.U32)
            del flags2  # nothing we want lives in flags2 yet
        wanted = _WANTED | (p.WRITEBACK_CACHE if self.writeback else 0)
        got = flags & wanted
        out_minor = min(minor, p.OUR_MINOR)
        out = p.INIT_OUT.pack(
            p.KERNEL_MAJOR, out_minor, max_readahead, got,
            64, 48,  # max_background, congestion_threshold
            p.MAX_WRITE, 1,  # max_write, time_gran (ns timestamps)
            p.MAX_PAGES, 0,  # max_pages, map_alignment
            0, 0,  # flags2, max_stack_depth
        )  # fmt: skip
        self._initialized = True
        self.negotiated = (out_minor, got, p.MAX_WRITE)
        log.info("map %s: FUSE 7.%d, flags %#x", self.root, out_minor, got)
        return p.reply(hdr.unique, out)


class _Ended(Exception):
    """Serving must end (after a reply that was already sent)."""


def _opname(opcode: int) -> str:
    try:
        return Op(opcode).name
    except ValueError:
        return f"opcode {opcode}"


_Handler = Callable[[_Ops, Header, Body], Reply]
_HANDLERS: dict[int, _Handler] = {
    Op.LOOKUP: _Ops.op_lookup,
    Op.GETATTR: _Ops.op_getattr,
    Op.SETATTR: _Ops.op_setattr,
    Op.READLINK: _Ops.op_readlink,
    Op.SYMLINK: _Ops.op_symlink,
    Op.MKNOD: _Ops.op_mknod,
    Op.MKDIR: _Ops.op_mkdir,
    Op.UNLINK: _Ops.op_unlink,
    Op.RMDIR: _Ops.op_rmdir,
    Op.RENAME: _Ops.op_rename,
    Op.RENAME2: _Ops.op_rename2,
    Op.LINK: _Ops.op_link,
    Op.OPEN: _Ops.op_open,
    Op.CREATE: _Ops.op_create,
    Op.READ: _Ops.op_read,
    Op.WRITE: _Ops.op_write,
    Op.STATFS: _Ops.op_statfs,
    Op.RELEASE: _Ops.op_release,
    Op.RELEASEDIR: _Ops.op_releasedir,
    Op.FSYNC: _Ops.op_fsync,
    Op.FSYNCDIR: _Ops.op_fsyncdir,
    Op.FLUSH: _Ops.op_flush,
    Op.SETXATTR: _Ops.op_setxattr,
    Op.GETXATTR: _Ops.op_getxattr,
    Op.LISTXATTR: _Ops.op_listxattr,
    Op.REMOVEXATTR: _Ops.op_removexattr,
    Op.OPENDIR: _Ops.op_opendir,
    Op.READDIR: _Ops.op_readdir,
    Op.READDIRPLUS: _Ops.op_readdirplus,
    Op.GETLK: _Ops.op_getlk,
    Op.SETLK: _Ops.op_setlk,
    Op.SETLKW: _Ops.op_setlkw,
    Op.ACCESS: _Ops.op_access,
    Op.FALLOCATE: _Ops.op_fallocate,
    Op.LSEEK: _Ops.op_lseek,
}
