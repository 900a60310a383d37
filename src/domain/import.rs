//! CSV imports as jobs, and CSV exports.
//!
//! An upload is spooled to a file in the state directory, then read twice, streaming. The first pass checks
//! every row: its cells (in `csvfile`), duplicates within the file, and pending invites or staged devices that
//! already exist. The second pass applies the valid rows in batches.
//! - **Batches.** Each batch is one transaction holding its users, groups, invites with their delivery jobs, and
//!   the import's progress, so no invite ever exists without its delivery job.
//! - **Default mode (`all`).** A file with any invalid row imports nothing. Every record the import creates
//!   carries its id, so an import cut short by a crash, a shutdown or a failure is removed whole (at once, or at
//!   the next start). Its rows reach the disk before its "done" does, and one cut after its last batch but before
//!   "done" is finished as done at the next start, so an import an admin saw done is never rolled back.
//! - **`valid_only`.** An interrupted import keeps what it did and records the last line imported.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::path::PathBuf;

use serde::Deserialize;
use utoipa::{IntoParams, ToSchema};

use super::invites::{InviteOrigin, Secrets, new_secrets};
use super::{
    Actor, DomainError, DomainResult, Enrollment, NewInvite, Paged, TxResult, clamp_limit, decode_cursor, paged,
};
use crate::csvfile::{self, Column, CsvKind, CsvReader, Row};
use crate::model::{
    Channels, DeliveryJob, Group, Id, Import, ImportKind, ImportMode, ImportReport, ImportState, Invite, InviteStatus,
    Platform, RowProblem, StagedDevice, User,
};
use crate::store::{Scan, Tx, hardware_key, tree};

/// Rows applied per transaction.
const BATCH_ROWS: usize = 500;
/// Rows between flushes of the store during an import.
const FLUSH_EVERY_ROWS: u64 = 10_000;
/// Problems kept in a report (all are counted).
const PROBLEMS_KEPT: usize = 1_000;

/// An upload to import.
#[derive(Debug, Clone, Deserialize, IntoParams, ToSchema)]
#[into_params(parameter_in = Query)]
pub struct ImportRequest {
    /// `invites` or `staged`.
    pub kind: ImportKind,
    /// `all` (default): any invalid row and nothing is imported. `valid_only`: import the valid rows, report the rest.
    #[serde(default = "default_mode")]
    pub mode: ImportMode,
    /// The uploaded file's name, for the record.
    pub filename: Option<String>,
}

fn default_mode() -> ImportMode {
    ImportMode::All
}

/// Which list to export, with the filters the admin's page shows it with.
#[derive(Debug, Clone)]
pub enum ExportList {
    /// Invites, in the invite CSV's columns.
    Invites(super::InviteQuery),
    /// Staged devices, in the staged CSV's columns.
    Staged(super::StagedQuery),
    /// Managed devices.
    Managed(super::DeviceQuery),
}

/// What one batch did, returned from its transaction (which may run more than once, so it counts nothing itself).
#[derive(Default)]
struct BatchOutcome {
    new_users: Vec<String>,
    matched_users: Vec<String>,
    new_groups: Vec<String>,
    invites: u64,
    staged: u64,
    refused: Vec<RowProblem>,
}

/// Running totals across batches.
#[derive(Default)]
struct Totals {
    created_users: HashSet<String>,
    matched_users: HashSet<String>,
}

impl Enrollment {
    /// Where uploads are spooled while they are imported.
    pub fn with_spool_dir(mut self, dir: PathBuf) -> Enrollment {
        self.spool_dir = Some(std::sync::Arc::new(dir));
        self
    }

    /// The spool file of an import.
    pub fn import_file(&self, id: &Id) -> DomainResult<PathBuf> {
        let dir = self
            .spool_dir
            .as_deref()
            .ok_or_else(|| DomainError::invalid("file", "imports are not available: no spool directory"))?;
        std::fs::create_dir_all(dir.as_path())
            .map_err(|error| DomainError::invalid("file", format!("cannot create {}: {error}", dir.display())))?;
        Ok(dir.join(format!("{id}.csv")))
    }

    /// Records a new import before its file arrives.
    pub fn create_import(&self, actor: &Actor, request: &ImportRequest) -> DomainResult<Import> {
        let import = Import {
            id: self.new_id(),
            kind: request.kind,
            mode: request.mode,
            state: ImportState::Queued,
            filename: request.filename.as_deref().map(|f| f.chars().take(200).collect()),
            bytes: 0,
            rows_done: 0,
            rows_total: 0,
            last_line: 0,
            report: ImportReport::default(),
            message: "Waiting for the file".into(),
            created_by: actor.name.clone(),
            created_at: self.now(),
            finished_at: None,
        };
        self.transact(|tx| {
            tx.put(None, &import)?;
            let detail = format!("{} ({}) {}", import.kind, import.mode, import.filename.as_deref().unwrap_or(""));
            self.audit(tx, actor, "import.upload", Some(import.id.to_string()), detail)
        })?;
        Ok(import)
    }

    pub fn import(&self, id: &Id) -> DomainResult<Import> {
        self.store.get::<Import>(id.as_bytes())?.ok_or_else(|| DomainError::not_found("import", id))
    }

    /// Imports, newest first.
    pub fn imports(&self, cursor: Option<&str>, limit: usize) -> DomainResult<Paged<Import>> {
        let after = decode_cursor(cursor)?;
        let scan = Scan { tree: tree::IMPORTS, prefix: &[], after: after.as_deref(), newest_first: true };
        let mut page = paged(self.store.page(scan, clamp_limit(limit), |_: &Import| true)?);
        // The list stays small: each import's problems are in its own record (`rows_rejected` counts them).
        for import in &mut page.items {
            import.report.problems.clear();
        }
        Ok(page)
    }

    fn save_import(&self, import: &Import) -> DomainResult<()> {
        self.transact(|tx| tx.put(None, import))
    }

