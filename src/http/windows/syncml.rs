//! `/ManagementServer/MDM.svc`: OMA-DM 1.2 sessions (SyncML over HTTPS, MS-MDM) from enrolled Windows PCs. The
//! TLS client certificate is the device's identity (issued at enrollment). The first session's `./DevInfo`
//! enrolls the device; alert 1226 (the user unenrolled) makes it Unmanaged; queued *revoke MDM* and *factory
//! reset* go out as `Exec` commands, and the device's `Status` for them finishes them.

use axum::Extension;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use roxmltree::Node;

use super::{PROVIDER_ID, child, text_of};
use crate::domain::{Actor, DevInfo, IdentityProblem};
use crate::http::AppState;
use crate::http::api::access::ClientAddr;
use crate::http::serve::ClientCertificate;
use crate::model::CommandKind;

const CONTENT_TYPE: &str = "application/vnd.syncml.dm+xml";
/// The node that unenrolls the PC from the management server named in its data (revoke MDM).
pub const UNENROLL_URI: &str = "./Device/Vendor/MSFT/DMClient/Unenroll";
/// The node that erases the PC (factory reset).
pub const WIPE_URI: &str = "./Device/Vendor/MSFT/RemoteWipe/doWipe";
/// The CmdIDs our commands go out under: fixed per kind, above the statuses' (numbered from 1), so a status's
/// CmdRef names the command in any later message.
const UNENROLL_CMD_ID: &str = "9001";
const WIPE_CMD_ID: &str = "9002";
const SOFTWARE_VERSION_CMD_ID: &str = "9003";
/// The OS version, which `./DevInfo` does not carry.
const SOFTWARE_VERSION_URI: &str = "./DevDetail/SwV";
/// The generic alert that, with [`UNENROLL_TYPE`], says the user unenrolled the PC.
const ALERT_UNENROLL: &str = "1226";
const UNENROLL_TYPE: &str = "com.microsoft:mdm.unenrollment.userrequest";

