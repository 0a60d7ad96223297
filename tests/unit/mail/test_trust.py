"""worker.mail.trust: alignment, trusted Authentication-Results, DKIM with injected keys, and
the proof step of a poll against fakes. No network: keys come from tests.signing."""

from __future__ import annotations

import random
import threading
from datetime import UTC, datetime

import pytest

from tests import samples
from tests.documents import poll_owner
from tests.fakes import FakeInspector, FakeMailbox, FakeOutbox, FakeStore
from tests.signing import KeyServer, sign, signing_key
from worker.config import values
from worker.config.settings import Settings
from worker.mail.headers import parse_headers
from worker.mail.proof import SenderProof
from worker.mail.trust import (
    DkimVerifier,
    Proof,
    TrustPolicy,
    aligned,
    authserv_id_of,
    check_authentication_results,
)
from worker.models import AuditFilter, AuditRow, DedupMode, MailSummary, Outcome
from worker.relay.pipeline import Pipeline
from worker.relay.pollconfig import PipelineConfig

SHOP = signing_key("shop.example")
PARENT = signing_key("example.net")  # signs for billing.example.net
PROVIDER = signing_key("mailer.printout.example")  # the sending service's own domain
EVIL = signing_key("evil.example")
PDF = b"%PDF-1.4\n1 0 obj <<>> endobj\ntrailer <<>>\n%%EOF\n"
DKIM_ON = TrustPolicy(require_dkim=True)


# --- alignment ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("signer", "sender", "expected"),
    [
        ("shop.example", "shop.example", True),
        ("SHOP.example.", "shop.EXAMPLE", True),
        ("shop.example", "billing.shop.example", True),  # parent signs for a subdomain
        ("mail.shop.example", "shop.example", True),  # subdomain signs for its parent
        ("mail.shop.example", "billing.shop.example", False),  # siblings: list them
        ("evil.example", "shop.example", False),
        ("hop.example", "shop.example", False),  # a suffix of the text is not a parent
        ("example", "shop.example", False),  # a bare top-level domain
        ("co.uk", "shop.co.uk", True),  # only co.uk's registry could publish that key
        ("", "shop.example", False),
        ("shop.example", "", False),
    ],
)
def test_aligned(signer: str, sender: str, expected: bool) -> None:
    assert aligned(signer, sender) is expected


# --- Authentication-Results -------------------------------------------------------------

GOOGLE_PASS = (
    "mx.shop.example; dkim=pass header.i=@shop.example header.s=s1 header.b=Ab12;"
    " spf=pass (domain of x@shop.example designates 192.0.2.1 as permitted sender)"
    " smtp.mailfrom=x@shop.example; dmarc=pass (p=NONE sp=NONE dis=NONE)"
    " header.from=shop.example"
)
TRUSTED = TrustPolicy(trusted_authserv_id="mx.shop.example")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("mx.shop.example; none", "mx.shop.example"),
        ("  (the shop's MX) MX.Shop.Example 1; dkim=pass", "mx.shop.example"),
        ("spf=pass (sender IP is 192.0.2.1) smtp.mailfrom=x.example", "spf=pass"),
        ("", None),
        (";", None),
    ],
)
def test_authserv_id_of(value: str, expected: str | None) -> None:
    assert authserv_id_of(value) == expected


