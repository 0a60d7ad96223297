"""The routes file: parsing by tables, every error on its own line, relative paths,
permissions, the environment's part, and the environment alone as one route."""

from __future__ import annotations

import logging
import textwrap
from datetime import date
from pathlib import Path

import pytest

from worker.cli.wiring import mailbox_name
from worker.config.routes import (
    DEFAULT_ROUTE,
    PROCESS_SETTINGS,
    Deployment,
    Route,
    load_deployment,
)
from worker.config.settings import Settings, setting_names
from worker.errors import ConfigError, ConfigProblems
from worker.models import DeliveryKind, RouteScope

HOME = {"HOME": "/home/relay"}
ENV_ROUTE = {
    "INVOICE_RELAY_IMAP_HOST": "imap.example.com",
    "INVOICE_RELAY_IMAP_USER": "invoices@shop.example",
    "INVOICE_RELAY_IMAP_PASSWORD": "imap-Pa55-zq81",
    "INVOICE_RELAY_SMTP_HOST": "smtp.example.com",
    "INVOICE_RELAY_FORWARD_TO": "Inbox-123@GetMyInvoices.example",
    "INVOICE_RELAY_FORWARD_FROM": "relay@shop.example",
    **HOME,
}
KEY = "k" * 40  # a secret key file's content: 32 bytes at least

# Two routes that load; tests add keys to them or replace them.
DEFAULTS = """
[defaults]
imap_host = "imap.example.com"
imap_password_file = "imap.pw"
smtp_host = "smtp.example.com"
forward_from = "relay@shop.example"
"""
SHOP_A = """
[[routes]]
name = "shop-a"
imap_user = "a@shop.example"
forward_to = "inbox-a@gmi.example"
"""
SHOP_B = """
[[routes]]
name = "shop-b"
imap_user = "b@shop.example"
forward_to = "inbox-b@gmi.example"
"""


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    (tmp_path / "imap.pw").write_text("imap-secret\n")
    (tmp_path / "smtp.pw").write_text("smtp-secret\n")
    (tmp_path / "gmi.key").write_text("gmi-key\n")
    (tmp_path / "web.pw").write_text("web-secret\n")
    (tmp_path / "empty.pw").write_text("")
    (tmp_path / "secret.key").write_text(KEY)
    (tmp_path / "ca.pem").write_text("not really a CA\n")
    (tmp_path / "sub").mkdir()
    return tmp_path


def write(folder: Path, text: str, *, mode: int = 0o600) -> Path:
    path = folder / "routes.toml"
    path.write_text(textwrap.dedent(text))
    path.chmod(mode)
    return path


def load(
    folder: Path, text: str, *, mode: int = 0o600, env: dict[str, str] | None = None
) -> Deployment:
    path = write(folder, text, mode=mode)
    return load_deployment({"INVOICE_RELAY_CONFIG": str(path), **HOME, **(env or {})})


def problems(
    folder: Path, text: str, *, mode: int = 0o600, env: dict[str, str] | None = None
) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load(folder, text, mode=mode, env=env)
    return lines(caught.value)


def lines(error: ConfigError) -> list[str]:
    each = error.problems if isinstance(error, ConfigProblems) else (error,)
    return [f"{problem.variable}: {problem.problem}" for problem in each]


# --- the environment alone ---------------------------------------------------------


def test_the_environment_alone_is_one_route_named_default_exactly_as_today() -> None:
    deployment = load_deployment(ENV_ROUTE)

    assert deployment.routes == (
        Route(
            name=DEFAULT_ROUTE,
            settings=Settings.from_env(ENV_ROUTE),
            destination="smtp:inbox-123@getmyinvoices.example",
        ),
    )
    assert DEFAULT_ROUTE == "default"
    assert deployment.config_file is None
    assert deployment.max_parallel_polls == 8
    assert deployment.process == Settings.from_env(ENV_ROUTE)


def test_the_environment_alone_reports_what_settings_report() -> None:
    environ = {**ENV_ROUTE, "INVOICE_RELAY_IMAP_PORT": "x", "INVOICE_RELAY_DEDUP": "y"}
    with pytest.raises(ConfigError) as expected:
        Settings.from_env(environ)
    with pytest.raises(ConfigError) as caught:
        load_deployment(environ)

    assert str(caught.value) == str(expected.value)


def test_an_empty_config_variable_means_the_environment_alone() -> None:
    assert load_deployment({**ENV_ROUTE, "INVOICE_RELAY_CONFIG": " "}).config_file is None


