//! The only code that touches sled: typed records with their indexes and counters, the schema version with its
//! migrations, transactions, and paged scans.
//!
//! Records are serde-encoded (JSON, so a field added with `#[serde(default)]` needs no migration). Every record type
//! says through [`Record`] which index entries and counters it has; [`Tx::put`] and [`Tx::delete`] keep all of them
//! in step with the record, inside the caller's transaction, so a crash leaves all of a change or none of it.

mod disk;
mod records;

use std::cell::Cell;
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use sled::Transactional;
use sled::transaction::{
    ConflictableTransactionError, TransactionError, TransactionalTree, UnabortableTransactionError,
};

pub use records::{CertificateRecord, Record, device_status_byte, hardware_key, id_of, invite_status_byte, time_key};

use crate::model::Id;

/// An index entry as stored: the index key and the primary key it points at.
pub type IndexPair = (Vec<u8>, Vec<u8>);

/// A step that brings a database from schema `n` to `n + 1`; `MIGRATIONS[0]` goes from 1 to 2.
pub type Migration = fn(&sled::Db) -> Result<(), StoreError>;

/// Every migration, oldest first. The schema version a build writes is `1 + MIGRATIONS.len()`.
const MIGRATIONS: &[Migration] = &[index_due_jobs];

/// The schema version this build reads and writes.
pub const SCHEMA_VERSION: u32 = 1 + MIGRATIONS.len() as u32;

/// The trees, by position. Index keys are laid out in `records.rs`; the status bytes there are the enum's order,
/// so reordering a status enum needs a migration.
pub mod tree {
    pub const META: usize = 0;
    pub const CERTIFICATES: usize = 1;
    pub const USERS: usize = 2;
    pub const USERS_BY_EMAIL: usize = 3;
    pub const GROUPS: usize = 4;
    pub const GROUPS_BY_NAME: usize = 5;
    pub const INVITES: usize = 6;
    pub const INVITES_BY_TOKEN: usize = 7;
    pub const INVITES_BY_STATUS: usize = 8;
    pub const INVITES_BY_TIME: usize = 9;
    pub const INVITES_BY_USER: usize = 10;
    pub const INVITES_BY_EXPIRY: usize = 11;
    pub const DEVICES: usize = 12;
    pub const DEVICES_BY_STATUS: usize = 13;
    pub const DEVICES_BY_TIME: usize = 14;
    pub const DEVICES_BY_HARDWARE: usize = 15;
    pub const DEVICES_BY_USER: usize = 16;
    pub const STAGED: usize = 17;
    pub const STAGED_BY_HARDWARE: usize = 18;
    pub const AUDIT: usize = 19;
    pub const OUTBOX: usize = 20;
    pub const ADMINS: usize = 21;
    pub const SESSIONS: usize = 22;
    pub const IMPORTS: usize = 23;
    pub const INVITES_BY_PLATFORM: usize = 24;
    pub const INVITES_BY_STATUS_PLATFORM: usize = 25;
    pub const INVITES_BY_GROUP: usize = 26;
    pub const OUTBOX_BY_INVITE: usize = 27;
    pub const OUTBOX_DUE: usize = 28;
    pub const SETTINGS: usize = 29;
    pub const SCEP_CHALLENGES: usize = 30;
    pub const APPLE_IDENTITIES: usize = 31;
    pub const USER_ACCOUNTS: usize = 32;
    pub const ACCOUNT_LINKS: usize = 33;
    pub const ANDROID_IDENTITIES: usize = 34;
    pub const WINDOWS_IDENTITIES: usize = 35;

    pub(super) const NAMES: [&str; 36] = [
        "meta",
        "certificates",
        "users",
        "users_by_email",
        "groups",
        "groups_by_name",
        "invites",
        "invites_by_token",
        "invites_by_status",
        "invites_by_time",
        "invites_by_user",
        "invites_by_expiry",
        "devices",
        "devices_by_status",
        "devices_by_time",
        "devices_by_hardware",
        "devices_by_user",
        "staged",
        "staged_by_hardware",
        "audit",
        "outbox",
        "admins",
        "sessions",
        "imports",
        "invites_by_platform",
        "invites_by_status_platform",
        "invites_by_group",
        "outbox_by_invite",
        "outbox_due",
        "settings",
        "scep_challenges",
        "apple_identities",
        "user_accounts",
        "account_links",
        "android_identities",
        "windows_identities",
    ];
}

/// Schema 1 → 2: the mail worker finds due jobs through `outbox_due` (due time, job id), built here for the jobs
/// stored before it existed.
fn index_due_jobs(db: &sled::Db) -> Result<(), StoreError> {
    let outbox = db.open_tree(tree::NAMES[tree::OUTBOX])?;
    let due = db.open_tree(tree::NAMES[tree::OUTBOX_DUE])?;
    for item in outbox.iter() {
        let (key, value) = item?;
        let job: crate::model::DeliveryJob = decode(tree::OUTBOX, &key, &value)?;
        for entry in Record::indexes(&job).into_iter().filter(|e| e.tree == tree::OUTBOX_DUE) {
            due.insert(entry.key, key.clone())?;
        }
    }
    Ok(())
}