AUTHRES_CASES: list[tuple[str, list[str], str, TrustPolicy, Proof, str]] = [
    ("google style pass", [GOOGLE_PASS], "shop.example", TRUSTED, Proof.PASSED, "dkim=pass"),
    (
        "dmarc alone",
        ["mx.shop.example; dmarc=pass header.from=shop.example"],
        "shop.example",
        TRUSTED,
        Proof.PASSED,
        "dmarc=pass",
    ),
    (
        "dkim pass of another domain",
        ["mx.shop.example; dkim=pass header.d=evil.example; dmarc=fail header.from=shop.example"],
        "shop.example",
        TRUSTED,
        Proof.FAILED,
        "no aligned pass",
    ),
    (
        "dkim pass of a listed provider",
        ["mx.shop.example; dkim=pass header.d=mailer.printout.example"],
        "shop.example",
        TrustPolicy(
            trusted_authserv_id="mx.shop.example", dkim_domains=("mailer.printout.example",)
        ),
        Proof.PASSED,
        "d=mailer.printout.example",
    ),
    (
        "dmarc pass for another From",
        ["mx.shop.example; dmarc=pass header.from=evil.example"],
        "shop.example",
        TRUSTED,
        Proof.FAILED,
        "no aligned pass",
    ),
    (
        "forged header of a foreign server",
        ["mx.evil.example; dkim=pass header.d=shop.example; dmarc=pass header.from=shop.example"],
        "shop.example",
        TRUSTED,
        Proof.FAILED,
        "none from mx.shop.example",
    ),
    (
        # The trusted server prepends its own header; a forged one below it never counts.
        "forged header below the real one",
        [
            "mx.shop.example; dkim=fail header.d=shop.example; dmarc=fail header.from=shop.example",
            "mx.shop.example; dkim=pass header.d=shop.example; dmarc=pass header.from=shop.example",
        ],
        "shop.example",
        TRUSTED,
        Proof.FAILED,
        "dkim=fail, dmarc=fail",
    ),
    (
        "unreadable trusted header",
        ["mx.shop.example; dkim=pass (unclosed comment"],
        "shop.example",
        TRUSTED,
        Proof.FAILED,
        "unreadable",
    ),
    ("no header", [], "shop.example", TRUSTED, Proof.FAILED, "none from mx.shop.example"),
    (
        "From without an address",
        [GOOGLE_PASS],
        "",
        TRUSTED,
        Proof.FAILED,
        "From has no single address",
    ),
]


@pytest.mark.parametrize(
    ("values", "from_domain", "policy", "proof", "reason_part"),
    [case[1:] for case in AUTHRES_CASES],
    ids=[case[0] for case in AUTHRES_CASES],
)
def test_authentication_results(
    values: list[str], from_domain: str, policy: TrustPolicy, proof: Proof, reason_part: str
) -> None:
    verdict = check_authentication_results(values, from_domain, policy)
    assert verdict.proof is proof
    assert verdict.reason.startswith("Authentication-Results: ")
    assert reason_part in verdict.reason


# --- DKIM -------------------------------------------------------------------------------


def shop_mail(sender: str = "Printout Designer <invoices@shop.example>") -> bytes:
    return samples.invoice_mail(pdfs=[("Invoice 1042.pdf", PDF)], sender=sender)


def with_appended_pdf(signed: bytes) -> bytes:
    """What an attacker does with an l= signature: content after the signed body."""
    return signed + b"\r\n--extra\r\nContent-Type: application/pdf\r\n\r\n%PDF-1.4 fake\r\n"


def resigned_from(raw: bytes, sender: bytes) -> bytes:
    return raw.replace(b"From: Printout Designer <invoices@shop.example>", b"From: " + sender)


DKIM_CASES: list[tuple[str, bytes, str, TrustPolicy, Proof, str]] = [
    ("valid and aligned", sign(shop_mail(), SHOP), "shop.example", DKIM_ON, Proof.PASSED, ""),
    (
        "parent domain signs",
        sign(shop_mail("Billing <b@billing.example.net>"), PARENT),
        "billing.example.net",
        DKIM_ON,
        Proof.PASSED,
        "",
    ),
    (
        "another domain signs",
        sign(shop_mail(), EVIL),
        "shop.example",
        DKIM_ON,
        Proof.FAILED,
        "d=evil.example: not aligned",
    ),
    (
        "provider not listed",
        sign(shop_mail(), PROVIDER),
        "shop.example",
        DKIM_ON,
        Proof.FAILED,
        "not aligned",
    ),
    (
        "provider listed",
        sign(shop_mail(), PROVIDER),
        "shop.example",
        TrustPolicy(require_dkim=True, dkim_domains=("mailer.printout.example",)),
        Proof.PASSED,
        "",
    ),
    (
        "l= with a PDF appended",
        with_appended_pdf(sign(shop_mail(), SHOP, length=True)),
        "shop.example",
        DKIM_ON,
        Proof.FAILED,
        "has l= (body length)",
    ),
    (
        "body changed after signing",
        sign(shop_mail(), SHOP).replace(b"please find", b"please fetch"),
        "shop.example",
        DKIM_ON,
        Proof.FAILED,
        "body hash mismatch",
    ),
    (
        "From changed after signing",
        resigned_from(sign(shop_mail(), SHOP), b"Boss <boss@shop.example>"),
        "shop.example",
        DKIM_ON,
        Proof.FAILED,
        "does not verify",
    ),
    (
        "foreign signature first, valid one second: every one is checked",
        sign(sign(shop_mail(), SHOP), EVIL),
        "shop.example",
        DKIM_ON,
        Proof.PASSED,
        "",
    ),
    (
        "rsa-sha1",
        sign(shop_mail(), SHOP, algorithm=b"rsa-sha1"),
        "shop.example",
        DKIM_ON,
        Proof.FAILED,
        "rsa-sha1",
    ),
    (
        "key not published",
        sign(shop_mail(), signing_key("shop.example", "gone")),
        "shop.example",
        DKIM_ON,
        Proof.FAILED,
        "d=shop.example",
    ),
    ("unsigned", shop_mail(), "shop.example", DKIM_ON, Proof.FAILED, "no signature"),
    (
        "From without an address",
        sign(shop_mail(), SHOP),
        "",
        DKIM_ON,
        Proof.FAILED,
        "From has no single address",
    ),
    (
        "garbage signature",
        b"DKIM-Signature: v=1; a=rsa-sha256; d=shop.example; b=!!\r\n" + shop_mail(),
        "shop.example",
        DKIM_ON,
        Proof.FAILED,
        "does not sign From",
    ),
]


