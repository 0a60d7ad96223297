"""Hostile input against the fakes: header injection end to end, and property tests.

* Every injection mail of tests/hostile.py goes through a whole poll; the forwarded
  mail carries exactly the headers it should (no Bcc, no X-Evil, no NUL, no bare CR/LF).
* Random MIME trees, built with `email.message`, go through the intake (structure,
  candidates, probes, transfer decoding): no exception reaches the broad per-mail catch
  (no `error` row) and every result stays bounded.
* A real invoice PDF, mutated (bit flips, truncations, insertions, deletions), goes
  through `worker.pdf.inspection.inspect_pdf` in this process under a per-example deadline: it
  returns a bounded report and never raises.

The example counts are printed (`pytest -s`); derandomized, so CI sees the same ones.
"""

from __future__ import annotations

import random
import signal
import threading
import unicodedata
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from email import policy
from email.message import EmailMessage
from types import FrameType

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests import samples
from tests.documents import poll_owner
from tests.fakes import FakeInspector, FakeMailbox, FakeOutbox, FakeStore
from tests.hostile import injected_headers, injection_mails
from worker.mail.mime import FILENAME_MAX_CHARS
from worker.models import AuditFilter, DedupMode, Outcome, SightingKind
from worker.pdf.inspection import inspect_pdf
from worker.relay.intake import Intake
from worker.relay.mailparts import IntakeRules
from worker.relay.pipeline import Pipeline
from worker.relay.pollconfig import PipelineConfig

PROPERTY_SETTINGS = settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
PDF_DEADLINE_SECONDS = 20
REASON_MAX_CHARS = 600
tried = {"mime": 0, "pdf": 0}


@pytest.fixture(scope="module", autouse=True)
def report_examples(request: pytest.FixtureRequest) -> Iterator[None]:
    """The figure: how many examples each property test tried."""
    yield
    plugins = request.config.pluginmanager
    reporter, capture = plugins.get_plugin("terminalreporter"), plugins.get_plugin("capturemanager")
    if reporter is not None and capture is not None and any(tried.values()):
        with capture.global_and_fixture_disabled():
            reporter.write_line(
                f"\nhostile examples tried: {tried['mime']} MIME trees, {tried['pdf']} mutated PDFs"
            )


# --- header injection, end to end -----------------------------------------------------

INJECTIONS = injection_mails()


@pytest.fixture
def store() -> FakeStore:
    """The store in memory: these tests are about what a poll forwards, not about SQL."""
    return FakeStore()


def poll(store: FakeStore, mailbox: FakeMailbox) -> FakeOutbox:
    outbox = FakeOutbox()
    Pipeline(
        config=PipelineConfig(
            mailbox="invoices@imap.example/INBOX",
            forward_to="inbox@getmyinvoices.example",
            forward_from="relay@shop.example",
            dedup=DedupMode.BYTES,
        ),
        mailbox=mailbox,
        outbox=outbox,
        store=store,
        owner=poll_owner(store, "invoices@imap.example/INBOX"),
        inspector=FakeInspector(),
        clock=lambda: datetime(2026, 11, 24, 12, 0, tzinfo=UTC),
        rng=random.Random(1),
        stop=threading.Event(),
    ).poll()
    return outbox


@pytest.mark.parametrize("name", list(INJECTIONS))
def test_no_injected_header_reaches_the_forwarded_mail(store: FakeStore, name: str) -> None:
    mailbox = FakeMailbox()
    mailbox.add(INJECTIONS[name])
    outbox = poll(store, mailbox)
    (rows,) = [store.audit(AuditFilter())]
    assert [row.outcome for row in rows] == [Outcome.FORWARDED]
    (message,) = outbox.sent
    assert injected_headers(message.as_bytes(policy=policy.SMTP)) == []
    (attachment,) = message.iter_attachments()
    for text in (str(message["Subject"]), str(attachment.get_filename())):
        assert not any(unicodedata.category(char) == "Cc" for char in text), text


def test_the_control_mail_is_clean_too(store: FakeStore) -> None:
    """The check itself: a forwarded mail with an added header is caught."""
    mailbox = FakeMailbox()
    mailbox.add(samples.invoice_mail(pdfs=[("a.pdf", b"%PDF-1.4\n%%EOF\n")]))
    (message,) = poll(store, mailbox).sent
    assert injected_headers(message.as_bytes(policy=policy.SMTP)) == []
    message["Bcc"] = "evil@x.example"
    assert injected_headers(message.as_bytes(policy=policy.SMTP)) == [
        "line b'Bcc: evil@x.example'",
        "header bcc",
    ]


# --- random MIME trees through the intake ------------------------------------------------

NAMES = st.text(
    alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=40
) | st.sampled_from(["invoice.pdf", "INVOICE.PDF", "a\r\nBcc: x.pdf", "../../x.pdf", ""])
PAYLOADS = st.sampled_from([b"%PDF-1.4\n%%EOF\n", b"  %PDF-1.7 x %%EOF", b"", b"\x00\xff"]) | (
    st.binary(max_size=80)
)
LEAF_TYPES = st.sampled_from(
    [
        ("application", "pdf"),
        ("application", "octet-stream"),
        ("application", "x-pdf"),
        ("image", "png"),
        ("text", "plain"),
    ]
)


