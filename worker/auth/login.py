"""`invoice-relay oauth login`: the authorization code flow with PKCE and `state`.

Microsoft's goes through MSAL, which makes the authorization URL with PKCE (S256) and a
random `state` and `nonce`, and on the way back checks the state, sends the code
verifier, and checks the ID token's issuer, audience, expiry and nonce; the relay only
carries the redirected URL's query from the browser (or from a person pasting it) back
to MSAL. Google's and a generic provider's (`CodeLogin`) are RFC 6749 §4.1 with RFC
7636's S256 challenge: one URL and one form POST, like the refresh grant next to it
(worker.auth.google); google-auth has no such flow without a further library, and the
parts that are easy to get wrong are a random verifier and a constant-time comparison
of the state, both from `secrets`.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import warnings
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any, Protocol
from urllib.parse import parse_qsl, urlencode, urlsplit

import httpx

from worker.auth.google import token_request
from worker.auth.grants import Deadline, Grant
from worker.auth.http import MsalHttp, host_of
from worker.auth.microsoft import DELEGATED_SCOPES, MicrosoftClient, MicrosoftDelegated
from worker.errors import OAuthLoginRefused


def redirected_query(url_or_query: str) -> dict[str, str]:
    """The parameters of a redirected URL (or of its query alone), as pasted by a person."""
    text = url_or_query.strip()
    query = urlsplit(text).query if "://" in text else text.lstrip("?")
    return dict(parse_qsl(query, keep_blank_values=True))


GOOGLE_AUTHORIZE_URL = "https://accounts.google.com/o/oauth2/v2/auth"
# Google gives a refresh token only for offline access, and again only when asked to
# show the consent screen.
GOOGLE_PARAMETERS = {"access_type": "offline", "prompt": "consent"}


class SignIn(Protocol):
    """One sign-in: `start` gives the URL to open, `finish` takes the redirect's query."""

    def start(self, *, redirect_uri: str, deadline: Deadline) -> str: ...

    def finish(self, response: Mapping[str, str], deadline: Deadline) -> Grant: ...


class CodeLogin:
    """RFC 6749 §4.1 with PKCE S256 (RFC 7636 §4.2) and `state`, for Google and generic
    providers."""

    def __init__(
        self,
        http: httpx.Client,
        *,
        authorize_url: str,
        token_url: str,
        client_id: str,
        client_secret: str | None,
        scopes: tuple[str, ...],
        route: str,
        clock: Callable[[], datetime],
        parameters: Mapping[str, str] | None = None,
    ) -> None:
        self._http = http
        self._authorize_url = authorize_url
        self._token_url = token_url
        self._client_id = client_id
        self._client_secret = client_secret
        self._scopes = scopes
        self._route = route
        self._clock = clock
        self._parameters = dict(parameters or {})
        self._verifier = secrets.token_urlsafe(64)  # 86 characters: RFC 7636 asks 43-128
        self._state = secrets.token_urlsafe(24)
        self._redirect_uri: str | None = None

    def start(self, *, redirect_uri: str, deadline: Deadline) -> str:
        del deadline  # nothing is asked before the person signs in
        self._redirect_uri = redirect_uri
        digest = hashlib.sha256(self._verifier.encode("ascii")).digest()
        query = {
            "response_type": "code",
            "client_id": self._client_id,
            "redirect_uri": redirect_uri,
            "state": self._state,
            "code_challenge": base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii"),
            "code_challenge_method": "S256",
            **self._parameters,
        }
        if self._scopes:
            query["scope"] = " ".join(self._scopes)
        separator = "&" if urlsplit(self._authorize_url).query else "?"
        return f"{self._authorize_url}{separator}{urlencode(query)}"

    def finish(self, response: Mapping[str, str], deadline: Deadline) -> Grant:
        if self._redirect_uri is None:
            raise RuntimeError("finish() before start()")
        endpoint = host_of(self._authorize_url)
        if "error" in response:
            raise OAuthLoginRefused(
                f"the sign-in ended with {response['error'][:40]}",
                endpoint=endpoint,
                route=self._route,
            )
        if not secrets.compare_digest(response.get("state", ""), self._state):
            raise OAuthLoginRefused(
                "the redirected URL does not belong to this sign-in (its state differs)",
                endpoint=endpoint,
                route=self._route,
            )
        form = {
            "grant_type": "authorization_code",
            "code": response.get("code", ""),
            "redirect_uri": self._redirect_uri,
            "client_id": self._client_id,
            "code_verifier": self._verifier,
        }
        if self._client_secret is not None:
            form["client_secret"] = self._client_secret
        return token_request(
            self._http,
            self._token_url,
            form,
            deadline=deadline,
            client_id=self._client_id,
            route=self._route,
            now=self._clock(),
        )


class MicrosoftLogin(MicrosoftDelegated):
    """One sign-in: `start` gives the URL to open, `finish` takes the redirect's query."""

    def __init__(
        self,
        client: MicrosoftClient,
        http: httpx.Client,
        *,
        route: str,
        clock: Callable[[], datetime],
        scopes: tuple[str, ...] = DELEGATED_SCOPES,
    ) -> None:
        super().__init__(client, http, route=route, clock=clock, scopes=scopes)
        self._flow: dict[str, Any] | None = None
        self._application_for_flow: Any = None
        self._transport: MsalHttp | None = None

    def start(self, *, redirect_uri: str, deadline: Deadline) -> str:
        self._transport = MsalHttp(self._http, deadline)
        with self._metadata_lock:
            application = self._application(deadline, self._transport)
            with self._translated(), warnings.catch_warnings():
                # MSAL recommends response_mode=form_post. The query mode is kept on
                # purpose: a person on a headless machine pastes the redirected address,
                # which only the query mode gives; the code in it is worthless without
                # the PKCE verifier, which never leaves this process.
                warnings.filterwarnings("ignore", message="response_mode='form_post'")
                flow = application.initiate_auth_code_flow(
                    list(self._scopes), redirect_uri=redirect_uri, prompt="select_account"
                )
        self._flow = flow
        # The same application finishes the flow: its metadata is the one the URL used.
        self._application_for_flow = application
        return str(flow["auth_uri"])

    def finish(self, response: Mapping[str, str], deadline: Deadline) -> Grant:
        if self._flow is None or self._application_for_flow is None or self._transport is None:
            raise RuntimeError("finish() before start()")
        endpoint = self._client.authority
        if "error" in response:
            raise OAuthLoginRefused(
                f"the sign-in ended with {response['error'][:40]}",
                endpoint=endpoint,
                route=self._route,
            )
        application = self._application_for_flow
        # The code's redemption gets its own time, not what is left after the person's.
        self._transport.budget = deadline
        now = self._clock()
        try:
            with self._translated():
                answer = application.acquire_token_by_auth_code_flow(self._flow, dict(response))
        except ValueError as exc:  # MSAL: state mismatch, or a flow already used
            raise OAuthLoginRefused(
                "the redirected URL does not belong to this sign-in (its state differs)",
                endpoint=endpoint,
                route=self._route,
            ) from exc
        return self._result(answer, now)
