//! The only code that touches sled: typed tables, the schema version with its migrations, and transactions.
//!
//! Records are serde-encoded (JSON, so a field added with `#[serde(default)]` needs no migration). Changes that
//! touch several records go through [`Store::transact`], so a crash leaves all of them or none.

mod records;

use std::marker::PhantomData;
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde::de::DeserializeOwned;
use sled::Transactional;
use sled::transaction::{ConflictableTransactionError, TransactionError, TransactionalTree};

pub use records::CertificateRecord;

/// A step that brings a database from schema `n` to `n + 1`; `MIGRATIONS[0]` goes from 1 to 2.
pub type Migration = fn(&sled::Db) -> Result<(), StoreError>;

/// Every migration, oldest first. The schema version a build writes is `1 + MIGRATIONS.len()`.
const MIGRATIONS: &[Migration] = &[];

/// The schema version this build reads and writes.
pub const SCHEMA_VERSION: u32 = 1 + MIGRATIONS.len() as u32;

const META: &str = "meta";
const CERTIFICATES: &str = "certificates";
const KEY_SCHEMA_VERSION: &[u8] = b"schema_version";
const KEY_CURRENT_SERVER_CERT: &[u8] = b"tls.current_server_serial";

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
}

/// A handle on the database; cheap to clone (sled trees are reference-counted).
#[derive(Clone, Debug)]
pub struct Store {
    db: sled::Db,
    meta: sled::Tree,
    certificates: Table<CertificateRecord>,
}

impl Store {
    /// Opens (or creates) the database at `path`, migrating it to [`SCHEMA_VERSION`].
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let db = sled::Config::new()
            .path(path)
            .cache_capacity(16 * 1024 * 1024)
            .open()
            .map_err(|source| StoreError::Open { path: path.to_owned(), source })?;
        Self::from_db(db, MIGRATIONS)
    }

    /// An in-memory database that disappears when dropped, for tests.
    pub fn open_temporary() -> Result<Store, StoreError> {
        let db = sled::Config::new().temporary(true).open()?;
        Self::from_db(db, MIGRATIONS)
    }

    fn from_db(db: sled::Db, migrations: &[Migration]) -> Result<Store, StoreError> {
        let supported = 1 + migrations.len() as u32;
        let meta = db.open_tree(META)?;
        let found = match meta.get(KEY_SCHEMA_VERSION)? {
            None => {
                meta.insert(KEY_SCHEMA_VERSION, &supported.to_be_bytes())?;
                supported
            }
            Some(bytes) => decode_u32(&bytes).ok_or_else(|| StoreError::Corrupt {
                table: META,
                key: "schema_version".into(),
                reason: format!("{} bytes where 4 were expected", bytes.len()),
            })?,
        };
        if found > supported {
            return Err(StoreError::NewerSchema { found, supported });
        }
        for from in found..supported {
            let step = migrations[(from - 1) as usize];
            step(&db).map_err(|error| StoreError::Migration { from, reason: error.to_string() })?;
            meta.insert(KEY_SCHEMA_VERSION, &(from + 1).to_be_bytes())?;
            db.flush()?;
            tracing::info!(from, to = from + 1, "database migrated");
        }
        let certificates = Table::open(&db, CERTIFICATES)?;
        Ok(Store { db, meta, certificates })
    }

    /// The schema version stored in the database.
    pub fn schema_version(&self) -> Result<u32, StoreError> {
        let bytes = self.meta.get(KEY_SCHEMA_VERSION)?;
        Ok(bytes.as_deref().and_then(decode_u32).unwrap_or(0))
    }

    /// Writes everything to disk; called last on shutdown.
    pub fn flush(&self) -> Result<usize, StoreError> {
        Ok(self.db.flush()?)
    }

    /// Records a certificate the appliance's CA issued for its HTTPS server and makes it the current one, in one
    /// transaction.
    pub fn record_server_certificate(&self, record: &CertificateRecord) -> Result<(), StoreError> {
        let value = encode(record);
        let key = record.serial.as_bytes();
        self.transact(|tx| {
            tx.certificates.insert(key, value.as_slice())?;
            tx.meta.insert(KEY_CURRENT_SERVER_CERT, key)?;
            Ok(())
        })
    }

    /// The HTTPS certificate currently in use, as last recorded.
    pub fn current_server_certificate(&self) -> Result<Option<CertificateRecord>, StoreError> {
        match self.meta.get(KEY_CURRENT_SERVER_CERT)? {
            Some(serial) => self.certificates.get(&serial),
            None => Ok(None),
        }
    }

    /// Every certificate the appliance's CA issued, in serial order.
    pub fn issued_certificates(&self) -> Result<Vec<CertificateRecord>, StoreError> {
        self.certificates.values().collect()
    }

    /// Runs `change` over every table atomically: either all its writes land or none do. The closure may run more
    /// than once if it conflicts with a concurrent transaction, so it must not have other side effects.
    fn transact<R>(
        &self,
        change: impl Fn(&Tx<'_>) -> Result<R, ConflictableTransactionError<StoreError>>,
    ) -> Result<R, StoreError> {
        let trees = [&self.meta, &self.certificates.tree];
        let result = trees[..].transaction(|views| {
            let tx = Tx { meta: &views[0], certificates: &views[1] };
            change(&tx)
        });
        match result {
            Ok(value) => Ok(value),
            Err(TransactionError::Abort(error)) => Err(error),
            Err(TransactionError::Storage(error)) => Err(StoreError::Io(error)),
        }
    }
}

