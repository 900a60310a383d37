//! The CSV files admins upload and download, in the reference product's column vocabulary (ManageEngine MDM Plus),
//! so its files work here unchanged: invites (`USER NAME`, `EMAIL ADDRESS`, `PLATFORM TYPE`, …) and staged devices
//! (`SERIAL NUMBER`, `IMEI`, …).
//!
//! Reading: RFC 4180 quoting (the `csv` crate), UTF-8 with or without BOM, CRLF or LF. Headers match in any case
//! and spacing; a header that matches no column is reported with the list of known ones. Every cell of a row is
//! checked and all of a row's problems are reported together, each with its line, column, value and a reason a
//! person understands. Bytes that are not UTF-8 are reported with their line, never turned into mojibake.

use std::io::Read;

use crate::domain::{normalize_email, normalize_phone, validate_imei};
use crate::model::{Ownership, Platform, RowProblem};

/// Which file it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CsvKind {
    Invites,
    Staged,
}

/// Every column either format knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Column {
    UserName,
    EmailAddress,
    PlatformType,
    OwnedBy,
    DomainName,
    GroupName,
    PhoneNumber,
    SerialNumber,
    Imei,
    DeviceName,
    /// Columns the export adds; accepted and ignored on import, so an exported file can be uploaded again.
    Status,
    RequestedTime,
    ExpiryTime,
    Remarks,
}

impl Column {
    pub const fn header(self) -> &'static str {
        match self {
            Column::UserName => "USER NAME",
            Column::EmailAddress => "EMAIL ADDRESS",
            Column::PlatformType => "PLATFORM TYPE",
            Column::OwnedBy => "OWNED BY",
            Column::DomainName => "DOMAIN NAME",
            Column::GroupName => "GROUP NAME",
            Column::PhoneNumber => "PHONE NUMBER",
            Column::SerialNumber => "SERIAL NUMBER",
            Column::Imei => "IMEI",
            Column::DeviceName => "DEVICE NAME",
            Column::Status => "STATUS",
            Column::RequestedTime => "REQUESTED TIME",
            Column::ExpiryTime => "EXPIRY TIME",
            Column::Remarks => "REMARKS",
        }
    }

    const ALL: [Column; 14] = [
        Column::UserName,
        Column::EmailAddress,
        Column::PlatformType,
        Column::OwnedBy,
        Column::DomainName,
        Column::GroupName,
        Column::PhoneNumber,
        Column::SerialNumber,
        Column::Imei,
        Column::DeviceName,
        Column::Status,
        Column::RequestedTime,
        Column::ExpiryTime,
        Column::Remarks,
    ];

    /// The column a header names: any case, spaces around and between words folded.
    pub fn from_header(text: &str) -> Option<Column> {
        let folded = text.split_whitespace().collect::<Vec<_>>().join(" ").to_uppercase();
        Column::ALL.into_iter().find(|column| column.header() == folded)
    }
}

impl CsvKind {
    /// Columns a file of this kind must have.
    pub fn required(self) -> &'static [Column] {
        match self {
            CsvKind::Invites => &[Column::UserName, Column::EmailAddress, Column::PlatformType],
            CsvKind::Staged => &[Column::PlatformType],
        }
    }

    /// Every column a file of this kind may have, in the order the sample and the export use.
    pub fn columns(self) -> &'static [Column] {
        match self {
            CsvKind::Invites => &[
                Column::UserName,
                Column::EmailAddress,
                Column::PlatformType,
                Column::OwnedBy,
                Column::DomainName,
                Column::GroupName,
                Column::PhoneNumber,
                Column::Status,
                Column::RequestedTime,
                Column::ExpiryTime,
                Column::Remarks,
            ],
            CsvKind::Staged => &[
                Column::SerialNumber,
                Column::Imei,
                Column::PlatformType,
                Column::DeviceName,
                Column::UserName,
                Column::EmailAddress,
                Column::GroupName,
            ],
        }
    }

    fn known_list(self) -> String {
        self.columns().iter().map(|c| c.header()).collect::<Vec<_>>().join(", ")
    }

    /// A small sample file admins can download and fill in.
    pub fn sample(self) -> &'static str {
        match self {
            CsvKind::Invites => concat!(
                "USER NAME,EMAIL ADDRESS,OWNED BY,GROUP NAME,PLATFORM TYPE,PHONE NUMBER\r\n",
                "ANDREW,andrew@example.com,Personal,IOS_Group,iOS,+1-202-555-0100\r\n",
                "ANDREW,andrew@example.com,Corporate,,macOS,\r\n",
                "\"Lee, Ann\",ann.lee@example.com,Corporate,Sales,Android,+44 20 7946 0958\r\n",
                "Sam Park,sam.park@example.com,,,Neutral,\r\n",
            ),
            CsvKind::Staged => concat!(
                "SERIAL NUMBER,IMEI,PLATFORM TYPE,DEVICE NAME,USER NAME,EMAIL ADDRESS,GROUP NAME\r\n",
                "C02XK1JHJG5J,,macOS,Design MacBook,ANDREW,andrew@example.com,Design\r\n",
                ",490154203237518,Android,Warehouse scanner 3,,,Warehouse\r\n",
            ),
        }
    }
}

