"""Pure MIME decisions: what the IMAP server says about a mail, turned into typed values.

Nothing here does I/O or imports imapclient. The rules, in one place:

* Text from the server arrives as bytes. It is decoded as UTF-8 when it is valid UTF-8
  and as Latin-1 otherwise (every byte maps to one character, so nothing is lost and
  nothing raises); types, subtypes, encodings and parameter names are lower-cased.
* Section numbers follow RFC 3501: the root of a multipart mail is "" and its children
  "1", "2"; a single-part mail's body is "1"; the body of a message/rfc822 part "2" is
  "2.1" when single-part, and when it is multipart its children are "2.1", "2.2" while
  the multipart node itself is "2.TEXT" (the specifier that fetches it whole).
* A part is a PDF candidate when it is a non-empty leaf, or when its label says PDF
  (then even when empty, so that the rejection is recorded). Labelled parts are
  `certain` and fetched whole; the others are probed by their first octets.
* Transfer decoding and "is a PDF" live in `worker.mail.transfer`.
"""

from __future__ import annotations

import email.parser
import email.policy
import urllib.parse
from collections.abc import Mapping, Sequence
from email.message import Message
from email.utils import decode_rfc2231

from worker.mail.headers import decode_encoded_words, decode_octets
from worker.mail.text import clean_filename
from worker.models import BodyPart, Candidate

PDF_CONTENT_TYPES = frozenset({"application/pdf", "application/x-pdf", "application/acrobat"})
PROBE_OCTETS = 64  # how many raw octets the pipeline fetches to probe an unlabelled part
FILENAME_MAX_CHARS = 255

_MAX_DEPTH = 40  # deeper nesting is hostile; Dovecot itself stops well before this
_MESSAGE_TYPES = frozenset({"message/rfc822", "message/global"})


# --- BODYSTRUCTURE --------------------------------------------------------------------


def parse_bodystructure(raw: object) -> BodyPart:
    """The BodyPart tree of imapclient's BODYSTRUCTURE value (`BodyData`).

    Odd shapes give a best-effort tree; raises ValueError only when `raw` is not a
    body structure at all or is nested more than 40 levels deep.
    """
    if not isinstance(raw, tuple | list) or not raw:
        raise ValueError(f"not a body structure: {type(raw).__name__}")
    if _is_multipart(raw):
        return _multipart(raw, section="", child_base="", depth=0)
    return _leaf(raw, section="1", depth=0)


def _is_multipart(node: Sequence[object]) -> bool:
    # imapclient wraps the children of a top-level multipart in a list; nested ones
    # (inside message/rfc822) stay as consecutive tuples, as on the wire.
    return bool(node) and isinstance(node[0], tuple | list)


def _multipart(node: Sequence[object], *, section: str, child_base: str, depth: int) -> BodyPart:
    if depth > _MAX_DEPTH:
        raise ValueError(f"body structure nested deeper than {_MAX_DEPTH} levels")
    first = node[0]
    if isinstance(first, list):
        raw_children: Sequence[object] = first
        rest = node[1:]
    else:
        count = 0
        while count < len(node) and isinstance(node[count], tuple | list):
            count += 1
        raw_children, rest = node[:count], node[count:]
    subtype = (_text(_at(rest, 0)) or "mixed").strip().lower()
    disposition, disposition_params = _disposition(_at(rest, 2))
    children: list[BodyPart] = []
    for number, child in enumerate(raw_children, start=1):
        if not isinstance(child, tuple | list) or not child:
            continue  # keep the numbering of the parts that follow
        child_section = f"{child_base}.{number}" if child_base else str(number)
        if _is_multipart(child):
            children.append(
                _multipart(child, section=child_section, child_base=child_section, depth=depth + 1)
            )
        else:
            children.append(_leaf(child, section=child_section, depth=depth + 1))
    return BodyPart(
        section=section,
        content_type=f"multipart/{subtype}",
        params=_params(_at(rest, 1)),
        disposition=disposition,
        disposition_params=disposition_params,
        children=tuple(children),
    )


