//! The thin store type over fjall, and the chain writer with group commit
//! (specs/audit-log.md, "Storage").
//!
//! [`Store`] owns one fjall database: the `entries` keyspace (key: seq as u64 big-endian,
//! value: the entry's bytes), `meta` (the chain head), and any named keyspaces a component
//! needs (replay keys, grants, secrets). [`Chain`] is the single writer of the entries: one
//! thread drains a queue of pending appends, checks their claims, applies them as one atomic
//! batch, persists it with `SyncAll` once, then acknowledges every waiter. An append is
//! acknowledged only after its fsync. After an I/O error the chain refuses every append (fail
//! closed) until the writer, at a later batch, finds the file system writable again and reopens
//! the store in-process ([`Store::reopen`]).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use didgate_protocol::error::Shared;
use didgate_protocol::message::{ChainHead, Checkpoint, Digest, EntryRef, SignedMessage};
use didgate_protocol::{Did, Identity, Version};
use fjall::config::PartitioningPolicy;
use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode, Readable};

use crate::entry::{Entry, EntryKind, Role, entry_hash};
use crate::merkle::{self, Frontier};
use crate::space::{self, Batch, Space};

/// Keyspace of entries.
pub const ENTRIES: &str = "entries";
/// Keyspace of chain metadata (`head` = seq u64be || hash).
pub const META: &str = "meta";
const HEAD_KEY: &[u8] = b"head";
/// `meta` key of the Merkle frontier: u64be size || the peaks (32 bytes each), largest first.
const FRONTIER_KEY: &[u8] = b"frontier";
/// Keyspace of Merkle nodes: u64be index of the node's last leaf || u8 level -> 32-byte hash
/// (level 0: leaf hashes). The nodes one append completes all end at its leaf, so every append
/// writes keys above all earlier ones: the keyspace is written in key order and compaction
/// moves its tables down instead of merging them (specs/audit-log.md, "Storage").
pub const MERKLE: &str = "merkle_by_end";
/// The Merkle keyspace of releases before 2026-12-05 (u8 level || u64be index), re-keyed into
/// [`MERKLE`] when a store is opened ([`migrate_merkle`]).
const LEGACY_MERKLE: &str = "merkle";
/// Legacy Merkle keys re-keyed per batch at open.
const MIGRATE_BATCH: usize = 64 * 1024;
/// Keyspace of signed checkpoints: u64be size -> COSE_Sign1 checkpoint.
pub const CHECKPOINTS: &str = "checkpoints";
/// Keyspace of the did:web documents that admitted callers (a gateway's store): document hash
/// -> the exact bytes served. Entries name them by hash in `did_doc`.
pub const DOCUMENTS: &str = "documents";
/// Largest number of appends one batch takes.
const MAX_BATCH: usize = 1024;
/// Block cache of a store, bytes. Sized on purpose: with partitioned filters and indexes
/// ([`keyspace_options`]) it holds the filter and index partitions and the data blocks that
/// the writer's point reads (replay keys, heads, grants) touch, and those are mostly recent
/// keys still in a memtable. At 8 MiB it was still filling at 100,000 calls (one of the
/// reasons the gateway's memory kept rising); at 2 MiB it is full early and the call
/// benchmark's throughput stayed within its run-to-run noise.
const CACHE_BYTES: u64 = 2 * 1024 * 1024;
/// Largest memtable of each keyspace before it is flushed to a disk segment, bytes. fjall's
/// default (64 MiB per keyspace) let a gateway grow by about 3 MiB per 1,000 calls up to
/// several hundred MiB (entries, Merkle nodes, replay keys, heads and grants each fill their
/// own, and a sealed one waits beside the active one while it is flushed). At 2 MiB the
/// keyspaces written slowly took tens of thousands of calls to reach their first flush, so
/// the gateway's memory still rose over a 100,000-call run; at 1 MiB they reach their steady
/// state early (and the store has more, smaller level-0 tables, which compaction merges).
/// The store rotates a memtable itself when it has written this much to it (crate::space);
/// in the keyspaces it creates, fjall's own rotation, set at twice the size, only backs it up.
const MEMTABLE_BYTES: u64 = 1024 * 1024;

/// Target size of a table written by compaction, bytes (fjall's default: 64 MiB). A keyspace
/// whose new keys do not all sort above the old ones (`heads`: one run of keys per client
/// chain, each growing at its own end) has every level-0 table span all those ends, and fjall
/// treats the first non-empty level as level 1 until it outgrows four tables: with 64 MiB
/// tables the whole `heads` keyspace was one table, rewritten by every level-0 compaction (82.8
/// MB written per 80,000 calls at 1,000,000 calls, against 4.1 MB in a fresh store). At 2 MiB
/// level 1 is 8 MiB and a compaction merges a few small tables (31.7 MB). docs/performance.md,
/// "What grows". fjall records a keyspace's options when it creates it: a store created before
/// keeps its own.
const TABLE_BYTES: u64 = 2 * 1024 * 1024;

/// fjall's background threads (memtable flushes and compactions). Its default, one per core,
/// spins: with two or more, worker 0 hands every compaction request back to the queue and takes
/// the next message, which is often that same request while worker 1 is busy compacting (about
/// 6% of the gateway's CPU per call in `perf` at concurrency 64). One thread does both in turn;
/// the memtables are small ([`MEMTABLE_BYTES`]), so a flush never waits long behind a compaction.
/// With one worker (or two) fjall 3.1 could stall for good under load; the store rotating its
/// memtables itself is what prevents it (crate::space).
const WORKER_THREADS: usize = 1;

/// The options every keyspace of a store is created with (its memtable size is set with its
/// limit: [`layout`], `space::sized`): filters and
/// indexes partitioned at every level (fjall's default partitions them from level 3 on). A
/// table with one filter block and one index block costs memory that grows with the store:
/// its writer keeps a hash of every key in one vector that grows to MiBs for a compacted
/// table (freed, but the allocator kept the space), and level-0 and level-1 tables keep their
/// whole filter and index pinned. The gateway's resident memory rose about 1.2 MiB per 10,000
/// calls without end. Partitioned, a table keeps only its small top-level index in memory, the
/// partitions go through the block cache ([`CACHE_BYTES`]), and the writer's buffers are
/// bounded by the partition size. fjall stores these options with each keyspace when it is
/// created: a store created before keeps its own.
fn keyspace_options() -> KeyspaceCreateOptions {
    KeyspaceCreateOptions::default()
        .compaction_strategy(Arc::new(
            fjall::compaction::Leveled::default().with_table_target_size(TABLE_BYTES),
        ))
        .filter_block_partitioning_policy(PartitioningPolicy::all(true))
        .index_block_partitioning_policy(PartitioningPolicy::all(true))
}

/// The options of the [`ENTRIES`] keyspace: [`keyspace_options`] with key-value separation.
/// An entry (about 0.5 to 1.5 KB, never overwritten or removed) is written once to a blob file
/// when its memtable is flushed; compaction then moves only its key and a pointer to it. Without
/// it, the entries were most of what compaction rewrote. The blob files are not compressed: an
/// entry is mostly hashes, signatures and keys, which LZ4 cannot shrink, and compressing them
/// cost the gateway about 35,000 instructions per call (3%) for a store 6% smaller.
fn entries_options() -> KeyspaceCreateOptions {
    keyspace_options().with_kv_separation(Some(
        fjall::KvSeparationOptions::default()
            .separation_threshold(ENTRY_BLOB_THRESHOLD)
            .compression(fjall::CompressionType::None),
    ))
}

/// Largest memtable of the [`ENTRIES`] keyspace, bytes: four times [`MEMTABLE_BYTES`]. Entries
/// are written in key order, so every flushed table is moved down whole to the last level and
/// never merged; at 1 MiB a gateway flushed one every ~500 calls (2,000 tables at 1,000,000
/// calls), and lsm-tree's bookkeeping at each move (`optimize_runs`, quadratic in the tables of
/// a level) grew with the square of the calls: 4.7% of an aged gateway's CPU. Per call that
/// cost falls with the cube of the memtable (a quarter of the tables, a quarter as often):
/// 0.07% at 4 MiB, and aged / fresh CPU per call at 1,000,000 calls 1.037, 1.091 and 0.923 in
/// three runs against 1.128-1.177 in seven before (docs/performance.md, "What grows"). Entries
/// are the keyspace written fastest (about 2 KB of memtable per call), so it fills in about
/// 2,000 calls, and the gateway's peak memory stayed where it was (57.8-59.7 MiB). An entries
/// keyspace created before has no record of its size and is rotated at 1 MiB (crate::space).
const ENTRIES_MEMTABLE_BYTES: u64 = 4 * MEMTABLE_BYTES;

/// The options and the memtable limit of keyspace `name`: [`entries_options`] and
/// [`ENTRIES_MEMTABLE_BYTES`] for the entries, [`keyspace_options`] and [`MEMTABLE_BYTES`] for
/// every other.
fn layout(name: &str) -> (fn() -> KeyspaceCreateOptions, u64) {
    if name == ENTRIES {
        (entries_options, ENTRIES_MEMTABLE_BYTES)
    } else {
        (keyspace_options, MEMTABLE_BYTES)
    }
}

/// Entries at least this long (bytes) are kept in blob files ([`entries_options`]).
const ENTRY_BLOB_THRESHOLD: u32 = 128;