@st.composite
def leaves(draw: st.DrawFn) -> EmailMessage:
    part = EmailMessage()
    maintype, subtype = draw(LEAF_TYPES)
    payload = draw(PAYLOADS)
    if maintype == "text":
        part.set_content(
            payload.decode("latin-1"), cte=draw(st.sampled_from(["quoted-printable", "base64"]))
        )
    else:
        part.set_content(payload, maintype=maintype, subtype=subtype)
    name = draw(st.none() | NAMES)
    if name is not None:
        try:
            part.add_header("Content-Disposition", "attachment", filename=name)
        except ValueError:
            part.add_header("Content-Disposition", "attachment")
    return part


def containers(children: st.SearchStrategy[EmailMessage]) -> st.SearchStrategy[EmailMessage]:
    @st.composite
    def build(draw: st.DrawFn) -> EmailMessage:
        if draw(st.booleans()):
            inner = draw(children)
            wrapper = EmailMessage()
            wrapper.set_content(inner)  # message/rfc822
            return wrapper
        parent = EmailMessage()
        parent.make_mixed()
        parent.set_type(f"multipart/{draw(st.sampled_from(['mixed', 'alternative', 'related']))}")
        for child in draw(st.lists(children, max_size=4)):
            parent.attach(child)
        return parent

    return build()


MIME_TREES = st.recursive(leaves(), containers, max_leaves=12)


def as_mail(tree: EmailMessage) -> bytes:
    tree["From"] = "Shop <invoices@shop.example>"
    tree["Subject"] = "Invoice"
    return tree.as_bytes(policy=policy.SMTP)


def count_nodes(tree: EmailMessage) -> int:
    return sum(1 for _ in tree.walk())


@PROPERTY_SETTINGS
@given(MIME_TREES, st.integers(min_value=1, max_value=40), st.integers(min_value=1, max_value=6))
def test_random_mime_trees_never_break_the_intake(
    tree: EmailMessage, max_parts: int, max_depth: int
) -> None:
    tried["mime"] += 1
    mailbox = FakeMailbox()
    uid = mailbox.add(as_mail(tree))
    intake = Intake(
        rules=IntakeRules(
            forward_from="relay@shop.example", max_parts=max_parts, max_depth=max_depth
        ),
        mailbox=mailbox,
        inspector=FakeInspector(),
    )
    (record,) = intake.build_records([uid])
    leaves_count = count_nodes(tree) + 1
    assert 1 <= len(record.parts) <= leaves_count
    for part in record.parts:
        assert part.kind is not SightingKind.ERROR, part.reason
        assert len(part.reason or "") <= REASON_MAX_CHARS
        name = part.filename or ""
        assert len(name) <= FILENAME_MAX_CHARS
        assert not any(unicodedata.category(char) in ("Cc", "Cs") for char in name), name
    limited = [part for part in record.parts if "INVOICE_RELAY_MAX_" in (part.reason or "")]
    if limited:
        # Past a limit nothing but the structure was read.
        assert len(record.parts) == 1
        assert mailbox.calls == ["summaries"]


# --- mutated PDFs through inspect_pdf ------------------------------------------------------

# A real invoice with its logo (mostly one image stream), and one without (mostly text).
SAMPLE_PDFS = (samples.invoice_pdf(number="1042"), samples.invoice_pdf(number="7", logo=False))


class _Deadline(BaseException):
    """Raised from SIGALRM; a BaseException so that no `except Exception` in pypdf eats it."""


@contextmanager
def deadline(seconds: int) -> Iterator[None]:
    def expire(signum: int, frame: FrameType | None) -> None:
        raise _Deadline(f"inspect_pdf took more than {seconds}s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


MUTATIONS = st.lists(
    st.tuples(
        st.sampled_from(["flip", "truncate", "insert", "delete", "duplicate"]),
        # anywhere, or in the last 2 KiB where the xref table and trailer live
        st.integers(min_value=0, max_value=1 << 20) | st.integers(min_value=-2048, max_value=-1),
        st.integers(min_value=0, max_value=7),
        st.binary(min_size=1, max_size=64)
        | st.sampled_from([b"0 0 obj", b"/Length 99999999999", b"<<", b"]", b"R", b"endstream"]),
    ),
    min_size=1,
    max_size=4,
)


def mutate(data: bytes, mutations: list[tuple[str, int, int, bytes]]) -> bytes:
    buffer = bytearray(data)
    for kind, position, bit, chunk in mutations:
        at = position % max(len(buffer), 1) if position >= 0 else max(len(buffer) + position, 0)
        if kind == "flip" and buffer:
            buffer[at] ^= 1 << bit
        elif kind == "truncate":
            del buffer[at:]
        elif kind == "insert":
            buffer[at:at] = chunk
        elif kind == "delete":
            del buffer[at : at + len(chunk) * 8]
        elif kind == "duplicate":
            buffer[at:at] = buffer[at : at + 512]
    return bytes(buffer)


@PROPERTY_SETTINGS
@given(st.sampled_from(SAMPLE_PDFS), MUTATIONS)
def test_mutated_pdfs_give_a_bounded_report(
    sample: bytes, mutations: list[tuple[str, int, int, bytes]]
) -> None:
    tried["pdf"] += 1
    data = mutate(sample, mutations)
    with deadline(PDF_DEADLINE_SECONDS):
        report = inspect_pdf(data)
    assert report.accepted == (report.reason is None)
    assert len(report.reason or "") <= REASON_MAX_CHARS
    if report.accepted and not report.encrypted:
        assert 1 <= report.pages <= 10
    fingerprint = report.fingerprint
    assert fingerprint is None or (fingerprint.startswith("fp1:") and len(fingerprint) == 68)
    assert len(report.invoice_number or "") <= 100