    /// Ends an import that failed (its file never arrived, or the store refused a write). An all-or-nothing import
    /// that had begun writing is rolled back first.
    pub fn fail_import(&self, id: &Id, message: &str) -> DomainResult<Import> {
        let mut import = self.import(id)?;
        let mut message = message.to_owned();
        if import.mode == ImportMode::All && import.state == ImportState::Importing {
            self.remove_everything_imported(id, &|| false)?;
            message.push_str("; everything it had created was removed again");
        }
        import.state = ImportState::Failed;
        import.message = message;
        import.finished_at = Some(self.now());
        self.save_import(&import)?;
        if let Ok(path) = self.import_file(id) {
            let _ = std::fs::remove_file(path);
        }
        Ok(import)
    }

    /// Runs an import whose file is spooled. `stop` is polled between batches; when it says so, the import stops
    /// where it is and [`Enrollment::recover_imports`] finishes the job at the next start.
    pub fn run_import(&self, actor: &Actor, id: &Id, bytes: u64, stop: &dyn Fn() -> bool) -> DomainResult<Import> {
        let _one_at_a_time = self.import_lock.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let path = self.import_file(id)?;
        let mut import = self.import(id)?;
        import.bytes = bytes;
        import.state = ImportState::Validating;
        import.message = "Checking every row".into();
        self.save_import(&import)?;
        let kind = match import.kind {
            ImportKind::Invites => CsvKind::Invites,
            ImportKind::Staged => CsvKind::Staged,
        };

        // Pass 1: check every row; keep only the lines to skip and the problems.
        let mut reader = match CsvReader::open(self.spooled(&path)?, kind) {
            Ok(reader) => reader,
            Err(problems) => {
                import.report.rows_rejected = 0;
                import.report.problems = problems;
                return self.finish(actor, import, ImportState::Rejected, "The first row (the column names) has problems, so nothing was imported; fix it and upload the file again".into());
            }
        };
        let mut skip = HashSet::new();
        let mut checks = RowChecks::default();
        while let Some(result) = reader.next_row() {
            import.report.rows_read += 1;
            let (line, problems) = match result {
                Ok(row) => (row.line(), self.check_row_against_store(&row, &mut checks)?),
                Err(problems) => (problems.first().map_or(0, |p| p.line), problems),
            };
            if !problems.is_empty() {
                skip.insert(line);
                import.report.rows_rejected += 1;
                if problems.iter().any(|p| p.reason.contains("already has a pending")) {
                    import.report.already_pending += 1;
                }
                keep_problems(&mut import.report, problems);
            }
            if import.report.rows_read % 5_000 == 0 {
                import.rows_done = import.report.rows_read;
                self.save_import(&import)?;
                if stop() {
                    return Ok(import);
                }
            }
        }
        let valid = import.report.rows_read - import.report.rows_rejected;
        if import.report.rows_read == 0 {
            return self.finish(
                actor,
                import,
                ImportState::Rejected,
                "The file has no rows under its header; nothing to import".into(),
            );
        }
        if import.mode == ImportMode::All && import.report.rows_rejected > 0 {
            let message = format!(
                "Nothing was imported: {} of {} rows have problems (listed below). Fix them and upload the file again, or import only the valid rows.",
                import.report.rows_rejected, import.report.rows_read
            );
            return self.finish(actor, import, ImportState::Rejected, message);
        }
        if valid == 0 {
            let message = format!("None of the {} rows can be imported (see the problems)", import.report.rows_read);
            return self.finish(actor, import, ImportState::Rejected, message);
        }

        // Pass 2: apply the valid rows in batches.
        import.state = ImportState::Importing;
        import.rows_total = valid;
        import.rows_done = 0;
        import.message = format!("Importing {valid} rows");
        self.save_import(&import)?;
        let mut reader = CsvReader::open(self.spooled(&path)?, kind)
            .map_err(|_| DomainError::invalid("file", "the spooled file changed while it was imported"))?;
        let mut totals = Totals::default();
        let mut batch = Vec::with_capacity(BATCH_ROWS);
        // How many rows the last flush took to the disk.
        let mut flushed_at = 0;
        loop {
            let next = reader.next_row();
            let finished = next.is_none();
            if let Some(Ok(row)) = next
                && !skip.contains(&row.line())
            {
                batch.push(row);
            }
            if batch.len() == BATCH_ROWS || (finished && !batch.is_empty()) {
                self.apply_batch(actor, &mut import, &batch, &mut totals)?;
                batch.clear();
                // Written pages are flushed as the import goes, which bounds the memory a large file takes.
                if import.rows_done % FLUSH_EVERY_ROWS == 0 {
                    self.store.flush()?;
                    flushed_at = import.rows_done;
                }
                if stop() {
                    return Ok(import);
                }
            }
            if finished {
                break;
            }
        }
        // Every row is on disk before "done" can be read: an admin who saw "done" finds the rows after a power cut,
        // and a cut before "done" is on disk leaves a complete import that `recover_imports` finishes. (A file of a
        // multiple of FLUSH_EVERY_ROWS rows had its last rows flushed above.)
        if import.rows_done != flushed_at {
            self.store.flush()?;
        }
        let message = done_message(&import);
        self.finish(actor, import, ImportState::Done, message)
    }

    fn spooled(&self, path: &std::path::Path) -> DomainResult<File> {
        File::open(path).map_err(|e| DomainError::invalid("file", format!("the upload is gone: {e}")))
    }

    fn finish(&self, actor: &Actor, mut import: Import, state: ImportState, message: String) -> DomainResult<Import> {
        import.state = state;
        import.message = message;
        import.finished_at = Some(self.now());
        self.transact(|tx| {
            tx.put(None, &import)?;
            let detail = format!("{}: {}", import.state, import.message);
            self.audit(tx, actor, "import.finish", Some(import.id.to_string()), detail)
        })?;
        // The admin polls for this state and takes "done" as final, so it goes to disk at once (not at sled's next
        // periodic flush), before the uploaded file is deleted.
        self.store.flush()?;
        if let Ok(path) = self.import_file(&import.id) {
            let _ = std::fs::remove_file(path);
        }
        Ok(import)
    }

