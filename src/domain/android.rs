//! Android enrollment through the agent (the device-policy app): the agent trades the invite's token and the
//! user's answer for a device secret, in the transaction that enrolls the device; then it checks in with that
//! secret, reports the results of the commands it ran and gets the ones queued since.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::accounts::Credentials;
use super::devices::{CommandFor, same_device};
use super::{
    Actor, DeviceFacts, DomainError, DomainResult, Enrollment, IdentityProblem, LinkProblem, PasscodeCheck, sha256_hex,
};
use crate::model::{AndroidIdentity, Device, Id, Platform};
use crate::store::tree;

/// What the agent tells about its device. Every field is optional; the Android ID and the serial or IMEI let a
/// device that enrolls again be recognised, and a staged record be matched.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AndroidFacts {
    /// `Build.getSerial()` (readable by a device owner).
    pub serial: Option<String>,
    pub imei: Option<String>,
    /// `Build.MANUFACTURER`, such as `Google`.
    pub manufacturer: Option<String>,
    /// `Build.MODEL`, such as `Pixel 8`.
    pub model: Option<String>,
    /// `Build.VERSION.RELEASE`, such as `15`.
    pub os_version: Option<String>,
    /// `Settings.Secure.ANDROID_ID`.
    pub android_id: Option<String>,
    /// The device's name as its user set it.
    pub name: Option<String>,
}

impl AndroidFacts {
    /// Longest value a fact may have.
    pub const MAX_CHARS: usize = 200;

    /// Whether every value is of a sane length.
    pub fn reasonable(&self) -> bool {
        [&self.serial, &self.imei, &self.manufacturer, &self.model, &self.os_version, &self.android_id, &self.name]
            .iter()
            .all(|v| v.as_deref().is_none_or(|v| v.chars().count() <= Self::MAX_CHARS))
    }

    /// The facts as a device record takes them (the model named with its maker, "Google Pixel 8").
    pub fn device_facts(&self) -> DeviceFacts {
        let model = super::devices::maker_and_model(self.manufacturer.as_deref(), self.model.as_deref());
        DeviceFacts {
            platform: Some(Platform::Android),
            name: self.name.clone(),
            model,
            serial: self.serial.clone(),
            imei: self.imei.clone(),
            hardware_id: self.android_id.clone(),
            os_version: self.os_version.clone(),
        }
    }
}

/// Why the agent's enrollment was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AndroidRefusal {
    /// The link does not open (unknown, used, expired, removed, locked).
    Link(LinkProblem),
    /// The invite is for another platform.
    NotAndroid(Platform),
    Wrong {
        attempts_left: u32,
    },
    /// A password is asked for and the user has none yet.
    NoPassword,
}

/// A device enrolled through the agent, and the secret the agent authenticates with from now on.
#[derive(Debug, Clone)]
pub struct AndroidEnrolled {
    pub device: Device,
    /// Shown once, to the agent; only its hash is kept.
    pub secret: String,
}

/// A command's outcome as the agent reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum CommandOutcome {
    /// Done (for `unenroll` and `wipe`: about to be; the agent reports before it removes itself).
    Done,
    /// Could not be done; `detail` says why, and the admin sees it.
    Failed,
    /// Not now (the user postponed it, say); it stays queued.
    NotNow,
}

/// The device-policy app corporate devices are provisioned with (Android Enterprise QR provisioning), as the
/// admin configured it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize, ToSchema)]
pub struct AndroidApp {
    /// The app's device-admin receiver, `package/class` (such as `com.example.dpc/.AdminReceiver`).
    pub component_name: String,
    /// Where devices download the app: HTTPS only (devices refuse anything else).
    pub download_url: String,
    /// Which checksum devices check the download against.
    pub checksum_kind: ChecksumKind,
    /// URL-safe base64 of a SHA-256 (hex, as `apksigner` prints it, is accepted and converted).
    pub checksum: String,
    /// Whether enrolld serves the app itself (uploaded; `download_url` is then the box's own).
    #[serde(default)]
    pub served_here: bool,
    /// A Wi-Fi network for the device to join during provisioning.
    #[serde(default)]
    pub wifi: Option<ProvisioningWifi>,
    /// Where users of personal devices get the agent (a store link), shown on the enrollment page.
    #[serde(default)]
    pub agent_url: Option<String>,
}

