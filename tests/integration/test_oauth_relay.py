"""`invoice-relay once` and `check` logging in with OAuth2 end to end, with the defaults.

Dovecot here has only an oauth2 passdb (each token validated locally as a signed JWT;
where a test needs the token server to withdraw a token early, checked at its
introspection endpoint) and the SMTP sink only AUTH XOAUTH2, so nothing but a token the
token server issued for the mailbox opens either. The Microsoft flows run through MSAL
pointed at the local authority (INVOICE_RELAY_OAUTH_AUTHORITY), Google's through
google-auth; the token server's CA is trusted through INVOICE_RELAY_CA_FILE only. (The
servers are tests/integration/conftest.py's `token_server`, `oauth_imap`,
`introspecting_imap` and `oauth_smtp`.)
"""

from __future__ import annotations

import json
import secrets
import time
from pathlib import Path

from tests import samples
from tests.integration.test_relay import relay_env, run_relay
from tests.integration.test_service_run import free_port, get, running_relay
from tests.servers.dovecot import DovecotServer
from tests.servers.smtp_sink import SmtpSink
from tests.servers.tls import TestCA
from tests.servers.token_server import JWT_BEARER, TokenServer

MAILBOX = "invoices@shop.example"  # Dovecot's user, and the SMTP login: one identity
TENANT = "contoso.example"
APP_SECRET = "app-Sec7et-" + secrets.token_hex(6)


def oauth_env(
    imap: DovecotServer,
    smtp: SmtpSink,
    smtp_ca: TestCA,
    tmp_path: Path,
    *,
    imap_auth: str = "oauth2",
    **oauth: str,
) -> dict[str, str]:
    """The relay's environment for SMTP (and IMAP) on oauth2; `oauth` sets the flow."""
    key_file = tmp_path / "secret.key"
    if not key_file.exists():
        key_file.write_text(secrets.token_urlsafe(32))
    env = relay_env(
        imap,
        smtp,
        f"sqlite:///{tmp_path / 'relay.db'}",
        smtp_ca=smtp_ca,
        INVOICE_RELAY_IMAP_AUTH=imap_auth,
        INVOICE_RELAY_SMTP_AUTH="oauth2",
        INVOICE_RELAY_SMTP_USER=MAILBOX,
        INVOICE_RELAY_SECRET_KEY_FILE=str(key_file),
        **oauth,
    )
    if imap_auth == "oauth2":
        del env["INVOICE_RELAY_IMAP_PASSWORD"]  # the oauth2 passdb would refuse it anyway
    return env


def microsoft_app(server: TokenServer, *, secret: str = APP_SECRET) -> dict[str, str]:
    return {
        "INVOICE_RELAY_OAUTH_PROVIDER": "microsoft",
        "INVOICE_RELAY_OAUTH_FLOW": "app",
        "INVOICE_RELAY_OAUTH_TENANT": TENANT,
        "INVOICE_RELAY_OAUTH_CLIENT_ID": "app-1",
        "INVOICE_RELAY_OAUTH_CLIENT_SECRET": secret,
        "INVOICE_RELAY_OAUTH_AUTHORITY": server.url,
    }


def microsoft_delegated(server: TokenServer, refresh_token: str) -> dict[str, str]:
    return {
        "INVOICE_RELAY_OAUTH_PROVIDER": "microsoft",
        "INVOICE_RELAY_OAUTH_FLOW": "delegated",
        "INVOICE_RELAY_OAUTH_TENANT": TENANT,
        "INVOICE_RELAY_OAUTH_CLIENT_ID": "desktop-1",
        "INVOICE_RELAY_OAUTH_REFRESH_TOKEN": refresh_token,
        "INVOICE_RELAY_OAUTH_AUTHORITY": server.url,
    }


def invoice(number: str) -> bytes:
    return samples.invoice_mail(
        pdfs=[(f"Invoice {number}.pdf", samples.invoice_pdf(number=number))],
        message_id=f"<invoice-{number}@shop.example>",
    )


