//! The store's keyspaces and its write batches, which rotate memtables themselves.
//!
//! fjall 3.1 lets a writer ask for a memtable rotation when a keyspace's active memtable is
//! over its size: every commit to such a keyspace puts one more request into the bounded queue
//! (1,000 messages) of fjall's background workers, until a worker gets to the first of them.
//! The worker that handles one then sends its flush request into that same queue, and waits
//! while the queue is full. When the workers are busy long enough for the commits to fill the
//! queue (a compaction, a slow disk), the worker that takes a rotation request out has writers
//! put another in before it sends, and it waits forever for a queue only it reads: no memtable
//! is flushed again and the memtables grow without bound (upstream: fjall-rs/fjall pull request
//! 323, open). Reproduced with one worker and with two, by a 200 ms compaction under a write
//! load; the test `a_busy_worker_does_not_stall_the_store` (store.rs) stalled the store in
//! every one of eight runs before the store rotated its memtables itself.
//!
//! So the store rotates its memtables itself. A [`Batch`] counts what it adds to each
//! keyspace's memtable the way fjall does (key, value and [`ITEM_OVERHEAD`] per item), and when
//! it commits, each [`Space`] that has taken its [`Space::limit`] since its last rotation is
//! rotated by the committing thread: fjall's worker then gets one flush request per rotation
//! and never a rotation request from a writer, because no memtable outgrows the size fjall
//! checks (created at twice the limit; a store created before has it at the limit, and the
//! store rotates right after the commit that reaches it). While the worker is busy, sealed
//! memtables wait for it, and at four fjall holds the writers back: memory stays bounded.

use std::ops::Deref;
use std::sync::atomic::{AtomicU64, Ordering};

use fjall::{Database, Keyspace, KeyspaceCreateOptions, UserKey, UserValue};

/// What fjall counts in a memtable for one item beyond its key and value: the size of
/// lsm-tree's `InternalValue`, 64 bytes in lsm-tree 3.1.
pub(crate) const ITEM_OVERHEAD: u64 = 64;

/// A keyspace of the store, and what the store has added to its active memtable since it last
/// rotated it.
pub(crate) struct Space {
    keyspace: Keyspace,
    filled: AtomicU64,
    limit: u64,
}

impl Space {
    /// Opens (or creates) the keyspace `name`, and flushes what the journal brought back into
    /// its memtable, so that the count starts from an empty memtable.
    pub(crate) fn open(
        db: &Database,
        name: &str,
        options: fn() -> KeyspaceCreateOptions,
        limit: u64,
    ) -> Result<Self, fjall::Error> {
        let keyspace = db.keyspace(name, options)?;
        keyspace.rotate_memtable()?;
        Ok(Self {
            keyspace,
            filled: AtomicU64::new(0),
            limit,
        })
    }

    /// Counts `bytes` added to the active memtable by a committed batch; rotates it once they
    /// reach the limit. A failed rotation (fjall's journal lock poisoned, which fails the next
    /// commit too) is tried again at the next commit.
    fn added(&self, bytes: u64) {
        let filled = self.filled.fetch_add(bytes, Ordering::Relaxed) + bytes;
        if filled < self.limit {
            return;
        }
        let taken = self.filled.swap(0, Ordering::Relaxed);
        if taken >= self.limit && self.keyspace.rotate_memtable().is_err() {
            self.filled.fetch_add(taken, Ordering::Relaxed);
        }
    }
}

impl Deref for Space {
    type Target = Keyspace;

    fn deref(&self) -> &Keyspace {
        &self.keyspace
    }
}

/// One atomic write to the store's keyspaces (fjall's batch), counting what it adds to each
/// keyspace's memtable.
pub(crate) struct Batch<'e> {
    batch: fjall::OwnedWriteBatch,
    added: Vec<(&'e Space, u64)>,
}

impl<'e> Batch<'e> {
    pub(crate) fn new(db: &Database) -> Self {
        Self {
            batch: db.batch(),
            added: Vec::new(),
        }
    }

    fn count(&mut self, space: &'e Space, bytes: usize) {
        let bytes = bytes as u64 + ITEM_OVERHEAD;
        match self.added.iter_mut().find(|(s, _)| std::ptr::eq(*s, space)) {
            Some((_, n)) => *n += bytes,
            None => self.added.push((space, bytes)),
        }
    }

    pub(crate) fn insert(
        &mut self,
        space: &'e Space,
        key: impl Into<UserKey>,
        value: impl Into<UserValue>,
    ) {
        let (key, value) = (key.into(), value.into());
        self.count(space, key.len() + value.len());
        self.batch.insert(&space.keyspace, key, value);
    }

    pub(crate) fn remove(&mut self, space: &'e Space, key: impl Into<UserKey>) {
        let key = key.into();
        self.count(space, key.len());
        self.batch.remove(&space.keyspace, key);
    }

    /// A weak tombstone (a key written once and never overwritten).
    pub(crate) fn remove_weak(&mut self, space: &'e Space, key: impl Into<UserKey>) {
        let key = key.into();
        self.count(space, key.len());
        self.batch.remove_weak(&space.keyspace, key);
    }

    /// Applies the batch (to the journal and the memtables; not yet synced), then rotates the
    /// memtables that reached their limit.
    pub(crate) fn commit(self) -> Result<(), fjall::Error> {
        self.batch.commit()?;
        for (space, bytes) in self.added {
            space.added(bytes);
        }
        Ok(())
    }
}