/// What the checksum is of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ChecksumKind {
    /// The APK file itself (`PROVISIONING_DEVICE_ADMIN_PACKAGE_CHECKSUM`).
    Package,
    /// The app's signing certificate (`PROVISIONING_DEVICE_ADMIN_SIGNATURE_CHECKSUM`); survives app updates.
    Signature,
}

/// The longest network name IEEE 802.11 allows, in bytes (Android reads the name as UTF-8).
pub const MAX_SSID_BYTES: usize = 32;

/// A Wi-Fi network in the provisioning QR code.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize, ToSchema)]
pub struct ProvisioningWifi {
    /// The network's name: 1 to 32 bytes as UTF-8 (IEEE 802.11), any characters but control characters;
    /// surrounding white space is dropped.
    pub ssid: String,
    /// `NONE`, `WPA` or `WEP`.
    pub security: String,
    #[serde(default)]
    pub password: Option<String>,
    #[serde(default)]
    pub hidden: bool,
}

/// Where the box serves an uploaded device-policy app.
pub const SERVED_APP_PATH: &str = "/android/dpc.apk";

/// Where the admin's Android app settings are kept.
const ANDROID_APP_SETTING: &str = "android.app";

impl AndroidApp {
    /// Checks and normalises the admin's settings; a refusal names the field and says what to do.
    pub fn checked(mut self) -> DomainResult<AndroidApp> {
        let component = self.component_name.trim().to_owned();
        let (package, class) = component.split_once('/').unwrap_or(("", ""));
        let identifier = |text: &str| {
            let mut chars = text.chars();
            chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        };
        let package_ok = package.split('.').count() >= 2 && package.split('.').all(identifier);
        let class_ok = !class.is_empty() && class.trim_start_matches('.').split('.').all(identifier);
        if !package_ok || !class_ok {
            return Err(DomainError::invalid(
                "component_name",
                "give the app's device-admin receiver as package/class, such as com.example.dpc/.AdminReceiver (the app's documentation names it)",
            ));
        }
        self.component_name = component;
        let url = self.download_url.trim();
        if url.to_ascii_lowercase().starts_with("http://") {
            return Err(DomainError::invalid(
                "download_url",
                "Android downloads the app only over HTTPS and refuses a plain-HTTP location; give an https:// URL",
            ));
        }
        if !url.starts_with("https://") || url.parse::<axum::http::Uri>().is_err() || url.contains(char::is_whitespace)
        {
            return Err(DomainError::invalid("download_url", "give the https:// URL devices download the app from"));
        }
        self.download_url = url.to_owned();
        self.checksum = normalise_checksum(&self.checksum).ok_or_else(|| {
            DomainError::invalid(
                "checksum",
                "give the SHA-256 as URL-safe base64 (44 characters) or as 64 hex digits, as apksigner --print-certs shows the signature's",
            )
        })?;
        if let Some(wifi) = &mut self.wifi {
            wifi.ssid = wifi.ssid.trim().to_owned();
            wifi.security = wifi.security.trim().to_ascii_uppercase();
            if wifi.ssid.is_empty() || wifi.ssid.len() > MAX_SSID_BYTES {
                return Err(DomainError::invalid(
                    "wifi_ssid",
                    "give the network's name: at most 32 bytes as UTF-8 (32 letters such as a-z, fewer with accents or other scripts)",
                ));
            }
            super::no_control_characters("wifi_ssid", &wifi.ssid)?;
            if !matches!(wifi.security.as_str(), "NONE" | "WPA" | "WEP") {
                return Err(DomainError::invalid(
                    "wifi_security",
                    "use NONE, WPA or WEP (an EAP network needs settings the QR code does not carry yet; provision over another network)",
                ));
            }
            wifi.password = wifi.password.take().filter(|p| !p.is_empty());
            super::no_control_characters("wifi_password", wifi.password.as_deref().unwrap_or_default())?;
            if wifi.security != "NONE" && wifi.password.is_none() {
                return Err(DomainError::invalid("wifi_password", "this network needs its password"));
            }
        }
        self.agent_url = self.agent_url.take().map(|u| u.trim().to_owned()).filter(|u| !u.is_empty());
        if let Some(agent) = &self.agent_url
            && (!agent.starts_with("https://") || agent.contains(|c: char| c.is_whitespace() || c.is_control()))
        {
            return Err(DomainError::invalid("agent_url", "give an https:// link to the agent app (its store page)"));
        }
        Ok(self)
    }