def forwarded_names(smtp: SmtpSink) -> list[str]:
    return [
        str(attachment.get_filename())
        for mail in smtp.messages
        for attachment in mail.message.iter_attachments()
    ]


def introspected(server: TokenServer) -> set[str]:
    return {item.form.get("token", "") for item in server.requests if item.path == "/introspect"}


def test_microsoft_app_forwards_through_the_xoauth2_only_servers(
    oauth_imap: DovecotServer,
    oauth_smtp: SmtpSink,
    smtp_ca: TestCA,
    token_server: TokenServer,
    tmp_path: Path,
) -> None:
    token_server.add_client("app-1", secret=APP_SECRET, mailbox=MAILBOX)
    oauth_imap.deliver(invoice("1042"))
    env = oauth_env(oauth_imap, oauth_smtp, smtp_ca, tmp_path, **microsoft_app(token_server))

    result = run_relay(env, "once")

    assert result.returncode == 0, result.stderr
    assert forwarded_names(oauth_smtp) == ["Invoice 1042.pdf"]
    assert oauth_smtp.logins == [MAILBOX]
    # IMAP and SMTP share the identity (provider, tenant, client, mailbox): one grant.
    (asked,) = token_server.token_requests()
    assert asked.form["grant_type"] == "client_credentials"
    assert asked.form["scope"] == "https://outlook.office365.com/.default"
    # The headers MSAL for Python sends with every token request: it was MSAL that asked.
    assert asked.headers["x-client-sku"] == "MSAL.Python"
    assert len(token_server.handed_out()) == 1
    assert introspected(token_server) == set()  # Dovecot validated the JWT itself
    assert f"Login: user=<{MAILBOX}>, method=XOAUTH2" in oauth_imap.log()


def test_google_service_account_acts_as_the_mailbox(
    oauth_imap: DovecotServer,
    oauth_smtp: SmtpSink,
    smtp_ca: TestCA,
    token_server: TokenServer,
    tmp_path: Path,
) -> None:
    key_file = tmp_path / "service-account.json"
    key = token_server.add_service_account(subjects=frozenset({MAILBOX}))
    key_file.write_text(json.dumps(key))
    oauth_imap.deliver(invoice("2001"))
    env = oauth_env(
        oauth_imap,
        oauth_smtp,
        smtp_ca,
        tmp_path,
        INVOICE_RELAY_OAUTH_PROVIDER="google",
        INVOICE_RELAY_OAUTH_FLOW="service_account",
        INVOICE_RELAY_OAUTH_SERVICE_ACCOUNT_FILE=str(key_file),
        INVOICE_RELAY_OAUTH_TOKEN_URL=token_server.token_url(),
    )

    result = run_relay(env, "once")

    assert result.returncode == 0, result.stderr
    assert forwarded_names(oauth_smtp) == ["Invoice 2001.pdf"]
    (asked,) = token_server.token_requests()
    assert asked.form["grant_type"] == JWT_BEARER
    (token,) = token_server.handed_out()
    issued = token_server.issued(token)
    assert issued is not None and issued.user == MAILBOX  # the JWT's subject
    assert issued.scope == "https://mail.google.com/"