/// A valid invite row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InviteRow {
    pub line: u64,
    pub user_name: String,
    pub email: String,
    pub platform: Platform,
    pub ownership: Ownership,
    pub domain: Option<String>,
    pub group: Option<String>,
    pub phone: Option<String>,
}

/// A valid staged-device row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StagedRow {
    pub line: u64,
    pub serial: Option<String>,
    pub imei: Option<String>,
    pub platform: Platform,
    pub device_name: Option<String>,
    pub user_name: Option<String>,
    pub email: Option<String>,
    pub group: Option<String>,
}

/// A row that passed every check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Row {
    Invite(InviteRow),
    Staged(StagedRow),
}

impl Row {
    pub fn line(&self) -> u64 {
        match self {
            Row::Invite(row) => row.line,
            Row::Staged(row) => row.line,
        }
    }
}

/// Reads rows one at a time, so a file of any length streams through.
pub struct CsvReader<R: Read> {
    records: RecordReader<std::io::BufReader<BomSkipping<R>>>,
    kind: CsvKind,
    /// For each field position, the column it holds (`None`: an export-only column, ignored).
    columns: Vec<Option<Column>>,
    record: csv::ByteRecord,
}

/// The longest record accepted (a quote that never closes would otherwise swallow the rest of the file).
const MAX_RECORD_BYTES: usize = 1 << 20;

/// Feeds the input straight to one `csv_core` parser (RFC 4180 quoting; LF, CRLF or CR line ends) and counts
/// the line ends it consumes, so each record knows the true line it starts on. (The `csv` crate's own positions
/// miscount after CRLF and blank lines.)
struct RecordReader<R: std::io::BufRead> {
    input: R,
    parser: csv_core::Reader,
    output: Vec<u8>,
    ends: Vec<usize>,
    /// Line ends consumed so far.
    lines: u64,
    /// The last byte consumed was a CR (so an LF right after it ends the same line).
    after_cr: bool,
    /// The input ended or failed; nothing more is read.
    done: bool,
    /// The line a record that failed to read starts on (a too-long one), to report it there.
    failed_at: Option<u64>,
}

impl<R: std::io::BufRead> RecordReader<R> {
    fn new(input: R) -> Self {
        RecordReader {
            input,
            parser: csv_core::Reader::new(),
            output: vec![0; 4096],
            ends: vec![0; 64],
            lines: 0,
            after_cr: false,
            done: false,
            failed_at: None,
        }
    }

    /// Reads the next record's fields into `out` and returns the line it starts on; `None` at the end. After an
    /// error the reader stops, so a failing input cannot repeat the same error forever.
    fn next(&mut self, out: &mut csv::ByteRecord) -> std::io::Result<Option<u64>> {
        use csv_core::ReadRecordResult as Step;
        if self.done {
            return Ok(None);
        }
        let (mut written, mut fields, mut start) = (0, 0, None);
        loop {
            let input = match self.input.fill_buf() {
                Ok(input) => input,
                Err(error) => {
                    self.done = true;
                    return Err(error);
                }
            };
            let at_end = input.is_empty();
            let (step, read, wrote, ended) =
                self.parser.read_record(input, &mut self.output[written..], &mut self.ends[fields..]);
            for &byte in &input[..read] {
                if start.is_none() && byte != b'\r' && byte != b'\n' {
                    start = Some(self.lines + 1);
                }
                match byte {
                    b'\r' => self.lines += 1,
                    b'\n' if !self.after_cr => self.lines += 1,
                    _ => {}
                }
                self.after_cr = byte == b'\r';
            }
            self.input.consume(read);
            written += wrote;
            fields += ended;
            match step {
                Step::OutputFull if self.output.len() < MAX_RECORD_BYTES => {
                    self.output.resize(self.output.len() * 2, 0)
                }
                Step::OutputEndsFull if self.ends.len() < MAX_RECORD_BYTES => self.ends.resize(self.ends.len() * 2, 0),
                Step::OutputFull | Step::OutputEndsFull => {
                    self.done = true;
                    let start = start.unwrap_or(self.lines + 1);
                    self.failed_at = Some(start);
                    return Err(std::io::Error::other(format!(
                        "the row that starts on line {start} is longer than 1 MiB (a double quote that never closes?); the rest of the file was not read"
                    )));
                }
                Step::InputEmpty if at_end => {
                    self.done = true;
                    return Ok(None);
                }
                Step::InputEmpty => {}
                Step::Record => {
                    out.clear();
                    let mut from = 0;
                    for end in &self.ends[..fields] {
                        out.push_field(&self.output[from..*end]);
                        from = *end;
                    }
                    return Ok(Some(start.unwrap_or(self.lines)));
                }
                Step::End => {
                    self.done = true;
                    return Ok(None);
                }
            }
        }
    }
}