    /// Checks a well-formed row against the file so far and the store: a repeated user and platform, a pending
    /// invite that exists already (the same file imported twice), a device staged already.
    fn check_row_against_store(&self, row: &Row, checks: &mut RowChecks) -> DomainResult<Vec<RowProblem>> {
        let mut problems = Vec::new();
        match row {
            Row::Invite(invite) => {
                let key = (invite.email.clone(), invite.platform);
                if let Some(first) = checks.invites.get(&key) {
                    problems.push(RowProblem {
                        line: invite.line,
                        column: Some(Column::PlatformType.header().into()),
                        value: csvfile::platform_text(invite.platform).into(),
                        reason: format!(
                            "line {first} already invites {} for {}; one invite enrolls one device, so remove the repeat",
                            invite.email,
                            csvfile::platform_text(invite.platform)
                        ),
                    });
                } else {
                    checks.invites.insert(key, invite.line);
                }
                if !checks.pending.contains_key(&invite.email) {
                    let pending = self.pending_platforms(&invite.email)?;
                    checks.pending.insert(invite.email.clone(), pending);
                }
                if let Some((_, sent)) = checks.pending[&invite.email].iter().find(|(p, _)| *p == invite.platform) {
                    problems.push(RowProblem {
                        line: invite.line,
                        column: Some(Column::EmailAddress.header().into()),
                        value: invite.email.clone(),
                        reason: format!(
                            "{} already has a pending {} invite (sent {}); resend that one instead of importing it again",
                            invite.email,
                            csvfile::platform_text(invite.platform),
                            sent.date()
                        ),
                    });
                }
            }
            Row::Staged(staged) => {
                for (kind, value, column) in
                    [("serial", &staged.serial, Column::SerialNumber), ("imei", &staged.imei, Column::Imei)]
                {
                    let Some(value) = value else { continue };
                    let key = hardware_key(kind, value);
                    let problem = |reason: String| RowProblem {
                        line: staged.line,
                        column: Some(column.header().into()),
                        value: value.clone(),
                        reason,
                    };
                    if let Some(first) = checks.staged.get(&key) {
                        problems.push(problem(format!("line {first} already stages this device")));
                    } else {
                        checks.staged.insert(key.clone(), staged.line);
                    }
                    if self.store.lookup(tree::STAGED_BY_HARDWARE, &key)?.is_some() {
                        problems.push(problem("this device is staged already; remove it from the file".into()));
                    }
                }
            }
        }
        Ok(problems)
    }

    /// The platforms a user (by email) has a pending, unexpired invite for, with when it was sent.
    fn pending_platforms(&self, email: &str) -> DomainResult<Vec<(Platform, time::OffsetDateTime)>> {
        let Some(user) = self.store.lookup(tree::USERS_BY_EMAIL, email.as_bytes())? else { return Ok(Vec::new()) };
        let now = self.now();
        let mut found = Vec::new();
        for key in self.store.keys_under(tree::INVITES_BY_USER, &user)? {
            if let Some(invite) = self.store.get::<Invite>(&key)?
                && invite.status == InviteStatus::Pending
                && invite.expires_at > now
            {
                found.push((invite.platform, invite.requested_at));
            }
        }
        Ok(found)
    }

    /// Applies one batch in one transaction, with the import's progress.
    fn apply_batch(&self, actor: &Actor, import: &mut Import, batch: &[Row], totals: &mut Totals) -> DomainResult<()> {
        let secrets: Vec<Secrets> = batch.iter().map(|_| new_secrets()).collect();
        let last_line = batch.last().map_or(import.last_line, Row::line);
        let (outcome, progress) = self.transact(|tx| {
            let mut outcome = BatchOutcome::default();
            for (row, secrets) in batch.iter().zip(&secrets) {
                match row {
                    Row::Invite(row) => self.import_invite_row(tx, actor, import, row, secrets, &mut outcome)?,
                    Row::Staged(row) => self.import_staged_row(tx, import, row, &mut outcome)?,
                }
            }
            // The job's progress and report, counting this batch, are written with it: an import cut short
            // after this batch reports exactly what it made.
            let mut progress = import.clone();
            progress.rows_done += batch.len() as u64;
            progress.last_line = last_line;
            tally(&mut progress.report, totals, &outcome);
            tx.put(None, &progress)?;
            Ok((outcome, progress))
        })?;
        *import = progress;
        totals.created_users.extend(outcome.new_users);
        for email in outcome.matched_users {
            if !totals.created_users.contains(&email) {
                totals.matched_users.insert(email);
            }
        }
        Ok(())
    }

    fn import_invite_row(
        &self,
        tx: &Tx<'_>,
        actor: &Actor,
        import: &Import,
        row: &csvfile::InviteRow,
        secrets: &Secrets,
        outcome: &mut BatchOutcome,
    ) -> TxResult<()> {
        let group_id = match &row.group {
            Some(name) => Some(self.group_for_import(tx, import, name, outcome)?),
            None => None,
        };
        let user = match tx.lookup(tree::USERS_BY_EMAIL, row.email.as_bytes())? {
            Some(key) => {
                outcome.matched_users.push(row.email.clone());
                tx.get::<User, _>(&key)?.ok_or_else(|| DomainError::not_found("user", &row.email))?
            }
            None => {
                let now = self.now();
                let user = User {
                    id: self.new_id(),
                    name: row.user_name.clone(),
                    email: row.email.clone(),
                    phone: row.phone.clone(),
                    domain: row.domain.clone(),
                    notes: String::new(),
                    // Made a member of the row's group now, so the invite need not write the user again.
                    groups: group_id.into_iter().collect(),
                    created_at: now,
                    updated_at: now,
                    import: Some(import.id),
                };
                tx.put(None, &user)?;
                outcome.new_users.push(row.email.clone());
                user
            }
        };
        // An SMS goes too when the user has a phone number (the mail worker skips it if no SMS gateway is set).
        let channels = if user.phone.is_some() { Channels::Both } else { Channels::Email };
        let new = NewInvite { user_id: user.id, platform: row.platform, ownership: row.ownership, group_id, channels };
        let origin = InviteOrigin { by_myself: false, verb: "Imported from a CSV file", import: Some(import.id) };
        self.insert_invite(tx, actor, &new, &origin, secrets)?;
        outcome.invites += 1;
        Ok(())
    }

