//! Apple MDM enrollment state: the one-time SCEP challenges an enrollment profile carries, the device identities
//! issued for them, and what devices say over check-in (`Authenticate`, `TokenUpdate`, `CheckOut`), which moves an
//! invite to *Enrolled* and a device to *Enrolled* or *Unmanaged*.

use base64::Engine as _;

use super::devices::{DeviceFacts, IdentityProblem, only_contact_changed, same_device};
use super::invites::link_state;
use super::{Actor, DomainError, DomainResult, Enrollment, optional_text, random_bytes, sha256_hex};
use crate::model::{AppleFacts, AppleIdentity, ApplePush, Device, Id, Invite, Platform, Remark, ScepChallenge};
use crate::store::{Tx, tree};

/// How long a profile's SCEP challenge works: the profile is installed right after it is downloaded.
const CHALLENGE_LIFETIME: time::Duration = time::Duration::hours(1);

impl AppleFacts {
    /// These facts with the ones a later message gave laid over them (a fact not sent again is kept).
    pub fn updated(&self, newer: &AppleFacts) -> AppleFacts {
        let keep = |new: &Option<String>, old: &Option<String>| optional_text(new.as_deref()).or(old.clone());
        AppleFacts {
            udid: keep(&newer.udid, &self.udid),
            serial_number: keep(&newer.serial_number, &self.serial_number),
            model: keep(&newer.model, &self.model),
            model_name: keep(&newer.model_name, &self.model_name),
            os_version: keep(&newer.os_version, &self.os_version),
            build_version: keep(&newer.build_version, &self.build_version),
            device_name: keep(&newer.device_name, &self.device_name),
            imei: keep(&newer.imei, &self.imei),
            enrollment_id: keep(&newer.enrollment_id, &self.enrollment_id),
        }
    }

    /// The platform, from the model name Apple sends (`iPhone`, `iPad`, `MacBook Pro`, `iMac`, …).
    pub fn platform(&self) -> Option<Platform> {
        let name = self.model_name.as_deref().or(self.model.as_deref())?;
        if name.starts_with("iPad") {
            Some(Platform::Ipados)
        } else if name.starts_with("iPhone") || name.starts_with("iPod") {
            Some(Platform::Ios)
        } else if name.starts_with("Mac") || name.starts_with("iMac") {
            Some(Platform::Macos)
        } else {
            None
        }
    }

    pub fn device_facts(&self) -> DeviceFacts {
        let os = match (&self.os_version, &self.build_version) {
            (Some(version), Some(build)) => Some(format!("{version} ({build})")),
            (version, _) => version.clone(),
        };
        DeviceFacts {
            platform: self.platform(),
            name: self.device_name.clone(),
            model: self.model_name.clone().or(self.model.clone()),
            serial: self.serial_number.clone(),
            imei: self.imei.clone(),
            hardware_id: self.udid.clone(),
            os_version: os,
        }
    }
}

/// The device a check-in or command report names: its `UDID`, or a User Enrollment's `EnrollmentID`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AppleClaim {
    pub udid: Option<String>,
    pub enrollment_id: Option<String>,
}

/// Why a SCEP challenge gets no certificate. Deliberately coarse: a device learns nothing about other invites.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChallengeProblem {
    /// Never issued, or already used.
    Unknown,
    /// Its invite expired, or was resent, removed or used meanwhile.
    Expired,
}

impl Enrollment {
    /// A new one-time SCEP challenge for an invite that can still enroll a device. It works for an hour, and dies
    /// sooner with the invite's link (resent, removed, used, expired).
    pub fn scep_challenge(&self, invite_id: &Id) -> DomainResult<String> {
        let now = self.now();
        let challenge = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(random_bytes::<24>());
        let hash = sha256_hex(challenge.as_bytes());
        self.transact(|tx| {
            let invite: Invite = tx.get_id(invite_id)?.ok_or_else(|| DomainError::not_found("invite", invite_id))?;
            if let Err(problem) = link_state(&invite, now) {
                return Err(DomainError::conflict(
                    "invite_not_open",
                    format!("this invite cannot enroll a device ({problem:?})"),
                )
                .into());
            }
            let record = ScepChallenge {
                hash: hash.clone(),
                invite_id: *invite_id,
                generation: invite.generation,
                created_at: now,
                expires_at: invite.expires_at.min(now + CHALLENGE_LIFETIME),
            };
            tx.put(None, &record)
        })?;
        Ok(challenge)
    }

