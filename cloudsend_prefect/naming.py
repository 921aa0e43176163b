"""How hosts are named, the one rule every provider, the config's checks and the README follow."""

from __future__ import annotations


def host_name(label: str | None, provider: str, index: int, copy: int | None = None, part: int | None = None) -> str:
    """``<label or provider-index>[.<copy>][.<part>]``: the instance type's ``name`` (else its provider and its
    index in the config), then which of its ``number`` copies (when it has several), then which part of an
    ``explode``-split copy (when split).

    Args:
        label: The instance type's ``name``, if given.
        provider: The instance type's provider.
        index: The instance type's index in the config.
        copy: Which copy, when the type has several (``number`` > 1).
        part: Which part of a split copy, when ``explode`` splits it.
    """
    stem = label or f"{provider}-{index}"
    return stem + (f".{copy}" if copy is not None else "") + (f".{part}" if part is not None else "")


def host_names(label: str | None, provider: str, index: int, number: int) -> list[str]:
    """The names of an instance type's ``number`` copies, before any split (see ``host_name``)."""
    return [host_name(label, provider, index, copy if number > 1 else None) for copy in range(number)]