impl<R: Read> CsvReader<R> {
    /// Reads and checks the header row. Problems with it (unknown, missing or repeated columns, not UTF-8) are
    /// all returned at once, on line 1.
    pub fn open(input: R, kind: CsvKind) -> Result<CsvReader<R>, Vec<RowProblem>> {
        let mut records = RecordReader::new(std::io::BufReader::new(BomSkipping::new(input)));
        let mut header = csv::ByteRecord::new();
        let problem =
            |column: Option<String>, value: String, reason: String| RowProblem { line: 1, column, value, reason };
        match records.next(&mut header) {
            Ok(Some(_)) => {}
            Ok(None) => {
                let reason = "the file is empty; the first row must name the columns".into();
                return Err(vec![problem(None, String::new(), reason)]);
            }
            Err(error) => return Err(vec![problem(None, String::new(), format!("the file cannot be read: {error}"))]),
        }
        let mut problems = Vec::new();
        let mut columns = Vec::new();
        for raw in header.iter() {
            let Ok(text) = std::str::from_utf8(raw) else {
                problems.push(problem(None, String::from_utf8_lossy(raw).into_owned(), not_utf8()));
                columns.push(None);
                continue;
            };
            match Column::from_header(text) {
                Some(column) if !kind.columns().contains(&column) => problems.push(problem(
                    Some(text.trim().to_owned()),
                    text.trim().to_owned(),
                    format!("this column belongs to the other CSV format; this one knows {}", kind.known_list()),
                )),
                Some(column) if columns.contains(&Some(column)) => problems.push(problem(
                    Some(column.header().to_owned()),
                    text.trim().to_owned(),
                    "this column appears twice; keep one".into(),
                )),
                Some(column) => {
                    let informational =
                        matches!(column, Column::Status | Column::RequestedTime | Column::ExpiryTime | Column::Remarks);
                    columns.push(if informational { None } else { Some(column) });
                    continue;
                }
                None if text.trim().is_empty() => problems.push(problem(
                    None,
                    String::new(),
                    format!("a column has no name; name it ({}) or delete it", kind.known_list()),
                )),
                None => problems.push(problem(
                    Some(text.trim().to_owned()),
                    text.trim().to_owned(),
                    format!("no such column; the known columns are {}", kind.known_list()),
                )),
            }
            columns.push(None);
        }
        for required in kind.required() {
            if !columns.contains(&Some(*required)) {
                problems.push(problem(
                    Some(required.header().to_owned()),
                    String::new(),
                    format!("the required column {} is missing from the first row", required.header()),
                ));
            }
        }
        if kind == CsvKind::Staged
            && !columns.contains(&Some(Column::SerialNumber))
            && !columns.contains(&Some(Column::Imei))
        {
            problems.push(problem(
                None,
                String::new(),
                "a staged-device file needs a SERIAL NUMBER or an IMEI column".into(),
            ));
        }
        if problems.is_empty() {
            Ok(CsvReader { records, kind, columns, record: csv::ByteRecord::new() })
        } else {
            Err(problems)
        }
    }

