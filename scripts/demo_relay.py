"""The relay's main job end to end, on a throwaway Dovecot, SMTP sink and SQLite file.

Run through `scripts/demo`, which installs what this needs first. Everything runs on
loopback and is stopped and removed at the end.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

from tests import samples
from tests.servers.dovecot import running_dovecot
from tests.servers.smtp_sink import running_sink

FORWARD_TO = "inbox-4711@getmyinvoices.example"


def _relay(env: dict[str, str], *args: str) -> str:
    command = [sys.executable, "-m", "worker", *args]
    print(f"\n$ invoice-relay {' '.join(args)}", flush=True)
    result = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    sys.stdout.write(result.stdout)
    if result.returncode != 0:
        sys.stdout.write(result.stderr)
        raise SystemExit(f"invoice-relay {args[0]} exited {result.returncode}")
    return result.stdout


def _fill(append: object) -> None:
    first = samples.invoice_pdf(number="1042", amount="99.00")
    second = samples.invoice_pdf(number="1043", amount="12.50")
    rerendered = samples.invoice_pdf(
        number="1042",
        amount="99.00",
        created=datetime(2026, 11, 24, 9, 30, tzinfo=UTC),
        producer="Printout Designer (re-render)",
    )
    mails = [
        samples.invoice_mail(pdfs=[("Invoice 1042.pdf", first)], subject="Invoice 1042"),
        samples.invoice_mail(pdfs=[("Invoice 1043.pdf", second)], subject="Invoice 1043"),
        # The automation fired again: the same file once more ...
        samples.invoice_mail(pdfs=[("Invoice 1042.pdf", first)], subject="Invoice 1042"),
        # ... and a fresh render of the same invoice (new date and producer).
        samples.invoice_mail(pdfs=[("Invoice 1042.pdf", rerendered)], subject="Invoice 1042"),
        samples.plain_mail(subject="Your order has shipped"),
        samples.mislabelled_mail(),
    ]
    for raw in mails:
        append(raw)  # type: ignore[operator]
    print(
        f"mailbox filled with {len(mails)} mails: 2 invoices, a resend, a re-render, "
        "a mail without PDF and a text file named invoice.pdf"
    )


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="invoice-relay-demo-") as work:
        base = Path(work)
        (base / "imap").mkdir()
        with running_dovecot(base / "imap", tls=False) as imap, running_sink() as smtp:
            print(f"Dovecot on 127.0.0.1:{imap.port}, SMTP sink on 127.0.0.1:{smtp.port}")
            _fill(imap.append)
            env = {
                "PATH": os.environ.get("PATH", ""),
                "HOME": work,
                "INVOICE_RELAY_IMAP_HOST": imap.host,
                "INVOICE_RELAY_IMAP_PORT": str(imap.port),
                "INVOICE_RELAY_IMAP_SECURITY": "none",
                "INVOICE_RELAY_IMAP_USER": imap.user,
                "INVOICE_RELAY_IMAP_PASSWORD": imap.password,
                "INVOICE_RELAY_SMTP_HOST": smtp.host,
                "INVOICE_RELAY_SMTP_PORT": str(smtp.port),
                "INVOICE_RELAY_SMTP_SECURITY": "none",
                "INVOICE_RELAY_FORWARD_TO": FORWARD_TO,
                "INVOICE_RELAY_FORWARD_FROM": "relay@shop.example",
                "INVOICE_RELAY_DATABASE_URL": f"sqlite:///{base / 'relay.db'}",
                "INVOICE_RELAY_LOG_FORMAT": "text",
            }
            _relay(env, "once")
            print(f"\nthe SMTP sink received {len(smtp.messages)} mail(s) for {FORWARD_TO}:")
            for mail in smtp.messages:
                attachment = next(mail.message.iter_attachments())
                print(f"  {mail.message['Subject']!s:<16} {attachment.get_filename()}")
            _relay(env, "once")
            print(f"(the sink still holds {len(smtp.messages)} mail(s): nothing sent twice)")
            _relay(env, "audit")
    print("\ndemo finished; Dovecot and the sink are stopped and their files removed")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
