"""Pure: the audit page's query string as an `AuditSearch`, and back as links."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, date, datetime, timedelta
from urllib.parse import urlencode

from worker.models import DEFAULT_PAGE_ROWS, AuditSearch, Outcome, RouteScope

FIELDS = ("invoice", "sender", "filename", "outcome", "route", "from", "to")
_MAX_FIELD = 200  # characters of one search field kept


def _text(params: Mapping[str, str], name: str) -> str | None:
    value = params.get(name, "").strip()[:_MAX_FIELD]
    return value or None


def _day(text: str | None) -> date | None:
    if text is None:
        return None
    try:
        return date.fromisoformat(text)
    except ValueError:
        return None  # a hand-edited URL: the field is ignored, not an error page


def _page(text: str | None) -> int:
    try:
        return max(int(text or "1"), 1)
    except ValueError:
        return 1


def search_from_query(
    params: Mapping[str, str],
    scope: RouteScope,
    *,
    page_rows: int | None = DEFAULT_PAGE_ROWS,
) -> AuditSearch:
    """`from` and `to` are days (UTC), both included; `page` counts from 1; an
    unknown outcome or a malformed day is ignored. `page_rows` None: every row."""
    outcome = _text(params, "outcome")
    outcomes = tuple(o for o in Outcome if o.value == outcome)
    first, last = _day(_text(params, "from")), _day(_text(params, "to"))
    page = _page(params.get("page"))
    return AuditSearch(
        scope=scope,
        invoice_number=_text(params, "invoice"),
        sender=_text(params, "sender"),
        filename=_text(params, "filename"),
        outcomes=outcomes,
        route=_text(params, "route"),
        received_from=None if first is None else datetime.combine(first, datetime.min.time(), UTC),
        received_before=None
        if last is None
        else datetime.combine(last + timedelta(days=1), datetime.min.time(), UTC),
        offset=0 if page_rows is None else (page - 1) * page_rows,
        limit=page_rows,
    )


def query_string(params: Mapping[str, str], **changes: str) -> str:
    """The search's own fields (and `changes`), for paging and the CSV link."""
    kept = {name: params[name] for name in FIELDS if params.get(name)}
    kept.update({name: value for name, value in changes.items() if value})
    return urlencode(kept)


def page_numbers(total: int, page_rows: int, current: int) -> Sequence[int]:
    """The pages to link: first, last and two around the current one."""
    last = max((total + page_rows - 1) // page_rows, 1)
    wanted = {1, last, *range(max(current - 2, 1), min(current + 2, last) + 1)}
    return sorted(wanted)
