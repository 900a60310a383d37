//! Devices and staged devices: what happens when a device enrolls (the invite is used, a staged record with the same
//! serial or IMEI gives its user and group, a device that enrolled before is updated rather than duplicated),
//! check-in and check-out, the admin's actions (reassign, deprovision), and the staged list.

use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::invites::{AdditionalInvite, CreatedInvite, NewInvite, link_state};
use super::{
    Actor, DomainError, DomainResult, Enrollment, Paged, TxResult, clamp_limit, decode_cursor, optional_field,
    optional_text, paged, validate_imei,
};
use crate::model::{
    Channels, CommandKind, DeliveryJob, Device, DeviceStatus, Group, Id, Invite, InviteStatus, JobChannel, JobKind,
    Ownership, PendingCommand, Platform, Remark, StagedDevice, User,
};
use crate::store::{Scan, Tx, device_status_byte, hardware_key, tree};

/// What a device reports about itself when it enrolls or checks in.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, ToSchema)]
pub struct DeviceFacts {
    pub platform: Option<Platform>,
    pub name: Option<String>,
    pub model: Option<String>,
    pub serial: Option<String>,
    pub imei: Option<String>,
    pub hardware_id: Option<String>,
    pub os_version: Option<String>,
}

/// Why the identity a device presented (a certificate or a secret) does not let it in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdentityProblem {
    /// Never issued by this appliance, or its device is gone.
    Unknown,
    /// The device enrolled again since, under another identity.
    Superseded,
    /// The device is no longer managed (unenrolled or wiped).
    Unmanaged,
    /// The message named another device than the one this identity belongs to (its hardware id, or a command
    /// queued for another device). Refused and audited as `device.refused`: a device speaks only for itself.
    OtherDevice,
}

/// Whether a result names a command queued for the device that sent it.
#[derive(Debug, Clone, PartialEq)]
pub enum CommandFor {
    /// Queued for this device: the result applies.
    Queued(PendingCommand),
    /// Not queued anywhere (answered already, replaced by the admin's later action, or never made): nothing to do.
    Nobody,
    /// Queued for another device: the message is refused.
    OtherDevice,
}

/// Whether an identifier a message names (`claimed`) is the one the identity is bound to (`bound`). Either one
/// missing says nothing; identifiers are compared without regard to case or surrounding blanks.
pub(crate) fn same_device(bound: Option<&str>, claimed: Option<&str>) -> bool {
    fn given(value: Option<&str>) -> Option<&str> {
        value.map(str::trim).filter(|v| !v.is_empty())
    }
    match (given(bound), given(claimed)) {
        (Some(bound), Some(claimed)) => bound.eq_ignore_ascii_case(claimed),
        _ => true,
    }
}

/// A model named with its maker ("Google Pixel 8"), unless the model's name already starts with it.
pub(crate) fn maker_and_model(maker: Option<&str>, model: Option<&str>) -> Option<String> {
    let (maker, model) = (maker.map(str::trim).filter(|m| !m.is_empty()), model.map(str::trim));
    match (maker, model) {
        (Some(maker), Some(model)) if !model.to_lowercase().starts_with(&maker.to_lowercase()) => {
            Some(format!("{maker} {model}"))
        }
        (_, model) => model.map(str::to_owned),
    }
}

/// How a device is taken out of management.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum DeprovisionKind {
    /// Remove the MDM profile; the device and its data stay with the user.
    RevokeMdm,
    /// Erase the device to factory settings. Never for personal devices.
    FactoryReset,
}

/// Filters for listing devices.
#[derive(Debug, Clone, Default, Deserialize, IntoParams, ToSchema)]
#[into_params(parameter_in = Query)]
pub struct DeviceQuery {
    pub status: Option<DeviceStatus>,
    pub platform: Option<Platform>,
    pub group_id: Option<Id>,
    pub user_id: Option<Id>,
    /// Text to find in the name, model, serial or IMEI.
    pub q: Option<String>,
    #[param(pattern = r"^(?:[A-Za-z0-9_-]{4})*(?:[A-Za-z0-9_-]{2,3})?$")]
    #[serde(default, deserialize_with = "crate::domain::page_cursor")]
    pub cursor: Option<String>,
    /// Page size, 1 to 500 (default 50).
    #[param(minimum = 1, maximum = 500)]
    #[serde(default, deserialize_with = "crate::domain::page_limit")]
    pub limit: Option<usize>,
}

/// Filters for the staged list (it has no index, so these are read row by row).
#[derive(Debug, Clone, Default, Deserialize, IntoParams, ToSchema)]
#[into_params(parameter_in = Query)]
pub struct StagedQuery {
    /// Text to find in the serial, IMEI, name or email.
    pub q: Option<String>,
    pub platform: Option<Platform>,
    pub group_id: Option<Id>,
}

impl StagedQuery {
    /// Whether `staged` passes every filter.
    pub fn matches(&self, staged: &StagedDevice) -> bool {
        let needle = self.q.as_deref().map(|q| q.trim().to_lowercase()).unwrap_or_default();
        self.platform.is_none_or(|p| staged.platform == p)
            && self.group_id.is_none_or(|g| staged.group_id == Some(g))
            && (needle.is_empty()
                || [&staged.serial, &staged.imei, &staged.name, &staged.email]
                    .iter()
                    .any(|field| field.as_deref().is_some_and(|f| f.to_lowercase().contains(&needle))))
    }
}

/// A staged device to register.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewStaged {
    pub serial: Option<String>,
    pub imei: Option<String>,
    pub name: Option<String>,
    pub platform: Platform,
    pub user_id: Option<Id>,
    pub email: Option<String>,
    pub group_id: Option<Id>,
}

