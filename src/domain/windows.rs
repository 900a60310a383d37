//! Windows enrollment (MS-MDE2, on-premise authentication): the user's email and their answer (the invite's
//! passcode, or their password) find and open the invite; the client certificate issued over MS-WSTEP is recorded
//! as the device's identity; the first OMA-DM session under it enrolls the device, in one transaction.

use super::accounts::{Credentials, Judged};
use super::devices::same_device;
use super::invites::link_state;
use super::{Actor, DeviceFacts, DomainError, DomainResult, Enrollment, IdentityProblem, InviteQuery, LinkProblem};
use crate::model::{Device, EnrollAuth, Id, Invite, InviteStatus, Platform, WindowsIdentity};
use crate::store::tree;

/// Why a Windows enrollment request was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WindowsRefusal {
    /// No user has this email address, or they have no pending invite for a Windows PC.
    NoInvite,
    Link(LinkProblem),
    Wrong,
    /// A password is asked for and the user has none yet.
    NoPassword,
}

/// What Windows tells about itself when it asks for its certificate (MS-WSTEP `AdditionalContext`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WindowsFacts {
    pub device_hwid: Option<String>,
    pub device_name: Option<String>,
    pub os_version: Option<String>,
}

/// What a management session reports (`./DevInfo`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DevInfo {
    pub dev_id: Option<String>,
    pub manufacturer: Option<String>,
    pub model: Option<String>,
    pub software_version: Option<String>,
    pub language: Option<String>,
}

impl Enrollment {
    /// The pending invite a Windows user's email address stands for (the newest one for a Windows PC or any
    /// device), checked against the answer they typed in Windows' password box: the passcode or their password,
    /// as the admin chose; with both asked for, the passcode, a space, then the password. Wrong answers do not
    /// count toward the invite's lock: an email address is no secret, so anyone could lock the invite. The web
    /// layer throttles these attempts instead.
    pub fn windows_check(&self, email: &str, answer: &str) -> DomainResult<Result<Invite, WindowsRefusal>> {
        let Some(user) = self.user_by_email(email.trim())? else { return Ok(Err(WindowsRefusal::NoInvite)) };
        let query = InviteQuery {
            user_id: Some(user.id),
            status: Some(InviteStatus::Pending),
            limit: Some(50),
            ..InviteQuery::default()
        };
        let candidates = self.invites(&query)?;
        let Some(view) = candidates.items.iter().find(|i| matches!(i.platform, Platform::Windows | Platform::Any))
        else {
            return Ok(Err(WindowsRefusal::NoInvite));
        };
        let invite: Invite =
            self.store.get(view.id.as_bytes())?.ok_or_else(|| DomainError::not_found("invite", view.id))?;
        if let Err(problem) = link_state(&invite, self.now()) {
            return Ok(Err(WindowsRefusal::Link(problem)));
        }
        let answer = answer.trim();
        let credentials = match self.enroll_auth()? {
            EnrollAuth::Passcode => Credentials { passcode: Some(answer), password: None },
            EnrollAuth::Password => Credentials { passcode: None, password: Some(answer) },
            EnrollAuth::Both => {
                let (passcode, password) = answer.split_once(' ').unwrap_or((answer, ""));
                Credentials { passcode: Some(passcode), password: Some(password) }
            }
        };
        Ok(match self.judge_credentials(&invite.id, credentials, self.enroll_auth()?)? {
            Judged::Answer(true) => Ok(invite),
            Judged::Answer(false) => Err(WindowsRefusal::Wrong),
            Judged::Locked => Err(WindowsRefusal::Link(LinkProblem::Locked)),
            Judged::NoPassword => Err(WindowsRefusal::NoPassword),
        })
    }

    /// Records the certificate issued to a Windows device for `invite_id`, with an audit entry.
    pub fn windows_identity_issued(
        &self,
        actor: &Actor,
        invite_id: &Id,
        sha256: &str,
        not_after: time::OffsetDateTime,
        facts: &WindowsFacts,
    ) -> DomainResult<WindowsIdentity> {
        let identity = WindowsIdentity {
            sha256: sha256.to_owned(),
            invite_id: *invite_id,
            issued_at: self.now(),
            not_after,
            device_hwid: facts.device_hwid.clone(),
            device_name: facts.device_name.clone(),
            os_version: facts.os_version.clone(),
            device_id: None,
        };
        // An earlier certificate for this invite that never held a session is replaced, not kept alongside.
        let unused = self.store.all::<WindowsIdentity>(|i| i.invite_id == *invite_id && i.device_id.is_none())?;
        self.transact(|tx| {
            for old in &unused {
                if let Some(current) = tx.get::<WindowsIdentity, _>(old.sha256.as_bytes())?
                    && current.device_id.is_none()
                {
                    tx.delete(&current)?;
                }
            }
            tx.put(None, &identity)?;
            self.audit(
                tx,
                actor,
                "windows.identity",
                Some(invite_id.to_string()),
                format!(
                    "certificate {} for {}",
                    &sha256[..16.min(sha256.len())],
                    facts.device_name.as_deref().unwrap_or("a Windows PC")
                ),
            )
        })?;
        Ok(identity)
    }

