//! Creating 100,000 invites (each with its delivery job and audit entry, one transaction each) in an on-disk store,
//! then listing the first page of pending invites and counting with that many stored, and the admin's Enrollment
//! page (the whole HTTP handler: session, query, template) over them.
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
    admin_pages(&store, &domain);
    let size: u64 = walk_size(&dir);
    println!("database size on disk: {:.1} MiB", size as f64 / 1048576.0);
    drop(store);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The Enrollment page through the HTTPS router as a signed-in admin's browser asks for it: the first page, a
/// later page (its next link followed ten times), and a search with a filter.
fn admin_pages(store: &Store, domain: &Enrollment) {
    use tower::ServiceExt as _;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let auth = enrolld::domain::auth::Auth::new(domain.clone(), time::Duration::hours(1)).expect("auth");
    auth.bootstrap("admin", Some("bench password 1234")).expect("admin");
    let token = auth.login("admin", "bench password 1234", None).expect("sign in").token;
    let state = enrolld::http::AppState::new(
        store.clone(),
        "".into(),
        Arc::new(SystemClock),
        domain.clone(),
        auth,
        enrolld::mail::Mail::unconfigured(),
    );
    let limits = enrolld::http::Limits {
        request_timeout: Duration::from_secs(30),
        max_body_bytes: 1 << 20,
        import_max_bytes: 1 << 20,
    };
    let router = enrolld::http::https_router(state, limits);
    let get = |path: &str| {
        let request = axum::http::Request::get(path)
            .header("cookie", format!("__Host-enrolld_session={token}"))
            .body(axum::body::Body::empty())
            .expect("request");
        let response = runtime.block_on(router.clone().oneshot(request)).expect("response");
        assert_eq!(response.status(), 200, "{path}");
        let body = runtime.block_on(http_body_util::BodyExt::collect(response.into_body())).expect("body").to_bytes();
        String::from_utf8(body.to_vec()).expect("utf-8")
    };
    time_queries("Enrollment page (HTTP handler, 50 rows), first page", 100, || {
        assert!(get("/admin/enrollment").matches("<tr").count() > 50);
    });
    let mut later = "/admin/enrollment".to_owned();
    for _ in 0..10 {
        let page = get(&later);
        let next = page.find(">Next page<").expect("a next link");
        let start = page[..next].rfind("href=\"").expect("its href") + 6;
        let end = start + page[start..].find('"').expect("link end");
        later = page[start..end].replace("&amp;", "&").replace("&#x2f;", "/").replace("&#x3d;", "=");
    }
    time_queries("Enrollment page, the 11th page (cursor)", 100, || {
        assert!(get(&later).matches("<tr").count() > 50);
    });
    time_queries("Enrollment page, Android invites of users matching \"user42\"", 20, || {
        get("/admin/enrollment?tab=pending&q=user42&platform=android");
    });
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