/// A bulk assignment of staged devices to a user and/or group.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StagedAssignment {
    pub ids: Vec<Id>,
    pub user_id: Option<Id>,
    pub group_id: Option<Id>,
}

impl Enrollment {
    /// Completes enrollment for a device that authenticated with `invite_id`, in one transaction: the invite is
    /// marked used, the device record created (or, for a device that enrolled before, updated), and a staged record
    /// with the same serial or IMEI hands over its user and group and leaves the staged list.
    pub fn complete_enrollment(&self, actor: &Actor, invite_id: &Id, facts: &DeviceFacts) -> DomainResult<Device> {
        let new_id = self.new_id();
        let command_id = self.new_id();
        // The invite's messages still waiting (a reminder, usually) are not needed once it is used.
        let waiting = self.store.keys_under(tree::OUTBOX_BY_INVITE, invite_id.as_bytes())?;
        self.transact(|tx| self.enroll_in(tx, actor, invite_id, facts, [new_id, command_id], &waiting))
    }

    /// [`Enrollment::complete_enrollment`] inside the caller's transaction, so a protocol can record its own state
    /// (such as an Apple device's push token) in the same one. `ids` are the new device's and its first command's;
    /// `waiting` the invite's delivery jobs.
    pub(super) fn enroll_in(
        &self,
        tx: &Tx<'_>,
        actor: &Actor,
        invite_id: &Id,
        facts: &DeviceFacts,
        [new_id, command_id]: [Id; 2],
        waiting: &[Vec<u8>],
    ) -> TxResult<Device> {
        let now = self.now();
        let serial = optional_text(facts.serial.as_deref());
        let imei = optional_text(facts.imei.as_deref());
        let hardware_id = optional_text(facts.hardware_id.as_deref());
        {
            let old_invite: Invite =
                tx.get_id(invite_id)?.ok_or_else(|| DomainError::not_found("invite", invite_id))?;
            if let Err(problem) = link_state(&old_invite, now) {
                return Err(DomainError::conflict(
                    "invite_not_open",
                    format!("this invite cannot enroll a device ({problem:?}); ask the admin to resend it"),
                )
                .into());
            }
            let existing = find_by_hardware::<Device>(
                tx,
                tree::DEVICES_BY_HARDWARE,
                &[("hwid", &hardware_id), ("serial", &serial), ("imei", &imei)],
            )?;
            let staged = find_by_hardware::<StagedDevice>(
                tx,
                tree::STAGED_BY_HARDWARE,
                &[("serial", &serial), ("imei", &imei)],
            )?;
            // Read inside the transaction: a user deleted meanwhile leaves the device without one.
            let invited = tx.get_id::<User, _>(&old_invite.user_id)?.map(|u| u.id);
            let (mut user_id, mut group_id) = (invited, old_invite.group_id);
            if let Some(staged) = &staged {
                user_id = staged.user_id.or(user_id);
                group_id = staged.group_id.or(group_id);
                tx.delete(staged)?;
            }
            let base = existing.clone().unwrap_or(Device {
                id: new_id,
                platform: old_invite.platform,
                name: None,
                model: None,
                serial: None,
                imei: None,
                hardware_id: None,
                os_version: None,
                user_id,
                group_id,
                ownership: old_invite.ownership,
                invite_id: Some(*invite_id),
                enrolled_at: now,
                last_contact: now,
                status: DeviceStatus::Enrolled,
                pending_commands: Vec::new(),
                identity: None,
                problem: None,
            });
            let device = Device {
                platform: facts.platform.filter(|p| *p != Platform::Any).unwrap_or(match old_invite.platform {
                    Platform::Any => base.platform,
                    platform => platform,
                }),
                name: optional_text(facts.name.as_deref()).or(base.name.clone()),
                model: optional_text(facts.model.as_deref()).or(base.model.clone()),
                serial: serial.clone().or(base.serial.clone()),
                imei: imei.clone().or(base.imei.clone()),
                hardware_id: hardware_id.clone().or(base.hardware_id.clone()),
                os_version: optional_text(facts.os_version.as_deref()).or(base.os_version.clone()),
                user_id,
                group_id,
                ownership: old_invite.ownership,
                invite_id: Some(*invite_id),
                enrolled_at: now,
                last_contact: now,
                status: DeviceStatus::Enrolled,
                pending_commands: Vec::new(),
                ..base
            };
            let mut device = device;
            // A device that enrolls again while its earlier enrollment is still managed keeps the commands queued
            // for it (an erase the admin asked for is not cancelled by enrolling again), and the admin is told.
            let still_managed = existing
                .as_ref()
                .filter(|old| matches!(old.status, DeviceStatus::Enrolled | DeviceStatus::Deprovisioning));
            if let Some(old) = still_managed {
                device.pending_commands = old.pending_commands.clone();
                if !old.pending_commands.is_empty() {
                    device.status = old.status;
                }
                device.problem = Some(
                    "enrolled again while its earlier enrollment was still managed; if this is not the same device, revoke MDM on it"
                        .into(),
                );
            }
            device.pending_commands.retain(|c| c.kind != CommandKind::DeviceInformation);
            device.pending_commands.insert(
                0,
                PendingCommand {
                    id: command_id,
                    kind: CommandKind::DeviceInformation,
                    queued_at: now,
                    queued_by: "system".into(),
                    pin: None,
                },
            );
            claim_identifiers(tx, &device)?;
            tx.put(existing.as_ref(), &device)?;
            let mut invite = old_invite.clone();
            invite.status = InviteStatus::Enrolled;
            invite.device_id = Some(device.id);
            let how = match (&existing, &staged) {
                (Some(_), _) => "re-enrolled a known device",
                (None, Some(_)) => "enrolled a staged device",
                (None, None) => "enrolled a device",
            };
            invite.remarks.push(Remark {
                at: now,
                text: format!(
                    "{} {how}{}",
                    actor.name,
                    device.name.as_deref().map(|n| format!(": {n}")).unwrap_or_default()
                ),
            });
            tx.put(Some(&old_invite), &invite)?;
            self.retire_jobs(tx, waiting)?;
            let user_email = match invited {
                Some(id) => tx.get_id::<User, _>(&id)?.map(|u| u.email),
                None => None,
            };
            for to in self.confirmation_recipients(user_email) {
                tx.put(None, &self.confirmation_job(&invite, &device, to))?;
            }
            self.audit(tx, actor, "device.enroll", Some(device.id.to_string()), format!("invite {invite_id}: {how}"))?;
            Ok(device)
        }
    }

