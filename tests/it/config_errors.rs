//! Start-up refusals: each bad configuration, a port in use and an unusable or busy state directory ends `serve`
//! with exit code 2 and one line that names the culprit and the fix.

use std::net::TcpListener;

use crate::common::{Daemon, free_port, run, stderr};

/// Runs `serve` with loopback ports and mDNS off plus `args`, expecting exit code 2; returns stderr.
fn refused(args: &[&str], env: &[(&str, &str)]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let https = format!("127.0.0.1:{}", free_port());
    let http = format!("127.0.0.1:{}", free_port());
    let state_arg = state.to_str().unwrap().to_owned();
    let mut all = vec!["serve", "--no-mdns"];
    for (flag, default) in [("--https-listen", &https), ("--http-listen", &http), ("--state-dir", &state_arg)] {
        if !args.contains(&flag) {
            all.extend([flag, default.as_str()]);
        }
    }
    all.extend_from_slice(args);
    let out = run(&all, env);
    let message = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{args:?} {env:?}: {message}");
    let last = message.lines().last().unwrap_or_default().to_owned();
    assert!(last.starts_with("enrolld: "), "ends with one line of advice: {message}");
    last
}

#[test]
fn unknown_key_in_the_config_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("enrolld.toml");
    std::fs::write(&file, "# appliance\nhostname = \"enroll\"\nhttps_port = 443\n").unwrap();
    let line = refused(&["--config", file.to_str().unwrap()], &[]);
    assert!(line.contains("unknown key `https_port`") && line.contains("line 3"), "{line}");
    assert!(line.contains("https_listen"), "lists the known keys: {line}");
}

#[test]
fn missing_config_file() {
    let line = refused(&["--config", "/nonexistent/enrolld.toml"], &[]);
    assert!(line.contains("cannot read config file /nonexistent/enrolld.toml"), "{line}");
}

#[test]
fn bad_values_from_each_layer() {
    let line = refused(&["--https-listen", "localhost:https"], &[]);
    assert!(line.contains("`https_listen` from --https-listen") && line.contains("such as [::]:8443"), "{line}");
    let line = refused(&[], &[("ENROLLD_MDNS", "sometimes")]);
    assert!(line.contains("`mdns` from environment variable ENROLLD_MDNS: expected true or false"), "{line}");
    let line = refused(&["--hostname", "enroll.local"], &[]);
    assert!(line.contains("without .local"), "{line}");
    let line = refused(&[], &[("ENROLLD_HTTPS_LISTN", "[::]:443")]);
    assert!(line.contains("unknown key `ENROLLD_HTTPS_LISTN`"), "{line}");
    let line = refused(&["--tls-cert", "/etc/hostname"], &[]);
    assert!(line.contains("tls_key is not"), "{line}");
}

#[test]
fn port_in_use() {
    let holder = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = holder.local_addr().unwrap();
    let line = refused(&["--https-listen", &addr.to_string()], &[]);
    assert!(line.contains(&format!("port {} is already in use", addr.port())), "{line}");
    assert!(line.contains("--https-listen"), "{line}");
}

#[test]
fn unusable_state_directory() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("not-a-dir");
    std::fs::write(&file, "x").unwrap();
    let line = refused(&["--state-dir", file.to_str().unwrap()], &[]);
    assert!(line.contains(&format!("state directory {} cannot be used", file.display())), "{line}");
    assert!(line.contains("not a directory") && line.contains("--state-dir"), "{line}");

    // Below a regular file nothing can be created, whoever runs the test (root included).
    let below = file.join("state");
    let line = refused(&["--state-dir", below.to_str().unwrap()], &[]);
    assert!(line.contains("cannot create it"), "{line}");
}

#[test]
fn state_directory_held_by_a_running_enrolld() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let first = Daemon::start(&state, &[]);
    let line = refused(&["--state-dir", state.to_str().unwrap()], &[]);
    assert!(line.contains("in use by another running enrolld"), "{line}");
    assert!(line.contains(&format!("(pid {})", first.pid())), "{line}");
    assert_eq!(first.terminate().0.code(), Some(0), "the first one is unharmed");
}
