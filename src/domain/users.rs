//! Users and groups: creation with unique emails and group names, edits, deletion (with an explicit choice for a
//! user's managed devices), and listing.

use serde::Deserialize;
use utoipa::ToSchema;

use super::{
    Actor, DomainError, DomainResult, Enrollment, Paged, TxResult, decode_cursor, multi_line_text, normalize_email,
    normalize_phone, optional_field, optional_text, paged, required_text,
};
use crate::model::{CommandKind, Device, DeviceStatus, Group, Id, Invite, InviteStatus, PendingCommand, Remark, User};
use crate::store::{Scan, Tx, tree};

/// A user to create.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewUser {
    /// Up to 200 characters, not only spaces.
    pub name: String,
    /// An address such as `ann@example.com` (spaces around it are dropped; compared without regard to case): at
    /// most 64 bytes as UTF-8 before the `@` and 254 in all, as RFC 5321 counts a mailbox (format `mailbox`).
    #[schema(
        pattern = r"^\s*(?=\S{1,254}\s*$)[^\s@,;\x00-\x1f\x7f-\x9f]{1,64}@[^\s@,;.\x00-\x1f\x7f-\x9f]+(?:\.[^\s@,;.\x00-\x1f\x7f-\x9f]+)+\s*$"
    )]
    pub email: String,
    pub phone: Option<String>,
    pub domain: Option<String>,
    #[serde(default)]
    pub notes: String,
    #[serde(default)]
    pub groups: Vec<Id>,
}

/// Changes to a user; absent fields stay as they are, `null` clears an optional one.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UserPatch {
    /// Up to 200 characters, not only spaces.
    pub name: Option<String>,
    /// An address such as `ann@example.com` (spaces around it are dropped; compared without regard to case): at
    /// most 64 bytes as UTF-8 before the `@` and 254 in all, as RFC 5321 counts a mailbox (format `mailbox`).
    #[schema(
        pattern = r"^\s*(?=\S{1,254}\s*$)[^\s@,;\x00-\x1f\x7f-\x9f]{1,64}@[^\s@,;.\x00-\x1f\x7f-\x9f]+(?:\.[^\s@,;.\x00-\x1f\x7f-\x9f]+)+\s*$"
    )]
    pub email: Option<String>,
    #[serde(default, with = "double_option")]
    #[schema(value_type = Option<String>)]
    pub phone: Option<Option<String>>,
    #[serde(default, with = "double_option")]
    #[schema(value_type = Option<String>)]
    pub domain: Option<Option<String>>,
    pub notes: Option<String>,
    pub groups: Option<Vec<Id>>,
}

mod double_option {
    use serde::{Deserialize, Deserializer};
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Option<String>>, D::Error> {
        Option::<String>::deserialize(d).map(Some)
    }
}

/// What to do with a user's managed devices when the user is deleted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum UserChoiceForDevices {
    /// Keep the devices managed, with no user.
    Unassign,
    /// Revoke MDM on each device.
    RevokeMdm,
}

/// A group to create or the new name and description of one.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewGroup {
    /// Up to 100 characters, not only spaces.
    pub name: String,
    #[serde(default)]
    pub description: String,
}

impl Enrollment {
    pub fn create_user(&self, actor: &Actor, new: &NewUser) -> DomainResult<User> {
        let name = required_text("name", &new.name, 200)?;
        let email = normalize_email(&new.email)?;
        multi_line_text("notes", &new.notes)?;
        let phone = optional_text(new.phone.as_deref()).map(|p| normalize_phone(&p)).transpose()?;
        let now = self.now();
        let user = User {
            id: self.new_id(),
            name,
            email,
            phone,
            domain: optional_field("domain", new.domain.as_deref(), 200)?,
            notes: new.notes.trim().to_owned(),
            groups: dedup(&new.groups),
            created_at: now,
            updated_at: now,
            import: None,
        };
        self.transact(|tx| {
            if tx.lookup(tree::USERS_BY_EMAIL, user.email.as_bytes())?.is_some() {
                return Err(email_taken(&user.email).into());
            }
            for group in &user.groups {
                tx.get_id::<Group, _>(group)?.ok_or_else(|| DomainError::not_found("group", group))?;
            }
            tx.put(None, &user)?;
            self.audit(tx, actor, "user.create", Some(user.id.to_string()), format!("{} <{}>", user.name, user.email))
        })?;
        Ok(user)
    }

    pub fn user(&self, id: &Id) -> DomainResult<User> {
        self.store.get::<User>(id.as_bytes())?.ok_or_else(|| DomainError::not_found("user", id))
    }