@pytest.mark.parametrize(("text", "expected"), [("3", 3), ("1", 1), ("64", 64)])
def test_max_parallel_polls_from_the_environment(text: str, expected: int) -> None:
    environ = {**ENV_ROUTE, "INVOICE_RELAY_MAX_PARALLEL_POLLS": text}
    assert load_deployment(environ).max_parallel_polls == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [("0", "0 is less than 1"), ("many", "'many' is not a whole number")],
)
def test_max_parallel_polls_must_be_a_positive_whole_number(text: str, expected: str) -> None:
    environ = {**ENV_ROUTE, "INVOICE_RELAY_MAX_PARALLEL_POLLS": text, "INVOICE_RELAY_DEDUP": "y"}
    with pytest.raises(ConfigProblems) as caught:
        load_deployment(environ)
    assert f"INVOICE_RELAY_MAX_PARALLEL_POLLS: {expected}" in lines(caught.value)
    assert any(line.startswith("INVOICE_RELAY_DEDUP: ") for line in lines(caught.value))


def test_config_and_max_parallel_polls_are_not_unknown_variables() -> None:
    environ = {
        **ENV_ROUTE,
        "INVOICE_RELAY_CONFIG": "/etc/invoice-relay/routes.toml",
        "INVOICE_RELAY_MAX_PARALLEL_POLLS": "4",
        "INVOICE_RELAY_TYPO": "1",
    }
    assert Settings.from_env(environ).unknown_variables == ("INVOICE_RELAY_TYPO",)


def test_the_api_without_a_destination_key_leaves_it_to_the_account() -> None:
    environ = {
        **ENV_ROUTE,
        "INVOICE_RELAY_DELIVERY": "getmyinvoices",
        "INVOICE_RELAY_GMI_API_KEY": "gmi-key",
    }
    assert load_deployment(environ).routes[0].destination is None


# --- scopes -------------------------------------------------------------------------


def test_process_settings_are_the_contracts_names_and_every_web_setting() -> None:
    web = {name for name in setting_names() if name.startswith("WEB_")}
    assert web <= PROCESS_SETTINGS
    assert setting_names() >= PROCESS_SETTINGS
    assert {
        "CONFIG",
        "DATABASE_URL",
        "HTTP_PORT",
        "LOG_FORMAT",
        "PDF_TIMEOUT",
        "PDF_MEMORY_MB",
        "MAX_PARALLEL_POLLS",
        "SECRET_KEY_FILE",
    } <= PROCESS_SETTINGS
    assert "IMAP_HOST" not in PROCESS_SETTINGS


# --- parsing ------------------------------------------------------------------------


def test_two_routes_load_with_defaults_under_them(folder: Path) -> None:
    deployment = load(folder, DEFAULTS + SHOP_A + SHOP_B)

    assert [route.name for route in deployment.routes] == ["shop-a", "shop-b"]
    assert [route.mailbox for route in deployment.routes] == [
        "a@shop.example@imap.example.com/INBOX",
        "b@shop.example@imap.example.com/INBOX",
    ]
    assert [route.destination for route in deployment.routes] == [
        "smtp:inbox-a@gmi.example",
        "smtp:inbox-b@gmi.example",
    ]
    assert deployment.routes[1].settings.imap_password.reveal() == "imap-secret"
    assert deployment.config_file == folder / "routes.toml"
    assert deployment.select(None) == deployment.routes
    assert deployment.select("shop-b") == (deployment.routes[1],)
    assert deployment.route("shop-a") is deployment.routes[0]


@pytest.mark.parametrize(
    ("line", "field", "expected"),
    [
        ("imap_port = 1993", "imap_port", 1993),
        ('imap_port = "1993"', "imap_port", 1993),
        ("keep_pdfs = true", "keep_pdfs", True),
        ('keep_pdfs = "yes"', "keep_pdfs", True),
        ("idle = false", "idle", False),
        ("timeout = 12.5", "timeout_seconds", 12.5),
        ('timeout = "12.5"', "timeout_seconds", 12.5),
        ('schedule = "10m"', "schedule", "10m"),
        ("since = 2026-01-31", "since", date(2026, 1, 31)),
        ('since = "2026-01-31"', "since", date(2026, 1, 31)),
        (
            'allowed_senders = ["@supplier.example", "Billing@X.example"]',
            "allowed_senders",
            ("@supplier.example", "billing@x.example"),
        ),
        (
            'allowed_senders = "@supplier.example, billing@x.example"',
            "allowed_senders",
            ("@supplier.example", "billing@x.example"),
        ),
        ('gmi_tags = ["shop", "2026"]', "gmi_tags", ("shop", "2026")),
        ('dkim_domains = ["mail.example.com"]', "dkim_domains", ("mail.example.com",)),
        ('imap_folder = "Invoices/2026"', "imap_folder", "Invoices/2026"),
        ('imap_folder = ""', "imap_folder", "INBOX"),  # empty is unset, as in the environment
        ('delivery = "getmyinvoices"', "delivery", DeliveryKind.GETMYINVOICES),
    ],
)
def test_a_route_key_takes_tomls_types_and_the_environments_text(
    folder: Path, line: str, field: str, expected: object
) -> None:
    extra = '\ngmi_api_key_file = "gmi.key"\n' if "getmyinvoices" in line else "\n"
    deployment = load(folder, DEFAULTS + SHOP_A + line + extra)
    assert getattr(deployment.routes[0].settings, field) == expected


