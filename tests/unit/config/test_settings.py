from __future__ import annotations

import dataclasses
import inspect
from datetime import date
from pathlib import Path

import pytest

from worker.config.environment import Secret
from worker.config.settings import Settings, database_url_from_env, http_port_from_env
from worker.errors import ConfigError, ConfigProblems
from worker.mail.proof import SenderProof
from worker.models import DEFAULT_MAX_MAIL_BYTES, DedupMode, Security
from worker.relay.forwarding import ForwardRules
from worker.relay.mailparts import IntakeRules
from worker.relay.pollconfig import PipelineConfig

IMAP_SECRET = "imap-Pa55-zq81"
SMTP_SECRET = "smtp-Pa55-kx47"
DB_SECRET = "db-Pa55-vw29"

REQUIRED = {
    "INVOICE_RELAY_IMAP_HOST": "imap.example.com",
    "INVOICE_RELAY_IMAP_USER": "invoices@shop.example",
    "INVOICE_RELAY_IMAP_PASSWORD": IMAP_SECRET,
    "INVOICE_RELAY_SMTP_HOST": "smtp.example.com",
    "INVOICE_RELAY_FORWARD_TO": "inbox-123@getmyinvoices.example",
    "INVOICE_RELAY_FORWARD_FROM": "relay@shop.example",
    "HOME": "/home/relay",
}


def settings(**overrides: str) -> Settings:
    environ = dict(REQUIRED)
    environ.update({f"INVOICE_RELAY_{name}": value for name, value in overrides.items()})
    return Settings.from_env(environ)


def problem(**overrides: str) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        settings(**overrides)
    return caught.value


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("imap_port", 993),
        ("imap_security", Security.SSL),
        ("imap_folder", "INBOX"),
        ("smtp_port", 587),
        ("smtp_security", Security.STARTTLS),
        ("smtp_user", None),
        ("smtp_password", None),
        ("database_url", Secret("sqlite:////home/relay/.local/share/invoice-relay/relay.db")),
        ("schedule", "*/5 * * * *"),
        ("timezone", "UTC"),
        ("http_port", 8080),
        ("since", None),
        ("max_sends_per_minute", None),
        ("allowed_senders", ()),
        ("dedup", DedupMode.CONTENT),
        ("keep_pdfs", False),
        ("ca_file", None),
        ("log_format", "json"),
        ("timeout_seconds", 60.0),
        ("poll_deadline_seconds", 1800.0),
        ("max_attempts", 10),
        ("max_mail_bytes", 50 * 1024 * 1024),
        ("max_pdf_bytes", 30 * 1024 * 1024),
        ("pdf_timeout_seconds", 30.0),
        ("pdf_memory_mb", 1024),
        ("error_retries", 3),
        ("healthy_after_seconds", None),
        ("invoice_number_pattern", None),
        ("smtp_sessions", 1),
        ("unknown_variables", ()),
    ],
)
def test_defaults(name: str, expected: object) -> None:
    assert getattr(settings(), name) == expected


def test_required_values_are_read() -> None:
    loaded = settings()
    assert loaded.imap_host == "imap.example.com"
    assert loaded.imap_user == "invoices@shop.example"
    assert loaded.imap_password.reveal() == IMAP_SECRET
    assert loaded.smtp_host == "smtp.example.com"
    assert loaded.forward_to == "inbox-123@getmyinvoices.example"
    assert loaded.forward_from == "relay@shop.example"


@pytest.mark.parametrize("variable", [name for name in REQUIRED if name != "HOME"])
@pytest.mark.parametrize("value", [None, "", "   "])
def test_required_variables(variable: str, value: str | None) -> None:
    environ = dict(REQUIRED)
    del environ[variable]
    if value is not None:
        environ[variable] = value
    with pytest.raises(ConfigError) as caught:
        Settings.from_env(environ)
    assert caught.value.variable == variable
    assert "required" in caught.value.problem


