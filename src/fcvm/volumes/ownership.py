"""Who owns what: the ids the guest sees and the ids files get on the host.

Privileged (fcvm runs as root): ids pass through unchanged. A new file is owned by the
caller of the request (the uid/gid in the FUSE header; the group of a set-group-ID
directory instead of the caller's, as a local filesystem does), and chown stores
whatever the guest asks for. The guest kernel checks permissions (the mount uses
`default_permissions`), so the host does every operation with fcvm's privileges.

Unprivileged (fcvm runs as user U with primary group G):
  * In replies, U and G appear as 0 (root in the guest is the user on the host);
    host uid/gid 0 appears as 65534 (nobody/nogroup) so that it cannot be mistaken
    for the guest's root; every other id appears unchanged.
  * In requests, guest uid/gid 0 means U/G; any other id is passed to the host as it
    is.
  * Every new file, directory, node or symlink is owned by U on the host, whoever
    created it in the guest (its group is G, or the directory's group under a
    set-group-ID directory); in the guest it shows as owned by 0.
  * chown/chgrp run as U on the host: "changing" the owner to 0 (= U) works, changing
    the group works to a group U belongs to on the host, anything else fails with
    EPERM. Permission checks are done twice: by the guest kernel on the ids above and
    then by the host kernel as U, so the guest's root cannot touch host files U could
    not (EACCES/EPERM from the host).
  * Set-user-ID and set-group-ID bits are never set on a non-directory (stripped on
    chmod, create and mknod; the host kernel clears them on write, since U lacks
    CAP_FSETID). A directory keeps set-group-ID (group inheritance, no privilege).
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass

NOBODY = 65534


@dataclass(frozen=True)
class Ownership:
    privileged: bool
    host_uid: int
    host_gid: int

    @classmethod
    def current(cls) -> Ownership:
        return cls(os.geteuid() == 0, os.geteuid(), os.getegid())

    def guest_uid(self, uid: int) -> int:
        if self.privileged:
            return uid
        if uid == self.host_uid:
            return 0
        return NOBODY if uid == 0 else uid

    def guest_gid(self, gid: int) -> int:
        if self.privileged:
            return gid
        if gid == self.host_gid:
            return 0
        return NOBODY if gid == 0 else gid

    def host_uid_for(self, uid: int) -> int:
        if not self.privileged and uid == 0:
            return self.host_uid
        return uid

    def host_gid_for(self, gid: int) -> int:
        if not self.privileged and gid == 0:
            return self.host_gid
        return gid

    def chmod_mode(self, mode: int, is_dir: bool) -> int:
        """Permission bits a chmod, create or mknod may set on the host."""
        mode &= 0o7777
        if not self.privileged and not is_dir:
            mode &= ~(stat.S_ISUID | stat.S_ISGID)
        return mode