def test_an_oauth_scope_array_joins_with_spaces(folder: Path) -> None:
    route = (
        SHOP_A
        + 'imap_auth = "oauth2"\noauth_provider = "generic"\noauth_flow = "delegated"\n'
        + 'oauth_client_id = "id"\noauth_token_url = "https://id.example/token"\n'
        + 'oauth_scope = ["imap", "offline_access"]\n'
    )
    relay = '[relay]\nsecret_key_file = "secret.key"\n'
    settings = load(folder, relay + DEFAULTS + route).routes[0].settings
    assert settings.oauth is not None
    assert settings.oauth.scopes == ("imap", "offline_access")


def test_a_route_key_overrides_defaults(folder: Path) -> None:
    text = (
        DEFAULTS + 'imap_port = 143\nimap_security = "starttls"\n' + SHOP_A + "imap_port = 1143\n"
    )
    settings = load(folder, text).routes[0].settings
    assert (settings.imap_port, settings.imap_security.value) == (1143, "starttls")


def test_a_routes_inline_secret_replaces_a_secret_file_of_defaults(folder: Path) -> None:
    deployment = load(folder, DEFAULTS + SHOP_A + 'imap_password = "inline"\n' + SHOP_B)
    assert deployment.routes[0].settings.imap_password.reveal() == "inline"
    assert deployment.routes[1].settings.imap_password.reveal() == "imap-secret"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (DEFAULTS + SHOP_A + 'destination = "getmyinvoices:acme"\n', "getmyinvoices:acme"),
        (DEFAULTS + SHOP_A + 'destination = " shop a books "\n', "shop a books"),
        (
            DEFAULTS + 'destination = "smtp:shared@gmi.example"\n' + SHOP_A,
            "smtp:shared@gmi.example",
        ),
        (
            DEFAULTS + 'destination = "shared"\n' + SHOP_A + 'destination = "own"\n',
            "own",
        ),
        (
            DEFAULTS
            + SHOP_A.replace('forward_to = "inbox-a@gmi.example"', 'forward_to = ""')
            + 'delivery = "getmyinvoices"\ngmi_api_key_file = "gmi.key"\n',
            None,
        ),
        (
            DEFAULTS + SHOP_A.replace("inbox-a@gmi.example", "Inbox-A@GMI.example"),
            "smtp:inbox-a@gmi.example",
        ),
    ],
)
def test_destination(folder: Path, text: str, expected: str | None) -> None:
    assert load(folder, text).routes[0].destination == expected


def test_process_settings_are_the_same_in_every_route(folder: Path) -> None:
    relay = '[relay]\ndatabase_url = "sqlite:////var/lib/relay.db"\nhttp_port = 9090\n'
    relay += 'max_parallel_polls = 3\nlog_format = "text"\npdf_timeout = 5\n'
    deployment = load(folder, relay + DEFAULTS + SHOP_A + SHOP_B)

    assert deployment.max_parallel_polls == 3
    for route in deployment.routes:
        assert route.settings.database_url.reveal() == "sqlite:////var/lib/relay.db"
        assert route.settings.http_port == 9090
        assert route.settings.log_format == "text"
        assert route.settings.pdf_timeout_seconds == 5.0
    assert deployment.process is deployment.routes[0].settings


def test_the_mailbox_is_the_one_the_cli_computes(folder: Path) -> None:
    route = load(folder, DEFAULTS + SHOP_A + 'imap_folder = "Rechnungen"\n').routes[0]
    assert (
        route.mailbox
        == mailbox_name(route.settings)
        == ("a@shop.example@imap.example.com/Rechnungen")
    )


def test_unknown_environment_names_stay_unknown_variables(folder: Path) -> None:
    deployment = load(folder, DEFAULTS + SHOP_A, env={"INVOICE_RELAY_IMAP_HOTS": "x"})
    assert deployment.process.unknown_variables == ("INVOICE_RELAY_IMAP_HOTS",)


# --- relative paths -----------------------------------------------------------------


