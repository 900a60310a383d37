//! 10,000 queued invites delivered by the outbox worker through the real relay client (lettre, pooled) to a local
//! SMTP server, measured from the worker's start until the last message is recorded as sent.
//!
//! The server is a minimal SMTP responder in this file, a test double, so the figure is enrolld's own throughput
//! rather than a mail server's. It answers every command with the reply RFC 5321 prescribes and counts messages.
//!
//! Run: `cargo bench --bench outbox` (results go in BENCHMARKS.md).

// A benchmark stops at the first failure; there is nobody to report an error to.
#![allow(clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use enrolld::clock::SystemClock;
use enrolld::config::{SmtpConfig, SmtpSecurity};
use enrolld::domain::{Actor, Enrollment, NewInvite, NewUser, Policy, RetryPolicy};
use enrolld::mail::outbox::{self, OutboxSettings};
use enrolld::mail::{Mail, Relay};
use enrolld::model::{Channels, Ownership, Platform};
use enrolld::store::Store;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

const MESSAGES: u64 = 10_000;

/// Accepts SMTP sessions and acknowledges every message.
async fn smtp_server(listener: TcpListener, received: Arc<AtomicU64>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else { return };
        // As mail servers do: replies go out at once instead of waiting on the client's delayed ACK.
        let _ = stream.set_nodelay(true);
        let received = received.clone();
        tokio::spawn(async move {
            let (read, mut write) = stream.into_split();
            let mut lines = BufReader::new(read).lines();
            let _ = write.write_all(b"220 bench.test ESMTP\r\n").await;
            let mut in_data = false;
            while let Ok(Some(line)) = lines.next_line().await {
                let reply: &[u8] = if in_data {
                    if line != "." {
                        continue;
                    }
                    in_data = false;
                    received.fetch_add(1, Ordering::Relaxed);
                    b"250 2.0.0 Ok: queued\r\n"
                } else {
                    match line.get(..4).map(str::to_ascii_uppercase).as_deref() {
                        Some("EHLO") => b"250-bench.test\r\n250 8BITMIME\r\n",
                        Some("DATA") => {
                            in_data = true;
                            b"354 End data with <CR><LF>.<CR><LF>\r\n"
                        }
                        Some("QUIT") => {
                            let _ = write.write_all(b"221 Bye\r\n").await;
                            return;
                        }
                        _ => b"250 OK\r\n",
                    }
                };
                if write.write_all(reply).await.is_err() {
                    return;
                }
            }
        });
    }
}

fn main() {
    // mail_max_connections; 8 unless BENCH_CONNECTIONS says otherwise.
    let connections: usize = std::env::var("BENCH_CONNECTIONS").ok().and_then(|c| c.parse().ok()).unwrap_or(8);
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    let dir = std::env::temp_dir().join(format!("enrolld-outbox-bench-{}", std::process::id()));
    let store = Store::open(&dir.join("db")).expect("open store");
    let domain = Enrollment::new(store.clone(), Arc::new(SystemClock), Policy::default(), &[7; 32]).expect("domain");
    let admin = Actor { name: "admin".into(), client: None };
    for n in 0..MESSAGES {
        let user = NewUser { name: format!("User {n}"), email: format!("user{n}@example.com"), ..Default::default() };
        let user = domain.create_user(&admin, &user).expect("user");
        let new = NewInvite {
            user_id: user.id,
            platform: [Platform::Ios, Platform::Android, Platform::Windows, Platform::Macos][n as usize % 4],
            ownership: Ownership::Corporate,
            group_id: None,
            channels: Channels::Email,
        };
        domain.create_invite(&admin, &new).expect("invite");
    }
    println!("queued {MESSAGES} invites");

    let received = Arc::new(AtomicU64::new(0));
    let took = runtime.block_on(async {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        tokio::spawn(smtp_server(listener, received.clone()));
        let smtp = SmtpConfig {
            host: "127.0.0.1".into(),
            port,
            security: SmtpSecurity::None,
            username: None,
            password: None,
            from_address: "it@example.com".into(),
            from_name: "Example IT".into(),
            reply_to: None,
            helo_name: "bench.local".into(),
            ca_file: None,
            ca_pem: None,
        };
        let relay = Relay::new(&smtp, connections).expect("relay");
        let mail = Mail::new(
            &domain,
            Some(relay),
            None,
            connections,
            enrolld::naming::Naming::new(
                enrolld::naming::Names { organisation: "Example Ltd".into(), hostname: "enroll".into() },
                None,
                None,
            ),
        )
        .expect("mail");
        let settings = OutboxSettings {
            mail,
            max_connections: connections,
            max_per_second: 10_000,
            retry: RetryPolicy::default(),
            ca_sha256: String::new(),
            addresses: Arc::new(enrolld::addrs::StaticAddresses::default()),
        };
        let shutdown = tokio_util::sync::CancellationToken::new();
        let started = Instant::now();
        let worker = tokio::spawn(outbox::run(domain.clone(), settings, shutdown.clone()));
        loop {
            let counts = domain.outbox_counts().expect("counts");
            if counts.sent >= MESSAGES {
                break;
            }
            assert_eq!(counts.failed, 0, "no message may fail");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let took = started.elapsed();
        shutdown.cancel();
        worker.await.expect("worker");
        took
    });
    let rss = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmHWM:")).map(str::to_owned))
        .unwrap_or_default();
    println!(
        "delivered {} messages in {:.2} s: {:.0} messages/s with {connections} connections ({rss})",
        received.load(Ordering::Relaxed),
        took.as_secs_f64(),
        MESSAGES as f64 / took.as_secs_f64()
    );
    drop(store);
    let _ = std::fs::remove_dir_all(&dir);
}
