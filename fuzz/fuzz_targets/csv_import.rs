//! Fuzzes the CSV reader with arbitrary bytes, as both file formats: it must never panic, and every problem it
//! reports must name a line in the input.
#![no_main]

use enrolld::csvfile::{CsvKind, parse_all};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Line ends as the reader counts them: LF, CR, or CRLF as one.
    let lines = data.iter().enumerate().filter(|&(i, b)| *b == b'\r' || (*b == b'\n' && (i == 0 || data[i - 1] != b'\r'))).count() as u64 + 1;
    for kind in [CsvKind::Invites, CsvKind::Staged] {
        let (rows, problems) = parse_all(data, kind);
        for problem in &problems {
            assert!(problem.line >= 1 && problem.line <= lines, "line {} of {lines}", problem.line);
        }
        for row in &rows {
            assert!(row.line() >= 2 && row.line() <= lines);
        }
    }
});