def test_relative_paths_resolve_against_the_files_folder(
    folder: Path, monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory
) -> None:
    monkeypatch.chdir(tmp_path_factory.mktemp("elsewhere"))  # not the file's folder
    text = (
        '[relay]\nsecret_key_file = "secret.key"\n'
        + DEFAULTS
        + 'ca_file = "ca.pem"\nsmtp_user = "relay"\nsmtp_password_file = "smtp.pw"\n'
        + SHOP_A
        + '\n[[web_users]]\nname = "anna"\npassword_file = "web.pw"\nroutes = ["*"]\n'
    )
    settings = load(folder, text).routes[0].settings

    assert settings.imap_password.reveal() == "imap-secret"
    assert settings.smtp_password is not None
    assert settings.smtp_password.reveal() == "smtp-secret"
    assert settings.ca_file == (folder / "ca.pem").resolve()
    assert settings.secret_key_file == (folder / "secret.key").resolve()
    assert settings.web is not None
    assert settings.web.users[0].password == "web-secret"
    assert settings.web.secret_key == KEY.encode()


def test_an_absolute_path_stays_as_it_is(
    folder: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    other = tmp_path_factory.mktemp("secrets") / "imap.pw"
    other.write_text("elsewhere\n")
    text = DEFAULTS + SHOP_A + f'imap_password_file = "{other}"\n'
    assert load(folder, text).routes[0].settings.imap_password.reveal() == "elsewhere"


# --- permissions --------------------------------------------------------------------

INLINE = {
    "imap_password": ("route shop-a", SHOP_A),
    "smtp_password": ("route shop-a", SHOP_A + 'smtp_user = "relay"\n'),
    "gmi_api_key": ("route shop-a", SHOP_A),
    "oauth_client_secret": ("route shop-a", SHOP_A),
    "oauth_refresh_token": ("route shop-a", SHOP_A),
    "web_password": ("relay", SHOP_A),
}


@pytest.mark.parametrize("key", sorted(INLINE))
@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604])
def test_an_inline_secret_needs_a_file_only_its_owner_reads(
    folder: Path, key: str, mode: int
) -> None:
    label, route = INLINE[key]
    secret = "Inline-Pa55-q81"
    line = f'{key} = "{secret}"\n'
    text = (f"[relay]\n{line}" if label == "relay" else "") + DEFAULTS + route
    if label != "relay":
        text += line
    path = folder / "routes.toml"

    found = problems(folder, text, mode=mode)

    assert (
        f"{label}: {key}: an inline secret, but group or others can read {path}: "
        f"chmod 600 it, or use {key}_file"
    ) in found
    assert not any(secret in line for line in found)


@pytest.mark.parametrize("mode", [0o600, 0o400, 0o620])
def test_an_inline_secret_in_a_private_file_is_fine(folder: Path, mode: int) -> None:
    deployment = load(folder, DEFAULTS + SHOP_A + 'imap_password = "inline"\n', mode=mode)
    assert deployment.routes[0].settings.imap_password.reveal() == "inline"


def test_a_readable_file_without_inline_secrets_is_fine(folder: Path) -> None:
    assert len(load(folder, DEFAULTS + SHOP_A + SHOP_B, mode=0o644).routes) == 2


# --- the environment beside a file --------------------------------------------------


def test_a_process_setting_in_the_environment_overrides_relay_logged_once(
    folder: Path, caplog: pytest.LogCaptureFixture
) -> None:
    relay = '[relay]\ndatabase_url = "sqlite:////from/file.db"\nhttp_port = 9090\n'
    env = {
        "INVOICE_RELAY_DATABASE_URL": "sqlite:////from/env.db",
        "INVOICE_RELAY_LOG_FORMAT": "text",  # not in [relay]: no line
    }
    with caplog.at_level(logging.INFO, logger="worker.config.routes"):
        deployment = load(folder, relay + DEFAULTS + SHOP_A + SHOP_B, env=env)

    for route in deployment.routes:
        assert route.settings.database_url.reveal() == "sqlite:////from/env.db"
        assert route.settings.http_port == 9090
        assert route.settings.log_format == "text"
    overridden = [r for r in caplog.records if getattr(r, "action", "") == "setting_overridden"]
    assert len(overridden) == 1
    message = overridden[0].getMessage()
    assert "INVOICE_RELAY_DATABASE_URL" in message
    assert "database_url in [relay]" in message
    assert "from/env.db" not in message