    pub fn user_by_email(&self, email: &str) -> DomainResult<Option<User>> {
        let email = normalize_email(email)?;
        match self.store.lookup(tree::USERS_BY_EMAIL, email.as_bytes())? {
            Some(key) => Ok(self.store.get::<User>(&key)?),
            None => Ok(None),
        }
    }

    pub fn update_user(&self, actor: &Actor, id: &Id, patch: &UserPatch) -> DomainResult<User> {
        let name = patch.name.as_deref().map(|n| required_text("name", n, 200)).transpose()?;
        let email = patch.email.as_deref().map(normalize_email).transpose()?;
        // As on creation: white space around the number is dropped, and a blank one clears it.
        let phone = patch
            .phone
            .as_ref()
            .map(|p| optional_text(p.as_deref()).map(|p| normalize_phone(&p)).transpose())
            .transpose()?;
        let domain = patch.domain.as_ref().map(|d| optional_field("domain", d.as_deref(), 200)).transpose()?;
        if let Some(notes) = &patch.notes {
            multi_line_text("notes", notes)?;
        }
        let now = self.now();
        self.transact(|tx| {
            let old: User = tx.get_id(id)?.ok_or_else(|| DomainError::not_found("user", id))?;
            let mut user = old.clone();
            if let Some(name) = &name {
                user.name = name.clone();
            }
            if let Some(email) = &email
                && *email != old.email
            {
                if tx.lookup(tree::USERS_BY_EMAIL, email.as_bytes())?.is_some() {
                    return Err(email_taken(email).into());
                }
                user.email = email.clone();
            }
            if let Some(phone) = &phone {
                user.phone = phone.clone();
            }
            if let Some(domain) = &domain {
                user.domain = domain.clone();
            }
            if let Some(notes) = &patch.notes {
                user.notes = notes.trim().to_owned();
            }
            if let Some(groups) = &patch.groups {
                for group in groups {
                    tx.get_id::<Group, _>(group)?.ok_or_else(|| DomainError::not_found("group", group))?;
                }
                user.groups = dedup(groups);
            }
            user.updated_at = now;
            tx.put(Some(&old), &user)?;
            self.audit(tx, actor, "user.update", Some(id.to_string()), format!("{} <{}>", user.name, user.email))?;
            Ok(user)
        })
    }

    /// Deletes a user. Their open invites are removed. If they have managed devices, `choice` must say what happens
    /// to them.
    pub fn delete_user(&self, actor: &Actor, id: &Id, choice: Option<UserChoiceForDevices>) -> DomainResult<()> {
        let invite_keys = self.store.keys_under(tree::INVITES_BY_USER, id.as_bytes())?;
        let device_keys = self.store.keys_under(tree::DEVICES_BY_USER, id.as_bytes())?;
        self.transact(|tx| {
            let user: User = tx.get_id(id)?.ok_or_else(|| DomainError::not_found("user", id))?;
            let mut active = 0;
            for key in &device_keys {
                if let Some(device) = tx.get::<Device, _>(key)? {
                    active += usize::from(device.user_id == Some(*id) && device.status != DeviceStatus::Wiped);
                }
            }
            if active > 0 && choice.is_none() {
                return Err(DomainError::conflict(
                    "user_has_devices",
                    format!(
                        "{} has {active} managed device(s); choose managed_devices=unassign to keep them managed without a user, or managed_devices=revoke_mdm",
                        user.name
                    ),
                )
                .into());
            }
            self.detach_from_user(tx, actor, id, &device_keys, &invite_keys, choice)?;
            tx.delete(&user)?;
            self.audit(tx, actor, "user.delete", Some(id.to_string()), format!("{} <{}>", user.name, user.email))
        })?;
        // An invite or enrollment that committed while the deletion was under way still points at the user; let go
        // of it too. None can start afterwards: both read the user inside their transaction.
        let invite_keys = self.store.keys_under(tree::INVITES_BY_USER, id.as_bytes())?;
        let device_keys = self.store.keys_under(tree::DEVICES_BY_USER, id.as_bytes())?;
        self.transact(|tx| self.detach_from_user(tx, actor, id, &device_keys, &invite_keys, choice))
    }