const KEY_SCHEMA_VERSION: &[u8] = b"schema_version";
const KEY_CURRENT_SERVER_CERT: &[u8] = b"tls.current_server_serial";
/// The one-time code that claims a box without admins, kept until the first admin exists.
const KEY_SETUP_CODE: &[u8] = b"auth.setup_code";
/// The latest wall-clock time (Unix seconds) enrolld saw while it trusted the clock.
const KEY_LATEST_TIME: &[u8] = b"clock.latest_seen";
const COUNTER_PREFIX: &str = "count.";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open the database in {path}: {source}; check the state directory and free disk space")]
    Open { path: PathBuf, source: sled::Error },
    #[error(
        "the database was written by a newer enrolld (schema {found}, this build knows up to {supported}); run that version or restore a backup"
    )]
    NewerSchema { found: u32, supported: u32 },
    #[error("migrating the database from schema {from}: {reason}")]
    Migration { from: u32, reason: String },
    #[error("record {key:?} in {table} cannot be read ({reason}); restore a backup of the state directory")]
    Corrupt { table: &'static str, key: String, reason: String },
    #[error("storage error: {0}; check free space and permissions on the state directory's disk")]
    Io(#[from] sled::Error),
    #[error(
        "the database could not be made durable on disk ({0}); check that the disk is not full, read-only or failing"
    )]
    Sync(#[source] std::io::Error),
    #[error("the records name a table `{0}` this enrolld does not know; restore them with the version that wrote them")]
    UnknownTable(String),
}

/// Why a transaction did not commit: the caller's own reason, or the store's.
#[derive(Debug)]
pub enum TxFailure<E> {
    Abort(E),
    Store(StoreError),
}

/// The error inside a transaction closure. `?` works on store calls and, where the caller provides the `From`, on
/// the caller's own errors.
#[derive(Debug)]
pub enum TxError<E> {
    Conflict(UnabortableTransactionError),
    Store(StoreError),
    Abort(E),
}

impl<E> From<UnabortableTransactionError> for TxError<E> {
    fn from(error: UnabortableTransactionError) -> Self {
        TxError::Conflict(error)
    }
}

impl<E> From<StoreError> for TxError<E> {
    fn from(error: StoreError) -> Self {
        TxError::Store(error)
    }
}

/// A handle on the database; cheap to clone (a count each for the database, its trees and the locks). The router
/// clones the state that holds it a few times per route as it is built, which is on the path to READY.
#[derive(Clone, Debug)]
pub struct Store {
    db: sled::Db,
    trees: Arc<[sled::Tree]>,
    /// Transactions hold it shared; [`Store::snapshot`] holds it exclusively while it walks every tree, so a backup
    /// sees the database at one instant (sled's iterators alone give no view across trees).
    writes: Arc<RwLock<()>>,
    /// What makes a flush reach the disk; `None` for a temporary database.
    disk: Option<Arc<disk::Durable>>,
}