    fn import_staged_row(
        &self,
        tx: &Tx<'_>,
        import: &Import,
        row: &csvfile::StagedRow,
        outcome: &mut BatchOutcome,
    ) -> TxResult<()> {
        for (kind, value) in [("serial", &row.serial), ("imei", &row.imei)] {
            if let Some(value) = value
                && tx.lookup(tree::STAGED_BY_HARDWARE, &hardware_key(kind, value))?.is_some()
            {
                if import.mode == ImportMode::All {
                    let message = format!("line {}: {value} was staged while the file was being imported", row.line);
                    return Err(DomainError::conflict("staged_exists", message).into());
                }
                outcome.refused.push(RowProblem {
                    line: row.line,
                    column: None,
                    value: value.clone(),
                    reason: "this device was staged while the file was being imported; skipped".into(),
                });
                return Ok(());
            }
        }
        let group_id = match &row.group {
            Some(name) => Some(self.group_for_import(tx, import, name, outcome)?),
            None => None,
        };
        let user_id = match &row.email {
            Some(email) => tx.lookup(tree::USERS_BY_EMAIL, email.as_bytes())?.and_then(|key| Id::from_slice(&key)),
            None => None,
        };
        let staged = StagedDevice {
            id: self.new_id(),
            serial: row.serial.clone(),
            imei: row.imei.clone(),
            name: row.device_name.clone(),
            platform: row.platform,
            user_id,
            email: row.email.clone(),
            group_id,
            created_at: self.now(),
            import: Some(import.id),
        };
        tx.put(None, &staged)?;
        outcome.staged += 1;
        Ok(())
    }

    /// The group a row names, created (and reported) if there is none.
    fn group_for_import(&self, tx: &Tx<'_>, import: &Import, name: &str, outcome: &mut BatchOutcome) -> TxResult<Id> {
        if let Some(key) = tx.lookup(tree::GROUPS_BY_NAME, name.to_lowercase().as_bytes())? {
            return Id::from_slice(&key).ok_or_else(|| DomainError::not_found("group", name).into());
        }
        let group = Group {
            id: self.new_id(),
            name: name.to_owned(),
            description: format!("Created by the CSV import of {}", import.filename.as_deref().unwrap_or("a file")),
            created_at: self.now(),
            import: Some(import.id),
        };
        tx.put(None, &group)?;
        outcome.new_groups.push(group.name.clone());
        Ok(group.id)
    }

    /// At start-up, before enrolld is ready: settles the imports a crash or shutdown cut short. A valid-only one
    /// keeps what it did and says up to which line; an all-or-nothing one is marked `rolling_back`, and
    /// [`Enrollment::finish_rollbacks`] removes what it made once enrolld answers (seconds for a large import,
    /// which `/healthz` should not wait for). Its invites send nothing meanwhile: the outbox holds an import's
    /// messages back until it is done.
    pub fn recover_imports(&self) -> DomainResult<Vec<Import>> {
        let unfinished = self.store.all::<Import>(|i| i.state.under_way())?;
        let mut recovered = Vec::new();
        for import in unfinished {
            let (state, message) = match (import.state, import.mode) {
                // Every row was written with its progress; only the final "done" was lost.
                (ImportState::Importing, _) if import.rows_done == import.rows_total => {
                    (ImportState::Done, done_message(&import))
                }
                (ImportState::RollingBack, _) => {
                    recovered.push(import);
                    continue;
                }
                (ImportState::Importing, ImportMode::All) => {
                    let mut rolling_back = import;
                    rolling_back.state = ImportState::RollingBack;
                    rolling_back.message =
                        "enrolld stopped during this import, so everything it had created is being removed again"
                            .to_owned();
                    self.save_import(&rolling_back)?;
                    recovered.push(rolling_back);
                    continue;
                }
                (ImportState::Importing, ImportMode::ValidOnly) => (
                    ImportState::Interrupted,
                    format!(
                        "enrolld stopped during this import after {} of {} rows: the rows up to line {} were imported with their messages queued, the rest were not; upload the rows after line {} again",
                        import.rows_done, import.rows_total, import.last_line, import.last_line
                    ),
                ),
                _ => (
                    ImportState::Failed,
                    "enrolld stopped before this file was imported; nothing was imported, upload it again".to_owned(),
                ),
            };
            recovered.push(self.finish(&Actor::system(), import, state, message)?);
        }
        Ok(recovered)
    }

    /// Removes what the imports marked `rolling_back` made and marks them rolled back, calling `finished` with
    /// each; run once enrolld is ready. A new import waits for it (it would find the invites being removed).
    /// `stop` is asked between batches (shutdown): an import left rolling back goes on at the next start.
    pub fn finish_rollbacks(&self, stop: &dyn Fn() -> bool, finished: &mut dyn FnMut(&Import)) -> DomainResult<()> {
        let _one_at_a_time = self.import_lock.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        for import in self.store.all::<Import>(|i| i.state == ImportState::RollingBack)? {
            if !self.remove_everything_imported(&import.id, stop)? {
                return Ok(());
            }
            let message = "enrolld stopped during this import, so everything it had created was removed again; upload the file again".to_owned();
            finished(&self.finish(&Actor::system(), import, ImportState::RolledBack, message)?);
        }
        Ok(())
    }

    /// Deletes everything an import created. Rare (a crash or failure mid-import), so a scan for the import's mark
    /// beats logging every record it writes.
    /// `false` when `stop` said to stop before the end.
    fn remove_everything_imported(&self, import: &Id, stop: &dyn Fn() -> bool) -> DomainResult<bool> {
        Ok(self.remove_imported::<DeliveryJob>(import, |j| j.import, stop)?
            && self.remove_imported::<Invite>(import, |i| i.import, stop)?
            && self.remove_imported::<StagedDevice>(import, |s| s.import, stop)?
            && self.remove_imported::<User>(import, |u| u.import, stop)?
            && self.remove_imported::<Group>(import, |g| g.import, stop)?)
    }

    /// Deletes every record of one kind that `import` created, in batches; `false` when `stop` said to stop
    /// between two. Each record is read again inside its batch's transaction and deleted as it is then: after
    /// READY the outbox and the admins write while a rollback runs, and deleting an older copy would leave its
    /// newer index entries and counters behind.
    fn remove_imported<R: crate::store::Record>(
        &self,
        import: &Id,
        made_by: impl Fn(&R) -> Option<Id>,
        stop: &dyn Fn() -> bool,
    ) -> DomainResult<bool> {
        let doomed = self.store.all::<R>(|record| made_by(record) == Some(*import))?;
        for chunk in doomed.chunks(BATCH_ROWS) {
            if stop() {
                return Ok(false);
            }
            self.transact(|tx| {
                for seen in chunk {
                    if let Some(current) = tx.get::<R, _>(&seen.key())?
                        && made_by(&current) == Some(*import)
                    {
                        tx.delete(&current)?;
                    }
                }
                Ok(())
            })?;
        }
        Ok(true)
    }