    /// The JSON an Android device reads from the provisioning QR code: the app, its checksum, the Wi-Fi network,
    /// and for the app (`ADMIN_EXTRAS_BUNDLE`) where and how to enroll: the agent API's URL, the invite's token and
    /// the SHA-256 of the appliance's CA (so the app can trust the box's HTTPS certificate by it).
    pub fn provisioning_payload(&self, public_url: &str, token: &str, ca_sha256: &str) -> serde_json::Value {
        const EXTRA: &str = "android.app.extra.";
        let mut payload = serde_json::Map::new();
        let mut put = |key: &str, value: serde_json::Value| {
            payload.insert(format!("{EXTRA}{key}"), value);
        };
        put("PROVISIONING_DEVICE_ADMIN_COMPONENT_NAME", self.component_name.clone().into());
        // An app the box serves is at the box's current address (the host name may have changed since upload).
        let location =
            if self.served_here { format!("{public_url}{SERVED_APP_PATH}") } else { self.download_url.clone() };
        put("PROVISIONING_DEVICE_ADMIN_PACKAGE_DOWNLOAD_LOCATION", location.into());
        let checksum_key = match self.checksum_kind {
            ChecksumKind::Package => "PROVISIONING_DEVICE_ADMIN_PACKAGE_CHECKSUM",
            ChecksumKind::Signature => "PROVISIONING_DEVICE_ADMIN_SIGNATURE_CHECKSUM",
        };
        put(checksum_key, self.checksum.clone().into());
        if let Some(wifi) = &self.wifi {
            put("PROVISIONING_WIFI_SSID", wifi.ssid.clone().into());
            put("PROVISIONING_WIFI_SECURITY_TYPE", wifi.security.clone().into());
            if let Some(password) = &wifi.password {
                put("PROVISIONING_WIFI_PASSWORD", password.clone().into());
            }
            if wifi.hidden {
                put("PROVISIONING_WIFI_HIDDEN", true.into());
            }
        }
        put(
            "PROVISIONING_ADMIN_EXTRAS_BUNDLE",
            serde_json::json!({
                "enroll_url": format!("{public_url}/android/v1/enroll"),
                "invite_token": token,
                "ca_sha256": ca_sha256,
            }),
        );
        serde_json::Value::Object(payload)
    }
}

/// A SHA-256 as URL-safe base64 with padding (as Android's own examples write it), from URL-safe or standard
/// base64 (padded or not) or from hex (with or without colons).
pub fn normalise_checksum(text: &str) -> Option<String> {
    use base64::Engine as _;
    let text = text.trim();
    let hex: String = text.chars().filter(|c| *c != ':').collect();
    let bytes = if hex.len() == 64 && hex.chars().all(|c| c.is_ascii_hexdigit()) {
        (0..32).map(|i| u8::from_str_radix(&hex[i * 2..i * 2 + 2], 16).ok()).collect::<Option<Vec<u8>>>()?
    } else {
        let unpadded = text.trim_end_matches('=').replace('+', "-").replace('/', "_");
        base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(unpadded).ok()?
    };
    (bytes.len() == 32).then(|| base64::engine::general_purpose::URL_SAFE.encode(bytes))
}

/// The checksum of a file's bytes, as the package checksum.
pub fn package_checksum(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE.encode(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref())
}

