//! Time as enrolld sees it: a `Clock` trait so expiry and renewal logic can be driven by tests, and whether the
//! clock can be trusted at all. A board without a battery-backed clock boots at 1970, or at the time it last shut
//! down, until NTP sets it: certificates issued or expiries computed before then would be wrong. [`judge`] decides
//! from the time, the latest time this box has seen and what the system says about synchronisation
//! ([`SyncMarkers`]); [`JumpDetector`] notices the clock being stepped while enrolld runs.

use std::fmt::Debug;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use time::{Duration, OffsetDateTime};

/// Where "now" comes from. Production uses [`SystemClock`]; tests use [`ManualClock`].
pub trait Clock: Send + Sync + Debug {
    fn now(&self) -> OffsetDateTime;
}

/// The wall clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> OffsetDateTime {
        OffsetDateTime::now_utc()
    }
}

/// A clock that only moves when told to; clones share the same time.
#[derive(Debug, Clone)]
pub struct ManualClock {
    now: Arc<Mutex<OffsetDateTime>>,
}

impl ManualClock {
    pub fn new(start: OffsetDateTime) -> Self {
        Self { now: Arc::new(Mutex::new(start)) }
    }

    pub fn advance(&self, by: Duration) {
        let mut now = self.now.lock().unwrap_or_else(PoisonError::into_inner);
        *now += by;
    }
}

impl Clock for ManualClock {
    fn now(&self) -> OffsetDateTime {
        *self.now.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// No real clock is earlier than this (the year this enrolld was written); a board without a clock battery that
/// booted at 1970 is, and must not make a CA or certificates.
pub const EARLIEST_PLAUSIBLE_UNIX: i64 = 1_767_225_600; // 2026-01-01T00:00:00Z

/// What enrolld needs to know about the clock before it makes keys, issues certificates or computes expiries
/// (`clock_check`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClockCheck {
    /// Not earlier than this build's floor, nor than the latest time this box has seen: enough where a
    /// battery-backed clock keeps the time.
    Plausible,
    /// That, and synchronised: by NTP (systemd-timesyncd) or from a hardware clock the kernel read at boot. For
    /// boards without a real-time clock.
    Synchronised,
}

impl ClockCheck {
    pub fn as_str(self) -> &'static str {
        match self {
            ClockCheck::Plausible => "plausible",
            ClockCheck::Synchronised => "synchronised",
        }
    }
}

impl std::str::FromStr for ClockCheck {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        match text.trim().to_ascii_lowercase().as_str() {
            "plausible" => Ok(ClockCheck::Plausible),
            "synchronised" | "synchronized" => Ok(ClockCheck::Synchronised),
            _ => Err("use plausible or synchronised".into()),
        }
    }
}

/// What set the clock, as the system reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncSource {
    /// systemd-timesyncd heard from an NTP server.
    Ntp,
    /// The kernel set the clock from a hardware clock at boot.
    HardwareClock,
}

/// The files the system keeps about its clock: systemd-timesyncd creates `/run/systemd/timesync/synchronized`
/// once NTP has set the clock, and the kernel writes `1` to `/sys/class/rtc/rtc0/hctosys` when it set the clock
/// from that hardware clock at boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncMarkers {
    timesync: PathBuf,
    hctosys: PathBuf,
}

impl Default for SyncMarkers {
    fn default() -> Self {
        SyncMarkers::under(Path::new("/"))
    }
}

impl SyncMarkers {
    /// The same files under another root (tests put them in a temporary directory).
    pub fn under(root: &Path) -> SyncMarkers {
        SyncMarkers {
            timesync: root.join("run/systemd/timesync/synchronized"),
            hctosys: root.join("sys/class/rtc/rtc0/hctosys"),
        }
    }

    /// What the files say now.
    pub fn read(&self) -> Option<SyncSource> {
        if self.timesync.exists() {
            return Some(SyncSource::Ntp);
        }
        let hctosys = std::fs::read_to_string(&self.hctosys).unwrap_or_default();
        (hctosys.trim() == "1").then_some(SyncSource::HardwareClock)
    }
}

/// Whether the clock can be trusted, and why (not).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClockState {
    /// Set by NTP, or by a hardware clock at boot.
    Synchronised(SyncSource),
    /// Nothing says it was synchronised, but it is not earlier than any time this box has seen (and
    /// `clock_check = "plausible"` accepts that).
    Plausible,
    /// Earlier than this build of enrolld: never set.
    Unset { now: OffsetDateTime },
    /// Earlier than a time this box has already seen: set wrong, or not yet set since a boot without a clock.
    Behind { now: OffsetDateTime, latest: OffsetDateTime },
    /// Not synchronised yet, and `clock_check = "synchronised"` asks for it.
    Unsynchronised,
}

impl ClockState {
    pub fn trusted(&self) -> bool {
        matches!(self, ClockState::Synchronised(_) | ClockState::Plausible)
    }