impl Store {
    /// Opens (or creates) the database at `path`, migrating it to [`SCHEMA_VERSION`].
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let db = sled::Config::new()
            .path(path)
            .cache_capacity(16 * 1024 * 1024)
            .open()
            .map_err(|source| StoreError::Open { path: path.to_owned(), source })?;
        let disk = disk::Durable::open(path).map_err(StoreError::Sync)?;
        Self::from_db(db, MIGRATIONS, Some(Arc::new(disk)))
    }

    /// An in-memory database that disappears when dropped, for tests and benchmarks.
    pub fn open_temporary() -> Result<Store, StoreError> {
        let db = sled::Config::new().temporary(true).open()?;
        Self::from_db(db, MIGRATIONS, None)
    }

    fn from_db(db: sled::Db, migrations: &[Migration], disk: Option<Arc<disk::Durable>>) -> Result<Store, StoreError> {
        let supported = 1 + migrations.len() as u32;
        let meta = db.open_tree(tree::NAMES[tree::META])?;
        let found = match meta.get(KEY_SCHEMA_VERSION)? {
            None => {
                meta.insert(KEY_SCHEMA_VERSION, &supported.to_be_bytes())?;
                supported
            }
            Some(bytes) => decode_u32(&bytes).ok_or_else(|| StoreError::Corrupt {
                table: "meta",
                key: "schema_version".into(),
                reason: format!("{} bytes where 4 were expected", bytes.len()),
            })?,
        };
        if found == 0 {
            return Err(StoreError::Corrupt {
                table: "meta",
                key: "schema_version".into(),
                reason: "schema version 0 was never written by enrolld".into(),
            });
        }
        if found > supported {
            return Err(StoreError::NewerSchema { found, supported });
        }
        for (from, step) in (found..supported).zip(migrations.iter().skip((found - 1) as usize)) {
            step(&db).map_err(|error| StoreError::Migration { from, reason: error.to_string() })?;
            meta.insert(KEY_SCHEMA_VERSION, &(from + 1).to_be_bytes())?;
            flush_to_disk(&db, disk.as_deref())?;
            tracing::info!(from, to = from + 1, "database migrated");
        }
        let trees = tree::NAMES.iter().map(|name| db.open_tree(name)).collect::<Result<Arc<[_]>, _>>()?;
        Ok(Store { db, trees, writes: Arc::default(), disk })
    }

    /// Opens the database at `path` like [`Store::open`], waiting up to `patience` for another handle in this process
    /// to let go of it: sled releases its file lock a moment after the last handle drops (a restart in-process, a
    /// restored database opened once to check it).
    pub fn open_when_free(path: &Path, patience: Duration) -> Result<Store, StoreError> {
        let deadline = Instant::now() + patience;
        loop {
            match Self::open(path) {
                Err(StoreError::Open { source: sled::Error::Io(error), .. })
                    if error.to_string().contains("could not acquire lock") && Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(50));
                }
                other => return other,
            }
        }
    }

    /// The schema version stored in the database.
    pub fn schema_version(&self) -> Result<u32, StoreError> {
        let bytes = self.trees[tree::META].get(KEY_SCHEMA_VERSION)?;
        Ok(bytes.as_deref().and_then(decode_u32).unwrap_or(0))
    }

    /// Makes every change committed before the call durable, except those marked with [`Tx::coalesce`] (which
    /// sled's own flush writes within about a second): once it returns, a power cut loses none of them. Returns at
    /// once when a sync already covered them; concurrent callers share one sync (see [`disk::Durable`]).
    pub fn flush_committed(&self) -> Result<(), StoreError> {
        match &self.disk {
            Some(disk) => disk.flush_noted(&self.db),
            None => Ok(()),
        }
    }

    /// Makes every change committed before the call durable, coalesced ones too (at shutdown, after an import).
    pub fn flush(&self) -> Result<(), StoreError> {
        flush_to_disk(&self.db, self.disk.as_deref())
    }

    /// Counts a committed write for [`Store::flush_committed`] to wait for.
    fn note_write(&self) {
        if let Some(disk) = &self.disk {
            disk.note_write();
        }
    }

    /// Runs `change` over every tree atomically: either all its writes land or none do. The closure may run more
    /// than once if it conflicts with a concurrent transaction, so it must not have other side effects.
    pub fn transact<R, E>(&self, change: impl Fn(&Tx<'_>) -> Result<R, TxError<E>>) -> Result<R, TxFailure<E>> {
        let _shared = self.writes.read().unwrap_or_else(PoisonError::into_inner);
        let marks = TxMarks::default();
        let result = self.trees[..].transaction(|views| {
            // A retried attempt starts afresh.
            marks.wrote.set(false);
            marks.coalesce.set(false);
            match change(&Tx { views, marks: &marks }) {
                Ok(value) => Ok(value),
                Err(TxError::Conflict(error)) => Err(error.into()),
                Err(TxError::Store(error)) => Err(ConflictableTransactionError::Abort(TxFailure::Store(error))),
                Err(TxError::Abort(error)) => Err(ConflictableTransactionError::Abort(TxFailure::Abort(error))),
            }
        });
        match result {
            Ok(value) => {
                if marks.wrote.get() && !marks.coalesce.get() {
                    self.note_write();
                }
                Ok(value)
            }
            Err(TransactionError::Abort(failure)) => Err(failure),
            Err(TransactionError::Storage(error)) => Err(TxFailure::Store(StoreError::Io(error))),
        }
    }

    /// Calls `visit` with every (tree, key, value) of the trees `include` accepts, tree by tree in key order, while
    /// no transaction can commit: the records are those of one instant. Writers wait until it returns, so `visit`
    /// should be quick (a local file, not a network client). Never call it inside a transaction: it would wait for
    /// itself (as would a transaction inside a transaction, which sled already forbids).
    pub fn snapshot<E: From<StoreError>>(
        &self,
        include: impl Fn(&str) -> bool,
        mut visit: impl FnMut(&'static str, &[u8], &[u8]) -> Result<(), E>,
    ) -> Result<(), E> {
        let _exclusive = self.writes.write().unwrap_or_else(PoisonError::into_inner);
        for (name, tree) in tree::NAMES.iter().zip(self.trees.iter()) {
            if !include(name) {
                continue;
            }
            for entry in tree.iter() {
                let (key, value) = entry.map_err(StoreError::from)?;
                visit(name, &key, &value)?;
            }
        }
        Ok(())
    }

    /// Reads one record by primary key.
    pub fn get<R: Record>(&self, key: &[u8]) -> Result<Option<R>, StoreError> {
        match self.trees[R::TREE].get(key)? {
            Some(bytes) => Ok(Some(decode(R::TREE, key, &bytes)?)),
            None => Ok(None),
        }
    }

    /// Follows a unique index entry to its record's primary key.
    pub fn lookup(&self, index: usize, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.trees[index].get(key)?.map(|value| value.to_vec()))
    }

    /// The value of a counter maintained by [`Record::counters`].
    pub fn count(&self, name: &str) -> Result<u64, StoreError> {
        let key = format!("{COUNTER_PREFIX}{name}");
        Ok(self.trees[tree::META].get(key)?.as_deref().and_then(decode_i64).unwrap_or(0).max(0) as u64)
    }

    /// Pages through `index` (or a record tree) under `prefix`, newest or oldest first, decoding the record each entry
    /// points at and keeping those `keep` accepts, until `limit` are found. The cursor is the last key returned.
    pub fn page<R: Record>(
        &self,
        scan: Scan<'_>,
        limit: usize,
        mut keep: impl FnMut(&R) -> bool,
    ) -> Result<Page<R>, StoreError> {
        let index = &self.trees[scan.tree];
        let mut upper = prefix_end(scan.prefix);
        let mut lower = scan.prefix.to_vec();
        // A cursor only moves the start within the prefix: one from another listing cannot widen this one.
        if let Some(cursor) = scan.after {
            if scan.newest_first {
                if upper.as_deref().is_none_or(|end| cursor < end) {
                    upper = Some(cursor.to_vec());
                }
            } else {
                lower = lower.max([cursor, &[0u8]].concat());
            }
        }
        if upper.as_deref().is_some_and(|upper| lower.as_slice() >= upper) {
            return Ok(Page { items: Vec::new(), next: None });
        }
        let range: sled::Iter = match &upper {
            Some(upper) => index.range(lower.as_slice()..upper.as_slice()),
            None => index.range(lower.as_slice()..),
        };
        let iter: Box<dyn Iterator<Item = sled::Result<(sled::IVec, sled::IVec)>>> =
            if scan.newest_first { Box::new(range.rev()) } else { Box::new(range) };
        let mut items = Vec::new();
        let mut last_key = None;
        for entry in iter {
            let (key, value) = entry?;
            let primary = if scan.tree == R::TREE { key.to_vec() } else { value.to_vec() };
            let record =
                if scan.tree == R::TREE { Some(decode::<R>(R::TREE, &key, &value)?) } else { self.get::<R>(&primary)? };
            last_key = Some(key.to_vec());
            if let Some(record) = record.filter(|r| keep(r)) {
                items.push(record);
                if items.len() == limit {
                    break;
                }
            }
        }
        let next = if items.len() == limit { last_key } else { None };
        Ok(Page { items, next })
    }

    /// Every primary key an index holds under `prefix` (for bulk work over a filter).
    pub fn keys_under(&self, index: usize, prefix: &[u8]) -> Result<Vec<Vec<u8>>, StoreError> {
        self.trees[index].scan_prefix(prefix).map(|entry| Ok(entry?.1.to_vec())).collect()
    }

    /// Primary keys in `index` whose keys sort before `upper` (an expiry index, for instance).
    pub fn keys_before(&self, index: usize, upper: &[u8]) -> Result<Vec<Vec<u8>>, StoreError> {
        self.trees[index].range(..upper).map(|entry| Ok(entry?.1.to_vec())).collect()
    }

    /// The first `limit` entries of an index, as (index key, primary key), in key order.
    pub fn first_entries(&self, index: usize, limit: usize) -> Result<Vec<IndexPair>, StoreError> {
        self.trees[index]
            .iter()
            .take(limit)
            .map(|entry| entry.map(|(k, v)| (k.to_vec(), v.to_vec())).map_err(Into::into))
            .collect()
    }

    /// Records a certificate the appliance's CA issued for its HTTPS server and makes it the current one, in one
    /// transaction.
    pub fn record_server_certificate(&self, record: &CertificateRecord) -> Result<(), StoreError> {
        self.transact::<(), StoreError>(|tx| {
            tx.put(None, record)?;
            tx.writing(tree::META).insert(KEY_CURRENT_SERVER_CERT, record.key())?;
            Ok(())
        })
        .map_err(|failure| match failure {
            TxFailure::Abort(error) | TxFailure::Store(error) => error,
        })
    }

    /// The HTTPS certificate currently in use, as last recorded.
    pub fn current_server_certificate(&self) -> Result<Option<CertificateRecord>, StoreError> {
        match self.trees[tree::META].get(KEY_CURRENT_SERVER_CERT)? {
            Some(serial) => self.get(&serial),
            None => Ok(None),
        }
    }

    /// The setup code that claims a box without admins, if one was made.
    pub fn setup_code(&self) -> Result<Option<String>, StoreError> {
        Ok(self.trees[tree::META].get(KEY_SETUP_CODE)?.map(|bytes| String::from_utf8_lossy(&bytes).into_owned()))
    }

    /// The setup code kept from an earlier start, or `make()`'s, kept now; one transaction, so two callers get the
    /// same code.
    pub fn setup_code_or_insert(&self, make: impl Fn() -> String) -> Result<String, StoreError> {
        self.transact::<_, StoreError>(|tx| {
            if let Some(code) = tx.setup_code()? {
                return Ok(code);
            }
            let code = make();
            tx.writing(tree::META).insert(KEY_SETUP_CODE, code.as_bytes())?;
            Ok(code)
        })
        .map_err(|failure| match failure {
            TxFailure::Abort(error) | TxFailure::Store(error) => error,
        })
    }

    /// Forgets the setup code (the box has an admin, made some other way than with the code).
    pub fn remove_setup_code(&self) -> Result<(), StoreError> {
        self.trees[tree::META].remove(KEY_SETUP_CODE)?;
        self.note_write();
        Ok(())
    }

    /// The latest time (Unix seconds) recorded with [`Store::record_time_seen`].
    pub fn latest_time_seen(&self) -> Result<Option<i64>, StoreError> {
        Ok(self.trees[tree::META].get(KEY_LATEST_TIME)?.as_deref().and_then(decode_i64))
    }

    /// Records `unix` as a time the clock was trusted at, unless a later one is recorded already.
    pub fn record_time_seen(&self, unix: i64) -> Result<(), StoreError> {
        self.trees[tree::META].fetch_and_update(KEY_LATEST_TIME, |old| {
            let latest = old.and_then(decode_i64).map_or(unix, |old| old.max(unix));
            Some(latest.to_be_bytes().to_vec())
        })?;
        self.note_write();
        Ok(())
    }

    /// Every certificate the appliance's CA issued, in serial order.
    pub fn issued_certificates(&self) -> Result<Vec<CertificateRecord>, StoreError> {
        self.all(|_| true)
    }

    /// Every record of one kind that `keep` accepts, in key order (a whole-tree scan, for small trees and rare
    /// work such as recovery).
    pub fn all<R: Record>(&self, keep: impl FnMut(&R) -> bool) -> Result<Vec<R>, StoreError> {
        let scan = Scan { tree: R::TREE, prefix: &[], after: None, newest_first: false };
        Ok(self.page(scan, usize::MAX, keep)?.items)
    }
}

