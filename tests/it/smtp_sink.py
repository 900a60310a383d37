"""A real SMTP server for the mail tests (aiosmtpd): stores every message it accepts as a file, refuses
recipients whose address starts with "reject" with a 550, and with --cert/--key offers and requires STARTTLS.

Usage: smtp_sink.py PORT DIR [--cert PEM --key PEM]. Prints "ready" once it listens; runs until killed."""

import argparse
import os
import signal
import ssl

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP


class Sink:
    def __init__(self, directory):
        self.directory = directory
        self.count = 0

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if address.startswith("reject"):
            return "550 5.1.1 <%s>: Recipient address rejected: User unknown" % address
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        self.count += 1
        name = os.path.join(self.directory, "%06d.eml" % self.count)
        tls = "yes" if session.ssl else "no"
        with open(name + ".tmp", "wb") as out:
            out.write(("X-Sink-Tls: %s\r\nX-Sink-Rcpt: %s\r\n" % (tls, ",".join(envelope.rcpt_tos))).encode())
            out.write(envelope.original_content)
        os.rename(name + ".tmp", name)
        return "250 2.0.0 Ok: queued as SINK%06d" % self.count


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("port", type=int)
    parser.add_argument("directory")
    parser.add_argument("--cert")
    parser.add_argument("--key")
    args = parser.parse_args()
    tls = None
    if args.cert:
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.load_cert_chain(args.cert, args.key)
    controller = Controller(
        Sink(args.directory),
        hostname="127.0.0.1",
        port=args.port,
        tls_context=tls,
        require_starttls=tls is not None,
        server_hostname="sink.test",
    )
    controller.start()
    print("ready", flush=True)
    try:
        signal.pause()
    finally:
        controller.stop()


if __name__ == "__main__":
    main()
