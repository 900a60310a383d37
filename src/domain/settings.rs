//! Settings an admin changes through the API (invite templates first), kept in the store with who changed them;
//! what they mean is up to the module that reads them.

use super::{Actor, DomainResult, Enrollment};
use crate::model::Setting;
use crate::naming::Names;

impl Enrollment {
    /// Every saved setting whose name starts with `prefix`.
    pub fn settings(&self, prefix: &str) -> DomainResult<Vec<Setting>> {
        Ok(self.store.all::<Setting>(|s| s.name.starts_with(prefix))?)
    }

    /// Saves a setting (replacing any earlier value), with an audit entry.
    pub fn save_setting(&self, actor: &Actor, name: &str, value: &str) -> DomainResult<Setting> {
        let setting = Setting {
            name: name.to_owned(),
            value: value.to_owned(),
            updated_at: self.now(),
            updated_by: actor.name.clone(),
        };
        self.transact(|tx| {
            let old = tx.get::<Setting, _>(name.as_bytes())?;
            tx.put(old.as_ref(), &setting)?;
            self.audit(
                tx,
                actor,
                "setting.save",
                Some(name.to_owned()),
                format!("{} characters", value.chars().count()),
            )
        })?;
        Ok(setting)
    }

    /// Removes a saved setting, so the default applies again. Removing one that is not saved is not an error.
    pub fn reset_setting(&self, actor: &Actor, name: &str) -> DomainResult<()> {
        self.transact(|tx| {
            if let Some(old) = tx.get::<Setting, _>(name.as_bytes())? {
                tx.delete(&old)?;
                self.audit(tx, actor, "setting.reset", Some(name.to_owned()), "back to the default")?;
            }
            Ok(())
        })
    }
}

/// The appliance's names as an admin saved them (over the configuration's `organisation` and `hostname`).
const ORGANISATION: &str = "appliance.organisation";
const HOSTNAME: &str = "appliance.hostname";

impl Enrollment {
    /// The names in use: the saved ones, else `configured`.
    pub fn saved_names(&self, configured: &Names) -> DomainResult<Names> {
        saved_names_in(&self.store, configured)
    }

    /// Checks and saves the organisation's name and the host name; they win over the configuration's from now on.
    pub fn save_names(&self, actor: &Actor, organisation: &str, hostname: &str) -> DomainResult<Names> {
        let names = Names::checked(organisation, hostname)
            .map_err(|error| super::DomainError::invalid(error.field, error.reason))?;
        self.save_setting(actor, ORGANISATION, &names.organisation)?;
        self.save_setting(actor, HOSTNAME, &names.hostname)?;
        Ok(names)
    }
}

/// The names in use, read from the store alone (start-up reads them so before the domain is built): the saved
/// ones, else `configured`.
pub fn saved_names_in(store: &crate::store::Store, configured: &Names) -> DomainResult<Names> {
    let saved = store.all::<Setting>(|s| s.name.starts_with("appliance."))?;
    let find = |name: &str| saved.iter().find(|s| s.name == name).map(|s| s.value.clone());
    let organisation = find(ORGANISATION).unwrap_or_else(|| configured.organisation.clone());
    let hostname = find(HOSTNAME).unwrap_or_else(|| configured.hostname.clone());
    // A saved value was checked when it was saved; should the rules tighten, the configuration's names apply.
    Ok(Names::checked(&organisation, &hostname).unwrap_or_else(|_| configured.clone()))
}

/// How long invites are valid, in days, as an admin saved it.
const INVITE_VALIDITY: &str = "policy.invite_validity_days";
/// Who is told when a device enrolls, as an admin saved it (addresses, one per line), and whether the user is.
const CONFIRMATION_TO: &str = "policy.confirmation_to";
const CONFIRMATION_TO_USER: &str = "policy.confirmation_to_user";

/// The rules an admin can change while enrolld runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyChange {
    pub invite_validity_days: u32,
    pub confirmation_to: Vec<String>,
    pub confirmation_to_user: bool,
}

impl Enrollment {
    /// Puts the admin's saved rules over the configuration's (at start, and after a change).
    pub(super) fn apply_saved_policy(&self) -> DomainResult<()> {
        let saved = self.settings("policy.")?;
        let find = |name: &str| saved.iter().find(|s| s.name == name).map(|s| s.value.clone());
        let mut policy = (*self.policy()).clone();
        if let Some(days) = find(INVITE_VALIDITY).and_then(|d| d.parse::<i64>().ok()) {
            policy.invite_validity = time::Duration::days(days);
        }
        if let Some(list) = find(CONFIRMATION_TO) {
            policy.confirmation_to = list.lines().map(str::to_owned).filter(|l| !l.is_empty()).collect();
        }
        if let Some(flag) = find(CONFIRMATION_TO_USER) {
            policy.confirmation_to_user = flag == "true";
        }
        self.policy.store(std::sync::Arc::new(policy));
        Ok(())
    }

    /// Saves the rules an admin changed, checked first: validity 1 to 90 days and longer than the reminder; every
    /// address an email address. New invites use them at once.
    pub fn save_policy(&self, actor: &Actor, change: &PolicyChange) -> DomainResult<()> {
        if !(1..=90).contains(&change.invite_validity_days) {
            return Err(super::DomainError::invalid("invite_validity_days", "give 1 to 90 days"));
        }
        if let Some(before) = self.policy().reminder_before
            && time::Duration::days(i64::from(change.invite_validity_days)) <= before
        {
            return Err(super::DomainError::invalid(
                "invite_validity_days",
                format!(
                    "reminders go {} days before expiry (invite_reminder_days), so invites must last longer than that",
                    before.whole_days()
                ),
            ));
        }
        let list = change
            .confirmation_to
            .iter()
            .filter(|a| !a.trim().is_empty())
            .map(|a| {
                super::normalize_email(a).map_err(|_| {
                    super::DomainError::invalid("confirmation_to", format!("{a:?} is not an email address"))
                })
            })
            .collect::<DomainResult<Vec<_>>>()?;
        self.save_setting(actor, INVITE_VALIDITY, &change.invite_validity_days.to_string())?;
        self.save_setting(actor, CONFIRMATION_TO, &list.join("\n"))?;
        self.save_setting(actor, CONFIRMATION_TO_USER, if change.confirmation_to_user { "true" } else { "false" })?;
        self.apply_saved_policy()
    }
}

