"""How the client talks to a host: run a shell command, put a file, get a file."""

from cloudsend_prefect.transport.base import CommandResult, FileRefused, Transport, TransportError

__all__ = ["CommandResult", "FileRefused", "Transport", "TransportError"]