@pytest.mark.parametrize(
    ("security", "imap_port", "smtp_port"),
    [("ssl", 993, 465), ("starttls", 143, 587), ("none", 143, 25), ("SSL", 993, 465)],
)
def test_ports_follow_security(security: str, imap_port: int, smtp_port: int) -> None:
    loaded = settings(IMAP_SECURITY=security, SMTP_SECURITY=security)
    assert (loaded.imap_port, loaded.smtp_port) == (imap_port, smtp_port)
    assert loaded.imap_security is Security(security.lower())


def test_explicit_ports_win() -> None:
    loaded = settings(IMAP_PORT="1993", SMTP_PORT="2525", HTTP_PORT="0")
    assert (loaded.imap_port, loaded.smtp_port, loaded.http_port) == (1993, 2525, 0)


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("IMAP_PORT", "0", "less than 1"),
        ("IMAP_PORT", "65536", "not a port"),
        ("SMTP_PORT", "smtp", "not a whole number"),
        ("HTTP_PORT", "-1", "less than 0"),
        ("IMAP_SECURITY", "tls", "not one of ssl, starttls, none"),
        ("SMTP_SECURITY", "yes", "not one of ssl, starttls, none"),
        ("IMAP_HOST", "imap example", "not a host name"),
        ("SMTP_HOST", "a..b", "not a host name"),
        ("FORWARD_TO", "rechnung@müller.example", "not an ASCII address"),
        ("FORWARD_TO", "not-an-address", "not one email address"),
        ("FORWARD_TO", "a@example.com, b@example.com", "not one email address"),
        ("FORWARD_TO", "a@example.com\r\nBcc: x@example.com", "control characters"),
        ("FORWARD_FROM", "@example.com", "not one email address"),
        ("FORWARD_FROM", "relay@", "not one email address"),
        ("SINCE", "31.01.2026", "not an ISO date"),
        ("TIMEZONE", "Mars/Olympus", "unknown time zone"),
        ("SCHEDULE", "every five minutes", "neither five cron fields"),
        ("SCHEDULE", "0 9 * * 8", "outside 0-7"),
        ("MAX_SENDS_PER_MINUTE", "0", "less than 1"),
        ("SMTP_SESSIONS", "0", "less than 1"),
        ("ALLOWED_SENDERS", "shop.example", "neither an address nor an @domain"),
        ("ALLOWED_SENDERS", "@", "neither an address nor an @domain"),
        ("DEDUP", "sha", "not one of content, bytes"),
        ("KEEP_PDFS", "maybe", "not a boolean"),
        ("LOG_FORMAT", "xml", "not one of json, text"),
        ("TIMEOUT", "0", "above zero"),
        ("TIMEOUT", "nan", "above zero"),
        ("TIMEOUT", "soon", "not a number of seconds"),
        ("MAX_ATTEMPTS", "0", "less than 1"),
        ("MAX_MAIL_BYTES", "50MB", "not a whole number"),
        ("MAX_PDF_BYTES", "-1", "less than 1"),
        ("PDF_TIMEOUT", "-3", "above zero"),
        ("PDF_MEMORY_MB", "16", "less than 64"),
        ("ERROR_RETRIES", "-1", "less than 0"),
        ("HEALTHY_AFTER", "a while", "not a duration"),
        ("POLL_DEADLINE", "soon", "not a duration"),
        ("POLL_DEADLINE", "0s", "longer than zero"),
        ("INVOICE_NUMBER_PATTERN", "(unclosed", "not a regular expression"),
        ("CA_FILE", "/nonexistent/ca.pem", "not a file"),
        ("DATABASE_URL", "relay.db", "not a URL"),
        ("DATABASE_URL", "sqlite:///relay.db", "must be absolute"),
    ],
)
def test_malformed_values_name_their_variable(name: str, value: str, message: str) -> None:
    error = problem(**{name: value})
    assert error.variable == f"INVOICE_RELAY_{name}"
    assert message in error.problem
    assert str(error).startswith(f"Bad configuration: INVOICE_RELAY_{name}: ")


