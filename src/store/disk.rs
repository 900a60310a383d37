//! Durability: what turns a sled flush into data that survives a power cut.
//!
//! sled 0.34's `flush` ends, on Linux, in `sync_file_range(2)` on the log file. That starts and waits for the
//! writeback of the written range, but it commits none of the file system's metadata (the blocks a growing log was
//! just given, its new size) and does not flush the disk's own write cache; sled's background thread calls `fsync`
//! only every 500 ms. Values too large for the log go to files under `blobs/`, which sled never syncs. So an
//! answer sent after `flush` alone could still be lost: the appliance's power-cut test lost the last few invites the
//! API had acknowledged. [`Durable::flush`] adds `fdatasync(2)` on the log and `fsync(2)` on new blob files and
//! their directory.
//!
//! Not every write needs that before its answer: a device's last-contact time may reach the disk with sled's own
//! flush, at most about a second later. The store counts the writes that do ([`Durable::note_write`]), and
//! [`Durable::flush_noted`] syncs only when one is not covered yet.

use std::collections::HashSet;
use std::ffi::OsString;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};

use super::StoreError;

/// The open log file of one database, and the bookkeeping that lets concurrent flushes share one sync.
#[derive(Debug)]
pub(super) struct Durable {
    dir: PathBuf,
    log: File,
    /// Writes that must be durable before they are answered, counted as each commits.
    committed: AtomicU64,
    synced: Mutex<Synced>,
}

#[derive(Debug, Default)]
struct Synced {
    /// Every write counted in `committed` up to this number is covered by a finished sync.
    through: u64,
    /// Blob files already synced; sled writes each once and only ever deletes it afterwards.
    blobs: HashSet<OsString>,
}

impl Durable {
    /// Opens the log of the sled database in `dir` (which sled has already opened, so the files exist) and makes
    /// the directory's entries durable.
    pub(super) fn open(dir: &Path) -> io::Result<Durable> {
        let log = File::open(dir.join("db"))?;
        File::open(dir)?.sync_all()?;
        let durable = Durable { dir: dir.to_owned(), log, committed: AtomicU64::new(0), synced: Mutex::default() };
        let mut synced = durable.synced.lock().unwrap_or_else(PoisonError::into_inner);
        durable.sync_blobs(&mut synced)?;
        drop(synced);
        Ok(durable)
    }

    /// Counts a write that has just committed and must be durable before it is answered.
    pub(super) fn note_write(&self) {
        self.committed.fetch_add(1, Ordering::SeqCst);
    }

    /// Makes every write counted by [`Durable::note_write`] before the call durable; returns at once if a sync
    /// already covered them all. Group commit: the one sync a caller runs covers every write counted before it
    /// started, so concurrent callers share it.
    pub(super) fn flush_noted(&self, db: &sled::Db) -> Result<(), StoreError> {
        let wanted = self.committed.load(Ordering::SeqCst);
        let mut synced = self.synced.lock().unwrap_or_else(PoisonError::into_inner);
        if synced.through >= wanted {
            return Ok(());
        }
        self.sync(db, &mut synced)
    }

    /// Writes out everything `db` has buffered, noted or not, and makes it durable.
    pub(super) fn flush(&self, db: &sled::Db) -> Result<(), StoreError> {
        let mut synced = self.synced.lock().unwrap_or_else(PoisonError::into_inner);
        self.sync(db, &mut synced)
    }

    #[cfg(test)]
    pub(super) fn noted(&self) -> u64 {
        self.committed.load(Ordering::SeqCst)
    }

    #[cfg(test)]
    pub(super) fn synced_through(&self) -> u64 {
        self.synced.lock().unwrap_or_else(PoisonError::into_inner).through
    }

    fn sync(&self, db: &sled::Db, synced: &mut Synced) -> Result<(), StoreError> {
        let covers = self.committed.load(Ordering::SeqCst);
        db.flush()?;
        self.log.sync_data().map_err(StoreError::Sync)?;
        self.sync_blobs(synced).map_err(StoreError::Sync)?;
        synced.through = covers;
        Ok(())
    }

    /// Syncs blob files not synced yet, then their directory if any was new. The directory is usually empty: only
    /// a value larger than a quarter of a log segment becomes a blob.
    fn sync_blobs(&self, synced: &mut Synced) -> io::Result<()> {
        let blobs = self.dir.join("blobs");
        let entries = match std::fs::read_dir(&blobs) {
            Ok(entries) => entries,
            Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(error) => return Err(error),
        };
        let mut present = HashSet::new();
        let mut new = false;
        for entry in entries {
            let name = entry?.file_name();
            if !synced.blobs.contains(&name) {
                match File::open(blobs.join(&name)) {
                    Ok(file) => file.sync_all()?,
                    // Removed by sled's garbage collection since the listing.
                    Err(error) if error.kind() == io::ErrorKind::NotFound => continue,
                    Err(error) => return Err(error),
                }
                new = true;
            }
            present.insert(name);
        }
        if new {
            File::open(&blobs)?.sync_all()?;
        }
        synced.blobs = present;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flush_covers_noted_writes_once_and_syncs_new_blobs() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let db = sled::Config::new().path(&path).open().unwrap();
        let durable = Durable::open(&path).unwrap();
        db.insert(b"k", b"v").unwrap();
        durable.note_write();
        durable.flush_noted(&db).unwrap();
        assert_eq!(durable.synced.lock().unwrap().through, 1, "the flush covers the noted write");
        // Nothing noted since: no sync runs, so the blob written now is not seen until a full flush.
        db.insert(b"big", vec![7u8; 300 * 1024]).unwrap();
        durable.flush_noted(&db).unwrap();
        assert!(durable.synced.lock().unwrap().blobs.is_empty(), "a flush with nothing noted syncs nothing");
        // A value over the blob threshold (a quarter of sled's 512 KiB segment) lands in its own file.
        durable.flush(&db).unwrap();
        let synced = durable.synced.lock().unwrap();
        assert_eq!(synced.through, 1);
        assert_eq!(synced.blobs.len(), 1, "the blob file was found and synced: {:?}", synced.blobs);
    }
}