    /// The state as one word, as `/healthz` reports it.
    pub fn as_str(&self) -> &'static str {
        match self {
            ClockState::Synchronised(SyncSource::Ntp) => "synchronised",
            ClockState::Synchronised(SyncSource::HardwareClock) => "hardware_clock",
            ClockState::Plausible => "plausible",
            ClockState::Unset { .. } => "unset",
            ClockState::Behind { .. } => "behind",
            ClockState::Unsynchronised => "unsynchronised",
        }
    }

    /// A sentence (without its full stop) for the log, the console and the pages.
    pub fn describe(&self) -> String {
        match self {
            ClockState::Synchronised(SyncSource::Ntp) => "The clock is synchronised by NTP".into(),
            ClockState::Synchronised(SyncSource::HardwareClock) => "The clock was set from the hardware clock".into(),
            ClockState::Plausible => "The clock looks right (nothing says it was synchronised)".into(),
            ClockState::Unset { now } => format!("The clock says {}: it has not been set", minute(now)),
            ClockState::Behind { now, latest } => format!(
                "The clock says {}, earlier than {}, a time this box has already seen: it is wrong",
                minute(now),
                minute(latest)
            ),
            ClockState::Unsynchronised => "The clock has not been synchronised yet".into(),
        }
    }
}

/// What to do about a clock that is not trusted (a sentence, without its full stop).
pub const CLOCK_ADVICE: &str = "The box needs NTP: UDP port 123 to the internet, or an NTP server announced by DHCP";

/// Decides whether to trust the clock that says `now`. NTP's word wins over the latest time seen (that time may
/// have come from a clock that was ahead); anything else must not be earlier than it.
pub fn judge(
    check: ClockCheck,
    now: OffsetDateTime,
    latest_seen: Option<OffsetDateTime>,
    sync: Option<SyncSource>,
) -> ClockState {
    if now.unix_timestamp() < EARLIEST_PLAUSIBLE_UNIX {
        return ClockState::Unset { now };
    }
    match (sync, latest_seen.filter(|latest| now < *latest)) {
        (Some(SyncSource::Ntp), _) => ClockState::Synchronised(SyncSource::Ntp),
        (None, _) if check == ClockCheck::Synchronised => ClockState::Unsynchronised,
        (_, Some(latest)) => ClockState::Behind { now, latest },
        (Some(source), None) => ClockState::Synchronised(source),
        (None, None) => ClockState::Plausible,
    }
}

/// A step of the wall clock while enrolld ran: how far it moved beyond (or behind) the monotonic clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Jump {
    /// The wall-clock time just after the step.
    pub at: OffsetDateTime,
    /// Positive when the clock moved forward.
    pub by: Duration,
}

impl Jump {
    /// "forward by 2 h 5 min at 2026-03-01 10:04 UTC", for the log and the dashboard.
    pub fn describe(&self) -> String {
        let direction = if self.by.is_negative() { "back" } else { "forward" };
        let by = self.by.abs();
        let amount = match (by.whole_days(), by.whole_hours() % 24, by.whole_minutes() % 60) {
            (0, 0, minutes) => format!("{minutes} min"),
            (0, hours, minutes) => format!("{hours} h {minutes} min"),
            (days, hours, _) => format!("{days} d {hours} h"),
        };
        format!("{direction} by {amount} at {}", minute(&self.at))
    }
}

fn minute(at: &OffsetDateTime) -> String {
    format!("{} {:02}:{:02} UTC", at.date(), at.hour(), at.minute())
}

/// Notices steps of the wall clock by comparing how far it moved with how far the monotonic clock did.
#[derive(Debug, Clone)]
pub struct JumpDetector {
    wall: OffsetDateTime,
    monotonic: std::time::Instant,
}

impl JumpDetector {
    /// A step smaller than this is drift, or NTP slewing, not a jump.
    pub const THRESHOLD: Duration = Duration::minutes(1);

    pub fn new(wall: OffsetDateTime, monotonic: std::time::Instant) -> JumpDetector {
        JumpDetector { wall, monotonic }
    }

    /// Takes a sample of both clocks; returns the jump since the last sample, if it was more than a minute.
    pub fn sample(&mut self, wall: OffsetDateTime, monotonic: std::time::Instant) -> Option<Jump> {
        let elapsed = Duration::try_from(monotonic.saturating_duration_since(self.monotonic)).unwrap_or(Duration::MAX);
        let by = (wall - self.wall) - elapsed;
        self.wall = wall;
        self.monotonic = monotonic;
        (by.abs() > Self::THRESHOLD).then_some(Jump { at: wall, by })
    }
}

/// What enrolld knows about the clock while it runs, for `/healthz` and the dashboard; cheap to clone.
#[derive(Clone, Debug)]
pub struct ClockStatus {
    inner: Arc<Mutex<ClockReport>>,
}

/// The clock's state and its last jump.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClockReport {
    pub state: ClockState,
    pub last_jump: Option<Jump>,
}

