#!/usr/bin/env python3
"""Measures the daemon as the appliance runs it: stripped binary size, start-to-ready time with existing state,
and idle resident memory.

Start-to-ready is the time from exec to systemd's READY=1 on NOTIFY_SOCKET (what `Type=notify` waits for), with
the state directory already made by an earlier start (CA and certificate exist). mDNS runs in a private network
namespace holding only loopback, so the measurement includes the mDNS responder without sending anything on a
real network; needs root for `unshare --net`. With --no-netns it runs with --no-mdns instead.

Usage: python3 benches/daemon.py [BINARY] [--runs N] [--no-netns]
"""
import argparse
import os
import signal
import socket
import statistics
import subprocess
import tempfile
import time


def start(binary, state, notify_path, use_netns):
    serve = [binary, "serve", "--state-dir", state, "--https-listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0"]
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
    args = parser.parse_args()
    use_netns = not args.no_netns

    size = os.path.getsize(args.binary)
    print(f"binary: {args.binary}")
    print(f"size: {size} bytes ({size / 1048576:.2f} MiB)")

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
        times.sort()
        p90 = times[int(len(times) * 0.9) - 1]
        print(f"start-to-ready with existing state over {args.runs} runs ({'mDNS in a private netns' if use_netns else '--no-mdns'}):")
        print(f"  median {statistics.median(times):.1f} ms, p90 {p90:.1f} ms, max {times[-1]:.1f} ms")

        process = start(args.binary, state, notify_path, use_netns)
        wait_ready(sock)
        time.sleep(10)
        idle = rss_kib(process.pid)
        stop(process)
        print(f"idle RSS 10 s after ready: {idle} KiB ({idle / 1024:.1f} MiB)")


if __name__ == "__main__":
    main()
