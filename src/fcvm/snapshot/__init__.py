"""Snapshots: the on-disk layout (layout.py), the userfaultfd page server (pageserver.py,
with handshake.py, source.py, faults.py, prefetch.py; uffd.py the bindings), the
recorded working sets (workingset.py) and `fcvm snapshot serve` (serving.py, which
registers a reaper for a killed server's socket).
"""
