"""Routes: one mailbox folder and one destination each (README: "Several mailboxes: the
routes file").

`load_deployment` reads them from the TOML file INVOICE_RELAY_CONFIG names, or, without
one, from the environment alone as one route named `default`, exactly as
`Settings.from_env` reads it. Each route's values are checked by `Settings.from_env`
itself, on a mapping built from the environment's process settings, `[relay]`,
`[defaults]` and the route's table; its problems come back labelled
`route NAME: key: problem`, every route's at once.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from worker.config import values
from worker.config.environment import PREFIX, EnvReader
from worker.config.routesfile import PROCESS_SETTINGS, ROUTE_NAME, RoutesFile, read_routes_file
from worker.config.settings import Settings, setting_names
from worker.config.web import WebUser
from worker.errors import ConfigError, ConfigProblems
from worker.models import DEFAULT_ROUTE, DeliveryKind

__all__ = [
    "DEFAULT_MAX_PARALLEL_POLLS",
    "DEFAULT_ROUTE",
    "PROCESS_SETTINGS",
    "Deployment",
    "Route",
    "load_deployment",
    "mailbox_name",
]

log = logging.getLogger(__name__)

DEFAULT_MAX_PARALLEL_POLLS = 8  # INVOICE_RELAY_MAX_PARALLEL_POLLS: polls at once in `run`
# A setting's name in a problem's text: INVOICE_RELAY_IMAP_AUTH, _SMTP_AUTH, SMTP_USER.
_NAME_IN_TEXT = re.compile(r"(?<![A-Za-z0-9_])(INVOICE_RELAY_|_)?([A-Z][A-Z0-9_]*[A-Z0-9])\b")


def mailbox_name(settings: Settings) -> str:
    """The audit's name for the polled folder, `user@host/folder`: stable across port or
    TLS changes, and what sightings and the poll position are keyed by."""
    return f"{settings.imap_user}@{settings.imap_host}/{settings.imap_folder}"


@dataclass(frozen=True, slots=True, kw_only=True)
class Route:
    """One mailbox folder and one destination, with the route's full settings (the
    process settings are the same in every route)."""

    name: str
    settings: Settings
    # The `destination` key; else smtp:<forward_to> for mail; None for the API without
    # the key: the caller asks GET /account for getmyinvoices:<accountId>.
    destination: str | None

    @property
    def mailbox(self) -> str:
        return mailbox_name(self.settings)


@dataclass(frozen=True, slots=True, kw_only=True)
class Deployment:
    """Every route of one deployment, and what the process needs besides."""

    routes: tuple[Route, ...]
    config_file: Path | None  # None: the environment alone
    max_parallel_polls: int = DEFAULT_MAX_PARALLEL_POLLS

    @property
    def process(self) -> Settings:
        """Settings for process-wide use: the process settings are in every route."""
        return self.routes[0].settings

    def route(self, name: str) -> Route:
        for route in self.routes:
            if route.name == name:
                return route
        shown = name if ROUTE_NAME.fullmatch(name) else repr(name)
        known = ", ".join(route.name for route in self.routes)
        raise ConfigError(f"route {shown}", f"no such route (known: {known})")

    def select(self, name: str | None) -> tuple[Route, ...]:
        """The route named (as `--route NAME` asks), or every route for None."""
        return self.routes if name is None else (self.route(name),)


def load_deployment(environ: Mapping[str, str], *, stderr_is_tty: bool = False) -> Deployment:
    """Every route, checked; raise ConfigError (ConfigProblems for several, one line
    each) listing every problem of every route."""
    config = environ.get(PREFIX + "CONFIG", "").strip()
    if not config:
        return _from_environment(environ, stderr_is_tty=stderr_is_tty)
    return _from_file(Path(config).absolute(), environ, stderr_is_tty=stderr_is_tty)


def _from_environment(environ: Mapping[str, str], *, stderr_is_tty: bool) -> Deployment:
    problems: list[ConfigError] = []
    settings = _settings(environ, problems, stderr_is_tty=stderr_is_tty, web_users=())
    polls = _max_parallel_polls(environ, problems)
    if settings is None or problems:
        raise _error(problems)
    route = Route(name=DEFAULT_ROUTE, settings=settings, destination=_destination(settings, None))
    return Deployment(routes=(route,), config_file=None, max_parallel_polls=polls)


def _from_file(path: Path, environ: Mapping[str, str], *, stderr_is_tty: bool) -> Deployment:
    problems: list[ConfigError] = []
    known = setting_names()
    document = read_routes_file(path, known, problems)
    if document is None:
        raise _error(problems)
    process, from_env = _process_settings(document, environ, known, problems)
    base = {key: value for key, value in environ.items() if not key.startswith(PREFIX)}
    # Names nobody reads stay in, so that Settings lists them as unknown (typos?).
    base |= {key: value for key, value in environ.items() if _unknown(key, known)}
    base |= {PREFIX + name: value for name, value in process.items()}
    found: list[ConfigError] = []
    polls = _max_parallel_polls(base, found)
    problems.extend(_relabel(problem, None, from_env, known) for problem in found)
    routes: list[Route] = []
    mailboxes: list[tuple[str, Mapping[str, str]]] = []
    for table in document.routes:
        layered = _layered(document.defaults, table.values)
        mailboxes.append((table.name, layered))
        found = []
        settings = _settings(
            base | {PREFIX + name: value for name, value in layered.items()},
            found,
            stderr_is_tty=stderr_is_tty,
            web_users=document.web_users,
        )
        problems.extend(_relabel(problem, table.label, from_env, known) for problem in found)
        if settings is not None:
            destination = table.destination or document.default_destination
            routes.append(
                Route(
                    name=table.name,
                    settings=settings,
                    destination=_destination(settings, destination),
                )
            )
    _check_mailboxes(mailboxes, problems)
    if routes:
        _check_web_users(routes[0].settings, document.web_users, problems)
    if problems or not routes:
        raise _error(problems)
    return Deployment(routes=tuple(routes), config_file=path, max_parallel_polls=polls)


def _process_settings(
    document: RoutesFile,
    environ: Mapping[str, str],
    known: frozenset[str],
    problems: list[ConfigError],
) -> tuple[dict[str, str], frozenset[str]]:
    """[relay] with the environment's process settings over it, and which of them came
    from the environment (their problems keep the variable's name)."""
    process = dict(document.relay)
    from_env: set[str] = set()
    for key, value in sorted(environ.items()):
        name = key.removeprefix(PREFIX)
        if name in (key, "CONFIG") or name not in known or not value.strip():
            continue
        if name not in PROCESS_SETTINGS:
            problems.append(
                ConfigError(
                    key,
                    f"a route setting in the environment, but INVOICE_RELAY_CONFIG names "
                    f"{document.path}: set {name.lower()} in its [defaults] or a route",
                )
            )
            continue
        for form in _forms(name, known):
            if form in process:
                del process[form]
                log.info(
                    "%s from the environment overrides %s in [relay] of %s",
                    key,
                    form.lower(),
                    document.path,
                    extra={"action": "setting_overridden", "setting": key},
                )
        process[name] = value
        from_env.add(name)
    return process, frozenset(from_env)


def _layered(defaults: Mapping[str, str], route: Mapping[str, str]) -> dict[str, str]:
    """[defaults] under the route's own keys; a route's `imap_password_file` replaces
    an `imap_password` of [defaults] too (one setting, two forms)."""
    merged = dict(defaults)
    known = frozenset(defaults) | frozenset(route)
    for name in route:
        for form in _forms(name, known):
            merged.pop(form, None)
    return merged | dict(route)


def _forms(name: str, known: frozenset[str]) -> tuple[str, ...]:
    """A secret's two spellings (`X` and `X_FILE`); any other setting's one."""
    plain = name.removesuffix("_FILE")
    if plain != name and plain in known:
        return (plain, name)
    if name + "_FILE" in known:
        return (name, name + "_FILE")
    return (name,)


def _unknown(key: str, known: frozenset[str]) -> bool:
    name = key.removeprefix(PREFIX)
    return name != key and name not in known


def _settings(
    mapping: Mapping[str, str],
    problems: list[ConfigError],
    *,
    stderr_is_tty: bool,
    web_users: tuple[WebUser, ...],
) -> Settings | None:
    try:
        return Settings.from_env(mapping, stderr_is_tty=stderr_is_tty, web_users=web_users)
    except ConfigError as exc:
        problems.extend(_each(exc))
        return None


def _max_parallel_polls(mapping: Mapping[str, str], problems: list[ConfigError]) -> int:
    env = EnvReader(mapping)
    polls = env.parse("MAX_PARALLEL_POLLS", values.integer(1), DEFAULT_MAX_PARALLEL_POLLS)
    try:
        env.raise_problems()
    except ConfigError as exc:
        problems.extend(_each(exc))
    return polls


def _relabel(
    problem: ConfigError, label: str | None, from_env: frozenset[str], known: frozenset[str]
) -> ConfigError:
    """A problem of `Settings.from_env` in the file's words: `route NAME: key` for a
    route setting, `relay: key` for a process setting; a value the environment gave
    keeps its variable's name."""
    name = problem.variable.removeprefix(PREFIX)
    if name == problem.variable or name in from_env:
        return problem
    text = _NAME_IN_TEXT.sub(lambda match: _key(match, known), problem.problem)
    where = "relay" if label is None or name in PROCESS_SETTINGS else label
    return ConfigError(f"{where}: {name.lower()}", text)


def _key(match: re.Match[str], known: frozenset[str]) -> str:
    name = match[2]
    return name.lower() if name in known else match[0]


def _destination(settings: Settings, named: str | None) -> str | None:
    if named is not None:
        return named
    if settings.delivery is DeliveryKind.SMTP:
        return f"smtp:{settings.forward_to.lower()}"
    return None


def _check_mailboxes(
    routes: Iterable[tuple[str, Mapping[str, str]]], problems: list[ConfigError]
) -> None:
    """One folder, one route: two routes on it would share its poll position. Read from
    the routes' text, so that a route with other problems is compared too."""
    owners: dict[tuple[str, str, str], str] = {}
    for name, layered in routes:
        user = layered.get("IMAP_USER", "").strip()
        host = layered.get("IMAP_HOST", "").strip()
        folder = layered.get("IMAP_FOLDER", "").strip() or "INBOX"
        if not user or not host:
            continue  # reported as required
        # INBOX is case-insensitive (RFC 3501), other folder names are not.
        key = (
            user.lower(),
            host.lower().rstrip("."),
            "INBOX" if folder.upper() == "INBOX" else folder,
        )
        owner = owners.setdefault(key, name)
        if owner != name:
            problems.append(
                ConfigError(
                    f"route {name}: imap_folder",
                    f"{user}@{host}/{folder} is route {owner}'s already (one folder, one route)",
                )
            )


def _check_web_users(
    settings: Settings, listed: tuple[WebUser, ...], problems: list[ConfigError]
) -> None:
    if settings.web is None or not listed:
        return
    # The listed names are unique already: a second one is web_user's.
    names = [user.name for user in settings.web.users]
    for name in sorted({name for name in names if names.count(name) > 1}):
        problems.append(
            ConfigError(
                f"web user {name}",
                "name: the user of web_password has this name too (web_user)",
            )
        )


def _each(error: ConfigError) -> tuple[ConfigError, ...]:
    return error.problems if isinstance(error, ConfigProblems) else (error,)


def _error(problems: list[ConfigError]) -> ConfigError:
    """One error for all problems, each once (a process setting's is every route's)."""
    unique = tuple({(p.variable, p.problem): p for p in problems}.values())
    if not unique:  # unreachable: a file without routes is a problem of its own
        return ConfigError("INVOICE_RELAY_CONFIG", "no route")
    return unique[0] if len(unique) == 1 else ConfigProblems(unique)