/// One OMA-DM message from the device, and the answer.
pub async fn session(
    State(state): State<AppState>,
    ClientAddr(client): ClientAddr,
    certificate: Option<Extension<ClientCertificate>>,
    body: Bytes,
) -> Response {
    let Some(Extension(ClientCertificate(der))) = certificate else {
        // Until the device-identity CA is ready, TLS asks for no certificate: that is not the device's fault.
        if let Err(refusal) = state.mdm.scep() {
            return refusal.into_response();
        }
        return (StatusCode::UNAUTHORIZED, "present the client certificate issued at enrollment").into_response();
    };
    let Ok(text) = std::str::from_utf8(&body) else {
        return (StatusCode::BAD_REQUEST, "the message is not UTF-8").into_response();
    };
    let options = super::parsing_options();
    let doc = match roxmltree::Document::parse_with_options(text, options) {
        Ok(doc) => doc,
        Err(error) => return (StatusCode::BAD_REQUEST, format!("not well-formed XML: {error}")).into_response(),
    };
    let root = doc.root_element();
    let (Some(header_node), Some(body_node)) = (child(root, "SyncHdr"), child(root, "SyncBody")) else {
        return (StatusCode::BAD_REQUEST, "not a SyncML message (SyncHdr and SyncBody)").into_response();
    };
    let session_id = text_of(header_node, "SessionID").unwrap_or_default();
    let msg_id = text_of(header_node, "MsgID").unwrap_or_else(|| "1".into());
    let device_uri = child(header_node, "Source").and_then(|s| text_of(s, "LocURI")).unwrap_or_default();
    let commands: Vec<Node<'_, '_>> = body_node.children().filter(|n| n.is_element()).collect();

    let dev_info = dev_info(&commands);
    // Windows sends the generic alert 1226 for other things too; only this type means the user unenrolled.
    let unenrolled = commands.iter().any(|c| {
        c.tag_name().name() == "Alert"
            && text_of(*c, "Data").as_deref() == Some(ALERT_UNENROLL)
            && text_of(*c, "Type").as_deref() == Some(UNENROLL_TYPE)
    });
    // Statuses for the commands we sent. Each kind of command goes out under its own CmdID, so the status's
    // CmdRef says which it was (its TargetRef, which MS-MDM makes optional, is read when there is one).
    let results: Vec<(CommandKind, bool, String)> = commands
        .iter()
        .filter(|c| c.tag_name().name() == "Status" && text_of(**c, "Cmd").as_deref() == Some("Exec"))
        .filter_map(|status| {
            let by_ref = match text_of(*status, "CmdRef").as_deref() {
                Some(UNENROLL_CMD_ID) => Some(CommandKind::RevokeMdm),
                Some(WIPE_CMD_ID) => Some(CommandKind::FactoryReset),
                _ => None,
            };
            let by_target = match text_of(*status, "TargetRef").as_deref() {
                Some(UNENROLL_URI) => Some(CommandKind::RevokeMdm),
                Some(WIPE_URI) => Some(CommandKind::FactoryReset),
                _ => None,
            };
            let kind = by_ref.or(by_target)?;
            let code = text_of(*status, "Data").unwrap_or_default();
            Some((kind, code.starts_with('2'), code))
        })
        .collect();

    let sha256 = crate::pki::sha256_hex(&der);
    let domain = state.enrollment.clone();
    let actor = Actor::device(client);
    let outcome = tokio::task::spawn_blocking(move || {
        let device = match domain.windows_session(&actor, &sha256, &dev_info)? {
            Ok(device) => device,
            Err(problem) => return Ok(Err(problem)),
        };
        for (kind, done, code) in results {
            if let Some(command) = device.pending_commands.iter().find(|c| c.kind == kind) {
                domain.command_finished(&actor, &device.id, &command.id, done, &format!("SyncML status {code}"))?;
            }
        }
        if unenrolled {
            domain.device_checked_out(&actor, &device.id)?;
            return Ok(Ok((Vec::new(), true)));
        }
        let device = domain.device(&device.id)?;
        Ok::<_, crate::domain::DomainError>(Ok((device.pending_commands, device.os_version.is_some())))
    })
    .await;
    let (pending, knows_version) = match outcome {
        Ok(Ok(Ok(found))) => found,
        Ok(Ok(Err(problem))) => {
            let reason = match problem {
                IdentityProblem::Unknown => "this certificate was not issued to an enrolled Windows PC",
                IdentityProblem::Superseded => "this PC enrolled again with another certificate",
                IdentityProblem::Unmanaged => "this PC is no longer managed",
                IdentityProblem::OtherDevice => {
                    "refused: this session names another PC than the one its certificate was issued to"
                }
            };
            return (StatusCode::FORBIDDEN, reason).into_response();
        }
        Ok(Err(crate::domain::DomainError::Conflict { message, .. })) => {
            return (StatusCode::FORBIDDEN, message).into_response();
        }
        Ok(Err(error)) => {
            tracing::error!(%error, "a Windows management session failed");
            return (StatusCode::INTERNAL_SERVER_ERROR, "the session could not be recorded; try again").into_response();
        }
        Err(_) => return StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    };

    // The answer: a status for the header and for each of the device's commands (statuses are not answered), then
    // the queued commands that go out as Exec.
    let mut reply = Reply::default();
    reply.status(&msg_id, "0", "SyncHdr", "200");
    for command in &commands {
        let name = command.tag_name().name();
        if matches!(name, "Status" | "Final") {
            continue;
        }
        reply.status(&msg_id, &text_of(*command, "CmdID").unwrap_or_default(), name, "200");
    }
    // DevInfo has no OS version; DevDetail does.
    if !knows_version {
        reply.get(SOFTWARE_VERSION_CMD_ID, SOFTWARE_VERSION_URI);
    }
    for command in pending {
        match command.kind {
            CommandKind::RevokeMdm => reply.exec(UNENROLL_CMD_ID, UNENROLL_URI, Some(PROVIDER_ID)),
            CommandKind::FactoryReset => reply.exec(WIPE_CMD_ID, WIPE_URI, None),
            // Facts come with every session's DevInfo.
            CommandKind::DeviceInformation => {}
        }
    }
    let server_uri = format!("{}/ManagementServer/MDM.svc", state.naming.public_url());
    let xml = reply.finish(&session_id, &msg_id, &device_uri, &server_uri);
    ([(header::CONTENT_TYPE, CONTENT_TYPE)], xml).into_response()
}

