//! The Enrollment page and its three tabs: *Enrollment Pending* (invites), *Managed* (devices) and *Staged*, each
//! with search, filters, paging and its CSV export, and the actions on their rows: resend, remove (one or many,
//! after a confirmation naming how many), the steps a user sees, another device for the same user, deprovisioning
//! (with a confirmation that says what it does), reassigning, and removing staged devices.

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use minijinja::Value;
use serde::Deserialize;

use super::{Admin, Posted, SignedIn, blocking, failure, message, render};
use crate::domain::{
    AdditionalInvite, BulkSelection, DeprovisionKind, DeviceQuery, InviteQuery, StagedAssignment, StagedQuery,
};
use crate::http::AppState;
use crate::model::{DeviceStatus, Id, InviteStatus, Ownership, Platform};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/admin/enrollment", get(enrollment))
        .route("/admin/invites/bulk", post(bulk))
        .route("/admin/invites/{id}/{action}", post(invite_action))
        .route("/admin/invites/{id}/steps", get(steps))
        .route("/admin/devices/{id}/{action}", post(device_action))
        .route("/admin/staged/{id}/{action}", post(staged_action))
        .route("/admin/staged/assign", post(assign_staged))
}

#[derive(Debug, Default, Deserialize)]
pub struct ListFilter {
    tab: Option<String>,
    q: Option<String>,
    status: Option<String>,
    platform: Option<String>,
    group: Option<String>,
    order: Option<String>,
    cursor: Option<String>,
    notice: Option<String>,
}

const PAGE_SIZE: usize = 50;

/// Notices a redirect may carry: a code from a fixed list, so nothing a link says is shown as text.
fn notice_text(code: Option<&str>) -> Option<&'static str> {
    Some(match code? {
        "resent" => "The invite was sent again, with a new link and passcode.",
        "removed" => "The invite was removed; its link no longer works.",
        "bulk" => "Done; the results are in each row's remarks.",
        "additional" => "A new invite for another device was sent.",
        "deprovision" => "The command is queued; the device receives it at its next check-in.",
        "reassigned" => "The device now belongs to the chosen user.",
        "staged_removed" => "The staged device was removed.",
        "staged_assigned" => "The staged devices were assigned.",
        "invited" => "The invite is on its way.",
        _ => return None,
    })
}

fn optional<T: std::str::FromStr>(text: Option<&str>) -> Option<T> {
    text.filter(|t| !t.is_empty() && *t != "all").and_then(|t| t.parse().ok())
}