def test_a_secret_file_in_the_environment_replaces_the_inline_one_of_relay(
    folder: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    password = tmp_path_factory.mktemp("env") / "web.pw"
    password.write_text("from-env\n")
    relay = '[relay]\nweb_password = "from-file"\nsecret_key_file = "secret.key"\n'
    env = {"INVOICE_RELAY_WEB_PASSWORD_FILE": str(password)}
    settings = load(folder, relay + DEFAULTS + SHOP_A, env=env).routes[0].settings
    assert settings.web is not None
    assert [user.password for user in settings.web.users] == ["from-env"]


def test_route_settings_in_the_environment_are_each_an_error(folder: Path) -> None:
    env = {"INVOICE_RELAY_IMAP_HOST": "imap.other.example", "INVOICE_RELAY_FORWARD_TO": "x@y.z"}
    found = problems(folder, DEFAULTS + SHOP_A, env=env)
    path = folder / "routes.toml"
    assert found == [
        f"INVOICE_RELAY_FORWARD_TO: a route setting in the environment, but "
        f"INVOICE_RELAY_CONFIG names {path}: set forward_to in its [defaults] or a route",
        f"INVOICE_RELAY_IMAP_HOST: a route setting in the environment, but "
        f"INVOICE_RELAY_CONFIG names {path}: set imap_host in its [defaults] or a route",
    ]


def test_a_bad_process_setting_from_the_environment_keeps_its_name(folder: Path) -> None:
    found = problems(folder, DEFAULTS + SHOP_A + SHOP_B, env={"INVOICE_RELAY_HTTP_PORT": "x"})
    assert found == ["INVOICE_RELAY_HTTP_PORT: 'x' is not a whole number"]


# --- web users ----------------------------------------------------------------------

WEB = '[relay]\nsecret_key_file = "secret.key"\n'


def test_web_users_join_the_one_of_web_password_in_every_route(folder: Path) -> None:
    relay = WEB + 'web_password_file = "web.pw"\nweb_user = "boss"\n'
    users = (
        '\n[[web_users]]\nname = "anna"\npassword_file = "web.pw"\nroutes = ["shop-a"]\n'
        '\n[[web_users]]\nname = "ben"\npassword_file = "web.pw"\nroutes = ["shop-a", "*"]\n'
    )
    deployment = load(folder, relay + DEFAULTS + SHOP_A + SHOP_B + users)

    web = deployment.process.web
    assert web is not None
    assert [(user.name, user.scope) for user in web.users] == [
        ("boss", RouteScope.everything()),
        ("anna", RouteScope(routes=frozenset({"shop-a"}))),
        ("ben", RouteScope.everything()),
    ]
    assert all(route.settings.web == web for route in deployment.routes)


def test_web_users_alone_turn_the_page_on(folder: Path) -> None:
    users = '\n[[web_users]]\nname = "anna"\npassword_file = "web.pw"\nroutes = ["*"]\n'
    web = load(folder, WEB + DEFAULTS + SHOP_A + users).process.web
    assert web is not None
    assert [user.name for user in web.users] == ["anna"]


@pytest.mark.parametrize(
    ("users", "expected"),
    [
        ('password_file = "web.pw"\nroutes = ["*"]', "web_users[1]: name: required"),
        (
            'name = "an na"\npassword_file = "web.pw"\nroutes = ["*"]',
            "web_users[1]: name: a user name is 1 to 64 printable characters without spaces",
        ),
        (
            'name = 7\npassword_file = "web.pw"\nroutes = ["*"]',
            "web_users[1]: name: must be a string",
        ),
        ('name = "anna"\nroutes = ["*"]', "web user anna: password_file: required"),
        (
            'name = "anna"\npassword_file = "missing.pw"\nroutes = ["*"]',
            "web user anna: password_file: cannot read {folder}/missing.pw: "
            "No such file or directory",
        ),
        (
            'name = "anna"\npassword_file = "sub"\nroutes = ["*"]',
            "web user anna: password_file: cannot read {folder}/sub: Is a directory",
        ),
        (
            'name = "anna"\npassword_file = "empty.pw"\nroutes = ["*"]',
            "web user anna: password_file: {folder}/empty.pw is empty",
        ),
        (
            'name = "anna"\npassword_file = "web.pw"',
            'web user anna: routes: required: the routes this user sees, or ["*"] for all',
        ),
        (
            'name = "anna"\npassword_file = "web.pw"\nroutes = []',
            'web user anna: routes: must be a list of route names, or ["*"] for all',
        ),
        (
            'name = "anna"\npassword_file = "web.pw"\nroutes = "shop-a"',
            'web user anna: routes: must be a list of route names, or ["*"] for all',
        ),
        (
            'name = "anna"\npassword_file = "web.pw"\nroutes = ["shop-a", "shop-z", "shop-y"]',
            "web user anna: routes: no such route: shop-z, shop-y",
        ),
        (
            'name = "anna"\npassword = "x"\npassword_file = "web.pw"\nroutes = ["*"]',
            "web user anna: password: unknown key (use password_file)",
        ),
        (
            'name = "anna"\npassword_file = "web.pw"\nroutes = ["*"]\n'
            '[[web_users]]\nname = "anna"\npassword_file = "web.pw"\nroutes = ["*"]',
            "web user anna: name: two web users have this name",
        ),
    ],
)
def test_web_user_errors(folder: Path, users: str, expected: str) -> None:
    text = WEB + DEFAULTS + SHOP_A + "\n[[web_users]]\n" + users + "\n"
    assert expected.format(folder=folder) in problems(folder, text)


def test_a_web_user_named_like_the_one_of_web_password_is_an_error(folder: Path) -> None:
    relay = WEB + 'web_password_file = "web.pw"\n'
    users = '\n[[web_users]]\nname = "accountant"\npassword_file = "web.pw"\nroutes = ["*"]\n'
    assert problems(folder, relay + DEFAULTS + SHOP_A + users) == [
        "web user accountant: name: the user of web_password has this name too (web_user)"
    ]


# --- errors -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            DEFAULTS + SHOP_A + 'imap_hots = "x"',
            "route shop-a: imap_hots: unknown key (did you mean imap_host?)",
        ),
        (DEFAULTS + SHOP_A + 'colour = "blue"', "route shop-a: colour: unknown key"),
        (
            DEFAULTS + SHOP_A + "IMAP_PORT = 1993",
            "route shop-a: IMAP_PORT: keys are written in lower case: imap_port",
        ),
        (DEFAULTS + SHOP_A + 'config = "x.toml"', "route shop-a: config: unknown key"),
        ("[relay]\nconfig = 'x.toml'\n" + DEFAULTS + SHOP_A, "relay: config: unknown key"),
        (
            "[relay]\nimap_host = 'x'\n" + DEFAULTS + SHOP_A,
            "relay: imap_host: a route setting: it belongs in [defaults] or a [[routes]] table",
        ),
        (
            "[relay]\ndestination = 'x'\n" + DEFAULTS + SHOP_A,
            "relay: destination: a route setting: it belongs in [defaults] or a [[routes]] table",
        ),
        (
            DEFAULTS + "http_port = 9090\n" + SHOP_A,
            "defaults: http_port: a process setting: it belongs in [relay]",
        ),
        (
            DEFAULTS + SHOP_A + 'web_user = "anna"',
            "route shop-a: web_user: a process setting: it belongs in [relay]",
        ),
        (
            DEFAULTS + SHOP_A + "max_parallel_polls = 2",
            "route shop-a: max_parallel_polls: a process setting: it belongs in [relay]",
        ),
        (DEFAULTS + SHOP_A + SHOP_A, "route shop-a: name: two routes have this name"),
        (
            DEFAULTS + SHOP_A.replace('"shop-a"', '"Shop A"'),
            "routes[1]: name: 'Shop A' is not a route name (a-z, 0-9 and -, 1 to 40)",
        ),
        (
            DEFAULTS + SHOP_A.replace('"shop-a"', '"' + "a" * 41 + '"'),
            f"routes[1]: name: {'a' * 41!r} is not a route name (a-z, 0-9 and -, 1 to 40)",
        ),
        (
            DEFAULTS + SHOP_A.replace('"shop-a"', "12"),
            "routes[1]: name: 12 is not a route name (a-z, 0-9 and -, 1 to 40)",
        ),
        (DEFAULTS + SHOP_A + SHOP_B.replace('name = "shop-b"\n', ""), "routes[2]: name: required"),
        (
            DEFAULTS + SHOP_A + SHOP_B.replace("b@shop.example", "A@Shop.example"),
            "route shop-b: imap_folder: A@Shop.example@imap.example.com/INBOX is route shop-a's "
            "already (one folder, one route)",
        ),
        (
            DEFAULTS
            + SHOP_A
            + SHOP_B.replace("b@shop.example", "a@shop.example")
            + 'imap_folder = "inbox"\n',
            "route shop-b: imap_folder: a@shop.example@imap.example.com/inbox is route shop-a's "
            "already (one folder, one route)",
        ),
        (SHOP_A, "route shop-a: imap_host: required"),
        (SHOP_A, "route shop-a: imap_password: required (or imap_password_file)"),
        (
            DEFAULTS + SHOP_A.replace('forward_to = "inbox-a@gmi.example"\n', ""),
            "route shop-a: forward_to: required",
        ),
        (
            DEFAULTS + SHOP_A + 'imap_port = "abc"',
            "route shop-a: imap_port: 'abc' is not a whole number",
        ),
        (
            DEFAULTS + SHOP_A + "imap_port = 70000",
            "route shop-a: imap_port: 70000 is not a port (1-65535)",
        ),
        (
            DEFAULTS + SHOP_A + "keep_pdfs = 2",
            "route shop-a: keep_pdfs: '2' is not a boolean (true/false, 1/0, yes/no, on/off)",
        ),
        (
            DEFAULTS + SHOP_A + "imap_port = [1, 2]",
            "route shop-a: imap_port: takes one value, not an array",
        ),
        (
            DEFAULTS + SHOP_A + "gmi_tags = [['a']]",
            "route shop-a: gmi_tags: the array's items must be strings",
        ),
        (
            DEFAULTS + SHOP_A + "gmi_tags = ['a,b']",
            "route shop-a: gmi_tags: an item of the array contains ',': one per item",
        ),
        (
            DEFAULTS + SHOP_A + "since = 2026-01-31T10:00:00",
            "route shop-a: since: a TOML date-time or time is not a value here (a date is)",
        ),
        (
            DEFAULTS + SHOP_A + "imap_host = {name = 'x'}",
            "route shop-a: imap_host: a table is not a value here",
        ),
        (
            DEFAULTS + SHOP_A + 'imap_password = "x"\nimap_password_file = "imap.pw"',
            "route shop-a: imap_password: set either imap_password or imap_password_file, not both",
        ),
        (
            DEFAULTS + SHOP_A + 'imap_auth = "oauth2"',
            "route shop-a: oauth_provider: required when imap_auth or smtp_auth is oauth2: "
            "microsoft, google or generic",
        ),
        (
            DEFAULTS + SHOP_A + 'imap_auth = "oauth2"',
            "relay: secret_key_file: required when imap_auth or smtp_auth is oauth2 "
            "(stored tokens are encrypted with it)",
        ),
        (DEFAULTS + SHOP_A + 'destination = ""', "route shop-a: destination: must not be empty"),
        (DEFAULTS + SHOP_A + "destination = 5", "route shop-a: destination: must be a string"),
        (
            DEFAULTS + SHOP_A + f'destination = "{"d" * 201}"',
            "route shop-a: destination: longer than 200 characters",
        ),
        (
            DEFAULTS + SHOP_A + 'destination = "a\\u0007b"',
            "route shop-a: destination: contains control characters",
        ),
        (DEFAULTS + 'destination = "  "\n' + SHOP_A, "defaults: destination: must not be empty"),
        (
            "[relay]\nmax_parallel_polls = 0\n" + DEFAULTS + SHOP_A,
            "relay: max_parallel_polls: 0 is less than 1",
        ),
        (
            "[relay]\nlog_format = 'xml'\n" + DEFAULTS + SHOP_A,
            "relay: log_format: 'xml' is not one of json, text",
        ),
        (
            "[relay]\nsecret_key_file = 'nope'\n" + DEFAULTS + SHOP_A,
            "relay: secret_key_file: {folder}/nope is not a file",
        ),
        (
            '[relay]\ndatabase_url = "sqlite:///relative.db"\n' + DEFAULTS + SHOP_A,
            "relay: database_url: the SQLite path must be absolute, as in "
            "sqlite:////var/lib/relay.db (four slashes): cron runs from any directory",
        ),
        (
            DEFAULTS + SHOP_A + 'imap_password_file = "missing.pw"',
            "route shop-a: imap_password_file: cannot read {folder}/missing.pw: "
            "No such file or directory",
        ),
        (DEFAULTS, "{path}: no [[routes]]: at least one route is needed"),
        ("routes = []\n" + DEFAULTS, "{path}: no [[routes]]: at least one route is needed"),
        ("routes = 'shop-a'\n" + DEFAULTS, "{path}: routes must be [[routes]] tables"),
        (DEFAULTS + SHOP_A + "\n[[web_users]]\n", "web_users[1]: name: required"),
        ("web_users = 1\n" + DEFAULTS + SHOP_A, "{path}: web_users must be [[web_users]] tables"),
        ("relay = 1\n" + DEFAULTS + SHOP_A, "relay: must be a table"),
        (
            "[colours]\nred = 1\n" + DEFAULTS + SHOP_A,
            "{path}: unknown table 'colours' (the file has [relay], [defaults], [[routes]] and "
            "[[web_users]])",
        ),
    ],
)
def test_errors(folder: Path, text: str, expected: str) -> None:
    path = folder / "routes.toml"
    assert expected.format(folder=folder, path=path) in problems(folder, text)


