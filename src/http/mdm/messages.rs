//! The plist messages of Apple's MDM protocol: check-in messages (`Authenticate`, `TokenUpdate`, `CheckOut`),
//! the reports a device sends to the command endpoint (`Status`, `CommandUUID`, results), and the commands enrolld
//! sends (`DeviceInformation`, `RemoveProfile`, `EraseDevice`). Keys and types follow Apple's published schemas
//! (apple/device-management: `mdm/checkin/*.yaml`, `mdm/commands/*.yaml`).

use plist::{Dictionary, Value};

use crate::domain::{
    Actor, AppleClaim, AppleFacts, CommandFor, DeviceFacts, DomainError, DomainResult, Enrollment, IdentityProblem,
};
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
        enrollment_id: text(dict, "EnrollmentID"),
    }
}

/// The device a message names (every check-in and report carries `UDID`, or `EnrollmentID` for a User Enrollment).
fn claim_of(dict: &Dictionary) -> AppleClaim {
    AppleClaim { udid: text(dict, "UDID"), enrollment_id: text(dict, "EnrollmentID") }
}

impl CheckIn {
    /// The message, and the device it names.
    pub fn parse(body: &[u8]) -> Result<(CheckIn, AppleClaim), String> {
        let dict = read(body)?;
        let claim = claim_of(&dict);
        let kind = text(&dict, "MessageType").ok_or("the message has no MessageType")?;
        if dict.contains_key("UserID") && kind != "UserAuthenticate" {
            return Ok((CheckIn::UserChannel(kind), claim));
        }
        let message = match kind.as_str() {
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
        };
        Ok((message, claim))
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
    /// The device the report names.
    pub claim: AppleClaim,
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
        let claim = claim_of(&dict);
        Ok(CommandReport { status, command_uuid: text(&dict, "CommandUUID"), facts, error, user_channel, claim })
    }
}

/// Handles a command report from the device `device_id` (managed under `identity`) and returns the next command for
/// it, if one waits. A result applies only to a command queued for this device: one for a command queued for
/// another device refuses the whole report (audited); one for a command queued nowhere (answered already, or
/// replaced by the admin's later action) changes nothing.
pub fn handle_report(
    domain: &Enrollment,
    actor: &Actor,
    device_id: &Id,
    identity: &str,
    report: &CommandReport,
    profile_identifier: &str,
) -> DomainResult<Result<Option<Value>, IdentityProblem>> {
    let device = domain.device(device_id)?;
    let command = match report.command_uuid.as_deref().and_then(|uuid| uuid.parse::<Id>().ok()) {
        None => None,
        Some(id) => match domain.command_for(&device, &id)? {
            CommandFor::Queued(command) => Some(command),
            CommandFor::Nobody => None,
            CommandFor::OtherDevice => {
                let what = format!("a result for command {id}, which is queued for another device");
                return Ok(Err(domain.refuse_other_device(actor, Some(device_id), identity, &what)?));
            }
        },
    };
    domain.device_checked_in(device_id, &DeviceFacts::default())?;
    let finish = |command: &PendingCommand, succeeded: bool, detail: &str| -> DomainResult<()> {
        match domain.command_finished(actor, device_id, &command.id, succeeded, detail) {
            // Answered twice at once, or replaced by the admin meanwhile: nothing left to do.
            Ok(_) | Err(DomainError::NotFound { .. }) => Ok(()),
            Err(error) => Err(error),
        }
    };
    match report.status.as_str() {
        "Acknowledged" => {
            if let Some(command) = &command {
                // Facts are taken only as the answer to this device's own DeviceInformation.
                if let (CommandKind::DeviceInformation, Some(facts)) = (command.kind, &report.facts) {
                    domain.device_checked_in(device_id, &facts.device_facts())?;
                }
                finish(command, true, "acknowledged by the device")?;
            }
            domain.record_device_problem(device_id, None)?;
        }
        "Error" | "CommandFormatError" => {
            if let Some(command) = &command {
                let detail = report.error.clone().unwrap_or_else(|| report.status.clone());
                finish(command, false, &detail)?;
                domain.record_device_problem(device_id, Some(format!("the device refused a command: {detail}")))?;
            }
        }
        // The device is busy (locked, in Setup Assistant): the command stays queued for its next check-in.
        "NotNow" => return Ok(Ok(None)),
        _ => {}
    }
    let device = domain.device(device_id)?;
    Ok(Ok(device.pending_commands.first().map(|command| command_plist(command, profile_identifier))))
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
