//! The storage engine's floor: how long sled itself takes for as many writes as a 100,000-row CSV import makes,
//! with nothing of enrolld's around them (no parsing, no JSON, no domain checks). Whatever an import does on top
//! of sled, it cannot be faster than this on the same machine.
//!
//! Run: `cargo bench --bench store_floor` (results go in BENCHMARKS.md).

// A benchmark stops at the first failure; there is nobody to report an error to.
#![allow(clippy::expect_used)]

use std::time::Instant;

use sled::Transactional;

/// Rows in the import benchmark.
const ROWS: u64 = 100_000;
/// sled writes per imported row: the invite and its 8 index entries, 1.5 delivery jobs with their index entry,
/// and 0.6 new users with theirs (see BENCHMARKS.md).
const WRITES_PER_ROW: u64 = 13;
/// Rows per transaction or batch, as the import applies them.
const BATCH_ROWS: u64 = 500;

fn open(name: &str) -> (sled::Db, Vec<sled::Tree>, std::path::PathBuf) {
    let dir = std::env::temp_dir().join(format!("enrolld-store-floor-{}-{name}", std::process::id()));
    let db = sled::open(&dir).expect("open sled");
    let trees = (0..WRITES_PER_ROW).map(|t| db.open_tree(format!("t{t}")).expect("open tree")).collect();
    (db, trees, dir)
}

/// Key `n` of a tree: time-ordered like enrolld's ids and index keys.
fn key(n: u64) -> [u8; 16] {
    let mut key = [0; 16];
    key[..8].copy_from_slice(&(1u64 << 40 | n).to_be_bytes());
    key[8..].copy_from_slice(&n.wrapping_mul(0x9E37_79B9_7F4A_7C15).to_be_bytes());
    key
}

fn report(what: &str, writes: u64, started: Instant) {
    let took = started.elapsed().as_secs_f64();
    println!("{what}: {writes} writes in {took:.2} s, {:.2} µs a write", took * 1e6 / writes as f64);
}

fn main() {
    let value = [7u8; 16];
    let writes = ROWS * WRITES_PER_ROW;

    let (db, trees, dir) = open("plain");
    let started = Instant::now();
    for n in 0..writes {
        trees[0].insert(key(n), &value).expect("insert");
    }
    db.flush().expect("flush");
    report("one tree, plain inserts", writes, started);
    drop((trees, db));
    let _ = std::fs::remove_dir_all(dir);

    let (db, trees, dir) = open("batches");
    let started = Instant::now();
    for batch in 0..ROWS / BATCH_ROWS {
        for tree in &trees {
            let mut writes = sled::Batch::default();
            for row in batch * BATCH_ROWS..(batch + 1) * BATCH_ROWS {
                writes.insert(&key(row), &value);
            }
            tree.apply_batch(writes).expect("apply batch");
        }
    }
    db.flush().expect("flush");
    report("13 trees, one batch per tree per 500 rows", writes, started);
    drop((trees, db));
    let _ = std::fs::remove_dir_all(dir);

    let (db, trees, dir) = open("transactions");
    let started = Instant::now();
    for batch in 0..ROWS / BATCH_ROWS {
        trees[..]
            .transaction(|views| {
                for row in batch * BATCH_ROWS..(batch + 1) * BATCH_ROWS {
                    for view in views {
                        view.insert(&key(row), &value)?;
                    }
                }
                Ok::<_, sled::transaction::ConflictableTransactionError<()>>(())
            })
            .expect("transaction");
    }
    db.flush().expect("flush");
    report("13 trees, one transaction per 500 rows", writes, started);
    drop((trees, db));
    let _ = std::fs::remove_dir_all(dir);

    let (db, trees, dir) = open("threads");
    let started = Instant::now();
    std::thread::scope(|scope| {
        for half in trees.chunks(trees.len().div_ceil(2)) {
            scope.spawn(move || {
                for n in 0..ROWS {
                    for tree in half {
                        tree.insert(key(n), &value).expect("insert");
                    }
                }
            });
        }
    });
    db.flush().expect("flush");
    report("13 trees, plain inserts from two threads", writes, started);
    drop((trees, db));
    let _ = std::fs::remove_dir_all(dir);
}
