//! The admin pages built around a form: inviting (one user, *by myself* with the link and QR code on screen, or a
//! whole group with the count first), bulk CSV imports (upload, progress, the row-by-row report), users and
//! groups, the audit log, and the mail templates.

use axum::Router;
use axum::body::Body;
use axum::extract::{Multipart, Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use base64::Engine as _;
use minijinja::Value;
use serde::Deserialize;

use super::{Admin, Fields, Posted, SignedIn, blocking, failure, message, render};
use crate::domain::{GroupInviteMode, GroupInvitePlan, ImportRequest, NewGroup, NewInvite, NewUser};
use crate::http::AppState;
use crate::model::{Channels, Id, ImportKind, ImportMode, Ownership, Platform};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/admin/invite", get(invite_page).post(invite))
        .route("/admin/invite/group", axum::routing::post(invite_group))
        // The upload is limited by import_max_bytes (the router's hard limit), not by the JSON body limit.
        .route("/admin/import", get(import_page).post(upload).layer(axum::extract::DefaultBodyLimit::disable()))
        .route("/admin/imports/{id}", get(import_status))
        .route("/admin/users", get(users).post(create_user))
        .route("/admin/groups", axum::routing::post(create_group))
        .route("/admin/users/{id}/delete", axum::routing::post(delete_user))
        .route("/admin/users/{id}", get(edit_user_page).post(edit_user))
        .route("/admin/groups/{id}", axum::routing::post(rename_group))
        .route("/admin/groups/{id}/delete", axum::routing::post(delete_group))
        .route("/admin/audit", get(audit))
        .route("/admin/templates", get(templates).post(save_template))
}

pub(super) fn options<T: Copy + std::fmt::Display>(all: &[T]) -> Value {
    Value::from(all.iter().map(|v| v.to_string()).collect::<Vec<_>>())
}

async fn group_options(state: &AppState) -> Result<Vec<Value>, crate::domain::DomainError> {
    let domain = state.enrollment.clone();
    let groups = blocking(move || domain.groups(None, 500)).await?;
    Ok(groups.items.iter().map(|g| Value::from_pairs([("id", g.id.to_string()), ("name", g.name.clone())])).collect())
}

async fn invite_form(state: &AppState, admin: &Admin, status: StatusCode, extra: Value) -> Response {
    let groups = match group_options(state).await {
        Ok(groups) => groups,
        Err(error) => return failure(state, admin, error),
    };
    let values = minijinja::context! {
        title => "Invite",
        platforms => options(Platform::ALL),
        ownerships => options(&[Ownership::Corporate, Ownership::Personal, Ownership::NotSet]),
        channels => options(Channels::ALL),
        groups => groups,
        ..extra
    };
    render(state, Some(admin), status, "invite.html", values)
}

async fn invite_page(State(state): State<AppState>, SignedIn(admin): SignedIn) -> Response {
    invite_form(&state, &admin, StatusCode::OK, Value::from(())).await
}