impl Enrollment {
    /// The Android app corporate devices are provisioned with, if the admin configured one.
    pub fn android_app(&self) -> DomainResult<Option<AndroidApp>> {
        let saved = self.store.get::<crate::model::Setting>(ANDROID_APP_SETTING.as_bytes())?;
        Ok(saved.and_then(|s| serde_json::from_str(&s.value).ok()))
    }

    /// Checks and saves the Android app settings (or, with `None`, removes them).
    pub fn save_android_app(&self, actor: &Actor, app: Option<AndroidApp>) -> DomainResult<Option<AndroidApp>> {
        match app {
            Some(app) => {
                let app = app.checked()?;
                let json =
                    serde_json::to_string(&app).map_err(|e| DomainError::invalid("android_app", e.to_string()))?;
                self.save_setting(actor, ANDROID_APP_SETTING, &json)?;
                Ok(Some(app))
            }
            None => {
                self.reset_setting(actor, ANDROID_APP_SETTING)?;
                Ok(None)
            }
        }
    }

    /// Enrolls the agent's device with an invite's token and the user's answer (passcode, password or both, as the
    /// admin chose). Wrong answers count toward the invite's lock as on the enrollment page. The invite is used,
    /// the device recorded (a known device updated, a staged one matched) and its secret stored in one transaction.
    pub fn android_enroll(
        &self,
        actor: &Actor,
        token: &str,
        credentials: Credentials<'_>,
        facts: &AndroidFacts,
    ) -> DomainResult<Result<AndroidEnrolled, AndroidRefusal>> {
        let invite = match self.open_link(token)? {
            Ok(invite) => invite,
            Err(problem) => return Ok(Err(AndroidRefusal::Link(problem))),
        };
        if !matches!(invite.platform, Platform::Android | Platform::Any) {
            return Ok(Err(AndroidRefusal::NotAndroid(invite.platform)));
        }
        match self.check_credentials(actor, &invite.id, credentials)? {
            PasscodeCheck::Correct => {}
            PasscodeCheck::Wrong { attempts_left } => return Ok(Err(AndroidRefusal::Wrong { attempts_left })),
            PasscodeCheck::Locked => return Ok(Err(AndroidRefusal::Link(LinkProblem::Locked))),
            PasscodeCheck::NoPassword => return Ok(Err(AndroidRefusal::NoPassword)),
        }
        let secret = {
            use base64::Engine as _;
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(super::random_bytes::<32>())
        };
        let secret_hash = sha256_hex(secret.as_bytes());
        let waiting = self.store.keys_under(tree::OUTBOX_BY_INVITE, invite.id.as_bytes())?;
        let ids = [self.new_id(), self.new_id()];
        let now = self.now();
        let device = self.transact(|tx| {
            let enrolled = self.enroll_in(tx, actor, &invite.id, &facts.device_facts(), ids, &waiting)?;
            let mut device = enrolled.clone();
            device.identity = Some(secret_hash.clone());
            tx.put(Some(&enrolled), &device)?;
            let identity = AndroidIdentity {
                secret_hash: secret_hash.clone(),
                invite_id: invite.id,
                device_id: device.id,
                issued_at: now,
            };
            tx.put(None, &identity)?;
            Ok(device)
        })?;
        Ok(Ok(AndroidEnrolled { device, secret }))
    }

    /// The device behind an agent's secret, if the secret is the one it is managed under now.
    pub fn android_device(&self, secret: &str) -> DomainResult<Result<Device, IdentityProblem>> {
        let Some(identity) = self.store.get::<AndroidIdentity>(sha256_hex(secret.as_bytes()).as_bytes())? else {
            return Ok(Err(IdentityProblem::Unknown));
        };
        self.managed_under(&identity.device_id, &identity.secret_hash)
    }

