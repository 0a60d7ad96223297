"""The cached token source over a real SQLite store: reuse, refresh, rotation, sealing."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tests.fakes import FakeGrantor
from worker.auth.cache import REFRESH_MARGIN, StoredTokenSource
from worker.auth.crypto import Sealer, read_key_file
from worker.errors import ConfigError, OAuthLoginRefused, StoreError
from worker.store import engine as store_engine
from worker.store.tokens import TokenStore
from worker.tokens import OAuthProvider, StoredToken, TokenIdentity

IDENTITY = TokenIdentity(
    provider=OAuthProvider.MICROSOFT,
    tenant="contoso.example",
    client_id="app-1",
    user="invoices@shop.example",
)


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def db_file(tmp_path: Path) -> Path:
    return tmp_path / "relay.db"


@pytest.fixture
def rows(db_file: Path) -> Iterator[TokenStore]:
    engine = store_engine.make_engine(f"sqlite:///{db_file}")
    store_engine.create_schema(engine)
    yield TokenStore(engine)
    engine.dispose()


@pytest.fixture
def sealer() -> Sealer:
    return Sealer(b"0123456789abcdef0123456789abcdef-test-key")


def source(
    rows: TokenStore,
    sealer: Sealer,
    grantor: FakeGrantor,
    clock: Clock,
    *,
    configured: str | None = "rt-configured",
) -> StoredTokenSource:
    grantor.now = clock
    return StoredTokenSource(
        identity=IDENTITY,
        grantor=grantor,
        rows=rows,
        sealer=sealer,
        timeout_seconds=5.0,
        configured_refresh_token=configured,
        clock=clock,
    )


def test_an_access_token_is_reused_until_shortly_before_it_expires(
    rows: TokenStore, sealer: Sealer
) -> None:
    clock, grantor = Clock(), FakeGrantor(lifetime_seconds=3600)
    tokens = source(rows, sealer, grantor, clock)
    first = tokens.access_token()
    clock.now += timedelta(seconds=3600) - REFRESH_MARGIN - timedelta(seconds=1)
    assert tokens.access_token() == first
    clock.now += timedelta(seconds=2)
    second = tokens.access_token()
    assert second.value != first.value
    assert len(grantor.spent) == 2


def test_a_short_lived_token_is_kept_for_half_its_life(rows: TokenStore, sealer: Sealer) -> None:
    clock, grantor = Clock(), FakeGrantor(lifetime_seconds=300)  # shorter than the margin
    tokens = source(rows, sealer, grantor, clock)
    first = tokens.access_token()
    clock.now += timedelta(seconds=149)
    assert tokens.access_token() == first
    clock.now += timedelta(seconds=2)
    assert tokens.access_token() != first
    assert len(grantor.spent) == 2


def test_a_rotated_refresh_token_is_saved_and_spent_next(rows: TokenStore, sealer: Sealer) -> None:
    clock, grantor = Clock(), FakeGrantor(lifetime_seconds=60)
    tokens = source(rows, sealer, grantor, clock)
    for _ in range(3):
        tokens.access_token()
        clock.now += timedelta(minutes=10)
    assert grantor.spent == ["rt-configured", "rt-fake-1", "rt-fake-2"]


def test_another_process_sees_the_stored_token(rows: TokenStore, sealer: Sealer) -> None:
    clock, grantor = Clock(), FakeGrantor()
    first = source(rows, sealer, grantor, clock).access_token()
    again = source(rows, sealer, grantor, clock).access_token()
    assert again == first
    assert len(grantor.spent) == 1


def test_a_refused_token_is_replaced_once_and_others_are_kept(
    rows: TokenStore, sealer: Sealer
) -> None:
    clock, grantor = Clock(), FakeGrantor()
    tokens = source(rows, sealer, grantor, clock)
    first = tokens.access_token()
    fresh = tokens.access_token(refused=first)
    assert fresh.value != first.value
    # Refusing the old one again (a second connection, late) does not refresh again.
    assert tokens.access_token(refused=first) == fresh
    assert len(grantor.spent) == 2


def test_a_new_configured_refresh_token_replaces_the_stored_one(
    rows: TokenStore, sealer: Sealer
) -> None:
    clock, grantor = Clock(), FakeGrantor(lifetime_seconds=60)
    source(rows, sealer, grantor, clock, configured="rt-old").access_token()
    clock.now += timedelta(minutes=10)
    source(rows, sealer, grantor, clock, configured="rt-old").access_token()
    clock.now += timedelta(minutes=10)
    source(rows, sealer, grantor, clock, configured="rt-new").access_token()
    clock.now += timedelta(minutes=10)
    source(rows, sealer, grantor, clock, configured="rt-new").access_token()
    assert grantor.spent == ["rt-old", "rt-fake-1", "rt-new", "rt-fake-3"]


def test_a_refused_grant_keeps_the_row_as_it_was(rows: TokenStore, sealer: Sealer) -> None:
    clock, grantor = Clock(), FakeGrantor(lifetime_seconds=60)
    tokens = source(rows, sealer, grantor, clock)
    tokens.access_token()
    before = rows.read_token(IDENTITY.key())
    clock.now += timedelta(minutes=10)
    grantor.refuse = OAuthLoginRefused("revoked", endpoint="login.example")
    with pytest.raises(OAuthLoginRefused):
        tokens.access_token()
    assert rows.read_token(IDENTITY.key()) == before


def test_no_token_byte_reaches_the_database_file(
    rows: TokenStore, sealer: Sealer, db_file: Path
) -> None:
    clock, grantor = Clock(), FakeGrantor(lifetime_seconds=60)
    tokens = source(rows, sealer, grantor, clock, configured="rt-configured-secret")
    seen = [tokens.access_token().value]
    clock.now += timedelta(minutes=10)
    seen.append(tokens.access_token().value)
    # The main file and its WAL (and journal) together hold everything written.
    stored = b"".join(
        path.read_bytes() for path in db_file.parent.iterdir() if path.name.startswith("relay.db")
    )
    # The search finds what is stored in the clear: the row's identity.
    assert IDENTITY.key().encode() in stored
    for secret in [*seen, "rt-configured-secret", "rt-fake-1", "rt-fake-2"]:
        assert secret.encode() not in stored
        assert secret.encode("utf-16-le") not in stored


def test_a_sealed_token_opens_only_for_its_row_and_key(sealer: Sealer) -> None:
    sealed = sealer.seal("at-1", bound_to="identity-a")
    assert sealer.open(sealed, bound_to="identity-a") == "at-1"
    with pytest.raises(StoreError):
        sealer.open(sealed, bound_to="identity-b")
    with pytest.raises(StoreError, match="was the key file replaced"):
        Sealer(b"another key of at least thirty-two bytes").open(sealed, bound_to="identity-a")
    assert "at-1" not in repr(sealer)


def test_the_key_file_must_hold_enough_secret(tmp_path: Path) -> None:
    short = tmp_path / "short.key"
    short.write_text("too short\n")
    with pytest.raises(ConfigError) as caught:
        read_key_file(short)
    assert caught.value.variable == "INVOICE_RELAY_SECRET_KEY_FILE"
    with pytest.raises(ConfigError):
        read_key_file(tmp_path / "missing.key")


def test_stored_rows_print_without_their_values() -> None:
    row = StoredToken(key="k", sealed_access=b"sealed-bytes", sealed_refresh=b"more")
    assert "sealed-bytes" not in repr(row)


@pytest.mark.parametrize(
    ("user", "other"),
    [("Invoices@Shop.Example", "invoices@shop.example")],
)
def test_an_identitys_key_ignores_the_case_of_the_mailbox(user: str, other: str) -> None:
    first = TokenIdentity(provider=OAuthProvider.GOOGLE, tenant="", client_id="c", user=user)
    second = TokenIdentity(provider=OAuthProvider.GOOGLE, tenant="", client_id="c", user=other)
    assert first.key() == second.key()
