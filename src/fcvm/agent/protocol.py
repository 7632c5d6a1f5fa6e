"""Requests and messages between the host and the agent, on top of session channels.

Shared by host and agent (stdlib only). What the host asks:

1. `prepare` the container, once per boot (before a snapshot): a channel with meta
   {"kind": "prepare", "setup": ContainerSetup}. The agent makes the image available,
   creates the container with fcvm's gate as its entrypoint (the container runs, held
   at the gate, user's process not started), and answers phase events, then
   {"event": "ready", "container": ID, "pid": N} or an error event.
2. A process: one channel per stdio stream, meta {"kind": "stdio", "fd": 0|1|2} (with a
   TTY one channel, fd 0, both ways), then a process channel, meta {"kind": "proc",
   "spec": ProcessSpec, "stdio": {"0": id, ...}}. spec.mode:
     "container"  the gate execs spec.argv as the container's process; if it already
                  runs (restored from a startup snapshot) the channels attach to it
     "exec"       a command inside the container (podman exec)
     "vm"         a command in the guest OS itself
3. After restoring a snapshot, the host's HELLO carries "identity" (hostname, clock,
   entropy, network: what the restored guest must take on; agent/identity.py), which
   the agent applies before answering, with the outcome in its own HELLO.
4. Control requests on channel 0 (session/control.py): the session's own
   "quiesce"/"resume".

An ImageSource (spec.py) is one of:
  {"store": "/dev/vdb", "ref": ID, "device": "/dev/vdc"}
               a prebuilt containers-storage (ext4, read-only): mounted on
               /var/lib/fcvm-image-store (an additionalimagestores entry) and ID run
               as it is, no load; if it cannot be mounted or lacks ID, "device"
               (optional) is loaded instead, as below
  {"device": "/dev/vdb", "ref": REF}
               an OCI/docker archive: `podman load -i`; runs REF, or if "" the name
               podman load reports
  {"pull": REF}
               `podman pull REF` in the guest

On a process channel the agent sends JSON events, in order:
  {"event": "phase", "name": "...", "detail": "..."}
                                               progress, for logs and benchmarks
                                               (image-store, image-store-unusable
                                               with the reason as detail, image-load,
                                               image-pull, image-loaded); detail optional
  {"event": "started", "pid": N}
  {"event": "health", "status": "healthy"|"unhealthy", "detail": "..."}
                                               (container mode: once its process runs,
                                               or once spec.health_check answers)
  {"event": "exit", "code": N}                 after all stdio channels reached EOF
  {"event": "error", "message": "...", "code": 125|126|127}
and the host may send:
  {"op": "resize", "rows": R, "cols": C}
  {"op": "signal", "signal": N}
"""

from __future__ import annotations

KIND_STDIO = "stdio"
KIND_PROC = "proc"
KIND_PREPARE = "prepare"

MODE_CONTAINER = "container"
MODE_EXEC = "exec"
MODE_VM = "vm"

EV_PHASE = "phase"
EV_READY = "ready"
EV_STARTED = "started"
EV_HEALTH = "health"
EV_EXIT = "exit"
EV_ERROR = "error"

OP_RESIZE = "resize"
OP_SIGNAL = "signal"

# Where the agent mounts an image store disk; the rootfs's storage.conf names it in
# additionalimagestores (so podman run/exec/inspect all see it) and holds the empty
# directory: podman refuses to start if a listed store directory is missing. It is
# outside /var/lib/containers, which the agent covers with a tmpfs.
IMAGE_STORE_DIR = "/var/lib/fcvm-image-store"

# Name of the main container inside the guest (one container per VM).
CONTAINER_NAME = "fcvm"

# The gate (assets/data/gate.c): installed in the rootfs at GATE_BINARY; at prepare the
# agent puts a copy and its socket in GATE_DIR, mounted read-only on GATE_MOUNT in the
# container (the gate's default socket path is GATE_MOUNT/gate.sock).
GATE_BINARY = "/usr/lib/fcvm/gate"
GATE_DIR = "/run/fcvm/gate"
GATE_MOUNT = "/.fcvm"

# --map volumes: extra stream i (0..7, vmm/base.py MAP_CHANNELS) is the virtio-serial
# port named MAP_PORT_NAME.format(i) under QEMU, or a vsock connection from the guest
# to the host (CID 2) on port MAP_VSOCK_PORT_BASE + i under Firecracker. The agent
# hands it to the relay (volumes/data/fcvm-fuse-relay.c), which mounts the volume in
# the container's mount namespace.
MAP_PORT_NAME = "fcvm.map.{}"
MAP_VSOCK_PORT_BASE = 1100
RELAY_BINARY = "/usr/lib/fcvm/fcvm-fuse-relay"