    /// The next non-blank row: valid, or every problem it has.
    pub fn next_row(&mut self) -> Option<Result<Row, Vec<RowProblem>>> {
        loop {
            let line = match self.records.next(&mut self.record) {
                Ok(Some(line)) => line,
                Ok(None) => return None,
                Err(error) => {
                    let line = self.records.failed_at.unwrap_or(self.records.lines + 1);
                    let reason = format!("the file cannot be read here: {error}");
                    return Some(Err(vec![RowProblem { line, column: None, value: String::new(), reason }]));
                }
            };
            if self.record.iter().all(|field| field.iter().all(u8::is_ascii_whitespace)) {
                continue;
            }
            return Some(self.check_row(line));
        }
    }

    fn check_row(&self, line: u64) -> Result<Row, Vec<RowProblem>> {
        let mut problems = Vec::new();
        if self.record.len() != self.columns.len() {
            problems.push(RowProblem {
                line,
                column: None,
                value: String::new(),
                reason: format!(
                    "this row has {} fields but the first row names {} columns; a value with a comma must be in double quotes",
                    self.record.len(),
                    self.columns.len()
                ),
            });
            return Err(problems);
        }
        let mut cells: [Option<String>; 14] = Default::default();
        // Cells already reported (not UTF-8, a control character): their other checks would only repeat it.
        let mut reported = [false; 14];
        for (raw, column) in self.record.iter().zip(&self.columns) {
            let Some(column) = column else { continue };
            match std::str::from_utf8(raw) {
                Ok(text) if text.trim().chars().any(char::is_control) => {
                    reported[*column as usize] = true;
                    problems.push(RowProblem {
                        line,
                        column: Some(column.header().to_owned()),
                        value: crate::domain::visible_controls(text.trim()),
                        reason: crate::domain::control_character_reason(column.header(), text.trim()),
                    });
                }
                Ok(text) => {
                    let text = text.trim();
                    // Undo the export's guard against spreadsheet formulas ('=…).
                    let text = match text.strip_prefix('\'') {
                        Some(rest) if rest.starts_with(['=', '+', '-', '@']) => rest,
                        _ => text,
                    };
                    if !text.is_empty() {
                        cells[*column as usize] = Some(text.to_owned());
                    }
                }
                Err(_) => {
                    reported[*column as usize] = true;
                    problems.push(RowProblem {
                        line,
                        column: Some(column.header().to_owned()),
                        value: String::from_utf8_lossy(raw).into_owned(),
                        reason: not_utf8(),
                    })
                }
            }
        }
        let cell = |column: Column| cells[column as usize].clone();
        let mut check = |column: Column, problem: Option<String>| {
            if let Some(reason) = problem.filter(|_| !reported[column as usize]) {
                problems.push(RowProblem {
                    line,
                    column: Some(column.header().to_owned()),
                    value: cell(column).unwrap_or_default(),
                    reason,
                });
            }
        };
        let required = |column: Column| cell(column).is_none().then(|| format!("{} is required", column.header()));
        let too_long = |column: Column, max: usize| {
            cell(column).filter(|v| v.chars().count() > max).map(|_| format!("longer than {max} characters"))
        };
        let platform = cell(Column::PlatformType).map(|v| parse_platform(&v));
        check(Column::PlatformType, required(Column::PlatformType).or(platform.clone().and_then(Result::err)));
        check(Column::GroupName, too_long(Column::GroupName, 100));
        let email = cell(Column::EmailAddress).map(|v| normalize_email(&v).map_err(|e| e.to_string()));
        let row = match self.kind {
            CsvKind::Invites => {
                check(Column::UserName, required(Column::UserName).or(too_long(Column::UserName, 200)));
                check(Column::EmailAddress, required(Column::EmailAddress).or(email.clone().and_then(Result::err)));
                let ownership = cell(Column::OwnedBy).map(|v| parse_ownership(&v)).unwrap_or(Ok(Ownership::Corporate));
                check(Column::OwnedBy, ownership.clone().err());
                let phone = cell(Column::PhoneNumber).map(|v| normalize_phone(&v).map_err(|e| e.to_string()));
                check(Column::PhoneNumber, phone.clone().and_then(Result::err));
                check(Column::DomainName, too_long(Column::DomainName, 200));
                match (cell(Column::UserName), email, platform, ownership, phone.transpose()) {
                    (Some(user_name), Some(Ok(email)), Some(Ok(platform)), Ok(ownership), Ok(phone)) => {
                        Some(Row::Invite(InviteRow {
                            line,
                            user_name,
                            email,
                            platform,
                            ownership,
                            domain: cell(Column::DomainName),
                            group: cell(Column::GroupName),
                            phone,
                        }))
                    }
                    _ => None,
                }
            }
            CsvKind::Staged => {
                let serial = cell(Column::SerialNumber).map(|s| s.to_ascii_uppercase());
                let imei = cell(Column::Imei).map(|v| validate_imei(&v).map_err(|e| e.to_string()));
                let neither = (serial.is_none() && imei.is_none())
                    .then(|| "give a SERIAL NUMBER, an IMEI, or both for each device".to_owned());
                check(Column::SerialNumber, neither.or(too_long(Column::SerialNumber, 64)));
                check(Column::Imei, imei.clone().and_then(Result::err));
                check(Column::EmailAddress, email.clone().and_then(Result::err));
                check(Column::DeviceName, too_long(Column::DeviceName, 200));
                match (platform, imei.transpose(), email.transpose()) {
                    (Some(Ok(platform)), Ok(imei), Ok(email)) if serial.is_some() || imei.is_some() => {
                        Some(Row::Staged(StagedRow {
                            line,
                            serial,
                            imei,
                            platform,
                            device_name: cell(Column::DeviceName),
                            user_name: cell(Column::UserName),
                            email,
                            group: cell(Column::GroupName),
                        }))
                    }
                    _ => None,
                }
            }
        };
        match row {
            Some(row) if problems.is_empty() => Ok(row),
            _ => Err(problems),
        }
    }
}