def test_delegated_saves_the_rotated_refresh_token_and_uses_it_next_time(
    introspecting_imap: DovecotServer,
    oauth_smtp: SmtpSink,
    smtp_ca: TestCA,
    token_server: TokenServer,
    tmp_path: Path,
) -> None:
    token_server.add_client("desktop-1", mailbox=MAILBOX)
    configured = token_server.issue_refresh_token(user=MAILBOX, client_id="desktop-1")
    env = oauth_env(
        introspecting_imap,
        oauth_smtp,
        smtp_ca,
        tmp_path,
        **microsoft_delegated(token_server, configured),
    )
    introspecting_imap.deliver(invoice("3001"))
    first = run_relay(env, "once")
    assert first.returncode == 0, first.stderr

    # An hour later: the cached access token is refused, so the relay refreshes, with
    # the refresh token the first run was given. Spending the configured one again
    # would revoke the whole grant (as Microsoft does with a reused rotated token).
    token_server.expire_access_tokens()
    introspecting_imap.deliver(invoice("3002"))
    second = run_relay(env, "once")
    assert second.returncode == 0, second.stderr

    assert forwarded_names(oauth_smtp) == ["Invoice 3001.pdf", "Invoice 3002.pdf"]
    spent = [item.form["refresh_token"] for item in token_server.token_requests()]
    assert len(spent) == 2  # one per run: IMAP and SMTP shared each
    assert spent[0] == configured
    assert spent[1] != configured
    assert spent[1] in token_server.handed_out()  # the one the first refresh returned


def test_a_revoked_grant_exits_1_naming_the_fix_and_sends_nothing(
    oauth_imap: DovecotServer,
    oauth_smtp: SmtpSink,
    smtp_ca: TestCA,
    token_server: TokenServer,
    tmp_path: Path,
) -> None:
    token_server.add_client("desktop-1", mailbox=MAILBOX)
    configured = token_server.issue_refresh_token(user=MAILBOX, client_id="desktop-1")
    token_server.revoke_all()
    oauth_imap.deliver(invoice("4001"))
    env = oauth_env(
        oauth_imap,
        oauth_smtp,
        smtp_ca,
        tmp_path,
        **microsoft_delegated(token_server, configured),
    )

    result = run_relay(env, "once")

    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.startswith("invoice-relay:")]
    assert len(lines) == 1, result.stderr
    assert "invalid_grant" in lines[0] or "grant was refused" in lines[0]
    assert (
        "run `invoice-relay oauth login` or replace INVOICE_RELAY_OAUTH_REFRESH_TOKEN" in (lines[0])
    )
    assert configured not in result.stderr + result.stdout
    assert oauth_smtp.messages == []


def test_a_revoked_grant_is_named_with_its_fix_by_healthz(
    oauth_imap: DovecotServer,
    oauth_smtp: SmtpSink,
    smtp_ca: TestCA,
    token_server: TokenServer,
    tmp_path: Path,
) -> None:
    token_server.add_client("desktop-1", mailbox=MAILBOX)
    configured = token_server.issue_refresh_token(user=MAILBOX, client_id="desktop-1")
    token_server.revoke_all()
    port = free_port()
    env = oauth_env(
        oauth_imap,
        oauth_smtp,
        smtp_ca,
        tmp_path,
        INVOICE_RELAY_HTTP_PORT=str(port),
        INVOICE_RELAY_SCHEDULE="1h",
        **microsoft_delegated(token_server, configured),
    )

    def failed() -> bool:
        status, body = get(port, "/healthz")
        return status == 503 and json.loads(body).get("last_error") is not None

    with running_relay(env, tmp_path / "run.log", port) as relay:
        relay.wait_until(failed, 30, "the start-up poll's failure on /healthz")
        body = json.loads(get(port, "/healthz")[1])
        assert get(port, "/livez") == (200, "ok\n")  # a revoked grant needs a person
        assert relay.terminate() == 0
    reason = str(body["last_error"])
    assert "the default route: run `invoice-relay oauth login`" in reason
    assert configured not in reason
    assert oauth_smtp.messages == []


def test_a_wrong_client_secret_is_named_as_such(
    oauth_imap: DovecotServer,
    oauth_smtp: SmtpSink,
    smtp_ca: TestCA,
    token_server: TokenServer,
    tmp_path: Path,
) -> None:
    token_server.add_client("app-1", secret=APP_SECRET, mailbox=MAILBOX)
    wrong = "wrong-" + secrets.token_hex(6)
    env = oauth_env(
        oauth_imap,
        oauth_smtp,
        smtp_ca,
        tmp_path,
        **microsoft_app(token_server, secret=wrong),
    )

    result = run_relay(env, "once")

    assert result.returncode == 1
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("invoice-relay:")]
    assert "client id app-1 or its secret or certificate was refused" in line
    assert wrong not in result.stderr + result.stdout