async fn enrollment(
    State(state): State<AppState>,
    SignedIn(admin): SignedIn,
    Query(filter): Query<ListFilter>,
) -> Response {
    let tab = match filter.tab.as_deref() {
        Some("managed") => "managed",
        Some("staged") => "staged",
        _ => "pending",
    }
    .to_owned();
    let domain = state.enrollment.clone();
    let groups = match blocking(move || domain.groups(None, 500)).await {
        Ok(groups) => groups.items,
        Err(error) => return failure(&state, &admin, error),
    };
    let group_options: Vec<Value> =
        groups.iter().map(|g| Value::from_pairs([("id", g.id.to_string()), ("name", g.name.clone())])).collect();
    let group_name = |id: Option<Id>| id.and_then(|id| groups.iter().find(|g| g.id == id)).map(|g| g.name.clone());
    let (rows, next) = match tab.as_str() {
        "managed" => match managed_rows(&state, &filter).await {
            Ok((rows, next)) => (
                rows.into_iter()
                    .map(|(d, user)| {
                        let mut view = super::ser(&d);
                        view = minijinja::context! { ..view, ..minijinja::context! {
                            user_name => user.as_ref().map(|u| u.name.clone()),
                            email => user.map(|u| u.email),
                            group_name => group_name(d.group_id),
                            erasable => d.ownership == Ownership::Corporate,
                        }};
                        view
                    })
                    .collect::<Vec<_>>(),
                next,
            ),
            Err(error) => return failure(&state, &admin, error),
        },
        "staged" => {
            let domain = state.enrollment.clone();
            let cursor = filter.cursor.clone();
            let wanted = StagedQuery {
                q: filter.q.clone(),
                platform: optional(filter.platform.as_deref()),
                group_id: optional(filter.group.as_deref()),
            };
            // The staged list has no index to search: pages are read until a page of matches is found (or the
            // end), and the next link goes on from where the reading stopped.
            let found = blocking(move || {
                let mut cursor = cursor;
                let mut rows = Vec::new();
                loop {
                    let page = domain.staged(cursor.as_deref(), 500)?;
                    let next = page.next_cursor.clone();
                    for staged in page.items {
                        if rows.len() < PAGE_SIZE && wanted.matches(&staged) {
                            rows.push(staged);
                        }
                    }
                    if rows.len() >= PAGE_SIZE || next.is_none() {
                        return Ok(crate::domain::Paged { items: rows, next_cursor: next });
                    }
                    cursor = next;
                }
            })
            .await;
            match found {
                Ok(page) => {
                    let rows = page
                        .items
                        .into_iter()
                        .map(|s| {
                            let group = group_name(s.group_id);
                            minijinja::context! { ..super::ser(&s), ..minijinja::context! { group_name => group } }
                        })
                        .collect();
                    (rows, page.next_cursor)
                }
                Err(error) => return failure(&state, &admin, error),
            }
        }
        _ => {
            let query = InviteQuery {
                status: match filter.status.as_deref() {
                    None | Some("") => Some(InviteStatus::Pending),
                    other => optional(other),
                },
                platform: optional(filter.platform.as_deref()),
                group_id: optional(filter.group.as_deref()),
                user_id: None,
                q: filter.q.clone().filter(|q| !q.trim().is_empty()),
                order: filter.order.clone(),
                cursor: filter.cursor.clone(),
                limit: Some(PAGE_SIZE),
            };
            let domain = state.enrollment.clone();
            match blocking(move || domain.invites(&query)).await {
                Ok(page) => (page.items.iter().map(super::ser).collect(), page.next_cursor),
                Err(error) => return failure(&state, &admin, error),
            }
        }
    };
    let next_url = next.map(|cursor| {
        let mut query = form_urlencoded::Serializer::new(String::new());
        query.append_pair("tab", &tab);
        for (key, value) in [
            ("q", &filter.q),
            ("status", &filter.status),
            ("platform", &filter.platform),
            ("group", &filter.group),
            ("order", &filter.order),
        ] {
            if let Some(value) = value.as_deref().filter(|v| !v.is_empty()) {
                query.append_pair(key, value);
            }
        }
        query.append_pair("cursor", &cursor);
        format!("/admin/enrollment?{}", query.finish())
    });
    let export_url = {
        let mut query = form_urlencoded::Serializer::new(String::new());
        for (key, value) in [("q", &filter.q), ("platform", &filter.platform), ("group_id", &filter.group)] {
            if let Some(value) = value.as_deref().filter(|v| !v.is_empty() && *v != "all") {
                query.append_pair(key, value);
            }
        }
        let status = filter.status.as_deref().filter(|s| !s.is_empty() && *s != "all");
        match (tab.as_str(), status) {
            ("pending", None) => {
                query.append_pair("status", "pending");
            }
            ("staged", _) => {}
            (_, Some(status)) => {
                query.append_pair("status", status);
            }
            _ => {}
        }
        let list = match tab.as_str() {
            "managed" => "devices",
            "staged" => "staged",
            _ => "invites",
        };
        format!("/api/v1/{list}/export?{}", query.finish())
    };
    let values = Value::from_pairs([
        ("title", Value::from("Enrollment")),
        ("tab", Value::from(tab.clone())),
        ("export_url", Value::from(export_url)),
        ("rows", Value::from(rows)),
        ("next_url", Value::from(next_url)),
        ("groups", Value::from(group_options)),
        ("q", Value::from(filter.q.clone().unwrap_or_default())),
        ("status", Value::from(filter.status.clone().unwrap_or_default())),
        ("platform", Value::from(filter.platform.clone().unwrap_or_default())),
        ("group", Value::from(filter.group.clone().unwrap_or_default())),
        ("order", Value::from(filter.order.clone().unwrap_or_default())),
        ("platforms", Value::from(Platform::ALL.iter().map(|p| p.as_str()).collect::<Vec<_>>())),
        ("notice", Value::from(notice_text(filter.notice.as_deref()))),
    ]);
    render(&state, Some(&admin), StatusCode::OK, "enrollment.html", values)
}