    /// The distribution list, and the user when the policy says so, each once.
    fn confirmation_recipients(&self, user_email: Option<String>) -> Vec<String> {
        let mut to: Vec<String> = self.policy().confirmation_to.clone();
        if self.policy().confirmation_to_user
            && let Some(email) = user_email
            && !to.iter().any(|t| t.eq_ignore_ascii_case(&email))
        {
            to.push(email);
        }
        to
    }

    fn confirmation_job(&self, invite: &Invite, device: &Device, to: String) -> DeliveryJob {
        DeliveryJob {
            device_id: Some(device.id),
            ..self.queued_job(invite, JobKind::Confirmation, JobChannel::Email, to)
        }
    }

    pub fn device(&self, id: &Id) -> DomainResult<Device> {
        self.store.get::<Device>(id.as_bytes())?.ok_or_else(|| DomainError::not_found("device", id))
    }

    /// The device `id` if it is managed under `identity` now (the hash of the certificate or secret it presented):
    /// not when it enrolled again since under another one, nor once it is unenrolled or wiped.
    pub(super) fn managed_under(&self, id: &Id, identity: &str) -> DomainResult<Result<Device, IdentityProblem>> {
        let Some(device) = self.store.get::<Device>(id.as_bytes())? else {
            return Ok(Err(IdentityProblem::Unknown));
        };
        if device.identity.as_deref() != Some(identity) {
            return Ok(Err(IdentityProblem::Superseded));
        }
        if matches!(device.status, DeviceStatus::Unmanaged | DeviceStatus::Wiped) {
            return Ok(Err(IdentityProblem::Unmanaged));
        }
        Ok(Ok(device))
    }

    /// Refuses a device's message that named another device (`what` says how), auditing it as `device.refused`
    /// against the device the identity manages (or the identity, before it enrolled).
    pub fn refuse_other_device(
        &self,
        actor: &Actor,
        device: Option<&Id>,
        identity: &str,
        what: &str,
    ) -> DomainResult<IdentityProblem> {
        let target = device.map_or_else(|| format!("identity {identity}"), Id::to_string);
        self.record(actor, "device.refused", Some(target), &format!("{what}; the message was refused"))?;
        Ok(IdentityProblem::OtherDevice)
    }

    /// Whether `command`, named in a result `device` sent, is queued for it. Only a command queued nowhere else
    /// (looked for in every device, which happens only for a result that is not the device's own) is let pass.
    pub fn command_for(&self, device: &Device, command: &Id) -> DomainResult<CommandFor> {
        if let Some(queued) = device.pending_commands.iter().find(|c| c.id == *command) {
            return Ok(CommandFor::Queued(queued.clone()));
        }
        let elsewhere =
            self.store.all::<Device>(|d| d.id != device.id && d.pending_commands.iter().any(|c| c.id == *command))?;
        Ok(if elsewhere.is_empty() { CommandFor::Nobody } else { CommandFor::OtherDevice })
    }

    /// Facts arrived with a device's own message (`how`): a request for them still queued is answered by them.
    pub(super) fn facts_arrived(&self, actor: &Actor, device: Device, how: &str) -> DomainResult<Device> {
        match device.pending_commands.iter().find(|c| c.kind == CommandKind::DeviceInformation) {
            Some(info) => self.command_finished(actor, &device.id, &info.id, true, how),
            None => Ok(device),
        }
    }

    /// A device was heard from: its last-contact time (and any facts it sent) are updated.
    pub fn device_checked_in(&self, id: &Id, facts: &DeviceFacts) -> DomainResult<Device> {
        let now = self.now();
        self.transact(|tx| {
            let old: Device = tx.get_id(id)?.ok_or_else(|| DomainError::not_found("device", id))?;
            let mut device = old.clone();
            device.last_contact = now;
            device.name = optional_text(facts.name.as_deref()).or(device.name);
            device.model = optional_text(facts.model.as_deref()).or(device.model);
            device.imei = optional_text(facts.imei.as_deref()).or(device.imei);
            device.serial = optional_text(facts.serial.as_deref()).or(device.serial);
            device.os_version = optional_text(facts.os_version.as_deref()).or(device.os_version);
            claim_identifiers(tx, &device)?;
            tx.put(Some(&old), &device)?;
            if only_contact_changed(&old, &device) {
                tx.coalesce();
            }
            Ok(device)
        })
    }

    /// The device removed its management profile (or was unenrolled): it is no longer managed.
    pub fn device_checked_out(&self, actor: &Actor, id: &Id) -> DomainResult<Device> {
        let now = self.now();
        self.transact(|tx| {
            let old: Device = tx.get_id(id)?.ok_or_else(|| DomainError::not_found("device", id))?;
            let mut device = old.clone();
            device.status = DeviceStatus::Unmanaged;
            device.last_contact = now;
            device.pending_commands.clear();
            tx.put(Some(&old), &device)?;
            self.audit(tx, actor, "device.checkout", Some(id.to_string()), "management removed on the device")?;
            Ok(device)
        })
    }

