//! Backups: one file, encrypted with a passphrase, holding a snapshot of the database taken at one instant while
//! enrolld runs (every table but sign-in sessions), the `pki/` keys and certificates and the uploaded files
//! (`android/`); and restoring one into a new directory, checked whole before anything is put in place.
//!
//! The file is the line `ENROLLD-BACKUP 1`, a line of JSON in clear ([`Header`]: versions, when, which box, which
//! CA, the key derivation's parameters and a key-check value), a line with the SHA-256 of the two before (so a
//! damaged header is told apart from a wrong passphrase), then the payload in chunks of `chunk_size` bytes, each
//! sealed with ChaCha20-Poly1305 under a key derived from the passphrase with argon2id. The chunks follow the STREAM
//! construction: the nonce is the chunk's number and a last-chunk flag, and chunk 0 also authenticates the clear
//! header. Every chunk is full (the last one is padded with zeros), so a file cut anywhere, chunks moved, bytes added
//! or any byte changed is detected, and named: truncated at byte N, or altered at chunk N.
//!
//! The payload is a sequence of entries: `F` a file (path, mode, size, bytes), `R` a record (table, key, value),
//! and last `E`, the [`Trailer`] (records per table, size and SHA-256 per file) that a restore checks against what
//! it read. The whole payload is encrypted, not only the keys: the records hold people's names and addresses.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufWriter, Read, Seek, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use base64::Engine as _;
use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, Nonce, UnboundKey};
use ring::digest;
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq as _;
use time::OffsetDateTime;

use crate::store::{Loader, SCHEMA_VERSION, Store, StoreError};

/// The format this build writes, and the newest it reads.
pub const FORMAT: u32 = 1;
const MAGIC: &str = "ENROLLD-BACKUP";
/// The shortest passphrase a new backup accepts.
pub const MIN_PASSPHRASE_CHARS: usize = 12;
const TAG_LEN: usize = 16;
const CIPHER: &str = "chacha20-poly1305";
const KDF: &str = "argon2id";
/// The longest clear header line read (the header is a few hundred bytes).
const MAX_HEADER_LINE: usize = 8 * 1024;
/// Tables a backup leaves out: sign-in sessions, so a restored box starts with everyone signed out.
const LEFT_OUT: &[&str] = &["sessions"];
/// The directories of the state directory a backup holds besides the database.
const DIRECTORIES: &[&str] = &["pki", "android"];
/// The largest record key or value a restore accepts (records are small JSON documents).
const MAX_RECORD_PART: u32 = 64 << 20;
/// The suffix of a file being written atomically (`state_dir::write_private`); such a file is left out.
const PARTIAL_SUFFIX: &str = ".tmp";

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error(
        "the passphrase must have at least {MIN_PASSPHRASE_CHARS} characters; it is the only way to read the backup, so choose one worth keeping, and keep it apart from the file"
    )]
    WeakPassphrase,
    #[error("this is not an enrolld backup (it does not start with \"{MAGIC}\")")]
    NotABackup,
    #[error("this backup was written by a newer enrolld ({0}); restore it with that version of enrolld or a later one")]
    Newer(String),
    #[error("the file is truncated (it ends inside its header); copy it again from where it was kept")]
    TruncatedHeader,
    #[error("the file's header is damaged ({0}); copy it again from where it was kept")]
    DamagedHeader(String),
    #[error("the passphrase is wrong; give the one chosen when this backup was made (it cannot be recovered)")]
    WrongPassphrase,
    #[error("the file is truncated (ends at byte {at} of the payload); copy it again from where it was kept")]
    Truncated { at: u64 },
    #[error(
        "the file was altered or damaged at chunk {chunk} (byte {at} of the payload); copy it again from where it was kept, or use another backup"
    )]
    Altered { chunk: u64, at: u64 },
    #[error(
        "the file was altered: more data follows its end (from byte {at} of the payload); copy it again from where it was kept"
    )]
    TrailingData { at: u64 },
    #[error(
        "the backup's contents do not add up ({0}); it was made by a faulty enrolld or changed before it was encrypted; use another backup"
    )]
    Inconsistent(String),
    #[error("{path}: {source}")]
    File { path: PathBuf, source: io::Error },
    #[error("reading the backup: {0}")]
    Read(io::Error),
    #[error("writing the backup: {0}; check the free space where it goes")]
    Write(io::Error),
    #[error(
        "{0} holds no appliance CA (pki/ca.crt); give the state directory of an enrolld that has started once (--state-dir)"
    )]
    NoCa(PathBuf),
    #[error("deriving the key from the passphrase: {0}")]
    Kdf(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl BackupError {
    /// True when the file itself is at fault (damaged, altered, not a backup, too new) rather than the passphrase
    /// or the machine.
    pub fn is_bad_file(&self) -> bool {
        matches!(
            self,
            BackupError::NotABackup
                | BackupError::Newer(_)
                | BackupError::TruncatedHeader
                | BackupError::DamagedHeader(_)
                | BackupError::Truncated { .. }
                | BackupError::Altered { .. }
                | BackupError::TrailingData { .. }
                | BackupError::Inconsistent(_)
        )
    }
}

/// A backup's passphrase. Never printed.
#[derive(Clone)]
pub struct Passphrase(String);

impl std::fmt::Debug for Passphrase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Passphrase(…)")
    }
}

impl Passphrase {
    /// A passphrase for a new backup: at least [`MIN_PASSPHRASE_CHARS`] characters.
    pub fn new(text: &str) -> Result<Passphrase, BackupError> {
        if text.chars().count() < MIN_PASSPHRASE_CHARS {
            return Err(BackupError::WeakPassphrase);
        }
        Ok(Passphrase(text.to_owned()))
    }

    /// The passphrase given to read a backup, as it is.
    pub fn given(text: &str) -> Passphrase {
        Passphrase(text.to_owned())
    }
}

/// The clear header: what a backup is, before the passphrase is asked for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    pub format: u32,
    /// The enrolld version that wrote it.
    pub enrolld: String,
    /// The database schema of the records in it ([`SCHEMA_VERSION`] of the writer).
    pub schema: u32,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    /// The box's host name when it was made.
    pub host: String,
    /// The SHA-256 of the appliance CA's certificate (DER, hex), as devices pin it.
    pub ca_sha256: String,
    pub kdf: Kdf,
    pub cipher: String,
    pub chunk_size: u32,
    /// Derived from the passphrase beside the payload key: a wrong passphrase is told apart from a damaged file.
    pub key_check: String,
}