    /// Unassigns (or revokes, as chosen) the user's devices and removes their open invites.
    fn detach_from_user(
        &self,
        tx: &Tx<'_>,
        actor: &Actor,
        id: &Id,
        device_keys: &[Vec<u8>],
        invite_keys: &[Vec<u8>],
        choice: Option<UserChoiceForDevices>,
    ) -> TxResult<()> {
        let now = self.now();
        for key in device_keys {
            let Some(old) = tx.get::<Device, _>(key)? else { continue };
            if old.user_id != Some(*id) {
                continue;
            }
            let mut device = old.clone();
            device.user_id = None;
            if choice == Some(UserChoiceForDevices::RevokeMdm) && device.status == DeviceStatus::Enrolled {
                device.status = DeviceStatus::Deprovisioning;
                device.pending_commands.push(PendingCommand {
                    id: self.new_id(),
                    kind: CommandKind::RevokeMdm,
                    queued_at: now,
                    queued_by: actor.name.clone(),
                    pin: None,
                });
            }
            tx.put(Some(&old), &device)?;
        }
        for key in invite_keys {
            let Some(old) = tx.get::<Invite, _>(key)? else { continue };
            if matches!(old.status, InviteStatus::Pending | InviteStatus::Expired) {
                let mut invite = old.clone();
                invite.status = InviteStatus::Removed;
                invite.remarks.push(Remark { at: now, text: format!("Removed with its user by {}", actor.name) });
                tx.put(Some(&old), &invite)?;
            }
        }
        Ok(())
    }

    /// Users, oldest first, optionally only those whose name or email contains `text`.
    pub fn users(&self, text: Option<&str>, cursor: Option<&str>, limit: usize) -> DomainResult<Paged<User>> {
        let after = decode_cursor(cursor)?;
        let needle = text.map(str::to_lowercase).filter(|t| !t.is_empty());
        let scan = Scan { tree: tree::USERS, prefix: &[], after: after.as_deref(), newest_first: false };
        let page = self.store.page(scan, super::clamp_limit(limit), |user: &User| match &needle {
            Some(needle) => user.name.to_lowercase().contains(needle) || user.email.contains(needle),
            None => true,
        })?;
        Ok(paged(page))
    }

    pub fn create_group(&self, actor: &Actor, new: &NewGroup) -> DomainResult<Group> {
        let name = required_text("name", &new.name, 100)?;
        multi_line_text("description", &new.description)?;
        let group = Group {
            id: self.new_id(),
            name,
            description: new.description.trim().to_owned(),
            created_at: self.now(),
            import: None,
        };
        self.transact(|tx| {
            if tx.lookup(tree::GROUPS_BY_NAME, group.name.to_lowercase().as_bytes())?.is_some() {
                return Err(group_taken(&group.name).into());
            }
            tx.put(None, &group)?;
            self.audit(tx, actor, "group.create", Some(group.id.to_string()), group.name.clone())
        })?;
        Ok(group)
    }

    pub fn group(&self, id: &Id) -> DomainResult<Group> {
        self.store.get::<Group>(id.as_bytes())?.ok_or_else(|| DomainError::not_found("group", id))
    }

    pub fn group_by_name(&self, name: &str) -> DomainResult<Option<Group>> {
        match self.store.lookup(tree::GROUPS_BY_NAME, name.trim().to_lowercase().as_bytes())? {
            Some(key) => Ok(self.store.get::<Group>(&key)?),
            None => Ok(None),
        }
    }

    pub fn update_group(&self, actor: &Actor, id: &Id, change: &NewGroup) -> DomainResult<Group> {
        let name = required_text("name", &change.name, 100)?;
        multi_line_text("description", &change.description)?;
        self.transact(|tx| {
            let old: Group = tx.get_id(id)?.ok_or_else(|| DomainError::not_found("group", id))?;
            if name.to_lowercase() != old.name.to_lowercase()
                && tx.lookup(tree::GROUPS_BY_NAME, name.to_lowercase().as_bytes())?.is_some()
            {
                return Err(group_taken(&name).into());
            }
            let group = Group { name: name.clone(), description: change.description.trim().to_owned(), ..old.clone() };
            tx.put(Some(&old), &group)?;
            self.audit(tx, actor, "group.update", Some(id.to_string()), group.name.clone())?;
            Ok(group)
        })
    }

    /// Deletes a group. Invites, devices and users that named it keep working without a group.
    pub fn delete_group(&self, actor: &Actor, id: &Id) -> DomainResult<()> {
        self.transact(|tx| {
            let group: Group = tx.get_id(id)?.ok_or_else(|| DomainError::not_found("group", id))?;
            tx.delete(&group)?;
            self.audit(tx, actor, "group.delete", Some(id.to_string()), group.name.clone())
        })
    }

    /// Groups, oldest first.
    pub fn groups(&self, cursor: Option<&str>, limit: usize) -> DomainResult<Paged<Group>> {
        let after = decode_cursor(cursor)?;
        let scan = Scan { tree: tree::GROUPS, prefix: &[], after: after.as_deref(), newest_first: false };
        Ok(paged(self.store.page(scan, super::clamp_limit(limit), |_| true)?))
    }
}

fn dedup(ids: &[Id]) -> Vec<Id> {
    let mut out: Vec<Id> = Vec::with_capacity(ids.len());
    for id in ids {
        if !out.contains(id) {
            out.push(*id);
        }
    }
    out
}

