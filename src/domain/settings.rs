//! Settings an admin changes through the API (invite templates first), kept in the store with who changed them;
//! what they mean is up to the module that reads them.

use super::{Actor, DomainResult, Enrollment};
use crate::model::Setting;

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
