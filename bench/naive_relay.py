"""The baseline: the relay a user would write in an afternoon.

Fetch every message whole, parse it with `email`, hash each PDF with `hashlib`, and
send the ones not seen before over one SMTP connection; the hashes seen so far live in
an SQLite file. Run as `python -m bench.naive_relay` with the settings in the
environment (the same INVOICE_RELAY_* names as the relay; plain IMAP and SMTP only).
"""

from __future__ import annotations

import hashlib
import imaplib
import os
import smtplib
import sqlite3
import sys
from email import message_from_bytes, policy
from email.message import EmailMessage


def main() -> int:
    env = os.environ
    seen = sqlite3.connect(env["NAIVE_DATABASE"])
    seen.execute("CREATE TABLE IF NOT EXISTS seen (sha256 TEXT PRIMARY KEY)")
    imap = imaplib.IMAP4(env["INVOICE_RELAY_IMAP_HOST"], int(env["INVOICE_RELAY_IMAP_PORT"]))
    imap.login(env["INVOICE_RELAY_IMAP_USER"], env["INVOICE_RELAY_IMAP_PASSWORD"])
    imap.select(f'"{env.get("INVOICE_RELAY_IMAP_FOLDER", "INBOX")}"', readonly=True)
    smtp = smtplib.SMTP(env["INVOICE_RELAY_SMTP_HOST"], int(env["INVOICE_RELAY_SMTP_PORT"]))
    forwarded = 0
    _, found = imap.uid("SEARCH", "ALL")
    for uid in found[0].split():
        _, data = imap.uid("FETCH", uid, "(RFC822)")
        raw = data[0][1] if isinstance(data[0], tuple) else b""
        mail = message_from_bytes(raw, policy=policy.default)
        for part in mail.walk():
            name = part.get_filename() or ""
            if part.get_content_type() != "application/pdf" and not name.lower().endswith(".pdf"):
                continue
            pdf = part.get_payload(decode=True)
            if not isinstance(pdf, bytes) or not pdf.startswith(b"%PDF-"):
                continue
            digest = hashlib.sha256(pdf).hexdigest()
            if seen.execute("SELECT 1 FROM seen WHERE sha256 = ?", (digest,)).fetchone():
                continue
            forward = EmailMessage()
            forward["From"] = env["INVOICE_RELAY_FORWARD_FROM"]
            forward["To"] = env["INVOICE_RELAY_FORWARD_TO"]
            forward["Subject"] = str(mail["Subject"] or "Invoice")
            forward.set_content(f"Forwarded invoice from {mail['From']}.")
            forward.add_attachment(pdf, maintype="application", subtype="pdf", filename=name)
            smtp.send_message(forward)
            seen.execute("INSERT INTO seen VALUES (?)", (digest,))
            seen.commit()
            forwarded += 1
    smtp.quit()
    imap.logout()
    print(f"forwarded {forwarded}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
