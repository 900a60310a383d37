//! Invite mail templates: minijinja templates for the subject, the plain-text body and the HTML body, with
//! defaults compiled in. Undefined variables are errors, so a template that would not render is refused when it
//! is checked, never at send time.

use std::collections::BTreeMap;

use minijinja::{Environment, UndefinedBehavior, Value};
use time::OffsetDateTime;

use crate::model::{Ownership, Platform};

/// The parts of an invite mail, by template name.
pub const PARTS: [&str; 3] = [SUBJECT, TEXT, HTML];
pub const SUBJECT: &str = "invite.subject.txt";
pub const TEXT: &str = "invite.body.txt";
pub const HTML: &str = "invite.body.html";

const DEFAULTS: [(&str, &str); 3] = [
    (SUBJECT, include_str!("templates/invite.subject.txt")),
    (TEXT, include_str!("templates/invite.body.txt")),
    (HTML, include_str!("templates/invite.body.html")),
];

/// What an invite template can use.
#[derive(Debug, Clone)]
pub struct InviteContext {
    pub user_name: String,
    pub organisation: String,
    /// The enrollment link.
    pub link: String,
    pub passcode: String,
    /// Expiry as people read it: "29 November 2026, 14:05 UTC".
    pub expires: String,
    /// Expiry as RFC 3339, for templates that format it themselves.
    pub expires_at: String,
    /// `ios`, `ipados`, `macos`, `android`, `windows` or `any` (OS-independent).
    pub platform: String,
    /// "iOS", "iPadOS", "macOS", "Android", "Windows" or "any".
    pub platform_name: String,
    /// `personal` or `corporate`.
    pub ownership: String,
    /// The `src` of the QR code image (an inline `cid:` reference).
    pub qr_code: String,
    /// The rendered subject, for the HTML `<title>` (empty while the subject itself renders).
    pub subject: String,
}

impl InviteContext {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        user_name: &str,
        organisation: &str,
        link: String,
        passcode: &str,
        expires_at: OffsetDateTime,
        platform: Platform,
        ownership: Ownership,
        qr_code: &str,
    ) -> InviteContext {
        let at = expires_at.to_offset(time::UtcOffset::UTC);
        let rfc3339 = at.format(&time::format_description::well_known::Rfc3339).unwrap_or_default();
        InviteContext {
            user_name: user_name.to_owned(),
            organisation: organisation.to_owned(),
            link,
            passcode: passcode.to_owned(),
            expires: format!("{} {} {}, {:02}:{:02} UTC", at.day(), at.month(), at.year(), at.hour(), at.minute()),
            expires_at: rfc3339,
            platform: platform.to_string(),
            platform_name: platform_name(platform).to_owned(),
            ownership: ownership.to_string(),
            qr_code: qr_code.to_owned(),
            subject: String::new(),
        }
    }

    fn value(&self) -> Value {
        Value::from_pairs([
            ("user_name", self.user_name.as_str()),
            ("organisation", &self.organisation),
            ("link", &self.link),
            ("passcode", &self.passcode),
            ("expires", &self.expires),
            ("expires_at", &self.expires_at),
            ("platform", &self.platform),
            ("platform_name", &self.platform_name),
            ("ownership", &self.ownership),
            ("qr_code", &self.qr_code),
            ("subject", &self.subject),
        ])
    }

    /// Made-up values for previews and for checking a template before it is saved.
    pub fn sample(platform: Platform) -> InviteContext {
        InviteContext::new(
            "Andrew Example",
            "Example Ltd",
            "https://enroll.local/e/sAmPlE-LiNk-ToKeN".into(),
            "12345678",
            OffsetDateTime::UNIX_EPOCH + time::Duration::days(20_000),
            platform,
            Ownership::Corporate,
            "cid:enroll-qr",
        )
    }
}

/// A platform as messages name it: "iOS", "macOS", … and "any" for an OS-independent invite.
pub fn platform_name(platform: Platform) -> &'static str {
    match platform {
        Platform::Any => "any",
        other => crate::csvfile::platform_text(other),
    }
}

/// A rendered invite mail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendered {
    pub subject: String,
    pub text: String,
    pub html: String,
}

/// Why a template was refused.
#[derive(Debug, thiserror::Error)]
#[error("{part}, line {line}: {reason}")]
pub struct TemplateError {
    pub part: String,
    pub line: usize,
    pub reason: String,
}

impl From<minijinja::Error> for TemplateError {
    fn from(error: minijinja::Error) -> Self {
        TemplateError {
            part: error.name().unwrap_or("template").to_owned(),
            line: error.line().unwrap_or(0),
            reason: error.detail().map_or_else(|| error.kind().to_string(), |d| format!("{}: {d}", error.kind())),
        }
    }
}

/// The invite templates in use: the defaults, with any the admin saved in their place.
#[derive(Debug, Clone)]
pub struct Templates {
    env: Environment<'static>,
}

impl Templates {
    /// The defaults with `overrides` (template name → source) in their place. Each override is checked by
    /// rendering it with sample data for every platform.
    pub fn new(overrides: &BTreeMap<String, String>) -> Result<Templates, TemplateError> {
        let templates = Templates::compile(overrides)?;
        for platform in
            [Platform::Ios, Platform::Ipados, Platform::Macos, Platform::Android, Platform::Windows, Platform::Any]
        {
            // With and without an organisation name, so a branch on it cannot hide an error until send time.
            let sample = InviteContext::sample(platform);
            templates.render(&sample)?;
            templates.render(&InviteContext { organisation: String::new(), ..sample })?;
        }
        Ok(templates)
    }

