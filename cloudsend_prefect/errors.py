"""Errors a user can act on, shared by the modules that find them and the commands that report them."""

from __future__ import annotations


class ConfigError(ValueError):
    """Bad input: the message names the file and the field; nothing has been created or started.

    Raised by reading a config (``loading``), resolving its jobs and environments (``specs``) and the flow's
    checks of its parameters; the CLI prints it and exits 2.
    """
