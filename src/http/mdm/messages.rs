//! The plist messages of Apple's MDM protocol: check-in messages (`Authenticate`, `TokenUpdate`, `CheckOut`),
//! the reports a device sends to the command endpoint (`Status`, `CommandUUID`, results), and the commands enrolld
//! sends (`DeviceInformation`, `RemoveProfile`, `EraseDevice`). Keys and types follow Apple's published schemas
//! (apple/device-management: `mdm/checkin/*.yaml`, `mdm/commands/*.yaml`).

use plist::{Dictionary, Value};

use crate::domain::{Actor, AppleFacts, DeviceFacts, DomainError, DomainResult, Enrollment};
use crate::model::{ApplePush, CommandKind, Id, PendingCommand};

/// What `DeviceInformation` asks for: what the device list shows.
pub const DEVICE_QUERIES: &[&str] =
    &["DeviceName", "Model", "ModelName", "ProductName", "OSVersion", "BuildVersion", "SerialNumber", "IMEI", "UDID"];

/// A check-in message.
#[derive(Debug, Clone, PartialEq)]
pub enum CheckIn {
    Authenticate(AppleFacts),
    TokenUpdate(ApplePush),
    CheckOut,
    UserAuthenticate,
    /// A message on the user channel (it carries `UserID`), which enrolld does not manage.
    UserChannel(String),
    Other(String),
}

fn read(body: &[u8]) -> Result<Dictionary, String> {
    match plist::from_bytes::<Value>(body) {
        Ok(Value::Dictionary(dict)) => Ok(dict),
        Ok(_) => Err("the message is not a plist dictionary".into()),
        Err(error) => Err(format!("the message is not a readable plist: {error}")),
    }
}

fn text(dict: &Dictionary, key: &str) -> Option<String> {
    dict.get(key).and_then(Value::as_string).map(str::to_owned)
}

fn facts_from(dict: &Dictionary) -> AppleFacts {
    AppleFacts {
        udid: text(dict, "UDID"),
        serial_number: text(dict, "SerialNumber"),
        model: text(dict, "Model"),
        model_name: text(dict, "ModelName").or(text(dict, "ProductName")),
        os_version: text(dict, "OSVersion"),
        build_version: text(dict, "BuildVersion"),
        device_name: text(dict, "DeviceName"),
        imei: text(dict, "IMEI"),
    }
}

impl CheckIn {
    pub fn parse(body: &[u8]) -> Result<CheckIn, String> {
        let dict = read(body)?;
        let kind = text(&dict, "MessageType").ok_or("the message has no MessageType")?;
        if dict.contains_key("UserID") && kind != "UserAuthenticate" {
            return Ok(CheckIn::UserChannel(kind));
        }
        Ok(match kind.as_str() {
            "Authenticate" => CheckIn::Authenticate(facts_from(&dict)),
            "TokenUpdate" => {
                let token = dict.get("Token").and_then(Value::as_data).ok_or("TokenUpdate without Token")?;
                let push_magic = text(&dict, "PushMagic").ok_or("TokenUpdate without PushMagic")?;
                let topic = text(&dict, "Topic").ok_or("TokenUpdate without Topic")?;
                let unlock_token = dict.get("UnlockToken").and_then(Value::as_data).map(|t| {
                    use base64::Engine as _;
                    base64::engine::general_purpose::STANDARD.encode(t)
                });
                let token: String = token.iter().map(|b| format!("{b:02x}")).collect();
                CheckIn::TokenUpdate(ApplePush { token, push_magic, topic, unlock_token })
            }
            "CheckOut" => CheckIn::CheckOut,
            "UserAuthenticate" => CheckIn::UserAuthenticate,
            _ => CheckIn::Other(kind),
        })
    }
}

/// What a device reports to the command endpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct CommandReport {
    pub status: String,
    pub command_uuid: Option<String>,
    /// `DeviceInformation`'s answers.
    pub facts: Option<AppleFacts>,
    /// `ErrorChain`, as one line.
    pub error: Option<String>,
    /// Sent on the user channel (it carries `UserID`).
    pub user_channel: bool,
}