    /// A check-in: the results of commands the agent ran (results for commands queued nowhere, such as ones
    /// answered already, are ignored), the facts it sent, and the last-contact time. Returns the device as it now
    /// is, with what is still queued. A check-in that speaks for another device (a result for a command queued for
    /// another device, or an Android ID, serial or IMEI other than the ones on record) is refused before anything
    /// is written, and audited.
    pub fn android_checkin(
        &self,
        actor: &Actor,
        device_id: &Id,
        results: &[(Id, CommandOutcome, String)],
        facts: Option<&AndroidFacts>,
    ) -> DomainResult<Result<Device, IdentityProblem>> {
        let device = self.device(device_id)?;
        let refuse = |what: String| -> DomainResult<Result<Device, IdentityProblem>> {
            Ok(Err(self.refuse_other_device(actor, Some(device_id), "", &what)?))
        };
        if let Some(facts) = facts {
            for (name, recorded, sent) in [
                ("Android ID", &device.hardware_id, &facts.android_id),
                ("serial", &device.serial, &facts.serial),
                ("IMEI", &device.imei, &facts.imei),
            ] {
                if !same_device(recorded.as_deref(), sent.as_deref()) {
                    let (recorded, sent) = (recorded.as_deref().unwrap_or(""), sent.as_deref().unwrap_or(""));
                    return refuse(format!("a check-in with the secret of {name} {recorded} named {name} {sent}"));
                }
            }
        }
        let mut queued = Vec::new();
        for (command, outcome, detail) in results {
            match self.command_for(&device, command)? {
                CommandFor::Queued(_) => queued.push((command, outcome, detail)),
                CommandFor::Nobody => {}
                CommandFor::OtherDevice => {
                    return refuse(format!("a result for command {command}, which is queued for another device"));
                }
            }
        }
        for (command, outcome, detail) in queued {
            let done = match outcome {
                CommandOutcome::Done => true,
                CommandOutcome::Failed => false,
                CommandOutcome::NotNow => continue,
            };
            match self.command_finished(actor, device_id, command, done, detail) {
                Ok(_) | Err(DomainError::NotFound { .. }) => {}
                Err(error) => return Err(error),
            }
        }
        let reported = facts.is_some_and(|f| *f != AndroidFacts::default());
        let facts = facts.map(AndroidFacts::device_facts).unwrap_or_default();
        let device = self.device_checked_in(device_id, &facts)?;
        if reported {
            self.facts_arrived(actor, device, "facts sent with the check-in").map(Ok)
        } else {
            Ok(Ok(device))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{admin, domain};
    use super::super::{DeprovisionKind, NewInvite, NewUser};
    use super::*;
    use crate::model::{Channels, CommandKind, DeviceStatus, InviteStatus, Ownership};

    fn invite(d: &Enrollment, ownership: Ownership, platform: Platform) -> (Id, String, String) {
        let user = match d.user_by_email("ann@example.com").unwrap() {
            Some(user) => user,
            None => d
                .create_user(
                    &admin(),
                    &NewUser { name: "Ann".into(), email: "ann@example.com".into(), ..Default::default() },
                )
                .unwrap(),
        };
        let new = NewInvite { user_id: user.id, platform, ownership, group_id: None, channels: Channels::Email };
        let created = d.create_invite_by_myself(&admin(), &new).unwrap();
        (created.invite.id, created.link_token.unwrap(), created.passcode.unwrap())
    }

    fn pixel() -> AndroidFacts {
        AndroidFacts {
            serial: Some("R5CT1234".into()),
            manufacturer: Some("Google".into()),
            model: Some("Pixel 8".into()),
            os_version: Some("15".into()),
            android_id: Some("9774d56d682e549c".into()),
            ..Default::default()
        }
    }

    fn answer(passcode: &str) -> Credentials<'_> {
        Credentials { passcode: Some(passcode), password: None }
    }

    fn app() -> AndroidApp {
        AndroidApp {
            component_name: " com.example.dpc/.AdminReceiver ".into(),
            download_url: "https://apps.example.com/dpc.apk".into(),
            checksum_kind: ChecksumKind::Signature,
            checksum: "80:90:f6:63:0b:4e:89:62:47:91:23:24:90:87:cb:46:58:fe:aa:e3:6a:1b:57:db:ea:fd:74:d1:09:b3:33:dc"
                .into(),
            served_here: false,
            wifi: Some(ProvisioningWifi {
                ssid: "Office".into(),
                security: "wpa".into(),
                password: Some("correct horse".into()),
                hidden: false,
            }),
            agent_url: None,
        }
    }

    #[test]
    fn the_provisioning_payload_carries_the_app_the_network_and_the_invite() {
        let (d, _) = domain();
        let saved = d.save_android_app(&admin(), Some(app())).unwrap().unwrap();
        assert_eq!(saved.component_name, "com.example.dpc/.AdminReceiver");
        // Android's own example, ManagedProvisioning's README, gives this checksum for the same digest.
        assert_eq!(saved.checksum, "gJD2YwtOiWJHkSMkkIfLRlj-quNqG1fb6v100QmzM9w=");
        assert_eq!(d.android_app().unwrap(), Some(saved.clone()));
        let payload = saved.provisioning_payload("https://enroll.local", "TOKEN", "ab12");
        let extra = |key: &str| payload[format!("android.app.extra.{key}")].clone();
        assert_eq!(
            extra("PROVISIONING_DEVICE_ADMIN_SIGNATURE_CHECKSUM"),
            "gJD2YwtOiWJHkSMkkIfLRlj-quNqG1fb6v100QmzM9w="
        );
        assert_eq!(extra("PROVISIONING_WIFI_SECURITY_TYPE"), "WPA");
        assert_eq!(extra("PROVISIONING_ADMIN_EXTRAS_BUNDLE")["invite_token"], "TOKEN");
        assert_eq!(extra("PROVISIONING_ADMIN_EXTRAS_BUNDLE")["enroll_url"], "https://enroll.local/android/v1/enroll");
        assert!(payload.get("android.app.extra.PROVISIONING_DEVICE_ADMIN_PACKAGE_CHECKSUM").is_none());

        let refused = |app: AndroidApp| match d.save_android_app(&admin(), Some(app)) {
            Err(DomainError::Invalid { field, message }) => (field, message),
            other => panic!("{other:?}"),
        };
        let plain = refused(AndroidApp { download_url: "http://apps.example.com/dpc.apk".into(), ..app() });
        assert!(plain.0 == "download_url" && plain.1.contains("refuses a plain-HTTP location"), "{plain:?}");
        assert_eq!(refused(AndroidApp { component_name: "com.example.dpc".into(), ..app() }).0, "component_name");
        assert_eq!(refused(AndroidApp { checksum: "abc".into(), ..app() }).0, "checksum");
        // A network's name is at most 32 bytes, not characters, and holds no control characters.
        let wifi = |ssid: &str| AndroidApp {
            wifi: Some(ProvisioningWifi { ssid: ssid.into(), ..app().wifi.unwrap() }),
            ..app()
        };
        let saved_ssid =
            |ssid: &str| d.save_android_app(&admin(), Some(wifi(ssid))).unwrap().unwrap().wifi.unwrap().ssid;
        assert_eq!(saved_ssid(" Café Zürich "), "Café Zürich");
        assert_eq!(saved_ssid(&"ø".repeat(16)), "ø".repeat(16), "32 bytes");
        assert_eq!(saved_ssid(&"x".repeat(32)), "x".repeat(32));
        assert_eq!(refused(wifi(&"ø".repeat(17))).0, "wifi_ssid", "34 bytes in 17 characters");
        assert_eq!(refused(wifi("   ")).0, "wifi_ssid");
        let control = refused(wifi("×ø\u{9b}"));
        assert!(control.0 == "wifi_ssid" && control.1.contains("U+009B"), "{control:?}");
        let password = |password: &str| AndroidApp {
            wifi: Some(ProvisioningWifi { password: Some(password.into()), ..app().wifi.unwrap() }),
            ..app()
        };
        assert_eq!(refused(password("correct\0horse")).0, "wifi_password");
        let agent = |url: &str| AndroidApp { agent_url: Some(url.into()), ..app() };
        assert_eq!(refused(agent("https://play.example.com/age\u{7}nt")).0, "agent_url");
        assert_eq!(refused(agent("https://play.example.com/a gent")).0, "agent_url");
        assert_eq!(d.android_app().unwrap().unwrap().download_url, "https://apps.example.com/dpc.apk", "kept");
        assert_eq!(normalise_checksum("gJD2YwtOiWJHkSMkkIfLRlj+quNqG1fb6v100QmzM9w"), Some(saved.checksum));
    }

    #[test]
    fn the_agent_enrolls_checks_in_and_is_unenrolled() {
        let (d, _) = domain();
        let device_actor = Actor::device(None);
        let (invite_id, token, passcode) = invite(&d, Ownership::Corporate, Platform::Android);
        let refused = d.android_enroll(&device_actor, &token, answer("00000000"), &pixel()).unwrap();
        assert_eq!(refused.unwrap_err(), AndroidRefusal::Wrong { attempts_left: 4 });
        let enrolled = d.android_enroll(&device_actor, &token, answer(&passcode), &pixel()).unwrap().unwrap();
        let device = &enrolled.device;
        assert_eq!((device.platform, device.status), (Platform::Android, DeviceStatus::Enrolled));
        assert_eq!(device.model.as_deref(), Some("Google Pixel 8"));
        assert_eq!(d.invite(&invite_id).unwrap().status, InviteStatus::Enrolled);
        let again = d.android_enroll(&device_actor, &token, answer(&passcode), &pixel()).unwrap();
        assert_eq!(again.unwrap_err(), AndroidRefusal::Link(LinkProblem::Used), "a token enrolls once");

        let found = d.android_device(&enrolled.secret).unwrap().unwrap();
        assert_eq!(found.id, device.id);
        assert_eq!(d.android_device("not the secret").unwrap().unwrap_err(), IdentityProblem::Unknown);
        let info = found.pending_commands[0].clone();
        assert_eq!(info.kind, CommandKind::DeviceInformation);
        let checked = d.android_checkin(&device_actor, &device.id, &[], Some(&pixel())).unwrap().unwrap();
        assert!(checked.pending_commands.is_empty(), "the facts answer the request for them");

        d.deprovision_device(&admin(), &device.id, DeprovisionKind::RevokeMdm).unwrap();
        let queued = d.android_device(&enrolled.secret).unwrap().unwrap().pending_commands;
        assert_eq!(queued[0].kind, CommandKind::RevokeMdm);
        let later = d.android_checkin(
            &device_actor,
            &device.id,
            &[(queued[0].id, CommandOutcome::NotNow, String::new())],
            None,
        );
        assert_eq!(later.unwrap().unwrap().pending_commands.len(), 1, "not now keeps it queued");
        let results = [(queued[0].id, CommandOutcome::Done, "work profile removed".to_owned())];
        let done = d.android_checkin(&device_actor, &device.id, &results, None).unwrap().unwrap();
        assert_eq!(done.status, DeviceStatus::Unmanaged);
        assert_eq!(d.android_device(&enrolled.secret).unwrap().unwrap_err(), IdentityProblem::Unmanaged);
    }

    #[test]
    fn enrolling_again_shuts_out_the_old_secret_and_other_platforms_are_refused() {
        let (d, _) = domain();
        let device_actor = Actor::device(None);
        let (_, token, passcode) = invite(&d, Ownership::Personal, Platform::Any);
        let first = d.android_enroll(&device_actor, &token, answer(&passcode), &pixel()).unwrap().unwrap();
        let (_, token, passcode) = invite(&d, Ownership::Personal, Platform::Android);
        let second = d.android_enroll(&device_actor, &token, answer(&passcode), &pixel()).unwrap().unwrap();
        assert_eq!(second.device.id, first.device.id, "the Android ID names the same device");
        assert_eq!(d.android_device(&first.secret).unwrap().unwrap_err(), IdentityProblem::Superseded);
        assert!(d.android_device(&second.secret).unwrap().is_ok());

        let (_, token, passcode) = invite(&d, Ownership::Personal, Platform::Ios);
        let refused = d.android_enroll(&device_actor, &token, answer(&passcode), &pixel()).unwrap();
        assert_eq!(refused.unwrap_err(), AndroidRefusal::NotAndroid(Platform::Ios));
    }
}
