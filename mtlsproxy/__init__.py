"""mtlsproxy: a mutual-TLS reverse proxy sidecar on asyncio + uvloop."""

__version__ = "0.1.0"