@pytest.mark.parametrize(
    ("name", "value", "field", "expected"),
    [
        ("IMAP_FOLDER", "Invoices/Shop", "imap_folder", "Invoices/Shop"),
        ("FORWARD_TO", "GetMyInvoices <in@gmi.example>", "forward_to", "in@gmi.example"),
        ("FORWARD_FROM", "  relay@shop.example  ", "forward_from", "relay@shop.example"),
        ("SINCE", "2026-01-31", "since", date(2026, 1, 31)),
        ("SINCE", "", "since", None),
        ("TIMEZONE", "Europe/Berlin", "timezone", "Europe/Berlin"),
        ("SCHEDULE", "0 9 * * 1-5", "schedule", "0 9 * * 1-5"),
        ("SCHEDULE", "10m", "schedule", "10m"),
        ("MAX_SENDS_PER_MINUTE", "30", "max_sends_per_minute", 30),
        ("SMTP_SESSIONS", "4", "smtp_sessions", 4),
        ("DEDUP", "bytes", "dedup", DedupMode.BYTES),
        ("LOG_FORMAT", "TEXT", "log_format", "text"),
        ("TIMEOUT", "12.5", "timeout_seconds", 12.5),
        ("POLL_DEADLINE", "10m", "poll_deadline_seconds", 600.0),
        ("MAX_ATTEMPTS", "3", "max_attempts", 3),
        ("MAX_MAIL_BYTES", "1000000", "max_mail_bytes", 1_000_000),
        ("MAX_PDF_BYTES", "500000", "max_pdf_bytes", 500_000),
        ("PDF_TIMEOUT", "5", "pdf_timeout_seconds", 5.0),
        ("PDF_MEMORY_MB", "256", "pdf_memory_mb", 256),
        ("ERROR_RETRIES", "0", "error_retries", 0),
        ("HEALTHY_AFTER", "15m", "healthy_after_seconds", 900.0),
        ("HEALTHY_AFTER", "900s", "healthy_after_seconds", 900.0),
        ("HEALTHY_AFTER", "900", "healthy_after_seconds", 900.0),
        ("INVOICE_NUMBER_PATTERN", r"INV-(\d+)", "invoice_number_pattern", r"INV-(\d+)"),
        (
            "ALLOWED_SENDERS",
            " Billing@Printout.example , @Shop.Example,,billing@printout.example",
            "allowed_senders",
            ("billing@printout.example", "@shop.example"),
        ),
    ],
)
def test_values_are_parsed(name: str, value: str, field: str, expected: object) -> None:
    assert getattr(settings(**{name: value}), field) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("true", True),
        ("TRUE", True),
        ("1", True),
        ("yes", True),
        ("On", True),
        ("false", False),
        ("0", False),
        ("no", False),
        ("OFF", False),
    ],
)
def test_booleans(text: str, expected: bool) -> None:
    assert settings(KEEP_PDFS=text).keep_pdfs is expected


@pytest.mark.parametrize(("tty", "expected"), [(True, "text"), (False, "json")])
def test_log_format_follows_the_terminal(tty: bool, expected: str) -> None:
    assert Settings.from_env(REQUIRED, stderr_is_tty=tty).log_format == expected


def test_log_format_setting_beats_the_terminal() -> None:
    environ = {**REQUIRED, "INVOICE_RELAY_LOG_FORMAT": "json"}
    assert Settings.from_env(environ, stderr_is_tty=True).log_format == "json"


def test_smtp_login() -> None:
    loaded = settings(SMTP_USER="relay", SMTP_PASSWORD=SMTP_SECRET)
    assert loaded.smtp_user == "relay"
    assert loaded.smtp_password == Secret(SMTP_SECRET)


@pytest.mark.parametrize(
    ("overrides", "variable"),
    [
        ({"SMTP_USER": "relay"}, "INVOICE_RELAY_SMTP_PASSWORD"),
        ({"SMTP_PASSWORD": SMTP_SECRET}, "INVOICE_RELAY_SMTP_USER"),
    ],
)
def test_smtp_login_needs_both_halves(overrides: dict[str, str], variable: str) -> None:
    assert problem(**overrides).variable == variable