/// The key derivation's parameters, as the header carries them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Kdf {
    pub algorithm: String,
    /// Base64, 16 random bytes.
    pub salt: String,
    /// Memory in KiB.
    pub m_kib: u32,
    pub t: u32,
    pub p: u32,
}

/// How hard the passphrase is to guess: argon2id's memory (KiB), passes and lanes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Strength {
    pub m_kib: u32,
    pub t: u32,
    pub p: u32,
}

/// What a backup is written with.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    pub strength: Strength,
    /// Bytes of payload per sealed chunk.
    pub chunk_size: usize,
}

impl Default for Options {
    /// 64 MiB and three passes (a third of a second on a small box, per guess); 64 KiB chunks.
    fn default() -> Self {
        Options { strength: Strength { m_kib: 64 * 1024, t: 3, p: 1 }, chunk_size: 64 * 1024 }
    }
}

/// The parameters a restore accepts: a crafted header must not make it allocate gigabytes or spin for hours.
const MAX_M_KIB: u32 = 1 << 20;
const MAX_T: u32 = 16;
const MAX_P: u32 = 16;
const CHUNK_SIZES: std::ops::RangeInclusive<u32> = 1024..=(1 << 20);

/// What the payload held, written last in it and checked by a restore.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Trailer {
    /// Records per table.
    pub records: BTreeMap<String, u64>,
    /// Every file, by its path in the state directory.
    pub files: BTreeMap<String, FileSum>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileSum {
    pub size: u64,
    pub sha256: String,
}

impl Trailer {
    /// The number of records of a table (`users`, `invites`, `devices`, …).
    pub fn count(&self, table: &str) -> u64 {
        self.records.get(table).copied().unwrap_or(0)
    }
}

/// What a backup is made of.
pub struct Source<'a> {
    pub store: &'a Store,
    /// The state directory, whose `pki/` and `android/` go in.
    pub state_dir: &'a Path,
    pub host: &'a str,
    pub now: OffsetDateTime,
}

/// A backup written: its header, what it holds, and its size in bytes.
#[derive(Debug, Clone)]
pub struct Written {
    pub header: Header,
    pub trailer: Trailer,
    pub bytes: u64,
}

/// The file name a download gets: `enrolld-backup-<host>-<yyyymmdd-hhmm>.enrolld`.
pub fn file_name(host: &str, at: OffsetDateTime) -> String {
    let at = at.to_offset(time::UtcOffset::UTC);
    let host: String = host.chars().filter(|c| c.is_ascii_alphanumeric() || *c == '-').collect();
    format!(
        "enrolld-backup-{host}-{:04}{:02}{:02}-{:02}{:02}.enrolld",
        at.year(),
        u8::from(at.month()),
        at.day(),
        at.hour(),
        at.minute()
    )
}

/// Writes a backup of `source` to `out`. The key is derived first; the records are then read in one snapshot of the
/// store, during which transactions wait (so `out` should be a local file, not a slow client).
pub fn write<W: Write>(
    source: &Source<'_>,
    passphrase: &Passphrase,
    out: W,
    options: &Options,
) -> Result<Written, BackupError> {
    let ca_sha256 = ca_sha256(&source.state_dir.join("pki").join("ca.crt"))
        .ok_or_else(|| BackupError::NoCa(source.state_dir.to_owned()))?;
    let salt: [u8; 16] = random()?;
    let kdf = Kdf {
        algorithm: KDF.into(),
        salt: base64::engine::general_purpose::STANDARD.encode(salt),
        m_kib: options.strength.m_kib,
        t: options.strength.t,
        p: options.strength.p,
    };
    let keys = derive(passphrase, &kdf)?;
    let header = Header {
        format: FORMAT,
        enrolld: env!("CARGO_PKG_VERSION").into(),
        schema: SCHEMA_VERSION,
        created_at: source.now,
        host: source.host.into(),
        ca_sha256,
        kdf,
        cipher: CIPHER.into(),
        chunk_size: u32::try_from(options.chunk_size).unwrap_or(u32::MAX),
        key_check: base64::engine::general_purpose::STANDARD.encode(keys.check),
    };
    let clear = clear_header(&header);
    let mut out = out;
    out.write_all(&clear).map_err(BackupError::Write)?;
    let clear_len = clear.len() as u64;
    let mut sealer = Sealer::new(out, keys.payload, options.chunk_size, clear);
    let mut trailer = Trailer::default();

    for dir in DIRECTORIES {
        for (relative, path) in files_under(source.state_dir, dir)? {
            let sum = write_file(&mut sealer, &relative, &path)?;
            trailer.files.insert(relative, sum);
        }
    }
    source.store.snapshot(
        |table| !LEFT_OUT.contains(&table),
        |table, key, value| {
            write_record(&mut sealer, table, key, value).map_err(BackupError::Write)?;
            *trailer.records.entry(table.to_owned()).or_default() += 1;
            Ok::<(), BackupError>(())
        },
    )?;
    let json = serde_json::to_vec(&trailer).unwrap_or_default();
    sealer.write_all(b"E").map_err(BackupError::Write)?;
    sealer.write_all(&len_u32(json.len())?.to_be_bytes()).map_err(BackupError::Write)?;
    sealer.write_all(&json).map_err(BackupError::Write)?;
    let payload = sealer.finish().map_err(BackupError::Write)?;
    Ok(Written { header, trailer, bytes: clear_len + payload })
}

/// Writes a backup into an unnamed file in `dir` (made and unlinked at once, so nothing is left behind), read back
/// from its start: a download then streams from disk at the client's pace while the store goes on.
pub fn to_temporary_file(
    source: &Source<'_>,
    passphrase: &Passphrase,
    dir: &Path,
    options: &Options,
) -> Result<(File, Written), BackupError> {
    let name: [u8; 8] = random()?;
    let path = dir.join(format!(".backup-{}.partial", crate::pki::sha256_hex(&name)));
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .map_err(|source| BackupError::File { path: path.clone(), source })?;
    fs::remove_file(&path).map_err(|source| BackupError::File { path: path.clone(), source })?;
    let mut out = BufWriter::new(file);
    let written = write(source, passphrase, &mut out, options)?;
    let mut file = out.into_inner().map_err(|error| BackupError::Write(error.into_error()))?;
    file.rewind().map_err(BackupError::Write)?;
    Ok((file, written))
}