/// One user, found by email or created: an invite by mail/SMS, or *by myself* (the link and QR on screen).
async fn invite(State(state): State<AppState>, Posted { admin, fields }: Posted) -> Response {
    let email = fields.get("email").unwrap_or_default().trim().to_owned();
    let name = fields.get("name").unwrap_or_default().trim().to_owned();
    let phone = fields.get("phone").map(|p| p.trim().to_owned());
    let platform: Platform = fields.get("platform").and_then(|p| p.parse().ok()).unwrap_or(Platform::Any);
    let ownership: Ownership = fields.get("ownership").and_then(|p| p.parse().ok()).unwrap_or(Ownership::Corporate);
    let channels: Channels = fields.get("channels").and_then(|p| p.parse().ok()).unwrap_or(Channels::Email);
    let group_id: Option<Id> = fields.get("group").and_then(|g| g.parse().ok());
    let by_myself = fields.get("by_myself").is_some();
    if fields.get("preview").is_some() {
        return invite_preview(&state, &admin, &fields, (email, name), (platform, ownership, channels)).await;
    }
    let domain = state.enrollment.clone();
    let actor = admin.actor.clone();
    let created = blocking(move || {
        let user = match domain.user_by_email(&email)? {
            Some(user) => user,
            None => {
                let name = if name.is_empty() { email.split('@').next().unwrap_or_default().to_owned() } else { name };
                domain.create_user(&actor, &NewUser { name, email, phone, ..NewUser::default() })?
            }
        };
        let new = NewInvite { user_id: user.id, platform, ownership, group_id, channels };
        if by_myself { domain.create_invite_by_myself(&actor, &new) } else { domain.create_invite(&actor, &new) }
    })
    .await;
    let created = match created {
        Ok(created) => created,
        Err(crate::domain::DomainError::Invalid { field, message }) => {
            let extra = minijinja::context! { field_error => message, field => field, values => super::ser(&fields_map(&fields)) };
            return invite_form(&state, &admin, StatusCode::UNPROCESSABLE_ENTITY, extra).await;
        }
        Err(error) => return failure(&state, &admin, error),
    };
    match (created.link_token, created.passcode) {
        (Some(token), Some(passcode)) => {
            let link = format!("{}/e/{token}", state.naming.public_url());
            let qr = crate::mail::qr::png(&link)
                .map(|png| format!("data:image/png;base64,{}", base64::engine::general_purpose::STANDARD.encode(png)))
                .ok();
            let extra = minijinja::context! {
                created => minijinja::context! { link => link, passcode => passcode, qr => qr, user => created.invite.user_name },
            };
            invite_form(&state, &admin, StatusCode::OK, extra).await
        }
        _ => Redirect::to("/admin/enrollment?notice=invited").into_response(),
    }
}

/// The invite as the user would receive it, made from the form (the user's name, the platform, the ownership, the
/// templates in use, the validity) without creating anything; the link and passcode are made when it is sent.
async fn invite_preview(
    state: &AppState,
    admin: &Admin,
    fields: &Fields,
    (email, name): (String, String),
    (platform, ownership, channels): (Platform, Ownership, Channels),
) -> Response {
    let domain = state.enrollment.clone();
    let lookup = email.clone();
    let known = blocking(move || domain.user_by_email(&lookup)).await.ok().flatten();
    let user_name = match (known, name.is_empty()) {
        (Some(user), _) => user.name,
        (None, false) => name,
        (None, true) => email.split('@').next().filter(|n| !n.is_empty()).unwrap_or("the user").to_owned(),
    };
    let expires_at = state.clock.now() + state.enrollment.policy().invite_validity;
    let context = crate::mail::templates::InviteContext::new(
        &user_name,
        &state.naming.organisation(),
        format!("{}/e/(a link made when it is sent)", state.naming.public_url()),
        "(made when it is sent)",
        expires_at,
        platform,
        ownership,
        "cid:enroll-qr",
    );
    let preview = match state.mail.templates().render(&context) {
        Ok(rendered) => minijinja::context! {
            subject => rendered.subject,
            text => channels.email().then_some(rendered.text),
            html => channels.email().then_some(rendered.html),
            sms => channels.sms().then(|| crate::mail::sms::invite_text(&context)),
        },
        Err(error) => minijinja::context! { error => error.to_string() },
    };
    let extra = minijinja::context! { preview => preview, values => super::ser(&fields_map(fields)) };
    invite_form(state, admin, StatusCode::OK, extra).await
}

pub(super) fn fields_map(fields: &Fields) -> std::collections::BTreeMap<String, String> {
    fields.0.iter().filter(|(k, _)| k != "csrf").cloned().collect()
}