impl CommandReport {
    pub fn parse(body: &[u8]) -> Result<CommandReport, String> {
        let dict = read(body)?;
        let status = text(&dict, "Status").ok_or("the report has no Status")?;
        let facts = dict.get("QueryResponses").and_then(Value::as_dictionary).map(facts_from);
        let error = dict.get("ErrorChain").and_then(Value::as_array).map(|chain| {
            chain
                .iter()
                .filter_map(Value::as_dictionary)
                .map(|e| {
                    let code = e.get("ErrorCode").and_then(Value::as_signed_integer).unwrap_or_default();
                    let domain = text(e, "ErrorDomain").unwrap_or_default();
                    let text = text(e, "USEnglishDescription").or(text(e, "LocalizedDescription")).unwrap_or_default();
                    format!("{domain} {code}: {text}")
                })
                .collect::<Vec<_>>()
                .join("; ")
        });
        let user_channel = dict.contains_key("UserID");
        Ok(CommandReport { status, command_uuid: text(&dict, "CommandUUID"), facts, error, user_channel })
    }
}

/// Handles a command report and returns the next command for the device, if one waits.
pub fn handle_report(
    domain: &Enrollment,
    device_id: &Id,
    report: &CommandReport,
    profile_identifier: &str,
) -> DomainResult<Option<Value>> {
    let actor = Actor::device(None);
    domain.device_checked_in(device_id, &DeviceFacts::default())?;
    let command = report.command_uuid.as_deref().and_then(|uuid| uuid.parse::<Id>().ok());
    let finish = |succeeded: bool, detail: &str| -> DomainResult<()> {
        let Some(command) = command else { return Ok(()) };
        match domain.command_finished(&actor, device_id, &command, succeeded, detail) {
            // A command answered twice, or one the admin's later action replaced: nothing left to do.
            Ok(_) | Err(DomainError::NotFound { .. }) => Ok(()),
            Err(error) => Err(error),
        }
    };
    match report.status.as_str() {
        "Acknowledged" => {
            if let Some(facts) = &report.facts {
                domain.device_checked_in(device_id, &facts.device_facts())?;
            }
            finish(true, "acknowledged by the device")?;
            domain.record_device_problem(device_id, None)?;
        }
        "Error" | "CommandFormatError" => {
            let detail = report.error.clone().unwrap_or_else(|| report.status.clone());
            finish(false, &detail)?;
            domain.record_device_problem(device_id, Some(format!("the device refused a command: {detail}")))?;
        }
        // The device is busy (locked, in Setup Assistant): the command stays queued for its next check-in.
        "NotNow" => return Ok(None),
        _ => {}
    }
    let device = domain.device(device_id)?;
    Ok(device.pending_commands.first().map(|command| command_plist(command, profile_identifier)))
}

/// A queued command as Apple's command plist.
pub fn command_plist(command: &PendingCommand, profile_identifier: &str) -> Value {
    let request: Dictionary = match command.kind {
        CommandKind::DeviceInformation => Dictionary::from_iter([
            ("RequestType", Value::from("DeviceInformation")),
            ("Queries", Value::Array(DEVICE_QUERIES.iter().map(|q| Value::from(*q)).collect())),
        ]),
        CommandKind::RevokeMdm => Dictionary::from_iter([
            ("RequestType", Value::from("RemoveProfile")),
            ("Identifier", Value::from(profile_identifier)),
        ]),
        CommandKind::FactoryReset => {
            let mut erase = Dictionary::from_iter([("RequestType", Value::from("EraseDevice"))]);
            if let Some(pin) = &command.pin {
                erase.insert("PIN".into(), Value::from(pin.as_str()));
            }
            erase
        }
    };
    Value::Dictionary(Dictionary::from_iter([
        ("CommandUUID", Value::from(command.id.to_string())),
        ("Command", Value::Dictionary(request)),
    ]))
}