type ManagedRows = (Vec<(crate::model::Device, Option<crate::model::User>)>, Option<String>);

async fn managed_rows(state: &AppState, filter: &ListFilter) -> Result<ManagedRows, crate::domain::DomainError> {
    let query = DeviceQuery {
        status: optional::<DeviceStatus>(filter.status.as_deref()),
        platform: optional(filter.platform.as_deref()),
        group_id: optional(filter.group.as_deref()),
        user_id: None,
        q: filter.q.clone().filter(|q| !q.trim().is_empty()),
        cursor: filter.cursor.clone(),
        limit: Some(PAGE_SIZE),
    };
    let domain = state.enrollment.clone();
    blocking(move || {
        let page = domain.devices(&query)?;
        let rows = page
            .items
            .into_iter()
            .map(|d| {
                let user = d.user_id.and_then(|id| domain.user(&id).ok());
                (d, user)
            })
            .collect();
        Ok((rows, page.next_cursor))
    })
    .await
}

fn back(tab: &str, notice: &str) -> Response {
    Redirect::to(&format!("/admin/enrollment?tab={tab}&notice={notice}")).into_response()
}

async fn invite_action(
    State(state): State<AppState>,
    Path((id, action)): Path<(String, String)>,
    Posted { admin, fields }: Posted,
) -> Response {
    let Ok(id) = id.parse::<Id>() else {
        return message(&state, Some(&admin), StatusCode::NOT_FOUND, "Not found", "There is no such invite.");
    };
    let domain = state.enrollment.clone();
    let actor = admin.actor.clone();
    let done = match action.as_str() {
        "resend" => blocking(move || domain.resend_invite(&actor, &id).map(|_| "resent")).await,
        "remove" => blocking(move || domain.remove_invite(&actor, &id).map(|_| "removed")).await,
        "additional" => {
            let extra = AdditionalInvite { platform: optional(fields.get("platform")), ..AdditionalInvite::default() };
            blocking(move || domain.additional_invite(&actor, &id, &extra).map(|_| "additional")).await
        }
        _ => return message(&state, Some(&admin), StatusCode::NOT_FOUND, "Not found", "There is no such action."),
    };
    match done {
        Ok(notice) => back("pending", notice),
        Err(error) => failure(&state, &admin, error),
    }
}

/// Bulk resend or remove of the checked rows: first a confirmation that names how many, then the action.
async fn bulk(State(state): State<AppState>, Posted { admin, fields }: Posted) -> Response {
    let ids: Vec<Id> = fields.all("ids").iter().filter_map(|id| id.parse().ok()).collect();
    let action = fields.get("action").unwrap_or_default().to_owned();
    if ids.is_empty() {
        return message(
            &state,
            Some(&admin),
            StatusCode::UNPROCESSABLE_ENTITY,
            "Nothing selected",
            "Tick the rows to act on, then choose the action.",
        );
    }
    let verb = match action.as_str() {
        "resend" => "Resend",
        "remove" => "Remove",
        _ => {
            return message(
                &state,
                Some(&admin),
                StatusCode::UNPROCESSABLE_ENTITY,
                "Choose an action",
                "Resend or remove.",
            );
        }
    };
    if fields.get("confirmed") != Some("yes") {
        let what = if action == "resend" {
            "Each gets a new link and passcode by its channels; the old links stop working."
        } else {
            "Their links stop working at once. This cannot be undone; send new invites instead."
        };
        let values = Value::from_pairs([
            ("title", Value::from(format!("{verb} {} invite{}?", ids.len(), if ids.len() == 1 { "" } else { "s" }))),
            ("text", Value::from(what)),
            ("action", Value::from("/admin/invites/bulk")),
            ("fields", Value::from(vec![Value::from_pairs([("name", "action"), ("value", action.as_str())])])),
            ("ids", Value::from(ids.iter().map(|i| i.to_string()).collect::<Vec<_>>())),
            ("button", Value::from(format!("{verb} {}", ids.len()))),
            ("cancel", Value::from("/admin/enrollment")),
        ]);
        return render(&state, Some(&admin), StatusCode::OK, "confirm.html", values);
    }
    let domain = state.enrollment.clone();
    let actor = admin.actor.clone();
    let selection = BulkSelection { ids: Some(ids), filter: None };
    let done = if action == "resend" {
        blocking(move || domain.bulk_resend(&actor, &selection)).await
    } else {
        blocking(move || domain.bulk_remove(&actor, &selection)).await
    };
    match done {
        Ok(outcomes) if outcomes.iter().all(|o| o.ok) => back("pending", "bulk"),
        Ok(outcomes) => {
            let failed: Vec<String> = outcomes
                .iter()
                .filter(|o| !o.ok)
                .map(|o| format!("{}: {}", o.id, o.error.clone().unwrap_or_default()))
                .collect();
            let text = format!(
                "{} of {} done. Not done: {}",
                outcomes.len() - failed.len(),
                outcomes.len(),
                failed.join("; ")
            );
            message(&state, Some(&admin), StatusCode::OK, "Some invites were not changed", &text)
        }
        Err(error) => failure(&state, &admin, error),
    }
}