/// `./DevInfo/*` from the session's `Replace` (or `Results`) items.
fn dev_info(commands: &[Node<'_, '_>]) -> DevInfo {
    let mut info = DevInfo::default();
    for item in commands
        .iter()
        .filter(|c| matches!(c.tag_name().name(), "Replace" | "Results"))
        .flat_map(|c| c.children().filter(|n| n.is_element() && n.tag_name().name() == "Item"))
    {
        let Some(uri) = child(item, "Source").and_then(|s| text_of(s, "LocURI")) else { continue };
        let data = text_of(item, "Data");
        match uri.as_str() {
            "./DevInfo/DevId" => info.dev_id = data,
            "./DevInfo/Man" => info.manufacturer = data,
            "./DevInfo/Mod" => info.model = data,
            "./DevInfo/SwV" | SOFTWARE_VERSION_URI => info.software_version = data,
            "./DevInfo/Lang" => info.language = data,
            _ => {}
        }
    }
    info
}

/// The body of an answer, with its command ids numbered as they are added.
#[derive(Default)]
struct Reply {
    body: String,
    next: u32,
}

impl Reply {
    fn id(&mut self) -> u32 {
        self.next += 1;
        self.next
    }

    fn status(&mut self, msg_ref: &str, cmd_ref: &str, cmd: &str, code: &str) {
        let id = self.id();
        self.body.push_str(&format!(
            "<Status><CmdID>{id}</CmdID><MsgRef>{}</MsgRef><CmdRef>{}</CmdRef><Cmd>{}</Cmd><Data>{code}</Data></Status>",
            escape(msg_ref),
            escape(cmd_ref),
            escape(cmd)
        ));
    }

    fn get(&mut self, id: &str, uri: &str) {
        self.body.push_str(&format!(
            "<Get><CmdID>{id}</CmdID><Item><Target><LocURI>{}</LocURI></Target></Item></Get>",
            escape(uri)
        ));
    }

    fn exec(&mut self, id: &str, uri: &str, data: Option<&str>) {
        let data = data
            .map(|d| format!("<Meta><Format xmlns=\"syncml:metinf\">chr</Format></Meta><Data>{}</Data>", escape(d)))
            .unwrap_or_default();
        self.body.push_str(&format!(
            "<Exec><CmdID>{id}</CmdID><Item><Target><LocURI>{}</LocURI></Target>{data}</Item></Exec>",
            escape(uri)
        ));
    }

    fn finish(self, session_id: &str, msg_id: &str, device: &str, server: &str) -> String {
        format!(
            "<SyncML xmlns=\"SYNCML:SYNCML1.2\"><SyncHdr><VerDTD>1.2</VerDTD><VerProto>DM/1.2</VerProto><SessionID>{}</SessionID><MsgID>{}</MsgID><Target><LocURI>{}</LocURI></Target><Source><LocURI>{}</LocURI></Source></SyncHdr><SyncBody>{}<Final/></SyncBody></SyncML>",
            escape(session_id),
            escape(msg_id),
            escape(device),
            escape(server),
            self.body
        )
    }
}

fn escape(text: &str) -> String {
    super::xml_escape(text)
}
