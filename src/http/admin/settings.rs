//! The Settings page: the appliance's names, how users authenticate, invite rules, the push certificate (PEM or
//! `.p12`), the mail relay and its test mail, the SMS gateway, the HTTPS certificate (a new one now, or the
//! admin's own), and a backup to download.

use axum::Router;
use axum::extract::{Multipart, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use minijinja::Value;

use super::forms::{fields_map, options, read_form};
use super::{Admin, Posted, SignedIn, blocking, failure, message, render};
use crate::config::{SmsGateway, SmtpSecurity};
use crate::http::AppState;
use crate::model::EnrollAuth;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/admin/settings", get(settings).post(save_settings))
        .route("/admin/setup/appliance", get(setup_appliance_page).post(setup_appliance))
        .route("/admin/setup/mail", get(setup_mail))
        .route("/admin/settings/names", post(save_names))
        .route("/admin/settings/test-mail", post(test_mail))
        .route("/admin/settings/relay", post(save_relay))
        .route("/admin/settings/sms", post(save_sms))
        .route("/admin/settings/policy", post(save_policy))
        .route("/admin/settings/android", post(save_android).layer(axum::extract::DefaultBodyLimit::disable()))
        .route("/admin/settings/android/remove", post(remove_android))
        .route("/admin/settings/renew-tls", post(renew_tls))
        .route("/admin/settings/tls", post(install_tls))
        .route("/admin/settings/tls/remove", post(remove_tls))
        .route("/admin/settings/push-p12", post(upload_p12))
        .route("/admin/settings/backup", post(download_backup))
}