/// A storage failure.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The engine failed (I/O, lock held by another process, corruption).
    #[error("store: {0}")]
    Engine(#[from] fjall::Error),
    /// The store's records disagree: an entry vanished, the head or the last entry is not
    /// where the store says, or the store could not be reopened.
    #[error("entry {seq} is corrupt: {why}")]
    Corrupt {
        /// The seq concerned (0 where none is known).
        seq: u64,
        /// What is wrong (`"vanished"`).
        why: &'static str,
    },
    /// An entry in the store does not decode.
    #[error("entry {seq} is corrupt: {source}")]
    Undecodable {
        /// Its seq.
        seq: u64,
        /// The decoding error.
        #[source]
        source: didgate_protocol::cbor::DecodeError,
    },
    /// The writer thread of a chain could not be started.
    #[error("cannot start writer: {0}")]
    Writer(#[source] std::io::Error),
    /// A Merkle node key of an earlier release's layout is not 9 bytes (u8 level || u64be
    /// index) or names a node no u64 leaf index reaches.
    #[error("Merkle node key {} is corrupt", hex::encode(.0))]
    CorruptMerkle(Vec<u8>),
    /// A keyspace that was not named when the store was opened.
    #[error("unknown keyspace {0}")]
    UnknownSpace(String),
    /// The chain belongs to another owner than the one opening it.
    #[error("this chain belongs to {0}")]
    WrongOwner(String),
    /// The database is closed: a reopen after an I/O error failed (the next may succeed).
    #[error("store closed after an I/O error; reopening failed")]
    Closed,
    /// A backup's destination exists already, or cannot be made.
    #[error("backup destination {path}: {why}")]
    Backup {
        /// The destination.
        path: PathBuf,
        /// Why.
        why: String,
    },
    /// The chain is written in a format version this release does not read (a later
    /// release's).
    #[error(
        "the chain is written in format version {0}; this release reads versions {oldest} to {current}",
        oldest = Version::OLDEST,
        current = Version::CURRENT
    )]
    NewerFormat(u64),
}

impl StoreError {
    /// Whether the store is held by another process (fjall's lock file): a running daemon, or
    /// another command that has it open.
    pub fn is_locked(&self) -> bool {
        matches!(self, Self::Engine(fjall::Error::Locked))
    }
}

/// A decoding failure of the stored entry at `seq` as a [`StoreError`].
fn corrupt(seq: u64, e: didgate_protocol::cbor::DecodeError) -> StoreError {
    match e {
        didgate_protocol::cbor::DecodeError::Version(v) if v > Version::CURRENT.as_u64() => {
            StoreError::NewerFormat(v)
        }
        source => StoreError::Undecodable { seq, source },
    }
}

/// A key and its value.
pub type KeyValue = (Vec<u8>, Vec<u8>);

/// One fjall database with named keyspaces. Clones share the database, and
/// [`Store::reopen`] swaps it for all of them at once.
#[derive(Clone)]
pub struct Store {
    path: PathBuf,
    extra: Arc<Vec<&'static str>>,
    /// `None` while a reopen failed (the next one may succeed).
    current: Arc<RwLock<Option<Arc<Engine>>>>,
    /// Per keyspace pruned with [`Store::remove_before`]: its horizon and cursor.
    pruned: Arc<RwLock<HashMap<&'static str, Pruned>>>,
}

/// How far a keyspace was pruned ([`Store::remove_before`]).
#[derive(Debug, Default)]
struct Pruned {
    /// Keys below it may have been removed: a claim that one is absent is refused.
    horizon: Vec<u8>,
    /// Every key below it was removed: the next pruning starts here.
    cursor: Vec<u8>,
}

/// The open database and its keyspace handles.
struct Engine {
    db: Database,
    entries: Space,
    meta: Space,
    merkle: Space,
    checkpoints: Space,
    spaces: HashMap<&'static str, Space>,
}

impl Engine {
    fn open(path: &Path, extra: &[&'static str]) -> Result<Self, StoreError> {
        let db = Database::builder(path)
            .cache_size(CACHE_BYTES)
            .worker_threads(WORKER_THREADS)
            .open()?;
        let (options, limit) = layout(META);
        let meta = Space::open(&db, META, options, limit, None)?;
        let open = |name| {
            let (options, limit) = layout(name);
            Space::open(&db, name, options, limit, Some(meta.uncounted()))
        };
        let entries = open(ENTRIES)?;
        let merkle = open(MERKLE)?;
        if migrate_merkle(&db, merkle.uncounted())? {
            // the re-keyed nodes went in outside the store's count
            merkle.uncounted().rotate_memtable()?;
        }
        let checkpoints = open(CHECKPOINTS)?;
        let mut spaces = HashMap::new();
        for name in extra {
            spaces.insert(*name, open(name)?);
        }
        // the records of keyspaces created now, with their creation
        db.persist(PersistMode::SyncAll)?;
        Ok(Self {
            db,
            entries,
            meta,
            merkle,
            checkpoints,
            spaces,
        })
    }

    fn documents(&self) -> Result<Vec<Vec<u8>>, StoreError> {
        let space = match self.spaces.get(DOCUMENTS) {
            Some(k) => k.uncounted().clone(),
            None if self.db.keyspace_exists(DOCUMENTS) => self
                .db
                .keyspace(DOCUMENTS, KeyspaceCreateOptions::default)?,
            None => return Ok(Vec::new()),
        };
        let mut out = Vec::new();
        for kv in space.iter() {
            let (_, v) = kv.into_inner()?;
            out.push(v.to_vec());
        }
        Ok(out)
    }

    fn named(&self, space: &str) -> Result<&Space, StoreError> {
        self.spaces
            .get(space)
            .ok_or_else(|| StoreError::UnknownSpace(space.to_string()))
    }
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").finish_non_exhaustive()
    }
}

impl Store {
    /// Opens (or creates) the store at `path` with the extra keyspaces named.
    pub fn open(path: &Path, extra: &[&'static str]) -> Result<Self, StoreError> {
        let engine = Engine::open(path, extra)?;
        Ok(Self {
            path: path.to_path_buf(),
            extra: Arc::new(extra.to_vec()),
            current: Arc::new(RwLock::new(Some(Arc::new(engine)))),
            pruned: Arc::default(),
        })
    }

    /// The database in use now.
    fn engine(&self) -> Result<Arc<Engine>, StoreError> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or(StoreError::Closed)
    }