    /// The templates parsed, not yet rendered.
    fn compile(overrides: &BTreeMap<String, String>) -> Result<Templates, TemplateError> {
        let mut env = Environment::new();
        env.set_undefined_behavior(UndefinedBehavior::Strict);
        for (name, source) in DEFAULTS {
            let source = overrides.get(name).cloned().unwrap_or_else(|| source.to_owned());
            env.add_template_owned(name, source)?;
        }
        if let Some(unknown) = overrides.keys().find(|name| !PARTS.contains(&name.as_str())) {
            return Err(TemplateError {
                part: unknown.clone(),
                line: 0,
                reason: format!("there is no such template; the templates are {}", PARTS.join(", ")),
            });
        }
        Ok(Templates { env })
    }

    /// The built-in defaults, parsed; not rendered with every sample as an admin's templates are, since the tests
    /// do that (it was a twentieth of enrolld's start on a small board).
    pub fn defaults() -> Templates {
        match Templates::compile(&BTreeMap::new()) {
            Ok(templates) => templates,
            // The defaults are compiled in and rendered by the tests; they cannot fail at run time.
            Err(error) => unreachable!("the default templates do not parse: {error}"),
        }
    }

    /// The default source of a template.
    pub fn default_source(name: &str) -> Option<&'static str> {
        DEFAULTS.iter().find(|(n, _)| *n == name).map(|(_, source)| *source)
    }

    pub fn render(&self, context: &InviteContext) -> Result<Rendered, TemplateError> {
        let subject = self.env.get_template(SUBJECT)?.render(context.value())?;
        // A subject is one line; a template that breaks it would make a malformed header.
        let subject = subject.split_whitespace().collect::<Vec<_>>().join(" ");
        let context = InviteContext { subject: subject.clone(), ..context.clone() };
        let context = context.value();
        let text = self.env.get_template(TEXT)?.render(context.clone())?;
        let html = self.env.get_template(HTML)?.render(context)?;
        Ok(Rendered { subject, text, html })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_defaults_render_each_platform_with_its_own_steps() {
        let templates = Templates::defaults();
        let ios = templates.render(&InviteContext::sample(Platform::Ios)).unwrap();
        assert_eq!(ios.subject, "Example Ltd: enroll your iOS device");
        assert!(ios.text.contains("Settings > General > VPN & Device Management"), "{}", ios.text);
        assert!(ios.html.contains("VPN &amp; Device Management"), "{}", ios.html);
        assert!(ios.html.contains(r#"src="cid:enroll-qr""#));
        let mac = templates.render(&InviteContext::sample(Platform::Macos)).unwrap();
        assert!(mac.text.contains("Privacy & Security > Profiles"));
        let android = templates.render(&InviteContext::sample(Platform::Android)).unwrap();
        assert!(android.text.contains("scan the QR code"));
        let windows = templates.render(&InviteContext::sample(Platform::Windows)).unwrap();
        assert!(windows.text.contains("Access work or school"));
        let any = templates.render(&InviteContext::sample(Platform::Any)).unwrap();
        assert!(any.text.contains("the page shows the steps for that device"));
        for mail in [ios, mac, android, windows, any] {
            assert!(mail.text.contains("https://enroll.local/e/sAmPlE-LiNk-ToKeN") && mail.text.contains("12345678"));
        }
    }

    #[test]
    fn the_defaults_pass_the_check_an_admins_templates_get() {
        // defaults() skips it at start; this is where it is made.
        if let Err(error) = Templates::new(&BTreeMap::new()) {
            panic!("the default templates do not render: {error}");
        }
    }

    #[test]
    fn html_escapes_what_users_typed() {
        let mut context = InviteContext::sample(Platform::Ios);
        context.user_name = "<script>alert(1)</script>".into();
        let mail = Templates::defaults().render(&context).unwrap();
        assert!(!mail.html.contains("<script>"));
        assert!(mail.html.contains("&lt;script&gt;"));
    }

    #[test]
    fn a_template_that_would_not_render_is_refused_with_its_line() {
        let overrides = BTreeMap::from([(TEXT.to_owned(), "Hello {{ user_name }}\n{% if %}".to_owned())]);
        let error = Templates::new(&overrides).unwrap_err();
        assert_eq!((error.part.as_str(), error.line), (TEXT, 2), "{error}");

        let overrides = BTreeMap::from([(SUBJECT.to_owned(), "Hi {{ first_name }}".to_owned())]);
        let error = Templates::new(&overrides).unwrap_err();
        assert_eq!((error.part.as_str(), error.line), (SUBJECT, 1), "{error}");
        assert!(error.reason.contains("undefined"), "{error}");

        let hidden = "{% if not organisation %}{{ typo }}{% endif %}Enroll";
        let overrides = BTreeMap::from([(SUBJECT.to_owned(), hidden.to_owned())]);
        assert!(Templates::new(&overrides).unwrap_err().reason.contains("undefined"), "an error behind a branch");

        let overrides = BTreeMap::from([("invite.footer.txt".to_owned(), "x".to_owned())]);
        assert!(Templates::new(&overrides).unwrap_err().reason.contains("no such template"));
    }

    #[test]
    fn a_saved_template_is_used() {
        let overrides = BTreeMap::from([(SUBJECT.to_owned(), "Welcome, {{ user_name }}".to_owned())]);
        let mail = Templates::new(&overrides).unwrap().render(&InviteContext::sample(Platform::Any)).unwrap();
        assert_eq!(mail.subject, "Welcome, Andrew Example");
    }
}