/// Invite a group: first the count (a dry run), then, confirmed, the invites.
async fn invite_group(State(state): State<AppState>, Posted { admin, fields }: Posted) -> Response {
    let Some(group) = fields.get("group").and_then(|g| g.parse::<Id>().ok()) else {
        return message(
            &state,
            Some(&admin),
            StatusCode::UNPROCESSABLE_ENTITY,
            "Choose a group",
            "Pick the group to invite.",
        );
    };
    let mode = match fields.get("mode") {
        Some("invited_not_enrolled") => GroupInviteMode::InvitedNotEnrolled,
        _ => GroupInviteMode::NeverInvited,
    };
    let confirmed = fields.get("confirmed") == Some("yes");
    let plan = GroupInvitePlan {
        mode,
        platform: fields.get("platform").and_then(|p| p.parse().ok()).unwrap_or(Platform::Any),
        ownership: fields.get("ownership").and_then(|p| p.parse().ok()).unwrap_or(Ownership::Corporate),
        channels: fields.get("channels").and_then(|p| p.parse().ok()).unwrap_or(Channels::Email),
        dry_run: !confirmed,
    };
    let domain = state.enrollment.clone();
    let actor = admin.actor.clone();
    let result = match blocking(move || domain.invite_group(&actor, &group, &plan)).await {
        Ok(result) => result,
        Err(error) => return failure(&state, &admin, error),
    };
    if confirmed {
        let text =
            format!("{} invites were sent; {} users were skipped.", result.invites_created, result.skipped.len());
        return message(&state, Some(&admin), StatusCode::OK, "Group invited", &text);
    }
    let keep: Vec<Value> = fields_map(&fields)
        .into_iter()
        .map(|(name, value)| Value::from_pairs([("name", name), ("value", value)]))
        .collect();
    let values = Value::from_pairs([
        ("title", Value::from(format!("Invite {} user{}?", result.users, if result.users == 1 { "" } else { "s" }))),
        ("text", Value::from("Each gets an invite by the chosen channels.")),
        ("action", Value::from("/admin/invite/group")),
        ("fields", Value::from(keep)),
        ("button", Value::from(format!("Send {} invites", result.users))),
        ("cancel", Value::from("/admin/invite")),
    ]);
    render(&state, Some(&admin), StatusCode::OK, "confirm.html", values)
}

async fn import_page(State(state): State<AppState>, SignedIn(admin): SignedIn) -> Response {
    let domain = state.enrollment.clone();
    let recent = match blocking(move || domain.imports(None, 10)).await {
        Ok(page) => page.items,
        Err(error) => return failure(&state, &admin, error),
    };
    let values = Value::from_pairs([
        ("title", Value::from("Bulk invite")),
        ("recent", super::ser(&recent)),
        ("max_mib", Value::from(state.import_max_bytes >> 20)),
    ]);
    render(&state, Some(&admin), StatusCode::OK, "import.html", values)
}

/// A CSV upload (multipart): stored and imported as a job; the page then follows its progress.
async fn upload(
    State(state): State<AppState>,
    headers: HeaderMap,
    SignedIn(admin): SignedIn,
    multipart: Multipart,
) -> Response {
    // Only a signed-in admin's upload is read at all (the extractor said who); the CSRF token, a field of the
    // form, is checked once the fields are read.
    let (fields, file) = match read_form(&state, &headers, &admin, multipart).await {
        Ok(read) => read,
        Err(response) => return response,
    };
    let Some((filename, bytes)) = file.filter(|(_, b)| !b.is_empty()) else {
        return message(
            &state,
            Some(&admin),
            StatusCode::UNPROCESSABLE_ENTITY,
            "Choose a file",
            "Pick the CSV file to import.",
        );
    };
    let request = ImportRequest {
        kind: if fields.get("kind") == Some("staged") { ImportKind::Staged } else { ImportKind::Invites },
        mode: if fields.get("mode") == Some("valid_only") { ImportMode::ValidOnly } else { ImportMode::All },
        filename,
    };
    match crate::http::api::imports::start_import(&state, &admin.actor, request, Body::from(bytes)).await {
        Ok((import, _job)) => Redirect::to(&format!("/admin/imports/{}", import.id)).into_response(),
        Err(error) => message(&state, Some(&admin), error.status, "The file cannot be imported", &error.message),
    }
}

async fn import_status(State(state): State<AppState>, Path(id): Path<String>, SignedIn(admin): SignedIn) -> Response {
    let Ok(id) = id.parse::<Id>() else {
        return message(&state, Some(&admin), StatusCode::NOT_FOUND, "Not found", "There is no such import.");
    };
    let domain = state.enrollment.clone();
    let import = match blocking(move || domain.import(&id)).await {
        Ok(import) => import,
        Err(error) => return failure(&state, &admin, error),
    };
    let running = import.state.under_way();
    let values = Value::from_pairs([
        ("title", Value::from("Import")),
        ("import", super::ser(&import)),
        ("running", Value::from(running)),
        ("show", Value::from(true)),
    ]);
    render(&state, Some(&admin), StatusCode::OK, "import.html", values)
}

#[derive(Debug, Default, Deserialize)]
pub struct Paging {
    q: Option<String>,
    cursor: Option<String>,
}