def test_a_stalled_token_endpoint_is_an_outage_bounded_by_the_timeout(
    oauth_imap: DovecotServer,
    oauth_smtp: SmtpSink,
    smtp_ca: TestCA,
    token_server: TokenServer,
    tmp_path: Path,
) -> None:
    token_server.add_client("app-1", secret=APP_SECRET, mailbox=MAILBOX)
    oauth_imap.deliver(invoice("5001"))
    env = oauth_env(
        oauth_imap,
        oauth_smtp,
        smtp_ca,
        tmp_path,
        INVOICE_RELAY_TIMEOUT="3",
        **microsoft_app(token_server),
    )

    with token_server.stalled():
        started = time.monotonic()
        stalled = run_relay(env, "once")
        took = time.monotonic() - started

    assert stalled.returncode == 1
    (line,) = [line for line in stalled.stderr.splitlines() if line.startswith("invoice-relay:")]
    assert "no answer in time" in line
    # The token request gives up at INVOICE_RELAY_TIMEOUT (3 s); the rest is the start-up
    # of Python and the migrations. The server would hold it for 30 s.
    assert took < 20, took
    assert oauth_smtp.messages == []
    # State is safe: once the endpoint answers, the mail goes out, once.
    again = run_relay(env, "once")
    assert again.returncode == 0, again.stderr
    assert forwarded_names(oauth_smtp) == ["Invoice 5001.pdf"]


def test_no_token_for_smtp_leaves_the_recorded_invoice_pending(
    imap: DovecotServer,
    oauth_smtp: SmtpSink,
    smtp_ca: TestCA,
    token_server: TokenServer,
    tmp_path: Path,
) -> None:
    """IMAP with a password, SMTP with OAuth2 (Google Workspace shops often mix them):
    the token fails only after the mail was read and recorded, and the forwarding lets
    go of what it claimed, so the next run sends it, once."""
    token_server.add_client("app-1", secret=APP_SECRET, mailbox=MAILBOX)
    imap.append(invoice("6001"))
    env = oauth_env(
        imap, oauth_smtp, smtp_ca, tmp_path, imap_auth="password", **microsoft_app(token_server)
    )
    token_server.fail_next(error="invalid_client", status=401)

    refused = run_relay(env, "once")

    assert refused.returncode == 1
    (line,) = [line for line in refused.stderr.splitlines() if line.startswith("invoice-relay:")]
    assert "client id app-1 or its secret or certificate was refused" in line
    assert oauth_smtp.messages == []
    again = run_relay(env, "once")
    assert again.returncode == 0, again.stderr
    assert "forwarded 1," in again.stdout
    assert forwarded_names(oauth_smtp) == ["Invoice 6001.pdf"]


def test_check_logs_in_with_oauth2(
    oauth_imap: DovecotServer,
    oauth_smtp: SmtpSink,
    smtp_ca: TestCA,
    token_server: TokenServer,
    tmp_path: Path,
) -> None:
    token_server.add_client("app-1", secret=APP_SECRET, mailbox=MAILBOX)
    env = oauth_env(oauth_imap, oauth_smtp, smtp_ca, tmp_path, **microsoft_app(token_server))
    assert run_relay(env, "db", "upgrade").returncode == 0  # tokens are kept in the database

    result = run_relay(env, "check")

    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert any(line.startswith(f"ok   oauth2: imap token for {MAILBOX} until ") for line in lines)
    assert any(
        line.startswith(f"ok   imap: logged in with oauth2 as {MAILBOX} at ") for line in lines
    )
    assert any(
        line.startswith(f"ok   smtp: connected with oauth2 as {MAILBOX} to ") for line in lines
    )
    assert len(token_server.token_requests()) == 1  # every check shared the stored token
