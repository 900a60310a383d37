#!/usr/bin/env python3
"""Measures the daemon as the appliance runs it: stripped binary size, start-to-ready time with existing state,
and idle resident memory; with --fresh, the first start instead.

Start-to-ready is the time from exec to systemd's READY=1 on NOTIFY_SOCKET (what `Type=notify` waits for), with
the state directory already made by an earlier start (CA and certificate exist). mDNS runs in a private network
namespace holding only loopback, so the measurement includes the mDNS responder without sending anything on a
real network; needs root for `unshare --net`. With --no-netns it runs with --no-mdns instead.

With --fresh, every run starts on an empty state directory (the first boot of a new box): it times exec → READY=1,
exec → the first 200 from /healthz over plain HTTP, and exec → the first 200 from SCEP GetCACert over HTTPS (the
device-identity CA, which takes the longest to make). It runs with --no-mdns, outside a network namespace, so the
probes reach the daemon on loopback.

Usage: python3 benches/daemon.py [BINARY] [--runs N] [--no-netns] [--fresh]
"""
import argparse
import http.client
import os
import signal
import socket
import ssl
import statistics
import subprocess
import tempfile
import time


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start(binary, state, notify_path, use_netns, https="127.0.0.1:0", http_addr="127.0.0.1:0"):
    serve = [binary, "serve", "--state-dir", state, "--https-listen", https, "--http-listen", http_addr]
    if use_netns:
        # `ip link set lo up` then exec, so the measured process is enrolld itself.
        command = ["unshare", "--net", "sh", "-c", 'ip link set lo up && exec "$@"', "sh", *serve]
    else:
        command = serve + ["--no-mdns"]
    env = {"NOTIFY_SOCKET": notify_path, "PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def wait_ready(sock, timeout=30.0):
    sock.settimeout(timeout)
    while True:
        message = sock.recv(4096).decode()
        if "READY=1" in message:
            return


def wait_for(began, fetch, timeout=60.0):
    """Milliseconds from `began` until `fetch()` answers 200 (polled every millisecond)."""
    while time.perf_counter() - began < timeout:
        try:
            if fetch() == 200:
                return (time.perf_counter() - began) * 1000
        except (OSError, http.client.HTTPException):
            pass
        time.sleep(0.001)
    raise SystemExit("no answer within the timeout")


def get_status(port, path, tls):
    if tls:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        connection = http.client.HTTPSConnection("127.0.0.1", port, timeout=5, context=context)
    else:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        connection.request("GET", path)
        return connection.getresponse().status
    finally:
        connection.close()


def summary(times):
    times = sorted(times)
    p90 = times[max(int(len(times) * 0.9) - 1, 0)]
    return f"median {statistics.median(times):.1f} ms, p90 {p90:.1f} ms, max {times[-1]:.1f} ms"


def fresh(args, use_netns):
    ready, healthy, device_ca = [], [], []
    for _ in range(args.runs):
        with tempfile.TemporaryDirectory() as tmp:
            state = os.path.join(tmp, "state")
            notify_path = os.path.join(tmp, "notify.sock")
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            sock.bind(notify_path)
            https, http_port = free_port(), free_port()
            began = time.perf_counter()
            process = start(args.binary, state, notify_path, use_netns, f"127.0.0.1:{https}", f"127.0.0.1:{http_port}")
            wait_ready(sock)
            ready.append((time.perf_counter() - began) * 1000)
            healthy.append(wait_for(began, lambda: get_status(http_port, "/healthz", False)))
            device_ca.append(wait_for(began, lambda: get_status(https, "/scep?operation=GetCACert", True)))
            stop(process)
            sock.close()
    where = "mDNS in a private netns" if use_netns else "--no-mdns"
    print(f"first start on an empty state directory, {args.runs} runs ({where}):")
    print(f"  exec -> READY=1:            {summary(ready)}")
    print(f"  exec -> /healthz 200:       {summary(healthy)}")
    print(f"  exec -> SCEP GetCACert 200: {summary(device_ca)}")


def stop(process):
    process.send_signal(signal.SIGTERM)
    code = process.wait(timeout=30)
    if code != 0:
        raise SystemExit(f"enrolld exited with {code} on SIGTERM")


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise SystemExit("no VmRSS")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("binary", nargs="?", default="target/x86_64-unknown-linux-musl/release/enrolld")
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--no-netns", action="store_true")
    parser.add_argument("--fresh", action="store_true", help="time first starts on empty state directories")
    args = parser.parse_args()
    use_netns = not args.no_netns

    size = os.path.getsize(args.binary)
    print(f"binary: {args.binary}")
    print(f"size: {size} bytes ({size / 1048576:.2f} MiB)")
    if args.fresh:
        fresh(args, use_netns=False)
        return

    with tempfile.TemporaryDirectory() as tmp:
        state = os.path.join(tmp, "state")
        notify_path = os.path.join(tmp, "notify.sock")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(notify_path)

        # First start creates the CA, the certificate and the database; not measured.
        first = start(args.binary, state, notify_path, use_netns)
        wait_ready(sock)
        stop(first)

        times = []
        for _ in range(args.runs):
            began = time.perf_counter()
            process = start(args.binary, state, notify_path, use_netns)
            wait_ready(sock)
            times.append((time.perf_counter() - began) * 1000)
            stop(process)
        print(f"start-to-ready with existing state over {args.runs} runs ({'mDNS in a private netns' if use_netns else '--no-mdns'}):")
        print(f"  {summary(times)}")

        process = start(args.binary, state, notify_path, use_netns)
        wait_ready(sock)
        time.sleep(10)
        idle = rss_kib(process.pid)
        stop(process)
        print(f"idle RSS 10 s after ready: {idle} KiB ({idle / 1024:.1f} MiB)")


if __name__ == "__main__":
    main()
