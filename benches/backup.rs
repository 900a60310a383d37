//! A backup of a store holding 100,000 invites (5,000 users, each invite with its delivery job and audit entry) on
//! disk, made while a writer goes on creating invites: how long the backup takes, how long the store's snapshot
//! holds writers back, how big the file is, and how long restoring it takes.
//!
//! Run: `cargo bench --bench backup` (results go in BENCHMARKS.md).

// A benchmark stops at the first failure; there is nobody to report an error to.
#![allow(clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use enrolld::backup::{self, Options, Passphrase, Source};
use enrolld::clock::SystemClock;
use enrolld::domain::{Actor, Enrollment, NewInvite, NewUser, Policy};
use enrolld::model::{Channels, Ownership, Platform};
use enrolld::store::Store;

const INVITES: usize = 100_000;
const USERS: usize = 5_000;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)]
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1e3
}

fn main() {
    let dir = std::env::temp_dir().join(format!("enrolld-bench-backup-{}", std::process::id()));
    let now = time::OffsetDateTime::now_utc();
    enrolld::pki::CertificateAuthority::load_or_create(&dir.join("pki"), "enroll", now).expect("CA");
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
    let invite = |n: usize| NewInvite {
        user_id: users[n % USERS],
        platform: [Platform::Ios, Platform::Android, Platform::Windows, Platform::Macos][n % 4],
        ownership: Ownership::Corporate,
        group_id: None,
        channels: Channels::Email,
    };
    let start = Instant::now();
    for n in 0..INVITES {
        domain.create_invite(&admin, &invite(n)).expect("invite");
    }
    store.flush().expect("flush");
    println!("created {INVITES} invites in {:.1} s", start.elapsed().as_secs_f64());

    // The snapshot alone: how long every table takes to walk with writers held back (no encryption, no disk).
    let start = Instant::now();
    let mut records = 0u64;
    store
        .snapshot::<enrolld::store::StoreError>(
            |_| true,
            |_, _, _| {
                records += 1;
                Ok(())
            },
        )
        .expect("snapshot");
    println!("snapshot of {records} records (every table, nothing written): {:.0} ms", ms(start.elapsed()));

    // A writer creating invites one transaction at a time, each timed, before, during and after the backup.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (domain, admin, stop) = (domain.clone(), admin.clone(), stop.clone());
        let users = users.clone();
        std::thread::spawn(move || {
            let mut timed = Vec::new();
            let mut n = INVITES;
            while !stop.load(Ordering::Relaxed) {
                let new = NewInvite {
                    user_id: users[n % USERS],
                    platform: Platform::Ios,
                    ownership: Ownership::Corporate,
                    group_id: None,
                    channels: Channels::Email,
                };
                let started = Instant::now();
                domain.create_invite(&admin, &new).expect("invite");
                timed.push((started, started.elapsed()));
                n += 1;
            }
            timed
        })
    };
    std::thread::sleep(Duration::from_secs(2));
    let started = Instant::now();
    let source = Source { store: &store, state_dir: &dir, host: "enroll", now };
    let passphrase = Passphrase::new("a passphrase for the benchmark").expect("passphrase");
    let (file, written) = backup::to_temporary_file(&source, &passphrase, &dir, &Options::default()).expect("backup");
    let ended = Instant::now();
    let took = ended - started;
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    // A transaction that overlapped the backup counts as during it (one held back ends just after the backup).
    let timed = writer.join().expect("writer");
    let overlaps = |(start, took): &(Instant, Duration)| *start < ended && *start + *took > started;
    let mut during: Vec<Duration> = timed.iter().filter(|t| overlaps(t)).map(|(_, took)| *took).collect();
    let mut quiet: Vec<Duration> = timed.iter().filter(|t| !overlaps(t)).map(|(_, took)| *took).collect();
    quiet.sort();
    during.sort();
    println!(
        "backup of {} records: {:.2} s (argon2id 64 MiB included), {:.1} MiB",
        written.trailer.records.values().sum::<u64>(),
        took.as_secs_f64(),
        written.bytes as f64 / 1048576.0
    );
    println!(
        "writer, one invite per transaction, without a backup: {} invites, median {:.2} ms, p99 {:.2} ms, max {:.1} ms",
        quiet.len(),
        ms(percentile(&quiet, 0.5)),
        ms(percentile(&quiet, 0.99)),
        ms(*quiet.last().expect("some"))
    );
    println!(
        "writer during the backup: {} invites, median {:.2} ms, p99 {:.2} ms, max {:.1} ms (the longest wait)",
        during.len(),
        ms(percentile(&during, 0.5)),
        ms(percentile(&during, 0.99)),
        ms(*during.last().expect("some"))
    );

    // Restoring it: decrypt, check, load into a new database, open it.
    let into = dir.join("restored");
    let started = Instant::now();
    let opened = backup::open(std::io::BufReader::with_capacity(1 << 16, file)).expect("header");
    let restored = opened.restore(&passphrase, &into).expect("restore");
    println!(
        "restore of {} records: {:.2} s",
        restored.trailer.records.values().sum::<u64>(),
        started.elapsed().as_secs_f64()
    );
    drop(store);
    let _ = std::fs::remove_dir_all(&dir);
}
