"""The environment laid over the file: the ``OTEL_*`` variables and ``LBGW_STICKY_SECRET``.

A variable that is set and not empty wins over the file, as it does for
any OpenTelemetry SDK, so an operator can override a deployed file for one
process. Values are checked by the same reader and rules as the file's; an
error names the source ``environment`` and the variable as the key.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Final

from lbgw.config.model import STICKY_SECRET_ENV, Config, TracingConfig
from lbgw.config.reader import Reader, hints

__all__ = ["sticky_from_env", "tracing_from_env"]

#: (variable, TracingConfig field); of two variables for one field, the first set wins.
_TRACING_ENV: Final = (
    ("OTEL_SERVICE_NAME", "service_name"),
    ("OTEL_TRACES_EXPORTER", "exporter"),
    ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "endpoint"),
    ("OTEL_EXPORTER_OTLP_ENDPOINT", "endpoint"),
    ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "protocol"),
    ("OTEL_EXPORTER_OTLP_PROTOCOL", "protocol"),
    ("OTEL_TRACES_SAMPLER", "sampler"),
    ("OTEL_TRACES_SAMPLER_ARG", "sampler_arg"),
    ("OTEL_BSP_SCHEDULE_DELAY", "bsp_schedule_delay_ms"),
    ("OTEL_BSP_MAX_QUEUE_SIZE", "bsp_max_queue_size"),
    ("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "bsp_max_export_batch_size"),
    ("OTEL_BSP_EXPORT_TIMEOUT", "bsp_export_timeout_ms"),
)
#: Fields whose variables OpenTelemetry reads case-insensitively ("OTLP" is "otlp").
_ANY_CASE: Final = frozenset({"exporter", "sampler", "protocol"})
_SDK_DISABLED: Final = "OTEL_SDK_DISABLED"


def tracing_from_env(config: TracingConfig, environ: Mapping[str, str]) -> TracingConfig:
    """``config`` with the standard OpenTelemetry variables of ``environ`` laid over it.

    A variable that is set and not empty wins over the file (see
    ``TracingConfig`` for the table). A bad value raises ``ConfigError``
    with source ``environment`` and the variable's name as the key.
    ``OTEL_SDK_DISABLED=true`` turns tracing off whatever else is set.
    """
    reader = Reader("environment")
    types = hints(TracingConfig)
    data: dict[str, object] = {}
    keys: dict[str, str] = {}  # field -> the variable it came from, for errors
    for name, key in _TRACING_ENV:
        text = environ.get(name, "").strip()
        if not text or key in data:
            continue
        value: object = text.lower() if key in _ANY_CASE else text
        if types[key] in (int, float):
            value = _number(reader, name, text, types[key])
        data[key] = value
        keys[key] = name
    disabled = environ.get(_SDK_DISABLED, "").strip().lower()
    if disabled not in ("", "true", "false"):
        raise reader.fail(_SDK_DISABLED, "true or false", disabled)
    if disabled == "true":
        data["exporter"] = "none"
        keys["exporter"] = _SDK_DISABLED
    if not data:
        return config
    # The file's values were checked when it was read; only the variables' are checked here,
    # with the rules that span fields run over both.
    return reader.section(
        TracingConfig,
        data,
        "tracing",
        base=config,
        key_of=lambda field: keys.get(field, f"tracing.{field}"),
    )


def _number(reader: Reader, name: str, text: str, kind: type) -> object:
    try:
        return int(text) if kind is int else float(text)
    except ValueError:
        raise reader.fail(name, "an integer" if kind is int else "a number", text) from None


def sticky_from_env(config: Config, environ: Mapping[str, str]) -> Config:
    """``config`` with ``LBGW_STICKY_SECRET``, when set, as every sticky cluster's secret.

    The variable wins over the file, as the ``OTEL_*`` variables do, so a
    secret injected into the environment (a Kubernetes Secret, say) replaces
    a placeholder left in a shared file.
    """
    secret = environ.get(STICKY_SECRET_ENV, "")
    if not secret:
        return config
    clusters = tuple(
        dataclasses.replace(c, sticky=dataclasses.replace(c.sticky, secret=secret))
        if c.sticky.enabled
        else c
        for c in config.clusters
    )
    return dataclasses.replace(config, clusters=clusters)
