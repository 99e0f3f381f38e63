"""The configuration: its model (model.py), its loader (load.py, reader.py, listener.py,
values.py) and the route rule model (rules.py).

The names below are the package's interface; import them from ``mtlsproxy.config``.
"""

from mtlsproxy.config.load import admin_is_loopback, cpu_count, load_config, parse_config
from mtlsproxy.config.model import (
    CLIENT_INTERMEDIATES,
    FORWARD_FAMILIES,
    AccessTokenConfig,
    AdminConfig,
    AuthorizerConfig,
    CertificateConfig,
    Config,
    DomainConfig,
    LimitsConfig,
    ListenerConfig,
    MutualTLSConfig,
    Networks,
    RevocationConfig,
    RouteConfig,
    TimeoutsConfig,
    TLSConfig,
    Upstream,
)
from mtlsproxy.config.values import parse_address, parse_s3_uri, parse_upstream
from mtlsproxy.errors import ConfigError

__all__ = [
    "CLIENT_INTERMEDIATES", "FORWARD_FAMILIES",
    "AccessTokenConfig", "AdminConfig", "AuthorizerConfig", "CertificateConfig", "Config",
    "ConfigError", "DomainConfig",
    "LimitsConfig", "ListenerConfig", "MutualTLSConfig", "Networks", "RevocationConfig",
    "RouteConfig", "TLSConfig", "TimeoutsConfig", "Upstream", "admin_is_loopback",
    "cpu_count", "load_config", "parse_address", "parse_config", "parse_s3_uri",
    "parse_upstream",
]