pub(super) async fn settings_page(state: &AppState, admin: &Admin, status: StatusCode, extra: Value) -> Response {
    let domain = state.enrollment.clone();
    let gathered = blocking(move || {
        Ok((domain.enroll_auth()?, domain.push_certificate()?, domain.android_app()?, domain.last_backup()?))
    })
    .await;
    let (auth, push, android, last_backup) = match gathered {
        Ok(gathered) => gathered,
        Err(error) => return failure(state, admin, error),
    };
    let relay = relay_text(state);
    let policy = state.enrollment.policy();
    let tls = state.mdm.serving_info().map(|info| {
        minijinja::context! { serial => info.serial, not_after => info.not_after.date().to_string(), names => info.names.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ") }
    });
    let values = minijinja::context! {
        title => "Settings",
        tls => tls,
        tls_self_issued => state.tls_renewer.self_issued(),
        tls_own => state.tls_renewer.own_in_use(),
        validity_days => policy.invite_validity.whole_days(),
        confirmation_to => policy.confirmation_to.join("\n"),
        confirmation_to_user => policy.confirmation_to_user,
        auth => auth.as_str(),
        auths => options(EnrollAuth::ALL),
        push => push.map(|p| minijinja::context! { topic => p.topic, not_after => p.not_after.date().to_string(), uploaded_by => p.uploaded_by }),
        relay => relay,
        public_url => state.naming.public_url(),
        names => minijinja::context! { organisation => state.naming.organisation(), hostname => state.naming.hostname() },
        url_is_configured => state.naming.url_is_configured(),
        sms => sms_view(state.mail.sms().as_deref()),
        android => android.map(|app| super::ser(&app)),
        last_backup => last_backup.map(|last| super::last_backup_view(&last)),
        min_passphrase => crate::backup::MIN_PASSPHRASE_CHARS,
        upgrade => super::ser(&crate::http::api::system::upgrade_view(state)),
        enrolld_version => env!("CARGO_PKG_VERSION"),
        upgrade_at => crate::http::api::system::upgrade_view(state).at
            .and_then(|at| time::OffsetDateTime::from_unix_timestamp(at).ok())
            .map(|at| format!("{} {:02}:{:02} UTC", at.date(), at.hour(), at.minute())),
        ..extra
    };
    render(state, Some(admin), status, "settings.html", values)
}

/// Downloads a backup encrypted with the passphrase typed twice; a refusal comes back on the page, by the form.
async fn download_backup(State(state): State<AppState>, Posted { admin, fields }: Posted) -> Response {
    let passphrase = fields.get("passphrase").unwrap_or_default().to_owned();
    if fields.get("confirm").unwrap_or_default() != passphrase {
        let extra = minijinja::context! { backup_error => "The two passphrases are not the same." };
        return settings_page(&state, &admin, StatusCode::UNPROCESSABLE_ENTITY, extra).await;
    }
    match crate::http::api::backup::download(&state, admin.actor.clone(), "page", &passphrase).await {
        Ok(response) => response,
        Err(error) => {
            let extra = minijinja::context! { backup_error => error.message };
            settings_page(&state, &admin, error.status, extra).await
        }
    }
}

async fn settings(State(state): State<AppState>, SignedIn(admin): SignedIn) -> Response {
    settings_page(&state, &admin, StatusCode::OK, Value::from(())).await
}

/// Saves the settings form: how users authenticate, and (when given) the push certificate as two PEM texts.
async fn save_settings(State(state): State<AppState>, Posted { admin, fields }: Posted) -> Response {
    let actor = admin.actor.clone();
    if let Some(auth) = fields.get("auth").and_then(|a| a.parse::<EnrollAuth>().ok()) {
        let domain = state.enrollment.clone();
        let saver = actor.clone();
        if let Err(error) = blocking(move || domain.set_enroll_auth(&saver, Some(auth))).await {
            return failure(&state, &admin, error);
        }
    }
    if fields.get("push_certificate").is_some() != fields.get("push_key").is_some() {
        let extra = minijinja::context! { push_error => "Paste both the certificate and its private key." };
        return settings_page(&state, &admin, StatusCode::UNPROCESSABLE_ENTITY, extra).await;
    }
    if let (Some(cert), Some(key)) = (fields.get("push_certificate"), fields.get("push_key")) {
        let (cert, key) = (cert.to_owned(), key.to_owned());
        let push = match crate::pki::push::PushCertificate::from_pem(&cert, &key, state.clock.now()) {
            Ok(push) => push,
            Err(error) => {
                let extra = minijinja::context! { push_error => error.to_string() };
                return settings_page(&state, &admin, StatusCode::UNPROCESSABLE_ENTITY, extra).await;
            }
        };
        let domain = state.enrollment.clone();
        if let Err(error) = blocking(move || domain.save_push_certificate(&actor, &push, &cert, &key)).await {
            let extra = minijinja::context! { push_error => error.to_string() };
            return settings_page(&state, &admin, StatusCode::CONFLICT, extra).await;
        }
    }
    settings_page(&state, &admin, StatusCode::OK, minijinja::context! { notice => "Saved." }).await
}

async fn test_mail(State(state): State<AppState>, Posted { admin, fields }: Posted) -> Response {
    let to = fields.get("to").unwrap_or_default().to_owned();
    let outcome = match state.mail.send_test(&to).await {
        Ok(crate::domain::Attempt::Sent(reply)) => format!("Sent. The relay answered: {reply}"),
        Ok(other) => format!("Not sent: {}", other.reply()),
        Err(error) => format!("Not sent: {error}"),
    };
    mail_form_page(&state, &admin, &fields, StatusCode::OK, minijinja::context! { test_result => outcome }).await
}

/// Saves the SMTP relay the admin entered (checked as the API checks it); it is used at once, and mail that waited
/// for a relay goes out.
async fn save_relay(State(state): State<AppState>, Posted { admin, fields }: Posted) -> Response {
    let text = |name: &str| fields.get(name).map(str::to_owned);
    let request = crate::http::api::mail::RelaySettings {
        host: text("host").unwrap_or_default(),
        port: fields.get("port").and_then(|p| p.trim().parse().ok()),
        security: fields.get("security").and_then(|wanted| {
            [SmtpSecurity::StartTls, SmtpSecurity::Tls, SmtpSecurity::None].into_iter().find(|s| s.as_str() == wanted)
        }),
        username: text("username"),
        password: text("password"),
        from_address: text("from_address").unwrap_or_default(),
        from_name: text("from_name"),
        reply_to: text("reply_to"),
        helo_name: None,
        ca_pem: text("ca_pem"),
    };
    let settings = match crate::http::api::mail::checked_relay(&state, request) {
        Ok(settings) => settings,
        Err(error) => {
            let extra = minijinja::context! { relay_field => error.field, relay_error => error.message, values => super::ser(&fields_map(&fields)) };
            return mail_form_page(&state, &admin, &fields, StatusCode::UNPROCESSABLE_ENTITY, extra).await;
        }
    };
    let (mail, domain, actor) = (state.mail.clone(), state.enrollment.clone(), admin.actor.clone());
    match tokio::task::spawn_blocking(move || mail.save_relay(&domain, &actor, &settings)).await {
        Ok(Ok(())) => {
            mail_form_page(
                &state,
                &admin,
                &fields,
                StatusCode::OK,
                minijinja::context! { notice => "The relay is saved; send a test mail to check it." },
            )
            .await
        }
        Ok(Err(error)) => {
            let extra =
                minijinja::context! { relay_error => error.to_string(), values => super::ser(&fields_map(&fields)) };
            mail_form_page(&state, &admin, &fields, StatusCode::UNPROCESSABLE_ENTITY, extra).await
        }
        Err(_) => message(
            &state,
            Some(&admin),
            StatusCode::SERVICE_UNAVAILABLE,
            "Something went wrong",
            "Try again in a minute.",
        ),
    }
}

/// The push certificate as the `.p12` file Keychain Access exports, with its password.
async fn upload_p12(
    State(state): State<AppState>,
    headers: HeaderMap,
    SignedIn(admin): SignedIn,
    multipart: Multipart,
) -> Response {
    let (fields, file) = match read_form(&state, &headers, &admin, multipart).await {
        Ok((fields, file)) => (fields, file.map(|(_, bytes)| bytes).unwrap_or_default()),
        Err(response) => return response,
    };
    let password = fields.get("password").unwrap_or_default().to_owned();
    let read = crate::pki::push::pem_from_pkcs12(&file, &password).and_then(|(cert, key)| {
        crate::pki::push::PushCertificate::from_pem(&cert, &key, state.clock.now()).map(|push| (push, cert, key))
    });
    let (push, cert, key) = match read {
        Ok(read) => read,
        Err(error) => {
            return settings_page(
                &state,
                &admin,
                StatusCode::UNPROCESSABLE_ENTITY,
                minijinja::context! { p12_error => error.to_string() },
            )
            .await;
        }
    };
    let domain = state.enrollment.clone();
    let actor = admin.actor.clone();
    match blocking(move || domain.save_push_certificate(&actor, &push, &cert, &key)).await {
        Ok(_) => {
            settings_page(
                &state,
                &admin,
                StatusCode::OK,
                minijinja::context! { notice => "The push certificate is saved." },
            )
            .await
        }
        Err(error) => {
            settings_page(&state, &admin, StatusCode::CONFLICT, minijinja::context! { p12_error => error.to_string() })
                .await
        }
    }
}

/// Saves how long invites last and who is told when a device enrolls.
async fn save_policy(State(state): State<AppState>, Posted { admin, fields }: Posted) -> Response {
    let change = crate::domain::PolicyChange {
        invite_validity_days: fields.get("validity_days").and_then(|d| d.trim().parse().ok()).unwrap_or(0),
        confirmation_to: fields
            .get("confirmation_to")
            .unwrap_or_default()
            .lines()
            .map(|l| l.trim().to_owned())
            .collect(),
        confirmation_to_user: fields.get("confirmation_to_user").is_some(),
    };
    let domain = state.enrollment.clone();
    let actor = admin.actor.clone();
    match blocking(move || domain.save_policy(&actor, &change)).await {
        Ok(()) => {
            settings_page(
                &state,
                &admin,
                StatusCode::OK,
                minijinja::context! { notice => "Saved; new invites use it." },
            )
            .await
        }
        Err(crate::domain::DomainError::Invalid { field, message }) => {
            settings_page(
                &state,
                &admin,
                StatusCode::UNPROCESSABLE_ENTITY,
                minijinja::context! { policy_field => field, policy_error => message },
            )
            .await
        }
        Err(error) => failure(&state, &admin, error),
    }
}

/// Asks for a new HTTPS certificate from the appliance's CA now; devices and browsers that trust the CA accept it.
async fn renew_tls(State(state): State<AppState>, Posted { admin, .. }: Posted) -> Response {
    if !state.tls_renewer.self_issued() {
        let extra = minijinja::context! { tls_error => "The HTTPS certificate is your own (tls_cert/tls_key); replace its files and enrolld serves them by itself." };
        return settings_page(&state, &admin, StatusCode::CONFLICT, extra).await;
    }
    if state.tls_renewer.own_in_use() {
        let extra = minijinja::context! { tls_error => "Your own certificate is in use; remove it to go back to certificates the appliance issues." };
        return settings_page(&state, &admin, StatusCode::CONFLICT, extra).await;
    }
    state.tls_renewer.request();
    tracing::info!(admin = %admin.username, "a new HTTPS certificate was asked for");
    let extra = minijinja::context! { notice => "A new HTTPS certificate is being issued; it is served within seconds (open connections keep the old one)." };
    settings_page(&state, &admin, StatusCode::OK, extra).await
}

/// Saves the organisation's name and the host name. A new host name changes the `.local` name, the HTTPS
/// certificate and (without `public_url`) every new link, so it is confirmed first with what it means for devices
/// that already know the old one.
async fn save_names(State(state): State<AppState>, Posted { admin, fields }: Posted) -> Response {
    let organisation = fields.get("organisation").unwrap_or_default().to_owned();
    let hostname = fields.get("hostname").unwrap_or_default().trim().to_ascii_lowercase();
    let current = state.naming.names();
    let names = match crate::naming::Names::checked(&organisation, &hostname) {
        Ok(names) => names,
        Err(error) => {
            let extra = minijinja::context! { names_field => error.field, names_error => error.reason, names_values => super::ser(&fields_map(&fields)) };
            return settings_page(&state, &admin, StatusCode::UNPROCESSABLE_ENTITY, extra).await;
        }
    };
    if names.hostname != current.hostname && fields.get("confirmed") != Some("yes") {
        let links = if state.naming.url_is_configured() {
            "Links keep using public_url from the configuration.".to_owned()
        } else {
            format!(
                "New links use https://{}. Links already sent, and Apple devices enrolled so far, use {}: they reach the box only while that name still leads to it (resend pending invites after the change).",
                names.mdns_name(),
                current.mdns_name()
            )
        };
        let values = minijinja::context! {
            title => format!("Rename the box to {}?", names.mdns_name()),
            text => format!("The box stops answering as {} on the LAN and announces {} instead; a new HTTPS certificate is issued for the new name. {links}", current.mdns_name(), names.mdns_name()),
            action => "/admin/settings/names",
            button => "Rename the box",
            danger => true,
            cancel => "/admin/settings",
            fields => vec![
                minijinja::context! { name => "organisation", value => names.organisation.clone() },
                minijinja::context! { name => "hostname", value => names.hostname.clone() },
            ],
        };
        return render(&state, Some(&admin), StatusCode::OK, "confirm.html", values);
    }
    let domain = state.enrollment.clone();
    let actor = admin.actor.clone();
    let saved = blocking(move || domain.save_names(&actor, &names.organisation, &names.hostname)).await;
    match saved {
        Ok(names) => {
            let renamed = names.hostname != current.hostname;
            state.naming.set(names.clone());
            let notice = if renamed {
                format!(
                    "Saved. The box now announces itself as {}; its new HTTPS certificate is served within seconds.",
                    names.mdns_name()
                )
            } else {
                "Saved.".to_owned()
            };
            settings_page(&state, &admin, StatusCode::OK, minijinja::context! { notice => notice }).await
        }
        Err(error) => failure(&state, &admin, error),
    }
}

/// The SMS gateway as the form shows it: every value but the headers' (they hold credentials), which are named only.
fn sms_view(gateway: Option<&SmsGateway>) -> Value {
    match gateway {
        None => minijinja::context! { kind => "off" },
        Some(SmsGateway::Email { domain }) => minijinja::context! { kind => "email", email_domain => domain.clone() },
        Some(SmsGateway::Http(http)) => minijinja::context! {
            kind => "http",
            url => http.url.clone(),
            method => http.method.clone(),
            header_names => http.headers.iter().map(|(name, _)| name.clone()).collect::<Vec<_>>().join(", "),
            body => http.body.clone(),
            success_contains => http.success_contains.clone(),
        },
    }
}

/// Saves the SMS gateway, checked as the configuration file's `sms_*` keys are; an empty headers box keeps the
/// headers in use (so their secrets need not be typed again).
async fn save_sms(State(state): State<AppState>, Posted { admin, fields }: Posted) -> Response {
    let keys = [
        "sms_gateway",
        "sms_email_domain",
        "sms_http_url",
        "sms_http_method",
        "sms_http_body",
        "sms_http_success_contains",
    ];
    let mut given: Vec<(&str, String)> =
        keys.iter().map(|key| (*key, fields.get(key).unwrap_or_default().to_owned())).collect();
    let typed_headers = fields.get("sms_http_headers").unwrap_or_default().trim().to_owned();
    let headers = match (typed_headers.is_empty(), state.mail.sms().as_deref()) {
        (true, Some(SmsGateway::Http(http))) => {
            http.headers.iter().map(|(name, value)| format!("{name}: {value}")).collect::<Vec<_>>().join("\n")
        }
        _ => typed_headers,
    };
    given.push(("sms_http_headers", headers));
    let borrowed: Vec<(&str, &str)> = given.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let gateway = match crate::config::sms_gateway_from(&borrowed) {
        Ok(gateway) => gateway,
        Err((field, reason)) => {
            let mut values = fields_map(&fields);
            values.remove("sms_http_headers");
            let extra =
                minijinja::context! { sms_field => field, sms_error => reason, sms_values => super::ser(&values) };
            return settings_page(&state, &admin, StatusCode::UNPROCESSABLE_ENTITY, extra).await;
        }
    };
    let (mail, domain, actor) = (state.mail.clone(), state.enrollment.clone(), admin.actor.clone());
    let off = gateway.is_none();
    match tokio::task::spawn_blocking(move || mail.save_sms(&domain, &actor, gateway)).await {
        Ok(Ok(())) => {
            let notice =
                if off { "Text messages are off." } else { "The SMS gateway is saved; invites by SMS use it now." };
            settings_page(&state, &admin, StatusCode::OK, minijinja::context! { notice => notice }).await
        }
        Ok(Err(error)) => {
            settings_page(
                &state,
                &admin,
                StatusCode::UNPROCESSABLE_ENTITY,
                minijinja::context! { sms_error => error.to_string() },
            )
            .await
        }
        Err(_) => message(
            &state,
            Some(&admin),
            StatusCode::SERVICE_UNAVAILABLE,
            "Something went wrong",
            "Try again in a minute.",
        ),
    }
}

/// Serves the admin's own certificate chain and key (pasted as PEM) in place of self-issued ones, once they are
/// checked; says so when it does not name the host devices use.
async fn install_tls(State(state): State<AppState>, Posted { admin, fields }: Posted) -> Response {
    let cert = fields.get("tls_cert").unwrap_or_default().as_bytes().to_vec();
    let key = fields.get("tls_key").unwrap_or_default().as_bytes().to_vec();
    let (renewer, now) = (state.tls_renewer.clone(), state.clock.now());
    let installed = match tokio::task::spawn_blocking(move || renewer.install_own(&cert, &key, now)).await {
        Ok(installed) => installed,
        Err(_) => {
            return message(
                &state,
                Some(&admin),
                StatusCode::SERVICE_UNAVAILABLE,
                "Something went wrong",
                "Try again in a minute.",
            );
        }
    };
    let info = match installed {
        Ok(info) => info,
        Err((part, reason)) => {
            let field = match part {
                crate::pki::PemPart::Certificate => "tls_cert",
                crate::pki::PemPart::Key => "tls_key",
            };
            let extra = minijinja::context! { tls_field => field, tls_error => reason };
            return settings_page(&state, &admin, StatusCode::UNPROCESSABLE_ENTITY, extra).await;
        }
    };
    let names: Vec<String> = info.names.iter().map(ToString::to_string).collect();
    let host = state.naming.public_url();
    let host = host.trim_start_matches("https://").split([':', '/']).next().unwrap_or_default().to_ascii_lowercase();
    let covers = names.iter().any(|name| {
        name.eq_ignore_ascii_case(&host)
            || name
                .strip_prefix("*.")
                .is_some_and(|parent| host.split_once('.').is_some_and(|(_, rest)| rest == parent))
    });
    let domain = state.enrollment.clone();
    let (actor, detail) = (admin.actor.clone(), format!("serial {}, for {}", info.serial, names.join(", ")));
    if let Err(error) = blocking(move || domain.record(&actor, "tls.own", None, &detail)).await {
        tracing::error!(%error, "cannot record the new certificate in the audit log");
    }
    let mut notice = format!(
        "Your certificate (for {}, valid until {}) is served within seconds.",
        names.join(", "),
        info.not_after.date()
    );
    if !covers {
        notice.push_str(&format!(" It does not name {host}, which links and devices use: they will not trust it. Set public_url to a name it carries, or upload one that names {host}."));
    }
    settings_page(&state, &admin, StatusCode::OK, minijinja::context! { notice => notice }).await
}

/// Goes back to certificates the appliance's CA issues.
async fn remove_tls(State(state): State<AppState>, Posted { admin, .. }: Posted) -> Response {
    let renewer = state.tls_renewer.clone();
    match tokio::task::spawn_blocking(move || renewer.remove_own()).await {
        Ok(Ok(())) => {}
        Ok(Err(error)) => {
            let extra = minijinja::context! { tls_error => error.to_string() };
            return settings_page(&state, &admin, StatusCode::INTERNAL_SERVER_ERROR, extra).await;
        }
        Err(_) => {
            return message(
                &state,
                Some(&admin),
                StatusCode::SERVICE_UNAVAILABLE,
                "Something went wrong",
                "Try again in a minute.",
            );
        }
    }
    let (domain, actor) = (state.enrollment.clone(), admin.actor.clone());
    if let Err(error) = blocking(move || domain.record(&actor, "tls.own_removed", None, "back to self-issued")).await {
        tracing::error!(%error, "cannot record the change in the audit log");
    }
    let extra = minijinja::context! { notice => "Your certificate is no longer used; the appliance's CA issues one, served within seconds." };
    settings_page(&state, &admin, StatusCode::OK, extra).await
}

/// The relay and test-mail forms are on the Settings page and are the setup's last step; the answer goes back to
/// the page the form was on.
async fn mail_form_page(
    state: &AppState,
    admin: &Admin,
    fields: &super::Fields,
    status: StatusCode,
    extra: Value,
) -> Response {
    if fields.get("then") == Some("setup") {
        setup_mail_page(state, admin, status, extra)
    } else {
        settings_page(state, admin, status, extra).await
    }
}

fn relay_text(state: &AppState) -> Option<String> {
    state.mail.relay().map(|relay| {
        let settings = relay.settings();
        format!(
            "{}:{} ({}), sending as {}",
            settings.host,
            settings.port,
            settings.security.as_str(),
            settings.from_address
        )
    })
}

fn setup_mail_page(state: &AppState, admin: &Admin, status: StatusCode, extra: Value) -> Response {
    let values =
        minijinja::context! { title => "Set up enrolld: mail", then => "setup", relay => relay_text(state), ..extra };
    render(state, Some(admin), status, "setup_mail.html", values)
}

async fn setup_mail(State(state): State<AppState>, SignedIn(admin): SignedIn) -> Response {
    setup_mail_page(&state, &admin, StatusCode::OK, Value::from(()))
}

async fn setup_appliance_form(state: &AppState, admin: &Admin, status: StatusCode, extra: Value) -> Response {
    let domain = state.enrollment.clone();
    let auth = match blocking(move || domain.enroll_auth()).await {
        Ok(auth) => auth,
        Err(error) => return failure(state, admin, error),
    };
    // What the admin typed, when it comes back refused; else what is in use.
    let typed = extra.get_attr("values").ok().filter(|v| !v.is_undefined());
    let values = minijinja::context! {
        title => "Set up enrolld: this appliance",
        auths => options(EnrollAuth::ALL),
        values => typed.unwrap_or_else(|| minijinja::context! {
            organisation => state.naming.organisation(),
            hostname => state.naming.hostname(),
            auth => auth.as_str(),
            validity_days => state.enrollment.policy().invite_validity.whole_days(),
        }),
        ..extra
    };
    render(state, Some(admin), status, "setup_appliance.html", values)
}

async fn setup_appliance_page(State(state): State<AppState>, SignedIn(admin): SignedIn) -> Response {
    setup_appliance_form(&state, &admin, StatusCode::OK, Value::from(())).await
}

/// The setup's second step: the names, how users authenticate and how long invites last, saved together (each
/// checked before anything is saved).
async fn setup_appliance(State(state): State<AppState>, Posted { admin, fields }: Posted) -> Response {
    let refuse = |field: &'static str, error: String| {
        let values = super::ser(&fields_map(&fields));
        minijinja::context! { field => field, error => error, values => values }
    };
    let names = match crate::naming::Names::checked(
        fields.get("organisation").unwrap_or_default(),
        fields.get("hostname").unwrap_or_default(),
    ) {
        Ok(names) => names,
        Err(error) => {
            let extra = refuse(error.field, error.reason);
            return setup_appliance_form(&state, &admin, StatusCode::UNPROCESSABLE_ENTITY, extra).await;
        }
    };
    let auth = fields.get("auth").and_then(|a| a.parse::<EnrollAuth>().ok());
    let policy = state.enrollment.policy();
    let change = crate::domain::PolicyChange {
        invite_validity_days: fields.get("validity_days").and_then(|d| d.trim().parse().ok()).unwrap_or(0),
        confirmation_to: policy.confirmation_to.clone(),
        confirmation_to_user: policy.confirmation_to_user,
    };
    let (domain, actor, saving) = (state.enrollment.clone(), admin.actor.clone(), names.clone());
    let saved = blocking(move || {
        domain.save_policy(&actor, &change)?;
        if auth.is_some() {
            domain.set_enroll_auth(&actor, auth)?;
        }
        domain.save_names(&actor, &saving.organisation, &saving.hostname)
    })
    .await;
    match saved {
        Ok(names) => {
            state.naming.set(names);
            axum::response::Redirect::to("/admin/setup/mail").into_response()
        }
        Err(crate::domain::DomainError::Invalid { field, message }) => {
            let extra = refuse(field, message);
            setup_appliance_form(&state, &admin, StatusCode::UNPROCESSABLE_ENTITY, extra).await
        }
        Err(error) => failure(&state, &admin, error),
    }
}

