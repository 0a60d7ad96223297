"""Spoofing against real servers: Dovecot holds the mails, the aiosmtpd sink counts
what was forwarded. The relay runs in-process with its real adapters (built by
`worker.cli.wiring` from settings), so DKIM keys can be injected through dkimpy's DNS
hook: no network. Each test prints its figures."""

from __future__ import annotations

import base64
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import dkim  # type: ignore[import-untyped,unused-ignore]
import pytest

from tests import samples
from tests.documents import poll_owner
from tests.hostile import injected_headers, injection_mails
from tests.integration.test_relay import relay_env
from tests.servers.dovecot import DovecotServer
from tests.servers.smtp_sink import SmtpSink
from tests.servers.tls import TestCA
from tests.signing import KeyServer, sign, signing_key
from worker.cli import wiring
from worker.config.settings import Settings
from worker.models import AuditFilter, AuditRow, Outcome
from worker.relay.pipeline import Pipeline

SHOP = signing_key("shop.example")
SHOP_PARENT_SIGNER = signing_key("example.org")  # signs for billing.example.org
PROVIDER = signing_key("mailer.printout.example")
EVIL = signing_key("evil.example")
KEYS = KeyServer().publish(SHOP, SHOP_PARENT_SIGNER, PROVIDER, EVIL)
SHOP_SENDER = "Printout Designer <invoices@shop.example>"


@pytest.fixture
def database_file(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'relay.db'}"


def poll(
    imap: DovecotServer, smtp: SmtpSink, smtp_ca: TestCA, database_url: str, **extra: str
) -> list[AuditRow]:
    settings = Settings.from_env(relay_env(imap, smtp, database_url, smtp_ca=smtp_ca, **extra))
    store = wiring.prepared_store(settings)
    inspector = wiring.pdf_inspector(settings)
    try:
        config = wiring.pipeline_config(settings)
        Pipeline(
            config=config,
            mailbox=wiring.imap_mailbox(settings),
            outbox=wiring.smtp_outbox(settings),
            store=store,
            owner=poll_owner(store, config.mailbox),
            inspector=inspector,
            txt_lookup=KEYS,
        ).poll()
        return store.audit(AuditFilter())
    finally:
        inspector.close()
        store.close()


def pdf_mail(number: str, *, sender: str = SHOP_SENDER, **headers: str) -> bytes:
    return samples.invoice_mail(
        pdfs=[(f"Invoice {number}.pdf", samples.invoice_pdf(number=number))],
        sender=sender,
        subject=f"Invoice {number}",
        message_id=f"<invoice-{number}@spoof.test>",
        extra_headers=headers or None,
    )


def appended_pdf_attack() -> bytes:
    """A real shop mail signed with l=, turned into a PDF carrier without breaking the
    signature: Content-Type is not signed, so it is replaced and a part appended."""
    shipped = (
        f"From: {SHOP_SENDER}\r\nTo: invoices@shop.example\r\n"
        "Subject: Your order has shipped\r\nDate: Mon, 24 Nov 2025 10:00:00 +0000\r\n"
        "Message-ID: <shipped@spoof.test>\r\nMIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n\r\nYour order is on its way.\r\n"
    )
    signed = sign(shipped.encode(), SHOP, length=True)
    pdf = base64.encodebytes(samples.invoice_pdf(number="6666")).replace(b"\n", b"\r\n")
    forged = re.sub(
        rb"Content-Type: text/plain[^\r]*\r\n",
        b'Content-Type: multipart/mixed; boundary="x"\r\n',
        signed,
        count=1,
    )
    forged += (
        b"\r\n--x\r\nContent-Type: application/pdf\r\nContent-Transfer-Encoding: base64\r\n"
        b'Content-Disposition: attachment; filename="Invoice 6666.pdf"\r\n\r\n' + pdf + b"--x--\r\n"
    )
    # The attack is real: dkimpy itself calls this signature valid.
    assert dkim.verify(forged, dnsfunc=KEYS)
    return forged


def forged_display_name() -> bytes:
    raw = pdf_mail("6667").replace(
        SHOP_SENDER.encode(),
        b"=?utf-8?q?Printout_Designer=0D=0ABcc:_x@evil.example?= <invoices@shop.example>",
    )
    return sign(raw, SHOP)


def outcomes(rows: list[AuditRow], uids: Mapping[str, int]) -> dict[str, set[Outcome]]:
    found: dict[str, set[Outcome]] = {name: set() for name in uids}
    names = {uid: name for name, uid in uids.items()}
    for row in rows:
        found[names[row.uid]].add(row.outcome)
    return found


def assert_only_controls_forwarded(
    title: str,
    found: Mapping[str, set[Outcome]],
    hostile: Iterable[str],
    control: Iterable[str],
    forwarded: int,
) -> None:
    """Prints the figures of one scenario, then checks that every hostile mail was
    rejected and every control forwarded."""
    hostile_found = {name: found[name] for name in hostile}
    control_found = {name: found[name] for name in control}
    hostile_forwarded = sum(Outcome.FORWARDED in seen for seen in hostile_found.values())
    control_forwarded = sum(seen == {Outcome.FORWARDED} for seen in control_found.values())
    control_rejected = sum(Outcome.REJECTED in seen for seen in control_found.values())
    print(
        f"\n{title}: hostile {len(hostile_found)}, forwarded {hostile_forwarded}; "
        f"controls {len(control_found)}, forwarded {control_forwarded}, "
        f"rejected {control_rejected}; mails at the sink {forwarded}"
    )
    assert hostile_found == {name: {Outcome.REJECTED} for name in hostile_found}
    assert control_found == {name: {Outcome.FORWARDED} for name in control_found}


