#!/usr/bin/env python3
"""Sends one test case through an SMTP server with Python's smtplib, as a script or cron job
would: EmailMessage for the MIME, smtplib for the session, no TLS (the bridge listens on
loopback only).

Usage: send_smtplib.py HOST PORT USER PASSWORD MECHANISM CASE [ATTACHMENT_FILE]

MECHANISM is PLAIN or LOGIN. smtplib's login() would pick a mechanism itself, so the script
calls smtp.auth() with the mechanism it was told to use. CASE is one of plain, attachment,
utf8, dots, recipients, two (two messages on one connection). The test in real_clients.rs
checks what arrived; this script prints nothing on success and exits non-zero on any error.
"""

import smtplib
import sys
from email.message import EmailMessage
from email.utils import formatdate, make_msgid

SENDER = "printer@sandbox.test"


def message(subject, body, to, cc=(), bcc=()):
    msg = EmailMessage()
    msg["From"] = SENDER
    msg["To"] = ", ".join(to)
    if cc:
        msg["Cc"] = ", ".join(cc)
    if bcc:
        # send_message() puts Bcc addresses in the envelope and drops the header.
        msg["Bcc"] = ", ".join(bcc)
    msg["Subject"] = subject
    msg["Date"] = formatdate()
    msg["Message-ID"] = make_msgid(domain="client.test")
    # cte="8bit": send UTF-8 bodies unencoded (the server offers 8BITMIME) so the test sees
    # raw 8-bit bytes pass through the bridge.
    msg.set_content(body, cte="8bit")
    return msg


def main():
    host, port, user, password, mechanism, case = sys.argv[1:7]
    attachment = sys.argv[7] if len(sys.argv) > 7 else None
    tag = f"python {mechanism} {case}"

    if case == "plain":
        msgs = [message(tag, "Hello from smtplib.\n", ["alice@example.test"])]
    elif case == "attachment":
        msg = message(tag, "A 5 MB attachment follows.\n", ["alice@example.test"])
        with open(attachment, "rb") as f:
            msg.add_attachment(f.read(), maintype="application",
                               subtype="octet-stream", filename="blob.bin")
        msgs = [msg]
    elif case == "utf8":
        msgs = [message(f"{tag} Grüße – 日本語 ✓", "Grüße aus Köln — naïve café ✓\n",
                        ["alice@example.test"])]
    elif case == "dots":
        # Lines starting with a dot must be dot-stuffed by smtplib and unstuffed by the server.
        msgs = [message(tag, ".leading dot\n..two dots\n.\nend\n", ["alice@example.test"])]
    elif case == "recipients":
        msgs = [message(tag, "To several people.\n",
                        ["alice@example.test", "bob@example.test"],
                        cc=["carol@example.test"], bcc=["dave@example.test"])]
    elif case == "two":
        msgs = [message(f"{tag} 1/2", "First of two.\n", ["alice@example.test"]),
                message(f"{tag} 2/2", "Second of two.\n", ["bob@example.test"])]
    else:
        sys.exit(f"unknown case {case}")

    with smtplib.SMTP(host, int(port), local_hostname="client.test", timeout=50) as smtp:
        smtp.ehlo()
        smtp.user, smtp.password = user, password
        if mechanism == "PLAIN":
            smtp.auth("PLAIN", smtp.auth_plain)
        elif mechanism == "LOGIN":
            smtp.auth("LOGIN", smtp.auth_login)
        else:
            sys.exit(f"unknown mechanism {mechanism}")
        for msg in msgs:
            # Any refused recipient raises, so a silent partial delivery fails the test.
            refused = smtp.send_message(msg)
            if refused:
                sys.exit(f"refused recipients: {refused}")


if __name__ == "__main__":
    main()
