"""Reading the routes file (README: "Several mailboxes: the routes file") into tables of
env-style text, one problem line per mistake, so that `Settings.from_env` checks the
values exactly as it checks the environment's.

A table's keys are the settings' names in lower case; its values are TOML's own types
or the text the environment form takes. Relative paths resolve against the file's
folder; an inline secret needs a file that group and others cannot read.
"""

from __future__ import annotations

import difflib
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import date, datetime, time
from pathlib import Path

from worker.config import web
from worker.errors import ConfigError
from worker.models import RouteScope

# Settings that belong to the process: the same for every route (README, "Scope").
PROCESS_SETTINGS = frozenset(
    {
        "CONFIG",
        "DATABASE_URL",
        "HTTP_PORT",
        "WEB_PORT",
        "WEB_USER",
        "WEB_PASSWORD",
        "WEB_PASSWORD_FILE",
        "WEB_PUBLIC_URL",
        "WEB_TRUSTED_PROXIES",
        "WEB_IDLE",
        "LOG_FORMAT",
        "PDF_TIMEOUT",
        "PDF_MEMORY_MB",
        "MAX_PARALLEL_POLLS",
        "SECRET_KEY_FILE",
    }
)
# Secrets that may be written into the file itself, which must then be private.
INLINE_SECRETS = frozenset(
    {
        "IMAP_PASSWORD",
        "SMTP_PASSWORD",
        "GMI_API_KEY",
        "OAUTH_CLIENT_SECRET",
        "OAUTH_REFRESH_TOKEN",
        "WEB_PASSWORD",
    }
)
# Keys whose value is a list: TOML arrays join with the separator the variable uses.
LIST_SEPARATORS = {
    "ALLOWED_SENDERS": ",",
    "DKIM_DOMAINS": ",",
    "GMI_TAGS": ",",
    "WEB_TRUSTED_PROXIES": ",",
    "OAUTH_SCOPE": " ",
}
ROUTE_NAME = re.compile(r"[a-z0-9-]{1,40}")
MAX_DESTINATION = 200
_TABLES = ("relay", "defaults", "routes", "web_users")
_WEB_USER_KEYS = ("name", "password_file", "routes")
_GROUP_OR_OTHERS_READ = 0o044


@dataclass(frozen=True, slots=True, kw_only=True)
class RouteTable:
    """One `[[routes]]` table: its name, its own settings and its destination key."""

    name: str
    label: str  # how its problems start: "route shop-a"
    values: dict[str, str]  # setting name (upper case, no prefix) -> env-style text
    destination: str | None


@dataclass(frozen=True, slots=True, kw_only=True)
class RoutesFile:
    path: Path
    relay: dict[str, str]
    defaults: dict[str, str]
    default_destination: str | None  # `destination` in [defaults]
    routes: tuple[RouteTable, ...]
    web_users: tuple[web.WebUser, ...]


class _Problems:
    def __init__(self, sink: list[ConfigError]) -> None:
        self.sink = sink

    def add(self, label: str, problem: str) -> None:
        self.sink.append(ConfigError(label, problem))