/// The device-policy app for company-owned Android devices: its settings, and the app itself when uploaded (the
/// box then serves it and computes its checksum).
async fn save_android(
    State(state): State<AppState>,
    headers: HeaderMap,
    SignedIn(admin): SignedIn,
    multipart: Multipart,
) -> Response {
    let (fields, file) = match read_form(&state, &headers, &admin, multipart).await {
        Ok((fields, file)) => (fields, file.map(|(_, bytes)| bytes).filter(|b| !b.is_empty())),
        Err(response) => return response,
    };
    let text = |name: &str| fields.get(name).map(str::trim).filter(|v| !v.is_empty()).map(str::to_owned);
    let wifi = text("wifi_ssid").map(|ssid| crate::domain::ProvisioningWifi {
        ssid,
        security: text("wifi_security").unwrap_or_else(|| "WPA".into()),
        password: text("wifi_password"),
        hidden: fields.get("wifi_hidden").is_some(),
    });
    let refused = |field: Option<&'static str>, message: String| {
        let mut values = fields_map(&fields);
        values.remove("wifi_password");
        minijinja::context! { android_field => field, android_error => message, android_values => super::ser(&values) }
    };
    let saved = match file {
        Some(bytes) => {
            let changes = crate::http::api::android::AppChanges {
                component_name: text("component_name"),
                wifi: Some(wifi),
                agent_url: Some(text("agent_url")),
            };
            crate::http::api::android::install_apk(&state, &admin.actor, bytes, changes).await
        }
        None => {
            let app = crate::domain::AndroidApp {
                component_name: text("component_name").unwrap_or_default(),
                download_url: text("download_url").unwrap_or_default(),
                checksum_kind: if fields.get("checksum_kind") == Some("package") {
                    crate::domain::ChecksumKind::Package
                } else {
                    crate::domain::ChecksumKind::Signature
                },
                checksum: text("checksum").unwrap_or_default(),
                served_here: false,
                wifi,
                agent_url: text("agent_url"),
            };
            let (domain, actor) = (state.enrollment.clone(), admin.actor.clone());
            crate::http::api::blocking(move || domain.save_android_app(&actor, Some(app)))
                .await
                .and_then(|saved| saved.ok_or_else(|| crate::http::HttpError::unavailable("not saved; try again")))
        }
    };
    match saved {
        Ok(app) => {
            let how = if app.served_here {
                format!("served here, checksum {}", app.checksum)
            } else {
                "downloaded from your URL".to_owned()
            };
            let notice = format!(
                "The Android app is saved ({how}); new invites for company-owned Android devices carry its provisioning QR code."
            );
            settings_page(&state, &admin, StatusCode::OK, minijinja::context! { notice => notice }).await
        }
        Err(error) => {
            let extra = refused(error.field, error.message);
            settings_page(&state, &admin, StatusCode::UNPROCESSABLE_ENTITY, extra).await
        }
    }
}

