"""Snapshots: the on-disk layout (layout.py), the userfaultfd page server (pageserver.py,
with handshake.py, source.py, faults.py, prefetch.py; uffd.py the bindings) and the
recorded working sets (workingset.py).

A page server's state record carries its socket path in extra["socket"]; the
stale-record reaper (state.reap_stale) removes it after a killed server.
"""
