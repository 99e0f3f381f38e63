"""mtlsproxy: a mutual-TLS reverse proxy sidecar on asyncio + uvloop."""

from mtlsproxy import compiled

__version__ = "0.1.0"

# Before any module of the fast exchange is imported: compiled, or all from their source.
compiled.install()