async fn remove_android(State(state): State<AppState>, Posted { admin, .. }: Posted) -> Response {
    let (domain, actor) = (state.enrollment.clone(), admin.actor.clone());
    if let Err(error) = blocking(move || domain.save_android_app(&actor, None)).await {
        return failure(&state, &admin, error);
    }
    if let Some(path) = state.android.apk_path() {
        let _ = tokio::fs::remove_file(path).await;
    }
    let extra = minijinja::context! { notice => "The Android app settings are removed; invites carry the plain link." };
    settings_page(&state, &admin, StatusCode::OK, extra).await
}

/// The upgrade form's route, which takes a bundle of a few hundred MiB: the caller gives it its own body limit.
pub fn upgrade_routes() -> Router<AppState> {
    Router::new().route("/admin/settings/upgrade", axum::routing::post(upload_upgrade))
}

/// Takes an upgrade bundle from the Settings page and hands it to the appliance's installer. The form sends the
/// CSRF token before the file, so a forged post is refused before a byte of the file is kept; the file is streamed
/// to the state directory, never held in memory.
async fn upload_upgrade(
    State(state): State<AppState>,
    headers: HeaderMap,
    SignedIn(admin): SignedIn,
    mut multipart: Multipart,
) -> Response {
    let refused = |status: StatusCode, message: String| {
        let state = state.clone();
        let admin = admin.clone();
        async move {
            let extra = minijinja::context! { upgrade_error => message };
            settings_page(&state, &admin, status, extra).await
        }
    };
    let mut fields = super::Fields::default();
    let mut receiver = None;
    loop {
        let mut field = match multipart.next_field().await {
            Ok(Some(field)) => field,
            Ok(None) => break,
            Err(error) => return refused(StatusCode::BAD_REQUEST, error.body_text()).await,
        };
        if field.name() != Some("file") {
            let name = field.name().unwrap_or_default().to_owned();
            match field.text().await {
                Ok(text) if text.len() <= 4096 => fields.0.push((name, text)),
                _ => return refused(StatusCode::BAD_REQUEST, "The form could not be read.".into()).await,
            }
            continue;
        }
        if let Some(forbidden) = super::verify_form(&state, &headers, &admin, &fields) {
            return forbidden;
        }
        let mut upload = match crate::http::api::system::UpgradeReceiver::begin(&state).await {
            Ok(upload) => upload,
            Err(error) => return refused(error.status, error.message).await,
        };
        loop {
            match field.chunk().await {
                Ok(Some(chunk)) => {
                    if let Err(error) = upload.write(chunk).await {
                        return refused(error.status, error.message).await;
                    }
                }
                Ok(None) => break,
                Err(error) => {
                    let error = upload.broken_off(&error);
                    return refused(error.status, error.message).await;
                }
            }
        }
        receiver = Some(upload);
    }
    let Some(receiver) = receiver else {
        return refused(StatusCode::UNPROCESSABLE_ENTITY, "Choose the upgrade file (.update) to upload.".into()).await;
    };
    match receiver.finish(&state, &admin.actor).await {
        Ok(_) => axum::response::Redirect::to("/admin/settings#upgrade").into_response(),
        Err(error) => refused(error.status, error.message).await,
    }
}