    /// Closes the database and opens it again from what is durable, for every clone of this
    /// store: the way back after an I/O error (fjall refuses every write once one failed). The
    /// old database must be released first (its lock file), so this waits, boundedly, for
    /// operations still using it; on failure the old (failed) database stays in place.
    pub fn reopen(&self) -> Result<(), StoreError> {
        let mut current = self.current.write().unwrap_or_else(|p| p.into_inner());
        if let Some(old) = current.take() {
            // Readers hold the engine only for the span of one operation.
            let deadline = Instant::now() + Duration::from_secs(2);
            while Arc::strong_count(&old) > 1 && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(1));
            }
            // dropped (lock file released) before it is opened again
            drop(old);
        }
        let mut last = None;
        for _ in 0..20 {
            match Engine::open(&self.path, &self.extra) {
                Ok(engine) => {
                    *current = Some(Arc::new(engine));
                    return Ok(());
                }
                Err(e) => {
                    last = Some(e);
                    // fjall's background workers may still hold the lock for a moment
                    std::thread::sleep(Duration::from_millis(25));
                }
            }
        }
        Err(last.unwrap_or(StoreError::Corrupt {
            seq: 0,
            why: "cannot reopen",
        }))
    }

    /// The did:web documents kept beside the chain ([`DOCUMENTS`]): none if the store has no
    /// such keyspace (a client chain). Never creates the keyspace.
    pub fn documents(&self) -> Result<Vec<Vec<u8>>, StoreError> {
        self.engine()?.documents()
    }

    /// Reads a key from a named keyspace.
    pub fn get(&self, space: &str, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.engine()?.named(space)?.get(key)?.map(|v| v.to_vec()))
    }

    /// All (key, value) pairs of a named keyspace whose key starts with `prefix`.
    pub fn scan(&self, space: &str, prefix: &[u8]) -> Result<Vec<KeyValue>, StoreError> {
        let engine = self.engine()?;
        let ks = engine.named(space)?;
        let mut out = Vec::new();
        for guard in ks.prefix(prefix) {
            let (k, v) = guard.into_inner()?;
            out.push((k.to_vec(), v.to_vec()));
        }
        Ok(out)
    }

    /// The greatest key of a named keyspace that `wanted` accepts, reading backwards from its
    /// end (`None` if none is).
    pub fn last_key_where(
        &self,
        space: &str,
        wanted: impl Fn(&[u8]) -> bool,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        let engine = self.engine()?;
        let ks = engine.named(space)?;
        for guard in ks.iter().rev() {
            let (k, _) = guard.into_inner()?;
            if wanted(&k) {
                return Ok(Some(k.to_vec()));
            }
        }
        Ok(None)
    }

    /// Removes at most `limit` keys of keyspace `space` that sort before `end`, as one batch
    /// (not synced: the keys it removes are ones a crash may bring back harmlessly, expired
    /// claims); returns how many. With keys that start with a big-endian deadline, this prunes
    /// every claim whose deadline is before `end`, reading none of the live ones, nor (past the
    /// first call) the tombstones of earlier prunings: it starts where the last one stopped.
    /// From now on a claim that a key below `end` is absent is refused ([`ClaimRule::Absent`],
    /// [`ClaimRule::AbsentOrEqual`]: [`AppendError::Conflict`]), since it may have been
    /// removed; so nothing may be written below `end` once pruned.
    pub fn remove_before(
        &self,
        space: &'static str,
        end: &[u8],
        limit: usize,
    ) -> Result<usize, StoreError> {
        let cursor = {
            let mut pruned = self.pruned.write().unwrap_or_else(|p| p.into_inner());
            let p = pruned.entry(space).or_default();
            if end > p.horizon.as_slice() {
                p.horizon = end.to_vec();
            }
            p.cursor.clone()
        };
        if cursor.as_slice() >= end {
            return Ok(0);
        }
        let engine = self.engine()?;
        let ks = engine.named(space)?;
        let mut batch = Batch::new(&engine.db);
        let mut n = 0;
        let mut last = None;
        for guard in ks.range(cursor.as_slice()..end).take(limit) {
            let key = guard.key()?;
            last = Some(key.to_vec());
            // written once, never overwritten: a weak tombstone vanishes with its key
            batch.remove_weak(ks, key);
            n += 1;
        }
        if n > 0 {
            batch.commit()?;
        }
        let mut pruned = self.pruned.write().unwrap_or_else(|p| p.into_inner());
        let p = pruned.entry(space).or_default();
        match last {
            Some(key) if n == limit => p.cursor = key,
            // every key below `end` is gone
            _ if end > p.cursor.as_slice() => p.cursor = end.to_vec(),
            _ => {}
        }
        Ok(n)
    }

    /// Whether `key` of `space` is below its pruning horizon ([`Store::remove_before`]).
    pub fn below_horizon(&self, space: &str, key: &[u8]) -> bool {
        self.pruned
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(space)
            .is_some_and(|p| key < p.horizon.as_slice())
    }

    /// Writes and removes keys in named keyspaces as one atomic, durable batch (for records
    /// outside the chain, such as secrets).
    pub fn write(
        &self,
        puts: &[(&str, Vec<u8>, Vec<u8>)],
        removes: &[(&str, Vec<u8>)],
    ) -> Result<(), StoreError> {
        let engine = self.engine()?;
        let mut batch = Batch::new(&engine.db);
        for (space, k, v) in puts {
            batch.insert(engine.named(space)?, k.clone(), v.clone());
        }
        for (space, k) in removes {
            batch.remove(engine.named(space)?, k.clone());
        }
        batch.commit()?;
        engine.db.persist(PersistMode::SyncAll)?;
        Ok(())
    }

    /// The entry at `seq`, as stored.
    pub fn entry_bytes(&self, seq: u64) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self
            .engine()?
            .entries
            .get(seq.to_be_bytes())?
            .map(|v| v.to_vec()))
    }

    /// Every entry in key order, as (key seq, bytes). A key that is not 8 bytes yields
    /// `u64::MAX` so the verifier reports it.
    pub fn entries(&self) -> impl Iterator<Item = Result<(u64, Vec<u8>), StoreError>> + '_ {
        let (iter, closed) = match self.engine() {
            Ok(e) => (Some(e.entries.iter()), None),
            Err(e) => (None, Some(Err(e))),
        };
        closed
            .into_iter()
            .chain(iter.into_iter().flatten().map(|g| {
                let (k, v) = g.into_inner()?;
                let seq = <[u8; 8]>::try_from(k.as_ref())
                    .map(u64::from_be_bytes)
                    .unwrap_or(u64::MAX);
                Ok((seq, v.to_vec()))
            }))
    }

    /// The recorded chain head (the last acknowledged entry), if any.
    pub fn head(&self) -> Result<Option<EntryRef>, StoreError> {
        Ok(self
            .engine()?
            .meta
            .get(HEAD_KEY)?
            .and_then(|v| decode_ref(&v)))
    }

    /// The acknowledged head and the Merkle frontier as stored, checked against the last entry.
    fn durable_head(&self) -> Result<(EntryRef, Frontier), StoreError> {
        let (last, hash) = self.last_entry()?.ok_or(StoreError::Corrupt {
            seq: 0,
            why: "vanished",
        })?;
        let head = EntryRef {
            seq: last.seq,
            hash,
        };
        if self.head()? != Some(head) {
            return Err(StoreError::Corrupt {
                seq: last.seq,
                why: "the last entry is not the recorded head (altered or appended outside the writer)",
            });
        }
        let frontier = self
            .engine()?
            .meta
            .get(FRONTIER_KEY)?
            .and_then(|v| decode_frontier(&v))
            .filter(|f| f.size() == head.seq + 1)
            .ok_or(StoreError::Corrupt {
                seq: head.seq,
                why: "Merkle frontier missing or stale",
            })?;
        Ok((head, frontier))
    }

    /// The last entry by key, decoded.
    fn last_entry(&self) -> Result<Option<(Entry, Digest)>, StoreError> {
        let Some(guard) = self.engine()?.entries.last_key_value() else {
            return Ok(None);
        };
        let (k, v) = guard.into_inner()?;
        let seq = <[u8; 8]>::try_from(k.as_ref())
            .map(u64::from_be_bytes)
            .unwrap_or(u64::MAX);
        let entry = Entry::decode(&v).map_err(|e| corrupt(seq, e))?;
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

impl Claim {
    /// Whether the claim holds against the key's current value (`None`: absent), the check
    /// the writer makes atomically with the append.
    pub fn holds(&self, existing: Option<&[u8]>) -> bool {
        match (self.rule, existing) {
            (_, None) => true,
            (ClaimRule::AbsentOrEqual, Some(v)) => v == self.value.as_slice(),
            (ClaimRule::Put | ClaimRule::Remove, Some(_)) => true,
            (ClaimRule::Absent, Some(_)) => false,
        }
    }
}

/// How a claim is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClaimRule {
    /// The key must not exist (a replay key, a grant consumed once).
    Absent,
    /// The key must not exist or hold the same value (a client chain head).
    AbsentOrEqual,
    /// No condition: the value is written with the entry (a revocation, a secret's record).
    Put,
    /// No condition: the key is removed with the entry (a purged secret's record); `value` is
    /// ignored.
    Remove,
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
    Unavailable(#[source] Shared<StoreFailure>),
    /// The writer thread has stopped (the chain was closed).
    #[error("audit store unavailable: writer stopped")]
    Stopped,
    /// The job run after a seal ([`Chain::seal_then`]) panicked.
    #[error("audit store unavailable: sealing: the job panicked")]
    SealJobPanicked,
    /// After a forced checkpoint, the last checkpoint does not cover the head.
    #[error(
        "audit store unavailable: cannot seal: the last checkpoint covers {covered} entries, the chain has {size}"
    )]
    NotSealed {
        /// Entries the last checkpoint covers.
        covered: u64,
        /// Entries in the chain.
        size: u64,
    },
}

impl AppendError {
    /// [`AppendError::Unavailable`] for `failure`.
    fn unavailable(failure: impl Into<StoreFailure>) -> Self {
        Self::Unavailable(Shared::new(failure.into()))
    }
}

/// Why the store refused a batch ([`AppendError::Unavailable`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreFailure {
    /// The store failed (closed, or a read failed).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The engine failed to commit or persist the batch.
    #[error(transparent)]
    Engine(#[from] fjall::Error),
    /// The store's file system still refuses a test write after a failure.
    #[error(transparent)]
    Probe(#[from] std::io::Error),
    /// The store had failed (`cause`, if known) and the way back failed at `step`.
    #[error("{}; {step}: {source}", cause_text(.cause))]
    Recovery {
        /// The failure the store was recovering from.
        cause: Option<Shared<StoreFailure>>,
        /// The step that failed (`"reopening failed"`).
        step: &'static str,
        /// Why it failed.
        #[source]
        source: Shared<StoreFailure>,
    },
}

/// The text of a recovery's cause ("store failed" if not known).
fn cause_text(cause: &Option<Shared<StoreFailure>>) -> String {
    cause
        .as_ref()
        .map_or_else(|| "store failed".to_string(), ToString::to_string)
}

/// What an acknowledged append returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Appended {
    /// The entry's seq and hash.
    pub entry: EntryRef,
    /// The Merkle frontier of the chain right after this entry (size `entry.seq + 1`): its
    /// root is [`Appended::root`], computed by whoever needs it, off the writer's thread (the
    /// gateway needs it for receipts only; about 8,000 instructions at a million entries).
    pub frontier: Frontier,
}

impl Appended {
    /// The Merkle root of the chain right after this entry.
    pub fn root(&self) -> Digest {
        self.frontier.root()
    }
}

/// When the writer signs checkpoints: after this many entries, or this long after the last
/// one if entries were added, and always when the chain is closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CheckpointPolicy {
    /// Entries between checkpoints.
    pub every_entries: u64,
    /// Time between checkpoints while entries arrive.
    pub every: Duration,
}

impl Default for CheckpointPolicy {
    fn default() -> Self {
        Self {
            every_entries: 4096,
            every: Duration::from_secs(60),
        }
    }
}

/// Where the writer sends an append's outcome: an async waiter ([`Chain::append`]) or a
/// blocked thread ([`Chain::append_blocking`]).
enum Reply {
    Async(tokio::sync::oneshot::Sender<Result<Appended, AppendError>>),
    Blocking(mpsc::Sender<Result<Appended, AppendError>>),
}

impl Reply {
    fn send(self, outcome: Result<Appended, AppendError>) {
        // a waiter that went away no longer needs the outcome
        let _ = match self {
            Self::Async(tx) => tx.send(outcome).map_err(drop),
            Self::Blocking(tx) => tx.send(outcome).map_err(drop),
        };
    }
}

enum Msg {
    Append(Box<Append>, Reply),
    /// An entry the chain owes (a close whose own append failed): written with the next batch
    /// that succeeds, unless the chain turns out to hold a close of that call already.
    Owe(Box<Entry>),
    Checkpoint(mpsc::Sender<Result<(), AppendError>>),
    /// A forced checkpoint, then the job runs on the writer thread before any later batch
    /// ([`Chain::seal_then`]).
    Seal(SealJob),
    Close(mpsc::Sender<()>),
}

/// What runs on the writer thread once a seal's batch is durable (or failed).
type SealJob = Box<dyn FnOnce(Result<Sealed, AppendError>, &Store) + Send>;

/// What sealing a chain found or did ([`Chain::seal`], [`Store::seal`]): its last checkpoint
/// covers its last entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sealed {
    /// The chain's size (its head's seq + 1), which the last checkpoint covers; 0 for an empty
    /// store.
    pub size: u64,
    /// Whether a checkpoint was signed and stored now (false: the chain was sealed already).
    pub written: bool,
}

/// Handle to a chain's single writer. Cheap to clone.
#[derive(Clone)]
pub struct Chain {
    tx: mpsc::Sender<Msg>,
    store: Store,
    id: Digest,
    owner: Did,
    failed: Arc<AtomicBool>,
    node_cert: Arc<NodeCertSlot>,
}

/// The node certificate (COSE bytes) the checkpoints of a node's chain carry
/// (specs/protocol.md, "Nodes"), shared by the chain's handles and its writer: set while the
/// node runs ([`Chain::set_node_certificate`], a renewal), read once per checkpoint signed.
#[derive(Default)]
struct NodeCertSlot(RwLock<Option<Arc<[u8]>>>);

impl NodeCertSlot {
    /// The certificate now (a clone of the shared bytes, no copy).
    fn get(&self) -> Option<Arc<[u8]>> {
        // a poisoned lock still holds a whole value: only a store of an `Option` ran under it
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Replaces the certificate.
    fn set(&self, cert: Option<Arc<[u8]>>) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = cert;
    }
}

impl std::fmt::Debug for Chain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Chain")
            .field("owner", &self.owner)
            .finish_non_exhaustive()
    }
}

