"""Database URLs in messages never show a password, wherever the URL carries it."""

from __future__ import annotations

import pytest

from worker.db import describe, parse_url, translate
from worker.errors import StoreError


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://relay:Sekr3t@db/relay", "postgresql+psycopg://relay:****@db/relay"),
        ("postgresql://relay:p%40ss@db/relay", "postgresql+psycopg://relay:****@db/relay"),
        (
            "postgresql://relay@db/relay?password=Sekr3t&sslmode=require",
            "postgresql+psycopg://relay@db/relay?password=****&sslmode=require",
        ),
        (
            "postgresql://relay@db/relay?PASSWORD=Sekr3t",
            "postgresql+psycopg://relay@db/relay?PASSWORD=****",
        ),
        ("sqlite:////data/invoice-relay.db", "sqlite:////data/invoice-relay.db"),
    ],
)
def test_describe_masks_every_password(url: str, shown: str) -> None:
    assert describe(parse_url(url)) == shown


def test_translated_errors_mask_query_passwords() -> None:
    from sqlalchemy.exc import OperationalError

    url = parse_url("postgresql://relay@db/relay?password=Sekr3t")
    error = translate(OperationalError("connect", {}, Exception("password Sekr3t refused")), url)
    assert isinstance(error, StoreError)
    assert "Sekr3t" not in str(error)
    assert "****" in str(error)