    /// The invite a SCEP challenge would enroll, without using it up (the certificate is issued before the
    /// challenge is spent, so a failure in between leaves it usable for the device's retry).
    pub fn scep_challenge_invite(&self, challenge: &str) -> DomainResult<Result<Invite, ChallengeProblem>> {
        let now = self.now();
        let hash = sha256_hex(challenge.as_bytes());
        self.transact(|tx| challenge_invite(tx, &hash, now))
    }

    /// Spends a SCEP challenge and records the identity issued for it, in one transaction: the challenge is
    /// deleted, its invite checked again, the identity stored, and the invite's remarks say so.
    pub fn redeem_scep_challenge(
        &self,
        actor: &Actor,
        challenge: &str,
        info: &crate::pki::CertInfo,
    ) -> DomainResult<Result<AppleIdentity, ChallengeProblem>> {
        let now = self.now();
        let hash = sha256_hex(challenge.as_bytes());
        self.transact(|tx| {
            let old_invite = match challenge_invite(tx, &hash, now)? {
                Ok(invite) => invite,
                Err(problem) => return Ok(Err(problem)),
            };
            if let Some(record) = tx.get::<ScepChallenge, _>(hash.as_bytes())? {
                tx.delete(&record)?;
            }
            let identity = AppleIdentity {
                sha256: info.sha256.clone(),
                serial: info.serial.clone(),
                invite_id: old_invite.id,
                issued_at: now,
                not_after: info.not_after,
                device_id: None,
                facts: AppleFacts::default(),
                push: None,
                checked_out: false,
            };
            let mut invite = old_invite.clone();
            invite.remarks.push(Remark {
                at: now,
                text: "The device installed the enrollment profile and received its identity certificate".into(),
            });
            tx.put(Some(&old_invite), &invite)?;
            tx.put(None, &identity)?;
            self.audit(
                tx,
                actor,
                "apple.identity",
                Some(invite.id.to_string()),
                format!("device identity issued, serial {}, SHA-256 {}", info.serial, info.sha256),
            )?;
            Ok(Ok(identity))
        })
    }

    /// The identity with this certificate fingerprint, if enrolld issued it.
    pub fn apple_identity(&self, sha256: &str) -> DomainResult<Option<AppleIdentity>> {
        Ok(self.store.get::<AppleIdentity>(sha256.as_bytes())?)
    }

    /// Whether a message signed by identity `sha256` names the device that identity belongs to. The first message
    /// naming a device binds the identity to it (`Authenticate` does so in practice); a later one naming another
    /// UDID or EnrollmentID is refused and audited (`device.refused`). A device enrolling again gets a new
    /// identity, so it is bound afresh.
    pub fn apple_claim(
        &self,
        actor: &Actor,
        sha256: &str,
        claim: &AppleClaim,
    ) -> DomainResult<Result<(), IdentityProblem>> {
        let mismatch = self.transact(|tx| {
            let old: AppleIdentity =
                tx.get(sha256.as_bytes())?.ok_or_else(|| DomainError::not_found("identity", sha256))?;
            let facts = &old.facts;
            for (name, bound, claimed) in
                [("UDID", &facts.udid, &claim.udid), ("EnrollmentID", &facts.enrollment_id, &claim.enrollment_id)]
            {
                if !same_device(bound.as_deref(), claimed.as_deref()) {
                    let (bound, claimed) = (bound.as_deref().unwrap_or(""), claimed.as_deref().unwrap_or(""));
                    return Ok(Some((
                        old.device_id,
                        format!("a message signed by the identity of {name} {bound} named {name} {claimed}"),
                    )));
                }
            }
            let bound = AppleFacts {
                udid: facts.udid.clone().or(optional_text(claim.udid.as_deref())),
                enrollment_id: facts.enrollment_id.clone().or(optional_text(claim.enrollment_id.as_deref())),
                ..facts.clone()
            };
            if bound != *facts {
                tx.put(Some(&old), &AppleIdentity { facts: bound, ..old.clone() })?;
            }
            Ok(None)
        })?;
        match mismatch {
            None => Ok(Ok(())),
            Some((device, what)) => Ok(Err(self.refuse_other_device(actor, device.as_ref(), sha256, &what)?)),
        }
    }