@pytest.mark.parametrize(
    ("raw", "from_domain", "policy", "proof", "reason_part"),
    [case[1:] for case in DKIM_CASES],
    ids=[case[0] for case in DKIM_CASES],
)
def test_dkim(
    raw: bytes, from_domain: str, policy: TrustPolicy, proof: Proof, reason_part: str
) -> None:
    keys = KeyServer().publish(SHOP, PARENT, PROVIDER, EVIL)
    verdict = DkimVerifier(lookup=keys).verify(raw, from_domain=from_domain, policy=policy)
    assert verdict.proof is proof, verdict.reason
    assert verdict.reason.startswith("DKIM: ")
    assert reason_part in verdict.reason
    # Signatures that cannot count never cost a DNS lookup.
    assert all(b"evil.example" not in name for name in keys.asked)


def test_a_dns_timeout_is_unsure_not_failed() -> None:
    keys = KeyServer().publish(SHOP)
    keys.slow.add(SHOP.dns_name)
    verdict = DkimVerifier(lookup=keys).verify(
        sign(shop_mail(), SHOP), from_domain="shop.example", policy=DKIM_ON
    )
    assert verdict.proof is Proof.UNSURE
    assert verdict.reason.startswith("DKIM: DNS lookup timed out")


def test_keys_are_looked_up_once_per_verifier() -> None:
    keys = KeyServer().publish(SHOP)
    verifier = DkimVerifier(lookup=keys)
    for _ in range(3):
        verdict = verifier.verify(
            sign(shop_mail(), SHOP), from_domain="shop.example", policy=DKIM_ON
        )
        assert verdict.proof is Proof.PASSED
    assert keys.asked == [SHOP.dns_name]


# --- the proof step ---------------------------------------------------------------------


def summaries_of(mailbox: FakeMailbox) -> list[MailSummary]:
    return mailbox.summaries(sorted(mailbox.mails))


def test_a_trusted_header_spares_the_whole_fetch() -> None:
    mailbox = FakeMailbox()
    proven = mailbox.add(
        shop_mail().replace(
            b"From:", b"Authentication-Results: " + GOOGLE_PASS.encode() + b"\r\nFrom:", 1
        )
    )
    unproven = mailbox.add(sign(shop_mail(), SHOP))
    proof = SenderProof(
        policy=TrustPolicy(require_dkim=True, trusted_authserv_id="mx.shop.example"),
        mailbox=mailbox,
        verifier=DkimVerifier(lookup=KeyServer().publish(SHOP)),
    )
    verdicts = proof.check(summaries_of(mailbox))
    assert verdicts[proven].proof is Proof.PASSED
    assert verdicts[unproven].proof is Proof.PASSED
    assert mailbox.whole_mails == [unproven]


def test_both_reasons_are_named_when_neither_proof_holds() -> None:
    mailbox = FakeMailbox()
    uid = mailbox.add(sign(shop_mail(), EVIL))
    proof = SenderProof(
        policy=TrustPolicy(require_dkim=True, trusted_authserv_id="mx.shop.example"),
        mailbox=mailbox,
        verifier=DkimVerifier(lookup=KeyServer().publish(EVIL)),
    )
    reason = proof.check(summaries_of(mailbox))[uid].reason
    assert reason.startswith("DKIM: no valid aligned signature")
    assert "; Authentication-Results: none from mx.shop.example" in reason