/// A backup whose clear header was read and accepted: the format and schema are ones this build reads.
#[derive(Debug)]
pub struct Opened<R> {
    header: Header,
    clear: Vec<u8>,
    input: R,
}

/// Reads a backup's clear header. A newer format or schema is refused here, before the passphrase is needed.
pub fn open<R: BufRead>(mut input: R) -> Result<Opened<R>, BackupError> {
    let magic = read_line(&mut input)?;
    let version = std::str::from_utf8(&magic)
        .ok()
        .and_then(|line| line.strip_suffix('\n'))
        .and_then(|line| line.strip_prefix(MAGIC))
        .and_then(|rest| rest.strip_prefix(' '))
        .ok_or(BackupError::NotABackup)?;
    let format: u32 =
        version.parse().map_err(|_| BackupError::DamagedHeader(format!("the format is {version:?}, not a number")))?;
    if format > FORMAT {
        return Err(BackupError::Newer(format!("backup format {format}; this enrolld reads up to {FORMAT}")));
    }
    let json = read_line(&mut input)?;
    let checksum = read_line(&mut input)?;
    let mut clear = [magic.as_slice(), json.as_slice()].concat();
    let expected = crate::pki::sha256_hex(&clear);
    if checksum.strip_suffix(b"\n") != Some(expected.as_bytes()) {
        return Err(BackupError::DamagedHeader("its checksum does not match".into()));
    }
    clear.extend_from_slice(&checksum);
    let header: Header =
        serde_json::from_slice(&json).map_err(|error| BackupError::DamagedHeader(error.to_string()))?;
    if header.format != format {
        return Err(BackupError::DamagedHeader("its two format numbers differ".into()));
    }
    if header.schema > SCHEMA_VERSION {
        return Err(BackupError::Newer(format!(
            "enrolld {}, database schema {}; this enrolld knows up to schema {SCHEMA_VERSION}",
            header.enrolld, header.schema
        )));
    }
    let kdf = &header.kdf;
    if header.cipher != CIPHER || kdf.algorithm != KDF {
        return Err(BackupError::Newer(format!("cipher {}, key derivation {}", header.cipher, kdf.algorithm)));
    }
    if kdf.m_kib > MAX_M_KIB || !(1..=MAX_T).contains(&kdf.t) || !(1..=MAX_P).contains(&kdf.p) {
        return Err(BackupError::DamagedHeader("its key derivation asks for more than enrolld ever uses".into()));
    }
    if !CHUNK_SIZES.contains(&header.chunk_size) {
        return Err(BackupError::DamagedHeader(format!("a chunk size of {} bytes", header.chunk_size)));
    }
    Ok(Opened { header, clear, input })
}

/// A backup restored into a directory: its header and what it held.
#[derive(Debug, Clone)]
pub struct Restored {
    pub header: Header,
    pub trailer: Trailer,
}

impl<R: Read> Opened<R> {
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// Decrypts and checks the whole backup into `into` (a new directory, made here: `db/`, `pki/`, `android/`),
    /// then opens the database there once, which migrates an older schema. On any failure `into` is removed: nothing
    /// half-restored is left to be mistaken for a good one.
    pub fn restore(self, passphrase: &Passphrase, into: &Path) -> Result<Restored, BackupError> {
        let keys = derive(passphrase, &self.header.kdf)?;
        let expected = base64::engine::general_purpose::STANDARD.decode(&self.header.key_check).unwrap_or_default();
        if !bool::from(keys.check.as_slice().ct_eq(&expected)) {
            return Err(BackupError::WrongPassphrase);
        }
        fs::DirBuilder::new()
            .mode(0o700)
            .create(into)
            .map_err(|source| BackupError::File { path: into.to_owned(), source })?;
        let header = self.header.clone();
        let unpacked = unpack(self, keys.payload, into);
        if unpacked.is_err() {
            let _ = fs::remove_dir_all(into);
        }
        unpacked.map(|trailer| Restored { header, trailer })
    }
}

fn unpack<R: Read>(opened: Opened<R>, key: LessSafeKey, into: &Path) -> Result<Trailer, BackupError> {
    let chunk_size = opened.header.chunk_size as usize;
    let mut plain = Plain::new(Opener::new(opened.input, key, chunk_size, opened.clear));
    let mut loader = Loader::create(&into.join("db"))?;
    let mut found = Trailer::default();
    let trailer: Trailer = loop {
        match plain.u8()? {
            b'F' => {
                let path_len = plain.u16()?;
                let relative = String::from_utf8(plain.bytes(u32::from(path_len))?)
                    .map_err(|_| BackupError::Inconsistent("a file name is not UTF-8".into()))?;
                let mode = plain.u32()?;
                let size = plain.u64()?;
                let target = checked_path(into, &relative)?;
                let sum = plain.copy_into_file(&target, mode, size)?;
                if found.files.insert(relative.clone(), sum).is_some() {
                    return Err(BackupError::Inconsistent(format!("{relative} is in it twice")));
                }
            }
            b'R' => {
                let name_len = plain.u8()?;
                let table = String::from_utf8(plain.bytes(u32::from(name_len))?)
                    .map_err(|_| BackupError::Inconsistent("a table name is not UTF-8".into()))?;
                let key_len = plain.u32()?;
                let key = plain.bytes(key_len)?;
                let value_len = plain.u32()?;
                let value = plain.bytes(value_len)?;
                *found.records.entry(table.clone()).or_default() += 1;
                // A backup never holds sessions; should one, they still do not come back.
                if !LEFT_OUT.contains(&table.as_str()) {
                    loader.insert(&table, &key, &value)?;
                }
            }
            b'E' => {
                let len = plain.u32()?;
                let json = plain.bytes(len)?;
                break serde_json::from_slice(&json)
                    .map_err(|error| BackupError::Inconsistent(format!("its trailer cannot be read: {error}")))?;
            }
            other => return Err(BackupError::Inconsistent(format!("an entry of unknown kind {other:#04x}"))),
        }
    };
    plain.rest_is_padding()?;
    loader.finish()?;
    for (table, count) in &trailer.records {
        if found.count(table) != *count {
            return Err(BackupError::Inconsistent(format!(
                "{table} should hold {count} records and holds {}",
                found.count(table)
            )));
        }
    }
    if found.records.len() != trailer.records.len() {
        return Err(BackupError::Inconsistent("it holds records of a table its trailer does not list".into()));
    }
    if found.files != trailer.files {
        return Err(BackupError::Inconsistent("its files are not the ones its trailer lists".into()));
    }
    let ca = ca_sha256(&into.join("pki").join("ca.crt"));
    if ca.as_deref() != Some(opened.header.ca_sha256.as_str()) {
        return Err(BackupError::Inconsistent("its CA certificate is not the one its header names".into()));
    }
    // The loader that wrote it has just let go; sled releases its file lock a moment later.
    drop(Store::open_when_free(&into.join("db"), std::time::Duration::from_secs(10))?);
    Ok(trailer)
}