fn email_taken(email: &str) -> DomainError {
    DomainError::conflict(
        "email_taken",
        format!("a user with the email {email} exists already; edit that user instead"),
    )
}

fn group_taken(name: &str) -> DomainError {
    DomainError::conflict("group_exists", format!("a group named {name:?} exists already"))
}

#[cfg(test)]
mod tests {
    use super::super::testing::{admin, domain};
    use super::*;

    fn ann() -> NewUser {
        NewUser {
            name: "Ann Lee".into(),
            email: "Ann@Example.com".into(),
            phone: Some("+1 202 555 0100".into()),
            ..Default::default()
        }
    }

    #[test]
    fn users_are_unique_by_email_whatever_the_case() {
        let (d, _) = domain();
        let user = d.create_user(&admin(), &ann()).unwrap();
        assert_eq!(user.email, "ann@example.com");
        assert_eq!(user.phone.as_deref(), Some("+12025550100"));
        let again = NewUser { email: "ANN@example.COM".into(), ..ann() };
        let error = d.create_user(&admin(), &again).unwrap_err();
        assert!(matches!(error, DomainError::Conflict { code: "email_taken", .. }), "{error}");

        let bob = d
            .create_user(
                &admin(),
                &NewUser { name: "Bob".into(), email: "bob@example.com".into(), ..Default::default() },
            )
            .unwrap();
        let clash = UserPatch { email: Some("ann@example.com".into()), ..Default::default() };
        assert!(matches!(d.update_user(&admin(), &bob.id, &clash), Err(DomainError::Conflict { .. })));
        let moved = UserPatch { email: Some("robert@example.com".into()), phone: Some(None), ..Default::default() };
        let bob = d.update_user(&admin(), &bob.id, &moved).unwrap();
        assert_eq!(d.user_by_email("robert@example.com").unwrap().unwrap().id, bob.id);
        assert!(d.user_by_email("bob@example.com").unwrap().is_none(), "the old email is free again");
        let phoned = UserPatch { phone: Some(Some("\u{c} +1 202 555 0100\t\n".into())), ..Default::default() };
        let bob = d.update_user(&admin(), &bob.id, &phoned).unwrap();
        assert_eq!(bob.phone.as_deref(), Some("+12025550100"), "spaces around it dropped, as on creation");
        let blank = UserPatch { phone: Some(Some(" ".into())), ..Default::default() };
        assert_eq!(d.update_user(&admin(), &bob.id, &blank).unwrap().phone, None);
    }

    #[test]
    fn bad_fields_are_named() {
        let (d, _) = domain();
        let cases = [
            (NewUser { name: " ".into(), ..ann() }, "name"),
            (NewUser { email: "ann.example.com".into(), ..ann() }, "email"),
            (NewUser { phone: Some("555-0100".into()), ..ann() }, "phone"),
            (NewUser { name: "Ann\0Lee".into(), ..ann() }, "name"),
            (NewUser { name: "Ann\nLee".into(), ..ann() }, "name"),
            (NewUser { email: "ann\u{7}@example.com".into(), ..ann() }, "email"),
            (NewUser { domain: Some("corp\u{1b}[31m".into()), ..ann() }, "domain"),
            (NewUser { notes: "fine\nover lines, but not\0this".into(), ..ann() }, "notes"),
        ];
        for (new, field) in cases {
            match d.create_user(&admin(), &new) {
                Err(DomainError::Invalid { field: f, .. }) => assert_eq!(f, field),
                other => panic!("{field}: {other:?}"),
            }
        }
    }

    #[test]
    fn groups_are_unique_by_name() {
        let (d, _) = domain();
        let sales = d.create_group(&admin(), &NewGroup { name: "Sales".into(), description: String::new() }).unwrap();
        assert!(d.create_group(&admin(), &NewGroup { name: "sales".into(), description: String::new() }).is_err());
        match d.create_group(&admin(), &NewGroup { name: "Sa\0les".into(), description: String::new() }) {
            Err(DomainError::Invalid { field, message }) => {
                assert_eq!(field, "name");
                assert!(message.contains("control character"), "{message}");
            }
            other => panic!("{other:?}"),
        }
        let renamed = d
            .update_group(&admin(), &sales.id, &NewGroup { name: "Field sales".into(), description: "x".into() })
            .unwrap();
        assert_eq!(d.group_by_name("field SALES").unwrap().unwrap().id, renamed.id);
        assert!(d.group_by_name("sales").unwrap().is_none());
        d.delete_group(&admin(), &sales.id).unwrap();
        assert!(d.group_by_name("field sales").unwrap().is_none());
    }
}
