"""Pure: where to cut a run of mails into batches bounded by count and by bytes.

A poll reads new mail in batches: each batch's PDFs are held in memory while they are
checked and written in one transaction. A count alone does not bound that: 200 mails of
8 MB are 1.6 GB. The size is the server's RFC822.SIZE, known from the summaries before
any body is fetched, and an upper bound of what a mail's parts decode to.
"""

from __future__ import annotations

from collections.abc import Sequence


def size_batches(
    sizes: Sequence[int], *, max_bytes: int, max_count: int | None = None
) -> list[int]:
    """The lengths of consecutive batches of `sizes`: each adds up to at most
    `max_bytes` and holds at most `max_count` mails, but every batch holds at least one
    mail (a mail larger than `max_bytes` is a batch of its own; the mail size limit
    decides whether it is read at all)."""
    if max_bytes < 1 or (max_count is not None and max_count < 1):
        raise ValueError("max_bytes and max_count must be positive")
    lengths: list[int] = []
    count = total = 0
    for size in sizes:
        octets = max(size, 0)
        if count and (total + octets > max_bytes or count == max_count):
            lengths.append(count)
            count = total = 0
        count += 1
        total += octets
    if count:
        lengths.append(count)
    return lengths
