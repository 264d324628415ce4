"""User-facing errors: raised before expensive work, printed as one line without a traceback."""


class ConfigError(ValueError):
    """A bad configuration or input the user can fix; the message says how."""


class UnavailableError(ConfigError):
    """A model, dataset or package that cannot be reached here (offline, not installed)."""
