"""How the client talks to a host: run a shell command, put a file, get a file."""

from cloudsend_prefect.transport.base import CommandResult, Transport, TransportError

__all__ = ["CommandResult", "Transport", "TransportError"]
