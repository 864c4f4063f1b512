"""User-facing errors: the CLI turns any ``FlareError`` into one line on stderr and exit code 2."""

from __future__ import annotations


class FlareError(Exception):
    """A problem with the user's input (model id, path, recipe, option value, data). Message is one line."""


class ConfigError(FlareError):
    """A recipe or override is malformed, unknown or of the wrong type."""


class ModelError(FlareError):
    """A model id or path cannot be resolved or its architecture is unsupported."""
