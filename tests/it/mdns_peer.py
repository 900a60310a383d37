#!/usr/bin/env python3
"""A second host on the LAN, for the mDNS test: an independent mDNS implementation (python-zeroconf) that browses
for the appliance, plus an HTTPS client that trusts only the CA the appliance serves.

Speaks JSON lines: events on stdout as the browser sees them; commands on stdin.
  {"cmd": "https", "host": "10.203.0.1", "port": 8443, "server_name": "enroll.local", "ca_url": "http://..."}
  {"cmd": "resolve_host", "name": "enroll.local."}
"""
import json
import socket
import ssl
import sys
import threading
import urllib.request

from zeroconf import AddressResolver, ServiceBrowser, ServiceStateChange, Zeroconf

TYPES = ["_https._tcp.local.", "_enrolld._tcp.local."]
lock = threading.Lock()


def emit(obj):
    with lock:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()


def on_change(zeroconf, service_type, name, state_change):
    event = {
        ServiceStateChange.Added: "added",
        ServiceStateChange.Updated: "updated",
        ServiceStateChange.Removed: "removed",
    }[state_change]
    if state_change is ServiceStateChange.Removed:
        emit({"event": event, "type": service_type, "name": name})
        return
    # On a loaded machine the first resolution can time out; ask again rather than give up on the service.
    info = None
    for _ in range(5):
        info = zeroconf.get_service_info(service_type, name, timeout=3000)
        if info is not None and info.parsed_addresses():
            break
    if info is None:
        emit({"event": "unresolved", "type": service_type, "name": name})
        return
    txt = {k.decode(): (v.decode() if v is not None else None) for k, v in info.properties.items()}
    emit({
        "event": event,
        "type": service_type,
        "name": name,
        "server": info.server,
        "port": info.port,
        "addresses": sorted(info.parsed_addresses()),
        "txt": txt,
    })


def https_check(cmd):
    try:
        ca_pem = urllib.request.urlopen(cmd["ca_url"], timeout=5).read().decode()
        context = ssl.create_default_context(cadata=ca_pem)
        with socket.create_connection((cmd["host"], cmd["port"]), timeout=5) as raw:
            with context.wrap_socket(raw, server_hostname=cmd["server_name"]) as tls:
                cert = tls.getpeercert()
                request = f"GET /healthz HTTP/1.1\r\nHost: {cmd['server_name']}\r\nConnection: close\r\n\r\n"
                tls.sendall(request.encode())
                response = b""
                while chunk := tls.recv(4096):
                    response += chunk
        sans = [value for _, value in cert.get("subjectAltName", [])]
        status = response.split(b"\r\n", 1)[0].decode()
        emit({"event": "https", "ok": True, "status": status, "sans": sans, "version": tls.version()})
    except Exception as error:  # report every failure to the test, which asserts on it
        emit({"event": "https", "ok": False, "error": f"{type(error).__name__}: {error}"})


def main():
    zc = Zeroconf()
    browsers = [ServiceBrowser(zc, t, handlers=[on_change]) for t in TYPES]
    emit({"event": "browsing", "types": TYPES})
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["cmd"] == "https":
            https_check(cmd)
        elif cmd["cmd"] == "resolve_host":
            resolver = AddressResolver(cmd["name"])
            found = resolver.request(zc, 3000)
            emit({"event": "host", "name": cmd["name"], "found": found,
                  "addresses": sorted(resolver.parsed_addresses()) if found else []})
    for browser in browsers:
        browser.cancel()
    zc.close()


if __name__ == "__main__":
    main()
