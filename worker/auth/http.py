"""HTTP for the token endpoints: one httpx client, INVOICE_RELAY_CA_FILE trusted in addition
to the system store, every request bounded by what is left of INVOICE_RELAY_TIMEOUT.

MSAL and google-auth each bring their own idea of a transport (a requests-like session;
`google.auth.transport.Request`). Both are given adapters over the same client, so the
same trust, the same bound and the same error translation apply to every flow. httpx
errors are translated here, once, into `TokenEndpointError`.
"""

from __future__ import annotations

import ssl
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import google.auth.exceptions
import google.auth.transport
import httpx

from worker.auth.grants import Deadline
from worker.errors import TokenEndpointError


def make_client(*, ca_file: Path | None) -> httpx.Client:
    """A client that trusts the system store plus `ca_file`, never anything less."""
    context = ssl.create_default_context()
    if ca_file is not None:
        context.load_verify_locations(cafile=str(ca_file))
    # Redirects are not followed: a token endpoint that redirects a POST with a secret
    # in its body is misconfigured, and following it would send the secret elsewhere.
    return httpx.Client(verify=context, follow_redirects=False, trust_env=False)


def host_of(url: str) -> str:
    """The part of an endpoint's URL an error may name: never a path or a query."""
    parts = urlsplit(url)
    return parts.netloc.rpartition("@")[2] or url[:40]


@dataclass(slots=True, kw_only=True)
class TimeBudget:
    """INVOICE_RELAY_TIMEOUT for one token request, however many HTTP requests it takes
    (MSAL fetches metadata first; google-auth retries a 500 with a backoff)."""

    seconds: float
    clock: Callable[[], float] = time.monotonic
    _started: float = field(default=-1.0)

    def __post_init__(self) -> None:
        self._started = self.clock()

    def remaining(self) -> float:
        return self.seconds - (self.clock() - self._started)


@contextmanager
def translated(url: str) -> Iterator[None]:
    """httpx failures as `TokenEndpointError` naming the host (never the URL's query)."""
    endpoint = host_of(url)
    try:
        yield
    except httpx.TimeoutException as exc:
        raise TokenEndpointError("no answer in time", endpoint=endpoint) from exc
    except httpx.HTTPError as exc:
        raise TokenEndpointError(type(exc).__name__, endpoint=endpoint) from exc


def _bounded(budget: Deadline, url: str) -> httpx.Timeout:
    left = budget.remaining()
    if left <= 0:
        raise TokenEndpointError("no answer in time", endpoint=host_of(url))
    return httpx.Timeout(left)


class MsalHttp:
    """The `http_client` MSAL accepts ("same signature as requests.Session" for get and
    post): httpx's `get`/`post` take the same keywords MSAL passes (params, data,
    headers), and httpx responses have the status_code, text, headers and
    raise_for_status MSAL reads."""

    def __init__(self, client: httpx.Client, budget: Deadline) -> None:
        self._client = client
        self.budget = budget  # replaceable: a sign-in's two halves each get their own

    def get(self, url: str, **kwargs: Any) -> httpx.Response:
        kwargs.pop("timeout", None)  # ours bounds the whole request
        with translated(url):
            return self._client.get(url, timeout=_bounded(self.budget, url), **kwargs)

    def post(self, url: str, **kwargs: Any) -> httpx.Response:
        kwargs.pop("timeout", None)
        data = kwargs.get("data")
        if isinstance(data, Mapping):
            # MSAL hands the client assertion over as bytes; requests form-encodes bytes
            # as their text, httpx as their repr ("b'...'"): give httpx text.
            kwargs["data"] = {
                key: value.decode("ascii") if isinstance(value, bytes) else value
                for key, value in data.items()
            }
        with translated(url):
            return self._client.post(url, timeout=_bounded(self.budget, url), **kwargs)

    def close(self) -> None:
        """MSAL may call it; the client belongs to the token source, which closes it."""


class _GoogleResponse(google.auth.transport.Response):
    def __init__(self, response: httpx.Response) -> None:
        self._response = response

    @property
    def status(self) -> int:
        return self._response.status_code

    @property
    def headers(self) -> Mapping[str, str]:
        return self._response.headers

    @property
    def data(self) -> bytes:
        return self._response.content


class GoogleRequest(google.auth.transport.Request):
    """`google.auth.transport.Request` over httpx. google-auth expects its own
    TransportError from a transport; the translation to ours happens in worker.auth.google."""

    def __init__(self, client: httpx.Client, budget: Deadline) -> None:
        self._client = client
        self._budget = budget

    def __call__(
        self,
        url: str,
        method: str = "GET",
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: float | None = None,
        **kwargs: Any,
    ) -> google.auth.transport.Response:
        try:
            with translated(url):
                response = self._client.request(
                    method,
                    url,
                    content=body,
                    headers=dict(headers or {}),
                    timeout=_bounded(self._budget, url),
                )
        except TokenEndpointError as exc:
            raise google.auth.exceptions.TransportError(str(exc)) from exc  # type: ignore[no-untyped-call]
        return _GoogleResponse(response)
