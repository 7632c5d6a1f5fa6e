"""Container image sources on the host, and how each reaches the guest.

There is no registry here, so the usual path is a read-only virtio disk holding an
OCI/docker archive that podman in the guest loads (`podman load -i /dev/vdb`):

- an image in the host's podman storage is exported once per image ID to
  BASE/images/<id>.oci.tar and reused;
- `oci-archive:PATH` / `docker-archive:PATH` are attached as they are;
- a fully qualified registry reference not in host storage is pulled by podman in
  the guest, which needs the guest to have network.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path

from fcvm import log, paths
from fcvm.errors import ImageError
from fcvm.plan import ImageSpec

logger = log.get("images")


@dataclass(frozen=True)
class GuestImage:
    archive: Path | None  # attached read-only as the image disk, or None to pull
    ref: str  # what to run (the name podman load reports wins when it has one)
    pull: str | None = None


def images_dir() -> Path:
    return paths.base_dir() / "images"


def _podman() -> str:
    path = shutil.which("podman")
    if path is None:
        raise ImageError("podman is not installed on the host", hint="apt-get install podman")
    return path


def _looks_like_registry_ref(ref: str) -> bool:
    first = ref.split("/", 1)[0]
    return "/" in ref and ("." in first or ":" in first) and first != "localhost"


def host_image_id(ref: str) -> str | None:
    proc = subprocess.run(
        [_podman(), "image", "inspect", "--format", "{{.Id}}", ref],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        return None
    return proc.stdout.strip().splitlines()[0]


def export_host_image(ref: str, image_id: str) -> Path:
    """podman save, once per image ID (atomically, so a concurrent run never sees half)."""
    out = images_dir() / f"{image_id[:32]}.oci.tar"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".tmp{os.getpid()}")
    tmp.unlink(missing_ok=True)
    proc = subprocess.run(
        [_podman(), "save", "--format", "oci-archive", "-o", str(tmp), ref],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise ImageError(f"cannot export {ref} from host storage: {proc.stderr.strip()}")
    os.replace(tmp, out)
    return out


def _check_archive(kind: str, path: Path) -> None:
    if not path.exists():
        raise ImageError(f"{kind} not found: {path}")
    if not path.is_file():
        raise ImageError(f"{kind} is not a file: {path}")
    try:
        with tarfile.open(path) as tar:  # reads headers only, seeking over contents
            names = {member.name.removeprefix("./") for member in tar}
    except (OSError, tarfile.TarError):
        raise ImageError(f"{kind} {path} is not a readable tar archive") from None
    wanted = "index.json" if kind == "oci-archive" else "manifest.json"
    if wanted not in names:
        raise ImageError(f"{path} is not a {kind} (no {wanted} in it)")


def archive_ref(kind: str, path: Path) -> str:
    """The image name recorded in an archive, if any (for listings)."""
    try:
        with tarfile.open(path) as tar:
            if kind == "docker-archive":
                f = tar.extractfile("manifest.json")
                tags = json.load(f)[0].get("RepoTags") or [] if f else []
                return str(tags[0]) if tags else path.name
            f = tar.extractfile("index.json")
            index = json.load(f) if f else {}
            ann = (index.get("manifests") or [{}])[0].get("annotations", {})
            return str(ann.get("org.opencontainers.image.ref.name") or path.name)
    except (OSError, KeyError, ValueError, tarfile.TarError):
        return path.name


def resolve(spec: ImageSpec) -> GuestImage:
    if spec.kind in ("oci-archive", "docker-archive"):
        path = Path(spec.ref).resolve()
        _check_archive(spec.kind, path)
        return GuestImage(archive=path, ref="")
    image_id = host_image_id(spec.ref)
    if image_id is not None:
        logger.info("image %s is %s in host storage", spec.ref, image_id[:12])
        return GuestImage(archive=export_host_image(spec.ref, image_id), ref="")
    if _looks_like_registry_ref(spec.ref):
        return GuestImage(archive=None, ref=spec.ref, pull=spec.ref)
    raise ImageError(
        f"image {spec.ref!r} not found in host storage",
        hint="give a full registry reference to pull it in the guest, "
        "or oci-archive:PATH / docker-archive:PATH",
    )