/// What the user sees on the enrollment page for this invite's platform.
async fn steps(State(state): State<AppState>, Path(id): Path<String>, SignedIn(admin): SignedIn) -> Response {
    let Ok(id) = id.parse::<Id>() else {
        return message(&state, Some(&admin), StatusCode::NOT_FOUND, "Not found", "There is no such invite.");
    };
    let domain = state.enrollment.clone();
    let invite = match blocking(move || domain.invite(&id)).await {
        Ok(invite) => invite,
        Err(error) => return failure(&state, &admin, error),
    };
    let platforms: Vec<Platform> = match invite.platform {
        Platform::Any => vec![Platform::Ios, Platform::Ipados, Platform::Macos, Platform::Android, Platform::Windows],
        platform => vec![platform],
    };
    let sections: Vec<Value> = platforms
        .into_iter()
        .map(|p| {
            Value::from_pairs([
                ("platform", Value::from(crate::http::enroll::platform_name(p))),
                ("trust", Value::from(crate::http::enroll::trust_steps(p))),
                ("steps", Value::from(crate::http::enroll::enroll_steps(p))),
            ])
        })
        .collect();
    let text =
        format!("What {} <{}> sees after opening the link and entering the passcode.", invite.user_name, invite.email);
    let values = Value::from_pairs([
        ("title", Value::from("Enrollment steps")),
        ("text", Value::from(text)),
        ("sections", Value::from(sections)),
    ]);
    render(&state, Some(&admin), StatusCode::OK, "message.html", values)
}

async fn device_action(
    State(state): State<AppState>,
    Path((id, action)): Path<(String, String)>,
    Posted { admin, fields }: Posted,
) -> Response {
    let Ok(id) = id.parse::<Id>() else {
        return message(&state, Some(&admin), StatusCode::NOT_FOUND, "Not found", "There is no such device.");
    };
    let domain = state.enrollment.clone();
    let actor = admin.actor.clone();
    match action.as_str() {
        "revoke" | "reset" => {
            let kind = if action == "revoke" { DeprovisionKind::RevokeMdm } else { DeprovisionKind::FactoryReset };
            if fields.get("confirmed") != Some("yes") {
                return confirm_deprovision(&state, &admin, id, kind, &action);
            }
            match blocking(move || domain.deprovision_device(&actor, &id, kind)).await {
                Ok(device) => {
                    state.mdm.wake(&state, device.id);
                    back("managed", "deprovision")
                }
                Err(error) => failure(&state, &admin, error),
            }
        }
        "reassign" => {
            let email = fields.get("email").unwrap_or_default().to_owned();
            let done = blocking(move || {
                let user = domain.user_by_email(&email)?.ok_or_else(|| {
                    crate::domain::DomainError::invalid(
                        "email",
                        format!("no user has the address {email}; create the user first"),
                    )
                })?;
                domain.reassign_device(&actor, &id, &user.id)
            })
            .await;
            match done {
                Ok(_) => back("managed", "reassigned"),
                Err(error) => failure(&state, &admin, error),
            }
        }
        "additional" => {
            match blocking(move || domain.additional_invite_for_device(&actor, &id, &AdditionalInvite::default())).await
            {
                Ok(_) => back("managed", "additional"),
                Err(error) => failure(&state, &admin, error),
            }
        }
        _ => message(&state, Some(&admin), StatusCode::NOT_FOUND, "Not found", "There is no such action."),
    }
}

