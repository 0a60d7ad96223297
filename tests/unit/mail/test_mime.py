"""Tables for worker.mail.mime: body structures, filenames, transfer encodings, headers.

The BODYSTRUCTURE tuples are built the way imapclient returns them (its `BodyData`):
bytes for strings, None for NIL, the children of the top-level multipart wrapped in a
list, nested multiparts (inside message/rfc822) left as consecutive tuples. The helper
shapes are checked once against lines a Dovecot 2.3 server sent, parsed by imapclient.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st
from imapclient.response_parser import parse_fetch_response

from tests import samples
from tests.fakes import FakeMailbox
from worker.mail.mime import (
    FILENAME_MAX_CHARS,
    decode_filename,
    find_candidates,
    parse_bodystructure,
    section_bodies,
    structure_limit,
)
from worker.mail.transfer import Base64Stream, decode_transfer, is_pdf_bytes, probe_is_pdf
from worker.models import BodyPart

# --- builders in imapclient's shape ----------------------------------------------------

ENVELOPE = (
    None,
    b"inner",
    ((None, None, b"x", b"y.z"),),
    ((None, None, b"x", b"y.z"),),
    ((None, None, b"x", b"y.z"),),
    None,
    None,
    None,
    None,
    None,
)
ATTACHMENT = b"attachment"


def disposition(kind: bytes, filename: bytes | None = None) -> tuple[object, ...]:
    return (kind, (b"filename", filename) if filename is not None else None)


def text(
    subtype: bytes = b"plain", size: int = 7, dsp: tuple[object, ...] | None = None
) -> tuple[object, ...]:
    # type subtype params id desc encoding size lines | md5 disposition language location
    return (
        b"text",
        subtype,
        (b"charset", b"utf-8"),
        None,
        None,
        b"7bit",
        size,
        1,
        None,
        dsp,
        None,
        None,
    )


def basic(
    main: bytes,
    subtype: bytes,
    *,
    params: tuple[object, ...] | None = None,
    encoding: bytes = b"base64",
    size: int = 18,
    dsp: tuple[object, ...] | None = None,
) -> tuple[object, ...]:
    # type subtype params id desc encoding size | md5 disposition language location
    return (main, subtype, params, None, None, encoding, size, None, dsp, None, None)


def multipart(
    children: list[tuple[object, ...]], subtype: bytes = b"mixed", *, top: bool = True
) -> tuple[object, ...]:
    tail = (subtype, (b"boundary", b"b"), None, None, None)
    return (children, *tail) if top else (*children, *tail)


def message(body: tuple[object, ...], size: int = 494) -> tuple[object, ...]:
    # basic fields, then envelope, body, lines | md5 disposition language location
    return (
        b"message",
        b"rfc822",
        None,
        None,
        None,
        b"8bit",
        size,
        ENVELOPE,
        body,
        20,
        None,
        (ATTACHMENT, None),
        None,
        None,
    )


PDF = basic(b"application", b"pdf", dsp=disposition(ATTACHMENT, b"Rechnung.pdf"))

# Lines Dovecot 2.3.19 sent for mails built with Python's email package.
DOVECOT_LINES = [
    (
        b'2 (UID 2 BODYSTRUCTURE (("text" "plain" ("charset" "utf-8") NIL NIL "7bit" 7 1 NIL'
        b' NIL NIL NIL)("application" "pdf" NIL NIL NIL "base64" 18 NIL ("attachment"'
        b' ("filename" "Rechnung.pdf")) NIL NIL) "mixed" ("boundary" "b") NIL NIL NIL))',
        multipart([text(), PDF]),
    ),
    (
        b'4 (UID 4 BODYSTRUCTURE (("text" "plain" ("charset" "utf-8") NIL NIL "7bit" 7 1 NIL'
        b' NIL NIL NIL)("message" "rfc822" NIL NIL NIL "8bit" 494 (NIL "inner" ((NIL NIL "x"'
        b' "y.z")) ((NIL NIL "x" "y.z")) ((NIL NIL "x" "y.z")) NIL NIL NIL NIL NIL) (("text"'
        b' "plain" ("charset" "utf-8") NIL NIL "7bit" 7 1 NIL NIL NIL NIL)("application" "pdf"'
        b' NIL NIL NIL "base64" 18 NIL ("attachment" ("filename" "Rechnung.pdf")) NIL NIL)'
        b' "mixed" ("boundary" "b") NIL NIL NIL) 20 NIL ("attachment" NIL) NIL NIL) "mixed"'
        b' ("boundary" "b") NIL NIL NIL))',
        multipart([text(), message(multipart([text(), PDF], top=False))]),
    ),
    (
        b'6 (UID 6 BODYSTRUCTURE ("application" "pdf" NIL NIL NIL "base64" 18 NIL ("attachment"'
        b' ("filename" "Rechnung.pdf")) NIL NIL))',
        PDF,
    ),
]


@pytest.mark.parametrize(("line", "built"), DOVECOT_LINES)
def test_builders_match_what_imapclient_parses_from_dovecot(
    line: bytes, built: tuple[object, ...]
) -> None:
    (fetched,) = parse_fetch_response([line]).values()
    parsed = fetched[b"BODYSTRUCTURE"]
    assert parsed == built
    assert parse_bodystructure(parsed) == parse_bodystructure(built)


# --- which parts are candidates ---------------------------------------------------------

Row = tuple[str, str, str | None, bool]  # section, content type, filename, certain

CANDIDATE_CASES: list[tuple[str, object, list[Row]]] = [
    ("single text", text(), [("1", "text/plain", None, False)]),
    (
        "single pdf",
        PDF,
        [("1", "application/pdf", "Rechnung.pdf", True)],
    ),
    (
        "mixed text and pdf",
        multipart([text(), PDF]),
        [("1", "text/plain", None, False), ("2", "application/pdf", "Rechnung.pdf", True)],
    ),
    (
        "octet-stream named .PDF",
        multipart(
            [text(), basic(b"application", b"octet-stream", params=(b"name", b"INVOICE.PDF"))]
        ),
        [
            ("1", "text/plain", None, False),
            ("2", "application/octet-stream", "INVOICE.PDF", True),
        ],
    ),
    (
        "pdf without a name",
        multipart([text(), basic(b"application", b"pdf")]),
        [("1", "text/plain", None, False), ("2", "application/pdf", None, True)],
    ),
    (
        "x-pdf and acrobat types",
        multipart([basic(b"application", b"x-pdf"), basic(b"application", b"acrobat")]),
        [("1", "application/x-pdf", None, True), ("2", "application/acrobat", None, True)],
    ),
    (
        "alternative nested in mixed",
        multipart([multipart([text(), text(b"html")], b"alternative", top=False), PDF]),
        [
            ("1.1", "text/plain", None, False),
            ("1.2", "text/html", None, False),
            ("2", "application/pdf", "Rechnung.pdf", True),
        ],
    ),
    (
        "forwarded mail with multipart body",
        multipart([text(), message(multipart([text(), PDF], top=False))]),
        [
            ("1", "text/plain", None, False),
            ("2.1", "text/plain", None, False),
            ("2.2", "application/pdf", "Rechnung.pdf", True),
        ],
    ),
    (
        "forwarded mail with single-part body",
        multipart([text(), message(basic(b"application", b"pdf"))]),
        [("1", "text/plain", None, False), ("2.1", "application/pdf", None, True)],
    ),
    (
        "forwarded mail inside a forwarded mail",
        multipart([text(), message(message(multipart([text(), PDF], top=False)))]),
        [
            ("1", "text/plain", None, False),
            ("2.1.1", "text/plain", None, False),
            ("2.1.2", "application/pdf", "Rechnung.pdf", True),
        ],
    ),
    (
        "alternative inside a forwarded mail",
        multipart(
            [
                text(),
                message(
                    multipart(
                        [multipart([text(), text(b"html")], b"alternative", top=False), PDF],
                        top=False,
                    )
                ),
            ]
        ),
        [
            ("1", "text/plain", None, False),
            ("2.1.1", "text/plain", None, False),
            ("2.1.2", "text/html", None, False),
            ("2.2", "application/pdf", "Rechnung.pdf", True),
        ],
    ),
    (
        "inline pdf",
        multipart([text(), basic(b"application", b"pdf", dsp=disposition(b"inline", b"a.pdf"))]),
        [("1", "text/plain", None, False), ("2", "application/pdf", "a.pdf", True)],
    ),
    (
        "image-only mail",
        multipart(
            [
                basic(b"image", b"png", dsp=disposition(ATTACHMENT, b"scan.png"), size=500),
                basic(b"image", b"jpeg", size=900),
            ]
        ),
        [("1", "image/png", "scan.png", False), ("2", "image/jpeg", None, False)],
    ),
    (
        "disposition NIL, name in content type",
        multipart([text(), basic(b"application", b"octet-stream", params=(b"name", b"r.pdf"))]),
        [("1", "text/plain", None, False), ("2", "application/octet-stream", "r.pdf", True)],
    ),
    (
        "odd case everywhere",
        multipart(
            [
                (b"TEXT", b"Plain", (b"CHARSET", b"utf-8"), None, None, b"7BIT", 5, 1),
                basic(
                    b"APPLICATION",
                    b"PDF",
                    params=(b"NAME", b"X.Pdf"),
                    encoding=b"BASE64",
                    dsp=(b"ATTACHMENT", None),
                ),
            ],
            b"MIXED",
        ),
        [("1", "text/plain", None, False), ("2", "application/pdf", "X.Pdf", True)],
    ),
    (
        "empty parts: unlabelled skipped, labelled kept",
        multipart(
            [
                text(size=0),
                basic(b"application", b"octet-stream", size=0),
                basic(b"application", b"pdf", size=0),
            ]
        ),
        [("3", "application/pdf", None, True)],
    ),
    (
        "message/rfc822 sent without envelope and body is a plain leaf",
        multipart([text(), basic(b"message", b"rfc822", encoding=b"7bit", size=40)]),
        [("1", "text/plain", None, False), ("2", "message/rfc822", None, False)],
    ),
    (
        "child that is not a tuple keeps later numbers",
        multipart([text(), b"junk", PDF]),  # type: ignore[list-item]
        [("1", "text/plain", None, False), ("3", "application/pdf", "Rechnung.pdf", True)],
    ),
    ("multipart without children", multipart([]), []),
]


@pytest.mark.parametrize(
    ("raw", "expected"),
    [case[1:] for case in CANDIDATE_CASES],
    ids=[case[0] for case in CANDIDATE_CASES],
)
def test_find_candidates(raw: object, expected: list[Row]) -> None:
    candidates = find_candidates(parse_bodystructure(raw))
    assert [(c.section, c.content_type, c.filename, c.certain) for c in candidates] == expected


def test_leaf_fields_are_typed_and_lower_cased() -> None:
    raw = multipart(
        [
            text(),
            basic(
                b"Application",
                b"Octet-Stream",
                params=(b"NAME", b"Re.PDF", b"X-Mac-Type", b"PDF "),
                encoding=b"Base64",
                size=4321,
                dsp=(b"INLINE", (b"FileName", b"Re.PDF")),
            ),
        ]
    )
    part = parse_bodystructure(raw).children[1]
    assert part == BodyPart(
        section="2",
        content_type="application/octet-stream",
        params={"name": "Re.PDF", "x-mac-type": "PDF "},
        disposition="inline",
        disposition_params={"filename": "Re.PDF"},
        encoding="base64",
        size=4321,
    )


def test_containers_get_their_rfc3501_sections() -> None:
    root = parse_bodystructure(
        multipart([text(), message(multipart([text(), PDF], top=False))], b"related")
    )
    forwarded = root.children[1]
    (embedded,) = forwarded.children
    assert (root.section, root.content_type, root.params) == (
        "",
        "multipart/related",
        {"boundary": "b"},
    )
    assert (forwarded.section, forwarded.content_type) == ("2", "message/rfc822")
    assert forwarded.disposition == "attachment"
    assert (embedded.section, embedded.content_type) == ("2.TEXT", "multipart/mixed")
    assert [child.section for child in embedded.children] == ["2.1", "2.2"]


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        pytest.param(
            basic(b"application", b"pdf", params=(b"name", b"R\xe9chnung.pdf")),
            "Réchnung.pdf",
            id="8-bit latin-1 name",
        ),
        pytest.param(
            basic(b"application", b"pdf", params=(b"name", "Grüße.pdf".encode())),
            "Grüße.pdf",
            id="8-bit utf-8 name",
        ),
        pytest.param(
            basic(b"application", b"pdf", params=(b"name", 2024)),
            "2024",
            id="unquoted digits become int in imapclient",
        ),
    ],
)
def test_raw_parameter_values_are_decoded(raw: object, expected: str) -> None:
    assert decode_filename(parse_bodystructure(raw)) == expected


@pytest.mark.parametrize(
    ("raw", "section", "size", "encoding"),
    [
        pytest.param((b"text",), "1", 0, "7bit", id="type only"),
        pytest.param((None, None, None, None, None, None, b"12"), "1", 12, "7bit", id="NILs"),
        pytest.param(
            (b"application", b"pdf", None, None, None, b"base64", -5), "1", 0, "base64", id="neg"
        ),
    ],
)
def test_odd_leaves_give_a_best_effort_part(
    raw: tuple[object, ...], section: str, size: int, encoding: str
) -> None:
    part = parse_bodystructure(raw)
    assert (part.section, part.size, part.encoding) == (section, size, encoding)


@pytest.mark.parametrize("raw", [None, b"text", 42, (), []], ids=repr)
def test_what_is_no_body_structure_raises_value_error(raw: object) -> None:
    with pytest.raises(ValueError, match="not a body structure"):
        parse_bodystructure(raw)


def test_hostile_nesting_raises_value_error() -> None:
    raw: tuple[object, ...] = PDF
    for _ in range(60):
        raw = message(raw)
    with pytest.raises(ValueError, match="nested deeper"):
        parse_bodystructure(multipart([raw]))


# Nested tuples of the atoms imapclient produces, in any shape.
ATOMS = st.one_of(
    st.none(),
    st.integers(min_value=-5, max_value=10**6),
    st.binary(max_size=12),
    st.sampled_from([b"text", b"message", b"rfc822", b"multipart", b"application", b"pdf"]),
)
SHAPES = st.recursive(
    ATOMS,
    lambda inner: st.one_of(
        st.tuples(inner, inner, inner),
        st.lists(inner, max_size=14).map(tuple),
        st.lists(inner, max_size=4),
    ),
    max_leaves=60,
)


@given(SHAPES)
def test_any_shape_gives_a_tree_or_value_error(raw: object) -> None:
    try:
        root = parse_bodystructure(raw)
    except ValueError:
        return
    for candidate in find_candidates(root):
        assert candidate.section


# --- filenames ------------------------------------------------------------------------


FILENAME_CASES: list[tuple[str, dict[str, str], dict[str, str], str | None]] = [
    ("plain", {"filename": "Rechnung 1042.pdf"}, {}, "Rechnung 1042.pdf"),
    ("rfc2231 utf-8", {"filename*": "utf-8''R%C3%A9chnung.pdf"}, {}, "Réchnung.pdf"),
    ("rfc2231 with language", {"filename*": "UTF-8'de'R%C3%A9chnung.pdf"}, {}, "Réchnung.pdf"),
    ("rfc2231 latin-1", {"filename*": "iso-8859-1''R%E9chnung.pdf"}, {}, "Réchnung.pdf"),
    (
        "rfc2231 continuations, encoded and plain",
        {"filename*1*": "chn%C3%BCng", "filename*0*": "utf-8''R%C3%A9", "filename*2": ".pdf"},
        {},
        "Réchnüng.pdf",
    ),
    (
        "rfc2231 plain continuations",
        {"filename*0": "Rech", "filename*1": "nung.pdf"},
        {},
        "Rechnung.pdf",
    ),
    (
        "continuations past nine sort numerically",
        {f"filename*{n}": str(n % 10) for n in range(12)} | {"filename*12": ".pdf"},
        {},
        "012345678901.pdf",
    ),
    (
        "rfc2231 form wins over plain",
        {"filename": "fallback.pdf", "filename*": "utf-8''%E2%82%AC.pdf"},
        {},
        "€.pdf",
    ),
    ("rfc2047 B", {"filename": "=?utf-8?B?UsOpY2hudW5nLnBkZg==?="}, {}, "Réchnung.pdf"),
    ("rfc2047 Q latin-1", {"filename": "=?iso-8859-1?Q?R=E9chnung.pdf?="}, {}, "Réchnung.pdf"),
    (
        "rfc2047 word inside text",
        {"filename": "Rechnung =?utf-8?Q?M=C3=BCller?= 7.pdf"},
        {},
        "Rechnung Müller 7.pdf",
    ),
    (
        "rfc2047 undecodable word kept raw",
        {"filename": "=?utf-8?B?a?=.pdf"},
        {},
        "=?utf-8?B?a?=.pdf",
    ),
    ("rfc2047 word missing padding", {"filename": "=?utf-8?B?UsOpY2g?=.pdf"}, {}, "Réch.pdf"),
    ("rfc2231 unknown charset", {"filename*": "x-nope''R%C3%A9.pdf"}, {}, "Ré.pdf"),
    ("rfc2231 non-text codec", {"filename*": "base64''R%C3%A9.pdf"}, {}, "Ré.pdf"),
    ("rfc2047 unknown charset", {"filename": "=?x-nope?Q?R=E9.pdf?="}, {}, "R\ufffd.pdf"),
    ("rfc2231 without ticks", {"filename*": "R%C3%A9.pdf"}, {}, "Ré.pdf"),
    ("content-type name", {}, {"name": "from-name.pdf"}, "from-name.pdf"),
    ("content-type name*", {}, {"name*": "utf-8''%C3%BC.pdf"}, "ü.pdf"),
    ("filename wins over name", {"filename": "a.pdf"}, {"name": "b.pdf"}, "a.pdf"),
    ("empty filename falls back to name", {"filename": "  "}, {"name": "b.pdf"}, "b.pdf"),
    ("path traversal", {"filename": "../../etc/x.pdf"}, {}, "x.pdf"),
    ("windows path", {"filename": "C:\\Users\\me\\x.pdf"}, {}, "x.pdf"),
    ("encoded traversal", {"filename*": "utf-8''..%2F..%2Fx.pdf"}, {}, "x.pdf"),
    # worker.mail.text's rules: NUL and ESC vanish, a line break separates words.
    ("control chars and NUL", {"filename": "in\x00vo\rice\n\x1b.pdf"}, {}, "invo ice .pdf"),
    ("hidden file", {"filename": ".hidden.pdf"}, {}, "hidden.pdf"),
    ("bidi override", {"filename": "invoice\u202efdp.exe"}, {}, "invoicefdp.exe"),
    ("only a directory", {"filename": "../"}, {}, None),
    ("dot dot", {"filename": ".."}, {}, None),
    ("empty", {"filename": ""}, {}, None),
    ("none at all", {}, {"charset": "utf-8"}, None),
]


@pytest.mark.parametrize(
    ("disposition_params", "params", "expected"),
    [case[1:] for case in FILENAME_CASES],
    ids=[case[0] for case in FILENAME_CASES],
)
def test_decode_filename(
    disposition_params: dict[str, str], params: dict[str, str], expected: str | None
) -> None:
    part = BodyPart(
        section="2",
        content_type="application/octet-stream",
        params=params,
        disposition="attachment",
        disposition_params=disposition_params,
    )
    assert decode_filename(part) == expected


@pytest.mark.parametrize(
    ("name", "suffix"),
    [("a" * 300 + ".pdf", ".pdf"), ("b" * 300, "bbb"), ("c" * 250 + "." + "x" * 40, "xxx")],
    ids=["keeps extension", "no extension", "long extension is cut"],
)
def test_long_filenames_are_capped(name: str, suffix: str) -> None:
    part = BodyPart(
        section="1", content_type="application/pdf", disposition_params={"filename": name}
    )
    decoded = decode_filename(part)
    assert decoded is not None
    assert len(decoded) == FILENAME_MAX_CHARS
    assert decoded.endswith(suffix)
    assert decoded[0] == name[0]


# --- transfer encodings -----------------------------------------------------------------

PAYLOAD = b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<< /Type /Catalog >>\nendobj\n" * 3


def b64_lines(data: bytes) -> bytes:
    return base64.encodebytes(data).replace(b"\n", b"\r\n")


def b64_padded_per_line(data: bytes, width: int = 7) -> bytes:
    return b"\r\n".join(base64.b64encode(data[i : i + width]) for i in range(0, len(data), width))


@pytest.mark.parametrize(
    ("raw", "encoding", "expected"),
    [
        pytest.param(base64.b64encode(PAYLOAD), "base64", PAYLOAD, id="base64"),
        pytest.param(b64_lines(PAYLOAD), "BASE64", PAYLOAD, id="base64 CRLF lines, upper case"),
        pytest.param(b"  " + b64_lines(PAYLOAD) + b"\t ", " base64 ", PAYLOAD, id="whitespace"),
        pytest.param(
            base64.b64encode(PAYLOAD[:-1]).rstrip(b"="), "base64", PAYLOAD[:-1], id="no padding"
        ),
        pytest.param(base64.b64encode(PAYLOAD) + b"==", "base64", PAYLOAD, id="extra padding"),
        pytest.param(b64_padded_per_line(PAYLOAD), "base64", PAYLOAD, id="padding mid-text"),
        pytest.param(base64.b64encode(b"ab") + b"Q", "base64", b"ab", id="dangling char"),
        pytest.param(b"", "base64", b"", id="empty base64"),
        pytest.param(binascii.b2a_qp(PAYLOAD), "quoted-printable", PAYLOAD, id="qp"),
        pytest.param(b"=25PDF-1.4=\r\nx", "Quoted-Printable", b"%PDF-1.4x", id="qp soft break"),
        pytest.param(PAYLOAD, "7bit", PAYLOAD, id="7bit"),
        pytest.param(PAYLOAD, "8bit", PAYLOAD, id="8bit"),
        pytest.param(PAYLOAD, "binary", PAYLOAD, id="binary"),
        pytest.param(PAYLOAD, "x-uuencode", PAYLOAD, id="unknown"),
        pytest.param(PAYLOAD, "", PAYLOAD, id="empty encoding"),
    ],
)
def test_decode_transfer(raw: bytes, encoding: str, expected: bytes) -> None:
    assert decode_transfer(raw, encoding) == expected


@pytest.mark.parametrize(
    "raw",
    [PAYLOAD, b"SGVsbG8*", b"SGVs bG8-_", "Grüße".encode()],
    ids=["raw pdf", "asterisk", "url-safe alphabet", "8-bit"],
)
def test_decode_transfer_rejects_what_is_not_base64(raw: bytes) -> None:
    with pytest.raises(ValueError, match=r"^broken base64: byte 0x"):
        decode_transfer(raw, "base64")


@pytest.mark.parametrize(
    ("prefix", "encoding", "expected"),
    [
        pytest.param(b64_lines(PAYLOAD)[:64], "base64", True, id="base64 first 64 octets"),
        pytest.param(base64.b64encode(PAYLOAD)[:7], "base64", True, id="cut mid-quantum, 5 B"),
        pytest.param(base64.b64encode(PAYLOAD)[:6], "base64", False, id="cut, only 4 B"),
        pytest.param(
            base64.b64encode(b"\r\n %PDF-1.4")[:64], "base64", True, id="leading whitespace"
        ),
        pytest.param(base64.b64encode(PAYLOAD)[:16] + b"*junk", "base64", True, id="junk after"),
        pytest.param(b"*junk" + base64.b64encode(PAYLOAD), "base64", False, id="junk first"),
        pytest.param(base64.b64encode(b"PK\x03\x04zip")[:64], "base64", False, id="zip"),
        pytest.param(PAYLOAD[:64], "base64", False, id="raw pdf labelled base64"),
        pytest.param(binascii.b2a_qp(PAYLOAD)[:64], "quoted-printable", True, id="qp"),
        pytest.param(b"=25PDF-1.4", "quoted-printable", True, id="qp escaped %"),
        pytest.param(b"=25PD=", "quoted-printable", False, id="qp cut at soft break"),
        pytest.param(b"=2", "quoted-printable", False, id="qp cut mid escape"),
        pytest.param(PAYLOAD[:64], "7bit", True, id="7bit"),
        pytest.param(PAYLOAD[:64], "binary", True, id="binary"),
        pytest.param(b"Hello, here is your invoice", "7bit", False, id="text"),
        pytest.param(b"", "base64", False, id="empty"),
    ],
)
def test_probe_is_pdf(prefix: bytes, encoding: str, expected: bool) -> None:
    assert probe_is_pdf(prefix, encoding) is expected


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (PAYLOAD, True),
        (b" \t\r\n\x0c" + PAYLOAD, True),
        (b"%PDF", False),
        (b"%pdf-1.4", False),
        (b"\x00%PDF-1.4", False),
        (b"\xef\xbb\xbf%PDF-1.4", False),
        (b"junk%PDF-1.4", False),
        (b" " * 2000 + PAYLOAD, False),
        (b"", False),
    ],
    ids=["pdf", "leading ws", "short", "lower", "nul", "bom", "junk", "ws past window", "empty"],
)
def test_is_pdf_bytes(data: bytes, expected: bool) -> None:
    assert is_pdf_bytes(data) is expected


ENCODINGS = st.sampled_from(
    ["base64", "quoted-printable", "7bit", "8bit", "binary", "x-unknown", "BASE64"]
)


@given(st.binary(max_size=300), ENCODINGS)
def test_decode_transfer_raises_only_value_error(raw: bytes, encoding: str) -> None:
    try:
        decoded = decode_transfer(raw, encoding)
    except ValueError as exc:
        assert encoding.lower() == "base64"
        assert str(exc).startswith("broken base64")
        return
    assert isinstance(decoded, bytes)
    assert isinstance(probe_is_pdf(raw[:64], encoding), bool)


BASE64_TEXT = st.text(
    alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=", max_size=80
)


@given(BASE64_TEXT)
def test_well_formed_fast_path_agrees_with_the_lenient_decoder(text: str) -> None:
    # decode_transfer tries binascii's strict mode first; wherever that accepts the
    # text, the answer must be the one the lenient decoder gives.
    compact = text.encode()
    stream = Base64Stream()
    stream.feed(compact)
    assert decode_transfer(compact, "base64") == stream.finish()


@given(st.binary(max_size=300))
def test_base64_and_qp_round_trip(data: bytes) -> None:
    assert decode_transfer(b64_lines(data), "base64") == data
    assert decode_transfer(binascii.b2a_qp(data), "quoted-printable") == data


# --- structure limits -------------------------------------------------------------------


def leaf(section: str) -> BodyPart:
    return BodyPart(section=section, content_type="application/pdf", size=10)


def chain(depth: int) -> BodyPart:
    """A PDF `depth` levels below the root: forwarded mails inside forwarded mails."""
    node = leaf("x")
    for _ in range(depth):
        node = BodyPart(section="", content_type="multipart/mixed", children=(node,))
    return node


def wide(count: int) -> BodyPart:
    children = tuple(leaf(str(number)) for number in range(1, count + 1))
    return BodyPart(section="", content_type="multipart/mixed", children=children)


@pytest.mark.parametrize(
    ("root", "max_parts", "max_depth", "expected"),
    [
        (leaf("1"), 1, 0, None),
        (wide(2), 3, 1, None),
        (wide(3), 3, 1, "too many MIME parts: more than 3 (INVOICE_RELAY_MAX_PARTS)"),
        (wide(2), 3, 0, "MIME nesting too deep: more than 0 levels (INVOICE_RELAY_MAX_DEPTH)"),
        (chain(10), 100, 10, None),
        (
            chain(11),
            100,
            10,
            "MIME nesting too deep: more than 10 levels (INVOICE_RELAY_MAX_DEPTH)",
        ),
        (chain(11), 5, 10, "too many MIME parts: more than 5 (INVOICE_RELAY_MAX_PARTS)"),
        (wide(5000), 100, 10, "too many MIME parts: more than 100 (INVOICE_RELAY_MAX_PARTS)"),
    ],
    ids=[
        "single",
        "two leaves",
        "three leaves",
        "flat too deep",
        "ten deep",
        "eleven deep",
        "parts first",
        "five thousand",
    ],
)
def test_structure_limit(
    root: BodyPart, max_parts: int, max_depth: int, expected: str | None
) -> None:
    assert structure_limit(root, max_parts=max_parts, max_depth=max_depth) == expected


def test_parsed_forwarded_mail_has_depth_three() -> None:
    forwarded = parse_bodystructure(
        multipart([text(), message(multipart([text(), PDF], top=False))])
    )
    assert structure_limit(forwarded, max_parts=100, max_depth=3) is None
    assert structure_limit(forwarded, max_parts=100, max_depth=2) is not None


# --- parts cut from a whole mail (the one fetched for DKIM) ------------------------------


def _single_part_pdf_mail() -> bytes:
    body = base64.encodebytes(_SECTION_PDF).replace(b"\n", b"\r\n")
    return (
        b"From: invoices@shop.example\r\nSubject: one part\r\nMIME-Version: 1.0\r\n"
        b"Content-Type: application/pdf; name=a.pdf\r\n"
        b"Content-Transfer-Encoding: base64\r\n\r\n" + body
    )


_SECTION_PDF = b"%PDF-1.4\n" + bytes(range(256)) * 8 + b"\n%%EOF\n"


@pytest.mark.parametrize(
    ("mail", "section"),
    [
        (lambda: samples.invoice_mail(pdfs=[("a.pdf", _SECTION_PDF)]), "2"),
        (lambda: samples.invoice_mail(pdfs=[("a.pdf", b"x"), ("b.pdf", _SECTION_PDF)]), "3"),
        (
            lambda: samples.forwarded_mail(samples.invoice_mail(pdfs=[("a.pdf", _SECTION_PDF)])),
            "2.2",
        ),
        (_single_part_pdf_mail, "1"),
    ],
    ids=["attachment", "second attachment", "inside an attached mail", "single-part mail"],
)
def test_a_section_cut_from_the_whole_mail_is_what_the_server_returns(
    mail: Callable[[], bytes], section: str
) -> None:
    raw = mail()
    server = FakeMailbox()  # returns BODY[section] as an IMAP server does
    uid = server.add(raw)
    (summary,) = server.summaries([uid])
    assert summary.structure is not None
    sizes = {c.section: c.size for c in find_candidates(summary.structure)}
    expected = server.fetch_sections({uid: [section]})[(uid, section)]

    cut = section_bodies(raw, {section: sizes[section]})

    assert cut == {section: expected}
    assert decode_transfer(cut[section], "base64") == _SECTION_PDF


@pytest.mark.parametrize(
    ("section", "size_change"),
    [("2", 1), ("2", -1), ("9", 0), ("2.1", 0), ("x", 0), ("", 0)],
    ids=["longer", "shorter", "no such part", "below a leaf", "not a number", "the root"],
)
def test_a_section_not_found_as_described_is_left_to_the_server(
    section: str, size_change: int
) -> None:
    raw = samples.invoice_mail(pdfs=[("a.pdf", _SECTION_PDF)])
    server = FakeMailbox()
    uid = server.add(raw)
    size = len(server.fetch_sections({uid: ["2"]})[(uid, "2")]) + size_change
    assert section_bodies(raw, {section: size}) == {}