def test_whole_mails_are_fetched_in_size_bounded_batches() -> None:
    mailbox = FakeMailbox()
    uids = [mailbox.add(sign(shop_mail(), SHOP)) for _ in range(5)]
    size = len(mailbox.mails[uids[0]].raw)
    proof = SenderProof(
        policy=DKIM_ON,
        mailbox=mailbox,
        verifier=DkimVerifier(lookup=KeyServer().publish(SHOP)),
        batch_bytes=2 * size,
    )
    assert all(v.proof is Proof.PASSED for v in proof.check(summaries_of(mailbox)).values())
    assert mailbox.calls.count("fetch_messages") == 3


def test_no_policy_no_verdicts() -> None:
    mailbox = FakeMailbox()
    mailbox.add(shop_mail())
    assert SenderProof(policy=TrustPolicy(), mailbox=mailbox).check(summaries_of(mailbox)) == {}
    assert "fetch_messages" not in mailbox.calls


# --- a poll against fakes ---------------------------------------------------------------


@pytest.fixture
def store() -> FakeStore:
    """The store in memory: these tests are about what a poll forwards, not about SQL."""
    return FakeStore()


def poll(
    store: FakeStore,
    mailbox: FakeMailbox,
    config: dict[str, object],
    keys: KeyServer | None = None,
) -> tuple[FakeOutbox, list[AuditRow]]:
    outbox = FakeOutbox()
    settings: dict[str, object] = {
        "mailbox": "invoices@imap.example/INBOX",
        "forward_to": "inbox@getmyinvoices.example",
        "forward_from": "relay@shop.example",
        "dedup": DedupMode.BYTES,
    }
    settings.update(config)
    Pipeline(
        config=PipelineConfig(**settings),  # type: ignore[arg-type]
        mailbox=mailbox,
        outbox=outbox,
        store=store,
        owner=poll_owner(store, str(settings["mailbox"])),
        inspector=FakeInspector(),
        clock=lambda: datetime(2026, 11, 24, 12, 0, tzinfo=UTC),
        rng=random.Random(1),
        stop=threading.Event(),
        txt_lookup=keys or KeyServer(),
    ).poll()
    return outbox, sorted(store.audit(AuditFilter()), key=lambda row: row.id)


def test_with_dkim_required_only_proven_mail_is_forwarded(store: FakeStore) -> None:
    mailbox = FakeMailbox()
    good = mailbox.add(sign(shop_mail(), SHOP))
    forged = mailbox.add(shop_mail())
    foreign = mailbox.add(sign(shop_mail(), EVIL))
    outbox, rows = poll(store, mailbox, {"trust": DKIM_ON}, KeyServer().publish(SHOP, EVIL))
    assert len(outbox.sent) == 1
    by_uid = {row.uid: row for row in rows}
    assert by_uid[good].outcome is Outcome.FORWARDED
    for uid in (forged, foreign):
        assert by_uid[uid].outcome is Outcome.REJECTED
        assert (by_uid[uid].reason or "").startswith("DKIM: ")
        assert by_uid[uid].filename == "Invoice 1042.pdf"
    # Unproven mails' PDFs were never downloaded; the proven mail's PDF was cut from
    # the whole mail fetched for DKIM, not downloaded a second time.
    assert mailbox.whole_fetches == []
    assert sorted(mailbox.whole_mails) == sorted([good, forged, foreign])
    (forwarded,) = outbox.sent
    (attachment,) = [p for p in forwarded.walk() if p.get_content_type() == "application/pdf"]
    assert attachment.get_payload(decode=True) == PDF


def test_with_dkim_on_each_pdf_is_downloaded_once(store: FakeStore) -> None:
    mailbox = FakeMailbox()
    first = mailbox.add(sign(shop_mail(), SHOP))
    nested = mailbox.add(sign(samples.forwarded_mail(shop_mail()), SHOP))
    outbox, rows = poll(store, mailbox, {"trust": DKIM_ON}, KeyServer().publish(SHOP))

    assert {row.uid: row.outcome for row in rows} == {
        first: Outcome.FORWARDED,
        nested: Outcome.DUPLICATE,
    }
    # Each mail is downloaded once, whole, for DKIM; its PDF is cut from it. The only
    # other FETCH is the 64-octet probe of the text parts, before the proof.
    assert mailbox.calls.count("fetch_messages") == 1
    assert sorted(mailbox.whole_mails) == [first, nested]
    assert mailbox.whole_fetches == []
    assert mailbox.calls.count("fetch_sections") == 1
    assert len(outbox.sent) == 1