def test_a_destination_that_is_no_string_is_one_problem(folder: Path) -> None:
    assert problems(folder, DEFAULTS + SHOP_A + "destination = 5\n") == [
        "route shop-a: destination: must be a string"
    ]


def test_every_problem_of_every_route_at_once_each_once(folder: Path) -> None:
    text = (
        "[relay]\nhttp_port = 'x'\n"
        + DEFAULTS
        + SHOP_A
        + "imap_port = 'a'\nkeep_pdfs = 'b'\n"
        + SHOP_B
        + "imap_port = 'c'\n"
    )
    with pytest.raises(ConfigProblems) as caught:
        load(folder, text)

    assert sorted(lines(caught.value)) == [
        "relay: http_port: 'x' is not a whole number",  # once, though every route has it
        "route shop-a: imap_port: 'a' is not a whole number",
        "route shop-a: keep_pdfs: 'b' is not a boolean (true/false, 1/0, yes/no, on/off)",
        "route shop-b: imap_port: 'c' is not a whole number",
    ]
    assert str(caught.value).startswith("Bad configuration (4 problems):\n")


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("[[routes]\n", "{path} is not valid TOML: "),
        (b"\xff\xfe", "{path} is not UTF-8 text"),
    ],
)
def test_a_file_that_is_not_toml(folder: Path, content: str | bytes, expected: str) -> None:
    path = folder / "routes.toml"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    with pytest.raises(ConfigError) as caught:
        load_deployment({"INVOICE_RELAY_CONFIG": str(path), **HOME})
    assert caught.value.variable == "INVOICE_RELAY_CONFIG"
    assert caught.value.problem.startswith(expected.format(path=path))


