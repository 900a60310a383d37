//! A real headless Chromium, driven through chromedriver's W3C WebDriver protocol (plain HTTP on loopback; the few
//! commands the admin tests need). The browser trusts exactly the appliance's CA: it is added to an NSS database
//! in a throw-away home directory, as an admin would add it on their desktop, and `enroll.local` is mapped to
//! loopback. Screenshots go to `target/browser-screenshots/<test>/` for a person to look at.

use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};

use crate::common::free_port;

/// WebDriver's key for an element reference.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

pub struct Browser {
    driver: Child,
    port: u16,
    session: String,
    _home: tempfile::TempDir,
    shots: PathBuf,
    shot: std::cell::Cell<u32>,
}

impl Drop for Browser {
    /// Chromium outlives chromedriver unless told otherwise: the whole process group goes (also when a test failed
    /// half-way).
    fn drop(&mut self) {
        let group = nix::unistd::Pid::from_raw(self.driver.id() as i32);
        let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL);
        let _ = self.driver.wait();
        // Chromium starts its helpers in groups of their own; they are found by this session's profile directory.
        let profile = self._home.path().join("profile").display().to_string();
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else { continue };
            let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
            if String::from_utf8_lossy(&cmdline).contains(&profile) {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
            }
        }
    }
}

impl Browser {
    /// Starts chromedriver and a headless Chromium session that trusts `ca_pem` and resolves `enroll.local` to
    /// loopback. `test` names the screenshot folder.
    pub async fn start(ca_pem: &str, test: &str) -> Browser {
        let home = tempfile::tempdir().unwrap();
        let nssdb = home.path().join(".pki/nssdb");
        std::fs::create_dir_all(&nssdb).unwrap();
        let ca_file = home.path().join("enrolld-ca.pem");
        std::fs::write(&ca_file, ca_pem).unwrap();
        let db = format!("sql:{}", nssdb.display());
        let run = |args: &[&str]| {
            let status = Command::new("certutil")
                .args(args)
                .status()
                .expect("certutil (libnss3-tools) is installed by tests/run");
            assert!(status.success(), "certutil {args:?}");
        };
        run(&["-d", &db, "-N", "--empty-password"]);
        run(&["-d", &db, "-A", "-t", "C,,", "-n", "enrolld appliance CA", "-i", ca_file.to_str().unwrap()]);

        let port = free_port();
        let driver = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            // Its own process group, so the browsers it starts are stopped with it.
            .process_group(0)
            .env("HOME", home.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver (chromium-driver) is installed by tests/run");
        let shots = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/browser-screenshots").join(test);
        let _ = std::fs::remove_dir_all(&shots);
        std::fs::create_dir_all(&shots).unwrap();
        let mut browser =
            Browser { driver, port, session: String::new(), _home: home, shots, shot: std::cell::Cell::new(0) };
        let deadline = Instant::now() + Duration::from_secs(20);
        while browser.raw("GET", "/status", None).await.is_none() {
            assert!(Instant::now() < deadline, "chromedriver did not start");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let profile = browser._home.path().join("profile");
        let capabilities = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {"args": [
                "--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--host-resolver-rules=MAP *.local 127.0.0.1",
                "--window-size=1280,1000", "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--disable-default-apps",
                format!("--user-data-dir={}", profile.display()),
            ]}
        }}});
        let created = browser.raw("POST", "/session", Some(capabilities)).await.expect("a browser session");
        browser.session = created["value"]["sessionId"].as_str().expect("a session id").to_owned();
        browser
    }

    async fn raw(&self, method: &str, path: &str, body: Option<Value>) -> Option<Value> {
        let stream = tokio::net::TcpStream::connect(("127.0.0.1", self.port)).await.ok()?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.ok()?;
        tokio::spawn(connection);
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let request = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header("host", format!("127.0.0.1:{}", self.port))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))
            .ok()?;
        let response = sender.send_request(request).await.ok()?;
        let bytes = response.into_body().collect().await.ok()?.to_bytes();
        serde_json::from_slice(&bytes).ok()
    }

    /// A session command; panics with WebDriver's error message if it fails.
    async fn call(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let path = format!("/session/{}{path}", self.session);
        let answer = self.raw(method, &path, body).await.unwrap_or_else(|| panic!("{method} {path}: no answer"));
        if let Some(error) = answer["value"]["error"].as_str() {
            panic!("{method} {path}: {error}: {}", answer["value"]["message"]);
        }
        answer["value"].clone()
    }

    pub async fn goto(&self, url: &str) {
        self.call("POST", "/url", Some(json!({ "url": url }))).await;
    }

    pub async fn url(&self) -> String {
        self.call("GET", "/url", None).await.as_str().unwrap_or_default().to_owned()
    }

    pub async fn source(&self) -> String {
        self.call("GET", "/source", None).await.as_str().unwrap_or_default().to_owned()
    }

    async fn element(&self, css: &str) -> String {
        let found = self.call("POST", "/element", Some(json!({"using": "css selector", "value": css}))).await;
        found[ELEMENT].as_str().unwrap_or_else(|| panic!("no element {css}: {found}")).to_owned()
    }

    /// Types into the field `css` (replacing what it held).
    pub async fn fill(&self, css: &str, text: &str) {
        let id = self.element(css).await;
        self.call("POST", &format!("/element/{id}/clear"), Some(json!({}))).await;
        self.call("POST", &format!("/element/{id}/value"), Some(json!({ "text": text }))).await;
    }

    /// Picks a file for an `<input type=file>`.
    pub async fn attach(&self, css: &str, path: &Path) {
        let id = self.element(css).await;
        self.call("POST", &format!("/element/{id}/value"), Some(json!({ "text": path.display().to_string() }))).await;
    }

    /// Chooses `value` in the `<select>` `css`.
    pub async fn select(&self, css: &str, value: &str) {
        let set = "const s = document.querySelector(arguments[0]); s.value = arguments[1]; return s.value";
        let chosen = self.script(set, vec![json!(css), json!(value)]).await;
        assert_eq!(chosen.as_str(), Some(value), "{css} has no option {value}");
    }

    pub async fn click(&self, css: &str) {
        let id = self.element(css).await;
        self.call("POST", &format!("/element/{id}/click"), Some(json!({}))).await;
    }

    pub async fn script(&self, script: &str, args: Vec<Value>) -> Value {
        self.call("POST", "/execute/sync", Some(json!({"script": script, "args": args}))).await
    }

    /// Resizes the window (a phone-sized screen, say).
    pub async fn resize(&self, width: u32, height: u32) {
        self.call("POST", "/window/rect", Some(json!({"width": width, "height": height}))).await;
    }

    /// The browser's cookies, HttpOnly ones included.
    pub async fn cookies(&self) -> Vec<Value> {
        self.call("GET", "/cookie", None).await.as_array().cloned().unwrap_or_default()
    }

    /// Every resource the current page loaded (stylesheets, images, …), as URLs.
    pub async fn loaded(&self) -> Vec<String> {
        let entries = self.script("return performance.getEntriesByType('resource').map(e => e.name)", Vec::new()).await;
        entries.as_array().unwrap_or(&Vec::new()).iter().filter_map(|e| e.as_str().map(str::to_owned)).collect()
    }

    /// Saves a screenshot of the page as `NN-name.png`.
    pub async fn screenshot(&self, name: &str) {
        let png = self.call("GET", "/screenshot", None).await;
        let png = base64::engine::general_purpose::STANDARD.decode(png.as_str().unwrap_or_default()).unwrap();
        let n = self.shot.get() + 1;
        self.shot.set(n);
        std::fs::write(self.shots.join(format!("{n:02}-{name}.png")), png).unwrap();
    }

    /// Waits until the page's source contains `text` (reloading pages that refresh themselves).
    pub async fn wait_for_text(&self, text: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let source = self.source().await;
            if source.contains(text) {
                return source;
            }
            assert!(Instant::now() < deadline, "{text:?} never appeared in:\n{source}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}