def test_a_dns_timeout_makes_the_mail_an_error_for_a_later_poll(store: FakeStore) -> None:
    mailbox = FakeMailbox()
    mailbox.add(sign(shop_mail(), SHOP))
    keys = KeyServer().publish(SHOP)
    keys.slow.add(SHOP.dns_name)
    outbox, rows = poll(store, mailbox, {"trust": DKIM_ON}, keys)
    assert outbox.sent == []
    assert [(row.outcome, (row.reason or "")[:26]) for row in rows] == [
        (Outcome.ERROR, "DKIM: DNS lookup timed out")
    ]


def test_mail_without_pdfs_is_never_fetched_whole(store: FakeStore) -> None:
    mailbox = FakeMailbox()
    mailbox.add(samples.plain_mail())
    _, rows = poll(store, mailbox, {"trust": DKIM_ON})
    assert [row.outcome for row in rows] == [Outcome.NO_PDF]
    assert "fetch_messages" not in mailbox.calls


@pytest.mark.parametrize(
    ("config", "reason"),
    [
        ({"max_parts": 5}, "too many MIME parts: more than 5 (INVOICE_RELAY_MAX_PARTS)"),
        ({"max_depth": 2}, "MIME nesting too deep: more than 2 levels (INVOICE_RELAY_MAX_DEPTH)"),
    ],
)
def test_past_a_structure_limit_nothing_is_downloaded(
    store: FakeStore, config: dict[str, object], reason: str
) -> None:
    mailbox = FakeMailbox()
    inner = samples.invoice_mail(pdfs=[(f"{n}.pdf", PDF) for n in range(6)])
    mailbox.add(samples.forwarded_mail(inner))
    outbox, rows = poll(store, mailbox, config)
    assert outbox.sent == []
    assert [(row.outcome, row.reason) for row in rows] == [(Outcome.REJECTED, reason)]
    assert mailbox.calls == ["open", "new_uids", "summaries", "close"]


# --- the settings -----------------------------------------------------------------------


def environment(**extra: str) -> dict[str, str]:
    env = {
        "INVOICE_RELAY_IMAP_HOST": "imap.example",
        "INVOICE_RELAY_IMAP_USER": "u",
        "INVOICE_RELAY_IMAP_PASSWORD": "p",
        "INVOICE_RELAY_SMTP_HOST": "smtp.example",
        "INVOICE_RELAY_FORWARD_TO": "inbox@getmyinvoices.example",
        "INVOICE_RELAY_FORWARD_FROM": "relay@shop.example",
        "INVOICE_RELAY_DATABASE_URL": "sqlite://",
    }
    env.update({f"INVOICE_RELAY_{key}": value for key, value in extra.items()})
    return env


def test_trust_settings_default_to_off_and_safe_limits() -> None:
    settings = Settings.from_env(environment())
    assert (settings.require_dkim, settings.dkim_domains, settings.trusted_authserv_id) == (
        False,
        (),
        None,
    )
    assert (settings.max_parts, settings.max_depth) == (100, 10)


def test_trust_settings_are_read() -> None:
    settings = Settings.from_env(
        environment(
            REQUIRE_DKIM="true",
            DKIM_DOMAINS="Mailer.Printout.Example, @esp.example.",
            TRUSTED_AUTHSERV_ID="MX.Shop.Example",
            MAX_PARTS="40",
            MAX_DEPTH="4",
        )
    )
    assert settings.require_dkim is True
    assert settings.dkim_domains == ("mailer.printout.example", "esp.example")
    assert settings.trusted_authserv_id == "mx.shop.example"
    assert (settings.max_parts, settings.max_depth) == (40, 4)


@pytest.mark.parametrize(
    ("parser", "text"),
    [
        (values.domains, "shop"),
        (values.domains, "a b.example"),
        (values.domains, "x@shop.example"),
        (values.authserv_id, "mx.shop.example; dkim=pass"),
        (values.authserv_id, "mx shop"),
        (values.authserv_id, "(comment)"),
    ],
)
def test_malformed_trust_values_are_refused(parser: object, text: str) -> None:
    assert callable(parser)
    with pytest.raises(ValueError, match="is not"):
        parser(text)


def test_headers_of_a_mail_feed_the_header_check() -> None:
    raw = b"Authentication-Results: " + GOOGLE_PASS.encode() + b"\r\nFrom: a@shop.example\r\n"
    headers = parse_headers(raw)
    verdict = check_authentication_results(headers.authentication_results, "shop.example", TRUSTED)
    assert verdict.proof is Proof.PASSED