/// Writes the records of a backup into a new database as they are read (in batches, never all in memory);
/// [`Store::open`] then checks and migrates it like any other.
pub struct Loader {
    db: sled::Db,
    current: Option<(usize, sled::Batch, usize)>,
    trees: Vec<sled::Tree>,
    disk: disk::Durable,
}

/// Records a [`Loader`] collects before it writes them.
const LOAD_BATCH: usize = 5_000;

impl Loader {
    /// Creates an empty database at `path`, which must not exist yet.
    pub fn create(path: &Path) -> Result<Loader, StoreError> {
        let db = sled::Config::new()
            .path(path)
            .create_new(true)
            .cache_capacity(16 * 1024 * 1024)
            // No flusher thread: the database is flushed once at the end and let go of at once when dropped.
            .flush_every_ms(None)
            .open()
            .map_err(|source| StoreError::Open { path: path.to_owned(), source })?;
        let trees = tree::NAMES.iter().map(|name| db.open_tree(name)).collect::<Result<Vec<_>, _>>()?;
        let disk = disk::Durable::open(path).map_err(StoreError::Sync)?;
        Ok(Loader { db, current: None, trees, disk })
    }

    /// Adds one record to the table named `table`; a name this build does not know is refused.
    pub fn insert(&mut self, table: &str, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        let index =
            tree::NAMES.iter().position(|name| *name == table).ok_or_else(|| StoreError::UnknownTable(table.into()))?;
        if self.current.as_ref().is_some_and(|(current, _, count)| *current != index || *count >= LOAD_BATCH) {
            self.write_batch()?;
        }
        let (_, batch, count) = self.current.get_or_insert_with(|| (index, sled::Batch::default(), 0));
        batch.insert(key, value);
        *count += 1;
        Ok(())
    }