def read_routes_file(
    path: Path, known: frozenset[str], problems: list[ConfigError]
) -> RoutesFile | None:
    """The file's tables, every mistake appended to `problems`; None when it cannot be
    read as TOML at all. `known` are the setting names a key may spell."""
    found = _Problems(problems)
    try:
        document = tomllib.loads(path.read_bytes().decode("utf-8"))
        mode = path.stat().st_mode
    except OSError as exc:
        found.add("INVOICE_RELAY_CONFIG", f"cannot read {path}: {exc.strerror}")
        return None
    except UnicodeError:
        found.add("INVOICE_RELAY_CONFIG", f"{path} is not UTF-8 text")
        return None
    except tomllib.TOMLDecodeError as exc:
        found.add("INVOICE_RELAY_CONFIG", f"{path} is not valid TOML: {exc}")
        return None
    reader = _TableReader(
        folder=path.parent, path=path, private=not mode & _GROUP_OR_OTHERS_READ, known=known
    )
    for key in document:
        if key not in _TABLES:
            found.add(
                str(path),
                f"unknown table {key!r} (the file has [relay], [defaults], "
                "[[routes]] and [[web_users]])",
            )
    relay = reader.table(
        "relay", document.get("relay", {}), found, allowed=lambda name: name in PROCESS_SETTINGS
    )
    defaults = reader.table(
        "defaults",
        document.get("defaults", {}),
        found,
        allowed=lambda name: name not in PROCESS_SETTINGS,
        extra=("destination",),
    )
    destination = defaults.pop("DESTINATION", None)
    if destination is not None:
        destination = _destination(destination, "defaults: destination", found)
    routes = _routes(reader, document.get("routes"), found)
    web_users = _web_users(reader, document.get("web_users", []), routes, found)
    return RoutesFile(
        path=path,
        relay=relay,
        defaults=defaults,
        default_destination=destination,
        routes=routes,
        web_users=web_users,
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class _TableReader:
    folder: Path
    path: Path
    private: bool
    known: frozenset[str]

    def table(
        self,
        label: str,
        table: object,
        found: _Problems,
        *,
        allowed: Callable[[str], bool],
        extra: tuple[str, ...] = (),
    ) -> dict[str, str]:
        """A table's settings as env-style text; `extra` keys pass through as text."""
        if not isinstance(table, Mapping):
            found.add(label, "must be a table")
            return {}
        texts: dict[str, str] = {}
        for key, value in table.items():
            name = key.upper()
            where = f"{label}: {key}"
            if key in extra:
                if isinstance(value, str):
                    texts[name] = value
                else:
                    found.add(where, "must be a string")
                continue
            if key == "destination":
                found.add(where, _misplaced(name))
                continue
            if key != key.lower() or name not in self.known or name == "CONFIG":
                found.add(where, self._unknown(key, extra))
                continue
            if not allowed(name):
                found.add(where, _misplaced(name))
                continue
            try:
                text = _text(name, value)
            except ValueError as exc:
                found.add(where, str(exc))
                continue
            if name in INLINE_SECRETS and text and not self.private:
                found.add(
                    where,
                    f"an inline secret, but group or others can read {self.path}: "
                    f"chmod 600 it, or use {key}_file",
                )
            texts[name] = self._resolved(name, text)
        return texts

    def resolve(self, text: str) -> Path:
        return self.folder / text  # an absolute `text` stays as it is

    def _resolved(self, name: str, text: str) -> str:
        if name.endswith("_FILE") and text.strip():
            return str(self.resolve(text.strip()))
        return text

    def _unknown(self, key: str, extra: tuple[str, ...]) -> str:
        if key.lower() != key and key.upper() in self.known:
            return f"keys are written in lower case: {key.lower()}"
        choices = [name.lower() for name in self.known if name != "CONFIG"] + list(extra)
        close = difflib.get_close_matches(key.lower(), choices, n=1)
        return f"unknown key (did you mean {close[0]}?)" if close else "unknown key"


def _routes(reader: _TableReader, tables: object, found: _Problems) -> tuple[RouteTable, ...]:
    if tables is None:
        found.add(str(reader.path), "no [[routes]]: at least one route is needed")
        return ()
    if not isinstance(tables, list) or not all(isinstance(table, dict) for table in tables):
        found.add(str(reader.path), "routes must be [[routes]] tables")
        return ()
    if not tables:
        found.add(str(reader.path), "no [[routes]]: at least one route is needed")
    routes: list[RouteTable] = []
    seen: set[str] = set()
    for number, table in enumerate(tables, start=1):
        name = table.get("name")
        label = f"routes[{number}]"
        if name is None:
            found.add(label, "name: required")
        elif not isinstance(name, str) or not ROUTE_NAME.fullmatch(name):
            found.add(label, f"name: {name!r} is not a route name (a-z, 0-9 and -, 1 to 40)")
        elif name in seen:
            found.add(f"route {name}", "name: two routes have this name")
        else:
            label = f"route {name}"
            seen.add(name)
        rest = {key: value for key, value in table.items() if key != "name"}
        values = reader.table(
            label,
            rest,
            found,
            allowed=lambda setting: setting not in PROCESS_SETTINGS,
            extra=("destination",),
        )
        destination = values.pop("DESTINATION", None)
        if destination is not None:
            destination = _destination(destination, f"{label}: destination", found)
        if label.startswith("route "):
            routes.append(
                RouteTable(name=label[6:], label=label, values=values, destination=destination)
            )
    return tuple(routes)


def _destination(text: str, where: str, found: _Problems) -> str | None:
    value = text.strip()
    if not value:
        found.add(where, "must not be empty")
    elif len(value) > MAX_DESTINATION:
        found.add(where, f"longer than {MAX_DESTINATION} characters")
    elif not value.isprintable():
        found.add(where, "contains control characters")
    else:
        return value
    return None


def _web_users(
    reader: _TableReader, tables: object, routes: tuple[RouteTable, ...], found: _Problems
) -> tuple[web.WebUser, ...]:
    if not isinstance(tables, list) or not all(isinstance(table, dict) for table in tables):
        found.add(str(reader.path), "web_users must be [[web_users]] tables")
        return ()
    route_names = {route.name for route in routes}
    users: list[web.WebUser] = []
    seen: set[str] = set()
    for number, table in enumerate(tables, start=1):
        label = f"web_users[{number}]"
        name = _web_user_name(table.get("name"), f"{label}: name", found)
        if name is not None:
            if name in seen:
                found.add(f"web user {name}", "name: two web users have this name")
                name = None
            else:
                seen.add(name)
                label = f"web user {name}"
        for key in table:
            if key not in _WEB_USER_KEYS:
                hint = " (use password_file)" if key == "password" else ""
                found.add(f"{label}: {key}", f"unknown key{hint}")
        password = _password(reader, table.get("password_file"), f"{label}: password_file", found)
        scope = _scope(table.get("routes"), route_names, f"{label}: routes", found)
        if name is not None and password is not None and scope is not None:
            users.append(web.WebUser(name=name, password=password, scope=scope))
    return tuple(users)


def _web_user_name(value: object, where: str, found: _Problems) -> str | None:
    if value is None:
        found.add(where, "required")
        return None
    if not isinstance(value, str):
        found.add(where, "must be a string")
        return None
    try:
        return web.user_name(value)
    except ValueError as exc:
        found.add(where, str(exc))
        return None


def _password(reader: _TableReader, value: object, where: str, found: _Problems) -> str | None:
    if value is None:
        found.add(where, "required")
        return None
    if not isinstance(value, str) or not value.strip():
        found.add(where, "must be a file name")
        return None
    path = reader.resolve(value.strip())
    try:
        password = path.read_text(encoding="utf-8").removesuffix("\n").removesuffix("\r")
    except (OSError, UnicodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        found.add(where, f"cannot read {path}: {reason}")
        return None
    if not password:
        found.add(where, f"{path} is empty")
        return None
    return password


def _scope(value: object, route_names: set[str], where: str, found: _Problems) -> RouteScope | None:
    if value is None:
        found.add(where, 'required: the routes this user sees, or ["*"] for all')
        return None
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        found.add(where, 'must be a list of route names, or ["*"] for all')
        return None
    unknown = [name for name in value if name != "*" and name not in route_names]
    if unknown:
        found.add(where, f"no such route: {', '.join(unknown)}")
        return None
    return RouteScope.of(value)


def _misplaced(name: str) -> str:
    if name in PROCESS_SETTINGS:
        return "a process setting: it belongs in [relay]"
    return "a route setting: it belongs in [defaults] or a [[routes]] table"


def _text(name: str, value: object) -> str:
    """A TOML value as the text its variable would hold."""
    if isinstance(value, bool):  # before int: a bool is an int
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, datetime | time):
        raise ValueError("a TOML date-time or time is not a value here (a date is)")
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, list):
        separator = LIST_SEPARATORS.get(name)
        if separator is None:
            raise ValueError("takes one value, not an array")
        items = []
        for item in value:
            if not isinstance(item, str | int) or isinstance(item, bool):
                raise ValueError("the array's items must be strings")
            if separator in str(item):
                raise ValueError(f"an item of the array contains {separator!r}: one per item")
            items.append(str(item))
        return separator.join(items)
    raise ValueError("a table is not a value here")