/// The key of Merkle node `index` at `level` in [`MERKLE`]: the index of its last leaf, then its
/// level; `None` past the largest tree a u64 index can name.
fn merkle_key(level: u32, index: u64) -> Option<[u8; 9]> {
    let level8 = u8::try_from(level).ok()?;
    let end = index
        .checked_add(1)?
        .checked_mul(1u64.checked_shl(level)?)?
        .checked_sub(1)?;
    let mut k = [0u8; 9];
    k[..8].copy_from_slice(&end.to_be_bytes());
    k[8] = level8;
    Some(k)
}

/// Re-keys the Merkle nodes of a store written by an earlier release ([`LEGACY_MERKLE`]) into
/// `merkle`, durably, then drops the old keyspace. Crash-safe: until the old keyspace is
/// dropped, a later open re-keys it again (writing the same keys and values). Returns whether
/// there was anything to re-key.
fn migrate_merkle(db: &Database, merkle: &Keyspace) -> Result<bool, StoreError> {
    if !db.keyspace_exists(LEGACY_MERKLE) {
        return Ok(false);
    }
    let legacy = db.keyspace(LEGACY_MERKLE, keyspace_options)?;
    let mut batch = db.batch();
    let mut staged = 0;
    for kv in legacy.iter() {
        let (k, v) = kv.into_inner()?;
        let key = <[u8; 9]>::try_from(k.as_ref())
            .ok()
            .and_then(|k| {
                let index = u64::from_be_bytes(k[1..].try_into().ok()?);
                merkle_key(u32::from(k[0]), index)
            })
            .ok_or_else(|| StoreError::CorruptMerkle(k.to_vec()))?;
        batch.insert(merkle, key, v);
        staged += 1;
        if staged == MIGRATE_BATCH {
            batch.commit()?;
            batch = db.batch();
            staged = 0;
        }
    }
    batch.commit()?;
    db.persist(PersistMode::SyncAll)?;
    db.delete_keyspace(legacy)?;
    db.persist(PersistMode::SyncAll)?;
    Ok(true)
}

fn encode_frontier(f: &Frontier) -> Vec<u8> {
    let mut v = f.size().to_be_bytes().to_vec();
    for p in f.peaks() {
        v.extend_from_slice(p);
    }
    v
}

fn decode_frontier(v: &[u8]) -> Option<Frontier> {
    let size = u64::from_be_bytes(v.get(..8)?.try_into().ok()?);
    let peaks = v
        .get(8..)?
        .chunks(32)
        .map(|c| c.try_into().ok())
        .collect::<Option<Vec<Digest>>>()?;
    Frontier::from_parts(size, peaks)
}

impl merkle::SubtreeSource for Store {
    fn subtree(&self, level: u32, index: u64) -> Option<Digest> {
        self.engine()
            .ok()?
            .merkle
            .get(merkle_key(level, index)?)
            .ok()??
            .as_ref()
            .try_into()
            .ok()
    }
}

impl Store {
    /// Every signed checkpoint stored, in size order.
    pub fn checkpoints(&self) -> Result<Vec<Vec<u8>>, StoreError> {
        self.checkpoints_upto(u64::MAX)
    }

    /// The last signed checkpoint stored (of the greatest size), if any.
    pub fn last_checkpoint(&self) -> Result<Option<Vec<u8>>, StoreError> {
        match self.engine()?.checkpoints.iter().next_back() {
            Some(g) => Ok(Some(g.value()?.to_vec())),
            None => Ok(None),
        }
    }

    /// The signed checkpoints of sizes up to `max_size`, in size order.
    pub fn checkpoints_upto(&self, max_size: u64) -> Result<Vec<Vec<u8>>, StoreError> {
        let mut out = Vec::new();
        for g in self.engine()?.checkpoints.range(..=max_size.to_be_bytes()) {
            out.push(g.value()?.to_vec());
        }
        Ok(out)
    }

    /// Writes a consistent copy of this store to a new store at `out` (which must not exist):
    /// every keyspace as of one instant (a cross-keyspace snapshot), while writers go on;
    /// synced to disk before it returns. Returns the number of items copied. Opened like any
    /// store, the copy holds the chain, its Merkle nodes, checkpoints, claims and whatever
    /// the other keyspaces hold at that instant (for a gateway: its sealed secrets).
    pub fn backup(&self, out: &Path) -> Result<u64, StoreError> {
        if std::fs::symlink_metadata(out).is_ok() {
            return Err(StoreError::Backup {
                path: out.to_path_buf(),
                why: "exists (a backup goes to a new directory)".into(),
            });
        }
        let engine = self.engine()?;
        let snapshot = engine.db.snapshot();
        let target = Database::builder(out).open()?;
        let mut copied = 0u64;
        let mut created = Vec::new();
        for name in engine.db.list_keyspace_names() {
            let name: &str = name.as_ref();
            let (options, limit) = layout(name);
            let from = engine.db.keyspace(name, options)?;
            let to = target.keyspace(name, || space::sized(options, limit))?;
            created.push(space::record(name, limit));
            let mut batch = target.batch();
            let mut in_batch = 0;
            for kv in snapshot.iter(&from) {
                let (k, v) = kv.into_inner()?;
                batch.insert(&to, k, v);
                in_batch += 1;
                copied += 1;
                if in_batch == 4096 {
                    std::mem::replace(&mut batch, target.batch()).commit()?;
                    in_batch = 0;
                }
            }
            batch.commit()?;
        }
        // the copy's keyspaces were created with this release's sizes, whatever the source's
        let meta = target.keyspace(META, keyspace_options)?;
        for (record, size) in created {
            meta.insert(record, size)?;
        }
        target.persist(PersistMode::SyncAll)?;
        Ok(copied)
    }

    /// The Merkle root over the first `size` entries, if the chain has them.
    pub fn root_at(&self, size: u64) -> Option<Digest> {
        merkle::root_at(self, size)
    }

    /// Inclusion proof of entry `index` in the tree of the first `size` entries.
    pub fn inclusion_proof(&self, index: u64, size: u64) -> Option<Vec<Digest>> {
        merkle::inclusion_proof(self, index, size)
    }

    /// Consistency proof from the tree of `old` entries to the tree of `new` entries.
    pub fn consistency_proof(&self, old: u64, new: u64) -> Option<Vec<Digest>> {
        merkle::consistency_proof(self, old, new)
    }

    /// Seals the chain of a store no [`Chain`] has open (a stopped process's): unless a
    /// checkpoint already covers its head, `signer` (the owner, with `role`, else
    /// [`StoreError::WrongOwner`]) signs one of the durable head, as the writer does, and it is
    /// stored durably. Its `v` is the version of the chain's last entry: a version 1 chain is not
    /// switched (no `format` entry), and nothing but the checkpoint is written. An empty store
    /// is left as it is. Refuses a head that disagrees with the last entry or the Merkle
    /// frontier ([`StoreError::Corrupt`]).
    pub fn seal(&self, signer: &Identity, role: Role, now_ms: u64) -> Result<Sealed, StoreError> {
        self.seal_with_node_certificate(signer, role, now_ms, None)
    }

    /// [`Store::seal`] for a node's chain: the checkpoint carries `node_cert` (the COSE bytes
    /// of the node certificate of `signer`'s key, as [`Chain::set_node_certificate`] takes
    /// them) unless it is a version 1 checkpoint, which never carries one.
    pub fn seal_with_node_certificate(
        &self,
        signer: &Identity,
        role: Role,
        now_ms: u64,
        node_cert: Option<&[u8]>,
    ) -> Result<Sealed, StoreError> {
        let Some(genesis) = self.entry_bytes(0)? else {
            return Ok(Sealed {
                size: 0,
                written: false,
            });
        };
        check_genesis(&genesis, signer.did(), role)?;
        let (head, frontier) = self.durable_head()?;
        let size = frontier.size();
        let engine = self.engine()?;
        if engine.checkpoints.get(size.to_be_bytes())?.is_some() {
            return Ok(Sealed {
                size,
                written: false,
            });
        }
        let (last, _) = self.last_entry()?.ok_or(StoreError::Corrupt {
            seq: head.seq,
            why: "vanished",
        })?;
        let version = Version::from_u64(last.v).ok_or(StoreError::NewerFormat(last.v))?;
        let at = Position {
            id: entry_hash(&genesis),
            head: &head,
            frontier: &frontier,
        };
        let cp = checkpoint_of(signer, &at, now_ms, version, node_cert);
        let mut batch = Batch::new(&engine.db);
        stage_signed(&engine, &mut batch, signer, &cp);
        batch.commit()?;
        engine.db.persist(PersistMode::SyncAll)?;
        Ok(Sealed {
            size,
            written: true,
        })
    }
}

