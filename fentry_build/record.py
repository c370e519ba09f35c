"""record.py - small immutable values for the command line's hot path.

The client's values (a process's status, a listening socket, a target, what the command line
selected) were ``typing.NamedTuple`` classes; importing ``typing`` and building those classes
was about a fifth of the start of every ``fentry-build status`` (benchmarks/scaling/
rows_cli.py).  A ``Record`` names its fields in ``__slots__``, sets them in its
``__init__`` and is compared, hashed and shown by them; it is not a tuple.
"""

from __future__ import annotations


class Record:
    """A value of the fields its class lists in ``__slots__`` (one level: a Record's
    subclass is not subclassed again)."""

    __slots__: tuple[str, ...] = ()

    def _fields(self) -> tuple[object, ...]:
        return tuple(getattr(self, name) for name in self.__slots__)

    def __setattr__(self, name: str, value: object) -> None:
        if hasattr(self, name):
            raise AttributeError(f"{type(self).__name__}.{name} is read-only")
        object.__setattr__(self, name, value)

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, Record) and type(other) is type(self)
                and self._fields() == other._fields())

    def __hash__(self) -> int:
        return hash(self._fields())

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.__slots__)
        return f"{type(self).__name__}({fields})"