def test_a_missing_file(folder: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_deployment({"INVOICE_RELAY_CONFIG": str(folder / "nope.toml"), **HOME})
    assert lines(caught.value) == [
        f"INVOICE_RELAY_CONFIG: cannot read {folder}/nope.toml: No such file or directory"
    ]


def test_a_relative_config_path_is_read_from_the_working_directory(
    folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(folder, DEFAULTS + SHOP_A)
    monkeypatch.chdir(folder)
    deployment = load_deployment({"INVOICE_RELAY_CONFIG": "routes.toml", **HOME})
    assert deployment.config_file == folder / "routes.toml"
    assert deployment.routes[0].settings.imap_password.reveal() == "imap-secret"


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("shop-z", "route shop-z: no such route (known: shop-a, shop-b)"),
        ("bad\x1bname", "route 'bad\\x1bname': no such route (known: shop-a, shop-b)"),
    ],
)
def test_an_unknown_route_name(folder: Path, name: str, expected: str) -> None:
    deployment = load(folder, DEFAULTS + SHOP_A + SHOP_B)
    with pytest.raises(ConfigError) as caught:
        deployment.select(name)
    assert lines(caught.value) == [expected]


# --- the README's example -----------------------------------------------------------


def readme_example() -> str:
    readme = (Path(__file__).parents[3] / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Several mailboxes: the routes file", 1)[1]
    return section.split("```toml\n", 1)[1].split("```", 1)[0]


def test_the_readmes_example_loads_as_it_says(tmp_path: Path) -> None:
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "relay.key").write_text(KEY)
    for name in ("smtp.pw", "shop-a.imap.pw", "shop-b.imap.pw", "shop-b.gmi-key"):
        (secrets / name).write_text(f"{name}-secret\n")
    for name in ("anna.pw", "office.pw"):
        (secrets / name).write_text(f"{name}-password\n")
    path = write(tmp_path, readme_example(), mode=0o644)

    deployment = load_deployment({"INVOICE_RELAY_CONFIG": str(path), **HOME})

    shop_a, shop_b = deployment.routes
    assert (shop_a.name, shop_a.destination) == (
        "shop-a",
        "smtp:shop-a-4711@inbox.getmyinvoices.example",
    )
    assert (shop_b.name, shop_b.destination) == ("shop-b", None)  # from GET /account
    assert shop_b.mailbox == "invoices@shop-b.example@imap.example.com/Rechnungen"
    assert shop_b.settings.delivery is DeliveryKind.GETMYINVOICES
    assert shop_b.settings.gmi_api_key is not None
    assert shop_b.settings.gmi_api_key.reveal() == "shop-b.gmi-key-secret"
    assert shop_a.settings.smtp_password is not None
    assert shop_a.settings.smtp_password.reveal() == "smtp.pw-secret"
    assert deployment.max_parallel_polls == 8
    web = deployment.process.web
    assert web is not None
    assert [(user.name, user.scope) for user in web.users] == [
        ("anna", RouteScope(routes=frozenset({"shop-a"}))),
        ("office", RouteScope.everything()),
    ]
