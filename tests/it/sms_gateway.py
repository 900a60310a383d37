"""A small HTTP SMS gateway for the SMS tests: records every request as a JSON line in LOG and answers like a
typical SMS API (echoing the text back, as many do). A number ending in 0400 is refused (400); one ending in 0503 fails once (503), then is accepted.

Usage: sms_gateway.py PORT LOG. Prints "ready" once it listens; runs until killed."""

import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

seen = set()


class Gateway(BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0))).decode()
        with open(sys.argv[2], "a") as log:
            log.write(json.dumps({"method": "POST", "path": self.path, "headers": dict(self.headers), "body": body}) + "\n")
        to = json.loads(body).get("to", "")
        digits = "".join(c for c in to if c.isdigit())
        if digits.endswith("0400"):
            self.answer(400, {"error": "invalid destination number"})
        elif digits.endswith("0503") and digits not in seen:
            seen.add(digits)
            self.answer(503, {"error": "try again later"})
        else:
            # Like many real gateways, the answer echoes the message back.
            text = json.loads(body).get("text", "")
            self.answer(200, {"status": "queued", "id": "msg-%d" % len(open(sys.argv[2]).readlines()), "body": text})

    def answer(self, status, document):
        payload = json.dumps(document).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


server = ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Gateway)
print("ready", flush=True)
server.serve_forever()
