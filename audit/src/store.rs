//! The thin store type over fjall, and the chain writer with group commit
//! (specs/audit-log.md, "Storage").
//!
//! [`Store`] owns one fjall database: the `entries` keyspace (key: seq as u64 big-endian,
//! value: the entry's bytes), `meta` (the chain head), and any named keyspaces a component
//! needs (replay keys, grants, secrets). [`Chain`] is the single writer of the entries: one
//! thread drains a queue of pending appends, checks their claims, applies them as one atomic
//! batch, persists it with `SyncAll` once, then acknowledges every waiter. An append is
//! acknowledged only after its fsync. After an I/O error the chain stays failed (fail closed)
//! until the store is reopened.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;

use didgate_protocol::Did;
use didgate_protocol::message::{ChainHead, Digest, EntryRef};
use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};

use crate::entry::{Entry, EntryKind, Role, entry_hash};

/// Keyspace of entries.
pub const ENTRIES: &str = "entries";
/// Keyspace of chain metadata (`head` = seq u64be || hash).
pub const META: &str = "meta";
const HEAD_KEY: &[u8] = b"head";
/// Largest number of appends one batch takes.
const MAX_BATCH: usize = 1024;

/// A storage failure.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The engine failed (I/O, lock held by another process, corruption).
    #[error("store: {0}")]
    Engine(#[from] fjall::Error),
    /// An entry in the store does not decode.
    #[error("entry {seq} is corrupt: {why}")]
    Corrupt {
        /// Its seq.
        seq: u64,
        /// Why.
        why: String,
    },
    /// A keyspace that was not named when the store was opened.
    #[error("unknown keyspace {0}")]
    UnknownSpace(String),
    /// The chain belongs to another owner than the one opening it.
    #[error("this chain belongs to {0}")]
    WrongOwner(String),
}

/// A key and its value.
pub type KeyValue = (Vec<u8>, Vec<u8>);

/// One fjall database with named keyspaces.
#[derive(Clone)]
pub struct Store {
    db: Database,
    entries: Keyspace,
    meta: Keyspace,
    spaces: Arc<HashMap<&'static str, Keyspace>>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").finish_non_exhaustive()
    }
}

impl Store {
    /// Opens (or creates) the store at `path` with the extra keyspaces named.
    pub fn open(path: &Path, extra: &[&'static str]) -> Result<Self, StoreError> {
        let db = Database::builder(path).cache_size(8 * 1024 * 1024).open()?;
        let entries = db.keyspace(ENTRIES, KeyspaceCreateOptions::default)?;
        let meta = db.keyspace(META, KeyspaceCreateOptions::default)?;
        let mut spaces = HashMap::new();
        for name in extra {
            spaces.insert(*name, db.keyspace(name, KeyspaceCreateOptions::default)?);
        }
        Ok(Self {
            db,
            entries,
            meta,
            spaces: Arc::new(spaces),
        })
    }

    /// A named keyspace given at open.
    pub fn space(&self, name: &str) -> Option<&Keyspace> {
        self.spaces.get(name)
    }

    fn named(&self, space: &str) -> Result<&Keyspace, StoreError> {
        self.spaces
            .get(space)
            .ok_or_else(|| StoreError::UnknownSpace(space.to_string()))
    }

    /// Reads a key from a named keyspace.
    pub fn get(&self, space: &str, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.named(space)?.get(key)?.map(|v| v.to_vec()))
    }

    /// All (key, value) pairs of a named keyspace whose key starts with `prefix`.
    pub fn scan(&self, space: &str, prefix: &[u8]) -> Result<Vec<KeyValue>, StoreError> {
        let ks = self.named(space)?;
        let mut out = Vec::new();
        for guard in ks.prefix(prefix) {
            let (k, v) = guard.into_inner()?;
            out.push((k.to_vec(), v.to_vec()));
        }
        Ok(out)
    }

    /// Writes and removes keys in named keyspaces as one atomic, durable batch (for records
    /// outside the chain, such as secrets).
    pub fn write(
        &self,
        puts: &[(&str, Vec<u8>, Vec<u8>)],
        removes: &[(&str, Vec<u8>)],
    ) -> Result<(), StoreError> {
        let mut batch = self.db.batch();
        for (space, k, v) in puts {
            batch.insert(self.named(space)?, k.clone(), v.clone());
        }
        for (space, k) in removes {
            batch.remove(self.named(space)?, k.clone());
        }
        batch.commit()?;
        self.db.persist(PersistMode::SyncAll)?;
        Ok(())
    }

