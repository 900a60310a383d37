//! mDNS on a real (virtual) LAN. Two network namespaces joined by a veth pair stand for the appliance and an
//! admin's laptop: enrolld runs in one, and in the other an independent mDNS implementation (python-zeroconf,
//! `mdns_peer.py`) browses for it, resolves the services and the `.local` name, and connects over HTTPS trusting
//! only the CA the box serves. The box then gains an address (as from DHCP): the announcement follows and the
//! certificate is re-issued for it. On SIGTERM the browser sees the services withdrawn.
//!
//! Needs root (CAP_NET_ADMIN) for `ip netns`, as the test script and CI have. Nothing leaves the namespaces.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{Receiver, channel};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::common::{BIN, wait_with_deadline};

const BOX_ADDR: &str = "10.203.0.1";
const NEW_ADDR: &str = "10.203.0.9";
const PEER_ADDR: &str = "10.203.0.2";

/// Two namespaces and a veth pair, removed on drop.
struct Lan {
    appliance: String,
    laptop: String,
    box_if: String,
}

impl Lan {
    fn create() -> Lan {
        let id = std::process::id() % 100_000;
        let lan = Lan {
            appliance: format!("enrolld-box-{id}"),
            laptop: format!("enrolld-peer-{id}"),
            box_if: format!("veb{id}"),
        };
        let peer_if = format!("vep{id}");
        lan.cleanup();
        let (a, l) = (lan.appliance.as_str(), lan.laptop.as_str());
        ip(&["netns", "add", a]);
        ip(&["netns", "add", l]);
        ip(&["link", "add", &lan.box_if, "type", "veth", "peer", "name", &peer_if]);
        ip(&["link", "set", &lan.box_if, "netns", a]);
        ip(&["link", "set", &peer_if, "netns", l]);
        ip(&["-n", a, "addr", "add", &format!("{BOX_ADDR}/24"), "dev", &lan.box_if]);
        ip(&["-n", l, "addr", "add", &format!("{PEER_ADDR}/24"), "dev", &peer_if]);
        for (ns, dev) in [(a, lan.box_if.as_str()), (l, peer_if.as_str())] {
            ip(&["-n", ns, "link", "set", "lo", "up"]);
            ip(&["-n", ns, "link", "set", dev, "up"]);
        }
        lan
    }

    fn cleanup(&self) {
        for ns in [&self.appliance, &self.laptop] {
            let _ = Command::new("ip").args(["netns", "del", ns]).stderr(Stdio::null()).status();
        }
    }