# --- password files -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("from-file\n", "from-file"),
        ("from-file", "from-file"),
        ("from-file\r\n", "from-file"),
        ("from-file\n\n", "from-file\n"),
        (" spaced \n", " spaced "),
    ],
)
def test_password_file(tmp_path: Path, content: str, expected: str) -> None:
    secret_file = tmp_path / "imap-password"
    secret_file.write_bytes(content.encode())
    environ = {k: v for k, v in REQUIRED.items() if k != "INVOICE_RELAY_IMAP_PASSWORD"}
    environ["INVOICE_RELAY_IMAP_PASSWORD_FILE"] = str(secret_file)
    assert Settings.from_env(environ).imap_password.reveal() == expected


def test_smtp_password_file(tmp_path: Path) -> None:
    secret_file = tmp_path / "smtp-password"
    secret_file.write_text(SMTP_SECRET + "\n")
    loaded = settings(SMTP_USER="relay", SMTP_PASSWORD_FILE=str(secret_file))
    assert loaded.smtp_password == Secret(SMTP_SECRET)


def test_password_and_file_together_is_an_error(tmp_path: Path) -> None:
    secret_file = tmp_path / "imap-password"
    secret_file.write_text("other")
    error = problem(IMAP_PASSWORD_FILE=str(secret_file))
    assert error.variable == "INVOICE_RELAY_IMAP_PASSWORD"
    assert "not both" in error.problem
    assert IMAP_SECRET not in str(error)


@pytest.mark.parametrize("kind", ["missing", "directory", "empty", "binary"])
def test_unreadable_password_file_names_the_variable(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "imap-password"
    if kind == "directory":
        path.mkdir()
    elif kind == "empty":
        path.write_text("\n")
    elif kind == "binary":
        path.write_bytes(b"\xff\xfe" + SMTP_SECRET.encode())
    environ = {k: v for k, v in REQUIRED.items() if k != "INVOICE_RELAY_IMAP_PASSWORD"}
    environ["INVOICE_RELAY_IMAP_PASSWORD_FILE"] = str(path)
    with pytest.raises(ConfigError) as caught:
        Settings.from_env(environ)
    assert caught.value.variable == "INVOICE_RELAY_IMAP_PASSWORD_FILE"
    assert str(path) in caught.value.problem
    assert SMTP_SECRET not in str(caught.value)


# --- secrets never show ---------------------------------------------------------------------


def test_repr_and_describe_show_no_secret() -> None:
    loaded = settings(
        SMTP_USER="relay",
        SMTP_PASSWORD=SMTP_SECRET,
        DATABASE_URL=f"postgresql+psycopg://relay:{DB_SECRET}@db.internal:5432/relay",
    )
    shown = [repr(loaded), str(loaded), repr(loaded.describe())]
    for text in shown:
        for secret in (IMAP_SECRET, SMTP_SECRET, DB_SECRET):
            assert secret not in text
    assert "postgresql+psycopg://relay:****@db.internal:5432/relay" in repr(loaded)
    described = loaded.describe()
    assert described["imap_password"] == "****"
    assert described["smtp_password"] == "****"
    assert described["database_url"] == "postgresql+psycopg://relay:****@db.internal:5432/relay"
    assert described["imap_host"] == "imap.example.com"
    assert described["smtp_user"] == "relay"
    assert described["since"] == "(unset)"
    assert described["keep_pdfs"] == "false"
    assert set(described) >= {"imap_host", "timeout_seconds", "unknown_variables"}


def test_secret_values_for_redaction() -> None:
    loaded = settings(
        SMTP_USER="relay",
        SMTP_PASSWORD=SMTP_SECRET,
        DATABASE_URL="postgresql+psycopg://relay:p%40ss@db/relay?password=second",
    )
    assert loaded.secret_values() == (IMAP_SECRET, SMTP_SECRET, "p%40ss", "p@ss", "second")


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql+psycopg://relay:secret@db/relay", "postgresql+psycopg://relay:****@db/relay"),
        ("postgresql://relay@db/relay", "postgresql://relay@db/relay"),
        ("postgresql://db/relay", "postgresql://db/relay"),
        ("postgresql://relay:se@cr/et@db/relay", "postgresql://relay:****@db/relay"),
        (
            "postgresql://relay@db/relay?password=secret",
            "postgresql://relay@db/relay?password=****",
        ),
        ("sqlite:////data/relay.db", "sqlite:////data/relay.db"),
    ],
)
def test_url_secret_masks_only_the_password(url: str, shown: str) -> None:
    secret = Secret.url(url)
    assert (repr(secret), str(secret), secret.reveal()) == (shown, shown, url)


