"""Sending forwarded mail over SMTP: the envelope, the content and the answers' order.

`SmtpOutbox` is the adapter behind `worker.relay.ports.Destination` (and the notices'
`worker.relay.notify.NoticeSender`): it turns every smtplib, socket and TLS failure into
`SessionRefused` (the session is unusable, nothing counts) or a `DeliveryRefused` for this
one mail: 5xx `DeliveryRejected`, 4xx `DeliveryDeferred`, a connection lost while the
content went out `DeliveryUncertain`. The mail itself is built by `worker.delivery.message`;
the session is opened and logged into by `worker.delivery.session`, answers are worded
and classified by `worker.delivery.answers`.
(`worker.relay.pacer.SendPacer` enforces `INVOICE_RELAY_MAX_SENDS_PER_MINUTE`.)
"""

from __future__ import annotations

import logging
import smtplib
from collections.abc import Callable
from datetime import UTC, datetime
from email.message import EmailMessage
from pathlib import Path
from types import TracebackType
from typing import Self

from worker.delivery import answers, pipelined, session
from worker.delivery.content import raw_pieces, sha256_of, stuffed_pieces
from worker.delivery.framing import Abandoned, data
from worker.delivery.message import ForwardMail, build_forward, notice_message
from worker.errors import DeliveryUncertain, SessionRefused
from worker.models import DEFAULT_TIMEOUT_SECONDS, Credentials, Notice, Parcel, Receipt, Security

__all__ = ["LOST_DURING_SEND", "SmtpOutbox"]

logger = logging.getLogger(__name__)

LOST_DURING_SEND = 451  # the code a send gets when the connection died mid-DATA