async fn users_page(state: &AppState, admin: &Admin, paging: &Paging, status: StatusCode, extra: Value) -> Response {
    let domain = state.enrollment.clone();
    let (q, cursor) = (paging.q.clone(), paging.cursor.clone());
    let page = match blocking(move || {
        Ok((domain.users(q.as_deref().filter(|q| !q.is_empty()), cursor.as_deref(), 50)?, domain.groups(None, 500)?))
    })
    .await
    {
        Ok(page) => page,
        Err(error) => return failure(state, admin, error),
    };
    let (users, groups) = page;
    let next_url = users.next_cursor.as_ref().map(|c| {
        let mut query = form_urlencoded::Serializer::new(String::new());
        if let Some(q) = paging.q.as_deref().filter(|q| !q.is_empty()) {
            query.append_pair("q", q);
        }
        query.append_pair("cursor", c);
        format!("/admin/users?{}", query.finish())
    });
    let values = minijinja::context! {
        title => "Users and groups",
        users => super::ser(&users.items),
        groups => super::ser(&groups.items),
        q => paging.q.clone().unwrap_or_default(),
        next_url => next_url,
        ..extra
    };
    render(state, Some(admin), status, "users.html", values)
}

async fn users(State(state): State<AppState>, SignedIn(admin): SignedIn, Query(paging): Query<Paging>) -> Response {
    users_page(&state, &admin, &paging, StatusCode::OK, Value::from(())).await
}

async fn create_user(State(state): State<AppState>, Posted { admin, fields }: Posted) -> Response {
    let new = NewUser {
        name: fields.get("name").unwrap_or_default().to_owned(),
        email: fields.get("email").unwrap_or_default().to_owned(),
        phone: fields.get("phone").map(str::to_owned),
        groups: fields.all("groups").iter().filter_map(|g| g.parse().ok()).collect(),
        ..NewUser::default()
    };
    let domain = state.enrollment.clone();
    let actor = admin.actor.clone();
    match blocking(move || domain.create_user(&actor, &new)).await {
        Ok(user) => {
            let extra = minijinja::context! { notice => format!("{} <{}> was added.", user.name, user.email) };
            users_page(&state, &admin, &Paging::default(), StatusCode::OK, extra).await
        }
        Err(crate::domain::DomainError::Invalid { field, message }) => {
            let extra = minijinja::context! { field => field, field_error => message, values => super::ser(&fields_map(&fields)) };
            users_page(&state, &admin, &Paging::default(), StatusCode::UNPROCESSABLE_ENTITY, extra).await
        }
        // A taken address is the form's mistake too: said next to the email field, with what was typed kept.
        Err(crate::domain::DomainError::Conflict { message, .. }) => {
            let extra = minijinja::context! { field => "email", field_error => message, values => super::ser(&fields_map(&fields)) };
            users_page(&state, &admin, &Paging::default(), StatusCode::CONFLICT, extra).await
        }
        Err(error) => failure(&state, &admin, error),
    }
}

async fn create_group(State(state): State<AppState>, Posted { admin, fields }: Posted) -> Response {
    let new = NewGroup {
        name: fields.get("name").unwrap_or_default().to_owned(),
        description: fields.get("description").unwrap_or_default().to_owned(),
    };
    let domain = state.enrollment.clone();
    let actor = admin.actor.clone();
    match blocking(move || domain.create_group(&actor, &new)).await {
        Ok(group) => {
            let extra = minijinja::context! { notice => format!("The group {} was added.", group.name) };
            users_page(&state, &admin, &Paging::default(), StatusCode::OK, extra).await
        }
        Err(error) => failure(&state, &admin, error),
    }
}

/// Renames a group (or changes its description); a name another group has is refused next to the field.
async fn rename_group(
    State(state): State<AppState>,
    Path(id): Path<String>,
    Posted { admin, fields }: Posted,
) -> Response {
    let Ok(id) = id.parse::<Id>() else {
        return message(&state, Some(&admin), StatusCode::NOT_FOUND, "Not found", "There is no such group.");
    };
    let change = NewGroup {
        name: fields.get("name").unwrap_or_default().to_owned(),
        description: fields.get("description").unwrap_or_default().to_owned(),
    };
    let domain = state.enrollment.clone();
    let actor = admin.actor.clone();
    match blocking(move || domain.update_group(&actor, &id, &change)).await {
        Ok(group) => {
            let extra = minijinja::context! { notice => format!("The group is saved as {}.", group.name) };
            users_page(&state, &admin, &Paging::default(), StatusCode::OK, extra).await
        }
        Err(error @ (crate::domain::DomainError::Conflict { .. } | crate::domain::DomainError::Invalid { .. })) => {
            let extra = minijinja::context! { group_id => id.to_string(), group_error => error.to_string() };
            users_page(&state, &admin, &Paging::default(), StatusCode::UNPROCESSABLE_ENTITY, extra).await
        }
        Err(error) => failure(&state, &admin, error),
    }
}

