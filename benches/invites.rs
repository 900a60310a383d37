//! Creating 100,000 invites (each with its delivery job and audit entry, one transaction each) in an on-disk store,
//! then listing the first page of pending invites and counting with that many stored.
//!
//! Run: `cargo bench --bench invites` (results go in BENCHMARKS.md).

// A benchmark stops at the first failure; there is nobody to report an error to.
#![allow(clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use enrolld::clock::SystemClock;
use enrolld::domain::{Actor, Enrollment, InviteQuery, NewInvite, NewUser, Policy};
use enrolld::model::{Channels, InviteStatus, Ownership, Platform};
use enrolld::store::Store;

const INVITES: usize = 100_000;
const USERS: usize = 5_000;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)]
}

fn time_queries(label: &str, runs: usize, mut query: impl FnMut()) {
    let mut times: Vec<Duration> = (0..runs)
        .map(|_| {
            let start = Instant::now();
            query();
            start.elapsed()
        })
        .collect();
    times.sort();
    println!(
        "{label}: median {:.2} ms, p99 {:.2} ms over {runs} runs",
        percentile(&times, 0.5).as_secs_f64() * 1e3,
        percentile(&times, 0.99).as_secs_f64() * 1e3
    );
}

fn main() {
    let dir = std::env::temp_dir().join(format!("enrolld-bench-{}", std::process::id()));
    let store = Store::open(&dir.join("db")).expect("open store");
    let domain = Enrollment::new(store.clone(), Arc::new(SystemClock), Policy::default(), &[7; 32]).expect("domain");
    let admin = Actor { name: "admin".into(), client: None };

    let users: Vec<_> = (0..USERS)
        .map(|n| {
            let new =
                NewUser { name: format!("User {n}"), email: format!("user{n}@example.com"), ..Default::default() };
            domain.create_user(&admin, &new).expect("user").id
        })
        .collect();

    let platforms = [Platform::Ios, Platform::Android, Platform::Windows, Platform::Macos];
    let start = Instant::now();
    for n in 0..INVITES {
        let new = NewInvite {
            user_id: users[n % USERS],
            platform: platforms[n % platforms.len()],
            ownership: Ownership::Corporate,
            group_id: None,
            channels: Channels::Email,
        };
        domain.create_invite(&admin, &new).expect("invite");
    }
    store.flush().expect("flush");
    let took = start.elapsed();
    println!(
        "created {INVITES} invites (invite + delivery job + audit entry per transaction, on disk) in {:.2} s: {:.0} invites/s",
        took.as_secs_f64(),
        INVITES as f64 / took.as_secs_f64()
    );

    let pending = InviteQuery { status: Some(InviteStatus::Pending), limit: Some(50), ..Default::default() };
    time_queries("first page (50) of pending invites, newest first", 200, || {
        let page = domain.invites(&pending).expect("list");
        assert_eq!(page.items.len(), 50);
    });
    let filtered = InviteQuery {
        status: Some(InviteStatus::Pending),
        platform: Some(Platform::Android),
        q: Some("user42".into()),
        limit: Some(50),
        ..Default::default()
    };
    time_queries("first page of pending Android invites of users matching \"user42\"", 20, || {
        domain.invites(&filtered).expect("list");
    });
    time_queries("dashboard counts", 200, || {
        assert_eq!(domain.dashboard().expect("counts").pending, INVITES as u64);
    });
    let size: u64 = walk_size(&dir);
    println!("database size on disk: {:.1} MiB", size as f64 / 1048576.0);
    drop(store);
    let _ = std::fs::remove_dir_all(&dir);
}

fn walk_size(path: &std::path::Path) -> u64 {
    std::fs::read_dir(path)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| match e.metadata() {
                    Ok(m) if m.is_dir() => walk_size(&e.path()),
                    Ok(m) => m.len(),
                    Err(_) => 0,
                })
                .sum()
        })
        .unwrap_or(0)
}
