//! What the box's local console shows (a serial line, or a screen on tty1): where to go, the first-run setup code
//! until the first admin exists, a clock problem while there is one, and that enrolld stopped. The text is kept in
//! `console_file` in the format agetty shows above the login prompt (`\4` is the box's IPv4 address, which agetty
//! fills in and refreshes when it changes); the daemon says what to show and this module writes it, atomically,
//! only when it changed. Also where the setup code can be found, for the setup page to say.

use std::path::PathBuf;
use std::sync::{Mutex, PoisonError};

/// Everything the console text is made from.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Screen {
    /// The organisation's name; may be empty.
    pub organisation: String,
    /// The box's name, without `.local`.
    pub hostname: String,
    /// Whether the box announces `<hostname>.local` over mDNS.
    pub mdns: bool,
    pub https_port: Option<u16>,
    pub http_port: Option<u16>,
    /// The first-run setup code, until the first admin exists.
    pub setup_code: Option<String>,
    /// Why enrolld waits for the clock, while it does.
    pub clock_problem: Option<String>,
    /// enrolld stopped (the last text stays on the console, saying so).
    pub stopped: bool,
}

/// The console text for `screen`, in agetty's issue format: backslashes in names are doubled (agetty would read
/// them as its escapes) and control characters dropped; `\4` stands for the box's IPv4 address.
pub fn render(screen: &Screen) -> String {
    let organisation = if screen.organisation.trim().is_empty() { "device enrollment" } else { &screen.organisation };
    let mut lines =
        vec![format!("enrolld · {}{}", plain(organisation), if screen.stopped { " (stopped)" } else { "" })];
    let (scheme, port, default) = match (screen.https_port, screen.http_port) {
        (Some(port), _) => ("https", port, 443),
        (None, Some(port)) => ("http", port, 80),
        (None, None) => ("https", 443, 443),
    };
    let port = if port == default { String::new() } else { format!(":{port}") };
    let by_name = format!("{scheme}://{}.local{port}/", plain(&screen.hostname));
    let by_address = format!("{scheme}://\\4{port}/");
    let path = if screen.setup_code.is_some() || screen.clock_problem.is_some() { "" } else { "admin" };
    if screen.stopped {
        lines.push("  enrolld is stopped; the address below answers again once it runs".into());
        lines.push("  (`systemctl status enrolld` says why it stopped)".into());
    } else if let Some(problem) = &screen.clock_problem {
        lines.push(format!("  Waiting for the clock. {}.", plain(problem)));
        lines.push(format!("  {}.", crate::clock::CLOCK_ADVICE));
        lines.push("  enrolld goes on by itself as soon as the clock is set.".into());
    }
    let managed = screen.setup_code.is_none() && screen.clock_problem.is_none() && !screen.stopped;
    let open = if managed { "Signed-in admins manage the box at" } else { "Open" };
    if screen.mdns {
        lines.push(format!("  {open} {by_name}{path} in a browser on the office network"));
        lines.push(format!("  (or {by_address}{path} if .local names do not resolve on your computer)"));
    } else {
        lines.push(format!("  {open} {by_address}{path} in a browser on the office network"));
    }
    match (&screen.setup_code, screen.stopped || screen.clock_problem.is_some()) {
        (Some(code), false) => lines.push(format!("  First-run setup code: {}", plain(code))),
        (Some(_), true) => lines.push("  The first-run setup code shows here once enrolld is running.".into()),
        (None, _) => {}
    }
    lines.push(String::new());
    lines.join("\n") + "\n"
}

/// Text agetty prints as it is: backslashes doubled, control characters (escape sequences among them) left out.
fn plain(text: &str) -> String {
    text.chars().filter(|c| !c.is_control()).collect::<String>().replace('\\', "\\\\")
}

/// The console file: written (atomically, 0600: only root's agetty reads it besides enrolld) when what it shows
/// changes. Without a `console_file`, nothing is written.
#[derive(Debug)]
pub struct Console {
    path: Option<PathBuf>,
    /// What is to be shown, and the text last written.
    shown: Mutex<(Screen, Option<String>)>,
}

impl Console {
    pub fn new(path: Option<PathBuf>, screen: Screen) -> Console {
        Console { path, shown: Mutex::new((screen, None)) }
    }

    /// What the console shows now.
    pub fn screen(&self) -> Screen {
        self.shown.lock().unwrap_or_else(PoisonError::into_inner).0.clone()
    }

    /// Changes what the console shows and rewrites the file if the text changed. A file that cannot be written is
    /// logged (once per problem) and tried again at the next change.
    pub fn update(&self, change: impl FnOnce(&mut Screen)) {
        let mut shown = self.shown.lock().unwrap_or_else(PoisonError::into_inner);
        change(&mut shown.0);
        let Some(path) = &self.path else { return };
        let text = render(&shown.0);
        if shown.1.as_deref() == Some(text.as_str()) {
            return;
        }
        match crate::state_dir::write_private(path, text.as_bytes(), 0o600) {
            Ok(()) => shown.1 = Some(text),
            Err(error) => {
                tracing::warn!(%error, path = %path.display(), "cannot write the console file; the box's console will not show the address or the setup code");
                shown.1 = None;
            }
        }
    }
}

/// How enrolld was started, decided once at start: where its log goes, and so where the setup code is to be found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Launch {
    /// A systemd service (`INVOCATION_ID` or `NOTIFY_SOCKET` set): the log is in the journal.
    Systemd,
    /// By hand, with its log on a terminal.
    Terminal,
    /// Anything else (a container, a log redirected to a file).
    Other,
}