    /// The device reported the result of a queued command.
    pub fn command_finished(
        &self,
        actor: &Actor,
        id: &Id,
        command: &Id,
        succeeded: bool,
        detail: &str,
    ) -> DomainResult<Device> {
        let now = self.now();
        self.transact(|tx| {
            let old: Device = tx.get_id(id)?.ok_or_else(|| DomainError::not_found("device", id))?;
            let Some(position) = old.pending_commands.iter().position(|c| c.id == *command) else {
                return Err(DomainError::not_found("command", command).into());
            };
            let mut device = old.clone();
            let finished = device.pending_commands.remove(position);
            device.last_contact = now;
            if succeeded {
                match finished.kind {
                    CommandKind::RevokeMdm => device.status = DeviceStatus::Unmanaged,
                    CommandKind::FactoryReset => device.status = DeviceStatus::Wiped,
                    CommandKind::DeviceInformation => {}
                }
            } else if device.status == DeviceStatus::Deprovisioning {
                device.status = DeviceStatus::Enrolled;
            }
            tx.put(Some(&old), &device)?;
            let outcome = if succeeded { "done" } else { "failed" };
            self.audit(
                tx,
                actor,
                "device.command",
                Some(id.to_string()),
                format!("{} {outcome}: {detail}", finished.kind),
            )?;
            Ok(device)
        })
    }

    /// Gives a device to another user.
    pub fn reassign_device(&self, actor: &Actor, id: &Id, user_id: &Id) -> DomainResult<Device> {
        self.transact(|tx| {
            let user: User = tx.get_id(user_id)?.ok_or_else(|| DomainError::not_found("user", user_id))?;
            let old: Device = tx.get_id(id)?.ok_or_else(|| DomainError::not_found("device", id))?;
            let device = Device { user_id: Some(*user_id), ..old.clone() };
            tx.put(Some(&old), &device)?;
            self.audit(
                tx,
                actor,
                "device.reassign",
                Some(id.to_string()),
                format!("to {} <{}>", user.name, user.email),
            )?;
            Ok(device)
        })
    }

    /// Queues revoke-MDM or factory reset; a factory reset of a personal device is refused.
    pub fn deprovision_device(&self, actor: &Actor, id: &Id, kind: DeprovisionKind) -> DomainResult<Device> {
        let now = self.now();
        let command_id = self.new_id();
        self.transact(|tx| {
            let old: Device = tx.get_id(id)?.ok_or_else(|| DomainError::not_found("device", id))?;
            if kind == DeprovisionKind::FactoryReset && old.ownership != Ownership::Corporate {
                return Err(DomainError::conflict(
                    "personal_device",
                    "only corporate devices are factory-reset: a personal device (or one whose owner is not set) holds its owner's own data; revoke MDM instead, which removes only what the organisation installed",
                )
                .into());
            }
            if !matches!(old.status, DeviceStatus::Enrolled | DeviceStatus::Deprovisioning) {
                return Err(DomainError::conflict(
                    "not_managed",
                    format!("the device is {}, so it takes no more commands", old.status),
                )
                .into());
            }
            let command = match kind {
                DeprovisionKind::RevokeMdm => CommandKind::RevokeMdm,
                DeprovisionKind::FactoryReset => CommandKind::FactoryReset,
            };
            let mut device = old.clone();
            device.status = DeviceStatus::Deprovisioning;
            device.pending_commands.retain(|c| c.kind != command);
            // A Mac's erase carries a PIN, shown to the admin with the command, that unlocks it afterwards.
            let pin = (command == CommandKind::FactoryReset && old.platform == Platform::Macos).then(|| {
                let digits = super::random_bytes::<6>();
                digits.iter().map(|d| char::from(b'0' + d % 10)).collect::<String>()
            });
            device.pending_commands.push(PendingCommand {
                id: command_id,
                kind: command,
                queued_at: now,
                queued_by: actor.name.clone(),
                pin,
            });
            tx.put(Some(&old), &device)?;
            self.audit(tx, actor, "device.deprovision", Some(id.to_string()), command.to_string())?;
            Ok(device)
        })
    }

    /// Devices, most recently enrolled first.
    pub fn devices(&self, query: &DeviceQuery) -> DomainResult<Paged<Device>> {
        let after = decode_cursor(query.cursor.as_deref())?;
        let status_prefix;
        let scan = match query.status {
            Some(status) => {
                status_prefix = [device_status_byte(status)];
                Scan {
                    tree: tree::DEVICES_BY_STATUS,
                    prefix: &status_prefix,
                    after: after.as_deref(),
                    newest_first: true,
                }
            }
            None => Scan { tree: tree::DEVICES_BY_TIME, prefix: &[], after: after.as_deref(), newest_first: true },
        };
        let needle = query.q.as_deref().map(str::to_lowercase).filter(|q| !q.trim().is_empty());
        let page = self.store.page(scan, clamp_limit(query.limit.unwrap_or(50)), |device: &Device| {
            query.platform.is_none_or(|p| p == device.platform)
                && query.group_id.is_none_or(|g| Some(g) == device.group_id)
                && query.user_id.is_none_or(|u| Some(u) == device.user_id)
                && needle.as_ref().is_none_or(|needle| {
                    [&device.name, &device.model, &device.serial, &device.imei]
                        .iter()
                        .any(|field| field.as_deref().is_some_and(|v| v.to_lowercase().contains(needle)))
                })
        })?;
        Ok(paged(page))
    }

