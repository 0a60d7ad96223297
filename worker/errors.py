"""The exception hierarchy. Library exceptions are translated into these at the adapters.

Each class's docstring is its default message. Fields carry the facts (setting, host,
uid, sha256); `str()` never contains a secret.
"""

from __future__ import annotations

from typing import ClassVar


class RelayError(Exception):
    """invoice-relay failed."""

    def __init__(self, detail: str | None = None) -> None:
        self.detail = detail
        # The docstring's first line is the message; the rest explains, for readers.
        message = (self.__doc__ or type(self).__name__).strip().splitlines()[0].rstrip(".")
        super().__init__(f"{message}: {detail}" if detail else message)


# --- configuration (exit 2) -------------------------------------------------------


class ConfigError(RelayError):
    """Bad configuration."""

    def __init__(self, variable: str, problem: str) -> None:
        self.variable = variable
        self.problem = problem
        super().__init__(f"{variable}: {problem}")


# --- infrastructure: the poll cannot complete (exit 1) ------------------------------


class InfrastructureError(RelayError):
    """A server the relay needs is unavailable; state is safe, run again later."""


class MailboxError(InfrastructureError):
    """The IMAP server could not be used."""

    def __init__(self, detail: str | None = None, *, host: str = "", port: int = 0) -> None:
        self.host = host
        self.port = port
        where = f"IMAP {host}:{port}" if host else "IMAP"
        super().__init__(f"{where}: {detail}" if detail else where)


class MailboxLoginError(MailboxError):
    """The IMAP server refused the login (check INVOICE_RELAY_IMAP_USER and _PASSWORD)."""


class MailboxLoginUnsupported(MailboxLoginError):
    """The IMAP server offers no login that can carry the user and password.

    Raised before the server is asked; the message never holds a character of either.
    (Check INVOICE_RELAY_IMAP_USER and _PASSWORD, or the server's AUTH=PLAIN.)
    """


class MailboxTokenRefused(MailboxLoginError):
    """The IMAP server refused the OAuth2 login (see docs/oauth.md, "What each mistake says").

    The token endpoint gave a token, the IMAP server did not take it, also after one
    retry with a fresh one: the app lacks IMAP.AccessAsApp or its service principal
    lacks the mailbox permission, or INVOICE_RELAY_IMAP_USER is not the mailbox the
    token is for. The token is never part of the message.
    """


class MailboxFolderError(MailboxError):
    """The IMAP folder cannot be opened (check INVOICE_RELAY_IMAP_FOLDER)."""


class AfterForwardImpossible(RelayError):
    """INVOICE_RELAY_AFTER_FORWARD cannot be done on this IMAP server."""


class DeliveryUnavailable(InfrastructureError):
    """The destination refused the session (connect, TLS, login, sender or recipient).

    Session-level: no document was delivered, every one stays pending and no attempt
    is counted.
    """


class OutboxError(DeliveryUnavailable):
    """The SMTP server could not be used."""

    def __init__(self, detail: str | None = None, *, host: str = "", port: int = 0) -> None:
        self.host = host
        self.port = port
        where = f"SMTP {host}:{port}" if host else "SMTP"
        super().__init__(f"{where}: {detail}" if detail else where)


class SessionRefused(OutboxError):
    """The SMTP server refused the session (connect, TLS, login, sender or recipient).

    Every PDF stays pending and no attempt is counted.
    """


class DestinationRefused(DeliveryUnavailable):
    """The destination's API refused the session (its key, permission or account).

    Named by its cause; every document stays pending and no attempt is counted, and
    `once` exits 1 while `/healthz` shows the cause until it is fixed.
    """

    def __init__(self, detail: str | None = None, *, code: int | None = None) -> None:
        self.code = code
        super().__init__(detail)


class StoreError(InfrastructureError):
    """The database could not be used (check INVOICE_RELAY_DATABASE_URL)."""


class TokenEndpointError(InfrastructureError):
    """The OAuth2 token endpoint could not be used; state is safe, run again later.

    Down, slow (bounded by INVOICE_RELAY_TIMEOUT) or answering nonsense: a transient
    outage. `endpoint` is the host, never a URL with a query; `error` the RFC 6749
    error code when the endpoint gave one.
    """

    def __init__(self, detail: str | None = None, *, endpoint: str = "", error: str = "") -> None:
        self.endpoint = endpoint
        self.error = error
        where = f"token endpoint {endpoint}" if endpoint else "token endpoint"
        super().__init__(f"{where}: {detail}" if detail else where)