def test_secret() -> None:
    secret = Secret("hunter2-xyz")
    assert (repr(secret), str(secret), f"{secret}") == ("****", "****", "****")
    assert secret.reveal() == "hunter2-xyz"
    assert secret == Secret("hunter2-xyz")
    assert secret != Secret("other")
    assert Secret.url("sqlite://") == Secret("sqlite://")
    with pytest.raises(AttributeError):
        secret._value = "changed"  # type: ignore[misc]


def test_config_errors_never_echo_a_database_url() -> None:
    error = problem(DATABASE_URL=f"relay:{DB_SECRET}@db/relay")
    assert DB_SECRET not in str(error)


# --- the database -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("environ", "url"),
    [
        ({"HOME": "/home/a"}, "sqlite:////home/a/.local/share/invoice-relay/relay.db"),
        ({"HOME": "/home/a", "XDG_DATA_HOME": "/xdg"}, "sqlite:////xdg/invoice-relay/relay.db"),
        ({"XDG_DATA_HOME": "/xdg"}, "sqlite:////xdg/invoice-relay/relay.db"),
        # the XDG spec says a relative XDG_DATA_HOME is ignored
        (
            {"HOME": "/home/a", "XDG_DATA_HOME": "xdg"},
            "sqlite:////home/a/.local/share/invoice-relay/relay.db",
        ),
    ],
)
def test_default_database_url(environ: dict[str, str], url: str) -> None:
    base = {k: v for k, v in REQUIRED.items() if k != "HOME"}
    assert Settings.from_env({**base, **environ}).database_url.reveal() == url


@pytest.mark.parametrize("environ", [{}, {"HOME": ""}, {"HOME": "relative"}])
def test_no_home_and_no_database_url(environ: dict[str, str]) -> None:
    base = {k: v for k, v in REQUIRED.items() if k != "HOME"}
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({**base, **environ})
    assert caught.value.variable == "INVOICE_RELAY_DATABASE_URL"
    assert "set INVOICE_RELAY_DATABASE_URL" in caught.value.problem


@pytest.mark.parametrize(
    ("url", "path"),
    [
        ("sqlite:////data/invoice-relay.db", Path("/data/invoice-relay.db")),
        ("sqlite+pysqlite:////data/relay.db?timeout=5", Path("/data/relay.db")),
        ("sqlite://", None),
        ("sqlite:///:memory:", None),
        ("postgresql+psycopg://relay@db/relay", None),
    ],
)
def test_sqlite_path(url: str, path: Path | None) -> None:
    assert settings(DATABASE_URL=url).sqlite_path() == path


# --- everything else ------------------------------------------------------------------------


def test_ca_file(tmp_path: Path) -> None:
    ca_file = tmp_path / "ca.pem"
    ca_file.write_text("-----BEGIN CERTIFICATE-----\n")
    assert settings(CA_FILE=str(ca_file)).ca_file == ca_file.resolve()


def test_ca_file_directory_is_refused(tmp_path: Path) -> None:
    assert problem(CA_FILE=str(tmp_path)).variable == "INVOICE_RELAY_CA_FILE"


def test_unknown_variables_are_reported() -> None:
    loaded = settings(IMAP_PROT="143", SHEDULE="10m")
    assert loaded.unknown_variables == ("INVOICE_RELAY_IMAP_PROT", "INVOICE_RELAY_SHEDULE")