    /// Registers a device ahead of enrollment.
    pub fn create_staged(&self, actor: &Actor, new: &NewStaged) -> DomainResult<StagedDevice> {
        let serial = optional_field("serial", new.serial.as_deref(), 64)?.map(|s| s.to_ascii_uppercase());
        let imei = optional_text(new.imei.as_deref()).map(|i| validate_imei(&i)).transpose()?;
        if serial.is_none() && imei.is_none() {
            return Err(DomainError::invalid("serial", "give a serial number, an IMEI, or both"));
        }
        let email = optional_text(new.email.as_deref()).map(|e| super::normalize_email(&e)).transpose()?;
        let staged = StagedDevice {
            id: self.new_id(),
            serial,
            imei,
            name: optional_field("name", new.name.as_deref(), 200)?,
            platform: new.platform,
            user_id: new.user_id,
            email,
            group_id: new.group_id,
            created_at: self.now(),
            import: None,
        };
        self.transact(|tx| {
            if let Some(user) = &staged.user_id {
                tx.get_id::<User, _>(user)?.ok_or_else(|| DomainError::not_found("user", user))?;
            }
            if let Some(group) = &staged.group_id {
                tx.get_id::<Group, _>(group)?.ok_or_else(|| DomainError::not_found("group", group))?;
            }
            let ids = [("serial", &staged.serial), ("imei", &staged.imei)];
            if find_by_hardware::<StagedDevice>(tx, tree::STAGED_BY_HARDWARE, &ids)?.is_some() {
                return Err(DomainError::conflict(
                    "staged_exists",
                    "a staged device with this serial number or IMEI exists already",
                )
                .into());
            }
            tx.put(None, &staged)?;
            let what = staged.serial.clone().or(staged.imei.clone()).unwrap_or_default();
            self.audit(tx, actor, "staged.create", Some(staged.id.to_string()), what)
        })?;
        Ok(staged)
    }

    pub fn remove_staged(&self, actor: &Actor, id: &Id) -> DomainResult<()> {
        self.transact(|tx| {
            let staged: StagedDevice = tx.get_id(id)?.ok_or_else(|| DomainError::not_found("staged device", id))?;
            tx.delete(&staged)?;
            self.audit(tx, actor, "staged.remove", Some(id.to_string()), staged.serial.clone().unwrap_or_default())
        })
    }

    /// Assigns staged devices to a user and/or a group, all or nothing.
    pub fn assign_staged(&self, actor: &Actor, assignment: &StagedAssignment) -> DomainResult<Vec<StagedDevice>> {
        if assignment.user_id.is_none() && assignment.group_id.is_none() {
            return Err(DomainError::invalid("user_id", "give a user, a group, or both to assign"));
        }
        self.transact(|tx| {
            let user = match &assignment.user_id {
                Some(id) => Some(tx.get_id::<User, _>(id)?.ok_or_else(|| DomainError::not_found("user", id))?),
                None => None,
            };
            if let Some(group) = &assignment.group_id {
                tx.get_id::<Group, _>(group)?.ok_or_else(|| DomainError::not_found("group", group))?;
            }
            let mut done = Vec::new();
            for id in &assignment.ids {
                let old: StagedDevice = tx.get_id(id)?.ok_or_else(|| DomainError::not_found("staged device", id))?;
                let mut staged = old.clone();
                if let Some(user) = &user {
                    staged.user_id = Some(user.id);
                    staged.email = Some(user.email.clone());
                }
                if assignment.group_id.is_some() {
                    staged.group_id = assignment.group_id;
                }
                tx.put(Some(&old), &staged)?;
                done.push(staged);
            }
            self.audit(tx, actor, "staged.assign", None, format!("{} staged device(s)", done.len()))?;
            Ok(done)
        })
    }

    /// Staged devices, oldest first.
    pub fn staged(&self, cursor: Option<&str>, limit: usize) -> DomainResult<Paged<StagedDevice>> {
        let after = decode_cursor(cursor)?;
        let scan = Scan { tree: tree::STAGED, prefix: &[], after: after.as_deref(), newest_first: false };
        Ok(paged(self.store.page(scan, clamp_limit(limit), |_| true)?))
    }

    /// "Enroll additional device" from a managed device: a new invite for its user.
    pub fn additional_invite_for_device(
        &self,
        actor: &Actor,
        id: &Id,
        extra: &AdditionalInvite,
    ) -> DomainResult<CreatedInvite> {
        let device = self.device(id)?;
        let user_id = device
            .user_id
            .ok_or_else(|| DomainError::invalid("user_id", "the device has no user; reassign it to a user first"))?;
        let defaults = NewInvite {
            user_id,
            platform: device.platform,
            ownership: device.ownership,
            group_id: device.group_id,
            channels: Channels::Email,
        };
        self.create_invite(actor, &extra.apply(defaults))
    }

    /// "Re-enroll" a staged device: a new invite for the user it is assigned to.
    pub fn reenroll_staged(&self, actor: &Actor, id: &Id, extra: &AdditionalInvite) -> DomainResult<CreatedInvite> {
        let staged = self.staged_device(id)?;
        let user = match (staged.user_id, staged.email.as_deref()) {
            (Some(user), _) => Some(user),
            (None, Some(email)) => self.user_by_email(email)?.map(|u| u.id),
            (None, None) => None,
        };
        let user_id = user.ok_or_else(|| match staged.email.as_deref() {
            Some(email) => DomainError::invalid(
                "user_id",
                format!("no user has the staged device's address {email}; add the user first (Users page), then invite again"),
            ),
            None => DomainError::invalid("user_id", "the staged device has no user; assign it to a user first"),
        })?;
        let defaults = NewInvite {
            user_id,
            platform: staged.platform,
            ownership: Ownership::Corporate,
            group_id: staged.group_id,
            channels: Channels::Email,
        };
        self.create_invite(actor, &extra.apply(defaults))
    }