def test_dkim_required_forwards_only_proven_senders(
    imap: DovecotServer, smtp: SmtpSink, smtp_ca: TestCA, database_file: str
) -> None:
    hostile = {
        "forged From, unsigned": pdf_mail("6661"),
        "signed by another domain": sign(pdf_mail("6662"), EVIL),
        "signed, then From changed": sign(pdf_mail("6663"), SHOP).replace(
            b"From: " + SHOP_SENDER.encode(), b"From: Boss <boss@shop.example>"
        ),
        "l= with an appended PDF": appended_pdf_attack(),
        "CR LF in the display name": forged_display_name(),
        "provider-signed, From not allowed": sign(
            pdf_mail("6664", sender="Evil <evil@evil.example>"), PROVIDER
        ),
    }
    control = {
        "signed by the shop": sign(pdf_mail("1001"), SHOP),
        "signed by the parent domain": sign(
            pdf_mail("1002", sender="Billing <billing@billing.example.org>"), SHOP_PARENT_SIGNER
        ),
        "signed by the listed provider": sign(pdf_mail("1003"), PROVIDER),
        "signed twice, foreign first": sign(sign(pdf_mail("1004"), SHOP), EVIL),
    }
    uids = {name: imap.append(raw) for name, raw in {**hostile, **control}.items()}
    rows = poll(
        imap,
        smtp,
        smtp_ca,
        database_file,
        INVOICE_RELAY_REQUIRE_DKIM="true",
        INVOICE_RELAY_DKIM_DOMAINS="mailer.printout.example",
        INVOICE_RELAY_ALLOWED_SENDERS="@shop.example,@billing.example.org",
    )
    found = outcomes(rows, uids)
    assert_only_controls_forwarded(
        "spoofing with INVOICE_RELAY_REQUIRE_DKIM", found, hostile, control, len(smtp.messages)
    )
    assert sorted(str(mail.message["Subject"]) for mail in smtp.messages) == [
        "Invoice 1001",
        "Invoice 1002",
        "Invoice 1003",
        "Invoice 1004",
    ]
    reasons = {row.reason or "" for row in rows if row.outcome is Outcome.REJECTED}
    assert any(reason.startswith("DKIM: ") for reason in reasons)
    assert any("has l= (body length)" in reason for reason in reasons)


def test_trusted_authentication_results_ignore_foreign_and_lower_headers(
    imap: DovecotServer, smtp: SmtpSink, smtp_ca: TestCA, database_file: str
) -> None:
    passing = (
        "mx.shop.example; dkim=pass header.d=shop.example; dmarc=pass header.from=shop.example"
    )
    failing = "mx.shop.example; dkim=none; dmarc=fail header.from=shop.example"
    hostile = {
        "foreign authserv-id": _with_results(
            pdf_mail("7001"), passing.replace("mx.shop", "mx.evil")
        ),
        "forged below the real one": _with_results(pdf_mail("7002"), failing, passing),
        "dkim pass for another domain": _with_results(
            pdf_mail("7003"),
            "mx.shop.example; dkim=pass header.d=evil.example; dmarc=fail header.from=shop.example",
        ),
        "none at all": pdf_mail("7004"),
    }
    control = {
        "dmarc pass": _with_results(pdf_mail("1101"), passing),
        "google style dkim pass": _with_results(
            pdf_mail("1102"),
            "mx.shop.example; dkim=pass header.i=@shop.example header.s=s1 header.b=Ab1;"
            " spf=pass smtp.mailfrom=invoices@shop.example",
        ),
    }
    uids = {name: imap.append(raw) for name, raw in {**hostile, **control}.items()}
    rows = poll(
        imap, smtp, smtp_ca, database_file, INVOICE_RELAY_TRUSTED_AUTHSERV_ID="mx.shop.example"
    )
    found = outcomes(rows, uids)
    assert_only_controls_forwarded(
        "spoofing with INVOICE_RELAY_TRUSTED_AUTHSERV_ID",
        found,
        hostile,
        control,
        len(smtp.messages),
    )
    assert len(smtp.messages) == len(control)


def _with_results(raw: bytes, *values: str) -> bytes:
    """`raw` with Authentication-Results headers on top, the first value topmost."""
    head = b"".join(b"Authentication-Results: " + value.encode() + b"\r\n" for value in values)
    return head + raw


def test_no_injected_header_reaches_the_real_sink(
    imap: DovecotServer, smtp: SmtpSink, smtp_ca: TestCA, database_file: str
) -> None:
    mails = injection_mails()
    imap.append_many(mails.values())
    rows = poll(imap, smtp, smtp_ca, database_file)
    print(f"\nheader injection: {len(mails)} mails, {len(smtp.messages)} forwarded")
    assert [row.outcome for row in rows] == [Outcome.FORWARDED] * len(mails)
    assert len(smtp.messages) == len(mails)
    for mail in smtp.messages:
        assert injected_headers(mail.raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")) == []