    fn write_batch(&mut self) -> Result<(), StoreError> {
        if let Some((index, batch, _)) = self.current.take() {
            self.trees[index].apply_batch(batch)?;
        }
        Ok(())
    }

    /// Writes what is left and makes all of it durable on disk.
    pub fn finish(mut self) -> Result<(), StoreError> {
        self.write_batch()?;
        self.disk.flush(&self.db)
    }
}

/// Flushes `db`, durably where it has a file on disk (`disk`), as sled's own flush alone where it is temporary.
fn flush_to_disk(db: &sled::Db, disk: Option<&disk::Durable>) -> Result<(), StoreError> {
    match disk {
        Some(disk) => disk.flush(db),
        None => {
            db.flush()?;
            Ok(())
        }
    }
}

/// What [`Store::page`] walks.
#[derive(Debug, Clone, Copy)]
pub struct Scan<'a> {
    pub tree: usize,
    pub prefix: &'a [u8],
    pub after: Option<&'a [u8]>,
    pub newest_first: bool,
}

/// One page of records and the cursor for the next, if there may be more.
#[derive(Debug, Clone)]
pub struct Page<R> {
    pub items: Vec<R>,
    pub next: Option<Vec<u8>>,
}

/// The trees as seen inside a transaction.
pub struct Tx<'a> {
    views: &'a [TransactionalTree],
    marks: &'a TxMarks,
}

/// What one attempt of a transaction did, for [`Store::flush_committed`].
#[derive(Default)]
struct TxMarks {
    /// It wrote something (a transaction that only read needs no sync).
    wrote: Cell<bool>,
    /// Its writes may reach the disk with sled's own flush ([`Tx::coalesce`]).
    coalesce: Cell<bool>,
}