class OAuthLoginRefused(TokenEndpointError):
    """The OAuth2 grant was refused (invalid_grant).

    The refresh token expired or was revoked, or consent was withdrawn. Not transient:
    run `invoice-relay oauth login` for the route, or replace
    INVOICE_RELAY_OAUTH_REFRESH_TOKEN (or fix the service account's delegation).
    """

    def __init__(
        self,
        detail: str | None = None,
        *,
        endpoint: str = "",
        error: str = "invalid_grant",
        route: str = "the default route",
    ) -> None:
        self.route = route
        fix = (
            f"{route}: run `invoice-relay oauth login` or replace INVOICE_RELAY_OAUTH_REFRESH_TOKEN"
        )
        super().__init__(f"{detail}; {fix}" if detail else fix, endpoint=endpoint, error=error)


class OAuthClientRejected(TokenEndpointError):
    """The token endpoint refused the client (invalid_client).

    Check INVOICE_RELAY_OAUTH_CLIENT_ID and INVOICE_RELAY_OAUTH_CLIENT_SECRET (or
    _CLIENT_CERT_FILE); client secrets expire.
    Not transient. `client_id` is public (it is in every authorization URL); the
    secret is never named.
    """

    def __init__(
        self, detail: str | None = None, *, endpoint: str = "", client_id: str = ""
    ) -> None:
        self.client_id = client_id
        named = f"client id {client_id} or its secret or certificate was refused"
        super().__init__(
            f"{named}: {detail}" if detail else named, endpoint=endpoint, error="invalid_client"
        )


# --- one document's delivery (not fatal for the poll) ------------------------------


class DeliveryRefused(RelayError):
    """The destination refused the document.

    Never raised itself: a refusal is one of the subclasses, which say what the
    forwarder does next. `code` is the destination's own (an SMTP reply code; later an
    HTTP status), kept for the audit log and for tests; the class, not the code, decides.
    """

    permanent: ClassVar[bool] = False  # whether retrying can never help

    def __init__(
        self, detail: str | None = None, *, code: int | None = None, sha256: str = ""
    ) -> None:
        self.code = code
        self.sha256 = sha256
        super().__init__(detail)


class DeliveryDeferred(DeliveryRefused):
    """The destination refused the document for now.

    It is retried later, with backoff, and the attempt counts.
    """


class DeliveryUncertain(DeliveryDeferred):
    """The document went out, and may have arrived.

    Retried later like a deferral, under the same delivery id, so that a destination
    that did accept it can recognise the copy.
    """


class DeliveryThrottled(DeliveryRefused):
    """The destination's limit leaves the document for later.

    Not an attempt: the document stays pending, uncounted, and is due again after
    `retry_after_seconds`; `limit` names the limit (for the audit's reason).
    """

    def __init__(
        self,
        detail: str | None = None,
        *,
        retry_after_seconds: float,
        limit: str,
        code: int | None = None,
        sha256: str = "",
    ) -> None:
        self.retry_after_seconds = retry_after_seconds
        self.limit = limit
        super().__init__(f"{limit} ({detail})" if detail else limit, code=code, sha256=sha256)


class DeliveryRejected(DeliveryRefused):
    """The destination refused the document for good.

    The document becomes `failed`; it is not retried.
    """

    permanent: ClassVar[bool] = True


# --- one PDF's check (the sighting becomes `error`) ----------------------------------


class PdfCheckFailed(RelayError):
    """The PDF check crashed, ran out of memory or timed out."""


class LeaseLost(RelayError):
    """This process no longer holds the lease it wrote under; nothing was changed.

    Its owner was frozen or cut off past the lease's expiry, so another process may
    have taken the document or the mailbox over: the stale owner's write is refused
    (fencing) and its work ends.
    """


class ConfigProblems(ConfigError):
    """Bad configuration, several problems: one line each.

    `variable` and `problem` are the first problem's, for callers that want one.
    """

    def __init__(self, problems: tuple[ConfigError, ...]) -> None:
        self.problems = problems
        super().__init__(problems[0].variable, problems[0].problem)
        lines = "\n".join(f"  {problem.variable}: {problem.problem}" for problem in problems)
        self.args = (f"Bad configuration ({len(problems)} problems):\n{lines}",)


class DestinationAmbiguous(RelayError):
    """That SHA-256 names documents of several destinations: say which (--route or --destination).

    Raised by `retry` and `resend` when neither filter narrows a SHA-256 that documents
    of several destinations share; `destinations` lists them.
    """

    def __init__(self, sha256: str, destinations: tuple[str, ...]) -> None:
        self.sha256 = sha256
        self.destinations = destinations
        super().__init__(f"{sha256} goes to {', '.join(destinations)}")