fn confirm_deprovision(state: &AppState, admin: &Admin, id: Id, kind: DeprovisionKind, action: &str) -> Response {
    let (title, text, button) = match kind {
        DeprovisionKind::RevokeMdm => (
            "Revoke device management?",
            "The management profile and everything the organisation installed through it (settings, apps, certificates) are removed from the device at its next check-in. The device and the user's own data stay as they are. The device shows as Unmanaged.",
            "Revoke MDM",
        ),
        DeprovisionKind::FactoryReset => (
            "Erase this device?",
            "At its next check-in the device is erased to factory settings: every app, account, file and setting on it is deleted, and this cannot be undone. Only corporate devices can be erased.",
            "Erase the device",
        ),
    };
    let values = Value::from_pairs([
        ("title", Value::from(title)),
        ("text", Value::from(text)),
        ("action", Value::from(format!("/admin/devices/{id}/{action}"))),
        ("button", Value::from(button)),
        ("danger", Value::from(true)),
        ("cancel", Value::from("/admin/enrollment?tab=managed")),
    ]);
    render(state, Some(admin), StatusCode::OK, "confirm.html", values)
}

/// Removes a staged device, or invites its user to enroll it ("re-enroll").
async fn staged_action(
    State(state): State<AppState>,
    Path((id, action)): Path<(String, String)>,
    Posted { admin, .. }: Posted,
) -> Response {
    let Ok(id) = id.parse::<Id>() else {
        return message(&state, Some(&admin), StatusCode::NOT_FOUND, "Not found", "There is no such staged device.");
    };
    let domain = state.enrollment.clone();
    let actor = admin.actor.clone();
    let done = match action.as_str() {
        "remove" => blocking(move || domain.remove_staged(&actor, &id).map(|()| "staged_removed")).await,
        "reenroll" => {
            blocking(move || domain.reenroll_staged(&actor, &id, &AdditionalInvite::default()).map(|_| "invited")).await
        }
        _ => return message(&state, Some(&admin), StatusCode::NOT_FOUND, "Not found", "There is no such action."),
    };
    match done {
        Ok(notice) => back("staged", notice),
        Err(error) => failure(&state, &admin, error),
    }
}

/// Assigns the ticked staged devices to a user (by email) and/or a group.
async fn assign_staged(State(state): State<AppState>, Posted { admin, fields }: Posted) -> Response {
    let ids: Vec<Id> = fields.all("ids").iter().filter_map(|id| id.parse().ok()).collect();
    if ids.is_empty() {
        return message(
            &state,
            Some(&admin),
            StatusCode::UNPROCESSABLE_ENTITY,
            "Nothing selected",
            "Tick the staged devices to assign first.",
        );
    }
    let email = fields.get("email").map(str::to_owned);
    let group_id: Option<Id> = optional(fields.get("group"));
    let domain = state.enrollment.clone();
    let actor = admin.actor.clone();
    let done = blocking(move || {
        let user_id = match email {
            Some(email) => Some(
                domain
                    .user_by_email(&email)?
                    .ok_or_else(|| {
                        crate::domain::DomainError::invalid("email", format!("no user has the address {email}"))
                    })?
                    .id,
            ),
            None => None,
        };
        domain.assign_staged(&actor, &StagedAssignment { ids, user_id, group_id })
    })
    .await;
    match done {
        Ok(_) => back("staged", "staged_assigned"),
        Err(error) => failure(&state, &admin, error),
    }
}