impl Tx<'_> {
    /// Marks this transaction's change as one that may reach the disk with sled's own flush, about a second later,
    /// instead of before its answer: [`Store::flush_committed`] does not wait for it. For what a power cut may
    /// lose without harm, such as a device's last-contact time.
    pub fn coalesce(&self) {
        self.marks.coalesce.set(true);
    }

    /// A tree to write to; the transaction is marked as one that wrote.
    fn writing(&self, tree: usize) -> &TransactionalTree {
        self.marks.wrote.set(true);
        &self.views[tree]
    }

    pub fn get<R: Record, E>(&self, key: &[u8]) -> Result<Option<R>, TxError<E>> {
        match self.views[R::TREE].get(key)? {
            Some(bytes) => Ok(Some(decode(R::TREE, key, &bytes)?)),
            None => Ok(None),
        }
    }

    pub fn get_id<R: Record, E>(&self, id: &Id) -> Result<Option<R>, TxError<E>> {
        self.get(id.as_bytes())
    }

    /// Follows a unique index entry to its record's primary key.
    pub fn lookup<E>(&self, index: usize, key: &[u8]) -> Result<Option<Vec<u8>>, TxError<E>> {
        Ok(self.views[index].get(key)?.map(|value| value.to_vec()))
    }

    /// Writes `new`, replacing `old` (the record as read in this transaction, or `None` for a new one): index
    /// entries and counters of `old` that `new` no longer has are removed, the new ones added.
    pub fn put<R: Record, E>(&self, old: Option<&R>, new: &R) -> Result<(), TxError<E>> {
        let key = new.key();
        let old_indexes = old.map(Record::indexes).unwrap_or_default();
        let new_indexes = new.indexes();
        for stale in old_indexes.iter().filter(|o| !new_indexes.iter().any(|n| n.tree == o.tree && n.key == o.key)) {
            self.writing(stale.tree).remove(stale.key.as_slice())?;
        }
        for index in &new_indexes {
            self.writing(index.tree).insert(index.key.as_slice(), key.as_slice())?;
        }
        let old_counters = old.map(Record::counters).unwrap_or_default();
        let new_counters = new.counters();
        for name in old_counters.iter().filter(|c| !new_counters.contains(c)) {
            self.add_to_counter(name, -1)?;
        }
        for name in new_counters.iter().filter(|c| !old_counters.contains(c)) {
            self.add_to_counter(name, 1)?;
        }
        self.writing(R::TREE).insert(key.as_slice(), encode(new))?;
        Ok(())
    }

    /// Removes a record (as read in this transaction) with its index entries and counters.
    pub fn delete<R: Record, E>(&self, old: &R) -> Result<(), TxError<E>> {
        for index in old.indexes() {
            self.writing(index.tree).remove(index.key)?;
        }
        for name in old.counters() {
            self.add_to_counter(&name, -1)?;
        }
        self.writing(R::TREE).remove(old.key())?;
        Ok(())
    }

    /// The setup code as this transaction sees it.
    pub fn setup_code<E>(&self) -> Result<Option<String>, TxError<E>> {
        Ok(self.views[tree::META].get(KEY_SETUP_CODE)?.map(|bytes| String::from_utf8_lossy(&bytes).into_owned()))
    }

    /// Removes the setup code with the rest of this transaction (the first admin is being created).
    pub fn remove_setup_code<E>(&self) -> Result<(), TxError<E>> {
        self.writing(tree::META).remove(KEY_SETUP_CODE)?;
        Ok(())
    }

    /// A counter's value as this transaction sees it.
    pub fn count<E>(&self, name: &str) -> Result<u64, TxError<E>> {
        let key = format!("{COUNTER_PREFIX}{name}");
        Ok(self.views[tree::META].get(key.as_bytes())?.as_deref().and_then(decode_i64).unwrap_or(0).max(0) as u64)
    }

    fn add_to_counter<E>(&self, name: &str, delta: i64) -> Result<(), TxError<E>> {
        let key = format!("{COUNTER_PREFIX}{name}");
        let current = self.views[tree::META].get(key.as_bytes())?.as_deref().and_then(decode_i64).unwrap_or(0);
        self.writing(tree::META).insert(key.as_bytes(), &(current + delta).to_be_bytes())?;
        Ok(())
    }
}

/// The smallest key greater than every key starting with `prefix`, or `None` if there is none.
fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

fn encode<R: serde::Serialize>(value: &R) -> Vec<u8> {
    // Records are plain structs of strings, numbers and enums; serializing them to JSON cannot fail.
    serde_json::to_vec(value).unwrap_or_default()
}

fn decode<R: DeserializeOwned>(tree_index: usize, key: &[u8], bytes: &[u8]) -> Result<R, StoreError> {
    serde_json::from_slice(bytes).map_err(|error| StoreError::Corrupt {
        table: tree::NAMES[tree_index],
        key: match Id::from_slice(key) {
            Some(id) => id.to_string(),
            None => String::from_utf8_lossy(key).into_owned(),
        },
        reason: error.to_string(),
    })
}

fn decode_u32(bytes: &[u8]) -> Option<u32> {
    Some(u32::from_be_bytes(bytes.try_into().ok()?))
}