def _leaf(node: Sequence[object], *, section: str, depth: int) -> BodyPart:
    if depth > _MAX_DEPTH:
        raise ValueError(f"body structure nested deeper than {_MAX_DEPTH} levels")
    main_type = (_text(_at(node, 0)) or "application").strip().lower()
    subtype = (_text(_at(node, 1)) or "octet-stream").strip().lower()
    content_type = f"{main_type}/{subtype}"
    embedded = _at(node, 8)
    is_message = (
        content_type in _MESSAGE_TYPES
        and len(node) > 9
        and isinstance(embedded, tuple | list)
        and bool(embedded)
    )
    # RFC 3501 body-type-text has one extra field (lines), body-type-msg three
    # (envelope, body, lines) before the extension data; md5 comes first there.
    if is_message:
        extension_start = 10
    elif main_type == "text":
        extension_start = 8
    else:
        extension_start = 7
    disposition, disposition_params = _disposition(_at(node, extension_start + 1))
    children: tuple[BodyPart, ...] = ()
    if is_message and isinstance(embedded, tuple | list):
        if _is_multipart(embedded):
            body = _multipart(
                embedded, section=f"{section}.TEXT", child_base=section, depth=depth + 1
            )
        else:
            body = _leaf(embedded, section=f"{section}.1", depth=depth + 1)
        children = (body,)
    return BodyPart(
        section=section,
        content_type=content_type,
        params=_params(_at(node, 2)),
        disposition=disposition,
        disposition_params=disposition_params,
        encoding=(_text(_at(node, 5)) or "7bit").strip().lower(),
        size=_size(_at(node, 6)),
        children=children,
    )


def _at(node: Sequence[object], index: int) -> object:
    return node[index] if index < len(node) else None


def _text(value: object) -> str | None:
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return value.decode("latin-1")
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)  # imapclient turns an unquoted all-digit atom into an int
    return None


def _size(value: object) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return max(value, 0)
    text = _text(value)
    return int(text) if text is not None and text.isascii() and text.isdigit() else 0


def _params(value: object) -> dict[str, str]:
    if not isinstance(value, tuple | list):
        return {}
    params: dict[str, str] = {}
    for index in range(0, len(value) - 1, 2):
        key, item = _text(value[index]), _text(value[index + 1])
        if key is not None and item is not None:
            params.setdefault(key.strip().lower(), item)
    return params


def _disposition(value: object) -> tuple[str | None, dict[str, str]]:
    if isinstance(value, tuple | list) and value:
        kind = _text(value[0])
        return (kind.strip().lower() if kind else None), _params(_at(value, 1))
    kind = _text(value)
    return (kind.strip().lower() if kind else None), {}


# --- filenames ------------------------------------------------------------------------


def decode_filename(part: BodyPart) -> str | None:
    """The part's filename, decoded and made safe, or None when it has none.

    Looks at the disposition's `filename` first, then the content type's `name`; an
    RFC 2231 form (`filename*`, continuations) wins over the plain one. RFC 2047 words
    in a plain value are decoded too, then cleaned by `worker.mail.text.clean_filename`
    (no directory, no leading dot, no control or bidi character; 255 characters at most,
    keeping a short extension).
    """
    for params, base in ((part.disposition_params, "filename"), (part.params, "name")):
        value = _rfc2231_value(params, base)
        if value is None and base in params:
            value = decode_encoded_words(params[base])
        if value is not None:
            cleaned = clean_filename(value, FILENAME_MAX_CHARS)
            if cleaned:
                return cleaned
    return None


def _rfc2231_value(params: Mapping[str, str], base: str) -> str | None:
    if f"{base}*" in params:
        return _decode_extended([(params[f"{base}*"], True)])
    segments: list[tuple[int, str, bool]] = []
    prefix = f"{base}*"
    for key, value in params.items():
        if not key.startswith(prefix):
            continue
        number = key[len(prefix) :]
        encoded = number.endswith("*")
        number = number.rstrip("*")
        if number.isascii() and number.isdigit():
            segments.append((int(number), value, encoded))
    if not segments:
        return None
    segments.sort(key=lambda segment: segment[0])
    return _decode_extended([(value, encoded) for _, value, encoded in segments])


def _decode_extended(segments: list[tuple[str, bool]]) -> str:
    """Join RFC 2231 segments; the first encoded one may start with charset'language'."""
    charset = "utf-8"
    octets = bytearray()
    for index, (segment, encoded) in enumerate(segments):
        if not encoded:
            octets += segment.encode("utf-8", "replace")
            continue
        value = segment
        if index == 0:
            declared, _language, value = decode_rfc2231(segment)
            charset = declared or "utf-8"
        octets += urllib.parse.unquote_to_bytes(value)
    return decode_octets(bytes(octets), charset)


# --- candidates -----------------------------------------------------------------------