fn not_utf8() -> String {
    "this text is not UTF-8; save the file as \"CSV UTF-8\" and upload it again".to_owned()
}

/// `iOS`, `iPadOS`, `macOS`, `Android`, `Windows`, or `Neutral` for an OS-independent invite; any case.
pub fn parse_platform(text: &str) -> Result<Platform, String> {
    match text.trim().to_ascii_lowercase().as_str() {
        "ios" => Ok(Platform::Ios),
        "ipados" => Ok(Platform::Ipados),
        "macos" => Ok(Platform::Macos),
        "android" => Ok(Platform::Android),
        "windows" => Ok(Platform::Windows),
        "neutral" | "any" => Ok(Platform::Any),
        _ => Err(format!("{text:?} is not a platform; use iOS, iPadOS, macOS, Android, Windows or Neutral")),
    }
}

/// The platform as the CSV writes it.
pub fn platform_text(platform: Platform) -> &'static str {
    match platform {
        Platform::Ios => "iOS",
        Platform::Ipados => "iPadOS",
        Platform::Macos => "macOS",
        Platform::Android => "Android",
        Platform::Windows => "Windows",
        Platform::Any => "Neutral",
    }
}

/// `Personal` or `Corporate`, any case.
pub fn parse_ownership(text: &str) -> Result<Ownership, String> {
    match text.trim().to_ascii_lowercase().as_str() {
        "personal" => Ok(Ownership::Personal),
        "corporate" => Ok(Ownership::Corporate),
        _ => Err(format!("{text:?} is not an owner; use Personal or Corporate (blank means Corporate)")),
    }
}

pub fn ownership_text(ownership: Ownership) -> &'static str {
    match ownership {
        Ownership::Personal => "Personal",
        Ownership::Corporate => "Corporate",
        Ownership::NotSet => "",
    }
}

/// Drops a UTF-8 byte-order mark at the start of the input.
struct BomSkipping<R: Read> {
    inner: R,
    start: Option<([u8; 3], usize, usize)>,
}

impl<R: Read> BomSkipping<R> {
    fn new(inner: R) -> Self {
        BomSkipping { inner, start: None }
    }
}

impl<R: Read> Read for BomSkipping<R> {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        if self.start.is_none() {
            let mut head = [0u8; 3];
            let mut filled = 0;
            while filled < 3 {
                match self.inner.read(&mut head[filled..])? {
                    0 => break,
                    n => filled += n,
                }
            }
            let skip = if filled == 3 && head == [0xEF, 0xBB, 0xBF] { 3 } else { 0 };
            self.start = Some((head, skip, filled));
        }
        if let Some((head, position, filled)) = &mut self.start
            && *position < *filled
        {
            let n = (*filled - *position).min(out.len());
            out[..n].copy_from_slice(&head[*position..*position + n]);
            *position += n;
            return Ok(n);
        }
        self.inner.read(out)
    }
}

