"""INVOICE_RELAY_DELIVERY=getmyinvoices and the INVOICE_RELAY_GMI_* settings."""

from __future__ import annotations

from pathlib import Path

import pytest

from worker.config.settings import Settings
from worker.errors import ConfigError
from worker.models import DEFAULT_GMI_API_URL, DeliveryKind

KEY = "gmi-Key-55aa"

API = {
    "INVOICE_RELAY_IMAP_HOST": "imap.example.com",
    "INVOICE_RELAY_IMAP_USER": "invoices@shop.example",
    "INVOICE_RELAY_IMAP_PASSWORD": "imap-Pa55",
    "INVOICE_RELAY_DELIVERY": "getmyinvoices",
    "INVOICE_RELAY_GMI_API_KEY": KEY,
    "HOME": "/home/relay",
}


def settings(**overrides: str) -> Settings:
    environ = dict(API)
    environ.update({f"INVOICE_RELAY_{name}": value for name, value in overrides.items()})
    return Settings.from_env({k: v for k, v in environ.items() if v})


def test_the_api_needs_no_smtp_and_no_forward_to() -> None:
    chosen = settings()
    assert chosen.delivery is DeliveryKind.GETMYINVOICES
    assert chosen.gmi_api_url == DEFAULT_GMI_API_URL
    assert chosen.gmi_document_type == "SALES_INVOICE"
    assert (chosen.gmi_calls_per_minute, chosen.gmi_calls_per_day) == (60, 2500)
    assert chosen.gmi_run_ocr is True and chosen.gmi_tags == ()


def test_notices_still_need_smtp() -> None:
    with pytest.raises(ConfigError) as caught:
        settings(NOTIFY_TO="owner@shop.example")
    assert "SMTP_HOST" in str(caught.value) and "FORWARD_FROM" in str(caught.value)


def test_the_key_is_required_and_never_shown(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="GMI_API_KEY"):
        settings(GMI_API_KEY="")
    chosen = settings()
    assert KEY not in repr(chosen) and KEY not in str(chosen.describe())
    assert KEY in chosen.secret_values()
    key_file = tmp_path / "key"
    key_file.write_text("from-a-file\n")
    assert settings(GMI_API_KEY="", GMI_API_KEY_FILE=str(key_file)).gmi_api_key is not None


@pytest.mark.parametrize(
    ("name", "value", "field", "expected"),
    [
        ("GMI_DOCUMENT_TYPE", "incoming_invoice", "gmi_document_type", "INCOMING_INVOICE"),
        ("GMI_TAGS", "relay, shop,,relay", "gmi_tags", ("relay", "shop")),
        ("GMI_RUN_OCR", "false", "gmi_run_ocr", False),
        ("GMI_CALLS_PER_MINUTE", "20", "gmi_calls_per_minute", 20),
        (
            "GMI_API_URL",
            "http://127.0.0.1:8000/accounts/v3/",
            "gmi_api_url",
            "http://127.0.0.1:8000/accounts/v3",
        ),
    ],
)
def test_values_are_parsed(name: str, value: str, field: str, expected: object) -> None:
    assert getattr(settings(**{name: value}), field) == expected


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("GMI_DOCUMENT_TYPE", "INVOICE"),
        ("GMI_API_URL", "ftp://example.com"),
        ("GMI_CREDIT_NOTE_PATTERN", "(unclosed"),
        ("GMI_CALLS_PER_DAY", "0"),
        ("DELIVERY", "fax"),
    ],
)
def test_malformed_values_name_their_variable(name: str, value: str) -> None:
    with pytest.raises(ConfigError, match=name):
        settings(**{name: value})


def test_smtp_delivery_still_needs_forward_to() -> None:
    with pytest.raises(ConfigError, match="FORWARD_TO"):
        settings(DELIVERY="smtp", SMTP_HOST="smtp.example.com", FORWARD_FROM="r@shop.example")
