"""The IMAP adapter: one folder, opened read-only; the commands over `ImapConnection`.

imapclient's untyped results are turned into `worker.models` values at once
(`worker.imap.results`), and its errors are translated once into
`worker.errors.MailboxError` and its subclasses (`worker.imap.connection`). Reading
never changes the mailbox: the folder is EXAMINEd (read-only) and bodies are fetched
with BODY.PEEK. Only the after-forward session (`open_for_actions`,
INVOICE_RELAY_AFTER_FORWARD other than `keep`) SELECTs it, to flag or move settled mail.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from datetime import date

from worker.errors import MailboxError, TokenEndpointError
from worker.imap.connection import ImapConnection, quietly_logout
from worker.imap.results import SUMMARY_ITEMS, section_of, summary_of
from worker.models import FolderStatus, MailSummary

__all__ = ["ImapMailbox"]


class ImapMailbox(ImapConnection):
    """`worker.relay.ports.Mailbox` and `MailActions` over imapclient. Not thread-safe:
    one session at a time."""

    # --- reading ---------------------------------------------------------------------

    def new_uids(self, after_uid: int, since: date | None) -> list[int]:
        criteria: list[object] = ["UID", f"{after_uid + 1}:*"]
        if since is not None:
            criteria += ["SINCE", since]
        client = self._renewed()
        with self._translated("UID SEARCH"):
            found = client.search(criteria)
        # `n:*` always includes the highest UID, even when it is below n.
        return sorted(uid for uid in (int(value) for value in found) if uid > after_uid)

    def summaries(self, uids: Sequence[int]) -> list[MailSummary]:
        client = self._renewed()
        result: list[MailSummary] = []
        for batch in _batches(sorted(set(uids)), self.batch_size):
            with self._translated("UID FETCH"):
                response = client.fetch(batch, SUMMARY_ITEMS)
            for uid in batch:
                data = response.get(uid)
                if data is not None and b"RFC822.SIZE" in data:
                    result.append(summary_of(uid, data))
        # Dovecot answers a FETCH of a mail that another session expunged a moment ago
        # with made-up data (RFC822.SIZE 0, an empty text/plain: RFC 3501 allows it) and
        # `OK [EXPUNGEISSUED]`. No real mail has 0 bytes, so such a UID is looked up
        # (the FETCH delivered the EXPUNGE, so SEARCH knows) and left out when gone,
        # like a UID the server did not describe: recorded as vanished, not `no_pdf`.
        empty = [summary.uid for summary in result if summary.size == 0]
        if empty:
            with self._translated("UID SEARCH"):
                found = {int(value) for value in client.search(["UID", _uid_set(empty)])}
            result = [summary for summary in result if summary.size or summary.uid in found]
        return result

    def fetch_sections(
        self,
        wanted: Mapping[int, Sequence[str]],
        *,
        max_bytes: int | None = None,
        offset: int = 0,
    ) -> dict[tuple[int, str], bytes]:
        client = self._renewed()
        # Mails that want the same sections share one FETCH with a UID set.
        groups: dict[tuple[str, ...], list[int]] = defaultdict(list)
        for uid, sections in wanted.items():
            if sections:
                groups[tuple(sorted(set(sections)))].append(uid)
        result: dict[tuple[int, str], bytes] = {}
        for sections, group in groups.items():
            partial = f"<{offset}.{max_bytes}>" if max_bytes is not None else ""
            items = [f"BODY.PEEK[{section}]{partial}" for section in sections]
            for batch in _batches(sorted(group), self.batch_size):
                with self._translated("UID FETCH"):
                    response = client.fetch(batch, items)
                for uid in batch:
                    for key, value in response.get(uid, {}).items():
                        section = section_of(key)
                        if section in sections and isinstance(value, bytes):
                            result[(uid, section)] = value
        return result

    def fetch_range(self, uid: int, section: str, *, offset: int, length: int) -> bytes | None:
        """`BODY.PEEK[section]<offset.length>`: one range of a large part
        (`worker.mail.ranged.RangedFetch`); empty past the end, None when the mail is gone."""
        return self.fetch_sections({uid: [section]}, max_bytes=length, offset=offset).get(
            (uid, section)
        )

    def fetch_messages(self, uids: Sequence[int]) -> dict[int, bytes]:
        client = self._renewed()
        result: dict[int, bytes] = {}
        for batch in _batches(sorted(set(uids)), self.batch_size):
            with self._translated("UID FETCH"):
                response = client.fetch(batch, ["BODY.PEEK[]"])
            for uid in batch:
                value = response.get(uid, {}).get(b"BODY[]")
                if isinstance(value, bytes):
                    result[uid] = value
        return result

    # --- IDLE (RFC 2177), on a connection of its own ----------------------------------

    def supports_idle(self) -> bool:
        client = self._require_client()
        with self._translated("CAPABILITY"):
            return bool(client.has_capability("IDLE"))

    def idle_start(self) -> None:
        with self._translated("IDLE"):
            self._require_client().idle()

    def idle_wait(self, timeout: float) -> bool:
        """Wait in IDLE up to `timeout` seconds; True when the server announced mail."""
        client = self._require_client()
        started = time.monotonic()
        with self._translated("IDLE"):
            responses = client.idle_check(timeout=timeout)
        if not responses and time.monotonic() - started < timeout / 2:
            # imapclient returns nothing, at once, when the server has hung up.
            raise MailboxError("connection dropped during IDLE", host=self.host, port=self.port)
        return _announces_mail(responses)

    def idle_done(self) -> bool:
        """Leave IDLE; True when mail was announced since the last `idle_wait`."""
        with self._translated("IDLE DONE"):
            _, responses = self._require_client().idle_done()
        return _announces_mail(responses)

    # --- lent to a poll (worker.service.lending) ---------------------------------------

    def begin_loan(self, deadline_seconds: float | None) -> None:
        """This open session, out of IDLE, goes to one poll: the poll's deadline runs
        from now, and announcements from here on are kept for `end_loan`."""
        client = self._require_client()
        client.take_untagged("EXISTS")  # those of IDLE DONE were seen already
        self.deadline_seconds = deadline_seconds
        self._start_deadline()

    def end_loan(self) -> bool:
        """Back from the poll: the deadline stops. True when the server announced mail
        (an EXISTS) while the poll had the session: mail it may not have read."""
        self._stop_deadline()
        self.deadline_seconds = None
        client = self._client
        return client is not None and bool(client.take_untagged("EXISTS"))

    # --- after forwarding (worker.relay.ports.MailActions), never in `keep` mode ---------

    def open_for_actions(self) -> FolderStatus:
        """Connect, log in and SELECT the folder read-write: only for
        INVOICE_RELAY_AFTER_FORWARD other than `keep`."""
        self.close()
        client = self._connect()
        try:
            self._login(client)
            status = self._select(client, self.folder, readonly=False)
        except (MailboxError, TokenEndpointError):
            quietly_logout(client)
            raise
        self._client = client
        self._opened, self._readonly = status, False
        return status

    def capabilities(self) -> frozenset[str]:
        client = self._renewed()
        with self._translated("CAPABILITY"):
            found = client.capabilities()
        return frozenset(
            (item.decode("ascii", "replace") if isinstance(item, bytes) else str(item)).upper()
            for item in found
        )

    def folder_exists(self, folder: str) -> bool:
        client = self._renewed()
        with self._translated(f"LIST {folder}"):
            return bool(client.folder_exists(folder))

    def present_uids(self, uids: Sequence[int]) -> set[int]:
        client = self._renewed()
        found: set[int] = set()
        for batch in _batches(sorted(set(uids)), self.batch_size):
            with self._translated("UID SEARCH"):
                found.update(int(uid) for uid in client.search(["UID", _uid_set(batch)]))
        return found & set(uids)

    def add_flag(self, uids: Sequence[int], flag: str) -> None:
        client = self._renewed()
        for batch in _batches(sorted(set(uids)), self.batch_size):
            with self._translated("UID STORE"):
                client.add_flags(batch, [flag], silent=True)

    def move(self, uid: int, folder: str) -> None:
        with self._translated("UID MOVE"):
            self._renewed().move([uid], folder)

    def copy(self, uid: int, folder: str) -> None:
        with self._translated("UID COPY"):
            self._renewed().copy([uid], folder)

    def expunge_uid(self, uid: int) -> None:
        client = self._renewed()
        with self._translated("UID STORE"):
            client.add_flags([uid], [b"\\Deleted"], silent=True)
        with self._translated("UID EXPUNGE"):
            # UID EXPUNGE (RFC 4315) removes this UID only, never other \Deleted mail.
            client.uid_expunge([uid])

    def folder_holds(self, folder: str, message_id: str) -> bool:
        client = self._renewed()
        try:
            self._select(client, folder, readonly=True)
            with self._translated("SEARCH HEADER"):
                found = client.search(["HEADER", "MESSAGE-ID", message_id])
        finally:
            self._select(client, self.folder, readonly=False)
        return bool(found)


def _batches(uids: Sequence[int], size: int) -> Iterator[list[int]]:
    for start in range(0, len(uids), size):
        yield list(uids[start : start + size])


def _announces_mail(responses: Sequence[object]) -> bool:
    """Whether IDLE responses such as `(3, b'EXISTS')` tell of mail (EXISTS or RECENT)."""
    return any(
        isinstance(response, tuple) and len(response) >= 2 and response[1] in (b"EXISTS", b"RECENT")
        for response in responses
    )


def _uid_set(uids: Sequence[int]) -> str:
    return ",".join(str(uid) for uid in sorted(uids))