/// The payload key and the key-check value, both from the passphrase.
struct Keys {
    payload: LessSafeKey,
    check: [u8; 16],
}

/// argon2id turns the passphrase and salt into a master key; HKDF-SHA-256 splits it into the payload key and the
/// key-check value, so the value reveals nothing of the key.
fn derive(passphrase: &Passphrase, kdf: &Kdf) -> Result<Keys, BackupError> {
    let salt = base64::engine::general_purpose::STANDARD
        .decode(&kdf.salt)
        .map_err(|_| BackupError::DamagedHeader("its salt is not base64".into()))?;
    let params = argon2::Params::new(kdf.m_kib, kdf.t, kdf.p, Some(32))
        .map_err(|error| BackupError::DamagedHeader(format!("its key derivation parameters: {error}")))?;
    let argon = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
    let mut master = [0u8; 32];
    argon
        .hash_password_into(passphrase.0.as_bytes(), &salt, &mut master)
        .map_err(|error| BackupError::Kdf(error.to_string()))?;
    let prk = ring::hkdf::Salt::new(ring::hkdf::HKDF_SHA256, b"enrolld backup 1").extract(&master);
    let unspecified = |_| BackupError::Kdf("HKDF failed".into());
    let payload: UnboundKey = prk.expand(&[b"payload key"], &CHACHA20_POLY1305).map_err(unspecified)?.into();
    let mut check = [0u8; 16];
    prk.expand(&[b"key check"], CheckLen).and_then(|okm| okm.fill(&mut check)).map_err(unspecified)?;
    Ok(Keys { payload: LessSafeKey::new(payload), check })
}

struct CheckLen;

impl ring::hkdf::KeyType for CheckLen {
    fn len(&self) -> usize {
        16
    }
}

/// The three clear lines: magic and format, the header as JSON, and the SHA-256 of those two.
fn clear_header(header: &Header) -> Vec<u8> {
    let mut clear = format!("{MAGIC} {FORMAT}\n").into_bytes();
    clear.extend_from_slice(&serde_json::to_vec(header).unwrap_or_default());
    clear.push(b'\n');
    let checksum = crate::pki::sha256_hex(&clear);
    clear.extend_from_slice(checksum.as_bytes());
    clear.push(b'\n');
    clear
}

fn read_line(input: &mut impl BufRead) -> Result<Vec<u8>, BackupError> {
    let mut line = Vec::new();
    input.take(MAX_HEADER_LINE as u64).read_until(b'\n', &mut line).map_err(BackupError::Read)?;
    if line.last() != Some(&b'\n') {
        return Err(if line.len() >= MAX_HEADER_LINE { BackupError::NotABackup } else { BackupError::TruncatedHeader });
    }
    Ok(line)
}

/// The nonce of chunk `counter`: 3 zero bytes, the counter (64-bit big-endian), and 1 on the last chunk. The key
/// is new for every backup (its salt is), so the counter alone never repeats under one key.
fn nonce(counter: u64, last: bool) -> Nonce {
    let mut bytes = [0u8; 12];
    bytes[3..11].copy_from_slice(&counter.to_be_bytes());
    bytes[11] = u8::from(last);
    Nonce::assume_unique_for_key(bytes)
}

/// Seals what is written to it in chunks of `chunk_size`, the last one padded to full size and flagged.
struct Sealer<W: Write> {
    out: W,
    key: LessSafeKey,
    chunk_size: usize,
    buf: Vec<u8>,
    counter: u64,
    /// The clear header, authenticated with chunk 0.
    header: Option<Vec<u8>>,
    written: u64,
}

impl<W: Write> Sealer<W> {
    fn new(out: W, key: LessSafeKey, chunk_size: usize, header: Vec<u8>) -> Self {
        Sealer {
            out,
            key,
            chunk_size,
            buf: Vec::with_capacity(chunk_size + TAG_LEN),
            counter: 0,
            header: Some(header),
            written: 0,
        }
    }

    fn seal(&mut self, last: bool) -> io::Result<()> {
        self.buf.resize(self.chunk_size, 0);
        let aad = self.header.take().unwrap_or_default();
        let tag = self
            .key
            .seal_in_place_separate_tag(nonce(self.counter, last), Aad::from(aad.as_slice()), &mut self.buf)
            .map_err(|_| io::Error::other("sealing a chunk failed"))?;
        self.buf.extend_from_slice(tag.as_ref());
        self.out.write_all(&self.buf)?;
        self.written += self.buf.len() as u64;
        self.counter += 1;
        self.buf.clear();
        Ok(())
    }

    /// Seals the last chunk; returns the payload's size.
    fn finish(mut self) -> io::Result<u64> {
        self.seal(true)?;
        self.out.flush()?;
        Ok(self.written)
    }
}

