//! A gateway chain's secrets (amendment 2.4): the versions its `secret` entries declared from
//! its first snapshot on, and whether the secret version an `executed` entry names was
//! declared and still current when its call began.

use std::collections::{HashMap, HashSet};

use crate::entry::{Entry, SecretAction};

/// What a gateway chain's `secret` entries declared (amendment 2.4), from its first snapshot
/// on: each secret's versions, and when its current version changed.
#[derive(Default)]
pub(super) struct SecretLedger {
    /// Seq of the first `snapshot` entry; nothing is checked before it.
    snapshot: Option<u64>,
    /// By secret id.
    secrets: HashMap<[u8; 16], Declared>,
}

/// One secret in a [`SecretLedger`].
#[derive(Default)]
struct Declared {
    /// Every version an entry listed.
    versions: HashSet<u64>,
    /// (seq, current version) at each entry that listed it, in seq order.
    currents: Vec<(u64, Option<u64>)>,
}

impl SecretLedger {
    /// Records what a `secret` entry declares (nothing before the first snapshot).
    pub(super) fn declare(&mut self, e: &Entry) {
        if e.action == Some(SecretAction::Snapshot) && self.snapshot.is_none() {
            self.snapshot = Some(e.seq);
        }
        if self.snapshot.is_none() {
            return;
        }
        for state in e.secrets.iter().flatten() {
            let d = self.secrets.entry(state.id).or_default();
            d.versions.extend(state.versions.iter().map(|v| v.version));
            d.currents.push((e.seq, state.current()));
        }
    }

    /// Checks the secret an `executed` entry names against what was declared before it, and
    /// before its call's `executing` entry at `began`.
    pub(super) fn check_use(&self, e: &Entry, began: Option<u64>) -> Result<(), String> {
        let (Some(snapshot), Some(id), Some(version)) =
            (self.snapshot, e.secret_id, e.secret_version)
        else {
            return Ok(());
        };
        let named = format!("secret {} version {version}", hex::encode(id));
        let Some(Declared { currents, .. }) = self
            .secrets
            .get(&id)
            .filter(|d| d.versions.contains(&version))
        else {
            return Err(format!(
                "names {named}, which no secret entry since the snapshot at seq {snapshot} declares"
            ));
        };
        let Some(began) = began else {
            return Ok(());
        };
        // the call opened its secret after its executing entry was durable: a version
        // replaced before that entry cannot be the one it used
        let before = currents.partition_point(|(seq, _)| *seq < began);
        if let Some((at, Some(current))) = before.checked_sub(1).map(|i| currents[i])
            && version < current
        {
            return Err(format!(
                "names {named}, but version {current} was current from seq {at}, before the \
                 call's executing entry at seq {began}"
            ));
        }
        Ok(())
    }
}
