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
//! load; an earlier form of the test `a_busy_worker_does_not_stall_the_store` (store.rs: four
//! named keyspaces) stalled the store in all eight runs before the store rotated its memtables
//! itself.
//!
//! So the store rotates its memtables itself. A [`Batch`] counts what it adds to each
//! keyspace's memtable the way fjall does (key, value and [`ITEM_OVERHEAD`] per item), and when
//! it commits, each [`Space`] that has taken its limit since its last rotation is rotated by
//! the committing thread. A keyspace the store creates gets fjall's own memtable size at twice
//! its limit, and a record of that size in `meta` ([`MEMTABLE_RECORD`]): no writer of it ever
//! asks fjall for a rotation. A keyspace without a record (an earlier release created it, with
//! fjall's size at 1 MiB or more, or a crash lost the record) is rotated at
//! [`UNRECORDED_LIMIT`]: each writer thread asks at most once per rotation (in the commit that
//! crosses fjall's size, right before the store rotates), and the worker drops a request for a
//! memtable already rotated without sending anything.
//! fjall's worker thus gets one flush request per rotation, and writers cannot fill its queue.
//! While the worker is busy, sealed memtables wait for it, and at four in one keyspace fjall
//! holds the writers back: memory stays bounded, and calls wait for the worker.
//!
//! Writes that do not go through a [`Batch`]: the records themselves (a few bytes); re-keying
//! an old store's Merkle nodes at open, followed by a rotation; and a backup, whose new
//! database keeps fjall's own rotation: one thread copies in batches of 4,096 items, and while
//! a memtable of the copy is over its size each batch asks once, so its queue fills only if
//! about 1,000 batches pass during one flush or compaction of the copy.

use std::ops::RangeBounds;
use std::sync::atomic::{AtomicU64, Ordering};

use fjall::{Database, Guard, Iter, Keyspace, KeyspaceCreateOptions, UserKey, UserValue};

/// What fjall counts in a memtable for one item beyond its key and value: the size of
/// lsm-tree's `InternalValue`, 64 bytes in lsm-tree 3.1.
pub(crate) const ITEM_OVERHEAD: u64 = 64;

/// `meta` key prefix of a keyspace's record: `memtable/NAME` -> u64be, the memtable size fjall
/// was given when the store created keyspace NAME (twice the store's limit).
pub(crate) const MEMTABLE_RECORD: &[u8] = b"memtable/";

/// The `meta` key of keyspace `name`'s record ([`MEMTABLE_RECORD`]).
fn record_key(name: &str) -> Vec<u8> {
    let mut key = MEMTABLE_RECORD.to_vec();
    key.extend_from_slice(name.as_bytes());
    key
}

/// The `meta` record of keyspace `name` created with [`sized`]`(_, limit)`: its key and value.
pub(crate) fn record(name: &str, limit: u64) -> (Vec<u8>, [u8; 8]) {
    (record_key(name), (2 * limit).to_be_bytes())
}

/// `options` with fjall's own memtable size at twice the store's `limit`: what a keyspace the
/// store creates is given, and its record says.
pub(crate) fn sized(options: fn() -> KeyspaceCreateOptions, limit: u64) -> KeyspaceCreateOptions {
    options().max_memtable_size(2 * limit)
}

/// The limit of a keyspace that existed before the store kept records: no release created a
/// keyspace with fjall's memtable size below 1 MiB (4 MiB, then 2 MiB, then 1 MiB since
/// 627d903; fjall's default 64 MiB before), so rotating at 1 MiB comes no later than fjall.
pub(crate) const UNRECORDED_LIMIT: u64 = 1024 * 1024;

/// A keyspace of the store, and what the store has added to its active memtable since it last
/// rotated it. Reads only: every write goes through a [`Batch`], which counts it; the keyspace
/// itself ([`Space::uncounted`]) is for the writes this module's docs list.
pub(crate) struct Space {
    keyspace: Keyspace,
    filled: AtomicU64,
    limit: u64,
}

impl Space {
    /// Opens (or creates, with `options` and fjall's memtable size at twice `limit`) the
    /// keyspace `name`, and seals what the journal brought back into its memtable for a flush,
    /// so that the count starts from an empty memtable. A keyspace created now is recorded in
    /// `meta` (or in itself: the `meta` keyspace; the caller persists the records); one that
    /// existed keeps the limit its record allows (half the size fjall was given), or
    /// [`UNRECORDED_LIMIT`] without a record.
    pub(crate) fn open(
        db: &Database,
        name: &str,
        options: fn() -> KeyspaceCreateOptions,
        limit: u64,
        meta: Option<&Keyspace>,
    ) -> Result<Self, fjall::Error> {
        let existed = db.keyspace_exists(name);
        let keyspace = db.keyspace(name, || sized(options, limit))?;
        let records = meta.unwrap_or(&keyspace);
        let limit = if existed {
            let given = records
                .get(record_key(name))?
                .and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok().map(u64::from_be_bytes));
            limit.min(given.map_or(UNRECORDED_LIMIT, |size| size / 2))
        } else {
            let (key, size) = record(name, limit);
            records.insert(key, size)?;
            limit
        };
        keyspace.rotate_memtable()?;
        Ok(Self {
            keyspace,
            filled: AtomicU64::new(0),
            limit,
        })
    }

    /// The value of `key`.
    pub(crate) fn get<K: AsRef<[u8]>>(&self, key: K) -> fjall::Result<Option<UserValue>> {
        self.keyspace.get(key)
    }

    /// Every item, in key order.
    pub(crate) fn iter(&self) -> Iter {
        self.keyspace.iter()
    }

    /// The items whose keys start with `prefix`, in key order.
    pub(crate) fn prefix<K: AsRef<[u8]>>(&self, prefix: K) -> Iter {
        self.keyspace.prefix(prefix)
    }

    /// The items whose keys are in `range`, in key order.
    pub(crate) fn range<K: AsRef<[u8]>, R: RangeBounds<K>>(&self, range: R) -> Iter {
        self.keyspace.range(range)
    }

    /// The item with the greatest key.
    pub(crate) fn last_key_value(&self) -> Option<Guard> {
        self.keyspace.last_key_value()
    }

    /// The keyspace itself: for a read a `Space` does not offer, or a write that does not go
    /// through a [`Batch`] (the module docs list them), which is not counted toward the next
    /// rotation.
    pub(crate) fn uncounted(&self) -> &Keyspace {
        &self.keyspace
    }

    /// The bytes of memtable at which the store rotates this keyspace's.
    #[cfg(test)]
    pub(crate) fn limit(&self) -> u64 {
        self.limit
    }

    /// Counts `bytes` added to the active memtable by a committed batch; rotates it once they
    /// reach the limit. Of two threads that cross the limit together, the first rotates and
    /// the second puts back what it took. A failed rotation (fjall's journal failing, which
    /// fails the next commit too) is not retried: fjall's own rotation remains.
    fn added(&self, bytes: u64) {
        let filled = self.filled.fetch_add(bytes, Ordering::Relaxed) + bytes;
        if filled < self.limit {
            return;
        }
        let taken = self.filled.swap(0, Ordering::Relaxed);
        if taken < self.limit {
            self.filled.fetch_add(taken, Ordering::Relaxed);
            return;
        }
        let _ = self.keyspace.rotate_memtable();
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