/// The last backup that was made, kept as a setting (`backup.last`) for the dashboard.
const LAST_BACKUP: &str = "backup.last";

/// When the last backup was made, how big it was, how (`page`, `api`, `cli`) and by whom.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LastBackup {
    #[serde(with = "time::serde::rfc3339")]
    pub at: time::OffsetDateTime,
    pub bytes: u64,
    pub how: String,
    pub by: String,
}

impl Enrollment {
    /// Records a backup that was made and handed over whole: the dashboard's "last backup", and the audit entry
    /// `backup.downloaded` (never the passphrase), in one transaction.
    pub fn record_backup(
        &self,
        actor: &Actor,
        how: &str,
        bytes: u64,
        made_at: time::OffsetDateTime,
    ) -> DomainResult<()> {
        let last = LastBackup { at: made_at, bytes, how: how.to_owned(), by: actor.name.clone() };
        let setting = Setting {
            name: LAST_BACKUP.to_owned(),
            value: serde_json::to_string(&last).unwrap_or_default(),
            updated_at: self.now(),
            updated_by: actor.name.clone(),
        };
        self.transact(|tx| {
            let old = tx.get::<Setting, _>(LAST_BACKUP.as_bytes())?;
            tx.put(old.as_ref(), &setting)?;
            self.audit(tx, actor, "backup.downloaded", None, format!("{bytes} bytes, through the {how}"))
        })
    }

    /// The last backup recorded, if any.
    pub fn last_backup(&self) -> DomainResult<Option<LastBackup>> {
        let saved = self.store.get::<Setting>(LAST_BACKUP.as_bytes())?;
        Ok(saved.and_then(|s| serde_json::from_str(&s.value).ok()))
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{admin, domain};
    use super::*;
    use crate::model::{Channels, Ownership, Platform};

    #[test]
    fn the_last_backup_is_recorded_and_audited_without_the_passphrase() {
        use crate::clock::Clock as _;
        let (d, clock) = domain();
        assert_eq!(d.last_backup().unwrap(), None);
        let made = clock.now();
        d.record_backup(&admin(), "page", 4096, made).unwrap();
        let last = d.last_backup().unwrap().unwrap();
        assert_eq!((last.at, last.bytes, last.how.as_str(), last.by.as_str()), (made, 4096, "page", "admin"));
        let audit = d.audit_log(None, 10).unwrap().items;
        assert_eq!(audit[0].action, "backup.downloaded");
        assert_eq!(audit[0].detail, "4096 bytes, through the page");
    }

    #[test]
    fn saved_names_win_over_the_configuration() {
        let (d, _) = domain();
        let configured = Names::checked("", "enroll").unwrap();
        assert_eq!(d.saved_names(&configured).unwrap(), configured);
        let refused = d.save_names(&admin(), "Example", "front desk").unwrap_err();
        assert!(matches!(refused, super::super::DomainError::Invalid { field: "hostname", .. }), "{refused}");
        assert_eq!(d.saved_names(&configured).unwrap(), configured, "nothing was saved");
        let saved = d.save_names(&admin(), " Example Ltd ", "Front-Desk").unwrap();
        assert_eq!(d.saved_names(&configured).unwrap(), saved);
        assert_eq!((saved.organisation.as_str(), saved.hostname.as_str()), ("Example Ltd", "front-desk"));
    }

    #[test]
    fn saved_rules_apply_to_new_invites_and_survive_a_restart() {
        let (d, clock) = domain();
        let change = PolicyChange {
            invite_validity_days: 3,
            confirmation_to: vec!["Helpdesk@Example.com".into(), "".into()],
            confirmation_to_user: true,
        };
        d.save_policy(&admin(), &change).unwrap();
        let user = d
            .create_user(
                &admin(),
                &super::super::NewUser { name: "Ann".into(), email: "ann@example.com".into(), ..Default::default() },
            )
            .unwrap();
        let new = super::super::NewInvite {
            user_id: user.id,
            platform: Platform::Ios,
            ownership: Ownership::Corporate,
            group_id: None,
            channels: Channels::Email,
        };
        let invite = d.create_invite(&admin(), &new).unwrap().invite;
        assert_eq!(invite.expires_at - invite.requested_at, time::Duration::days(3));

        let again =
            Enrollment::new(d.store.clone(), std::sync::Arc::new(clock.clone()), Default::default(), &[7; 32]).unwrap();
        let policy = again.policy();
        assert_eq!(policy.invite_validity, time::Duration::days(3));
        assert_eq!(policy.confirmation_to, vec!["helpdesk@example.com".to_owned()]);
        assert!(policy.confirmation_to_user);

        let bad = PolicyChange { confirmation_to: vec!["not an address".into()], ..change.clone() };
        assert!(d.save_policy(&admin(), &bad).unwrap_err().to_string().contains("not an email address"));
        let long = PolicyChange { invite_validity_days: 91, ..change };
        assert!(d.save_policy(&admin(), &long).is_err());
        assert_eq!(d.policy().invite_validity, time::Duration::days(3), "a refused change changes nothing");
    }
}