async fn audit(State(state): State<AppState>, SignedIn(admin): SignedIn, Query(paging): Query<Paging>) -> Response {
    let domain = state.enrollment.clone();
    let cursor = paging.cursor.clone();
    let page = match blocking(move || domain.audit_log(cursor.as_deref(), 50)).await {
        Ok(page) => page,
        Err(error) => return failure(&state, &admin, error),
    };
    let next_url = page
        .next_cursor
        .map(|c| format!("/admin/audit?cursor={}", form_urlencoded::byte_serialize(c.as_bytes()).collect::<String>()));
    let values = minijinja::context! { title => "Audit log", events => super::ser(&page.items), next_url => next_url };
    render(&state, Some(&admin), StatusCode::OK, "audit.html", values)
}

#[derive(Debug, Default, Deserialize)]
pub struct TemplateQuery {
    platform: Option<String>,
}

async fn templates_page(
    state: &AppState,
    admin: &Admin,
    status: StatusCode,
    platform: Platform,
    drafts: std::collections::BTreeMap<String, String>,
    extra: Value,
) -> Response {
    let (mail, domain) = (state.mail.clone(), state.enrollment.clone());
    let preview_drafts = drafts.clone();
    let gathered = tokio::task::spawn_blocking(move || {
        let sources = mail.template_sources(&domain)?;
        let preview = mail.preview(&domain, &preview_drafts, platform);
        Ok::<_, crate::mail::MailError>((sources, preview))
    })
    .await;
    let (sources, preview) = match gathered {
        Ok(Ok(gathered)) => gathered,
        Ok(Err(error)) => {
            return message(
                state,
                Some(admin),
                StatusCode::SERVICE_UNAVAILABLE,
                "The templates cannot be read",
                &error.to_string(),
            );
        }
        Err(_) => {
            return message(
                state,
                Some(admin),
                StatusCode::SERVICE_UNAVAILABLE,
                "Something went wrong",
                "Try again in a minute.",
            );
        }
    };
    let sources: Vec<Value> = sources
        .iter()
        .map(|t| {
            minijinja::context! {
                name => t.name.clone(),
                id => t.name.replace('.', "-"),
                source => drafts.get(&t.name).cloned().unwrap_or_else(|| t.source.clone()),
                customised => t.customised,
                updated => t.updated_at.map(|at| format!("{} by {}", crate::domain::minute(at), t.updated_by.clone().unwrap_or_default())),
            }
        })
        .collect();
    let (preview, preview_error) = match preview {
        Ok(rendered) => (
            Some(minijinja::context! { subject => rendered.subject, text => rendered.text, html => rendered.html }),
            None,
        ),
        Err(error) => (None, Some(error.to_string())),
    };
    let values = minijinja::context! {
        title => "Mail templates",
        templates => sources,
        platform => platform.as_str(),
        platforms => options(Platform::ALL),
        preview => preview,
        preview_error => preview_error,
        ..extra
    };
    render(state, Some(admin), status, "templates.html", values)
}

async fn templates(
    State(state): State<AppState>,
    SignedIn(admin): SignedIn,
    Query(query): Query<TemplateQuery>,
) -> Response {
    let platform = query.platform.and_then(|p| p.parse().ok()).unwrap_or(Platform::Ios);
    templates_page(&state, &admin, StatusCode::OK, platform, Default::default(), Value::from(())).await
}

