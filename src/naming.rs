//! The appliance's names as an admin may change them while it runs: the organisation's name (shown on pages, in
//! mails and in profiles) and the host name (the `.local` name, the HTTPS certificate's names and, unless
//! `public_url` is set, the base of every link). One `Naming` handle is shared; the certificate keeper and the
//! mDNS announcer follow its changes.

use std::sync::Arc;

use tokio::sync::watch;

/// The longest organisation name accepted (it ends up in certificate subjects and profile names).
const ORGANISATION_MAX: usize = 100;

/// The two names, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Names {
    /// May be empty: pages and mails then leave it out.
    pub organisation: String,
    /// One DNS label, lower case, without `.local`.
    pub hostname: String,
}

/// Why a name was refused, and which one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct NameError {
    /// `organisation` or `hostname`.
    pub field: &'static str,
    pub reason: String,
}

impl Names {
    /// Checks and normalises what an admin typed: the organisation trimmed, at most 100 characters, no control
    /// characters; the host name one DNS label (compared and stored lower case).
    pub fn checked(organisation: &str, hostname: &str) -> Result<Names, NameError> {
        let organisation = organisation.trim();
        if organisation.chars().count() > ORGANISATION_MAX || organisation.chars().any(char::is_control) {
            return Err(NameError {
                field: "organisation",
                reason: format!("use at most {ORGANISATION_MAX} characters on one line"),
            });
        }
        let hostname = hostname.trim().to_ascii_lowercase();
        crate::config::validate_hostname(&hostname).map_err(|reason| NameError { field: "hostname", reason })?;
        Ok(Names { organisation: organisation.to_owned(), hostname })
    }

    /// The name the box announces over mDNS.
    pub fn mdns_name(&self) -> String {
        format!("{}.local", self.hostname)
    }
}

/// The names in use, swapped in place when an admin saves new ones; cheap to clone.
#[derive(Clone, Debug)]
pub struct Naming {
    names: Arc<watch::Sender<Names>>,
    /// `public_url` from the configuration: links use it whatever the host name.
    configured_url: Option<Arc<str>>,
    /// The port HTTPS listens on, for links built from the host name.
    https_port: Option<u16>,
}

impl Naming {
    pub fn new(names: Names, configured_url: Option<String>, https_port: Option<u16>) -> Naming {
        Naming {
            names: Arc::new(watch::Sender::new(names)),
            configured_url: configured_url.map(Into::into),
            https_port,
        }
    }

    /// `enroll`, no organisation, links to `https://enroll.local`: for an API built without the daemon (tests).
    pub fn fixed() -> Naming {
        Naming::new(Names { organisation: String::new(), hostname: "enroll".into() }, None, None)
    }

    pub fn names(&self) -> Names {
        self.names.borrow().clone()
    }

    pub fn organisation(&self) -> String {
        self.names.borrow().organisation.clone()
    }

    pub fn hostname(&self) -> String {
        self.names.borrow().hostname.clone()
    }

    /// Whether links come from `public_url` in the configuration (so the host name does not change them).
    pub fn url_is_configured(&self) -> bool {
        self.configured_url.is_some()
    }

    /// The base of enrollment links: `public_url` if configured, else the `.local` name with the HTTPS port
    /// (left out when it is 443).
    pub fn public_url(&self) -> String {
        if let Some(url) = &self.configured_url {
            return url.to_string();
        }
        let host = self.names.borrow().mdns_name();
        match self.https_port {
            Some(443) | None => format!("https://{host}"),
            Some(port) => format!("https://{host}:{port}"),
        }
    }

    /// Uses `names` from now on; the keeper and the announcer are told.
    pub fn set(&self, names: Names) {
        self.names.send_if_modified(|current| {
            let changed = *current != names;
            *current = names;
            changed
        });
    }

    /// A receiver that wakes on every change.
    pub fn subscribe(&self) -> watch::Receiver<Names> {
        self.names.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked_and_links_follow_the_host_name() {
        let names = Names::checked("  Example Ltd ", "Front-Desk").unwrap();
        assert_eq!(names, Names { organisation: "Example Ltd".into(), hostname: "front-desk".into() });
        assert_eq!(Names::checked("", "enroll.local").unwrap_err().field, "hostname");
        assert_eq!(Names::checked("", "-x").unwrap_err().field, "hostname");
        assert_eq!(Names::checked("Two\nlines", "enroll").unwrap_err().field, "organisation");
        assert_eq!(Names::checked(&"x".repeat(101), "enroll").unwrap_err().field, "organisation");

        let naming = Naming::new(Names::checked("", "enroll").unwrap(), None, Some(8443));
        let changes = naming.subscribe();
        assert_eq!(naming.public_url(), "https://enroll.local:8443");
        naming.set(Names::checked("", "enroll").unwrap());
        assert!(!changes.has_changed().unwrap(), "saving the same names wakes nobody");
        naming.set(names);
        assert!(changes.has_changed().unwrap());
        assert_eq!(naming.public_url(), "https://front-desk.local:8443");
        let fixed = Naming::new(Names::checked("", "enroll").unwrap(), Some("https://mdm.example.com".into()), None);
        assert_eq!(fixed.public_url(), "https://mdm.example.com");
    }
}