    pub fn staged_device(&self, id: &Id) -> DomainResult<StagedDevice> {
        self.store.get::<StagedDevice>(id.as_bytes())?.ok_or_else(|| DomainError::not_found("staged device", id))
    }
}

/// The record a hardware index (devices' or staged devices') holds for the first of `keys` it knows.
fn find_by_hardware<R: crate::store::Record>(
    tx: &Tx<'_>,
    index: usize,
    keys: &[(&str, &Option<String>)],
) -> Result<Option<R>, crate::store::TxError<DomainError>> {
    for (kind, value) in keys {
        if let Some(value) = value
            && let Some(key) = tx.lookup(index, &hardware_key(kind, value))?
        {
            return tx.get::<R, _>(&key);
        }
    }
    Ok(None)
}

/// A serial number, IMEI or hardware id names one device. When a device reports one that another record holds (a
/// device re-imaged and enrolled afresh, a board swap), the identifier moves to this device and the other record
/// loses it, so the index never points at a record that no longer carries the identifier.
fn claim_identifiers(tx: &Tx<'_>, device: &Device) -> Result<(), crate::store::TxError<DomainError>> {
    let claims = [("hwid", &device.hardware_id), ("serial", &device.serial), ("imei", &device.imei)];
    for (kind, value) in claims {
        let Some(value) = value else { continue };
        let Some(key) = tx.lookup(tree::DEVICES_BY_HARDWARE, &hardware_key(kind, value))? else { continue };
        if key == device.id.0 {
            continue;
        }
        if let Some(old) = tx.get::<Device, _>(&key)? {
            let mut other = old.clone();
            match kind {
                "hwid" => other.hardware_id = None,
                "serial" => other.serial = None,
                _ => other.imei = None,
            }
            tx.put(Some(&old), &other)?;
        }
    }
    Ok(())
}