/// Previews a draft, saves it (refused with its line and reason when it does not render for every platform), or
/// goes back to the built-in template.
async fn save_template(State(state): State<AppState>, Posted { admin, fields }: Posted) -> Response {
    let name = fields.get("name").unwrap_or_default().to_owned();
    let source = fields.0.iter().find(|(k, _)| k == "source").map(|(_, v)| v.clone()).unwrap_or_default();
    let platform = fields.get("platform").and_then(|p| p.parse().ok()).unwrap_or(Platform::Ios);
    let drafts = std::collections::BTreeMap::from([(name.clone(), source.clone())]);
    let (mail, domain, actor) = (state.mail.clone(), state.enrollment.clone(), admin.actor.clone());
    let done = match fields.get("do") {
        Some("preview") => {
            return templates_page(&state, &admin, StatusCode::OK, platform, drafts, Value::from(())).await;
        }
        Some("reset") => tokio::task::spawn_blocking(move || mail.reset_template(&domain, &actor, &name)).await,
        _ => tokio::task::spawn_blocking(move || mail.save_template(&domain, &actor, &name, &source)).await,
    };
    match done {
        Ok(Ok(())) => {
            templates_page(
                &state,
                &admin,
                StatusCode::OK,
                platform,
                Default::default(),
                minijinja::context! { notice => "Saved; new invites use it." },
            )
            .await
        }
        Ok(Err(error)) => {
            let extra = minijinja::context! { template_error => error.to_string(), template_name => fields.get("name").unwrap_or_default() };
            templates_page(&state, &admin, StatusCode::UNPROCESSABLE_ENTITY, platform, drafts, extra).await
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

/// Deletes a user after a confirmation that says what happens to their invites and devices.
async fn delete_user(
    State(state): State<AppState>,
    Path(id): Path<String>,
    Posted { admin, fields }: Posted,
) -> Response {
    let Ok(id) = id.parse::<Id>() else {
        return message(&state, Some(&admin), StatusCode::NOT_FOUND, "Not found", "There is no such user.");
    };
    if fields.get("confirmed") != Some("yes") {
        let domain = state.enrollment.clone();
        let user = match blocking(move || domain.user(&id)).await {
            Ok(user) => user,
            Err(error) => return failure(&state, &admin, error),
        };
        let values = minijinja::context! {
            title => format!("Delete {} <{}>?", user.name, user.email),
            text => "Their pending invites are removed (the links stop working). Their enrolled devices stay managed without a user, unless you choose to revoke MDM on them too.",
            action => format!("/admin/users/{id}/delete"),
            choices => vec![
                minijinja::context! { value => "unassign", label => "Keep their devices managed" },
                minijinja::context! { value => "revoke_mdm", label => "Revoke MDM on their devices" },
            ],
            button => "Delete the user",
            danger => true,
            cancel => "/admin/users",
        };
        return render(&state, Some(&admin), StatusCode::OK, "confirm.html", values);
    }
    let choice = match fields.get("devices") {
        Some("revoke_mdm") => Some(crate::domain::UserChoiceForDevices::RevokeMdm),
        _ => Some(crate::domain::UserChoiceForDevices::Unassign),
    };
    let domain = state.enrollment.clone();
    let actor = admin.actor.clone();
    match blocking(move || domain.delete_user(&actor, &id, choice)).await {
        Ok(()) => {
            let extra = minijinja::context! { notice => "The user was deleted." };
            users_page(&state, &admin, &Paging::default(), StatusCode::OK, extra).await
        }
        Err(error) => failure(&state, &admin, error),
    }
}

async fn delete_group(
    State(state): State<AppState>,
    Path(id): Path<String>,
    Posted { admin, fields }: Posted,
) -> Response {
    let Ok(id) = id.parse::<Id>() else {
        return message(&state, Some(&admin), StatusCode::NOT_FOUND, "Not found", "There is no such group.");
    };
    if fields.get("confirmed") != Some("yes") {
        let values = minijinja::context! {
            title => "Delete this group?",
            text => "Its members, invites and devices stay; they are just no longer in the group.",
            action => format!("/admin/groups/{id}/delete"),
            button => "Delete the group",
            danger => true,
            cancel => "/admin/users",
        };
        return render(&state, Some(&admin), StatusCode::OK, "confirm.html", values);
    }
    let domain = state.enrollment.clone();
    let actor = admin.actor.clone();
    match blocking(move || domain.delete_group(&actor, &id)).await {
        Ok(()) => {
            let extra = minijinja::context! { notice => "The group was deleted; its members stay." };
            users_page(&state, &admin, &Paging::default(), StatusCode::OK, extra).await
        }
        Err(error) => failure(&state, &admin, error),
    }
}

/// A multipart form of `admin`'s: its text fields and its `file` (name and bytes), with the same-origin and CSRF
/// checks every form gets.
pub(super) async fn read_form(
    state: &AppState,
    headers: &HeaderMap,
    admin: &Admin,
    mut multipart: Multipart,
) -> Result<(Fields, Option<(Option<String>, Vec<u8>)>), Response> {
    let unreadable = |status, title: &str, error: axum::extract::multipart::MultipartError| {
        message(state, Some(admin), status, title, &error.body_text())
    };
    let mut fields = Fields::default();
    let mut file = None;
    loop {
        let field = match multipart.next_field().await {
            Ok(Some(field)) => field,
            Ok(None) => break,
            Err(error) => return Err(unreadable(StatusCode::BAD_REQUEST, "The upload could not be read", error)),
        };
        let name = field.name().unwrap_or_default().to_owned();
        if name == "file" {
            let filename = field.file_name().map(str::to_owned);
            match field.bytes().await {
                Ok(bytes) => file = Some((filename, bytes.to_vec())),
                Err(error) => return Err(unreadable(StatusCode::PAYLOAD_TOO_LARGE, "The file is too large", error)),
            }
        } else if let Ok(text) = field.text().await {
            fields.0.push((name, text));
        }
    }
    match super::verify_form(state, headers, admin, &fields) {
        Some(refused) => Err(refused),
        None => Ok((fields, file)),
    }
}

async fn edit_user_form(state: &AppState, admin: &Admin, id: Id, status: StatusCode, extra: Value) -> Response {
    let domain = state.enrollment.clone();
    let found = blocking(move || Ok((domain.user(&id)?, domain.groups(None, 500)?))).await;
    let (user, groups) = match found {
        Ok(found) => found,
        Err(error) => return failure(state, admin, error),
    };
    let values = minijinja::context! {
        title => format!("Edit {}", user.name),
        user => super::ser(&user),
        groups => super::ser(&groups.items),
        ..extra
    };
    render(state, Some(admin), status, "user.html", values)
}

async fn edit_user_page(State(state): State<AppState>, Path(id): Path<String>, SignedIn(admin): SignedIn) -> Response {
    let Ok(id) = id.parse::<Id>() else {
        return message(&state, Some(&admin), StatusCode::NOT_FOUND, "Not found", "There is no such user.");
    };
    edit_user_form(&state, &admin, id, StatusCode::OK, Value::from(())).await
}

/// Saves a user's name, email, phone and groups; a refusal shows next to its field.
async fn edit_user(
    State(state): State<AppState>,
    Path(id): Path<String>,
    Posted { admin, fields }: Posted,
) -> Response {
    let Ok(id) = id.parse::<Id>() else {
        return message(&state, Some(&admin), StatusCode::NOT_FOUND, "Not found", "There is no such user.");
    };
    let patch = crate::domain::UserPatch {
        name: fields.get("name").map(str::to_owned),
        email: fields.get("email").map(str::to_owned),
        phone: Some(fields.get("phone").map(str::to_owned)),
        domain: None,
        notes: None,
        groups: Some(fields.all("groups").iter().filter_map(|g| g.parse().ok()).collect()),
    };
    let domain = state.enrollment.clone();
    let actor = admin.actor.clone();
    match blocking(move || domain.update_user(&actor, &id, &patch)).await {
        Ok(user) => {
            let extra = minijinja::context! { notice => format!("{} <{}> was saved.", user.name, user.email) };
            users_page(&state, &admin, &Paging::default(), StatusCode::OK, extra).await
        }
        Err(crate::domain::DomainError::Invalid { field, message }) => {
            let extra = minijinja::context! { field => field, field_error => message, typed => super::ser(&fields_map(&fields)) };
            edit_user_form(&state, &admin, id, StatusCode::UNPROCESSABLE_ENTITY, extra).await
        }
        Err(crate::domain::DomainError::Conflict { message, .. }) => {
            let extra = minijinja::context! { field => "email", field_error => message, typed => super::ser(&fields_map(&fields)) };
            edit_user_form(&state, &admin, id, StatusCode::CONFLICT, extra).await
        }
        Err(error) => failure(&state, &admin, error),
    }
}
