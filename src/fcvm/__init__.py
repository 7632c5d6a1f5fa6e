"""fcvm: run Podman containers inside microVMs, one VM per container."""

__version__ = "0.1.0"