    /// The entry at `seq`, as stored.
    pub fn entry_bytes(&self, seq: u64) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.entries.get(seq.to_be_bytes())?.map(|v| v.to_vec()))
    }

    /// Every entry in key order, as (key seq, bytes). A key that is not 8 bytes yields
    /// `u64::MAX` so the verifier reports it.
    pub fn entries(&self) -> impl Iterator<Item = Result<(u64, Vec<u8>), StoreError>> + '_ {
        self.entries.iter().map(|g| {
            let (k, v) = g.into_inner()?;
            let seq = <[u8; 8]>::try_from(k.as_ref())
                .map(u64::from_be_bytes)
                .unwrap_or(u64::MAX);
            Ok((seq, v.to_vec()))
        })
    }

    /// The recorded chain head (the last acknowledged entry), if any.
    pub fn head(&self) -> Result<Option<EntryRef>, StoreError> {
        Ok(self.meta.get(HEAD_KEY)?.and_then(|v| decode_ref(&v)))
    }

    /// The last entry by key, decoded.
    fn last_entry(&self) -> Result<Option<(Entry, Digest)>, StoreError> {
        let Some(guard) = self.entries.last_key_value() else {
            return Ok(None);
        };
        let (k, v) = guard.into_inner()?;
        let seq = <[u8; 8]>::try_from(k.as_ref())
            .map(u64::from_be_bytes)
            .unwrap_or(u64::MAX);
        let entry = Entry::decode(&v).map_err(|e| StoreError::Corrupt {
            seq,
            why: e.to_string(),
        })?;
        Ok(Some((entry, entry_hash(&v))))
    }
}

fn encode_ref(r: &EntryRef) -> Vec<u8> {
    let mut v = r.seq.to_be_bytes().to_vec();
    v.extend_from_slice(&r.hash);
    v
}

fn decode_ref(v: &[u8]) -> Option<EntryRef> {
    let seq = u64::from_be_bytes(v.get(..8)?.try_into().ok()?);
    let hash = v.get(8..40)?.try_into().ok()?;
    Some(EntryRef { seq, hash })
}

/// A condition an append puts on a key, checked atomically with the append.
#[derive(Debug, Clone)]
pub struct Claim {
    /// The keyspace.
    pub space: &'static str,
    /// The key.
    pub key: Vec<u8>,
    /// The value written when the claim holds.
    pub value: Vec<u8>,
    /// The rule.
    pub rule: ClaimRule,
}

/// How a claim is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClaimRule {
    /// The key must not exist (a replay key, a grant consumed once).
    Absent,
    /// The key must not exist or hold the same value (a client chain head).
    AbsentOrEqual,
}

/// One append: an entry (seq, prev filled in by the writer) and the claims that must hold.
#[derive(Debug)]
pub struct Append {
    /// The entry to append.
    pub entry: Entry,
    /// Conditions and their writes, atomic with the entry.
    pub claims: Vec<Claim>,
}

/// Why an append was not acknowledged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AppendError {
    /// Claim `index` failed: the key exists (with another value).
    #[error("claim {index} conflicts with an existing record")]
    Conflict {
        /// Which claim.
        index: usize,
    },
    /// The store failed; the chain refuses every append until reopened.
    #[error("audit store unavailable: {0}")]
    Unavailable(String),
}

/// What an acknowledged append returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    /// The entry's seq and hash.
    pub entry: EntryRef,
}

type Reply = tokio::sync::oneshot::Sender<Result<Appended, AppendError>>;

enum Msg {
    Append(Box<Append>, Reply),
    Close(mpsc::Sender<()>),
}

/// Handle to a chain's single writer. Cheap to clone.
#[derive(Clone)]
pub struct Chain {
    tx: mpsc::Sender<Msg>,
    store: Store,
    id: Digest,
    owner: Did,
    failed: Arc<AtomicBool>,
}

impl std::fmt::Debug for Chain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Chain")
            .field("owner", &self.owner)
            .finish_non_exhaustive()
    }
}