impl Chain {
    /// Opens the chain in `store` for `signer` (its DID owns the chain; its key signs the
    /// checkpoints), writing the genesis entry if the chain is new, and starts its writer
    /// thread. A chain written in an older format version is switched to
    /// [`Version::CURRENT`] here, once: a `format` entry and a checkpoint that covers it, in
    /// one durable batch (specs/audit-log.md, "Format evolution"). Every entry after it is of
    /// the current version.
    pub fn open(
        store: Store,
        signer: Arc<Identity>,
        role: Role,
        now_ms: u64,
        policy: CheckpointPolicy,
    ) -> Result<Self, StoreError> {
        let owner = signer.did().clone();
        let engine = store.engine()?;
        let mut batch = Batch::new(&engine.db);
        let (id, head, frontier, last_cp) = match store.entry_bytes(0)? {
            Some(bytes) => {
                check_genesis(&bytes, &owner, role)?;
                let (mut head, mut frontier) = store.durable_head()?;
                let (last, _) = store.last_entry()?.ok_or(StoreError::Corrupt {
                    seq: 0,
                    why: "vanished",
                })?;
                let mut switched = None;
                if last.v < Version::CURRENT.as_u64() {
                    let format = Entry::format(Version::CURRENT, now_ms);
                    head = stage_entry(&engine, &mut batch, &mut frontier, head, format);
                    batch.insert(&engine.meta, HEAD_KEY, encode_ref(&head));
                    batch.insert(&engine.meta, FRONTIER_KEY, encode_frontier(&frontier));
                    let id = entry_hash(&bytes);
                    let at = Position {
                        id,
                        head: &head,
                        frontier: &frontier,
                    };
                    let size = stage_checkpoint(&engine, &mut batch, &signer, &at, now_ms, None);
                    switched = Some(size);
                }
                let last_cp = last_checkpoint_size(&engine)?;
                (
                    entry_hash(&bytes),
                    head,
                    frontier,
                    switched.or(last_cp).unwrap_or(0),
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
                let mut frontier = Frontier::default();
                stage_leaf(&engine, &mut batch, &mut frontier, &head.hash);
                batch.insert(&engine.entries, 0u64.to_be_bytes(), bytes);
                batch.insert(&engine.meta, HEAD_KEY, encode_ref(&head));
                batch.insert(&engine.meta, FRONTIER_KEY, encode_frontier(&frontier));
                (head.hash, head, frontier, 0)
            }
        };
        batch.commit()?;
        engine.db.persist(PersistMode::SyncAll)?;
        drop(engine);
        let (tx, rx) = mpsc::channel();
        let failed = Arc::new(AtomicBool::new(false));
        let node_cert = Arc::new(NodeCertSlot::default());
        let writer = Writer {
            store: store.clone(),
            id,
            signer,
            node_cert: node_cert.clone(),
            head,
            frontier,
            policy,
            last_cp,
            last_cp_at: Instant::now(),
            last_cp_cert: None,
            failed: failed.clone(),
            cause: None,
            closes: Vec::new(),
            durable_closes: std::collections::HashSet::new(),
        };
        std::thread::Builder::new()
            .name("didgate-audit-writer".into())
            .spawn(move || writer.run(rx))
            .map_err(StoreError::Writer)?;
        Ok(Self {
            tx,
            store,
            id,
            owner,
            failed,
            node_cert,
        })
    }

    /// Sets the node certificate (COSE bytes of a `NodeCertificate` for the owner's key,
    /// specs/protocol.md "Nodes") that every checkpoint the writer signs from now on carries in
    /// `node_cert`; `None` for a chain the gateway's own key owns (the default), whose
    /// checkpoints carry none. A node calls it after [`Chain::open`] and again at each renewal.
    /// The bytes are not checked here: a certificate that does not hold for the owner at a
    /// checkpoint's time is the verifier's `bad_node_certificate`. Checkpoints of version 1
    /// never carry one. The format-switch checkpoint that [`Chain::open`] may sign carries none.
    pub fn set_node_certificate(&self, cert: Option<Vec<u8>>) {
        self.node_cert.set(cert.map(Arc::from));
    }

    /// The node certificate the next checkpoints carry ([`Chain::set_node_certificate`]).
    pub fn node_certificate(&self) -> Option<Arc<[u8]>> {
        self.node_cert.get()
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
            why: "no head",
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
            .send(Msg::Append(Box::new(append), Reply::Async(tx)))
            .map_err(|_| AppendError::Stopped)?;
        rx.await.map_err(|_| AppendError::Stopped)?
    }

    /// [`Chain::append`] for synchronous code (the secret lifecycle, which runs on blocking
    /// threads): blocks the calling thread until the batch holding it is fsynced.
    pub fn append_blocking(&self, append: Append) -> Result<Appended, AppendError> {
        let (tx, rx) = mpsc::channel();
        self.tx
            .send(Msg::Append(Box::new(append), Reply::Blocking(tx)))
            .map_err(|_| AppendError::Stopped)?;
        rx.recv().map_err(|_| AppendError::Stopped)?
    }

    /// Queues `entry` (a close of a call whose closing append failed) to be written with the
    /// writer's next batch that succeeds (after the store recovers: the writer reopens it);
    /// dropped if the durable chain already closes that call. Lost if the process stops
    /// first: the gateway's start-up then closes the call as `abandoned`.
    pub fn owe(&self, entry: Entry) {
        let _ = self.tx.send(Msg::Owe(Box::new(entry)));
    }

    /// Appends an entry with no claims.
    pub async fn append_entry(&self, entry: Entry) -> Result<Appended, AppendError> {
        self.append(Append {
            entry,
            claims: Vec::new(),
        })
        .await
    }

    /// Signs and stores a checkpoint of the current head now, if entries were added since the
    /// last one. Blocks until it is durable.
    pub fn checkpoint(&self) -> Result<(), AppendError> {
        let (tx, rx) = mpsc::channel();
        self.tx
            .send(Msg::Checkpoint(tx))
            .map_err(|_| AppendError::Stopped)?;
        rx.recv().map_err(|_| AppendError::Stopped)?
    }

    /// Seals the chain: signs and stores a checkpoint of the current head now unless the last one
    /// covers it already, durably, like [`Chain::checkpoint`], and says which. Blocks.
    pub fn seal(&self) -> Result<Sealed, AppendError> {
        self.seal_then(|_, sealed| sealed)
    }

    /// [`Chain::seal`], then `then` on the writer thread before any later append is written, so
    /// the store's head is still the one the checkpoint covers while `then` reads it (an
    /// export). Appends wait meanwhile (they are delayed, not refused), so `then` must not
    /// append to this chain. Blocks until `then` returned; not run if the seal failed.
    pub fn seal_then<T: Send + 'static>(
        &self,
        then: impl FnOnce(&Store, Sealed) -> T + Send + 'static,
    ) -> Result<T, AppendError> {
        let (tx, rx) = mpsc::channel();
        let job: SealJob = Box::new(move |sealed, store| {
            let outcome = sealed.and_then(|s| {
                // a panic in `then` must not stop the writer
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| then(store, s)))
                    .map_err(|_| AppendError::SealJobPanicked)
            });
            let _ = tx.send(outcome);
        });
        self.tx
            .send(Msg::Seal(job))
            .map_err(|_| AppendError::Stopped)?;
        rx.recv().map_err(|_| AppendError::Stopped)?
    }

    /// Writes a final checkpoint, stops the writer after the appends queued before this call,
    /// and waits for it. Appends after this are refused. Dropping every handle of the store then
    /// closes the database.
    pub fn close(&self) {
        let (tx, rx) = mpsc::channel();
        if self.tx.send(Msg::Close(tx)).is_ok() {
            let _ = rx.recv();
        }
    }
}

/// Stages `entry` after `head` (seq and prev filled in, and the version: every entry a writer
/// adds is of [`Version::CURRENT`], the chain having been switched when it was opened) with
/// its Merkle leaf; returns the new head.
fn stage_entry<'e>(
    engine: &'e Engine,
    batch: &mut Batch<'e>,
    frontier: &mut Frontier,
    head: EntryRef,
    mut entry: Entry,
) -> EntryRef {
    entry.v = Version::CURRENT.as_u64();
    entry.seq = head.seq + 1;
    entry.prev = head.hash;
    let bytes = entry.encode();
    let head = EntryRef {
        seq: entry.seq,
        hash: entry_hash(&bytes),
    };
    batch.insert(&engine.entries, entry.seq.to_be_bytes(), bytes);
    stage_leaf(engine, batch, frontier, &head.hash);
    head
}

/// Where a checkpoint is taken: the chain `id` at `head`, whose Merkle frontier (of the
/// head's seq + 1 entries) is `frontier`.
struct Position<'a> {
    id: Digest,
    head: &'a EntryRef,
    frontier: &'a Frontier,
}

/// Stages the owner's signed checkpoint at `at` in the writer's version, carrying `node_cert`
/// when given; returns its size.
fn stage_checkpoint<'e>(
    engine: &'e Engine,
    batch: &mut Batch<'e>,
    signer: &Identity,
    at: &Position<'_>,
    time_ms: u64,
    node_cert: Option<&[u8]>,
) -> u64 {
    let cp = checkpoint_of(signer, at, time_ms, Version::CURRENT, node_cert);
    stage_signed(engine, batch, signer, &cp)
}

/// The owner's checkpoint at `at`, in version `v`, carrying `node_cert` (the node certificate
/// of the owner's key, version 2 on: a version 1 checkpoint never carries one).
fn checkpoint_of(
    signer: &Identity,
    at: &Position<'_>,
    time_ms: u64,
    v: Version,
    node_cert: Option<&[u8]>,
) -> Checkpoint {
    Checkpoint {
        v: v.as_u64(),
        log: signer.did().to_string(),
        chain: at.id,
        size: at.frontier.size(),
        head: at.head.hash,
        root: at.frontier.root(),
        time_ms,
        node_cert: node_cert.filter(|_| v >= Version::V2).map(<[u8]>::to_vec),
    }
}

/// Stages `cp` signed by `signer` in the checkpoints keyspace (key: its size); returns its size.
fn stage_signed<'e>(
    engine: &'e Engine,
    batch: &mut Batch<'e>,
    signer: &Identity,
    cp: &Checkpoint,
) -> u64 {
    batch.insert(&engine.checkpoints, cp.size.to_be_bytes(), cp.sign(signer));
    cp.size
}

/// Checks that `genesis` (entry 0's bytes) names `owner` and `role` ([`StoreError::WrongOwner`]).
fn check_genesis(genesis: &[u8], owner: &Did, role: Role) -> Result<(), StoreError> {
    let genesis = Entry::decode(genesis).map_err(|e| corrupt(0, e))?;
    if genesis.owner.as_deref() != Some(owner.as_str()) || genesis.role != Some(role) {
        return Err(StoreError::WrongOwner(genesis.owner.unwrap_or_default()));
    }
    Ok(())
}

/// The size of the last checkpoint stored (its key), if any.
fn last_checkpoint_size(engine: &Engine) -> Result<Option<u64>, StoreError> {
    Ok(engine
        .checkpoints
        .last_key_value()
        .map(|g| g.key())
        .transpose()?
        .map(|k| {
            <[u8; 8]>::try_from(k.as_ref())
                .map(u64::from_be_bytes)
                .unwrap_or(0)
        }))
}

/// Stages a leaf (level 0) and the subtrees it completes, and pushes it on the frontier.
fn stage_leaf<'e>(
    store: &'e Engine,
    batch: &mut Batch<'e>,
    frontier: &mut Frontier,
    entry_hash: &Digest,
) {
    let leaf = merkle::leaf_hash(entry_hash);
    let index = frontier.size();
    // A chain of 2^64 - 1 entries is out of reach; a node past it is not stored (and proofs
    // that need it are not served).
    if let Some(key) = merkle_key(0, index) {
        batch.insert(&store.merkle, key, leaf.to_vec());
    }
    for (level, idx, hash) in merkle::completed_subtrees(index + 1, leaf, frontier) {
        if let Some(key) = merkle_key(level, idx) {
            batch.insert(&store.merkle, key, hash.to_vec());
        }
    }
    frontier.push(leaf);
}