class SmtpOutbox:
    """One SMTP session to the outgoing server: `worker.relay.ports.Destination` for
    forwarded PDFs, `worker.relay.notify.NoticeSender` for notices."""

    def __init__(
        self,
        *,
        host: str,
        port: int,
        security: Security,
        credentials: Credentials | None,
        forward_from: str,
        forward_to: str,
        ca_file: Path | None = None,
        timeout: float = DEFAULT_TIMEOUT_SECONDS,
    ) -> None:
        self._host = host
        self._port = port
        self._security = security
        self._credentials = credentials
        self._forward_from = forward_from
        self._forward_to = forward_to
        self._ca_file = ca_file
        self._timeout = timeout
        self._smtp: smtplib.SMTP | None = None
        self._renew_at: datetime | None = None  # an OAuth2 session: open again from then on
        # The recipient of the next mail's envelope, written while this one's answer was
        # awaited and not yet answered (PIPELINING); None when there is none.
        self._ahead: str | None = None
        self.round_trips = 0  # times this session waited for answers, for the bench

    def __repr__(self) -> str:
        return (
            f"SmtpOutbox(host={self._host!r}, port={self._port}, "
            f"security={self._security.value!r}, credentials={self._credentials!r})"
        )

    def __enter__(self) -> Self:
        self.open()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def is_open(self) -> bool:
        return self._smtp is not None

    def _refused(self, reason: str) -> SessionRefused:
        return SessionRefused(reason, host=self._host, port=self._port)

    def open(self) -> None:
        """Connect, TLS, log in (`worker.delivery.session`). Raises `SessionRefused`."""
        self.close()
        smtp, self._renew_at = session.open_session(
            host=self._host,
            port=self._port,
            security=self._security,
            credentials=self._credentials,
            ca_file=self._ca_file,
            timeout=self._timeout,
        )
        self._smtp = smtp
        logger.info(
            "smtp session open",
            extra={"action": "smtp_opened", "host": self._host, "port": self._port},
        )

    def deliver(
        self,
        parcel: Parcel,
        *,
        before_final: Callable[[], None] | None = None,
        more_follows: bool = False,
    ) -> Receipt:
        """Forward one PDF to FORWARD_TO (`worker.relay.ports.Destination.deliver`).

        The mail is built here (`worker.delivery.message.build_forward`); `before_final`
        runs before the terminating dot or `BDAT ... LAST`, the point after which the
        server may accept it. With `more_follows` and PIPELINING, the next mail's envelope
        goes out with this mail's end, before its answer is awaited.
        """
        mail = build_forward(parcel, forward_to=self._forward_to, forward_from=self._forward_from)
        answer = self.send(mail, before_end=before_final, more_follows=more_follows)
        return Receipt(delivery_id=mail.message_id, answer=answer)

    def send_notice(self, notice: Notice) -> str:
        """One failure notice (`worker.relay.notify.NoticeSender`)."""
        return self.send(notice_message(notice), recipient=notice.recipient)

    def send(
        self,
        message: ForwardMail | EmailMessage,
        *,
        recipient: str | None = None,
        before_end: Callable[[], None] | None = None,
        more_follows: bool = False,
    ) -> str:
        """Send one mail to FORWARD_TO (or `recipient`, for `check --send-test`).

        Returns the server's acceptance, e.g. "250 OK ...".

        Raises `SessionRefused` when the session cannot carry any mail (not open,
        sender or recipient refused, connection lost before the content went out) and a
        `DeliveryRefused` when the server answered this mail's content (4xx
        `DeliveryDeferred`, 5xx `DeliveryRejected`) or the connection died while it went
        out (`DeliveryUncertain`, code 451: it may or may not have arrived; the outbox is
        closed then).

        A server that offers PIPELINING gets the envelope in one write (RFC 2920), and
        one that offers CHUNKING too the content as `BDAT` (RFC 3030), so that a mail
        costs one round trip; the answers are classified as above, in order.
        """
        if self._smtp is not None and self._renew_at and datetime.now(UTC) >= self._renew_at:
            # Between two mails, before its token expires: a new session with a new token
            # (SMTP allows one AUTH per session). An envelope written ahead is withdrawn.
            logger.info("smtp session renewed for a fresh token", extra={"action": "smtp_renewed"})
            self._reset_or_drop(unread=2 if self._ahead is not None else 0)
            self.open()
        smtp = self._smtp
        if smtp is None:
            raise self._refused("the session is not open")
        if smtp.has_extn("pipelining"):
            return self._send_pipelined(
                smtp,
                message,
                recipient=recipient or self._forward_to,
                before_end=before_end,
                more_follows=more_follows,
            )
        sha256 = sha256_of(message)
        pieces = stuffed_pieces(message)
        self.round_trips += 4  # MAIL, RCPT, DATA, the content, one after another

        # Envelope first: a refusal here concerns the session (sender, recipient,
        # connection), never this mail's content.
        try:
            code, answer = smtp.mail(self._forward_from)
            if not 200 <= code < 300:
                self._reset_or_drop()
                raise self._refused(
                    f"sender {self._forward_from} refused (check INVOICE_RELAY_FORWARD_FROM): "
                    f"{answers.answer(code, answer)}"
                )
            to = recipient or self._forward_to
            code, answer = smtp.rcpt(to)
            if not 200 <= code < 300:
                self._reset_or_drop()
                raise self._refused(
                    f"recipient {to} refused (check INVOICE_RELAY_FORWARD_TO): "
                    f"{answers.answer(code, answer)}"
                )
        except (smtplib.SMTPException, OSError) as exc:
            self._drop()
            reason = answers.failure_reason(exc, timeout=self._timeout)
            raise self._refused(f"connection lost before sending: {reason}") from exc

        try:
            code, answer = data(smtp, pieces, before_end)
        except smtplib.SMTPDataError as exc:
            # The server refused the DATA command itself: an answer about this mail.
            self._reset_or_drop()
            raise answers.refusal(
                answers.answer(exc.smtp_code, exc.smtp_error), code=exc.smtp_code, sha256=sha256
            ) from exc
        except Abandoned as abandoned:
            # `before_end` raised: the mail is abandoned without its terminating dot, so
            # the server drops what it received with the connection.
            self._drop()
            raise abandoned.cause from None
        except (smtplib.SMTPException, OSError) as exc:
            # Part or all of the mail went out and no answer came back: the server may
            # have accepted it. Temporary, so it is retried under the same Message-ID.
            self._drop()
            reason = answers.failure_reason(exc, timeout=self._timeout)
            raise DeliveryUncertain(
                f"connection lost during send: {reason}",
                code=LOST_DURING_SEND,
                sha256=sha256,
            ) from exc

        if 200 <= code < 300:
            return answers.answer(code, answer)
        self._reset_or_drop()
        if 400 <= code < 600:
            raise answers.refusal(answers.answer(code, answer), code=code, sha256=sha256)
        # Neither 2xx, 4xx nor 5xx after the content is a broken server, which may have
        # kept the mail: retry later, like a connection lost during the send.
        raise DeliveryUncertain(answers.answer(code, answer), code=LOST_DURING_SEND, sha256=sha256)

    def _send_pipelined(
        self,
        smtp: smtplib.SMTP,
        message: ForwardMail | EmailMessage,
        *,
        recipient: str,
        before_end: Callable[[], None] | None,
        more_follows: bool,
    ) -> str:
        """`send` over PIPELINING: the envelope in one write, the content by BDAT when the
        server offers CHUNKING, else by DATA once its 354 came back; with `more_follows`
        the next envelope in the write that ends this mail."""
        chunking = smtp.has_extn("chunking")
        sha256 = sha256_of(message)
        following = pipelined.envelope(self._forward_from, recipient) if more_follows else b""
        ahead, self._ahead = self._ahead, None
        unread = 0  # answers asked for and not read yet, in order
        content_sent = False
        try:
            if ahead is not None and ahead != recipient:
                # An envelope for another recipient (a notice after forwards): dropped.
                self._reset_or_drop(unread=2)
                smtp = self._session()
                ahead = None
            envelope = b""
            if ahead is None:
                envelope = pipelined.envelope(self._forward_from, recipient, data=not chunking)
                if not chunking:
                    smtp.send(envelope)
            elif not chunking:
                smtp.send(b"DATA\r\n")  # an envelope written ahead ends without DATA
            unread = 2
            if not chunking or ahead is not None:
                # The envelope's answers before the content: DATA needs its 354 anyway,
                # and an envelope written ahead was answered while the last mail was.
                self.round_trips += 1 if ahead is None or not chunking else 0
                self._check_envelope(
                    pipelined.read_replies(smtp, 2), recipient, unread=0 if chunking else 1
                )
                unread = 0
            if chunking:
                pieces = raw_pieces(message)
                unread += pipelined.send_bdat(
                    smtp, pieces, before_end, first=envelope, then=following
                )
                content_sent = True
                self.round_trips += 1
                replies = pipelined.read_replies(smtp, unread)
                unread = 0
                if len(replies) > 1 and ahead is None:
                    self._check_envelope(
                        replies[:2], recipient, unread=2 if following else 0, content=True
                    )
                    replies = replies[2:]
                refused = [(code, answer) for code, answer in replies if not 200 <= code < 300]
                code, answer = refused[0] if refused else replies[-1]
            else:
                content_sent = True
                self.round_trips += 1
                code, answer = data(
                    smtp,
                    stuffed_pieces(message),
                    before_end,
                    then=following,
                    command_sent=True,
                )
        except smtplib.SMTPDataError as exc:
            # The server refused the DATA command itself: an answer about this mail.
            self._reset_or_drop()
            raise answers.refusal(
                answers.answer(exc.smtp_code, exc.smtp_error), code=exc.smtp_code, sha256=sha256
            ) from exc
        except Abandoned as abandoned:
            self._drop()
            raise abandoned.cause from None
        except (smtplib.SMTPException, OSError) as exc:
            self._drop()
            reason = answers.failure_reason(exc, timeout=self._timeout)
            if not content_sent:
                raise self._refused(f"connection lost before sending: {reason}") from exc
            raise DeliveryUncertain(
                f"connection lost during send: {reason}", code=LOST_DURING_SEND, sha256=sha256
            ) from exc
        if 200 <= code < 300:
            if following:
                self._ahead = recipient
            return answers.answer(code, answer)
        self._reset_or_drop(unread=2 if following else 0)
        if 400 <= code < 600:
            raise answers.refusal(answers.answer(code, answer), code=code, sha256=sha256)
        raise DeliveryUncertain(answers.answer(code, answer), code=LOST_DURING_SEND, sha256=sha256)

    def _check_envelope(
        self,
        replies: list[tuple[int, bytes]],
        recipient: str,
        *,
        unread: int,
        content: bool = False,
    ) -> None:
        """A refused sender or recipient refuses the session, whatever came after it."""
        (mail_code, mail_answer), (rcpt_code, rcpt_answer) = replies
        if 200 <= mail_code < 300 and 200 <= rcpt_code < 300:
            return
        if not content:
            self._after_refused_envelope(unread)
        else:
            self._reset_or_drop(unread=unread)
        if not 200 <= mail_code < 300:
            raise self._refused(
                f"sender {self._forward_from} refused (check INVOICE_RELAY_FORWARD_FROM): "
                f"{answers.answer(mail_code, mail_answer)}"
            )
        raise self._refused(
            f"recipient {recipient} refused (check INVOICE_RELAY_FORWARD_TO): "
            f"{answers.answer(rcpt_code, rcpt_answer)}"
        )

    def _after_refused_envelope(self, unread: int) -> None:
        """After a refused envelope, the pipelined DATA's answer (if one was asked for)
        says whether the session is still clean (`pipelined.must_drop`)."""
        if self._smtp is not None and unread and pipelined.must_drop(self._smtp):
            self._drop()
        else:
            self._reset_or_drop()

    def _session(self) -> smtplib.SMTP:
        if self._smtp is None:
            raise self._refused("the session was lost")
        return self._smtp

    def close(self) -> None:
        """QUIT; never raises."""
        self._ahead = None
        smtp, self._smtp = self._smtp, None
        if smtp is None:
            return
        try:
            smtp.quit()
        except (smtplib.SMTPException, OSError):
            session.discard(smtp)

    def _reset_or_drop(self, *, unread: int = 0) -> None:
        """RSET so the session can carry the next mail; drop it if even that fails.
        `unread` answers (of an envelope written ahead) are read and ignored first."""
        self._ahead = None
        smtp = self._smtp
        if smtp is None:
            return
        try:
            pipelined.read_replies(smtp, unread)
            code, _ = smtp.rset()
        except (smtplib.SMTPException, OSError):
            self._drop()
            return
        if not 200 <= code < 300:
            self._drop()

    def _drop(self) -> None:
        self._ahead = None
        smtp, self._smtp = self._smtp, None
        session.discard(smtp)
