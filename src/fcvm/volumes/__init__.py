"""Host directories inside the container (`--map HOST:GUEST[:ro]`), through FUSE.

spec.py      --map parsing -> VolumeMap (light: the CLI imports it)
server.py    VolumeServer: one mapping's FUSE server (a thread of the owning fcvm)
protocol.py  the FUSE wire format; base/entries/files.py the operations;
             nodes.py, locks.py, ownership.py, hostfs.py their parts
relay.py     the guest's fcvm-fuse-relay (data/fcvm-fuse-relay.c, built by assets/cprog)

Nothing is imported here: import the module you need (fcvm.volumes.server, ...).
"""