    /// `Authenticate`: the device says what it is. Nothing is enrolled yet; an already enrolled device (one that
    /// re-authenticates) has its record updated.
    pub fn apple_authenticate(&self, sha256: &str, facts: &AppleFacts) -> DomainResult<AppleIdentity> {
        let identity = self.transact(|tx| {
            let old: AppleIdentity =
                tx.get(sha256.as_bytes())?.ok_or_else(|| DomainError::not_found("identity", sha256))?;
            if old.checked_out {
                return Err(checked_out().into());
            }
            let identity = AppleIdentity { facts: old.facts.updated(facts), ..old.clone() };
            tx.put(Some(&old), &identity)?;
            Ok(identity)
        })?;
        if let Some(device) = self.apple_managed_device(sha256)? {
            self.device_checked_in(&device, &facts.device_facts())?;
        }
        Ok(identity)
    }

    /// `TokenUpdate`: the device can now be reached by push. The first one completes the enrollment (invite used,
    /// device Enrolled, staged record matched, notices queued) in the same transaction that records the push
    /// address; later ones update the address. Returns the device and whether this enrolled it.
    pub fn apple_token_update(&self, actor: &Actor, sha256: &str, push: &ApplePush) -> DomainResult<(Device, bool)> {
        let now = self.now();
        let identity = self.apple_identity(sha256)?.ok_or_else(|| DomainError::not_found("identity", sha256))?;
        let waiting = self.store.keys_under(tree::OUTBOX_BY_INVITE, identity.invite_id.as_bytes())?;
        let ids = [self.new_id(), self.new_id()];
        self.transact(|tx| {
            let old: AppleIdentity =
                tx.get(sha256.as_bytes())?.ok_or_else(|| DomainError::not_found("identity", sha256))?;
            if old.checked_out {
                return Err(checked_out().into());
            }
            let (before, enrolled, first) = match old.device_id.map(|id| tx.get_id::<Device, _>(&id)).transpose()? {
                Some(Some(device)) if device.identity.as_deref() != Some(sha256) => {
                    return Err(superseded().into());
                }
                Some(Some(device)) => (Some(device.clone()), device, false),
                _ => {
                    let device = self.enroll_in(tx, actor, &old.invite_id, &old.facts.device_facts(), ids, &waiting)?;
                    (Some(device.clone()), device, true)
                }
            };
            let mut device = enrolled;
            device.identity = Some(sha256.to_owned());
            device.last_contact = now;
            // A token update from the managing identity clears an old problem, but not the warning the enrollment
            // itself just left (a device that enrolled again while still managed).
            if !first {
                device.problem = None;
            }
            tx.put(before.as_ref(), &device)?;
            let mut identity = old.clone();
            identity.device_id = Some(device.id);
            identity.push = Some(push.clone());
            tx.put(Some(&old), &identity)?;
            // The same token again from a managed device: only its last-contact time is new.
            if identity == old && before.as_ref().is_some_and(|before| only_contact_changed(before, &device)) {
                tx.coalesce();
            }
            Ok((device, first))
        })
    }

    /// `CheckOut`: the device removed its management profile. The device becomes Unmanaged if this is the identity
    /// it is managed under (a device that enrolled again since keeps its newer enrollment).
    pub fn apple_check_out(&self, actor: &Actor, sha256: &str) -> DomainResult<Option<Device>> {
        let device_id = self.transact(|tx| {
            let old: AppleIdentity =
                tx.get(sha256.as_bytes())?.ok_or_else(|| DomainError::not_found("identity", sha256))?;
            let identity = AppleIdentity { checked_out: true, ..old.clone() };
            tx.put(Some(&old), &identity)?;
            let Some(device_id) = old.device_id else { return Ok(None) };
            let current = tx.get_id::<Device, _>(&device_id)?.and_then(|d| d.identity);
            Ok((current.as_deref() == Some(sha256)).then_some(device_id))
        })?;
        device_id.map(|id| self.device_checked_out(actor, &id)).transpose()
    }