impl Chain {
    /// Opens the chain in `store` for `owner`, writing the genesis entry if the chain is new,
    /// and starts its writer thread.
    pub fn open(store: Store, owner: &Did, role: Role, now_ms: u64) -> Result<Self, StoreError> {
        let (id, head) = match store.entry_bytes(0)? {
            Some(bytes) => {
                let genesis = Entry::decode(&bytes).map_err(|e| StoreError::Corrupt {
                    seq: 0,
                    why: e.to_string(),
                })?;
                if genesis.owner.as_deref() != Some(owner.as_str()) || genesis.role != Some(role) {
                    return Err(StoreError::WrongOwner(genesis.owner.unwrap_or_default()));
                }
                let (last, hash) = store.last_entry()?.ok_or(StoreError::Corrupt {
                    seq: 0,
                    why: "vanished".into(),
                })?;
                if store.head()?
                    != Some(EntryRef {
                        seq: last.seq,
                        hash,
                    })
                {
                    return Err(StoreError::Corrupt {
                        seq: last.seq,
                        why: "the last entry is not the recorded head (altered or appended outside the writer)".into(),
                    });
                }
                (
                    entry_hash(&bytes),
                    EntryRef {
                        seq: last.seq,
                        hash,
                    },
                )
            }
            None => {
                let mut genesis = Entry::new(EntryKind::Genesis, now_ms);
                genesis.owner = Some(owner.to_string());
                genesis.role = Some(role);
                let bytes = genesis.encode();
                let head = EntryRef {
                    seq: 0,
                    hash: entry_hash(&bytes),
                };
                let mut batch = store.db.batch();
                batch.insert(&store.entries, 0u64.to_be_bytes(), bytes);
                batch.insert(&store.meta, HEAD_KEY, encode_ref(&head));
                batch.commit()?;
                store.db.persist(PersistMode::SyncAll)?;
                (head.hash, head)
            }
        };
        let (tx, rx) = mpsc::channel();
        let failed = Arc::new(AtomicBool::new(false));
        let writer = Writer {
            store: store.clone(),
            head,
            failed: failed.clone(),
        };
        std::thread::Builder::new()
            .name("didgate-audit-writer".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| StoreError::Corrupt {
                seq: 0,
                why: format!("cannot start writer: {e}"),
            })?;
        Ok(Self {
            tx,
            store,
            id,
            owner: owner.clone(),
            failed,
        })
    }

    /// The chain id (hash of entry 0).
    pub fn id(&self) -> Digest {
        self.id
    }

    /// The owner's DID.
    pub fn owner(&self) -> &Did {
        &self.owner
    }

    /// The store under the chain.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Whether the writer has failed (fail closed until reopened).
    pub fn is_failed(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }

    /// The current acknowledged head as a [`ChainHead`].
    pub fn head(&self) -> Result<ChainHead, StoreError> {
        let head = self.store.head()?.ok_or(StoreError::Corrupt {
            seq: 0,
            why: "no head".into(),
        })?;
        Ok(ChainHead {
            chain: self.id,
            seq: head.seq,
            hash: head.hash,
        })
    }

    /// Appends durably; resolves after the batch holding it is fsynced.
    pub async fn append(&self, append: Append) -> Result<Appended, AppendError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.tx
            .send(Msg::Append(Box::new(append), tx))
            .map_err(|_| AppendError::Unavailable("writer stopped".into()))?;
        rx.await
            .map_err(|_| AppendError::Unavailable("writer stopped".into()))?
    }

    /// Stops the writer after the appends queued before this call, and waits for it. Appends
    /// after this are refused. Dropping every handle of the store then closes the database.
    pub fn close(&self) {
        let (tx, rx) = mpsc::channel();
        if self.tx.send(Msg::Close(tx)).is_ok() {
            let _ = rx.recv();
        }
    }

    /// Appends an entry with no claims.
    pub async fn append_entry(&self, entry: Entry) -> Result<Appended, AppendError> {
        self.append(Append {
            entry,
            claims: Vec::new(),
        })
        .await
    }
}

struct Writer {
    store: Store,
    head: EntryRef,
    failed: Arc<AtomicBool>,
}

