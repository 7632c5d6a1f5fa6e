"""Messages of the process protocol that runs on top of session channels.

Shared by host and agent (stdlib only). To run something in the guest, the host:

1. opens one channel per stdio stream, meta {"kind": "stdio", "fd": 0|1|2}
   (with a TTY, one channel, fd 0, carries input and output both ways);
2. opens a process channel, meta {"kind": "proc", "spec": {...}, "stdio": {"0": id, ...}}.

The spec's "mode" says what to run:
  "container"  the main container of the VM (image, command, env, name, ...)
  "exec"       a command inside the running container
  "vm"         a command in the guest OS itself

A container spec's "image" is one of:
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

On the process channel the agent sends JSON events, in order:
  {"event": "phase", "name": "...", "detail": "..."}
                                               progress, for logs and benchmarks
                                               (image-store, image-store-unusable
                                               with the reason as detail, image-load,
                                               image-pull, image-loaded); detail optional
  {"event": "started", "pid": N}
  {"event": "health", "status": "healthy"|"unhealthy", "detail": "..."}
                                               (container mode: once the container
                                               runs, or once spec.health_check answers)
  {"event": "exit", "code": N}                 after all stdio channels reached EOF
  {"event": "error", "message": "...", "code": 125|126|127}
and the host may send:
  {"op": "resize", "rows": R, "cols": C}
  {"op": "signal", "signal": N}
"""

from __future__ import annotations

KIND_STDIO = "stdio"
KIND_PROC = "proc"

MODE_CONTAINER = "container"
MODE_EXEC = "exec"
MODE_VM = "vm"

EV_PHASE = "phase"
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

# Touched by an OCI poststart hook in the rootfs (assets/rootfs.py STARTED_HOOK) once the
# runtime has started the container's process: how the agent knows the container runs
# without asking podman (a podman process per poll slowed the run it watched).
CONTAINER_STARTED_FILE = "/run/fcvm-container.started"
