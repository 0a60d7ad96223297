"""A local OAuth2 token server over HTTPS (a test CA), for the relay's token sources.

It speaks what the relay's libraries ask for, so their code runs unmodified:
- Microsoft's instance discovery (`/common/discovery/instance`) and OpenID metadata
  (`/{tenant}/v2.0/.well-known/openid-configuration`), as MSAL reads them;
- a token endpoint (`/{tenant}/oauth2/v2.0/token`, and `/token` for Google and generic
  providers) with the client credentials grant (a secret, or a certificate's signed
  client assertion), the refresh grant (rotating: a refresh token works once, and a spent
  one coming back revokes its whole grant, as Microsoft does), and the JWT bearer grant
  (RFC 7523) that Google's service accounts use, with the assertion's signature checked;
- access tokens that are JWTs signed with the server's own RSA key (RS256), with the
  claims a mail server checks without asking anyone (RFC 9068: iss, sub, aud, exp, iat,
  nbf): Dovecot's oauth2 passdb validates them locally with `validation_keys()`;
- token introspection (RFC 7662, `/introspect`), for a Dovecot that asks instead;
- faults: an RFC 6749 §5.2 error or an HTTP status for the next requests, and a stall.

Every request is recorded with its headers (a test checks it was MSAL that asked).
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import hashlib
import json
import secrets
import ssl
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.servers.dovecot import OAuth2Passdb
from tests.servers.tls import TestCA, make_ca

JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
CLIENT_ASSERTION = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
GOOGLE_AUDIENCE = "https://oauth2.googleapis.com/token"
# The `aud` of the access tokens: the mail servers they are for (Exchange Online's own is
# `https://outlook.office365.com`). Dovecot checks it as its `client_id`.
MAIL_AUDIENCE = "https://outlook.office365.com"
STALL_LIMIT = 30.0  # a stalled request gives up by itself, so no test can hang on it


@dataclass(frozen=True, slots=True, kw_only=True)
class Recorded:
    method: str
    path: str
    headers: Mapping[str, str]
    form: Mapping[str, str]
    query: Mapping[str, str] = field(default_factory=dict)


@dataclass(slots=True, kw_only=True)
class Client:
    client_id: str
    secret: str | None = None
    certificate_pem: bytes | None = None  # the public certificate a client assertion matches
    mailbox: str = ""  # what an app token may open (Add-MailboxPermission)


@dataclass(slots=True, kw_only=True)
class ServiceAccount:
    client_email: str
    public_key_pem: bytes
    subjects: frozenset[str]  # domain-wide delegation: the mailboxes it may act as


@dataclass(slots=True, kw_only=True)
class Issued:
    user: str
    client_id: str
    expires_at: float
    scope: str


@dataclass(slots=True)
class _Fault:
    status: int
    error: str | None
    remaining: int


@dataclass(slots=True, kw_only=True)
class _Code:
    client_id: str
    redirect_uri: str
    challenge: str
    nonce: str
    user: str
    tenant: str


@dataclass(slots=True, kw_only=True)
class _RefreshToken:
    family: str
    user: str
    client_id: str
    spent: bool = False


class TokenServer:
    """One server on a free loopback port; `url` is its base (the MSAL authority)."""

    def __init__(self, base_dir: Path, *, tls: TestCA | None = None) -> None:
        self.tls = tls or make_ca(base_dir / "token-tls")
        self.ca_file = self.tls.ca_file
        self.tenants: set[str] = {"contoso.example"}
        self.clients: dict[str, Client] = {}
        self.service_accounts: dict[str, ServiceAccount] = {}
        # The provider decides how long its access tokens live (Microsoft: 60-90 minutes,
        # Google: an hour); a test may issue short-lived ones, as a provider may.
        self.expires_in = 3600
        self.audience = MAIL_AUDIENCE  # another: tokens for another API (Microsoft Graph)
        self._signing_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.key_id = "relay-test-" + secrets.token_hex(4)
        self.delay = 0.0  # seconds each token request takes: a slow endpoint
        self.rotate = True
        self.requests: list[Recorded] = []
        self._issued: dict[str, Issued] = {}
        self._refresh: dict[str, _RefreshToken] = {}
        self._codes: dict[str, _Code] = {}
        self.consenting_user = ""  # who signs in at /authorize; "" refuses (access_denied)
        self._revoked_families: set[str] = set()
        self._faults: list[_Fault] = []
        self._stalled = threading.Event()
        self._stalled.set()
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(str(self.tls.cert_file), str(self.tls.key_file))
        self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
        self.port: int = self._server.server_address[1]
        self.url = f"https://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    # --- set-up ------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stalled.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    @property
    def authorize_url(self) -> str:
        """The authorization endpoint of Google's and a generic provider's sign-in."""
        return f"{self.url}/authorize"

    def token_url(self, tenant: str | None = None) -> str:
        if tenant is None:
            return f"{self.url}/token"
        return f"{self.url}/{tenant}/oauth2/v2.0/token"

    @property
    def introspection_url(self) -> str:
        return f"{self.url}/introspect"

    @property
    def issuer(self) -> str:
        """The `iss` of every access token."""
        return self.url

    def validation_keys(self) -> dict[str, str]:
        """The public key that checks the access tokens' signatures, keyed as Dovecot's
        `local_validation_key_dict` looks it up: `<azp>/<alg>/<kid>` (no `azp` claim:
        `default`)."""
        public = self._signing_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return {f"default/RS256/{self.key_id}": public.decode()}

    def dovecot_passdb(
        self, *, local: bool = True, mechanisms: str = "xoauth2 oauthbearer"
    ) -> OAuth2Passdb:
        """Dovecot's oauth2 passdb for this server's tokens: validating each locally (the
        signature with `validation_keys()`, expiry, issuer and audience), or with
        `local=False` asking `/introspect` about each (which also sees
        `expire_access_tokens`)."""
        if not local:
            return OAuth2Passdb(
                ca_file=self.ca_file,
                introspection_url=self.introspection_url,
                mechanisms=mechanisms,
            )
        return OAuth2Passdb(
            ca_file=self.ca_file,
            validation_keys=self.validation_keys(),
            issuers=(self.issuer,),
            audience=MAIL_AUDIENCE,
            mechanisms=mechanisms,
        )

    def add_client(
        self,
        client_id: str,
        *,
        secret: str | None = None,
        certificate_pem: bytes | None = None,
        mailbox: str = "",
    ) -> Client:
        client = Client(
            client_id=client_id, secret=secret, certificate_pem=certificate_pem, mailbox=mailbox
        )
        self.clients[client_id] = client
        return client

    def add_service_account(self, *, subjects: frozenset[str]) -> dict[str, str]:
        """A new service account; returns its JSON key as Google's console gives it."""
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        email = f"relay-{secrets.token_hex(4)}@project.iam.gserviceaccount.com"
        self.service_accounts[email] = ServiceAccount(
            client_email=email,
            public_key_pem=key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            ),
            subjects=subjects,
        )
        private_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode()
        return {
            "type": "service_account",
            "project_id": "project",
            "private_key_id": secrets.token_hex(20),
            "private_key": private_pem,
            "client_email": email,
            "client_id": str(secrets.randbelow(10**20)),
            "token_uri": self.token_url(),
        }

    def issue_refresh_token(self, *, user: str, client_id: str) -> str:
        """A refresh token as a user's consent (`oauth login`) would leave it."""
        return self._new_refresh(family=secrets.token_hex(8), user=user, client_id=client_id)

    def revoke_all(self) -> None:
        """As an administrator revoking the user's sessions: every grant is gone."""
        with self._lock:
            self._revoked_families |= {token.family for token in self._refresh.values()}

    def access_token(
        self, *, user: str, client_id: str, scope: str, issued_at: float | None = None
    ) -> str:
        """An access token as the token endpoint would have issued it at `issued_at`
        (default now), e.g. two hours ago: one that has expired."""
        return str(
            self._access(user=user, client_id=client_id, scope=scope, now=issued_at)["access_token"]
        )

    def expire_access_tokens(self) -> None:
        """As when an hour has passed, for the servers that ask this one: every access
        token issued so far stops working (introspection calls it inactive, and so does
        `is_valid`); refresh tokens stay good. A Dovecot validating locally reads the
        expiry from the token itself and is not told."""
        with self._lock:
            for token, issued in self._issued.items():
                self._issued[token] = dataclasses.replace(issued, expires_at=time.time())

    # --- faults ------------------------------------------------------------------

    def fail_next(self, *, error: str | None = None, status: int = 400, count: int = 1) -> None:
        """The next `count` token requests answer `status`, with an RFC 6749 §5.2 body
        when `error` is given (else a plain-text page)."""
        with self._lock:
            self._faults.append(_Fault(status=status, error=error, remaining=count))

    @contextlib.contextmanager
    def stalled(self) -> Iterator[None]:
        """Token requests hang (up to STALL_LIMIT) until the block ends."""
        self._stalled.clear()
        try:
            yield
        finally:
            self._stalled.set()

    # --- what happened -----------------------------------------------------------

    def token_requests(self) -> list[Recorded]:
        return [item for item in self.requests if item.method == "POST" and "token" in item.path]

    def is_valid(self, access_token: str) -> bool:
        issued = self._issued.get(access_token)
        return issued is not None and issued.expires_at > time.time()

    def handed_out(self) -> set[str]:
        """Every access and refresh token this server issued."""
        with self._lock:
            return set(self._issued) | set(self._refresh)

    def issued(self, access_token: str) -> Issued | None:
        return self._issued.get(access_token)

    # --- the protocol ------------------------------------------------------------

    def handle(
        self, method: str, path: str, query: Mapping[str, str], form: Mapping[str, str]
    ) -> tuple[int, dict[str, Any] | str]:
        parts = [part for part in path.split("/") if part]
        if method == "GET" and parts == ["common", "discovery", "instance"]:
            return self._instance_discovery(query)
        if (
            method == "GET"
            and len(parts) == 4
            and parts[1:]
            == [
                "v2.0",
                ".well-known",
                "openid-configuration",
            ]
        ):
            return self._openid_configuration(parts[0])
        if method == "GET" and len(parts) == 4 and parts[1:] == ["oauth2", "v2.0", "authorize"]:
            return self._authorize(parts[0], query)
        if method == "GET" and parts == ["authorize"]:  # Google's and a generic provider's
            return self._authorize("", query)
        if method == "POST" and parts == ["introspect"]:
            return 200, self._introspect(form)
        if method == "POST" and (parts == ["token"] or parts[1:] == ["oauth2", "v2.0", "token"]):
            self._stalled.wait(STALL_LIMIT)
            if self.delay:
                time.sleep(self.delay)  # the slow endpoint itself, not a test's wait
            fault = self._take_fault()
            if fault is not None:
                if fault.error is None:
                    return fault.status, "<html>Service Unavailable</html>"
                return fault.status, _error(fault.error, "injected by the test")
            tenant = parts[0] if parts != ["token"] else None
            if tenant is not None and tenant not in self.tenants:
                return 400, _error("invalid_request", f"AADSTS90002: Tenant '{tenant}' not found.")
            return self._token(form, endpoint=self.token_url(tenant))
        return 404, _error("invalid_request", "no such endpoint")

    def _instance_discovery(self, query: Mapping[str, str]) -> tuple[int, dict[str, Any]]:
        # MSAL asks about `https://host/{tenant}/oauth2/v2.0/authorize` and follows
        # `tenant_discovery_endpoint`; `metadata` lists the host's aliases (none here).
        authorize = urlsplit(query.get("authorization_endpoint", ""))
        tenant = (authorize.path.strip("/").split("/") or ["common"])[0]
        # MSAL names the instance by its host name alone (it drops the port).
        host = f"127.0.0.1:{self.port}"
        if authorize.hostname != "127.0.0.1":
            return 400, _error("invalid_instance", "not this authority")
        return 200, {
            "tenant_discovery_endpoint": (
                f"{self.url}/{tenant}/v2.0/.well-known/openid-configuration"
            ),
            "api-version": "1.1",
            "metadata": [{"preferred_network": host, "preferred_cache": host, "aliases": [host]}],
        }

    def _openid_configuration(self, tenant: str) -> tuple[int, dict[str, Any]]:
        if tenant not in self.tenants:
            return 400, _error("invalid_tenant", f"AADSTS90002: Tenant '{tenant}' not found.")
        base = f"{self.url}/{tenant}"
        return 200, {
            "issuer": f"{base}/v2.0",
            "authorization_endpoint": f"{base}/oauth2/v2.0/authorize",
            "token_endpoint": f"{base}/oauth2/v2.0/token",
            "device_authorization_endpoint": f"{base}/oauth2/v2.0/devicecode",
            "jwks_uri": f"{base}/discovery/v2.0/keys",
            "response_types_supported": ["code"],
            "subject_types_supported": ["pairwise"],
            "id_token_signing_alg_values_supported": ["RS256"],
            "token_endpoint_auth_methods_supported": ["client_secret_post", "private_key_jwt"],
        }

    def _authorize(self, tenant: str, query: Mapping[str, str]) -> tuple[int, dict[str, Any]]:
        """The sign-in page, with a user who consents at once (or refuses): a 302 back to
        redirect_uri with the code and the state (RFC 6749 §4.1.2). PKCE S256 required."""
        redirect = query.get("redirect_uri", "")
        client = self.clients.get(query.get("client_id", ""))
        if client is None or not redirect.startswith(("http://localhost:", "http://127.0.0.1:")):
            return 400, _error("invalid_request", "AADSTS50011: redirect URI mismatch.")
        if query.get("code_challenge_method") != "S256" or not query.get("code_challenge"):
            return 400, _error("invalid_request", "AADSTS501491: PKCE is required.")
        state = query.get("state", "")
        if not self.consenting_user:
            return 302, {"location": f"{redirect}?error=access_denied&state={state}"}
        code = "code-" + secrets.token_urlsafe(16)
        with self._lock:
            self._codes[code] = _Code(
                client_id=client.client_id,
                redirect_uri=redirect,
                challenge=query["code_challenge"],
                nonce=query.get("nonce", ""),
                user=self.consenting_user,
                tenant=tenant,
            )
        return 302, {"location": f"{redirect}?code={code}&state={state}"}

    def _code_grant(self, form: Mapping[str, str], client: Client) -> tuple[int, dict[str, Any]]:
        with self._lock:
            code = self._codes.pop(form.get("code", ""), None)  # a code works once
        if code is None or code.client_id != client.client_id:
            return 400, _error("invalid_grant", "AADSTS70008: the code has expired.")
        if form.get("redirect_uri") != code.redirect_uri:
            return 400, _error("invalid_grant", "AADSTS50011: redirect URI mismatch.")
        verifier = form.get("code_verifier", "")
        digest = hashlib.sha256(verifier.encode()).digest()
        if base64.urlsafe_b64encode(digest).rstrip(b"=").decode() != code.challenge:
            return 400, _error("invalid_grant", "AADSTS501481: the code_verifier does not match.")
        answer = self._access(
            user=code.user, client_id=client.client_id, scope=form.get("scope", "")
        )
        answer["refresh_token"] = self.issue_refresh_token(
            user=code.user, client_id=client.client_id
        )
        now = int(time.time())
        # MSAL checks the ID token's iss, aud, exp and nonce (not its signature).
        answer["id_token"] = jwt.encode(
            {
                "iss": f"{self.url}/{code.tenant}/v2.0",
                "aud": client.client_id,
                "sub": code.user,
                "preferred_username": code.user,
                "nonce": code.nonce,
                "iat": now,
                "exp": now + 3600,
            },
            "id-token-signing-key-of-the-test-server",
            algorithm="HS256",
        )
        return 200, answer

    def _introspect(self, form: Mapping[str, str]) -> dict[str, Any]:
        issued = self._issued.get(form.get("token", ""))
        if issued is None or issued.expires_at <= time.time():
            return {"active": False}
        return {
            "active": True,
            "username": issued.user,
            "client_id": issued.client_id,
            "scope": issued.scope,
            "exp": int(issued.expires_at),
        }

    def _token(self, form: Mapping[str, str], *, endpoint: str) -> tuple[int, dict[str, Any]]:
        grant_type = form.get("grant_type", "")
        if grant_type == JWT_BEARER:
            return self._jwt_bearer(form)
        client = self._authenticate(form, endpoint=endpoint)
        if client is None:
            return 401, _error("invalid_client", "AADSTS7000215: Invalid client secret provided.")
        scope = form.get("scope", "")
        if grant_type == "client_credentials":
            return 200, self._access(user=client.mailbox, client_id=client.client_id, scope=scope)
        if grant_type == "refresh_token":
            return self._refresh_grant(form.get("refresh_token", ""), client, scope)
        if grant_type == "authorization_code":
            return self._code_grant(form, client)
        return 400, _error("unsupported_grant_type", f"{grant_type!r} is not supported")

    def _authenticate(self, form: Mapping[str, str], *, endpoint: str) -> Client | None:
        client = self.clients.get(form.get("client_id", ""))
        if client is None:
            return None
        if "client_assertion" in form:
            if form.get("client_assertion_type") != CLIENT_ASSERTION:
                return None
            if client.certificate_pem is None:
                return None
            public_key = x509.load_pem_x509_certificate(client.certificate_pem).public_key()
            try:
                claims = jwt.decode(
                    form["client_assertion"],
                    public_key,  # type: ignore[arg-type]
                    algorithms=["PS256", "RS256"],
                    audience=endpoint,
                    issuer=client.client_id,
                )
            except jwt.PyJWTError:
                return None
            return client if claims.get("sub") == client.client_id else None
        if client.secret is None:
            return client  # a public client: no secret expected
        given = form.get("client_secret", "")
        return client if secrets.compare_digest(given, client.secret) else None

    def _jwt_bearer(self, form: Mapping[str, str]) -> tuple[int, dict[str, Any]]:
        assertion = form.get("assertion", "")
        try:
            unverified = jwt.decode(assertion, options={"verify_signature": False})
        except jwt.PyJWTError:
            return 400, _error("invalid_grant", "Invalid JWT.")
        account = self.service_accounts.get(str(unverified.get("iss", "")))
        if account is None:
            return 401, _error("invalid_client", "The OAuth client was not found.")
        try:
            # google-auth always names Google's token endpoint as the audience, whatever
            # token_uri it posts to (google/oauth2/service_account.py); Google checks it.
            claims = jwt.decode(
                assertion, account.public_key_pem, algorithms=["RS256"], audience=GOOGLE_AUDIENCE
            )
        except jwt.PyJWTError:
            return 400, _error("invalid_grant", "Invalid JWT Signature.")
        subject = str(claims.get("sub", ""))
        if subject not in account.subjects:
            return 401, _error(
                "unauthorized_client",
                "Client is unauthorized to retrieve access tokens using this method.",
            )
        return 200, self._access(
            user=subject, client_id=account.client_email, scope=str(claims.get("scope", ""))
        )

    def _refresh_grant(
        self, refresh_token: str, client: Client, scope: str
    ) -> tuple[int, dict[str, Any]]:
        with self._lock:
            record = self._refresh.get(refresh_token)
            if record is None or record.client_id != client.client_id:
                return 400, _error("invalid_grant", "AADSTS9002313: Invalid request.")
            if record.family in self._revoked_families:
                return 400, _error("invalid_grant", "AADSTS50173: The grant was revoked.")
            if record.spent:
                # Reuse of a rotated token: someone else may hold the family; end it.
                self._revoked_families.add(record.family)
                return 400, _error(
                    "invalid_grant", "AADSTS70000: The refresh token was already used."
                )
            if self.rotate:
                record.spent = True
        answer = self._access(user=record.user, client_id=client.client_id, scope=scope)
        if self.rotate:
            answer["refresh_token"] = self._new_refresh(
                family=record.family, user=record.user, client_id=client.client_id
            )
        return 200, answer

    def _new_refresh(self, *, family: str, user: str, client_id: str) -> str:
        token = "rt-" + secrets.token_urlsafe(24)
        with self._lock:
            self._refresh[token] = _RefreshToken(family=family, user=user, client_id=client_id)
        return token

    def _access(
        self, *, user: str, client_id: str, scope: str, now: float | None = None
    ) -> dict[str, Any]:
        issued_at = int(time.time() if now is None else now)
        expires_at = issued_at + self.expires_in
        claims = {
            "iss": self.issuer,
            "sub": user,
            "aud": self.audience,
            "exp": expires_at,
            "iat": issued_at,
            "nbf": issued_at,
            "jti": secrets.token_hex(8),
            "client_id": client_id,
            "scp": scope,  # Microsoft's name for the granted scopes
        }
        token = jwt.encode(
            claims, self._signing_key, algorithm="RS256", headers={"kid": self.key_id}
        )
        with self._lock:
            self._issued[token] = Issued(
                user=user, client_id=client_id, expires_at=expires_at, scope=scope
            )
        # RFC 6749 §5.1: token_type and expires_in; the scope granted.
        return {
            "access_token": token,
            "token_type": "Bearer",
            "expires_in": self.expires_in,
            "scope": scope,
        }

    def _take_fault(self) -> _Fault | None:
        with self._lock:
            if not self._faults:
                return None
            fault = self._faults[0]
            fault.remaining -= 1
            if fault.remaining <= 0:
                self._faults.pop(0)
            return fault


