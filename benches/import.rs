//! A generated 100,000-row invite CSV imported end to end through the import job: parse, validate, users, groups,
//! invites and delivery jobs persisted in an on-disk store. Reports the time and the process's peak RSS.
//!
//! Run: `cargo bench --bench import` (results go in BENCHMARKS.md).

// A benchmark stops at the first failure; there is nobody to report an error to.
#![allow(clippy::expect_used)]

use std::sync::Arc;
use std::time::Instant;

use enrolld::clock::SystemClock;
use enrolld::domain::{Actor, Enrollment, ImportRequest, Policy};
use enrolld::model::{ImportKind, ImportMode, ImportState};
use enrolld::store::Store;

const ROWS: usize = 100_000;

fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn main() {
    let dir = std::env::temp_dir().join(format!("enrolld-import-bench-{}", std::process::id()));
    let store = Store::open(&dir.join("db")).expect("open store");
    let domain = Enrollment::new(store.clone(), Arc::new(SystemClock), Policy::default(), &[7; 32])
        .expect("domain")
        .with_spool_dir(dir.join("imports"));
    let admin = Actor { name: "admin".into(), client: None };

    // 60,000 people, some with two or three devices; 40 groups; half with a phone number.
    let platforms = ["iOS", "Android", "Windows", "macOS", "iPadOS"];
    let mut file = String::from("USER NAME,EMAIL ADDRESS,OWNED BY,GROUP NAME,PLATFORM TYPE,PHONE NUMBER\r\n");
    for n in 0..ROWS {
        let person = n % 60_000;
        let device = n / 60_000;
        let phone = if person % 2 == 0 { format!("+1 202 555 {:04}", person % 10_000) } else { String::new() };
        file.push_str(&format!(
            "\"Person {person}, Jr.\",person{person}@example.com,{},Team {},{},{phone}\r\n",
            if person % 3 == 0 { "Personal" } else { "Corporate" },
            person % 40,
            platforms[(person + device) % platforms.len()],
        ));
    }
    println!("generated {ROWS} rows, {:.1} MiB", file.len() as f64 / 1048576.0);

    let mode = match std::env::var("IMPORT_MODE").as_deref() {
        Ok("valid_only") => ImportMode::ValidOnly,
        _ => ImportMode::All,
    };
    let request = ImportRequest { kind: ImportKind::Invites, mode, filename: Some("bench.csv".into()) };
    let rss_before = peak_rss_kib();
    let start = Instant::now();
    let import = domain.create_import(&admin, &request).expect("create");
    std::fs::write(domain.import_file(&import.id).expect("spool"), &file).expect("write spool");
    drop(file);
    let done = domain.run_import(&admin, &import.id, 0, &|| false).expect("import");
    store.flush().expect("flush");
    let took = start.elapsed();
    assert_eq!(done.state, ImportState::Done, "{}", done.message);
    println!(
        "imported {} invites ({} users, {} groups) in {:.2} s: {:.0} rows/s",
        done.report.invites_created,
        done.report.users_created,
        done.report.groups_created.len(),
        took.as_secs_f64(),
        ROWS as f64 / took.as_secs_f64()
    );
    println!(
        "peak RSS {:.1} MiB (before the import: {:.1} MiB)",
        peak_rss_kib() as f64 / 1024.0,
        rss_before as f64 / 1024.0
    );
    drop(store);
    let _ = std::fs::remove_dir_all(&dir);
}