impl Writer {
    fn run(mut self, rx: mpsc::Receiver<Msg>) {
        let mut closing = None;
        while closing.is_none() {
            let mut jobs = Vec::new();
            match rx.recv() {
                Ok(Msg::Append(a, r)) => jobs.push((*a, r)),
                Ok(Msg::Close(done)) => closing = Some(done),
                Err(_) => break,
            }
            while closing.is_none() && jobs.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(Msg::Append(a, r)) => jobs.push((*a, r)),
                    Ok(Msg::Close(done)) => closing = Some(done),
                    Err(_) => break,
                }
            }
            if !jobs.is_empty() {
                self.commit(jobs);
            }
        }
        self.failed.store(true, Ordering::Release);
        drop(self.store);
        drop(rx);
        if let Some(done) = closing {
            let _ = done.send(());
        }
    }

    fn commit(&mut self, jobs: Vec<(Append, Reply)>) {
        if self.failed.load(Ordering::Acquire) {
            for (_, reply) in jobs {
                let _ = reply.send(Err(AppendError::Unavailable(
                    "store failed; reopen required".into(),
                )));
            }
            return;
        }
        let mut batch = self.store.db.batch();
        let mut head = self.head;
        let mut claimed: HashMap<(&'static str, Vec<u8>), Vec<u8>> = HashMap::new();
        let mut outcomes = Vec::with_capacity(jobs.len());
        for (append, reply) in jobs {
            if let Err(e) = self.check(&append.claims, &claimed) {
                outcomes.push((reply, Err(e)));
                continue;
            }
            for c in append.claims {
                if let Some(ks) = self.store.spaces.get(c.space) {
                    batch.insert(ks, c.key.clone(), c.value.clone());
                }
                claimed.insert((c.space, c.key), c.value);
            }
            let mut entry = append.entry;
            entry.seq = head.seq + 1;
            entry.prev = head.hash;
            let bytes = entry.encode();
            head = EntryRef {
                seq: entry.seq,
                hash: entry_hash(&bytes),
            };
            batch.insert(&self.store.entries, entry.seq.to_be_bytes(), bytes);
            outcomes.push((reply, Ok(Appended { entry: head })));
        }
        if head != self.head {
            batch.insert(&self.store.meta, HEAD_KEY, encode_ref(&head));
            let durable = batch
                .commit()
                .and_then(|()| self.store.db.persist(PersistMode::SyncAll));
            if let Err(e) = durable {
                self.failed.store(true, Ordering::Release);
                let msg = e.to_string();
                for (reply, _) in outcomes {
                    let _ = reply.send(Err(AppendError::Unavailable(msg.clone())));
                }
                return;
            }
            self.head = head;
        }
        for (reply, outcome) in outcomes {
            let _ = reply.send(outcome);
        }
    }

    fn check(
        &self,
        claims: &[Claim],
        claimed: &HashMap<(&'static str, Vec<u8>), Vec<u8>>,
    ) -> Result<(), AppendError> {
        for (index, c) in claims.iter().enumerate() {
            let existing = match claimed.get(&(c.space, c.key.clone())) {
                Some(v) => Some(v.clone()),
                None => self
                    .store
                    .get(c.space, &c.key)
                    .map_err(|e| AppendError::Unavailable(e.to_string()))?,
            };
            let ok = match (c.rule, existing) {
                (_, None) => true,
                (ClaimRule::AbsentOrEqual, Some(v)) => v == c.value,
                (ClaimRule::Absent, Some(_)) => false,
            };
            if !ok {
                return Err(AppendError::Conflict { index });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use didgate_protocol::Identity;

    #[tokio::test]
    async fn appends_link_and_survive_reopen() {
        let dir = tempfile::tempdir().expect("tmp");
        let owner = Identity::from_seed(&[1; 32]);
        let store = Store::open(dir.path(), &["replay"]).expect("open");
        let chain = Chain::open(store, owner.did(), Role::Gateway, 1).expect("chain");
        let mut handles = Vec::new();
        for i in 0..50u64 {
            let c = chain.clone();
            handles.push(tokio::spawn(async move {
                let claim = Claim {
                    space: "replay",
                    key: vec![(i % 25) as u8],
                    value: vec![1],
                    rule: ClaimRule::Absent,
                };
                c.append(Append {
                    entry: Entry::new(EntryKind::Refused, i),
                    claims: vec![claim],
                })
                .await
            }));
        }
        let mut ok = 0;
        let mut conflicts = 0;
        for h in handles {
            match h.await.expect("join") {
                Ok(_) => ok += 1,
                Err(AppendError::Conflict { index: 0 }) => conflicts += 1,
                Err(e) => panic!("unexpected {e}"),
            }
        }
        assert_eq!(
            (ok, conflicts),
            (25, 25),
            "each replay key claimed exactly once"
        );
        let head = chain.head().expect("head");
        assert_eq!(head.seq, 25);
        chain.close();
        drop(chain);
        // reopen: same id, head, and entries link
        let store = Store::open(dir.path(), &["replay"]).expect("reopen");
        let mut prev = [0u8; 32];
        for (i, item) in store.entries().enumerate() {
            let (seq, bytes) = item.expect("read");
            let e = Entry::decode(&bytes).expect("decode");
            assert_eq!((seq, e.seq), (i as u64, i as u64));
            assert_eq!(e.prev, prev);
            prev = entry_hash(&bytes);
        }
        assert_eq!(prev, head.hash);
    }
}