/// The tables as seen inside a transaction.
struct Tx<'a> {
    meta: &'a TransactionalTree,
    certificates: &'a TransactionalTree,
}

/// A sled tree whose values are records of one type.
#[derive(Clone, Debug)]
struct Table<V> {
    name: &'static str,
    tree: sled::Tree,
    _record: PhantomData<fn() -> V>,
}

impl<V: Serialize + DeserializeOwned> Table<V> {
    fn open(db: &sled::Db, name: &'static str) -> Result<Self, StoreError> {
        Ok(Table { name, tree: db.open_tree(name)?, _record: PhantomData })
    }

    fn get(&self, key: &[u8]) -> Result<Option<V>, StoreError> {
        match self.tree.get(key)? {
            Some(bytes) => Ok(Some(decode(self.name, key, &bytes)?)),
            None => Ok(None),
        }
    }

    fn values(&self) -> impl Iterator<Item = Result<V, StoreError>> + '_ {
        self.tree.iter().map(|item| {
            let (key, bytes) = item?;
            decode(self.name, &key, &bytes)
        })
    }
}

fn encode<V: Serialize>(value: &V) -> Vec<u8> {
    // Records are plain structs of strings and numbers; serializing them to JSON cannot fail.
    serde_json::to_vec(value).unwrap_or_default()
}

fn decode<V: DeserializeOwned>(table: &'static str, key: &[u8], bytes: &[u8]) -> Result<V, StoreError> {
    serde_json::from_slice(bytes).map_err(|error| StoreError::Corrupt {
        table,
        key: String::from_utf8_lossy(key).into_owned(),
        reason: error.to_string(),
    })
}

fn decode_u32(bytes: &[u8]) -> Option<u32> {
    Some(u32::from_be_bytes(bytes.try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn fresh_database_gets_the_current_schema_and_keeps_records_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db")).unwrap();
        assert_eq!(store.schema_version().unwrap(), SCHEMA_VERSION);
        store.record_server_certificate(&record("01")).unwrap();
        store.record_server_certificate(&record("02")).unwrap();
        store.flush().unwrap();
        drop(store);

        let store = Store::open(&dir.path().join("db")).unwrap();
        assert_eq!(store.current_server_certificate().unwrap().unwrap().serial, "02");
        let serials: Vec<_> = store.issued_certificates().unwrap().into_iter().map(|c| c.serial).collect();
        assert_eq!(serials, ["01", "02"]);
    }

    #[test]
    fn a_newer_schema_is_refused() {
        let db = sled::Config::new().temporary(true).open().unwrap();
        db.open_tree(META).unwrap().insert(KEY_SCHEMA_VERSION, &99u32.to_be_bytes()).unwrap();
        let message = Store::from_db(db, MIGRATIONS).unwrap_err().to_string();
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
        db.open_tree(META).unwrap().insert(KEY_SCHEMA_VERSION, &1u32.to_be_bytes()).unwrap();
        let store = Store::from_db(db.clone(), &[add_a, add_b]).unwrap();
        assert_eq!(store.schema_version().unwrap(), 3);
        assert_eq!(db.open_tree("log").unwrap().len(), 2);
    }

    #[test]
    fn an_aborted_transaction_writes_nothing() {
        let store = Store::open_temporary().unwrap();
        let value = encode(&record("03"));
        let result: Result<(), _> = store.transact(|tx| {
            tx.certificates.insert(b"03".as_slice(), value.as_slice())?;
            tx.meta.insert(KEY_CURRENT_SERVER_CERT, b"03".as_slice())?;
            Err(ConflictableTransactionError::Abort(StoreError::Migration { from: 0, reason: "test abort".into() }))
        });
        assert!(result.is_err());
        assert!(store.issued_certificates().unwrap().is_empty());
        assert!(store.current_server_certificate().unwrap().is_none());
    }

    #[test]
    fn a_damaged_record_is_reported_not_panicked_on() {
        let store = Store::open_temporary().unwrap();
        store.certificates.tree.insert(b"bad", b"{not json".as_slice()).unwrap();
        let message = store.issued_certificates().unwrap_err().to_string();
        assert!(message.contains("\"bad\" in certificates cannot be read"), "{message}");
    }
}