/// What the claims of a batch's earlier appends wrote: `None` for a removed key.
type Claimed = HashMap<(&'static str, Vec<u8>), Option<Vec<u8>>>;

struct Writer {
    store: Store,
    id: Digest,
    signer: Arc<Identity>,
    /// The node certificate the checkpoints it signs carry, if any ([`Chain::node_cert`]).
    node_cert: Arc<NodeCertSlot>,
    head: EntryRef,
    frontier: Frontier,
    policy: CheckpointPolicy,
    last_cp: u64,
    last_cp_at: Instant,
    /// The node certificate the last checkpoint this writer signed carried (`None` before it
    /// signed any): a forced checkpoint signs the head again when a node's certificate is not
    /// the one its last checkpoint carries (a store made before the node was certified, or a
    /// renewal), so the checkpoint a node publishes opens under its gateway.
    last_cp_cert: Option<Option<Arc<[u8]>>>,
    failed: Arc<AtomicBool>,
    /// Why the store failed (kept for the refusals until it is reopened).
    cause: Option<Shared<StoreFailure>>,
    /// Entries the writer owes the chain after a reopen (see [`Writer::recover`]), and closes
    /// owed by callers ([`Chain::owe`]).
    closes: Vec<Entry>,
    /// Calls whose close was reported failed but proved durable at a recovery: an owed close
    /// of one of them is dropped, never written twice.
    durable_closes: std::collections::HashSet<Digest>,
}

/// Bytes written (then removed) to check that the store's file system takes writes again.
const PROBE_BYTES: usize = 1024 * 1024;

impl Writer {
    /// The way back from a failed store: checks that its file system takes writes again, reopens
    /// the database (fjall refuses every write after an I/O error), and takes the head and the
    /// Merkle frontier from what is durable. An append whose batch was reported failed may have
    /// been made durable after all: an `executing` entry among those is closed as `abandoned`
    /// (its caller was refused, the call never ran), so no executing entry stays open.
    fn recover(&mut self) -> Result<(), StoreFailure> {
        let failed = |step, source: StoreFailure| StoreFailure::Recovery {
            cause: self.cause.clone(),
            step,
            source: Shared::new(source),
        };
        let probe = self.store.path.join("reopen.probe");
        let written = std::fs::File::create(&probe).and_then(|mut f| {
            std::io::Write::write_all(&mut f, &vec![0u8; PROBE_BYTES])?;
            f.sync_all()
        });
        let _ = std::fs::remove_file(&probe);
        written.map_err(|e| failed("still failing", e.into()))?;
        self.store
            .reopen()
            .map_err(|e| failed("reopening failed", e.into()))?;
        let (head, frontier) = self
            .store
            .durable_head()
            .map_err(|e| failed("after reopening", e.into()))?;
        for seq in self.head.seq + 1..=head.seq {
            let Ok(Some(bytes)) = self.store.entry_bytes(seq) else {
                continue;
            };
            let Ok(e) = Entry::decode(&bytes) else {
                continue;
            };
            if matches!(
                e.kind,
                EntryKind::Executed | EntryKind::Failed | EntryKind::Abandoned
            ) && let Some(call) = e.call
            {
                // a close reported failed that proved durable: an owed close is not needed
                self.durable_closes.insert(call);
            }
            if e.kind == EntryKind::Executing
                && let Some(call) = e.call
            {
                let mut close = Entry::new(EntryKind::Abandoned, now_ms());
                close.call = Some(call);
                close.policy = e.policy;
                close.detail = Some(format!(
                    "executing entry {seq} was reported unwritten (store failure) and never ran"
                ));
                self.closes.push(close);
            }
        }
        self.head = head;
        self.frontier = frontier;
        self.cause = None;
        self.failed.store(false, Ordering::Release);
        Ok(())
    }

    fn run(mut self, rx: mpsc::Receiver<Msg>) {
        let mut closing = None;
        while closing.is_none() {
            let mut jobs = Vec::new();
            let mut forced = Vec::new();
            let mut seals = Vec::new();
            match rx.recv_timeout(self.policy.every) {
                Ok(Msg::Append(a, r)) => jobs.push((*a, r)),
                Ok(Msg::Owe(e)) => self.closes.push(*e),
                Ok(Msg::Checkpoint(done)) => forced.push(done),
                Ok(Msg::Seal(job)) => seals.push(job),
                Ok(Msg::Close(done)) => closing = Some(done),
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
            while closing.is_none() && jobs.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(Msg::Append(a, r)) => jobs.push((*a, r)),
                    Ok(Msg::Owe(e)) => self.closes.push(*e),
                    Ok(Msg::Checkpoint(done)) => forced.push(done),
                    Ok(Msg::Seal(job)) => seals.push(job),
                    Ok(Msg::Close(done)) => closing = Some(done),
                    Err(_) => break,
                }
            }
            let force = !forced.is_empty() || !seals.is_empty() || closing.is_some();
            let checkpointed = self.last_cp;
            let result = self.commit(jobs, force);
            for done in forced {
                let _ = done.send(result.clone());
            }
            for job in seals {
                let sealed = result.clone().and_then(|()| self.sealed(checkpointed));
                job(sealed, &self.store);
            }
        }
        self.failed.store(true, Ordering::Release);
        drop(self.store);
        drop(rx);
        if let Some(done) = closing {
            let _ = done.send(());
        }
    }

    /// After a forced commit: the chain's size and whether that commit signed the checkpoint
    /// (`before`: the size the last checkpoint covered before it); an error if the last
    /// checkpoint does not cover the head exactly.
    fn sealed(&self, before: u64) -> Result<Sealed, AppendError> {
        let size = self.frontier.size();
        if self.last_cp != size {
            return Err(AppendError::NotSealed {
                covered: self.last_cp,
                size,
            });
        }
        Ok(Sealed {
            size,
            written: self.last_cp != before,
        })
    }

    fn checkpoint_due(&self, force: bool) -> bool {
        let size = self.frontier.size();
        let cert = self.node_cert.get();
        let recertify =
            force && size > 0 && cert.is_some() && self.last_cp_cert.as_ref() != Some(&cert);
        recertify
            || size > self.last_cp
                && (force
                    || size - self.last_cp >= self.policy.every_entries
                    || self.last_cp_at.elapsed() >= self.policy.every)
    }

    fn commit(&mut self, jobs: Vec<(Append, Reply)>, force: bool) -> Result<(), AppendError> {
        if self.failed.load(Ordering::Acquire)
            && let Err(why) = self.recover()
        {
            let err = AppendError::unavailable(why);
            for (_, reply) in jobs {
                reply.send(Err(err.clone()));
            }
            return Err(err);
        }
        let engine = match self.store.engine() {
            Ok(e) => e,
            Err(e) => return self.fail(jobs.into_iter().map(|(_, r)| r), e.into()),
        };
        let mut batch = Batch::new(&engine.db);
        let mut head = self.head;
        let mut frontier = self.frontier.clone();
        let durable = &self.durable_closes;
        self.closes
            .retain(|c| c.call.is_none_or(|call| !durable.contains(&call)));
        let closes = std::mem::take(&mut self.closes);
        for entry in closes.iter().cloned() {
            head = stage_entry(&engine, &mut batch, &mut frontier, head, entry);
        }
        let mut claimed: Claimed = HashMap::new();
        let mut outcomes = Vec::with_capacity(jobs.len());
        for (append, reply) in jobs {
            if let Err(e) = self.check(&append.claims, &claimed) {
                outcomes.push((reply, Err(e)));
                continue;
            }
            for c in append.claims {
                let value = (c.rule != ClaimRule::Remove).then_some(c.value);
                if let Some(ks) = engine.spaces.get(c.space) {
                    match &value {
                        Some(v) => batch.insert(ks, c.key.clone(), v.clone()),
                        None => batch.remove(ks, c.key.clone()),
                    }
                }
                claimed.insert((c.space, c.key), value);
            }
            head = stage_entry(&engine, &mut batch, &mut frontier, head, append.entry);
            outcomes.push((
                reply,
                Ok(Appended {
                    entry: head,
                    frontier: frontier.clone(),
                }),
            ));
        }
        let grew = head != self.head;
        let (saved_frontier, saved_head) =
            (std::mem::replace(&mut self.frontier, frontier), self.head);
        self.head = head;
        let checkpoint = self.checkpoint_due(force);
        if grew || checkpoint {
            if grew {
                batch.insert(&engine.meta, HEAD_KEY, encode_ref(&head));
                batch.insert(&engine.meta, FRONTIER_KEY, encode_frontier(&self.frontier));
            }
            if checkpoint {
                let at = Position {
                    id: self.id,
                    head: &self.head,
                    frontier: &self.frontier,
                };
                let cert = self.node_cert.get();
                stage_checkpoint(
                    &engine,
                    &mut batch,
                    &self.signer,
                    &at,
                    now_ms(),
                    cert.as_deref(),
                );
            }
            let durable = batch
                .commit()
                .and_then(|()| engine.db.persist(PersistMode::SyncAll));
            drop(engine);
            if let Err(e) = durable {
                self.frontier = saved_frontier;
                self.head = saved_head;
                self.closes = closes;
                let replies = outcomes.into_iter().map(|(reply, _)| reply);
                return self.fail(replies, e.into());
            }
            if checkpoint {
                self.last_cp = self.frontier.size();
                self.last_cp_at = Instant::now();
                self.last_cp_cert = Some(self.node_cert.get());
            }
        }
        for (reply, outcome) in outcomes {
            reply.send(outcome);
        }
        Ok(())
    }

    /// Marks the store failed (fail closed until [`Writer::recover`] succeeds) and refuses
    /// `replies` with the cause.
    fn fail(
        &mut self,
        replies: impl IntoIterator<Item = Reply>,
        cause: StoreFailure,
    ) -> Result<(), AppendError> {
        self.failed.store(true, Ordering::Release);
        let cause = Shared::new(cause);
        self.cause = Some(cause.clone());
        let err = AppendError::Unavailable(cause);
        for reply in replies {
            reply.send(Err(err.clone()));
        }
        Err(err)
    }

    fn check(&self, claims: &[Claim], claimed: &Claimed) -> Result<(), AppendError> {
        for (index, c) in claims.iter().enumerate() {
            // a key below its keyspace's pruning horizon may have been there and gone
            if matches!(c.rule, ClaimRule::Absent | ClaimRule::AbsentOrEqual)
                && self.store.below_horizon(c.space, &c.key)
            {
                return Err(AppendError::Conflict { index });
            }
            let existing = match claimed.get(&(c.space, c.key.clone())) {
                Some(v) => v.clone(),
                None => self
                    .store
                    .get(c.space, &c.key)
                    .map_err(AppendError::unavailable)?,
            };
            if !c.holds(existing.as_deref()) {
                return Err(AppendError::Conflict { index });
            }
        }
        Ok(())
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use didgate_protocol::Identity;
    use didgate_protocol::cbor::DecodeError;
    use std::error::Error as _;

    #[test]
    fn store_errors_carry_their_cause_as_source() {
        let e = corrupt(3, DecodeError::Trailing(1));
        assert_eq!(
            e.to_string(),
            "entry 3 is corrupt: 1 trailing bytes after the CBOR item"
        );
        let source = e.source().expect("a source");
        assert_eq!(
            source.downcast_ref::<DecodeError>(),
            Some(&DecodeError::Trailing(1))
        );

        let e = AppendError::unavailable(StoreError::Closed);
        assert_eq!(
            e.to_string(),
            "audit store unavailable: store closed after an I/O error; reopening failed"
        );
        let failure = e.source().expect("a source");
        let failure = failure
            .downcast_ref::<Shared<StoreFailure>>()
            .expect("a store failure");
        assert!(matches!(
            failure.get(),
            StoreFailure::Store(StoreError::Closed)
        ));
        assert_eq!(e.clone(), e, "still Clone and PartialEq");
    }

    #[test]
    fn a_failed_recovery_says_the_cause_and_the_step() {
        let cause = Shared::new(StoreFailure::Probe(std::io::Error::other("disk full")));
        let e = StoreFailure::Recovery {
            cause: Some(cause),
            step: "still failing",
            source: Shared::new(StoreFailure::Probe(std::io::Error::other(
                "disk still full",
            ))),
        };
        assert_eq!(e.to_string(), "disk full; still failing: disk still full");
        assert!(e.source().is_some_and(|s| s.is::<Shared<StoreFailure>>()));
        let e = StoreFailure::Recovery {
            cause: None,
            step: "reopening failed",
            source: Shared::new(StoreError::Closed.into()),
        };
        assert!(
            e.to_string()
                .starts_with("store failed; reopening failed: ")
        );
    }

    /// The load of the busy-worker tests: three rounds of a merge of `big` (32 MB more each
    /// round, in overlapping tables) with thousands of batches to the `hot` keyspaces while it
    /// runs. Returns the batches written, each putting `value` under the batch's number in
    /// every `hot` keyspace.
    fn busy_worker_load(engine: &Engine, hot: &[&Space], value: &[u8]) -> u64 {
        const COMMITS: u64 = 20_000;
        let big = engine.named("big").expect("big");
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut commits: u64 = 0;
        for _ in 0..3 {
            for _ in 0..32 {
                let mut batch = Batch::new(&engine.db);
                for _ in 0..1024 {
                    x = x
                        .wrapping_mul(6_364_136_223_846_793_005)
                        .wrapping_add(1_442_695_040_888_963_407);
                    batch.insert(big, x.to_be_bytes(), vec![7u8; 1000]);
                }
                batch.commit().expect("commit");
            }
            let merge = {
                let big = big.uncounted().clone();
                std::thread::spawn(move || big.major_compact())
            };
            // one more flush of `big`: the worker's compaction of it then waits for the merge
            let mut batch = Batch::new(&engine.db);
            batch.insert(big, b"last".to_vec(), b"v".to_vec());
            batch.commit().expect("commit");
            big.uncounted().rotate_memtable().expect("rotate");
            // COMMITS batches, and on while the merge runs (at most ten times as many)
            let mut round = 0;
            while round < COMMITS || (!merge.is_finished() && round < 10 * COMMITS) {
                let mut batch = Batch::new(&engine.db);
                for space in hot {
                    batch.insert(space, commits.to_be_bytes(), value.to_vec());
                }
                batch.commit().expect("commit");
                round += 1;
                commits += 1;
            }
            merge.join().expect("merge thread").expect("merge");
        }
        commits
    }

    /// Runs [`busy_worker_load`] on the store at `path` (its `entries` and three named
    /// keyspaces hot) and checks that the store flushes again afterwards and reads back.
    fn busy_worker_does_not_stall(path: &Path) {
        const HOT: [&str; 3] = ["hot1", "hot2", "hot3"];
        let store = Store::open(path, &["big", HOT[0], HOT[1], HOT[2]]).expect("open");
        let engine = store.engine().expect("engine");
        let value = vec![1u8; 256];
        let (done, finished) = mpsc::channel();
        {
            let (engine, value) = (engine.clone(), value.clone());
            std::thread::spawn(move || {
                let mut hot = vec![&engine.entries];
                hot.extend(HOT.iter().map(|name| engine.named(name).expect("hot")));
                done.send(busy_worker_load(&engine, &hot, &value))
            });
        }
        // the load runs on a thread of its own: a stalled store blocks a rotation for good
        let commits = finished
            .recv_timeout(Duration::from_secs(120))
            .expect("the store stopped flushing: the load did not finish in 120 s");
        let written = commits * 4 * (8 + 256);
        let limit = 16 * MEMTABLE_BYTES;
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut buffered = engine.db.write_buffer_size();
        while buffered > limit {
            assert!(
                Instant::now() < deadline,
                "the store stopped flushing: {buffered} bytes in memtables 30 s after the \
                 writes ended ({written} written)"
            );
            std::thread::sleep(Duration::from_millis(50));
            buffered = engine.db.write_buffer_size();
        }
        let mut hot = vec![&engine.entries];
        hot.extend(HOT.iter().map(|name| engine.named(name).expect("hot")));
        for space in hot {
            for i in [0, commits / 2, commits - 1] {
                let got = space.get(i.to_be_bytes()).expect("read");
                assert_eq!(got.as_deref(), Some(&value[..]));
            }
        }
    }

    /// fjall 3.1's worker, handling a rotation request, sends its flush request into its own
    /// bounded queue; writers that keep asking for rotations while it is busy fill that queue,
    /// and it then waits forever (crate::space). Here the store's one worker is held by merges
    /// of a large keyspace (a merge holds that keyspace's compaction lock, so the worker's own
    /// compaction of it waits) while tens of thousands of batches fill four memtables many
    /// times over. The load must finish, the store must flush again (the memtables' bytes come
    /// back down), and every key must read back. Before the store rotated its memtables itself,
    /// an earlier form of this test (four named keyspaces) stalled it in all eight runs.
    #[test]
    fn a_busy_worker_does_not_stall_the_store() {
        let dir = tempfile::tempdir().expect("tmp");
        busy_worker_does_not_stall(dir.path());
    }

    /// The same load on a store whose keyspaces an earlier release created, with fjall's
    /// memtable size at 1 MiB and no records: the store must rotate them no later than fjall
    /// would (the `entries` keyspace too, whose limit in a new store is 4 MiB).
    #[test]
    fn a_busy_worker_does_not_stall_a_store_an_earlier_release_created() {
        let dir = tempfile::tempdir().expect("tmp");
        store_of_an_earlier_release(dir.path(), &["big", "hot1", "hot2", "hot3"]);
        let store = Store::open(dir.path(), &["big"]).expect("open");
        let engine = store.engine().expect("engine");
        assert_eq!(engine.entries.limit(), MEMTABLE_BYTES, "no record: 1 MiB");
        drop((engine, store));
        busy_worker_does_not_stall(dir.path());
    }

    /// A store created by an earlier release's code: its keyspaces at fjall's 1 MiB, without
    /// the store's records.
    fn store_of_an_earlier_release(path: &Path, names: &[&str]) {
        let db = Database::builder(path).open().expect("db");
        let earlier = || keyspace_options().max_memtable_size(MEMTABLE_BYTES);
        let entries = || {
            earlier().with_kv_separation(Some(
                fjall::KvSeparationOptions::default().separation_threshold(128),
            ))
        };
        db.keyspace(ENTRIES, entries).expect("entries");
        for name in [META, MERKLE, CHECKPOINTS].iter().chain(names) {
            db.keyspace(name, earlier).expect("keyspace");
        }
        db.persist(PersistMode::SyncAll).expect("persist");
    }

    #[test]
    fn a_keyspace_keeps_the_limit_its_record_gives() {
        let dir = tempfile::tempdir().expect("tmp");
        let store = Store::open(dir.path(), &["replay"]).expect("open");
        let engine = store.engine().expect("engine");
        assert_eq!(engine.entries.limit(), ENTRIES_MEMTABLE_BYTES);
        assert_eq!(
            engine.named("replay").expect("replay").limit(),
            MEMTABLE_BYTES
        );
        drop((engine, store));
        let store = Store::open(dir.path(), &["replay"]).expect("reopen");
        let engine = store.engine().expect("engine");
        assert_eq!(engine.entries.limit(), ENTRIES_MEMTABLE_BYTES, "recorded");

        // a store without records: 1 MiB everywhere; its backup is created with records
        let earlier = tempfile::tempdir().expect("tmp");
        store_of_an_earlier_release(earlier.path(), &["replay"]);
        let store = Store::open(earlier.path(), &["replay"]).expect("open the earlier store");
        let engine = store.engine().expect("engine");
        assert_eq!(engine.entries.limit(), MEMTABLE_BYTES, "no record");
        let copies = tempfile::tempdir().expect("tmp");
        store.backup(&copies.path().join("copy")).expect("backup");
        drop((engine, store));
        let copy = Store::open(&copies.path().join("copy"), &["replay"]).expect("the copy");
        let engine = copy.engine().expect("engine");
        assert_eq!(
            engine.entries.limit(),
            ENTRIES_MEMTABLE_BYTES,
            "the copy's record"
        );
        assert_eq!(
            engine.named("replay").expect("replay").limit(),
            MEMTABLE_BYTES
        );
    }

    #[test]
    fn the_last_key_a_predicate_accepts_is_found_from_the_end() {
        let dir = tempfile::tempdir().expect("tmp");
        let store = Store::open(dir.path(), &["replay"]).expect("open");
        let key = |deadline: u64, tag: u8| {
            let mut k = deadline.to_be_bytes().to_vec();
            k.push(tag);
            k
        };
        let request = |k: &[u8]| k.get(8) == Some(&b'n');
        assert_eq!(store.last_key_where("replay", request).expect("read"), None);
        store
            .write(
                &[
                    ("replay", key(10, b'n'), Vec::new()),
                    ("replay", key(30, b'n'), Vec::new()),
                    ("replay", key(40, b'g'), Vec::new()),
                    ("replay", key(50, b'g'), Vec::new()),
                ],
                &[],
            )
            .expect("write");
        assert_eq!(
            store.last_key_where("replay", request).expect("read"),
            Some(key(30, b'n'))
        );
        assert!(store.last_key_where("missing", request).is_err());
    }

    #[tokio::test]
    async fn appends_link_and_survive_reopen() {
        let dir = tempfile::tempdir().expect("tmp");
        let owner = Arc::new(Identity::from_seed(&[1; 32]));
        let store = Store::open(dir.path(), &["replay"]).expect("open");
        let chain = Chain::open(
            store,
            owner.clone(),
            Role::Gateway,
            1,
            CheckpointPolicy::default(),
        )
        .expect("chain");
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

    /// A store whose Merkle nodes are in the layout of releases before 2026-12-05 (u8 level ||
    /// u64be index, keyspace `merkle`) is re-keyed when it is opened: every root and inclusion
    /// proof is the same as before, and the old keyspace is gone.
    #[test]
    fn merkle_nodes_of_the_earlier_layout_are_rekeyed_at_open() {
        let dir = tempfile::tempdir().expect("tmp");
        let owner = Arc::new(Identity::from_seed(&[3; 32]));
        let store = Store::open(dir.path(), &[]).expect("open");
        let chain = Chain::open(
            store.clone(),
            owner,
            Role::Gateway,
            1,
            CheckpointPolicy::default(),
        )
        .expect("chain");
        for i in 0..37 {
            chain
                .append_blocking(Append {
                    entry: Entry::new(EntryKind::Refused, i),
                    claims: Vec::new(),
                })
                .expect("append");
        }
        let size = chain.head().expect("head").seq + 1;
        let roots: Vec<_> = (1..=size).map(|n| store.root_at(n)).collect();
        let proofs: Vec<_> = (0..size).map(|i| store.inclusion_proof(i, size)).collect();
        assert!(roots.iter().all(Option::is_some) && proofs.iter().all(Option::is_some));
        chain.close();
        drop((chain, store));
        {
            // the earlier layout, by hand
            let db = Database::builder(dir.path()).open().expect("db");
            let current = db.keyspace(MERKLE, keyspace_options).expect("merkle");
            let legacy = db
                .keyspace(LEGACY_MERKLE, keyspace_options)
                .expect("legacy");
            for kv in current.iter() {
                let (k, v) = kv.into_inner().expect("kv");
                let end = u64::from_be_bytes(k[..8].try_into().expect("8 bytes"));
                let level = k[8];
                let mut old = vec![level];
                old.extend_from_slice(&(((end + 1) >> level) - 1).to_be_bytes());
                legacy.insert(old, v).expect("insert");
            }
            db.delete_keyspace(current).expect("delete");
            db.persist(PersistMode::SyncAll).expect("persist");
        }
        let store = Store::open(dir.path(), &[]).expect("reopen");
        assert!(
            !store
                .engine()
                .expect("engine")
                .db
                .keyspace_exists(LEGACY_MERKLE)
        );
        let after: Vec<_> = (1..=size).map(|n| store.root_at(n)).collect();
        assert_eq!(after, roots);
        let after: Vec<_> = (0..size).map(|i| store.inclusion_proof(i, size)).collect();
        assert_eq!(after, proofs);
    }

    /// A record written and removed atomically with entries, from a plain thread: the claim
    /// rules `Put` and `Remove` and [`Chain::append_blocking`].
    #[test]
    fn put_and_remove_claims_go_with_their_entries() {
        let dir = tempfile::tempdir().expect("tmp");
        let owner = Arc::new(Identity::from_seed(&[2; 32]));
        let store = Store::open(dir.path(), &["records"]).expect("open");
        let chain = Chain::open(
            store.clone(),
            owner,
            Role::Gateway,
            1,
            CheckpointPolicy::default(),
        )
        .expect("chain");
        let claim = |rule, value: &[u8]| Claim {
            space: "records",
            key: b"k".to_vec(),
            value: value.to_vec(),
            rule,
        };
        for (rule, value, after) in [
            (ClaimRule::Put, &b"one"[..], Some(&b"one"[..])),
            (ClaimRule::Put, b"two", Some(b"two")),
            (ClaimRule::Remove, b"", None),
            (ClaimRule::Remove, b"", None),
        ] {
            let appended = chain
                .append_blocking(Append {
                    entry: Entry::new(EntryKind::Refusals, 2),
                    claims: vec![claim(rule, value)],
                })
                .expect("append");
            assert_eq!(
                store.get("records", b"k").expect("get").as_deref(),
                after,
                "after entry {}",
                appended.entry.seq
            );
        }
        // a removal seen by a later claim of the same batch: the key is absent again
        let (a, b) = (chain.clone(), chain.clone());
        let first = std::thread::spawn(move || {
            a.append_blocking(Append {
                entry: Entry::new(EntryKind::Refusals, 3),
                claims: vec![claim(ClaimRule::Absent, b"three")],
            })
        });
        let second = std::thread::spawn(move || {
            b.append_blocking(Append {
                entry: Entry::new(EntryKind::Refusals, 3),
                claims: vec![claim(ClaimRule::Absent, b"four")],
            })
        });
        let outcomes = [first.join().expect("join"), second.join().expect("join")];
        assert_eq!(
            outcomes.iter().filter(|o| o.is_ok()).count(),
            1,
            "{outcomes:?}"
        );
        assert_eq!(chain.head().expect("head").seq, 5);
        chain.close();
    }

    /// The checkpoints in a store, decoded, in size order.
    fn stored_checkpoints(store: &Store) -> Vec<(Vec<u8>, Checkpoint)> {
        store
            .checkpoints()
            .expect("checkpoints")
            .into_iter()
            .map(|b| {
                let cp = didgate_protocol::message::open::<Checkpoint>(&b)
                    .expect("opens")
                    .into_message();
                (b, cp)
            })
            .collect()
    }

    /// Issue 22: a node's chain carries its node certificate in every checkpoint signed after
    /// it is set, and a renewal replaces it; a chain without one signs exactly what it signed
    /// before node certificates existed.
    #[test]
    fn checkpoints_carry_the_node_certificate_set_on_the_chain() {
        let dir = tempfile::tempdir().expect("tmp");
        let owner = Arc::new(Identity::from_seed(&[4; 32]));
        let store = Store::open(dir.path(), &[]).expect("open");
        let chain = Chain::open(
            store.clone(),
            owner.clone(),
            Role::Gateway,
            1,
            CheckpointPolicy::default(),
        )
        .expect("chain");
        let append = |i| {
            chain
                .append_blocking(Append {
                    entry: Entry::new(EntryKind::Refusals, i),
                    claims: Vec::new(),
                })
                .expect("append");
            chain.checkpoint().expect("checkpoint");
        };
        append(1);
        assert_eq!(chain.node_certificate(), None);
        chain.set_node_certificate(Some(b"first".to_vec()));
        append(2);
        chain.set_node_certificate(Some(b"renewed".to_vec()));
        assert_eq!(chain.node_certificate().as_deref(), Some(&b"renewed"[..]));
        append(3);
        chain.set_node_certificate(None);
        append(4);
        chain.close();
        let cps = stored_checkpoints(&store);
        let carried: Vec<Option<&[u8]>> = cps.iter().map(|(_, c)| c.node_cert.as_deref()).collect();
        assert_eq!(
            carried,
            vec![None, Some(&b"first"[..]), Some(&b"renewed"[..]), None]
        );
        // without a certificate, the bytes are those of a checkpoint without the field
        for (bytes, cp) in [&cps[0], &cps[3]] {
            let before = Checkpoint {
                v: cp.v,
                log: owner.did().to_string(),
                chain: cp.chain,
                size: cp.size,
                head: cp.head,
                root: cp.root,
                time_ms: cp.time_ms,
                node_cert: None,
            };
            assert_eq!(*bytes, before.sign(&owner));
            assert!(!bytes.windows(9).any(|w| w == b"node_cert"));
        }
    }

    /// A seal with no daemon running carries the node certificate given; a version 1
    /// checkpoint never carries one.
    #[test]
    fn a_seal_carries_the_node_certificate_given_from_version_2_on() {
        let dir = tempfile::tempdir().expect("tmp");
        let owner = Arc::new(Identity::from_seed(&[5; 32]));
        let store = Store::open(dir.path(), &[]).expect("open");
        let chain = Chain::open(
            store.clone(),
            owner.clone(),
            Role::Gateway,
            1,
            CheckpointPolicy::default(),
        )
        .expect("chain");
        chain
            .append_blocking(Append {
                entry: Entry::new(EntryKind::Refusals, 2),
                claims: Vec::new(),
            })
            .expect("append");
        let size = chain.head().expect("head").seq + 1;
        let at = Position {
            id: chain.id(),
            head: &EntryRef {
                seq: 0,
                hash: [0; 32],
            },
            frontier: &Frontier::default(),
        };
        let v1 = checkpoint_of(&owner, &at, 3, Version::V1, Some(b"cert"));
        assert_eq!(v1.node_cert, None);
        chain.close();
        drop(chain);
        // the final checkpoint of `close` removed: the chain is unsealed again
        let engine = store.engine().expect("engine");
        engine
            .checkpoints
            .uncounted()
            .remove(size.to_be_bytes())
            .expect("remove");
        drop(engine);
        let sealed = store
            .seal_with_node_certificate(&owner, Role::Gateway, 9, Some(b"cert"))
            .expect("seal");
        assert_eq!(
            sealed,
            Sealed {
                size,
                written: true
            }
        );
        let cps = stored_checkpoints(&store);
        let last = &cps.last().expect("a checkpoint").1;
        assert_eq!(
            (last.size, last.node_cert.as_deref()),
            (size, Some(&b"cert"[..]))
        );
    }
}