impl Launch {
    /// Reads the process's environment and whether its log (standard error) is a terminal.
    pub fn detect() -> Launch {
        let systemd = ["INVOCATION_ID", "NOTIFY_SOCKET"].iter().any(|var| std::env::var_os(var).is_some());
        Launch::from_facts(systemd, std::io::IsTerminal::is_terminal(&std::io::stderr()))
    }

    fn from_facts(systemd: bool, terminal: bool) -> Launch {
        match (systemd, terminal) {
            (true, _) => Launch::Systemd,
            (false, true) => Launch::Terminal,
            (false, false) => Launch::Other,
        }
    }

    /// Where the setup code can be found, to complete "Enter the setup code shown …".
    pub fn setup_code_place(self, console: bool) -> &'static str {
        match (self, console) {
            (Launch::Systemd, true) => "on the box's screen or serial console, and in its log (journalctl -u enrolld)",
            (Launch::Systemd, false) => "in enrolld's log (journalctl -u enrolld)",
            (Launch::Terminal, true) => {
                "in the terminal where enrolld was started, and on the box's screen or serial console"
            }
            (Launch::Terminal, false) => "in the terminal where enrolld was started",
            (Launch::Other, true) => "on the box's screen or serial console, and in enrolld's log",
            (Launch::Other, false) => "in enrolld's log",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn screen() -> Screen {
        Screen {
            organisation: "Example Ltd".into(),
            hostname: "enroll".into(),
            mdns: true,
            https_port: Some(443),
            http_port: Some(80),
            setup_code: Some("K7QM-2XWP-9RTA".into()),
            clock_problem: None,
            stopped: false,
        }
    }

    #[test]
    fn before_setup_it_shows_where_to_go_and_the_code() {
        assert_eq!(
            render(&screen()),
            "enrolld · Example Ltd\n  Open https://enroll.local/ in a browser on the office network\n  (or https://\\4/ if .local names do not resolve on your computer)\n  First-run setup code: K7QM-2XWP-9RTA\n\n"
        );
    }

    #[test]
    fn after_setup_the_code_is_gone() {
        let text = render(&Screen { setup_code: None, ..screen() });
        assert!(!text.contains("setup code"), "{text}");
        assert!(text.contains("Signed-in admins manage the box at https://enroll.local/admin in a browser"), "{text}");
        assert!(text.contains("(or https://\\4/admin if"), "{text}");
    }

    #[test]
    fn a_port_other_than_443_is_named_and_the_organisation_may_be_empty() {
        let text = render(&Screen { https_port: Some(8443), organisation: " ".into(), ..screen() });
        assert!(text.starts_with("enrolld · device enrollment\n"), "{text}");
        assert!(
            text.contains("https://enroll.local:8443/ in a browser") && text.contains("https://\\4:8443/ if"),
            "{text}"
        );
        let plain_http = render(&Screen { https_port: None, http_port: Some(8080), ..screen() });
        assert!(plain_http.contains("http://enroll.local:8080/"), "{plain_http}");
        let no_mdns = render(&Screen { mdns: false, ..screen() });
        assert!(!no_mdns.contains(".local") && no_mdns.contains("Open https://\\4/ in a browser"), "{no_mdns}");
    }

    #[test]
    fn names_cannot_smuggle_in_agetty_escapes_or_terminal_controls() {
        let text = render(&Screen { organisation: "Evil \\e{red}Corp\u{1b}[2J".into(), ..screen() });
        assert!(text.starts_with("enrolld · Evil \\\\e{red}Corp[2J\n"), "{text}");
        // Every backslash left is either doubled or the \4 escape.
        let unescaped = text.replace("\\\\", "").replace("\\4", "");
        assert!(!unescaped.contains('\\'), "{text}");
    }

    #[test]
    fn waiting_for_the_clock_says_why_and_how_to_fix_it() {
        let text =
            render(&Screen { clock_problem: Some("The clock has not been synchronised yet".into()), ..screen() });
        assert!(text.contains("Waiting for the clock. The clock has not been synchronised yet.\n"), "{text}");
        assert!(text.contains("UDP port 123"), "{text}");
        assert!(!text.contains("K7QM"), "no code while it cannot be used: {text}");
        assert!(text.contains("Open https://enroll.local/ in a browser"), "{text}");
    }

    #[test]
    fn a_stopped_enrolld_says_so_and_keeps_the_code_off_the_screen() {
        let text = render(&Screen { stopped: true, ..screen() });
        assert!(text.starts_with("enrolld · Example Ltd (stopped)\n  enrolld is stopped"), "{text}");
        assert!(!text.contains("K7QM"), "{text}");
        assert!(text.contains("https://enroll.local/"), "{text}");
    }

    #[test]
    fn the_file_is_private_and_written_only_when_the_text_changes() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.issue");
        let console = Console::new(Some(path.clone()), screen());
        console.update(|_| {});
        assert_eq!(std::fs::read_to_string(&path).unwrap(), render(&screen()));
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        std::fs::write(&path, "touched").unwrap();
        console.update(|s| s.hostname = "enroll".into());
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "touched", "same text: not rewritten");
        console.update(|s| s.setup_code = None);
        assert!(std::fs::read_to_string(&path).unwrap().contains("Signed-in admins"));
        Console::new(None, screen()).update(|s| s.stopped = true);
    }

    #[test]
    fn the_setup_code_is_where_enrolld_was_started() {
        assert_eq!(Launch::from_facts(true, true), Launch::Systemd);
        assert_eq!(Launch::from_facts(false, true), Launch::Terminal);
        assert_eq!(Launch::from_facts(false, false), Launch::Other);
        assert!(Launch::Systemd.setup_code_place(true).contains("serial console, and in its log (journalctl"));
        assert!(!Launch::Systemd.setup_code_place(false).contains("console"));
        assert_eq!(Launch::Terminal.setup_code_place(false), "in the terminal where enrolld was started");
    }
}
