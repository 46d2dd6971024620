"""The gateway's configuration: read once from TOML, validated into frozen dataclasses.

Only this package and ``cli.py`` read files and the environment. Every check
happens here, at load time; a bad value raises ``ConfigError`` naming the
file, the dotted key and what was expected, so the rest of lbgw can trust
what it is given. See the README for a complete commented example.

- ``model``: the dataclasses, each field with its default and limits, once.
- ``fields``: how a field declares them (``Spec``), and the syntax of addresses and names.
- ``reader``: the one reader that walks the model; ``load_config``, ``config_from_mapping``.
- ``rules``: the rules that span fields, and the reading of ``[[routes]]``.
- ``env``: the ``OTEL_*`` variables and ``LBGW_STICKY_SECRET`` laid over the file.
"""

from lbgw.config.env import sticky_from_env, tracing_from_env
from lbgw.config.fields import is_metadata_key, is_method_name, parse_address
from lbgw.config.model import (
    DEFAULT_MAX_MESSAGE_BYTES,
    DEFAULT_OTLP_ENDPOINT,
    DEFAULT_STICKY_KEY,
    DEFAULT_TABLE_SIZE,
    HASH_ON,
    HASH_STRATEGIES,
    HEALTH_MODES,
    LOG_FORMATS,
    LOG_LEVELS,
    MAX_MESSAGE_BYTES,
    MAX_WORKERS,
    OTLP_PROTOCOLS,
    ROUTE_MATCHES,
    STATUS_CODES,
    STICKY_SECRET_ENV,
    STRATEGIES,
    TRACES_EXPORTERS,
    TRACES_SAMPLERS,
    WEIGHTED_STRATEGIES,
    AdminConfig,
    ClusterConfig,
    Config,
    EndpointConfig,
    HealthCheckConfig,
    Limits,
    ListenerConfig,
    LogConfig,
    MethodKind,
    OutlierConfig,
    RetryConfig,
    RouteConfig,
    SlowStartConfig,
    StickyConfig,
    StrategyParams,
    TracingConfig,
)
from lbgw.config.reader import config_from_mapping, load_config

__all__ = [
    "DEFAULT_MAX_MESSAGE_BYTES",
    "DEFAULT_OTLP_ENDPOINT",
    "DEFAULT_STICKY_KEY",
    "DEFAULT_TABLE_SIZE",
    "HASH_ON",
    "HASH_STRATEGIES",
    "HEALTH_MODES",
    "LOG_FORMATS",
    "LOG_LEVELS",
    "MAX_MESSAGE_BYTES",
    "MAX_WORKERS",
    "OTLP_PROTOCOLS",
    "ROUTE_MATCHES",
    "STATUS_CODES",
    "STICKY_SECRET_ENV",
    "STRATEGIES",
    "TRACES_EXPORTERS",
    "TRACES_SAMPLERS",
    "WEIGHTED_STRATEGIES",
    "AdminConfig",
    "ClusterConfig",
    "Config",
    "EndpointConfig",
    "HealthCheckConfig",
    "Limits",
    "ListenerConfig",
    "LogConfig",
    "MethodKind",
    "OutlierConfig",
    "RetryConfig",
    "RouteConfig",
    "SlowStartConfig",
    "StickyConfig",
    "StrategyParams",
    "TracingConfig",
    "config_from_mapping",
    "is_metadata_key",
    "is_method_name",
    "load_config",
    "parse_address",
    "sticky_from_env",
    "tracing_from_env",
]