    /// A list as CSV in the import formats' column vocabulary. Invites take the listing's filters.
    pub fn export_csv(&self, list: &ExportList) -> DomainResult<Vec<u8>> {
        let io = |e: csv::Error| DomainError::invalid("export", e.to_string());
        let mut out = Vec::new();
        match list {
            ExportList::Invites(query) => {
                let mut writer = csvfile::writer(&mut out, &header(CsvKind::Invites.columns())).map_err(io)?;
                let mut users: HashMap<Id, Option<User>> = HashMap::new();
                let mut query = super::InviteQuery { limit: Some(500), cursor: None, ..query.clone() };
                self.sweep_expired()?;
                loop {
                    let page = self.invites_as_stored(&query)?;
                    for view in &page.items {
                        let user = match users.get(&view.user_id) {
                            Some(user) => user.clone(),
                            None => {
                                let user = self.store.get::<User>(view.user_id.as_bytes())?;
                                users.insert(view.user_id, user.clone());
                                user
                            }
                        };
                        let remark = view.remarks.last().map(|r| r.text.as_str()).unwrap_or("");
                        writer
                            .write_record(safe_cells([
                                view.user_name.as_str(),
                                view.email.as_str(),
                                csvfile::platform_text(view.platform),
                                csvfile::ownership_text(view.ownership),
                                user.as_ref().and_then(|u| u.domain.as_deref()).unwrap_or(""),
                                view.group_name.as_deref().unwrap_or(""),
                                user.as_ref().and_then(|u| u.phone.as_deref()).unwrap_or(""),
                                view.status.as_str(),
                                &rfc3339(view.requested_at),
                                &rfc3339(view.expires_at),
                                remark,
                            ]))
                            .map_err(io)?;
                    }
                    match page.next_cursor {
                        Some(cursor) => query.cursor = Some(cursor),
                        None => break,
                    }
                }
                writer.flush().map_err(|e| DomainError::invalid("export", e.to_string()))?;
            }
            ExportList::Staged(query) => {
                let mut writer = csvfile::writer(&mut out, &header(CsvKind::Staged.columns())).map_err(io)?;
                for staged in self.store.all::<StagedDevice>(|staged| query.matches(staged))? {
                    let user = self.user_of(staged.user_id)?;
                    let group = self.group_name(staged.group_id)?;
                    writer
                        .write_record(safe_cells([
                            staged.serial.as_deref().unwrap_or(""),
                            staged.imei.as_deref().unwrap_or(""),
                            csvfile::platform_text(staged.platform),
                            staged.name.as_deref().unwrap_or(""),
                            user.as_ref().map_or("", |u| u.name.as_str()),
                            staged.email.as_deref().or(user.as_ref().map(|u| u.email.as_str())).unwrap_or(""),
                            group.as_deref().unwrap_or(""),
                        ]))
                        .map_err(io)?;
                }
                writer.flush().map_err(|e| DomainError::invalid("export", e.to_string()))?;
            }
            ExportList::Managed(query) => {
                let columns = [
                    "DEVICE NAME",
                    "SERIAL NUMBER",
                    "IMEI",
                    "PLATFORM TYPE",
                    "USER NAME",
                    "EMAIL ADDRESS",
                    "GROUP NAME",
                    "OWNED BY",
                    "STATUS",
                    "MODEL",
                    "OS VERSION",
                    "ENROLLED TIME",
                    "LAST CONTACT TIME",
                ];
                let mut writer = csvfile::writer(&mut out, &columns).map_err(io)?;
                let mut query = super::DeviceQuery { limit: Some(500), cursor: None, ..query.clone() };
                let mut devices = Vec::new();
                loop {
                    let page = self.devices(&query)?;
                    devices.extend(page.items);
                    match page.next_cursor {
                        Some(cursor) => query.cursor = Some(cursor),
                        None => break,
                    }
                }
                for device in devices {
                    let user = self.user_of(device.user_id)?;
                    let group = self.group_name(device.group_id)?;
                    writer
                        .write_record(safe_cells([
                            device.name.as_deref().unwrap_or(""),
                            device.serial.as_deref().unwrap_or(""),
                            device.imei.as_deref().unwrap_or(""),
                            csvfile::platform_text(device.platform),
                            user.as_ref().map_or("", |u| u.name.as_str()),
                            user.as_ref().map_or("", |u| u.email.as_str()),
                            group.as_deref().unwrap_or(""),
                            csvfile::ownership_text(device.ownership),
                            device.status.as_str(),
                            device.model.as_deref().unwrap_or(""),
                            device.os_version.as_deref().unwrap_or(""),
                            &rfc3339(device.enrolled_at),
                            &rfc3339(device.last_contact),
                        ]))
                        .map_err(io)?;
                }
                writer.flush().map_err(|e| DomainError::invalid("export", e.to_string()))?;
            }
        }
        Ok(out)
    }

    fn user_of(&self, id: Option<Id>) -> DomainResult<Option<User>> {
        Ok(match id {
            Some(id) => self.store.get::<User>(id.as_bytes())?,
            None => None,
        })
    }

    fn group_name(&self, id: Option<Id>) -> DomainResult<Option<String>> {
        Ok(match id {
            Some(id) => self.store.get::<Group>(id.as_bytes())?.map(|g| g.name),
            None => None,
        })
    }
}

/// What pass 1 remembers about the rows so far.
#[derive(Default)]
struct RowChecks {
    invites: HashMap<(String, Platform), u64>,
    staged: HashMap<Vec<u8>, u64>,
    pending: HashMap<String, Vec<(Platform, time::OffsetDateTime)>>,
}