impl<W: Write> Write for Sealer<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        // A full chunk is sealed only once more data comes, so the last one is never an empty extra chunk.
        if self.buf.len() == self.chunk_size && !data.is_empty() {
            self.seal(false)?;
        }
        let n = (self.chunk_size - self.buf.len()).min(data.len());
        self.buf.extend_from_slice(&data[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

/// Opens the sealed chunks in order, telling a cut file from an altered one.
struct Opener<R> {
    input: R,
    key: LessSafeKey,
    chunk_size: usize,
    counter: u64,
    header: Option<Vec<u8>>,
    /// Payload bytes read so far.
    offset: u64,
    /// One byte read ahead to learn whether the chunk just read is the file's last.
    peeked: Option<u8>,
    finished: bool,
    buf: Vec<u8>,
    spare: Vec<u8>,
}

impl<R: Read> Opener<R> {
    fn new(input: R, key: LessSafeKey, chunk_size: usize, header: Vec<u8>) -> Self {
        Opener {
            input,
            key,
            chunk_size,
            counter: 0,
            header: Some(header),
            offset: 0,
            peeked: None,
            finished: false,
            buf: Vec::with_capacity(chunk_size + TAG_LEN),
            spare: Vec::with_capacity(chunk_size + TAG_LEN),
        }
    }

    /// Opens the next chunk into `self.buf[..chunk_size]`; false after the last one.
    fn next(&mut self) -> Result<bool, BackupError> {
        if self.finished {
            return Ok(false);
        }
        let sealed_len = self.chunk_size + TAG_LEN;
        self.buf.clear();
        self.buf.extend(self.peeked.take());
        let missing = (sealed_len - self.buf.len()) as u64;
        (&mut self.input).take(missing).read_to_end(&mut self.buf).map_err(BackupError::Read)?;
        let start = self.offset;
        if self.buf.len() < sealed_len {
            return Err(BackupError::Truncated { at: start + self.buf.len() as u64 });
        }
        let mut one = [0u8; 1];
        let at_end = loop {
            match self.input.read(&mut one) {
                Ok(0) => break true,
                Ok(_) => {
                    self.peeked = Some(one[0]);
                    break false;
                }
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                Err(error) => return Err(BackupError::Read(error)),
            }
        };
        let aad = self.header.take().unwrap_or_default();
        self.spare.clear();
        self.spare.extend_from_slice(&self.buf);
        let opened = self.key.open_in_place(nonce(self.counter, at_end), Aad::from(aad.as_slice()), &mut self.buf);
        if opened.is_err() {
            // Sealed with the other flag: the file was cut right after a chunk, or goes on after its last one.
            let other =
                self.key.open_in_place(nonce(self.counter, !at_end), Aad::from(aad.as_slice()), &mut self.spare);
            let end = start + sealed_len as u64;
            return Err(match (other.is_ok(), at_end) {
                (true, true) => BackupError::Truncated { at: end },
                (true, false) => BackupError::TrailingData { at: end },
                (false, _) => BackupError::Altered { chunk: self.counter, at: start },
            });
        }
        self.offset = start + sealed_len as u64;
        self.counter += 1;
        self.finished = at_end;
        Ok(true)
    }
}

/// The payload's plaintext, read across chunks.
struct Plain<R> {
    opener: Opener<R>,
    /// Position in the open chunk; equal to the chunk size when it is used up (or none is open yet).
    pos: usize,
}

impl<R: Read> Plain<R> {
    fn new(opener: Opener<R>) -> Self {
        let pos = opener.chunk_size;
        Plain { opener, pos }
    }

    /// The open chunk's unread bytes, opening the next chunk when it is used up; empty at the end.
    fn available(&mut self) -> Result<&[u8], BackupError> {
        if self.pos == self.opener.chunk_size {
            if !self.opener.next()? {
                return Ok(&[]);
            }
            self.pos = 0;
        }
        Ok(&self.opener.buf[self.pos..self.opener.chunk_size])
    }

    fn read_exact(&mut self, out: &mut [u8]) -> Result<(), BackupError> {
        let mut filled = 0;
        while filled < out.len() {
            let available = self.available()?;
            if available.is_empty() {
                return Err(BackupError::Inconsistent("the payload ends inside an entry".into()));
            }
            let n = available.len().min(out.len() - filled);
            out[filled..filled + n].copy_from_slice(&available[..n]);
            filled += n;
            self.pos += n;
        }
        Ok(())
    }

    fn u8(&mut self) -> Result<u8, BackupError> {
        let mut bytes = [0u8; 1];
        self.read_exact(&mut bytes)?;
        Ok(bytes[0])
    }

    fn u16(&mut self) -> Result<u16, BackupError> {
        let mut bytes = [0u8; 2];
        self.read_exact(&mut bytes)?;
        Ok(u16::from_be_bytes(bytes))
    }

    fn u32(&mut self) -> Result<u32, BackupError> {
        let mut bytes = [0u8; 4];
        self.read_exact(&mut bytes)?;
        Ok(u32::from_be_bytes(bytes))
    }

    fn u64(&mut self) -> Result<u64, BackupError> {
        let mut bytes = [0u8; 8];
        self.read_exact(&mut bytes)?;
        Ok(u64::from_be_bytes(bytes))
    }

    fn bytes(&mut self, len: u32) -> Result<Vec<u8>, BackupError> {
        if len > MAX_RECORD_PART {
            return Err(BackupError::Inconsistent(format!("an entry of {len} bytes")));
        }
        let mut out = vec![0u8; len as usize];
        self.read_exact(&mut out)?;
        Ok(out)
    }

    /// Copies the next `size` bytes into a new file at `path` (its directories made 0700), with the mode's
    /// permission bits kept to 0600 or 0644; returns its size and SHA-256.
    fn copy_into_file(&mut self, path: &Path, mode: u32, size: u64) -> Result<FileSum, BackupError> {
        let fail = |source| BackupError::File { path: path.to_owned(), source };
        if let Some(dir) = path.parent() {
            fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(fail)?;
        }
        let mode = if mode & 0o044 != 0 { 0o644 } else { 0o600 };
        let file = OpenOptions::new().write(true).create_new(true).mode(0o600).open(path).map_err(fail)?;
        file.set_permissions(fs::Permissions::from_mode(mode)).map_err(fail)?;
        let mut file = BufWriter::new(file);
        let mut hash = digest::Context::new(&digest::SHA256);
        let mut left = size;
        while left > 0 {
            let available = self.available()?;
            if available.is_empty() {
                return Err(BackupError::Inconsistent("the payload ends inside a file".into()));
            }
            let n = available.len().min(usize::try_from(left).unwrap_or(usize::MAX));
            hash.update(&available[..n]);
            file.write_all(&available[..n]).map_err(fail)?;
            self.pos += n;
            left -= n as u64;
        }
        let file = file.into_inner().map_err(|error| fail(error.into_error()))?;
        file.sync_all().map_err(fail)?;
        Ok(FileSum { size, sha256: hex(hash.finish().as_ref()) })
    }

    /// After the trailer: the rest of the last chunk is padding (zeros), and no chunk follows.
    fn rest_is_padding(&mut self) -> Result<(), BackupError> {
        let rest = &self.opener.buf[self.pos.min(self.opener.chunk_size)..self.opener.chunk_size];
        if rest.iter().any(|b| *b != 0) || !self.opener.finished {
            return Err(BackupError::Inconsistent("there is data after its trailer".into()));
        }
        Ok(())
    }
}

/// Every regular file under `state/dir`, as (path relative to `state` with `/`, full path), sorted; none if the
/// directory does not exist. Files being written atomically (`*.tmp`) are left out.
fn files_under(state: &Path, dir: &str) -> Result<Vec<(String, PathBuf)>, BackupError> {
    let mut found = Vec::new();
    let mut pending = vec![(dir.to_owned(), state.join(dir))];
    while let Some((relative, path)) = pending.pop() {
        let entries = match fs::read_dir(&path) {
            Ok(entries) => entries,
            Err(error) if error.kind() == io::ErrorKind::NotFound => continue,
            Err(source) => return Err(BackupError::File { path, source }),
        };
        for entry in entries {
            let entry = entry.map_err(|source| BackupError::File { path: path.clone(), source })?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let kind = entry.file_type().map_err(|source| BackupError::File { path: entry.path(), source })?;
            let child = format!("{relative}/{name}");
            if kind.is_dir() {
                pending.push((child, entry.path()));
            } else if kind.is_file() && !name.ends_with(PARTIAL_SUFFIX) {
                found.push((child, entry.path()));
            }
        }
    }
    found.sort();
    Ok(found)
}

fn write_file<W: Write>(sealer: &mut Sealer<W>, relative: &str, path: &Path) -> Result<FileSum, BackupError> {
    let fail = |source| BackupError::File { path: path.to_owned(), source };
    let mut file = File::open(path).map_err(fail)?;
    let meta = file.metadata().map_err(fail)?;
    let size = meta.len();
    let name = relative.as_bytes();
    let name_len = u16::try_from(name.len())
        .map_err(|_| BackupError::File { path: path.to_owned(), source: io::Error::other("its name is too long") })?;
    sealer.write_all(b"F").map_err(BackupError::Write)?;
    sealer.write_all(&name_len.to_be_bytes()).map_err(BackupError::Write)?;
    sealer.write_all(name).map_err(BackupError::Write)?;
    sealer.write_all(&(meta.permissions().mode() & 0o777).to_be_bytes()).map_err(BackupError::Write)?;
    sealer.write_all(&size.to_be_bytes()).map_err(BackupError::Write)?;
    let mut hash = digest::Context::new(&digest::SHA256);
    let mut left = size;
    let mut buf = vec![0u8; 64 * 1024];
    while left > 0 {
        let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        let n = file.read(&mut buf[..want]).map_err(fail)?;
        if n == 0 {
            return Err(fail(io::Error::other("it became shorter while it was read; make the backup again")));
        }
        hash.update(&buf[..n]);
        sealer.write_all(&buf[..n]).map_err(BackupError::Write)?;
        left -= n as u64;
    }
    Ok(FileSum { size, sha256: hex(hash.finish().as_ref()) })
}

fn write_record<W: Write>(sealer: &mut Sealer<W>, table: &str, key: &[u8], value: &[u8]) -> io::Result<()> {
    let too_long = |what| io::Error::other(format!("a record's {what} is too long"));
    let name_len = u8::try_from(table.len()).map_err(|_| too_long("table name"))?;
    sealer.write_all(b"R")?;
    sealer.write_all(&[name_len])?;
    sealer.write_all(table.as_bytes())?;
    sealer.write_all(&u32::try_from(key.len()).map_err(|_| too_long("key"))?.to_be_bytes())?;
    sealer.write_all(key)?;
    sealer.write_all(&u32::try_from(value.len()).map_err(|_| too_long("value"))?.to_be_bytes())?;
    sealer.write_all(value)
}

fn len_u32(len: usize) -> Result<u32, BackupError> {
    u32::try_from(len).map_err(|_| BackupError::Write(io::Error::other("the trailer is too long")))
}

/// Where a file of the backup goes under `into`: a relative path of plain names inside one of [`DIRECTORIES`].
fn checked_path(into: &Path, relative: &str) -> Result<PathBuf, BackupError> {
    let path = Path::new(relative);
    let plain = path.components().all(|c| matches!(c, Component::Normal(_)));
    let top = path.components().next().and_then(|c| c.as_os_str().to_str());
    if !plain || !top.is_some_and(|top| DIRECTORIES.contains(&top)) || path.components().count() < 2 {
        return Err(BackupError::Inconsistent(format!("a file named {relative:?}")));
    }
    Ok(into.join(path))
}

/// The SHA-256 (hex) of the first certificate in a PEM file, if it can be read.
fn ca_sha256(path: &Path) -> Option<String> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject as _;
    let pem = fs::read(path).ok()?;
    let der = CertificateDer::pem_slice_iter(&pem).next()?.ok()?;
    Some(crate::pki::sha256_hex(&der))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn random<const N: usize>() -> Result<[u8; N], BackupError> {
    let mut bytes = [0u8; N];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
        .map_err(|_| BackupError::Write(io::Error::other("the system random number generator failed")))?;
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Group, Id, Session, Setting, User};
    use crate::store::tree;

    const PASSPHRASE: &str = "correct horse battery staple";
    /// Light key derivation and 1 KiB chunks, so the tests are quick and a small backup spans many chunks.
    const LIGHT: Options = Options { strength: Strength { m_kib: 64, t: 1, p: 1 }, chunk_size: 1024 };
    const SEALED: usize = 1024 + TAG_LEN;

    fn at(n: i64) -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp(1_790_000_000 + n).unwrap()
    }

    /// A state directory with a CA, an extra key, an uploaded app of several chunks, and a store with records in
    /// several tables (and one session).
    struct Box {
        dir: tempfile::TempDir,
        store: Store,
    }

    impl Box {
        fn new() -> Box {
            let dir = tempfile::tempdir().unwrap();
            crate::pki::CertificateAuthority::load_or_create(&dir.path().join("pki"), "enroll", at(0)).unwrap();
            crate::state_dir::write_private(&dir.path().join("pki/passcode.key"), &[7; 32], 0o600).unwrap();
            let apk: Vec<u8> = (0..5000u32).map(|n| (n * 7 % 251) as u8).collect();
            fs::create_dir(dir.path().join("android")).unwrap();
            fs::write(dir.path().join("android/dpc.apk"), &apk).unwrap();
            fs::write(dir.path().join("pki/server.key.tmp"), b"half-written").unwrap();
            let store = Store::open(&dir.path().join("db")).unwrap();
            store
                .transact::<_, ()>(|tx| {
                    for n in 0..20u8 {
                        let user = User {
                            id: Id::new(at(n.into()), [n; 10]),
                            name: format!("User {n}"),
                            email: format!("user{n}@example.com"),
                            phone: None,
                            domain: None,
                            notes: String::new(),
                            groups: Vec::new(),
                            created_at: at(n.into()),
                            updated_at: at(n.into()),
                            import: None,
                        };
                        tx.put(None, &user)?;
                    }
                    let group = Group {
                        id: Id::new(at(1), [1; 10]),
                        name: "Field".into(),
                        description: String::new(),
                        created_at: at(1),
                        import: None,
                    };
                    tx.put(None, &group)?;
                    let setting = Setting {
                        name: "appliance.hostname".into(),
                        value: "front".into(),
                        updated_at: at(2),
                        updated_by: "admin".into(),
                    };
                    tx.put(None, &setting)?;
                    let session = Session {
                        token_hash: "ab".repeat(32),
                        username: "admin".into(),
                        csrf_token: "csrf".into(),
                        created_at: at(3),
                        expires_at: at(3600),
                        client: None,
                        generation: 0,
                    };
                    tx.put(None, &session)
                })
                .unwrap();
            Box { dir, store }
        }

        fn backup(&self) -> (Vec<u8>, Written) {
            let source = Source { store: &self.store, state_dir: self.dir.path(), host: "enroll", now: at(60) };
            let mut out = Vec::new();
            let written = write(&source, &Passphrase::new(PASSPHRASE).unwrap(), &mut out, &LIGHT).unwrap();
            assert_eq!(written.bytes, out.len() as u64);
            (out, written)
        }
    }

    fn restore(bytes: &[u8], passphrase: &str, into: &Path) -> Result<Restored, BackupError> {
        open(bytes)?.restore(&Passphrase::given(passphrase), into)
    }

    /// Where the payload starts: after the three clear lines.
    fn payload_start(bytes: &[u8]) -> usize {
        let mut newlines = bytes.iter().enumerate().filter(|(_, b)| **b == b'\n');
        newlines.nth(2).unwrap().0 + 1
    }

    /// Restores `bytes` expecting `check` to accept the error, and that nothing is left where it was to go.
    fn refused(bytes: &[u8], passphrase: &str, check: impl Fn(&BackupError) -> bool) -> String {
        let dir = tempfile::tempdir().unwrap();
        let into = dir.path().join("restored");
        let error = restore(bytes, passphrase, &into).unwrap_err();
        assert!(check(&error), "{error:?}: {error}");
        assert!(!into.exists(), "nothing is left behind after {error}");
        error.to_string()
    }

    #[test]
    fn a_backup_restores_every_record_and_file_but_not_sessions() {
        let b = Box::new();
        let (bytes, written) = b.backup();
        assert!(bytes.starts_with(b"ENROLLD-BACKUP 1\n"));
        let clear = String::from_utf8_lossy(&bytes[..payload_start(&bytes)]).into_owned();
        assert!(!clear.contains("User 1") && !bytes.windows(8).any(|w| w == b"User 12\""), "records are encrypted");
        assert!(!bytes.windows(11).any(|w| w == b"PRIVATE KEY"), "keys are encrypted");
        assert_eq!((bytes.len() - payload_start(&bytes)) % SEALED, 0, "whole chunks only");
        assert!(
            written.trailer.files.contains_key("pki/ca.key") && written.trailer.files.contains_key("android/dpc.apk")
        );
        assert!(!written.trailer.files.contains_key("pki/server.key.tmp"), "half-written files stay out");
        assert_eq!(written.trailer.count("users"), 20);
        assert!(!written.trailer.records.contains_key("sessions"), "{:?}", written.trailer.records);

        let dir = tempfile::tempdir().unwrap();
        let into = dir.path().join("restored");
        let opened = open(bytes.as_slice()).unwrap();
        let header = opened.header().clone();
        assert_eq!((header.schema, header.host.as_str(), header.format), (SCHEMA_VERSION, "enroll", FORMAT));
        let ca_pem = fs::read(b.dir.path().join("pki/ca.crt")).unwrap();
        assert_eq!(Some(header.ca_sha256.clone()), ca_sha256(&b.dir.path().join("pki/ca.crt")));
        let restored = opened.restore(&Passphrase::given(PASSPHRASE), &into).unwrap();
        assert_eq!(restored.trailer, written.trailer);
        assert_eq!(fs::read(into.join("pki/ca.crt")).unwrap(), ca_pem, "the same CA");
        for file in ["pki/ca.key", "pki/passcode.key", "android/dpc.apk"] {
            assert_eq!(fs::read(into.join(file)).unwrap(), fs::read(b.dir.path().join(file)).unwrap(), "{file}");
        }
        let mode = |path: &Path| fs::metadata(path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&into.join("pki/ca.key")), 0o600);
        assert_eq!(mode(&into.join("pki/ca.crt")), 0o644);

        let store = Store::open_when_free(&into.join("db"), std::time::Duration::from_secs(10)).unwrap();
        let users = store.all::<User>(|_| true).unwrap();
        assert_eq!(users.len(), 20);
        assert_eq!(users, b.store.all::<User>(|_| true).unwrap());
        assert_eq!(store.count("users").unwrap(), 20, "counters come back with their records");
        assert_eq!(store.lookup(tree::USERS_BY_EMAIL, b"user7@example.com").unwrap(), Some(users[7].id.0.to_vec()));
        assert_eq!(store.all::<Group>(|_| true).unwrap().len(), 1);
        assert_eq!(store.get::<Setting>(b"appliance.hostname").unwrap().unwrap().value, "front");
        assert_eq!(b.store.all::<Session>(|_| true).unwrap().len(), 1);
        assert!(store.all::<Session>(|_| true).unwrap().is_empty(), "sign-in sessions do not come back");
    }

    #[test]
    fn a_wrong_passphrase_is_told_apart_from_a_damaged_file() {
        let (bytes, _) = Box::new().backup();
        let message = refused(&bytes, "correct horse battery stapler", |e| matches!(e, BackupError::WrongPassphrase));
        assert!(message.contains("passphrase is wrong"), "{message}");
        assert!(matches!(Passphrase::new("too short"), Err(BackupError::WeakPassphrase)));
    }

    #[test]
    fn a_truncated_file_says_where_it_ends() {
        let (bytes, _) = Box::new().backup();
        let start = payload_start(&bytes);
        let chunks = (bytes.len() - start) / SEALED;
        assert!(chunks >= 4, "{chunks} chunks");
        for cut in [10, start - 1] {
            refused(&bytes[..cut], PASSPHRASE, |e| matches!(e, BackupError::TruncatedHeader));
        }
        for at in [0, 1, 700, SEALED, SEALED + 5, 2 * SEALED, (chunks - 1) * SEALED, chunks * SEALED - 1] {
            let message = refused(
                &bytes[..start + at],
                PASSPHRASE,
                |e| matches!(e, BackupError::Truncated { at: found } if *found == at as u64),
            );
            assert!(message.contains(&format!("truncated (ends at byte {at} of the payload)")), "{message}");
        }
    }

    #[test]
    fn a_changed_byte_is_found_in_the_header_and_in_any_chunk() {
        let (bytes, _) = Box::new().backup();
        let start = payload_start(&bytes);
        let chunks = (bytes.len() - start) / SEALED;
        let flipped = |index: usize| {
            let mut copy = bytes.clone();
            copy[index] ^= 0x01;
            copy
        };
        // In the JSON line (the host name), and in the checksum line.
        let host = bytes.windows(6).position(|w| w == b"enroll").unwrap();
        refused(&flipped(host), PASSPHRASE, |e| matches!(e, BackupError::DamagedHeader(_)));
        refused(&flipped(start - 2), PASSPHRASE, |e| matches!(e, BackupError::DamagedHeader(_)));
        refused(&flipped(3), PASSPHRASE, |e| matches!(e, BackupError::NotABackup));
        for (chunk, offset) in [(0, 3), (chunks / 2, 500), (chunks - 1, 100), (chunks - 1, SEALED - 1)] {
            let message = refused(
                &flipped(start + chunk * SEALED + offset),
                PASSPHRASE,
                |e| matches!(e, BackupError::Altered { chunk: found, .. } if *found == chunk as u64),
            );
            assert!(message.contains(&format!("altered or damaged at chunk {chunk}")), "{message}");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        refused(&longer, PASSPHRASE, |e| matches!(e, BackupError::TrailingData { .. }));
    }

    #[test]
    fn chunks_in_another_order_are_refused() {
        let (bytes, _) = Box::new().backup();
        let start = payload_start(&bytes);
        let mut swapped = bytes.clone();
        let (one, two) = (start + SEALED, start + 2 * SEALED);
        swapped[one..two].copy_from_slice(&bytes[two..two + SEALED]);
        swapped[two..two + SEALED].copy_from_slice(&bytes[one..two]);
        refused(&swapped, PASSPHRASE, |e| matches!(e, BackupError::Altered { chunk: 1, .. }));
        // The last chunk dropped and the one before it in its place: the flag tells it was not the end.
        let chunks = (bytes.len() - start) / SEALED;
        let mut moved = bytes[..start + (chunks - 2) * SEALED].to_vec();
        moved.extend_from_slice(&bytes[start + (chunks - 1) * SEALED..]);
        refused(&moved, PASSPHRASE, |e| matches!(e, BackupError::Altered { .. }));
    }

    #[test]
    fn a_newer_format_or_schema_is_refused_before_the_passphrase() {
        let (bytes, written) = Box::new().backup();
        let start = payload_start(&bytes);
        let mut newer_format = bytes.clone();
        newer_format[15] = b'2';
        let error = open(newer_format.as_slice()).unwrap_err();
        assert!(matches!(error, BackupError::Newer(_)), "{error:?}");
        assert!(error.to_string().contains("backup format 2; this enrolld reads up to 1"), "{error}");

        let header = Header { schema: SCHEMA_VERSION + 1, ..written.header.clone() };
        let mut newer_schema = clear_header(&header);
        newer_schema.extend_from_slice(&bytes[start..]);
        let error = open(newer_schema.as_slice()).unwrap_err();
        assert!(error.to_string().contains(&format!("database schema {}", SCHEMA_VERSION + 1)), "{error}");

        // An older schema is fine (the store migrates on open).
        let header = Header { schema: 1, ..written.header };
        let mut older = clear_header(&header);
        older.extend_from_slice(&bytes[start..]);
        assert!(open(older.as_slice()).is_ok());
        assert!(matches!(open(&b"PK\x03\x04 a zip file\n"[..]), Err(BackupError::NotABackup)));
    }

    #[test]
    fn a_backup_to_a_temporary_file_leaves_no_name_behind() {
        let b = Box::new();
        let source = Source { store: &b.store, state_dir: b.dir.path(), host: "enroll", now: at(60) };
        let spool = tempfile::tempdir().unwrap();
        let (mut file, written) =
            to_temporary_file(&source, &Passphrase::new(PASSPHRASE).unwrap(), spool.path(), &LIGHT).unwrap();
        assert_eq!(fs::read_dir(spool.path()).unwrap().count(), 0);
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes).unwrap();
        assert_eq!(bytes.len() as u64, written.bytes);
        let into = spool.path().join("restored");
        assert_eq!(restore(&bytes, PASSPHRASE, &into).unwrap().trailer.count("users"), 20);
        assert_eq!(file_name("enroll", at(0)), "enrolld-backup-enroll-20260921-1413.enrolld");
    }
}
