"""Host directories inside the container (`--map HOST:GUEST[:ro]`), through FUSE.

spec.py      --map parsing -> VolumeMap
server.py    VolumeServer: one mapping's FUSE server (a thread of the owning fcvm)
protocol.py  the FUSE wire format; base/entries/files.py the operations;
             nodes.py, locks.py, ownership.py, hostfs.py their parts
relay.py     building the guest's fcvm-fuse-relay (data/fcvm-fuse-relay.c)
"""

from fcvm.volumes.relay import build_relay, relay_digest
from fcvm.volumes.server import VolumeServer
from fcvm.volumes.spec import VolumeMap, parse_maps

__all__ = ["VolumeMap", "VolumeServer", "build_relay", "parse_maps", "relay_digest"]