    /// The device this identity manages: set once it enrolled, and only while the device has not enrolled again
    /// under a newer identity and this one has not checked out.
    pub fn apple_managed_device(&self, sha256: &str) -> DomainResult<Option<Id>> {
        let Some(identity) = self.apple_identity(sha256)?.filter(|i| !i.checked_out) else { return Ok(None) };
        let Some(device_id) = identity.device_id else { return Ok(None) };
        let device = self.device(&device_id)?;
        Ok((device.identity.as_deref() == Some(sha256)).then_some(device_id))
    }

    /// Where to push to reach a device, if it is an Apple device that is managed and has sent its token.
    pub fn apple_push_target(&self, device_id: &Id) -> DomainResult<Option<ApplePush>> {
        let device = self.device(device_id)?;
        let Some(sha256) = device.identity else { return Ok(None) };
        Ok(self.apple_identity(&sha256)?.filter(|i| !i.checked_out).and_then(|i| i.push))
    }

    /// SCEP challenges that expired unused are removed (called by the sweeper).
    pub fn sweep_scep_challenges(&self) -> DomainResult<usize> {
        let now = self.now();
        let expired = self.store.all::<ScepChallenge>(|c| c.expires_at <= now)?;
        for challenge in &expired {
            self.transact(|tx| {
                if tx.get::<ScepChallenge, _>(challenge.hash.as_bytes())?.is_some() {
                    tx.delete(challenge)?;
                }
                Ok(())
            })?;
        }
        Ok(expired.len())
    }

    /// Notes (or, with `None`, clears) what went wrong reaching a device.
    pub fn record_device_problem(&self, device_id: &Id, problem: Option<String>) -> DomainResult<Device> {
        self.transact(|tx| {
            let old: Device = tx.get_id(device_id)?.ok_or_else(|| DomainError::not_found("device", device_id))?;
            let device = Device { problem: problem.clone(), ..old.clone() };
            if device != old {
                tx.put(Some(&old), &device)?;
            }
            Ok(device)
        })
    }

    /// Clears the device's problem if it is still `expected` (what an earlier push recorded), and leaves any other
    /// (a command the device refused, the warning that it enrolled again) for the admin to see. Whether it cleared.
    pub fn clear_device_problem_if(&self, device_id: &Id, expected: &str) -> DomainResult<bool> {
        self.transact(|tx| {
            let old: Device = tx.get_id(device_id)?.ok_or_else(|| DomainError::not_found("device", device_id))?;
            if old.problem.as_deref() != Some(expected) {
                return Ok(false);
            }
            tx.put(Some(&old), &Device { problem: None, ..old.clone() })?;
            Ok(true)
        })
    }
}

fn checked_out() -> DomainError {
    DomainError::conflict("checked_out", "this device checked out; it must enroll again with a new invite")
}

fn superseded() -> DomainError {
    DomainError::conflict("identity_superseded", "the device enrolled again since; this identity no longer manages it")
}

/// The invite a stored challenge names, if the challenge is live and the invite can still enroll with the same
/// link it was made for.
fn challenge_invite(
    tx: &Tx<'_>,
    hash: &str,
    now: time::OffsetDateTime,
) -> Result<Result<Invite, ChallengeProblem>, crate::store::TxError<DomainError>> {
    let Some(record) = tx.get::<ScepChallenge, _>(hash.as_bytes())? else {
        return Ok(Err(ChallengeProblem::Unknown));
    };
    if record.expires_at <= now {
        return Ok(Err(ChallengeProblem::Expired));
    }
    let Some(invite) = tx.get_id::<Invite, _>(&record.invite_id)? else {
        return Ok(Err(ChallengeProblem::Unknown));
    };
    if invite.generation != record.generation {
        return Ok(Err(ChallengeProblem::Expired));
    }
    Ok(link_state(&invite, now).map_err(|_| ChallengeProblem::Expired))
}
