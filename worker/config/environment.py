"""Reading `INVOICE_RELAY_*` variables: the prefix, the reader that collects problems
instead of stopping at the first, and `Secret`, the string that never prints.

`worker.config.settings` builds the settings with it; `worker.config.oauth` reads its
own variables through the same reader.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from worker.errors import ConfigError, ConfigProblems
from worker.logs import MASK, mask_url

PREFIX = "INVOICE_RELAY_"

_T = TypeVar("_T")


@dataclass(frozen=True, slots=True, repr=False)
class Secret:
    """A string that never prints: `reveal()` is the only way to its value."""

    _value: str
    _display: str = field(default=MASK, compare=False)

    @classmethod
    def url(cls, value: str) -> Secret:
        """A URL that prints with its password masked, and only its password."""
        return cls(value, mask_url(value))

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return self._display

    def __str__(self) -> str:
        return self._display


class EnvReader:
    """Reads `INVOICE_RELAY_*` variables, collecting problems instead of stopping."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self._environ = environ
        self._problems: list[ConfigError] = []
        self._read: set[str] = set()

    def raw(self, name: str, *, strip: bool = True) -> str | None:
        """The variable's value; None when unset or empty."""
        self._read.add(PREFIX + name)
        value = self._environ.get(PREFIX + name)
        if value is None or not value.strip():
            return None
        return value.strip() if strip else value

    def outside(self, name: str) -> str:
        """A variable without our prefix, such as HOME; "" when unset."""
        return self._environ.get(name, "")

    def fail(self, name: str, problem: str) -> None:
        self._problems.append(ConfigError(PREFIX + name, problem))

    def text(self, name: str) -> str | None:
        return self.raw(name)

    def required(self, name: str) -> str:
        value = self.raw(name)
        if value is None:
            self.fail(name, "required")
        return value or ""

    def parse(
        self, name: str, parser: Callable[[str], _T], default: _T, *, required: bool = False
    ) -> _T:
        value = self.raw(name)
        if value is None:
            if required:
                self.fail(name, "required")
            return default
        try:
            return parser(value)
        except ValueError as exc:
            self.fail(name, str(exc))
            return default

    def secret(self, name: str, *, required: bool) -> Secret | None:
        """A password from `NAME` or from the file `NAME_FILE`; never echoed."""
        value = self.raw(name, strip=False)
        path = self.raw(name + "_FILE")
        if value is not None and path is not None:
            self.fail(name, f"set either {PREFIX}{name} or {PREFIX}{name}_FILE, not both")
            return None
        if path is not None:
            try:
                value = Path(path).read_text(encoding="utf-8")
            except (OSError, UnicodeError) as exc:
                reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
                self.fail(name + "_FILE", f"cannot read {path}: {reason}")
                return None
            value = value.removesuffix("\n").removesuffix("\r")
            if not value:
                self.fail(name + "_FILE", f"{path} is empty")
                return None
        if value is None:
            if required:
                self.fail(name, f"required (or {PREFIX}{name}_FILE)")
            return None
        return Secret(value)

    def unknown(self) -> tuple[str, ...]:
        return tuple(
            sorted(key for key in self._environ if key.startswith(PREFIX) and key not in self._read)
        )

    def names_read(self) -> frozenset[str]:
        """The names asked for so far, without the prefix."""
        return frozenset(name.removeprefix(PREFIX) for name in self._read)

    def raise_problems(self) -> None:
        if len(self._problems) == 1:
            raise self._problems[0]
        if self._problems:
            raise ConfigProblems(tuple(self._problems))