def test_password_file_variables_are_known(tmp_path: Path) -> None:
    secret_file = tmp_path / "smtp-password"
    secret_file.write_text("x")
    loaded = settings(SMTP_USER="relay", SMTP_PASSWORD_FILE=str(secret_file))
    assert loaded.unknown_variables == ()


def test_every_problem_is_reported_at_once() -> None:
    with pytest.raises(ConfigProblems) as caught:
        Settings.from_env(
            {
                "INVOICE_RELAY_IMAP_PORT": "x",
                "INVOICE_RELAY_IMAP_PASSWORD": IMAP_SECRET,
                "INVOICE_RELAY_DATABASE_URL": f"postgresql://relay:{DB_SECRET}@db/relay",
            }
        )
    error = caught.value
    variables = [item.variable for item in error.problems]
    assert variables == [
        "INVOICE_RELAY_IMAP_HOST",
        "INVOICE_RELAY_IMAP_PORT",
        "INVOICE_RELAY_IMAP_USER",
        "INVOICE_RELAY_SMTP_HOST",
        "INVOICE_RELAY_FORWARD_TO",
        "INVOICE_RELAY_FORWARD_FROM",
    ]
    lines = str(error).splitlines()
    assert lines[0] == "Bad configuration (6 problems):"
    assert lines[1:] == [f"  {item.variable}: {item.problem}" for item in error.problems]
    assert (error.variable, error.problem) == ("INVOICE_RELAY_IMAP_HOST", "required")
    assert IMAP_SECRET not in str(error)
    assert DB_SECRET not in str(error)


# --- single settings for commands that need nothing else ----------------------------------


def test_database_url_alone() -> None:
    assert database_url_from_env({"HOME": "/home/b"}) == Secret(
        "sqlite:////home/b/.local/share/invoice-relay/relay.db"
    )
    url = f"postgresql+psycopg://relay:{DB_SECRET}@db/relay"
    assert database_url_from_env({"INVOICE_RELAY_DATABASE_URL": url}).reveal() == url


@pytest.mark.parametrize(
    "environ", [{}, {"INVOICE_RELAY_DATABASE_URL": "sqlite:///relative.db", "HOME": "/h"}]
)
def test_database_url_alone_is_checked(environ: dict[str, str]) -> None:
    with pytest.raises(ConfigError) as caught:
        database_url_from_env(environ)
    assert caught.value.variable == "INVOICE_RELAY_DATABASE_URL"


@pytest.mark.parametrize(
    ("environ", "port"), [({}, 8080), ({"INVOICE_RELAY_HTTP_PORT": "9100"}, 9100)]
)
def test_http_port_alone(environ: dict[str, str], port: int) -> None:
    assert http_port_from_env(environ) == port


def test_http_port_alone_is_checked() -> None:
    with pytest.raises(ConfigError, match="INVOICE_RELAY_HTTP_PORT"):
        http_port_from_env({"INVOICE_RELAY_HTTP_PORT": "http"})


# --- one home for each default -----------------------------------------------------------


def _defaults(cls: type) -> dict[str, object]:
    return {
        item.name: item.default
        for item in dataclasses.fields(cls)
        if item.default is not dataclasses.MISSING
    }


def test_what_from_env_fills_in_is_the_dataclass_default() -> None:
    read = settings()
    assert {name: getattr(read, name) for name in _defaults(Settings)} == _defaults(Settings)


@pytest.mark.parametrize("cls", [IntakeRules, PipelineConfig, ForwardRules, SenderProof])
def test_the_relay_defaults_are_the_users(cls: type) -> None:
    # A pipeline built without settings (tests, bench) behaves as the user's default.
    if cls is SenderProof:
        batch_bytes = inspect.signature(SenderProof).parameters["batch_bytes"].default
        assert batch_bytes == _defaults(Settings)["max_mail_bytes"] == DEFAULT_MAX_MAIL_BYTES
        return
    shared = _defaults(cls).keys() & _defaults(Settings).keys()
    assert shared
    assert {name: _defaults(cls)[name] for name in shared} == {
        name: _defaults(Settings)[name] for name in shared
    }