    /// A management session under the certificate `sha256`: the first one enrolls the device (the invite used,
    /// the device recorded, staged records matched, notices queued) in one transaction; later ones update its
    /// facts and last contact. A request for facts still queued is answered by `dev_info`.
    pub fn windows_session(
        &self,
        actor: &Actor,
        sha256: &str,
        dev_info: &DevInfo,
    ) -> DomainResult<Result<Device, IdentityProblem>> {
        let Some(identity) = self.store.get::<WindowsIdentity>(sha256.as_bytes())? else {
            return Ok(Err(IdentityProblem::Unknown));
        };
        if identity.not_after <= self.now() {
            return Ok(Err(IdentityProblem::Unknown));
        }
        let facts = DeviceFacts {
            platform: Some(Platform::Windows),
            name: identity.device_name.clone(),
            model: super::devices::maker_and_model(dev_info.manufacturer.as_deref(), dev_info.model.as_deref()),
            serial: None,
            imei: None,
            hardware_id: dev_info.dev_id.clone().or(identity.device_hwid.clone()),
            os_version: dev_info.software_version.clone().or(identity.os_version.clone()),
        };
        let device = match identity.device_id {
            Some(id) => {
                let device = match self.managed_under(&id, sha256)? {
                    Ok(device) => device,
                    Err(problem) => return Ok(Err(problem)),
                };
                // The PC's DevId was recorded at its first session; a session naming another is not this PC's.
                if !same_device(device.hardware_id.as_deref(), dev_info.dev_id.as_deref()) {
                    let what = format!(
                        "a session under the certificate of DevId {} named DevId {}",
                        device.hardware_id.as_deref().unwrap_or_default(),
                        dev_info.dev_id.as_deref().unwrap_or_default()
                    );
                    return Ok(Err(self.refuse_other_device(actor, Some(&id), sha256, &what)?));
                }
                self.device_checked_in(&id, &facts)?
            }
            None => {
                let waiting = self.store.keys_under(tree::OUTBOX_BY_INVITE, identity.invite_id.as_bytes())?;
                let ids = [self.new_id(), self.new_id()];
                self.transact(|tx| {
                    let old: WindowsIdentity =
                        tx.get(sha256.as_bytes())?.ok_or_else(|| DomainError::not_found("identity", sha256))?;
                    let enrolled = self.enroll_in(tx, actor, &old.invite_id, &facts, ids, &waiting)?;
                    let mut device = enrolled.clone();
                    device.identity = Some(sha256.to_owned());
                    tx.put(Some(&enrolled), &device)?;
                    tx.put(Some(&old), &WindowsIdentity { device_id: Some(device.id), ..old.clone() })?;
                    Ok(device)
                })?
            }
        };
        if *dev_info == DevInfo::default() {
            return Ok(Ok(device));
        }
        self.facts_arrived(actor, device, "DevInfo sent with the session").map(Ok)
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{admin, domain};
    use super::super::{NewInvite, NewUser};
    use super::*;
    use crate::model::{Channels, DeviceStatus, Ownership};

    #[test]
    fn the_email_and_passcode_open_the_invite_and_the_first_session_enrolls() {
        let (d, _) = domain();
        let device_actor = Actor::device(None);
        let user = d
            .create_user(
                &admin(),
                &NewUser { name: "Ann".into(), email: "ann@example.com".into(), ..Default::default() },
            )
            .unwrap();
        let new = NewInvite {
            user_id: user.id,
            platform: Platform::Windows,
            ownership: Ownership::Corporate,
            group_id: None,
            channels: Channels::Email,
        };
        let created = d.create_invite_by_myself(&admin(), &new).unwrap();
        let passcode = created.passcode.unwrap();
        assert_eq!(d.windows_check("nobody@example.com", &passcode).unwrap(), Err(WindowsRefusal::NoInvite));
        for _ in 0..10 {
            assert_eq!(d.windows_check("ann@example.com", "00000000").unwrap(), Err(WindowsRefusal::Wrong));
        }
        assert!(!d.invite(&created.invite.id).unwrap().locked, "a stranger with the email cannot lock the invite");
        let invite = d.windows_check(" Ann@Example.com ", &passcode).unwrap().unwrap();
        assert_eq!(invite.id, created.invite.id);

        let facts = WindowsFacts { device_name: Some("ANN-LAPTOP".into()), ..Default::default() };
        let not_after = d.now() + time::Duration::days(365);
        d.windows_identity_issued(&device_actor, &invite.id, "aa11", not_after, &facts).unwrap();
        assert_eq!(
            d.windows_session(&device_actor, "bb22", &DevInfo::default()).unwrap(),
            Err(IdentityProblem::Unknown)
        );
        let info = DevInfo {
            dev_id: Some("7BA748C8-703E-4DF2-A74A-92984117346A".into()),
            manufacturer: Some("Contoso".into()),
            model: Some("Laptop 7".into()),
            software_version: Some("10.0.26100.1".into()),
            language: Some("en-US".into()),
        };
        let device = d.windows_session(&device_actor, "aa11", &info).unwrap().unwrap();
        assert_eq!((device.platform, device.status), (Platform::Windows, DeviceStatus::Enrolled));
        assert_eq!(device.model.as_deref(), Some("Contoso Laptop 7"));
        assert_eq!(device.name.as_deref(), Some("ANN-LAPTOP"));
        assert!(device.pending_commands.is_empty(), "DevInfo answers the request for facts");
        assert_eq!(d.invite(&invite.id).unwrap().status, InviteStatus::Enrolled);
        assert_eq!(
            d.windows_check("ann@example.com", &passcode).unwrap(),
            Err(WindowsRefusal::NoInvite),
            "the used invite opens nothing more"
        );
        let again = d.windows_session(&device_actor, "aa11", &info).unwrap().unwrap();
        assert_eq!(again.id, device.id);
        d.device_checked_out(&device_actor, &device.id).unwrap();
        assert_eq!(d.windows_session(&device_actor, "aa11", &info).unwrap(), Err(IdentityProblem::Unmanaged));
    }
}
