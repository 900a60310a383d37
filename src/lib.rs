//! enrolld: an on-premises device-enrollment appliance. Admins invite users; devices enroll over HTTPS with
//! certificates from the box's own CA; the box is found on the LAN over mDNS.
//!
//! `main` parses the command line and calls [`daemon::run`]; everything else lives in this library. See
//! `ARCHITECTURE.md` for the map of modules.

#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::panic))]

pub mod addrs;
pub mod backup;
pub mod clock;
pub mod config;
pub mod console;
pub mod control;
pub mod csvfile;
pub mod daemon;
pub mod domain;
pub mod healthcheck;
pub mod http;
pub mod mail;
pub mod mdns;
pub mod model;
pub mod naming;
pub mod open_files;
pub mod pki;
pub mod push;
pub mod state_dir;
pub mod store;
pub mod tls;
pub mod upgrade;

pub use daemon::{DaemonError, Environment, Listeners, Outcome, run};
