"""The error every user-facing check raises: one line that names the setting and what to do."""


class ConfigError(ValueError):
    """A setting is missing, malformed or out of range; the message names it."""
