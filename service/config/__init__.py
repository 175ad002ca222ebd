"""The daemon's configuration: models per domain, the YAML + environment loader, the example."""

from service.config.loader import CONFIG_PATH_ENV, ENV_PREFIX, ConfigError, load_config, redacted
from service.config.models import (
    ApiSection,
    DaemonConfig,
    EngineSection,
    LiveSection,
    LoggingSection,
    PipelineSection,
    StoreSection,
)

__all__ = [
    "CONFIG_PATH_ENV",
    "ENV_PREFIX",
    "ApiSection",
    "ConfigError",
    "DaemonConfig",
    "EngineSection",
    "LiveSection",
    "LoggingSection",
    "PipelineSection",
    "StoreSection",
    "load_config",
    "redacted",
]