impl ClockStatus {
    pub fn new(state: ClockState) -> ClockStatus {
        ClockStatus { inner: Arc::new(Mutex::new(ClockReport { state, last_jump: None })) }
    }

    pub fn report(&self) -> ClockReport {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    pub fn set_state(&self, state: ClockState) {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner).state = state;
    }

    pub fn jumped(&self, jump: Jump) {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner).last_jump = Some(jump);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    fn at(unix: i64) -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp(unix).unwrap()
    }

    const NOW: i64 = 1_800_000_000;

    #[test]
    fn each_input_to_the_trust_decision_counts() {
        use ClockCheck::{Plausible, Synchronised};
        use SyncSource::{HardwareClock, Ntp};
        let (now, earlier, later) = (at(NOW), Some(at(NOW - 3_600)), Some(at(NOW + 3_600)));
        let cases = [
            // Before the build's floor nothing is trusted, synchronised or not.
            (Synchronised, at(0), None, Some(Ntp), ClockState::Unset { now: at(0) }),
            (
                Plausible,
                at(EARLIEST_PLAUSIBLE_UNIX - 1),
                None,
                None,
                ClockState::Unset { now: at(EARLIEST_PLAUSIBLE_UNIX - 1) },
            ),
            (Plausible, now, None, None, ClockState::Plausible),
            (Plausible, now, earlier, None, ClockState::Plausible),
            (Plausible, now, later, None, ClockState::Behind { now, latest: at(NOW + 3_600) }),
            (Synchronised, now, None, None, ClockState::Unsynchronised),
            (Synchronised, now, later, None, ClockState::Unsynchronised),
            (Synchronised, now, earlier, Some(Ntp), ClockState::Synchronised(Ntp)),
            // NTP's word wins over a latest time that came from a clock that was ahead.
            (Synchronised, now, later, Some(Ntp), ClockState::Synchronised(Ntp)),
            (Synchronised, now, earlier, Some(HardwareClock), ClockState::Synchronised(HardwareClock)),
            // A hardware clock that lost time is not believed.
            (Synchronised, now, later, Some(HardwareClock), ClockState::Behind { now, latest: at(NOW + 3_600) }),
            (Plausible, now, None, Some(Ntp), ClockState::Synchronised(Ntp)),
        ];
        for (check, now, latest, sync, expected) in cases {
            let verdict = judge(check, now, latest, sync);
            assert_eq!(verdict, expected, "{check:?} {now} {latest:?} {sync:?}");
            assert_eq!(verdict.trusted(), matches!(expected, ClockState::Synchronised(_) | ClockState::Plausible));
        }
    }

    #[test]
    fn the_markers_are_read_from_their_files() {
        let root = tempfile::tempdir().unwrap();
        let markers = SyncMarkers::under(root.path());
        assert_eq!(markers.read(), None);
        let rtc = root.path().join("sys/class/rtc/rtc0");
        std::fs::create_dir_all(&rtc).unwrap();
        std::fs::write(rtc.join("hctosys"), "0\n").unwrap();
        assert_eq!(markers.read(), None, "0: the kernel did not set the clock from it");
        std::fs::write(rtc.join("hctosys"), "1\n").unwrap();
        assert_eq!(markers.read(), Some(SyncSource::HardwareClock));
        let timesync = root.path().join("run/systemd/timesync");
        std::fs::create_dir_all(&timesync).unwrap();
        std::fs::write(timesync.join("synchronized"), "").unwrap();
        assert_eq!(markers.read(), Some(SyncSource::Ntp));
        assert_eq!(SyncMarkers::default(), SyncMarkers::under(Path::new("/")));
    }

    #[test]
    fn a_step_of_more_than_a_minute_is_a_jump() {
        let start = Instant::now();
        let mut detector = JumpDetector::new(at(NOW), start);
        let step = std::time::Duration::from_secs(5);
        assert_eq!(detector.sample(at(NOW + 5), start + step), None, "in step");
        assert_eq!(detector.sample(at(NOW + 10 + 50), start + step * 2), None, "50 s of drift is not a jump");
        let forward = detector.sample(at(NOW + 60 + 5 + 3_600), start + step * 3).unwrap();
        assert_eq!(forward.by, Duration::hours(1));
        assert_eq!(forward.at, at(NOW + 3_665));
        assert_eq!(forward.describe(), "forward by 1 h 0 min at 2027-01-15 09:01 UTC");
        let back = detector.sample(at(NOW + 3_670 - 86_400), start + step * 4).unwrap();
        assert_eq!(back.by, -Duration::days(1));
        assert!(back.describe().starts_with("back by 1 d 0 h at "), "{}", back.describe());
    }

    #[test]
    fn clock_check_reads_both_spellings() {
        assert_eq!("synchronized".parse(), Ok(ClockCheck::Synchronised));
        assert_eq!(" Plausible ".parse(), Ok(ClockCheck::Plausible));
        assert!("ntp".parse::<ClockCheck>().is_err());
    }
}