def _error(code: str, description: str) -> dict[str, Any]:
    # RFC 6749 §5.2: `error` is required, `error_description` optional, both ASCII.
    return {"error": code, "error_description": description}


def _handler(server: TokenServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            """Quiet: pytest shows the test's own output."""

        def do_GET(self) -> None:
            self._serve("GET", {})

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length).decode("utf-8", "replace")
            form = {key: values[0] for key, values in parse_qs(body).items()}
            self._serve("POST", form)

        def _serve(self, method: str, form: dict[str, str]) -> None:
            split = urlsplit(self.path)
            query = {key: values[0] for key, values in parse_qs(split.query).items()}
            server.requests.append(
                Recorded(
                    method=method,
                    path=split.path,
                    headers={key.lower(): value for key, value in self.headers.items()},
                    form=form,
                    query=query,
                )
            )
            status, answer = server.handle(method, split.path, query, form)
            if status == 302 and isinstance(answer, dict):
                self.send_response(302)
                self.send_header("Location", answer["location"])
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            if isinstance(answer, str):
                payload, kind = answer.encode(), "text/html"
            else:
                payload, kind = json.dumps(answer).encode(), "application/json;charset=UTF-8"
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(payload)))
            # RFC 6749 §5.1: token answers must not be cached.
            self.send_header("Cache-Control", "no-store")
            self.send_header("Pragma", "no-cache")
            self.end_headers()
            self.wfile.write(payload)

    return Handler


@contextlib.contextmanager
def running_token_server(base_dir: Path, *, tls: TestCA | None = None) -> Iterator[TokenServer]:
    server = TokenServer(base_dir, tls=tls)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@dataclass(slots=True)
class ClientCertificate:
    """A self-signed certificate and key for the app flow, as one PEM file."""

    pem_file: Path
    certificate_pem: bytes = field(repr=False)


def make_client_certificate(directory: Path) -> ClientCertificate:
    import datetime as _dt

    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "invoice-relay test app")])
    now = _dt.datetime.now(_dt.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _dt.timedelta(minutes=1))
        .not_valid_after(now + _dt.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    certificate_pem = certificate.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    directory.mkdir(parents=True, exist_ok=True)
    pem_file = directory / "app-cert.pem"
    pem_file.write_bytes(certificate_pem + key_pem)
    pem_file.chmod(0o600)
    return ClientCertificate(pem_file=pem_file, certificate_pem=certificate_pem)