/// Writes CSV with the given header (quoting as RFC 4180 needs, CRLF line ends), starting with a UTF-8 BOM so
/// spreadsheets read non-ASCII names right.
pub fn writer<W: std::io::Write>(mut out: W, header: &[&str]) -> csv::Result<csv::Writer<W>> {
    out.write_all(b"\xEF\xBB\xBF")?;
    let mut writer = csv::WriterBuilder::new().terminator(csv::Terminator::CRLF).from_writer(out);
    writer.write_record(header)?;
    Ok(writer)
}

/// Makes a cell safe to open in a spreadsheet: text starting with `=`, `+`, `-`, `@`, tab or CR would run as a
/// formula, so it gets a leading `'` (phone numbers such as `+12025550100` stay as they are). The import takes
/// the `'` off again.
pub fn spreadsheet_safe(cell: &str) -> std::borrow::Cow<'_, str> {
    let phone = cell.starts_with('+') && cell.len() > 1 && cell[1..].chars().all(|c| c.is_ascii_digit());
    match cell.chars().next() {
        Some('=' | '+' | '-' | '@' | '\t' | '\r') if !phone => std::borrow::Cow::Owned(format!("'{cell}")),
        _ => std::borrow::Cow::Borrowed(cell),
    }
}

/// Parses a whole file in memory (for tests and the fuzz target): the rows and the problems, in line order.
pub fn parse_all(bytes: &[u8], kind: CsvKind) -> (Vec<Row>, Vec<RowProblem>) {
    let mut reader = match CsvReader::open(bytes, kind) {
        Ok(reader) => reader,
        Err(problems) => return (Vec::new(), problems),
    };
    let (mut rows, mut problems) = (Vec::new(), Vec::new());
    while let Some(result) = reader.next_row() {
        match result {
            Ok(row) => rows.push(row),
            Err(mut found) => problems.append(&mut found),
        }
    }
    (rows, problems)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn invites(text: &[u8]) -> (Vec<InviteRow>, Vec<RowProblem>) {
        let (rows, problems) = parse_all(text, CsvKind::Invites);
        let rows = rows
            .into_iter()
            .map(|row| match row {
                Row::Invite(row) => row,
                Row::Staged(_) => panic!("staged row from an invite file"),
            })
            .collect();
        (rows, problems)
    }

    #[test]
    fn the_reference_example_parses_in_its_own_column_order() {
        let file = b"USER NAME,EMAIL ADDRESS,OWNED BY,GROUP NAME,PLATFORM TYPE,PHONE NUMBER\nANDREW,andrew@example.com,Personal,IOS_Group,iOS,+1-202-555-0100\n";
        let (rows, problems) = invites(file);
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(
            rows,
            [InviteRow {
                line: 2,
                user_name: "ANDREW".into(),
                email: "andrew@example.com".into(),
                platform: Platform::Ios,
                ownership: Ownership::Personal,
                domain: None,
                group: Some("IOS_Group".into()),
                phone: Some("+12025550100".into()),
            }]
        );
    }

    #[test]
    fn bom_crlf_lowercase_headers_quotes_blanks_and_no_trailing_newline() {
        let file = "\u{feff}  platform type ,email address,User Name,owned by,domain name\r\n\
                    ANDROID,\"lee@example.com\",\"Lee, Ann \"\"Annie\"\"\",,\r\n\
                    \r\n\
                    neutral,sam@example.com,Sam,CORPORATE,corp.example.com";
        let (rows, problems) = invites(file.as_bytes());
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].user_name, "Lee, Ann \"Annie\"");
        assert_eq!(
            (rows[0].platform, rows[0].ownership),
            (Platform::Android, Ownership::Corporate),
            "blank owner = Corporate"
        );
        assert_eq!(rows[0].domain, None);
        assert_eq!((rows[1].line, rows[1].platform), (4, Platform::Any));
        assert_eq!(rows[1].domain.as_deref(), Some("corp.example.com"));
    }

    #[test]
    fn a_quoted_value_may_span_lines_and_line_numbers_stay_true() {
        // No column takes a line break (a name over two lines is refused), but the quoting is read and the
        // lines after it keep their true numbers.
        let file = b"USER NAME,EMAIL ADDRESS,PLATFORM TYPE\n\"Ann\nLee\",ann@example.com,iOS\nBob,bob@,iOS\n\"Cy\",cy@example.com,iOS\n";
        let (rows, problems) = invites(file);
        assert_eq!((rows[0].line, rows[0].user_name.as_str()), (5, "Cy"));
        let found: Vec<(u64, &str)> = problems.iter().map(|p| (p.line, p.column.as_deref().unwrap())).collect();
        assert_eq!(found, [(2, "USER NAME"), (4, "EMAIL ADDRESS")]);
    }

    #[test]
    fn every_problem_of_a_row_is_reported_with_line_column_and_value() {
        let file =
            b"USER NAME,EMAIL ADDRESS,PLATFORM TYPE,OWNED BY,PHONE NUMBER\n,not-an-email,BlackBerry,Mine,555-0100\n";
        let (rows, problems) = invites(file);
        assert!(rows.is_empty());
        let found: Vec<(u64, &str, &str)> =
            problems.iter().map(|p| (p.line, p.column.as_deref().unwrap(), p.value.as_str())).collect();
        assert_eq!(
            found,
            [
                (2, "PLATFORM TYPE", "BlackBerry"),
                (2, "USER NAME", ""),
                (2, "EMAIL ADDRESS", "not-an-email"),
                (2, "OWNED BY", "Mine"),
                (2, "PHONE NUMBER", "555-0100"),
            ]
        );
        assert!(problems.iter().all(|p| !p.reason.is_empty()));
        assert!(problems[0].reason.contains("use iOS, iPadOS, macOS, Android, Windows or Neutral"));
    }

    #[test]
    fn header_problems_are_reported_together() {
        let (_, problems) = invites(b"USER NAME,E-MAIL,PLATFORM TYPE,PLATFORM TYPE,SERIAL NUMBER\n");
        let reasons: Vec<String> = problems.iter().map(|p| format!("{:?}: {}", p.column, p.reason)).collect();
        assert_eq!(problems.len(), 4, "{reasons:#?}");
        assert!(reasons[0].contains("E-MAIL") && reasons[0].contains("known columns are USER NAME, EMAIL ADDRESS"));
        assert!(reasons[1].contains("appears twice"));
        assert!(reasons[2].contains("other CSV format"));
        assert!(reasons[3].contains("EMAIL ADDRESS is missing"));
        assert_eq!(invites(b"").1[0].reason, "the file is empty; the first row must name the columns");
    }

    #[test]
    fn bytes_that_are_not_utf8_are_named_by_line() {
        let mut file = b"USER NAME,EMAIL ADDRESS,PLATFORM TYPE\nAnn,ann@example.com,iOS\n".to_vec();
        file.extend_from_slice(b"Jos\xe9,jose@example.com,iOS\n");
        let (rows, problems) = invites(&file);
        assert_eq!(rows.len(), 1);
        assert_eq!((problems[0].line, problems[0].column.as_deref()), (3, Some("USER NAME")));
        assert!(problems[0].reason.contains("not UTF-8"), "{}", problems[0].reason);
        assert_eq!(problems.len(), 1, "the encoding alone, not also \"USER NAME is required\": {problems:?}");
    }

    #[test]
    fn control_characters_are_refused_in_every_cell_with_the_column_named() {
        let file = b"USER NAME,EMAIL ADDRESS,PLATFORM TYPE,GROUP NAME,DOMAIN NAME\nAn\0n,ann@example.com,iOS,Sales,\n\"Bob\nLee\",bob@example.com,iOS,,\nCy,cy@example.com,iOS,Sa\x1bles,\nDi,di@example.com,iOS,,corp\x07\nEd,ed@example.com,iOS,,\n";
        let (rows, problems) = invites(file);
        assert_eq!(rows.iter().map(|r| r.user_name.as_str()).collect::<Vec<_>>(), ["Ed"]);
        let found: Vec<(u64, &str)> = problems.iter().map(|p| (p.line, p.column.as_deref().unwrap())).collect();
        assert_eq!(found, [(2, "USER NAME"), (3, "USER NAME"), (5, "GROUP NAME"), (6, "DOMAIN NAME")], "{problems:?}");
        assert!(
            problems[0].reason.contains("USER NAME contains a control character (U+0000"),
            "{}",
            problems[0].reason
        );
        assert_eq!(problems[0].value, "An\\u{0}n", "shown written out, not as the raw byte");
        assert!(problems[1].reason.contains("U+000A"), "a line break inside a name: {}", problems[1].reason);
    }

    #[test]
    fn a_too_long_quoted_field_over_many_lines_is_reported_at_the_line_it_starts_on() {
        let mut file = b"USER NAME,EMAIL ADDRESS,PLATFORM TYPE\nAnn,ann@example.com,iOS\n\"Bob".to_vec();
        for _ in 0..200_000 {
            file.extend_from_slice(b"xxxxx\n");
        }
        let (rows, problems) = invites(&file);
        assert_eq!(rows.len(), 1);
        assert_eq!(problems.len(), 1);
        assert_eq!(problems[0].line, 3, "{}", problems[0].reason);
        assert!(problems[0].reason.contains("starts on line 3"), "{}", problems[0].reason);
    }

    #[test]
    fn a_quote_inside_an_unquoted_value_loses_no_rows() {
        let file = b"USER NAME,EMAIL ADDRESS,PLATFORM TYPE\nAnn 5\" tall,ann@example.com,iOS\nBob,bob@example.com,iOS\nCy,cy@example.com,iOS\n";
        let (rows, problems) = invites(file);
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(
            rows.iter().map(|r| (r.line, r.user_name.as_str())).collect::<Vec<_>>(),
            [(2, "Ann 5\" tall"), (3, "Bob"), (4, "Cy")]
        );
    }

    #[test]
    fn bare_cr_line_ends_and_blank_lines_before_the_header_keep_true_lines() {
        let (rows, problems) =
            invites(b"USER NAME,EMAIL ADDRESS,PLATFORM TYPE\rAnn,ann@example.com,iOS\rBob,bob@,iOS\r");
        assert_eq!(rows.len(), 1);
        assert_eq!((rows[0].line, problems[0].line), (2, 3));
        let (rows, problems) = invites(b"\r\n\r\nUSER NAME,EMAIL ADDRESS,PLATFORM TYPE\r\nAnn,ann@example.com,iOS\r\n");
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(rows[0].line, 4);
    }

    #[test]
    fn a_quote_that_never_closes_stops_the_file_with_its_line() {
        let mut file =
            b"USER NAME,EMAIL ADDRESS,PLATFORM TYPE\nAnn,ann@example.com,iOS\n\"Bob,bob@example.com,iOS\n".to_vec();
        file.extend(std::iter::repeat_n(b'x', 1_100_000));
        let (rows, problems) = invites(&file);
        assert_eq!(rows.len(), 1);
        assert_eq!(problems.len(), 1);
        assert!(
            problems[0].reason.contains("starts on line 3") && problems[0].reason.contains("longer than 1 MiB"),
            "{}",
            problems[0].reason
        );
    }

    #[test]
    fn ragged_rows_are_explained() {
        let (_, problems) = invites(b"USER NAME,EMAIL ADDRESS,PLATFORM TYPE\nLee, Ann,ann@example.com,iOS\n");
        assert!(problems[0].reason.contains("has 4 fields") && problems[0].reason.contains("double quotes"));
    }

    #[test]
    fn staged_rows_need_a_serial_or_a_valid_imei() {
        let file = b"serial number,imei,platform type,device name,email address\n\
                     c02xk1,,macOS,Mac,\n\
                     ,490154203237518,Android,,ann@example.com\n\
                     ,490154203237519,Android,,\n\
                     ,,iOS,No ids,\n";
        let (rows, problems) = parse_all(file, CsvKind::Staged);
        assert_eq!(rows.len(), 2);
        let Row::Staged(first) = &rows[0] else { panic!() };
        assert_eq!(first.serial.as_deref(), Some("C02XK1"));
        assert_eq!(problems.iter().map(|p| p.line).collect::<Vec<_>>(), [4, 5]);
        assert!(problems[0].reason.contains("check digit"));
        assert!(problems[1].reason.contains("SERIAL NUMBER, an IMEI, or both"));
    }

    #[test]
    fn the_samples_parse_cleanly() {
        for kind in [CsvKind::Invites, CsvKind::Staged] {
            let (rows, problems) = parse_all(kind.sample().as_bytes(), kind);
            assert!(problems.is_empty(), "{kind:?}: {problems:?}");
            assert!(rows.len() >= 2);
        }
    }

    #[test]
    fn garbage_never_panics() {
        // A cheap, deterministic stand-in for the fuzz target (fuzz/), run on every test.
        let mut seed: u64 = 0x2545_f491_4f6c_dd1d;
        let alphabet = b"USER NAME,EMAIL ADDRESS,PLATFORM TYPE,\"\r\n\xef\xbb\xbfa@b.c iOS\xff\x00,";
        for _ in 0..3_000 {
            let len = (seed % 200) as usize;
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    alphabet[(seed % alphabet.len() as u64) as usize]
                })
                .collect();
            let _ = parse_all(&bytes, CsvKind::Invites);
            let _ = parse_all(&bytes, CsvKind::Staged);
        }
    }
}