fn decode_i64(bytes: &[u8]) -> Option<i64> {
    Some(i64::from_be_bytes(bytes.try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Group, User};
    use time::OffsetDateTime;

    fn record(serial: &str) -> CertificateRecord {
        CertificateRecord {
            serial: serial.into(),
            subject: "enroll.local".into(),
            names: vec!["enroll.local".into(), "127.0.0.1".into()],
            not_before: 1_700_000_000,
            not_after: 1_730_000_000,
            sha256: "00".repeat(32),
            reason: "first start".into(),
        }
    }

    fn user(n: u8, email: &str) -> User {
        let at = OffsetDateTime::from_unix_timestamp(1_790_000_000 + i64::from(n)).unwrap();
        User {
            id: Id::new(at, [n; 10]),
            name: format!("User {n}"),
            email: email.into(),
            phone: None,
            domain: None,
            notes: String::new(),
            groups: Vec::new(),
            created_at: at,
            updated_at: at,
            import: None,
        }
    }

    #[test]
    fn fresh_database_gets_the_current_schema_and_keeps_records_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db")).unwrap();
        assert_eq!(store.schema_version().unwrap(), SCHEMA_VERSION);
        store.record_server_certificate(&record("01")).unwrap();
        store.record_server_certificate(&record("02")).unwrap();
        store.flush().unwrap();
        drop(store);

        // sled's flusher thread lets go of the file lock a moment after the last handle drops.
        let reopen = || Store::open(&dir.path().join("db"));
        let store = (0..100)
            .find_map(|_| {
                reopen().ok().or_else(|| {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                    None
                })
            })
            .unwrap_or_else(|| reopen().unwrap());
        assert_eq!(store.current_server_certificate().unwrap().unwrap().serial, "02");
        let serials: Vec<_> = store.issued_certificates().unwrap().into_iter().map(|c| c.serial).collect();
        assert_eq!(serials, ["01", "02"]);
    }

    #[test]
    fn a_zero_schema_version_is_corruption_not_a_panic() {
        let db = sled::Config::new().temporary(true).open().unwrap();
        db.open_tree("meta").unwrap().insert(KEY_SCHEMA_VERSION, &0u32.to_be_bytes()).unwrap();
        let message = Store::from_db(db, MIGRATIONS, None).unwrap_err().to_string();
        assert!(message.contains("schema version 0"), "{message}");
    }

    #[test]
    fn a_newer_schema_is_refused() {
        let db = sled::Config::new().temporary(true).open().unwrap();
        db.open_tree("meta").unwrap().insert(KEY_SCHEMA_VERSION, &99u32.to_be_bytes()).unwrap();
        let message = Store::from_db(db, MIGRATIONS, None).unwrap_err().to_string();
        assert!(message.contains("newer enrolld (schema 99"), "{message}");
    }

    #[test]
    fn migrations_run_in_order_from_the_stored_version() {
        fn add_a(db: &sled::Db) -> Result<(), StoreError> {
            db.open_tree("log")?.insert("1", "a")?;
            Ok(())
        }
        fn add_b(db: &sled::Db) -> Result<(), StoreError> {
            let log = db.open_tree("log")?;
            assert!(log.get("1")?.is_some(), "runs after the first step");
            log.insert("2", "b")?;
            Ok(())
        }
        let db = sled::Config::new().temporary(true).open().unwrap();
        db.open_tree("meta").unwrap().insert(KEY_SCHEMA_VERSION, &1u32.to_be_bytes()).unwrap();
        let store = Store::from_db(db.clone(), &[add_a, add_b], None).unwrap();
        assert_eq!(store.schema_version().unwrap(), 3);
        assert_eq!(db.open_tree("log").unwrap().len(), 2);
    }

    #[test]
    fn put_keeps_indexes_and_counters_in_step_and_an_abort_writes_nothing() {
        let store = Store::open_temporary().unwrap();
        let ann = user(1, "ann@example.com");
        store.transact::<_, ()>(|tx| tx.put(None, &ann)).unwrap();
        assert_eq!(store.lookup(tree::USERS_BY_EMAIL, b"ann@example.com").unwrap(), Some(ann.id.0.to_vec()));
        assert_eq!(store.count("users").unwrap(), 1);

        let mut renamed = ann.clone();
        renamed.email = "ann.lee@example.com".into();
        store.transact::<_, ()>(|tx| tx.put(Some(&ann), &renamed)).unwrap();
        assert_eq!(store.lookup(tree::USERS_BY_EMAIL, b"ann@example.com").unwrap(), None, "old entry gone");
        assert!(store.lookup(tree::USERS_BY_EMAIL, b"ann.lee@example.com").unwrap().is_some());
        assert_eq!(store.count("users").unwrap(), 1, "a replacement does not count twice");

        let bob = user(2, "bob@example.com");
        let failed = store.transact(|tx| {
            tx.put(None, &bob)?;
            tx.delete(&renamed)?;
            Err::<(), _>(TxError::Abort("changed my mind"))
        });
        assert!(matches!(failed, Err(TxFailure::Abort("changed my mind"))));
        assert!(store.get::<User>(bob.id.as_bytes()).unwrap().is_none());
        assert!(store.get::<User>(renamed.id.as_bytes()).unwrap().is_some());
        assert_eq!(store.count("users").unwrap(), 1);

        store.transact::<_, ()>(|tx| tx.delete(&renamed)).unwrap();
        assert_eq!(store.count("users").unwrap(), 0);
        assert_eq!(store.lookup(tree::USERS_BY_EMAIL, b"ann.lee@example.com").unwrap(), None);
    }

    #[test]
    fn pages_run_both_ways_with_cursors_and_filters() {
        let store = Store::open_temporary().unwrap();
        for n in 0..25u8 {
            let at = OffsetDateTime::from_unix_timestamp(1_790_000_000 + i64::from(n)).unwrap();
            let group = Group {
                import: None,
                id: Id::new(at, [n; 10]),
                name: format!("g{n:02}"),
                description: String::new(),
                created_at: at,
            };
            store.transact::<_, ()>(|tx| tx.put(None, &group)).unwrap();
        }
        fn scan(after: Option<&[u8]>, newest_first: bool) -> Scan<'_> {
            Scan { tree: tree::GROUPS, prefix: &[], after, newest_first }
        }
        let first = store.page::<Group>(scan(None, false), 10, |_| true).unwrap();
        assert_eq!(first.items.first().unwrap().name, "g00");
        let second = store.page::<Group>(scan(first.next.as_deref(), false), 10, |_| true).unwrap();
        assert_eq!(second.items.first().unwrap().name, "g10");
        let third = store.page::<Group>(scan(second.next.as_deref(), false), 10, |_| true).unwrap();
        assert_eq!(third.items.len(), 5);
        assert!(third.next.is_none());

        let newest = store.page::<Group>(scan(None, true), 3, |g| g.name.ends_with('1')).unwrap();
        let names: Vec<_> = newest.items.iter().map(|g| g.name.as_str()).collect();
        assert_eq!(names, ["g21", "g11", "g01"]);

        // A cursor from outside the prefix does not widen the scan.
        let group = store.page::<Group>(scan(None, false), 1, |_| true).unwrap().items.remove(0);
        let prefix = &group.id.0[..8];
        let foreign = [0xffu8; 16];
        for newest_first in [false, true] {
            let within = Scan { tree: tree::GROUPS, prefix, after: Some(&foreign), newest_first };
            let page = store.page::<Group>(within, 10, |_| true).unwrap();
            assert!(page.items.iter().all(|g| g.id.0.starts_with(prefix)), "{newest_first}");
        }
        let before = [0u8; 16];
        let within = Scan { tree: tree::GROUPS, prefix, after: Some(&before), newest_first: true };
        assert!(store.page::<Group>(within, 10, |_| true).unwrap().items.is_empty());
    }

    #[test]
    fn a_snapshot_sees_one_instant_while_writers_wait() {
        let store = Store::open_temporary().unwrap();
        for n in 0..3u8 {
            store.transact::<_, ()>(|tx| tx.put(None, &user(n, &format!("u{n}@example.com")))).unwrap();
        }
        let late = user(9, "late@example.com");
        let mut writer = None;
        let mut seen = Vec::new();
        store
            .snapshot::<StoreError>(
                |table| table == "users",
                |_, key, _| {
                    seen.push(key.to_vec());
                    if writer.is_none() {
                        let (other, record) = (store.clone(), late.clone());
                        writer = Some(std::thread::spawn(move || {
                            other.transact::<_, ()>(|tx| tx.put(None, &record)).unwrap();
                        }));
                        // Time enough for the writer to commit, were it not held back.
                        std::thread::sleep(std::time::Duration::from_millis(200));
                        assert!(store.get::<User>(late.id.as_bytes()).unwrap().is_none(), "the writer waited");
                    }
                    Ok(())
                },
            )
            .unwrap();
        assert_eq!(seen.len(), 3, "the snapshot holds what was there when it began");
        writer.unwrap().join().unwrap();
        assert!(store.get::<User>(late.id.as_bytes()).unwrap().is_some(), "and the writer went on after it");
    }

    #[test]
    fn a_loader_refuses_unknown_tables_and_its_database_opens() {
        let dir = tempfile::tempdir().unwrap();
        let mut loader = Loader::create(&dir.path().join("db")).unwrap();
        let ann = user(1, "ann@example.com");
        loader.insert("users", &ann.key(), &encode(&ann)).unwrap();
        loader.insert("meta", KEY_SCHEMA_VERSION, &SCHEMA_VERSION.to_be_bytes()).unwrap();
        assert!(matches!(loader.insert("nonsense", b"k", b"v"), Err(StoreError::UnknownTable(_))));
        loader.finish().unwrap();
        let store = Store::open_when_free(&dir.path().join("db"), std::time::Duration::from_secs(10)).unwrap();
        assert_eq!(store.get::<User>(&ann.key()).unwrap(), Some(ann));
        assert!(Loader::create(&dir.path().join("db")).is_err(), "never over an existing database");
    }

    #[test]
    fn a_damaged_record_is_reported_not_panicked_on() {
        let store = Store::open_temporary().unwrap();
        store.trees[tree::CERTIFICATES].insert(b"bad", b"{not json".as_slice()).unwrap();
        let message = store.issued_certificates().unwrap_err().to_string();
        assert!(message.contains("\"bad\" in certificates cannot be read"), "{message}");
    }

    #[test]
    fn the_latest_time_seen_only_moves_forward() {
        let store = Store::open_temporary().unwrap();
        assert_eq!(store.latest_time_seen().unwrap(), None);
        store.record_time_seen(1_800_000_000).unwrap();
        store.record_time_seen(1_700_000_000).unwrap();
        assert_eq!(store.latest_time_seen().unwrap(), Some(1_800_000_000), "an earlier time does not lower it");
        store.record_time_seen(1_800_000_060).unwrap();
        assert_eq!(store.latest_time_seen().unwrap(), Some(1_800_000_060));
    }

    #[test]
    fn a_coalesced_or_read_only_transaction_is_not_waited_for_and_every_other_write_is() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db")).unwrap();
        let disk = store.disk.clone().unwrap();
        let noted = || disk.noted();
        let before = noted();
        store.transact::<_, ()>(|tx| tx.put(None, &user(1, "a@example.com"))).unwrap();
        assert_eq!(noted(), before + 1, "a transaction is waited for");
        store.flush_committed().unwrap();
        assert_eq!(disk.synced_through(), noted(), "the flush covered it");
        store
            .transact::<_, ()>(|tx| {
                tx.coalesce();
                tx.put(None, &user(2, "b@example.com"))
            })
            .unwrap();
        assert_eq!(noted(), before + 1, "a coalesced one is not");
        let read = store.transact::<_, ()>(|tx| tx.get::<User, _>(b"nobody")).unwrap();
        assert!(read.is_none());
        assert_eq!(noted(), before + 1, "nor one that only read");
        store.record_time_seen(1_800_000_000).unwrap();
        store.remove_setup_code().unwrap();
        assert_eq!(noted(), before + 3, "writes outside transactions are");
        let aborted = store.transact::<(), &str>(|tx| {
            tx.put(None, &user(3, "c@example.com"))?;
            Err(TxError::Abort("no"))
        });
        assert!(aborted.is_err());
        assert_eq!(noted(), before + 3, "an aborted transaction wrote nothing");
        store.flush_committed().unwrap();
        assert_eq!(disk.synced_through(), before + 3);
    }
}