/// Adds problems to a report, at most [`PROBLEMS_KEPT`] of them, each value and reason cut to a readable length.
/// Adds a batch's outcome to the report (the running `totals` are those before the batch).
fn tally(report: &mut ImportReport, totals: &Totals, outcome: &BatchOutcome) {
    let new_matched: HashSet<&String> = outcome
        .matched_users
        .iter()
        .filter(|email| {
            !totals.created_users.contains(*email)
                && !totals.matched_users.contains(*email)
                && !outcome.new_users.contains(email)
        })
        .collect();
    report.users_created = (totals.created_users.len() + outcome.new_users.len()) as u64;
    report.users_matched = (totals.matched_users.len() + new_matched.len()) as u64;
    report.invites_created += outcome.invites;
    report.staged_created += outcome.staged;
    report.groups_created.extend(outcome.new_groups.iter().cloned());
    report.rows_rejected += outcome.refused.len() as u64;
    keep_problems(report, outcome.refused.clone());
}

fn keep_problems(report: &mut ImportReport, problems: Vec<RowProblem>) {
    let cut = |text: String, max: usize| {
        if text.chars().count() > max { text.chars().take(max).collect::<String>() + "…" } else { text }
    };
    let room = PROBLEMS_KEPT.saturating_sub(report.problems.len());
    report.problems.extend(problems.into_iter().take(room).map(|p| RowProblem {
        value: cut(p.value, 200),
        reason: cut(p.reason, 400),
        ..p
    }));
}

/// Export cells, each made safe to open in a spreadsheet.
fn safe_cells<'a>(cells: impl IntoIterator<Item = &'a str>) -> Vec<String> {
    cells.into_iter().map(|cell| csvfile::spreadsheet_safe(cell).into_owned()).collect()
}

fn header(columns: &[Column]) -> Vec<&'static str> {
    columns.iter().map(|c| c.header()).collect()
}

fn rfc3339(at: time::OffsetDateTime) -> String {
    at.format(&time::format_description::well_known::Rfc3339).unwrap_or_default()
}

/// What a finished import says it made.
fn done_message(import: &Import) -> String {
    let report = &import.report;
    match import.kind {
        ImportKind::Invites => format!(
            "Imported {} invites for {} users ({} new){}{}",
            report.invites_created,
            report.users_created + report.users_matched,
            report.users_created,
            plural_groups(&report.groups_created),
            skipped_rows(report.rows_rejected),
        ),
        ImportKind::Staged => format!(
            "Registered {} staged devices{}{}",
            report.staged_created,
            plural_groups(&report.groups_created),
            skipped_rows(report.rows_rejected)
        ),
    }
}

fn plural_groups(groups: &[String]) -> String {
    match groups.len() {
        0 => String::new(),
        1 => format!("; created the group {}", groups[0]),
        n => format!("; created {n} groups"),
    }
}