/// Whether `new` differs from `old` in its last-contact time alone: a check-in that told nothing new, whose write
/// may reach the disk a second after its answer (a power cut in between loses only that time).
pub(super) fn only_contact_changed(old: &Device, new: &Device) -> bool {
    *new == Device { last_contact: new.last_contact, ..old.clone() }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{admin, domain};
    use super::super::{ExportList, NewGroup, NewInvite, NewUser, UserChoiceForDevices};
    use super::*;
    use crate::model::Channels;

    fn setup(ownership: Ownership) -> (Enrollment, User, Id) {
        let (d, _) = domain();
        let ann = d
            .create_user(
                &admin(),
                &NewUser { name: "Ann".into(), email: "ann@example.com".into(), ..Default::default() },
            )
            .unwrap();
        let new = NewInvite {
            user_id: ann.id,
            platform: Platform::Any,
            ownership,
            group_id: None,
            channels: Channels::Email,
        };
        let invite = d.create_invite(&admin(), &new).unwrap().invite.id;
        (d, ann, invite)
    }

    fn facts(serial: &str) -> DeviceFacts {
        DeviceFacts {
            platform: Some(Platform::Ios),
            name: Some("Ann's iPhone".into()),
            serial: Some(serial.into()),
            hardware_id: Some(format!("UDID-{serial}")),
            ..Default::default()
        }
    }

    #[test]
    fn a_push_that_gets_through_clears_only_the_problem_a_push_recorded() {
        let (d, _ann, invite) = setup(Ownership::Personal);
        let device = d.complete_enrollment(&Actor::device(None), &invite, &facts("F2LX")).unwrap();
        let refused = "the device refused a command: NotAllowed";
        d.record_device_problem(&device.id, Some(refused.into())).unwrap();
        assert!(!d.clear_device_problem_if(&device.id, "push service unreachable").unwrap());
        assert_eq!(d.device(&device.id).unwrap().problem.as_deref(), Some(refused), "another problem stays");

        d.record_device_problem(&device.id, Some("push service unreachable".into())).unwrap();
        assert!(d.clear_device_problem_if(&device.id, "push service unreachable").unwrap());
        assert_eq!(d.device(&device.id).unwrap().problem, None);
    }

    #[test]
    fn a_staged_record_hands_over_its_user_and_group_and_leaves_the_list() {
        let (d, _ann, invite) = setup(Ownership::Corporate);
        let bob = d
            .create_user(
                &admin(),
                &NewUser { name: "Bob".into(), email: "bob@example.com".into(), ..Default::default() },
            )
            .unwrap();
        let fleet = d.create_group(&admin(), &NewGroup { name: "Fleet".into(), description: String::new() }).unwrap();
        let new = NewStaged {
            serial: Some("c02xk1".into()),
            imei: None,
            name: None,
            platform: Platform::Ios,
            user_id: Some(bob.id),
            email: None,
            group_id: Some(fleet.id),
        };
        d.create_staged(&admin(), &new).unwrap();
        assert!(matches!(d.create_staged(&admin(), &new), Err(DomainError::Conflict { code: "staged_exists", .. })));
        assert_eq!(d.dashboard().unwrap().staged, 1);

        let device = d.complete_enrollment(&Actor::device(None), &invite, &facts("C02XK1")).unwrap();
        assert_eq!(device.user_id, Some(bob.id));
        assert_eq!(device.group_id, Some(fleet.id));
        assert_eq!(device.platform, Platform::Ios, "an OS-independent invite takes the device's platform");
        assert_eq!(device.pending_commands[0].kind, CommandKind::DeviceInformation);
        let counts = d.dashboard().unwrap();
        assert_eq!((counts.staged, counts.enrolled, counts.pending), (0, 1, 0));
        assert_eq!(d.invite(&invite).unwrap().device_id, Some(device.id));
    }

    #[test]
    fn a_device_that_enrolls_again_is_updated_not_duplicated() {
        let (d, ann, first) = setup(Ownership::Corporate);
        let device = d.complete_enrollment(&Actor::device(None), &first, &facts("SER1")).unwrap();
        d.device_checked_out(&Actor::device(None), &device.id).unwrap();
        assert_eq!(d.dashboard().unwrap().unmanaged, 1);
        let new = NewInvite {
            user_id: ann.id,
            platform: Platform::Ios,
            ownership: Ownership::Corporate,
            group_id: None,
            channels: Channels::Email,
        };
        let second = d.create_invite(&admin(), &new).unwrap().invite.id;
        let again = d.complete_enrollment(&Actor::device(None), &second, &facts("SER1")).unwrap();
        assert_eq!(again.id, device.id);
        assert_eq!(again.status, DeviceStatus::Enrolled);
        let counts = d.dashboard().unwrap();
        assert_eq!((counts.enrolled, counts.unmanaged), (1, 0));
        assert_eq!(d.devices(&DeviceQuery::default()).unwrap().items.len(), 1);
    }

    #[test]
    fn factory_reset_is_refused_for_personal_devices_and_queued_for_corporate_ones() {
        let (d, _, invite) = setup(Ownership::Personal);
        let device = d.complete_enrollment(&Actor::device(None), &invite, &facts("P1")).unwrap();
        let refused = d.deprovision_device(&admin(), &device.id, DeprovisionKind::FactoryReset).unwrap_err();
        assert!(refused.to_string().contains("only corporate devices are factory-reset"), "{refused}");
        let revoking = d.deprovision_device(&admin(), &device.id, DeprovisionKind::RevokeMdm).unwrap();
        assert_eq!(revoking.status, DeviceStatus::Deprovisioning);
        let command = revoking.pending_commands.iter().find(|c| c.kind == CommandKind::RevokeMdm).unwrap().id;
        let done = d.command_finished(&Actor::device(None), &device.id, &command, true, "profile removed").unwrap();
        assert_eq!(done.status, DeviceStatus::Unmanaged);

        let (d, _, invite) = setup(Ownership::Corporate);
        let device = d.complete_enrollment(&Actor::device(None), &invite, &facts("C1")).unwrap();
        let wiping = d.deprovision_device(&admin(), &device.id, DeprovisionKind::FactoryReset).unwrap();
        let command = wiping.pending_commands.iter().find(|c| c.kind == CommandKind::FactoryReset).unwrap().id;
        assert_eq!(
            d.command_finished(&Actor::device(None), &device.id, &command, true, "").unwrap().status,
            DeviceStatus::Wiped
        );
        assert!(
            d.deprovision_device(&admin(), &device.id, DeprovisionKind::RevokeMdm).is_err(),
            "a wiped device takes no commands"
        );
    }

    #[test]
    fn an_unknown_owner_is_not_factory_reset_either() {
        let (d, _, invite) = setup(Ownership::NotSet);
        let device = d.complete_enrollment(&Actor::device(None), &invite, &facts("N1")).unwrap();
        assert!(d.deprovision_device(&admin(), &device.id, DeprovisionKind::FactoryReset).is_err());
    }

    #[test]
    fn a_spaced_imei_from_the_device_still_matches_its_staged_record() {
        let (d, _, invite) = setup(Ownership::Corporate);
        let fleet = d.create_group(&admin(), &NewGroup { name: "Fleet".into(), description: String::new() }).unwrap();
        let new = NewStaged {
            serial: None,
            imei: Some("490154203237518".into()),
            name: None,
            platform: Platform::Ios,
            user_id: None,
            email: None,
            group_id: Some(fleet.id),
        };
        d.create_staged(&admin(), &new).unwrap();
        let reported = DeviceFacts { imei: Some("49 015420 323751 8".into()), ..facts("X9") };
        let device = d.complete_enrollment(&Actor::device(None), &invite, &reported).unwrap();
        assert_eq!(device.group_id, Some(fleet.id));
        assert_eq!(d.dashboard().unwrap().staged, 0);
    }

    #[test]
    fn an_identifier_moves_to_the_device_that_reports_it() {
        let (d, ann, first) = setup(Ownership::Corporate);
        let a = d.complete_enrollment(&Actor::device(None), &first, &facts("SER-A")).unwrap();
        let invite = |d: &Enrollment| {
            let new = NewInvite {
                user_id: ann.id,
                platform: Platform::Ios,
                ownership: Ownership::Corporate,
                group_id: None,
                channels: Channels::Email,
            };
            d.create_invite(&admin(), &new).unwrap().invite.id
        };
        let b = d.complete_enrollment(&Actor::device(None), &invite(&d), &facts("SER-B")).unwrap();
        // Device A (known by its hardware id) now reports the serial number B's record holds.
        let swapped = DeviceFacts { hardware_id: a.hardware_id.clone(), ..facts("SER-B") };
        let again = d.complete_enrollment(&Actor::device(None), &invite(&d), &swapped).unwrap();
        assert_eq!(again.id, a.id);
        assert_eq!(d.device(&b.id).unwrap().serial, None, "B's record gives the serial up");
        let owner =
            |d: &Enrollment| d.store().lookup(tree::DEVICES_BY_HARDWARE, &hardware_key("serial", "SER-B")).unwrap();
        assert_eq!(owner(&d), Some(a.id.0.to_vec()));
        d.device_checked_out(&Actor::device(None), &b.id).unwrap();
        assert_eq!(owner(&d), Some(a.id.0.to_vec()), "changing B later leaves A's entry alone");
    }

    #[test]
    fn deleting_a_user_with_managed_devices_needs_a_choice() {
        let (d, ann, invite) = setup(Ownership::Corporate);
        let device = d.complete_enrollment(&Actor::device(None), &invite, &facts("D1")).unwrap();
        let refused = d.delete_user(&admin(), &ann.id, None).unwrap_err();
        assert!(matches!(refused, DomainError::Conflict { code: "user_has_devices", .. }), "{refused}");
        d.delete_user(&admin(), &ann.id, Some(UserChoiceForDevices::Unassign)).unwrap();
        let device = d.device(&device.id).unwrap();
        assert_eq!((device.user_id, device.status), (None, DeviceStatus::Enrolled));
        assert!(d.user_by_email("ann@example.com").unwrap().is_none());
    }

    #[test]
    fn reassign_and_bulk_staged_assignment() {
        let (d, _, invite) = setup(Ownership::Corporate);
        let device = d.complete_enrollment(&Actor::device(None), &invite, &facts("R1")).unwrap();
        let bob = d
            .create_user(
                &admin(),
                &NewUser { name: "Bob".into(), email: "bob@example.com".into(), ..Default::default() },
            )
            .unwrap();
        assert_eq!(d.reassign_device(&admin(), &device.id, &bob.id).unwrap().user_id, Some(bob.id));

        let ids: Vec<Id> = ["S1", "S2"]
            .iter()
            .map(|s| {
                let new = NewStaged {
                    serial: Some((*s).into()),
                    imei: None,
                    name: None,
                    platform: Platform::Android,
                    user_id: None,
                    email: None,
                    group_id: None,
                };
                d.create_staged(&admin(), &new).unwrap().id
            })
            .collect();
        let assigned = d
            .assign_staged(&admin(), &StagedAssignment { ids: ids.clone(), user_id: Some(bob.id), group_id: None })
            .unwrap();
        assert!(assigned.iter().all(|s| s.user_id == Some(bob.id) && s.email.as_deref() == Some("bob@example.com")));
        let bad_imei = NewStaged {
            serial: None,
            imei: Some("490154203237519".into()),
            name: None,
            platform: Platform::Android,
            user_id: None,
            email: None,
            group_id: None,
        };
        assert!(d.create_staged(&admin(), &bad_imei).unwrap_err().to_string().contains("check digit"));
        d.remove_staged(&admin(), &ids[0]).unwrap();
        assert_eq!(d.staged(None, 50).unwrap().items.len(), 1);
    }

    #[test]
    fn exports_carry_the_filters_the_tabs_show() {
        let (d, ann, first) = setup(Ownership::Corporate);
        let mac = DeviceFacts { platform: Some(Platform::Macos), ..facts("MAC1") };
        let enrolled = d.complete_enrollment(&Actor::device(None), &first, &mac).unwrap();
        let new = NewInvite {
            user_id: ann.id,
            platform: Platform::Ios,
            ownership: Ownership::Corporate,
            group_id: None,
            channels: Channels::Email,
        };
        let second = d.create_invite(&admin(), &new).unwrap().invite.id;
        let phone = d.complete_enrollment(&Actor::device(None), &second, &facts("PHONE1")).unwrap();
        d.device_checked_out(&Actor::device(None), &phone.id).unwrap();
        let rows = |list: ExportList| {
            let csv = String::from_utf8(d.export_csv(&list).unwrap()).unwrap();
            csv.lines().skip(1).map(str::to_owned).collect::<Vec<_>>()
        };
        assert_eq!(rows(ExportList::Managed(DeviceQuery::default())).len(), 2);
        let unmanaged =
            rows(ExportList::Managed(DeviceQuery { status: Some(DeviceStatus::Unmanaged), ..Default::default() }));
        assert!(unmanaged.len() == 1 && unmanaged[0].contains("PHONE1"), "{unmanaged:?}");
        let macs = rows(ExportList::Managed(DeviceQuery { platform: Some(Platform::Macos), ..Default::default() }));
        assert!(macs.len() == 1 && macs[0].contains("MAC1") && enrolled.platform == Platform::Macos, "{macs:?}");

        let fleet = d.create_group(&admin(), &NewGroup { name: "Fleet".into(), description: String::new() }).unwrap();
        for (serial, platform, group_id) in [
            ("S-IOS", Platform::Ios, Some(fleet.id)),
            ("S-DROID", Platform::Android, None),
            ("X-IOS", Platform::Ios, None),
        ] {
            let new = NewStaged {
                serial: Some(serial.into()),
                imei: None,
                name: None,
                platform,
                user_id: None,
                email: None,
                group_id,
            };
            d.create_staged(&admin(), &new).unwrap();
        }
        let staged = |query: StagedQuery| rows(ExportList::Staged(query));
        assert_eq!(staged(StagedQuery::default()).len(), 3);
        assert_eq!(staged(StagedQuery { platform: Some(Platform::Ios), ..Default::default() }).len(), 2);
        assert_eq!(staged(StagedQuery { group_id: Some(fleet.id), ..Default::default() }).len(), 1);
        let searched =
            staged(StagedQuery { q: Some(" s-".into()), platform: Some(Platform::Ios), ..Default::default() });
        assert!(searched.len() == 1 && searched[0].starts_with("S-IOS"), "{searched:?}");
    }
}