    fn exec(&self, ns: &str, program: &str) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", ns, program]);
        command
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        self.cleanup();
    }
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("iproute2's `ip` is installed by tests/run");
    assert!(
        out.status.success(),
        "ip {args:?} failed: {} (this test needs root for network namespaces)",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The laptop's browser process: events in, commands out.
struct Peer {
    child: Child,
    stdin: ChildStdin,
    events: Receiver<Value>,
    /// Events that arrived but no wait has taken yet (services announce in any order).
    unclaimed: Vec<Value>,
    seen: Vec<Value>,
}

impl Peer {
    fn start(lan: &Lan) -> Peer {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/it/mdns_peer.py");
        let mut child = lan
            .exec(&lan.laptop, "python3")
            .args(["-u", script])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, events) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let event: Value =
                    serde_json::from_str(&line).unwrap_or_else(|_| json!({"event": "raw", "line": line}));
                if tx.send(event).is_err() {
                    break;
                }
            }
        });
        Peer { child, stdin, events, unclaimed: Vec::new(), seen: Vec::new() }
    }

    fn send(&mut self, command: Value) {
        writeln!(self.stdin, "{command}").unwrap();
        self.stdin.flush().unwrap();
    }

    /// Takes the first event matching `want`, from those already arrived or, waiting, from new ones; keeps
    /// everything seen for the failure message.
    fn expect(&mut self, what: &str, limit: Duration, want: impl Fn(&Value) -> bool) -> Value {
        if let Some(position) = self.unclaimed.iter().position(&want) {
            return self.unclaimed.remove(position);
        }
        let deadline = Instant::now() + limit;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.events.recv_timeout(left) {
                Ok(event) => {
                    self.seen.push(event.clone());
                    if want(&event) {
                        return event;
                    }
                    self.unclaimed.push(event);
                }
                Err(_) => break,
            }
        }
        panic!("no {what} within {limit:?}; the peer saw: {:#?}", self.seen);
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The daemon process, killed if the test fails before it stops it (an orphan would hold the test's output open).
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn is(event: &Value, kind: &str, service_type: &str) -> bool {
    event["event"] == kind && event["type"] == service_type
}

fn has_address(event: &Value, address: &str) -> bool {
    event["addresses"].as_array().is_some_and(|list| list.iter().any(|a| a == address))
}

#[test]
fn found_on_the_lan_by_another_host_and_follows_address_changes() {
    let lan = Lan::create();
    let state = tempfile::tempdir().unwrap();
    let log = state.path().join("daemon.log");
    let mut daemon = Running(
        lan.exec(&lan.appliance, BIN)
            .args(["serve", "--state-dir", state.path().join("s").to_str().unwrap(), "--hostname", "enroll"])
            .args(["--https-listen", "[::]:8443", "--http-listen", "[::]:8080"])
            .env("ENROLLD_CERT_CHECK_INTERVAL_SECS", "1")
            .stderr(std::fs::File::create(&log).unwrap())
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let daemon_log = || std::fs::read_to_string(&log).unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !daemon_log().contains("ready: open") {
        assert!(Instant::now() < deadline, "daemon not ready:\n{}", daemon_log());
        assert!(daemon.0.try_wait().unwrap().is_none(), "daemon exited:\n{}", daemon_log());
        std::thread::sleep(Duration::from_millis(50));
    }

    let mut peer = Peer::start(&lan);
    let limit = Duration::from_secs(40);
    let https = peer.expect("_https._tcp service", limit, |e| {
        (is(e, "added", "_https._tcp.local.") || is(e, "updated", "_https._tcp.local.")) && has_address(e, BOX_ADDR)
    });
    assert_eq!(https["name"], "enrolld on enroll._https._tcp.local.");
    assert_eq!(https["server"], "enroll.local.");
    assert_eq!(https["port"], 8443);
    assert_eq!(https["txt"]["path"], "/");

    let enrolld = peer.expect("_enrolld._tcp service", limit, |e| {
        (is(e, "added", "_enrolld._tcp.local.") || is(e, "updated", "_enrolld._tcp.local.")) && has_address(e, BOX_ADDR)
    });
    assert_eq!(enrolld["port"], 8443);
    assert_eq!(enrolld["txt"]["ca"], "/ca.crt");
    let ca_pem = std::fs::read(state.path().join("s/pki/ca.crt")).unwrap();
    let ca_der = rustls_pki_types::pem::PemObject::from_pem_slice(&ca_pem)
        .map(|der: rustls_pki_types::CertificateDer<'static>| der)
        .unwrap();
    assert_eq!(enrolld["txt"]["ca_sha256"], enrolld::pki::sha256_hex(&ca_der), "TXT pins the CA");

    peer.send(json!({"cmd": "resolve_host", "name": "enroll.local."}));
    let host = peer.expect("enroll.local address", limit, |e| e["event"] == "host");
    assert!(has_address(&host, BOX_ADDR), "{host}");

    // The laptop fetches the CA and connects by the .local name, as a browser would.
    let ca_url = format!("http://{BOX_ADDR}:8080/ca.crt");
    peer.send(json!({"cmd": "https", "host": BOX_ADDR, "port": 8443, "server_name": "enroll.local", "ca_url": ca_url}));
    let checked = peer.expect("HTTPS check", limit, |e| e["event"] == "https");
    assert_eq!(checked["ok"], true, "{checked}");
    assert_eq!(checked["status"], "HTTP/1.1 200 OK");
    assert!(checked["sans"].as_array().unwrap().iter().any(|s| s == BOX_ADDR), "{checked}");

    // DHCP hands the box another address: the announcement and the certificate both follow.
    ip(&["-n", &lan.appliance, "addr", "add", &format!("{NEW_ADDR}/24"), "dev", &lan.box_if]);
    peer.expect("announcement of the new address", Duration::from_secs(30), |e| {
        e["event"] == "updated" && has_address(e, NEW_ADDR)
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ca_url = format!("http://{NEW_ADDR}:8080/ca.crt");
        peer.send(json!({"cmd": "https", "host": NEW_ADDR, "port": 8443, "server_name": NEW_ADDR, "ca_url": ca_url}));
        let checked = peer.expect("HTTPS check by the new address", limit, |e| e["event"] == "https");
        if checked["ok"] == true {
            break;
        }
        assert!(Instant::now() < deadline, "certificate never re-issued for {NEW_ADDR}: {checked}\n{}", daemon_log());
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(daemon_log().contains("names changed: +10.203.0.9"), "{}", daemon_log());

    // SIGTERM: goodbye packets withdraw both services.
    crate::common::signal(daemon.0.id(), nix::sys::signal::Signal::SIGTERM);
    let status = wait_with_deadline(&mut daemon.0, Duration::from_secs(10));
    assert_eq!(status.code(), Some(0), "{}", daemon_log());
    peer.expect("withdrawal of _https._tcp", limit, |e| is(e, "removed", "_https._tcp.local."));
}