def find_candidates(root: BodyPart) -> list[Candidate]:
    """Every leaf that is or may be a PDF, in section order.

    Labelled parts (name ends in .pdf, or a PDF content type) are `certain`, even when
    empty; every other non-empty leaf may still be a PDF by its bytes and is listed
    with `certain=False` for the pipeline to probe. Containers are never candidates.
    """
    candidates: list[Candidate] = []
    _collect(root, candidates)
    return candidates


def _collect(part: BodyPart, into: list[Candidate]) -> None:
    if part.children:
        for child in part.children:
            _collect(child, into)
        return
    if part.content_type.startswith("multipart/"):
        return  # a multipart without parts: nothing to fetch
    filename = decode_filename(part)
    certain = part.content_type in PDF_CONTENT_TYPES or (
        filename is not None and filename.lower().endswith(".pdf")
    )
    if certain or part.size > 0:
        into.append(
            Candidate(
                section=part.section,
                filename=filename,
                content_type=part.content_type,
                encoding=part.encoding,
                size=part.size,
                certain=certain,
            )
        )


def structure_limit(root: BodyPart, *, max_parts: int, max_depth: int) -> str | None:
    """Why the mail `root` describes is too large a tree to handle, or None.

    Parts are all nodes of the tree, containers and the root included (a single-part
    mail has 1, a text and a PDF in multipart/mixed 3). Depth counts the steps from the
    root to the deepest node: 0 for a single-part mail, 1 for a PDF in multipart/mixed,
    3 for a PDF in a forwarded mail (mixed, message/rfc822, mixed, PDF). Counting stops
    at the first limit passed; the reason names the setting.
    """
    parts = 0
    deepest = 0
    pending: list[tuple[BodyPart, int]] = [(root, 0)]
    while pending:
        part, depth = pending.pop()
        parts += 1
        deepest = max(deepest, depth)
        if parts > max_parts:
            return f"too many MIME parts: more than {max_parts} (INVOICE_RELAY_MAX_PARTS)"
        if deepest > max_depth:
            return f"MIME nesting too deep: more than {max_depth} levels (INVOICE_RELAY_MAX_DEPTH)"
        pending.extend((child, depth + 1) for child in part.children)
    return None


# --- parts of a whole mail ------------------------------------------------------------


def section_bodies(raw_mail: bytes, sizes: Mapping[str, int]) -> dict[str, bytes]:
    """The raw (still transfer-encoded) bodies of leaf sections, cut from a whole mail
    already in hand (fetched for DKIM), as `BODY[section]` would return them.

    `sizes` gives each wanted section's octet count from BODYSTRUCTURE; a section that
    cannot be found, or whose cut differs from that count, is left out, so the caller
    fetches it from the server as before: a mail parsed differently from the server's
    view never yields other bytes than the server's.
    """
    if not sizes:
        return {}
    root = email.parser.BytesParser(policy=email.policy.compat32).parsebytes(raw_mail)
    found: dict[str, bytes] = {}
    for section, size in sizes.items():
        node = _section_node(root, section)
        if node is None or node.is_multipart():
            continue
        payload = node.get_payload()
        if not isinstance(payload, str):
            continue
        body = payload.encode("ascii", "surrogateescape")  # the parser's own mapping back
        if len(body) == size:
            found[section] = body
    return found


def _section_node(root: Message, section: str) -> Message | None:
    """The node RFC 3501 numbers `section`: children of a multipart count from 1, a
    single-part body is its "1", and numbers below a message/rfc822 part go on inside
    the mail it carries."""
    node = root
    try:
        numbers = [int(number) for number in section.split(".")]
    except ValueError:
        return None
    whole_mail = True  # `node` is a mail (the root, or one a message/rfc822 part carries)
    for number in numbers:
        if not whole_mail and node.get_content_type() in _MESSAGE_TYPES:
            inner = node.get_payload()
            if not isinstance(inner, list) or len(inner) != 1 or not isinstance(inner[0], Message):
                return None
            node, whole_mail = inner[0], True
        if node.get_content_maintype() == "multipart":
            children = node.get_payload()
            if not isinstance(children, list) or not 1 <= number <= len(children):
                return None
            child = children[number - 1]
            if not isinstance(child, Message):
                return None
            node, whole_mail = child, False
        elif whole_mail and number == 1 and not node.is_multipart():
            whole_mail = False  # a single-part mail's body is its part 1
        else:
            return None
    return node
