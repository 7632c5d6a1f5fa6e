"""The server's tables: known inodes (nodes) and open files (handles).

A node holds an O_PATH descriptor of one host inode inside the mapped root; every
operation on it goes through that descriptor, never through a path. Node ids and
file handles come from counters that only grow (never reused while the server lives),
so a stale or forged id finds nothing rather than some other inode; that counter is
the generation. Both tables are capped so a guest cannot run the host out of fds.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field

from fcvm.volumes.protocol import ROOT_ID


class TableFull(Exception):
    """A cap was reached; the caller answers ENFILE/EMFILE."""


@dataclass(slots=True)
class Node:
    nodeid: int
    fd: int  # O_PATH|O_NOFOLLOW
    key: tuple[int, int]  # (st_dev, st_ino)
    fmt: int  # stat.S_IFMT of the inode; it never changes
    nlookup: int = 0
    # Open handles pin the descriptor: a (hostile) FORGET while files are open removes
    # the node from the table but must not close an fd a handle still reaches it by, or
    # the number could be reused for some other file.
    handles: int = 0
    live: bool = True
    # (mtime_ns, size) as of this node's creation or our own last change to it: a host
    # inode whose data changed otherwise was changed behind the guest's back.
    seen: tuple[int, int] = (0, 0)

    @property
    def is_dir(self) -> bool:
        return self.fmt == stat.S_IFDIR

    @property
    def is_reg(self) -> bool:
        return self.fmt == stat.S_IFREG

    @property
    def is_symlink(self) -> bool:
        return self.fmt == stat.S_IFLNK


class NodeTable:
    def __init__(self, root_fd: int, root_st: os.stat_result, max_nodes: int) -> None:
        self.max_nodes = max_nodes
        self._next = ROOT_ID + 1
        root = Node(ROOT_ID, root_fd, (root_st.st_dev, root_st.st_ino), stat.S_IFDIR, 1)
        self.root = root
        self._by_id: dict[int, Node] = {ROOT_ID: root}
        self._by_key: dict[tuple[int, int], Node] = {root.key: root}

    def __len__(self) -> int:
        return len(self._by_id)

    def get(self, nodeid: int) -> Node | None:
        return self._by_id.get(nodeid)

    def full(self) -> bool:
        return len(self._by_id) >= self.max_nodes

    def intern(self, fd: int, st: os.stat_result, *, renew_stale: bool = False) -> Node:
        """The node for the inode `fd` refers to, with one more lookup counted. Takes
        ownership of `fd` (closed if the inode is already known).

        renew_stale: if the inode is a regular file whose data changed since we last
        saw it (not through us), give it a new node id. The guest kernel with the
        writeback cache trusts its cached size and mtime for as long as it holds an
        inode; a new node id on the next lookup (entry revalidation, at most a second
        later) makes it drop that inode and its pages for new opens. The old node stays
        valid for what the guest still holds (open files), until FORGET."""
        key = (st.st_dev, st.st_ino)
        node = self._by_key.get(key)
        if node is not None:
            stale = renew_stale and node.is_reg and node.seen != (st.st_mtime_ns, st.st_size)
            if not stale:
                os.close(fd)
                node.nlookup += 1
                return node
            del self._by_key[key]  # retired: reachable by its id only
        if len(self._by_id) >= self.max_nodes:
            os.close(fd)
            raise TableFull(f"{self.max_nodes} inodes in use")
        node = Node(self._next, fd, key, stat.S_IFMT(st.st_mode), 1)
        node.seen = (st.st_mtime_ns, st.st_size)
        self._next += 1
        self._by_id[node.nodeid] = node
        self._by_key[key] = node
        return node

    def forget(self, nodeid: int, nlookup: int) -> None:
        node = self._by_id.get(nodeid)
        if node is None or node is self.root:
            return  # the kernel never forgets the root; a forged id is ignored
        node.nlookup -= min(nlookup, node.nlookup)
        if node.nlookup == 0:
            del self._by_id[nodeid]
            if self._by_key.get(node.key) is node:
                del self._by_key[node.key]
            node.live = False
            if node.handles == 0:
                os.close(node.fd)

    def close_all(self) -> None:
        for node in self._by_id.values():
            node.live = False
            if node is not self.root and node.handles == 0:
                os.close(node.fd)
        self._by_id = {ROOT_ID: self.root}
        self._by_key = {self.root.key: self.root}


@dataclass(slots=True)
class Handle:
    fh: int
    node: Node
    fd: int  # a real open file description (O_RDONLY/O_WRONLY/O_RDWR or a directory)
    writable: bool = False
    entries: list[tuple[bytes, int, int]] | None = field(default=None)  # readdir snapshot


class HandleTable:
    def __init__(self, max_handles: int) -> None:
        self.max_handles = max_handles
        self._next = 1
        self._by_fh: dict[int, Handle] = {}

    def __len__(self) -> int:
        return len(self._by_fh)

    def full(self) -> bool:
        return len(self._by_fh) >= self.max_handles

    def add(self, node: Node, fd: int, writable: bool) -> Handle:
        if self.full():
            os.close(fd)
            raise TableFull(f"{self.max_handles} open files")
        h = Handle(self._next, node, fd, writable)
        node.handles += 1
        self._next += 1
        self._by_fh[h.fh] = h
        return h

    def get(self, fh: int, nodeid: int | None = None) -> Handle | None:
        """The handle `fh`, if it exists and (when given) belongs to `nodeid`: the kernel
        always sends both, so a mismatch is a forged handle."""
        h = self._by_fh.get(fh)
        if h is None or (nodeid is not None and h.node.nodeid != nodeid):
            return None
        return h

    def release(self, fh: int) -> Handle | None:
        """Remove and close handle `fh`; closes its node's fd too if the node was
        forgotten meanwhile."""
        h = self._by_fh.pop(fh, None)
        if h is not None:
            self._close(h)
        return h

    @staticmethod
    def _close(h: Handle) -> None:
        os.close(h.fd)
        h.node.handles -= 1
        if not h.node.live and h.node.handles == 0 and h.node.nodeid != ROOT_ID:
            os.close(h.node.fd)

    def nodes_in_use(self) -> set[int]:
        return {h.node.nodeid for h in self._by_fh.values()}

    def close_all(self) -> None:
        for h in list(self._by_fh.values()):
            self._close(h)
        self._by_fh.clear()