fn skipped_rows(rejected: u64) -> String {
    match rejected {
        0 => String::new(),
        n => format!("; {n} rows skipped (see the problems)"),
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{admin, domain};
    use super::super::{InviteQuery, NewGroup, NewUser};
    use super::*;
    use crate::model::{DeliveryJob, JobChannel};

    struct Fixture {
        _dir: tempfile::TempDir,
        d: Enrollment,
    }

    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let (d, _) = domain();
        let d = d.with_spool_dir(dir.path().join("imports"));
        Fixture { _dir: dir, d }
    }

    impl Fixture {
        fn run(&self, kind: ImportKind, mode: ImportMode, file: &[u8], stop: &dyn Fn() -> bool) -> Import {
            let request = ImportRequest { kind, mode, filename: Some("people.csv".into()) };
            let import = self.d.create_import(&admin(), &request).unwrap();
            std::fs::write(self.d.import_file(&import.id).unwrap(), file).unwrap();
            self.d.run_import(&admin(), &import.id, file.len() as u64, stop).unwrap()
        }

        fn invites(&self, mode: ImportMode, file: &str) -> Import {
            self.run(ImportKind::Invites, mode, file.as_bytes(), &|| false)
        }

        fn jobs(&self) -> Vec<DeliveryJob> {
            let scan = Scan { tree: tree::OUTBOX, prefix: &[], after: None, newest_first: false };
            self.d.store().page(scan, usize::MAX, |_: &DeliveryJob| true).unwrap().items
        }

        fn counts(&self) -> (u64, u64, u64) {
            let c = self.d.dashboard().unwrap();
            (c.pending, c.users, c.queued_messages)
        }
    }

    const HEADER: &str = "USER NAME,EMAIL ADDRESS,OWNED BY,GROUP NAME,PLATFORM TYPE,PHONE NUMBER\n";

    #[test]
    fn by_default_one_bad_row_imports_nothing_and_every_problem_is_listed() {
        let f = fixture();
        let file = format!(
            "{HEADER}ANDREW,andrew@example.com,Personal,IOS_Group,iOS,+1-202-555-0100\n\
             Bea,bea@,Corporate,,Android,\nCal,cal@example.com,,,Windows,\nDee,dee@example.com,,,Palm,\n"
        );
        let import = f.invites(ImportMode::All, &file);
        assert_eq!(import.state, ImportState::Rejected);
        assert!(import.message.starts_with("Nothing was imported: 2 of 4 rows have problems"), "{}", import.message);
        let lines: Vec<(u64, Option<&str>)> =
            import.report.problems.iter().map(|p| (p.line, p.column.as_deref())).collect();
        assert_eq!(lines, [(3, Some("EMAIL ADDRESS")), (5, Some("PLATFORM TYPE"))]);
        assert_eq!(f.counts(), (0, 0, 0), "no user, invite or message was created");
        assert!(f.d.groups(None, 10).unwrap().items.is_empty(), "nor the group");
        assert!(!f.d.import_file(&import.id).unwrap().exists(), "the spooled upload is deleted");
    }

    #[test]
    fn valid_only_imports_the_good_rows_with_multi_device_users_and_new_groups() {
        let f = fixture();
        let sales = f.d.create_group(&admin(), &NewGroup { name: "Sales".into(), description: String::new() }).unwrap();
        f.d.create_user(
            &admin(),
            &NewUser { name: "Ann".into(), email: "ann@example.com".into(), ..Default::default() },
        )
        .unwrap();
        let file = format!(
            "{HEADER}ANDREW,andrew@example.com,Personal,IOS_Group,iOS,+1-202-555-0100\n\
             ANDREW,Andrew@Example.com,,,macOS,\n\
             Ann,ann@example.com,Corporate,sales,Android,\n\
             Bad,not-an-email,,,iOS,\n"
        );
        let import = f.invites(ImportMode::ValidOnly, &file);
        assert_eq!(import.state, ImportState::Done, "{}", import.message);
        let r = &import.report;
        assert_eq!((r.rows_read, r.rows_rejected, r.invites_created), (4, 1, 3));
        assert_eq!((r.users_created, r.users_matched), (1, 1));
        assert_eq!(r.groups_created, ["IOS_Group"]);
        assert_eq!((import.rows_done, import.rows_total, import.last_line), (3, 3, 4));
        assert!(import.message.contains("Imported 3 invites for 2 users (1 new)"), "{}", import.message);

        let andrew = f.d.user_by_email("andrew@example.com").unwrap().unwrap();
        assert_eq!(andrew.phone.as_deref(), Some("+12025550100"));
        let mine = f.d.invites(&InviteQuery { user_id: Some(andrew.id), ..Default::default() }).unwrap().items;
        assert_eq!(mine.len(), 2, "one user, two devices, two invites");
        assert!(mine.iter().all(|i| i.remarks[0].text.starts_with("Imported from a CSV file by admin")));
        let anns = f.d.invites(&InviteQuery { group_id: Some(sales.id), ..Default::default() }).unwrap().items;
        assert_eq!(anns.len(), 1, "group names match whatever their case");
        // Every invite has its delivery job: email for all, SMS too where there is a phone.
        let jobs = f.jobs();
        assert_eq!(jobs.iter().filter(|j| j.channel == JobChannel::Email).count(), 3);
        assert_eq!(jobs.iter().filter(|j| j.channel == JobChannel::Sms).count(), 2);
        assert!(jobs.iter().all(|j| j.import == Some(import.id)));
    }

    #[test]
    fn the_same_file_twice_is_reported_not_invited_twice() {
        let f = fixture();
        let file = format!("{HEADER}Ann,ann@example.com,,,iOS,\nBob,bob@example.com,,,Android,\n");
        assert_eq!(f.invites(ImportMode::All, &file).state, ImportState::Done);
        let again = f.invites(ImportMode::All, &file);
        assert_eq!(again.state, ImportState::Rejected);
        assert_eq!(again.report.already_pending, 2);
        assert!(
            again.report.problems[0].reason.contains("already has a pending iOS invite"),
            "{:?}",
            again.report.problems
        );
        let valid_only = f.invites(ImportMode::ValidOnly, &file);
        assert_eq!((valid_only.state, valid_only.report.already_pending), (ImportState::Rejected, 2));
        assert_eq!(f.counts().0, 2, "still two pending invites");
    }

    #[test]
    fn a_repeated_user_and_platform_in_one_file_is_a_problem() {
        let f = fixture();
        let file = format!("{HEADER}Ann,ann@example.com,,,iOS,\nAnn,ANN@example.com,,,ios,\n");
        let import = f.invites(ImportMode::All, &file);
        assert_eq!(import.report.problems.len(), 1);
        assert_eq!(import.report.problems[0].line, 3);
        assert!(import.report.problems[0].reason.starts_with("line 2 already invites ann@example.com for iOS"));
    }

    #[test]
    fn non_utf8_bytes_are_named_by_line_and_import_nothing() {
        let f = fixture();
        let mut file = format!("{HEADER}Ann,ann@example.com,,,iOS,\n").into_bytes();
        file.extend_from_slice(b"Jos\xe9,jose@example.com,,,iOS,\n");
        let import = f.run(ImportKind::Invites, ImportMode::All, &file, &|| false);
        assert_eq!(import.state, ImportState::Rejected);
        assert_eq!(import.report.problems[0].line, 3);
        assert!(import.report.problems[0].reason.contains("not UTF-8"));
    }

    #[test]
    fn staged_devices_import_and_repeat_devices_are_refused() {
        let f = fixture();
        f.d.create_user(
            &admin(),
            &NewUser { name: "Ann".into(), email: "ann@example.com".into(), ..Default::default() },
        )
        .unwrap();
        let file = b"SERIAL NUMBER,IMEI,PLATFORM TYPE,DEVICE NAME,EMAIL ADDRESS,GROUP NAME\n\
                     C02XK1,,macOS,Design Mac,ann@example.com,Design\n,490154203237518,Android,Scanner,,Warehouse\n";
        let import = f.run(ImportKind::Staged, ImportMode::All, file, &|| false);
        assert_eq!((import.state, import.report.staged_created), (ImportState::Done, 2), "{}", import.message);
        let staged = f.d.staged(None, 10).unwrap().items;
        assert!(staged[0].user_id.is_some(), "matched to the existing user by email");
        let again = f.run(ImportKind::Staged, ImportMode::All, file, &|| false);
        assert_eq!(again.state, ImportState::Rejected);
        assert!(again.report.problems.iter().all(|p| p.reason.contains("staged already")));
    }

    fn big_file(rows: usize) -> String {
        let mut file = HEADER.to_owned();
        for n in 0..rows {
            file.push_str(&format!("User {n},user{n}@example.com,,Group {},iOS,+1 202 555 {:04}\n", n % 3, n % 10_000));
        }
        file
    }

    #[test]
    fn an_all_or_nothing_import_cut_short_is_rolled_back_at_the_next_start() {
        let f = fixture();
        let import = f.run(ImportKind::Invites, ImportMode::All, big_file(1_200).as_bytes(), &|| true);
        assert_eq!((import.state, import.rows_done), (ImportState::Importing, 500), "stopped after the first batch");
        assert_eq!(f.counts(), (500, 500, 1_000), "half-done: 500 invites, each with its email and SMS");

        // Before enrolld is ready: marked, nothing removed yet (and nothing of it sent meanwhile).
        let recovered = f.d.recover_imports().unwrap();
        assert_eq!(recovered[0].state, ImportState::RollingBack);
        assert_eq!(f.counts(), (500, 500, 1_000), "removed after ready, not before");
        assert!(f.d.due_jobs(f.d.now(), 10).unwrap().0.iter().all(|id| f.d.claim_job(id, |_| true).unwrap().is_none()));
        // Cut short again before it was removed: still rolling back at the next start.
        assert_eq!(f.d.recover_imports().unwrap()[0].state, ImportState::RollingBack);

        // Stopped (a shutdown) before its first batch: still rolling back.
        f.d.finish_rollbacks(&|| true, &mut |_| panic!("nothing finishes")).unwrap();
        assert_eq!(f.d.import(&import.id).unwrap().state, ImportState::RollingBack);
        let mut finished = Vec::new();
        f.d.finish_rollbacks(&|| false, &mut |import| finished.push(import.clone())).unwrap();
        assert_eq!(finished[0].state, ImportState::RolledBack);
        assert_eq!(f.counts(), (0, 0, 0), "every user, invite and message it made is gone");
        assert!(f.d.groups(None, 10).unwrap().items.is_empty(), "and the groups it made");
        assert_eq!(f.d.import(&import.id).unwrap().state, ImportState::RolledBack);
        assert!(f.d.recover_imports().unwrap().is_empty());
        f.d.finish_rollbacks(&|| false, &mut |_| panic!("nothing left to roll back")).unwrap();
    }

    #[test]
    fn an_import_cut_after_its_last_batch_is_finished_as_done_not_rolled_back() {
        let f = fixture();
        let polls = std::cell::Cell::new(0);
        let after_last_batch = || {
            polls.set(polls.get() + 1);
            polls.get() == 2
        };
        let import = f.run(ImportKind::Invites, ImportMode::All, big_file(1_000).as_bytes(), &after_last_batch);
        assert_eq!((import.state, import.rows_done), (ImportState::Importing, 1_000), "every row written, no done");

        let recovered = f.d.recover_imports().unwrap();
        assert_eq!(recovered[0].state, ImportState::Done, "{}", recovered[0].message);
        assert_eq!(recovered[0].message, "Imported 1000 invites for 1000 users (1000 new); created 3 groups");
        assert_eq!(f.counts(), (1_000, 1_000, 2_000), "nothing it made is removed");
    }

    #[test]
    fn a_valid_only_import_cut_short_keeps_what_it_did_and_says_how_far() {
        let f = fixture();
        let import = f.run(ImportKind::Invites, ImportMode::ValidOnly, big_file(1_200).as_bytes(), &|| true);
        assert_eq!(import.state, ImportState::Importing);
        let recovered = f.d.recover_imports().unwrap();
        assert_eq!(recovered[0].state, ImportState::Interrupted);
        assert!(
            recovered[0].message.contains("after 500 of 1200 rows: the rows up to line 501"),
            "{}",
            recovered[0].message
        );
        let (pending, _, queued) = f.counts();
        assert_eq!((pending, queued), (500, 1_000), "no invite without its messages");
        let report = &recovered[0].report;
        assert_eq!((report.invites_created, report.users_created), (500, 500), "the report counts what it made");
    }

    #[test]
    fn a_failed_all_or_nothing_import_is_rolled_back_and_long_problems_are_cut() {
        let f = fixture();
        let import = f.run(ImportKind::Invites, ImportMode::All, big_file(1_200).as_bytes(), &|| true);
        assert_eq!(f.counts().0, 500);
        let failed = f.d.fail_import(&import.id, "the store refused a write").unwrap();
        assert_eq!(failed.state, ImportState::Failed);
        assert!(failed.message.ends_with("everything it had created was removed again"), "{}", failed.message);
        assert_eq!(f.counts(), (0, 0, 0));

        let long = "x".repeat(5_000);
        let file = format!("{HEADER}Ann,{long},,,iOS,\n");
        let rejected = f.invites(ImportMode::All, &file);
        let problem = &rejected.report.problems[0];
        assert!(problem.value.chars().count() <= 201 && problem.reason.chars().count() <= 401);
        let listed = f.d.imports(None, 10).unwrap();
        assert!(listed.items.iter().all(|i| i.report.problems.is_empty()), "the list leaves problems out");
        assert_eq!(f.d.import(&rejected.id).unwrap().report.problems.len(), 1, "the import itself keeps them");
    }

    #[test]
    fn exported_invites_read_back_as_the_same_rows() {
        let f = fixture();
        let file = format!(
            "{HEADER}\"Lee, Ann \"\"Annie\"\"\",ann@example.com,Personal,Sales,iOS,+44 20 7946 0958\nBob,bob@example.com,,,Neutral,\n=SUM(A1),sum@example.com,,@ops,Android,\n"
        );
        assert_eq!(f.invites(ImportMode::All, &file).state, ImportState::Done);
        let query = InviteQuery { status: Some(InviteStatus::Pending), ..Default::default() };
        let exported = f.d.export_csv(&ExportList::Invites(query)).unwrap();
        let (original, _) = csvfile::parse_all(file.as_bytes(), CsvKind::Invites);
        let (read_back, problems) = csvfile::parse_all(&exported, CsvKind::Invites);
        assert!(problems.is_empty(), "{problems:?}\n{}", String::from_utf8_lossy(&exported));
        let key = |rows: Vec<Row>| {
            let mut keys: Vec<_> = rows
                .into_iter()
                .map(|row| match row {
                    Row::Invite(r) => (r.user_name, r.email, r.platform, r.ownership, r.group, r.phone),
                    Row::Staged(_) => unreachable!(),
                })
                .collect();
            keys.sort();
            keys
        };
        assert_eq!(key(read_back), key(original));
        let text = String::from_utf8(exported.clone()).unwrap();
        assert!(text.contains("'=SUM(A1)") && text.contains("'@ops"), "formulas are defused for spreadsheets:\n{text}");
        assert!(text.contains(",+442079460958,"), "phone numbers are left alone");
        let again = f.run(ImportKind::Invites, ImportMode::All, &exported, &|| false);
        assert_eq!(again.report.already_pending, 3, "the export uploaded again doubles nothing");

        let staged = f.d.export_csv(&ExportList::Staged(super::super::StagedQuery::default())).unwrap();
        assert!(
            String::from_utf8(staged).unwrap().starts_with("\u{feff}SERIAL NUMBER,IMEI,PLATFORM TYPE"),
            "BOM first"
        );
    }
}
