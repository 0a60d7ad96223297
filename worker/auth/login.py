"""`invoice-relay oauth login` for Microsoft: the authorization code flow through MSAL.

MSAL makes the authorization URL with PKCE (S256) and a random `state` and `nonce`,
and on the way back checks the state, sends the code verifier, and checks the ID
token's issuer, audience, expiry and nonce; the relay only carries the redirected URL's
query from the browser (or from a person pasting it) back to MSAL.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import httpx

from worker.auth.grants import Deadline, Grant
from worker.auth.http import MsalHttp
from worker.auth.microsoft import DELEGATED_SCOPES, MicrosoftClient, MicrosoftDelegated
from worker.errors import OAuthLoginRefused


def redirected_query(url_or_query: str) -> dict[str, str]:
    """The parameters of a redirected URL (or of its query alone), as pasted by a person."""
    text = url_or_query.strip()
    query = urlsplit(text).query if "://" in text else text.lstrip("?")
    return dict(parse_qsl(query, keep_blank_values=True))


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
