//! The Merkle tree over a chain's entries: RFC 9162 section 2.1 with SHA-256 replaced by
//! BLAKE3.
//!
//! Owns: the tree hash (MTH, RFC 9162 section 2.1.1) with its leaf/node domain separation,
//! the incremental [`Frontier`] the chain writer keeps, the list of complete subtrees each
//! append finishes ([`completed_subtrees`]) so a store can persist them, O(log n) proof
//! production from persisted subtrees ([`SubtreeSource`], [`inclusion_proof`],
//! [`consistency_proof`]; RFC 9162 sections 2.1.3.1 and 2.1.4.1), and proof verification
//! ([`verify_inclusion`], [`verify_consistency`]; sections 2.1.3.2 and 2.1.4.2). It does not
//! own storage or what a leaf is: callers pass [`leaf_hash`] of each entry's 32-byte hash.
//!
//! Hashes: a leaf hash is `BLAKE3(0x00 || data)`, a node hash is `BLAKE3(0x01 || left ||
//! right)`, and the root of the empty tree is `BLAKE3("")`.
//!
//! A proof, like in RFC 9162, is checked against a root for a claimed tree size; it is the
//! signed tree head that binds a root to its size. For some sizes the same path also fits a
//! neighbouring size (e.g. leaf 0 of a 3-leaf tree has the same path shape as leaf 0 of a
//! 4-leaf tree), so never take a size from anything but the signed head.

/// A BLAKE3 digest: a leaf hash, a node hash or a tree root.
pub type Hash = [u8; 32];

/// The hash of a leaf: `BLAKE3(0x00 || data)`. In the audit log, `data` is an entry's hash.
pub fn leaf_hash(data: &[u8]) -> Hash {
    let mut hasher = blake3::Hasher::new();
    hasher.update(&[0x00]);
    hasher.update(data);
    *hasher.finalize().as_bytes()
}

/// The hash of an interior node: `BLAKE3(0x01 || l || r)`.
pub fn node_hash(l: &Hash, r: &Hash) -> Hash {
    let mut hasher = blake3::Hasher::new();
    hasher.update(&[0x01]);
    hasher.update(l);
    hasher.update(r);
    *hasher.finalize().as_bytes()
}

/// The root of the empty tree: `BLAKE3("")`.
fn empty_root() -> Hash {
    *blake3::hash(b"").as_bytes()
}

/// The largest power of two strictly smaller than `n`; `n` must be at least 2.
fn split_point(n: u64) -> u64 {
    1u64 << (63 - (n - 1).leading_zeros())
}

/// The Merkle tree hash (MTH, RFC 9162 section 2.1.1) of `leaves`, which are already leaf
/// hashes (see [`leaf_hash`]). The empty tree's root is `BLAKE3("")`.
pub fn root(leaves: &[Hash]) -> Hash {
    match leaves {
        [] => empty_root(),
        [only] => *only,
        _ => {
            // The split of a slice length always fits in usize.
            let k = split_point(leaves.len() as u64) as usize;
            let (left, right) = leaves.split_at(k);
            node_hash(&root(left), &root(right))
        }
    }
}

/// The compact range of a tree: the roots ("peaks") of the complete subtrees its leaves
/// decompose into, largest (leftmost) first, one per set bit of the size. It is what the
/// chain writer keeps to extend the tree and compute its root in O(log n) without reading
/// old leaves; persist it with [`Frontier::size`] and [`Frontier::peaks`] and restore it
/// with [`Frontier::from_parts`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Frontier {
    size: u64,
    peaks: Vec<Hash>,
}

impl Frontier {
    /// Rebuilds a frontier from its persisted parts; `None` unless `peaks` holds exactly one
    /// hash per set bit of `size`.
    pub fn from_parts(size: u64, peaks: Vec<Hash>) -> Option<Self> {
        (peaks.len() == size.count_ones() as usize).then_some(Self { size, peaks })
    }

    /// Appends a leaf hash (see [`leaf_hash`]). The subtrees this completes are reported by
    /// [`completed_subtrees`], which a store-backed writer calls before pushing.
    ///
    /// A tree of `u64::MAX` leaves is full: pushing to it leaves it unchanged.
    pub fn push(&mut self, leaf: Hash) {
        let Some(size) = self.size.checked_add(1) else {
            return;
        };
        let mut acc = leaf;
        // Each trailing one bit of the old size is a peak that the new leaf completes.
        for _ in 0..self.size.trailing_ones() {
            if let Some(peak) = self.peaks.pop() {
                acc = node_hash(&peak, &acc);
            }
        }
        self.peaks.push(acc);
        self.size = size;
    }

    /// The number of leaves pushed.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The peaks, largest (leftmost) first: one per set bit of [`Frontier::size`].
    pub fn peaks(&self) -> &[Hash] {
        &self.peaks
    }

    /// The tree's root, equal to [`root`] over every pushed leaf: the peaks folded from the
    /// smallest (rightmost) to the largest as `node_hash(peak, acc)`.
    pub fn root(&self) -> Hash {
        let mut peaks = self.peaks.iter().rev();
        let Some(last) = peaks.next() else {
            return empty_root();
        };
        peaks.fold(*last, |acc, peak| node_hash(peak, &acc))
    }
}

/// The complete subtrees of level 1 or more that appending `leaf` to the tree of
/// `frontier_before` finishes, as `(level, index, hash)` in increasing level, where
/// `(level, index)` covers leaves `[index * 2^level, (index + 1) * 2^level)` as in
/// [`SubtreeSource`]. A store-backed writer persists these (and the leaf itself at level 0)
/// and then calls [`Frontier::push`]; together they make every complete subtree of the tree
/// available to proofs. Empty unless `size_after_push == frontier_before.size() + 1`.
pub fn completed_subtrees(
    size_after_push: u64,
    leaf: Hash,
    frontier_before: &Frontier,
) -> Vec<(u32, u64, Hash)> {
    let old = frontier_before.size;
    if old.checked_add(1) != Some(size_after_push) {
        return Vec::new();
    }
    let mut done = Vec::new();
    let mut acc = leaf;
    let mut peaks = frontier_before.peaks.iter().rev();
    for level in 1..=old.trailing_ones() {
        let Some(peak) = peaks.next() else {
            break;
        };
        acc = node_hash(peak, &acc);
        done.push((level, old >> level, acc));
    }
    done
}

/// Where proofs get the hashes of complete subtrees, e.g. a store that persisted
/// [`completed_subtrees`] and the leaf hashes.
pub trait SubtreeSource {
    /// The root of the complete subtree covering leaves `[index * 2^level, (index + 1) *
    /// 2^level)`; level 0 is the leaf hashes. `None` if it is not known (not yet complete,
    /// or missing).
    fn subtree(&self, level: u32, index: u64) -> Option<Hash>;
}

/// A slice of leaf hashes, computing each subtree from its leaves (O(2^level); fine for
/// tests and small trees).
impl SubtreeSource for [Hash] {
    fn subtree(&self, level: u32, index: u64) -> Option<Hash> {
        let width = 1u64.checked_shl(level)?;
        let start = index.checked_mul(width)?;
        let end = start.checked_add(width)?;
        let start = usize::try_from(start).ok()?;
        let end = usize::try_from(end).ok()?;
        self.get(start..end).map(root)
    }
}

/// The MTH of leaves `[start, end)`, from O(log n) complete subtrees when `start` is a
/// multiple of the range's largest power-of-two part (as every range a proof needs is).
/// The root of the first `size` leaves, from complete subtrees (O(log n) lookups). The empty
/// tree's root for size 0.
pub fn root_at<S: SubtreeSource + ?Sized>(src: &S, size: u64) -> Option<Hash> {
    if size == 0 {
        return Some(*blake3::hash(b"").as_bytes());
    }
    range_hash(src, 0, size)
}

fn range_hash<S: SubtreeSource + ?Sized>(src: &S, start: u64, end: u64) -> Option<Hash> {
    let n = end.checked_sub(start)?;
    if n == 0 {
        return None;
    }
    if n.is_power_of_two() && start.is_multiple_of(n) {
        return src.subtree(n.trailing_zeros(), start / n);
    }
    let k = if n.is_power_of_two() {
        n / 2
    } else {
        split_point(n)
    };
    let left = range_hash(src, start, start + k)?;
    let right = range_hash(src, start + k, end)?;
    Some(node_hash(&left, &right))
}

/// The inclusion proof (PATH, RFC 9162 section 2.1.3.1) of leaf `index` in the tree of the
/// first `size` leaves of `src`, leaf-side first. `None` if `index >= size` or `src` lacks a
/// subtree the proof needs. Reads O(log size) subtrees.
pub fn inclusion_proof(
    src: &(impl SubtreeSource + ?Sized),
    index: u64,
    size: u64,
) -> Option<Vec<Hash>> {
    if index >= size {
        return None;
    }
    let (mut start, mut end) = (0u64, size);
    let mut path = Vec::new();
    while end - start > 1 {
        let k = split_point(end - start);
        if index < start + k {
            path.push(range_hash(src, start + k, end)?);
            end = start + k;
        } else {
            path.push(range_hash(src, start, start + k)?);
            start += k;
        }
    }
    path.reverse();
    Some(path)
}

/// The consistency proof (PROOF/SUBPROOF, RFC 9162 section 2.1.4.1) that the tree of the
/// first `old_size` leaves of `src` is a prefix of the tree of the first `new_size`.
/// Empty when `old_size == new_size` or `old_size == 0` (cases RFC 9162 leaves open; see
/// [`verify_consistency`]). `None` if `old_size > new_size` or `src` lacks a subtree the
/// proof needs. Reads O(log new_size) subtrees.
pub fn consistency_proof(
    src: &(impl SubtreeSource + ?Sized),
    old_size: u64,
    new_size: u64,
) -> Option<Vec<Hash>> {
    if old_size > new_size {
        return None;
    }
    if old_size == 0 || old_size == new_size {
        return Some(Vec::new());
    }
    let (mut start, mut end) = (0u64, new_size);
    // True while the current subtree starts at leaf 0, i.e. is a tree the verifier knows.
    let mut whole = true;
    let mut proof = Vec::new();
    while old_size != end {
        let k = split_point(end - start);
        if old_size <= start + k {
            proof.push(range_hash(src, start + k, end)?);
            end = start + k;
        } else {
            proof.push(range_hash(src, start, start + k)?);
            start += k;
            whole = false;
        }
    }
    if !whole {
        proof.push(range_hash(src, start, end)?);
    }
    proof.reverse();
    Some(proof)
}

/// Whether `proof` shows that the leaf whose leaf hash is `leaf` is leaf `index` of the tree
/// of `size` leaves with root `root` (RFC 9162 section 2.1.3.2). Never panics.
pub fn verify_inclusion(leaf: &Hash, index: u64, size: u64, proof: &[Hash], root: &Hash) -> bool {
    if index >= size {
        return false;
    }
    let (mut f, mut s) = (index, size - 1);
    let mut r = *leaf;
    for p in proof {
        if s == 0 {
            return false;
        }
        if f & 1 == 1 || f == s {
            r = node_hash(p, &r);
            while f & 1 == 0 && f != 0 {
                f >>= 1;
                s >>= 1;
            }
        } else {
            r = node_hash(&r, p);
        }
        f >>= 1;
        s >>= 1;
    }
    s == 0 && r == *root
}

/// Whether `proof` shows that the tree of `old_size` leaves with root `old_root` is a prefix
/// of the tree of `new_size` leaves with root `new_root` (RFC 9162 section 2.1.4.2).
///
/// Beyond RFC 9162, which covers `0 < old_size < new_size`: equal sizes need an empty proof
/// and equal roots, and `old_size == 0` needs an empty proof and `old_root` equal to the
/// empty tree's root. Never panics.
pub fn verify_consistency(
    old_size: u64,
    new_size: u64,
    old_root: &Hash,
    new_root: &Hash,
    proof: &[Hash],
) -> bool {
    if old_size > new_size {
        return false;
    }
    if old_size == 0 {
        return proof.is_empty() && *old_root == empty_root();
    }
    if old_size == new_size {
        return proof.is_empty() && old_root == new_root;
    }
    let Some((first, rest)) = proof.split_first() else {
        return false;
    };
    // A power-of-two old tree is a node of the new one: the proof starts at its root.
    let (start, rest) = if old_size.is_power_of_two() {
        (old_root, proof)
    } else {
        (first, rest)
    };
    let (mut f, mut s) = (old_size - 1, new_size - 1);
    while f & 1 == 1 {
        f >>= 1;
        s >>= 1;
    }
    let (mut fr, mut sr) = (*start, *start);
    for c in rest {
        if s == 0 {
            return false;
        }
        if f & 1 == 1 || f == s {
            fr = node_hash(c, &fr);
            sr = node_hash(c, &sr);
            while f & 1 == 0 && f != 0 {
                f >>= 1;
                s >>= 1;
            }
        } else {
            sr = node_hash(&sr, c);
        }
        f >>= 1;
        s >>= 1;
    }
    s == 0 && fr == *old_root && sr == *new_root
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::collections::HashMap;

    use proptest::prelude::*;

    use super::*;

    /// The subtrees a store-backed writer persisted: level 0 leaves and every completed
    /// subtree.
    impl SubtreeSource for HashMap<(u32, u64), Hash> {
        fn subtree(&self, level: u32, index: u64) -> Option<Hash> {
            self.get(&(level, index)).copied()
        }
    }

    fn raw(prefix: u8, parts: &[&[u8]]) -> Hash {
        let mut h = blake3::Hasher::new();
        h.update(&[prefix]);
        for p in parts {
            h.update(p);
        }
        *h.finalize().as_bytes()
    }

    /// Leaf hashes of distinct data; `seed` varies the tree between proptest cases.
    fn leaves(seed: u64, n: u64) -> Vec<Hash> {
        (0..n)
            .map(|i| {
                let mut data = [0u8; 32];
                data[..8].copy_from_slice(&seed.to_le_bytes());
                data[8..16].copy_from_slice(&i.to_le_bytes());
                leaf_hash(&data)
            })
            .collect()
    }

    fn flip(h: &Hash, byte: usize) -> Hash {
        let mut out = *h;
        out[byte % 32] ^= 1;
        out
    }

    /// Directions of PATH(m, D[n]) straight from the recursive RFC definition, leaf-side
    /// first: true when the sibling is on the left. Two (index, size) pairs accept the same
    /// proof exactly when these agree.
    fn path_shape(m: u64, n: u64) -> Vec<bool> {
        if n <= 1 {
            return Vec::new();
        }
        let k = split_point(n);
        let mut out = if m < k {
            path_shape(m, k)
        } else {
            path_shape(m - k, n - k)
        };
        out.push(m >= k);
        out
    }

    /// The verifier's program for PROOF(m, D[n]) from the recursive RFC definition: whether
    /// the old root is its first value (not sent), then per sent value whether it is a left
    /// sibling (hashed into both roots) or a right one (new root only).
    fn consistency_shape(m: u64, n: u64) -> Option<(bool, Vec<bool>)> {
        fn sub(m: u64, n: u64, whole: bool, out: &mut Vec<bool>) -> bool {
            if m == n {
                return whole;
            }
            let k = split_point(n);
            let starts_with_old = if m <= k {
                sub(m, k, whole, out)
            } else {
                sub(m - k, n - k, false, out)
            };
            out.push(m > k);
            starts_with_old
        }
        if m == 0 || m > n {
            return None;
        }
        let mut out = Vec::new();
        let starts_with_old = sub(m, n, true, &mut out);
        Some((starts_with_old, out))
    }

    /// RFC 9162 section 2.1.5's example tree of seven leaves d0..d6.
    #[test]
    fn rfc_example_tree_by_hand() {
        let d: Vec<[u8; 32]> = (0u8..7).map(|i| [i; 32]).collect();
        let [a, b, c, dd, e, f, j] = [0, 1, 2, 3, 4, 5, 6].map(|i| raw(0, &[&d[i]]));
        let g = raw(1, &[&a, &b]);
        let h = raw(1, &[&c, &dd]);
        let i = raw(1, &[&e, &f]);
        let k = raw(1, &[&g, &h]);
        let l = raw(1, &[&i, &j]);
        let top = raw(1, &[&k, &l]);
        let hashed: Vec<Hash> = d.iter().map(|x| leaf_hash(x)).collect();
        assert_eq!(hashed, vec![a, b, c, dd, e, f, j]);

        assert_eq!(root(&[]), *blake3::hash(b"").as_bytes());
        assert_eq!(root(&hashed[..1]), a);
        assert_eq!(root(&hashed[..2]), g);
        assert_eq!(root(&hashed[..3]), raw(1, &[&g, &c]));
        assert_eq!(root(&hashed), top);
        assert_eq!(node_hash(&k, &l), top);

        let src: &[Hash] = &hashed;
        assert_eq!(inclusion_proof(src, 0, 7), Some(vec![b, h, l]));
        assert_eq!(inclusion_proof(src, 3, 7), Some(vec![c, g, l]));
        assert_eq!(inclusion_proof(src, 4, 7), Some(vec![f, j, k]));
        assert_eq!(inclusion_proof(src, 6, 7), Some(vec![i, k]));
        assert_eq!(inclusion_proof(src, 0, 1), Some(vec![]));
        assert_eq!(inclusion_proof(src, 2, 3), Some(vec![g]));
        assert_eq!(inclusion_proof(src, 7, 7), None);
        assert!(verify_inclusion(&j, 6, 7, &[i, k], &top));
        assert!(verify_inclusion(&a, 0, 1, &[], &a));

        assert_eq!(consistency_proof(src, 3, 7), Some(vec![c, dd, g, l]));
        assert_eq!(consistency_proof(src, 4, 7), Some(vec![l]));
        assert_eq!(consistency_proof(src, 6, 7), Some(vec![i, j, k]));
        assert_eq!(consistency_proof(src, 7, 7), Some(vec![]));
        assert_eq!(consistency_proof(src, 0, 7), Some(vec![]));
        assert_eq!(consistency_proof(src, 8, 7), None);
        let root3 = raw(1, &[&g, &c]);
        let root6 = raw(1, &[&k, &i]);
        assert!(verify_consistency(3, 7, &root3, &top, &[c, dd, g, l]));
        assert!(verify_consistency(4, 7, &k, &top, &[l]));
        assert!(verify_consistency(6, 7, &root6, &top, &[i, j, k]));
        assert!(verify_consistency(7, 7, &top, &top, &[]));
        assert!(verify_consistency(0, 7, &root(&[]), &top, &[]));
        assert!(!verify_consistency(0, 7, &top, &top, &[]));
        assert!(!verify_consistency(7, 7, &top, &top, &[l]));
        assert!(!verify_consistency(3, 7, &root3, &top, &[]));

        // The root, not the proof, pins the size: these paths fit two sizes each.
        let root4 = raw(1, &[&g, &h]);
        assert!(verify_inclusion(&a, 0, 3, &[b, c], &root3));
        assert!(verify_inclusion(&a, 0, 4, &[b, c], &root3));
        assert!(verify_consistency(2, 4, &g, &root4, &[h]));
        assert!(verify_consistency(2, 3, &g, &root4, &[h]));
    }

    #[test]
    fn frontier_root_matches_mth() {
        let all = leaves(7, 70);
        let mut frontier = Frontier::default();
        assert_eq!(frontier.root(), root(&[]));
        for n in 0..=70u64 {
            assert_eq!(frontier.size(), n);
            assert_eq!(frontier.root(), root(&all[..n as usize]), "size {n}");
            assert_eq!(frontier.peaks().len(), n.count_ones() as usize);
            let restored = Frontier::from_parts(n, frontier.peaks().to_vec());
            assert_eq!(restored.as_ref(), Some(&frontier));
            if (n + 1).count_ones() != n.count_ones() {
                assert!(Frontier::from_parts(n + 1, frontier.peaks().to_vec()).is_none());
            }
            if let Some(&leaf) = all.get(n as usize) {
                frontier.push(leaf);
            }
        }
        assert!(Frontier::from_parts(3, vec![[0; 32]]).is_none());
        assert!(Frontier::from_parts(0, vec![[0; 32]]).is_none());
    }

    #[test]
    fn full_frontier_ignores_push() {
        let mut full = Frontier::from_parts(u64::MAX, vec![[1; 32]; 64]).unwrap();
        let before = full.clone();
        full.push([2; 32]);
        assert_eq!(full, before);
        let _ = full.root();
        assert!(completed_subtrees(0, [2; 32], &full).is_empty());
    }

    #[test]
    fn completed_subtrees_serve_the_same_proofs() {
        const N: u64 = 70;
        let all = leaves(3, N);
        let slice: &[Hash] = &all;
        let mut store: HashMap<(u32, u64), Hash> = HashMap::new();
        let mut frontier = Frontier::default();
        for (i, &leaf) in all.iter().enumerate() {
            let i = i as u64;
            assert!(completed_subtrees(i + 2, leaf, &frontier).is_empty());
            assert!(completed_subtrees(i, leaf, &frontier).is_empty());
            let done = completed_subtrees(i + 1, leaf, &frontier);
            assert_eq!(done.len() as u32, i.trailing_ones());
            store.insert((0, i), leaf);
            for (level, index, hash) in done {
                assert_eq!(Some(hash), slice.subtree(level, index));
                assert!(store.insert((level, index), hash).is_none());
            }
            frontier.push(leaf);
        }
        // Every complete subtree of the 70-leaf tree, and nothing else.
        let expected: u64 = (0..7).map(|level| N >> level).sum();
        assert_eq!(store.len() as u64, expected);
        for size in 0..=N {
            for index in 0..=size {
                assert_eq!(
                    inclusion_proof(&store, index, size),
                    inclusion_proof(slice, index, size)
                );
            }
            for old in 0..=size + 1 {
                assert_eq!(
                    consistency_proof(&store, old, size),
                    consistency_proof(slice, old, size)
                );
            }
        }
        // A proof for a tree the store does not hold yet.
        assert_eq!(inclusion_proof(&store, 0, N + 1), None);
        assert_eq!(consistency_proof(&store, 3, N + 1), None);
    }

    /// A virtual tree with every leaf equal, so any subtree's hash depends only on its
    /// level: exercises proofs at sizes near `u64::MAX`.
    struct Uniform(Vec<Hash>);

    impl Uniform {
        fn new() -> Self {
            let mut levels = vec![leaf_hash(b"same")];
            for _ in 0..64 {
                let below = levels[levels.len() - 1];
                levels.push(node_hash(&below, &below));
            }
            Self(levels)
        }
    }

    impl SubtreeSource for Uniform {
        fn subtree(&self, level: u32, _index: u64) -> Option<Hash> {
            self.0.get(level as usize).copied()
        }
    }

    #[test]
    fn huge_trees() {
        let src = Uniform::new();
        let leaf = src.0[0];
        for size in [u64::MAX, u64::MAX - 1, 1 << 63, (1 << 63) + 1, 1 << 40] {
            let top = range_hash(&src, 0, size).unwrap();
            for index in [0, 1, size / 2, size - 2, size - 1] {
                let proof = inclusion_proof(&src, index, size).unwrap();
                assert!(verify_inclusion(&leaf, index, size, &proof, &top));
            }
            for old in [1, 2, 3, size / 3, size - 1] {
                let old_root = range_hash(&src, 0, old).unwrap();
                let proof = consistency_proof(&src, old, size).unwrap();
                assert!(verify_consistency(old, size, &old_root, &top, &proof));
            }
        }
        assert!(!verify_inclusion(&leaf, u64::MAX, u64::MAX, &[], &leaf));
        assert!(!verify_consistency(
            u64::MAX,
            u64::MAX - 1,
            &leaf,
            &leaf,
            &[]
        ));
    }

    /// Sizes to try in place of `x`: its neighbours and a few far values.
    fn nearby(x: u64) -> Vec<u64> {
        let mut out: Vec<u64> = (x.saturating_sub(3)..=x + 3).collect();
        out.extend([0, 1, 2 * x, x.next_power_of_two(), u64::MAX]);
        out.retain(|&y| y != x);
        out
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn inclusion_proofs_verify_and_bind(
            seed in any::<u64>(),
            size in 1u64..300,
            index_pick in any::<u64>(),
            byte in 0usize..32,
        ) {
            let all = leaves(seed, size);
            let index = index_pick % size;
            let top = root(&all);
            let leaf = all[index as usize];
            let proof = inclusion_proof(all.as_slice(), index, size).unwrap();
            prop_assert!(verify_inclusion(&leaf, index, size, &proof, &top));

            for pos in 0..proof.len() {
                let mut bad = proof.clone();
                bad[pos] = flip(&bad[pos], byte);
                prop_assert!(!verify_inclusion(&leaf, index, size, &bad, &top));
            }
            prop_assert!(!verify_inclusion(&flip(&leaf, byte), index, size, &proof, &top));
            prop_assert!(!verify_inclusion(&leaf, index, size, &proof, &flip(&top, byte)));
            if !proof.is_empty() {
                prop_assert!(!verify_inclusion(&leaf, index, size, &proof[1..], &top));
                prop_assert!(!verify_inclusion(
                    &leaf, index, size, &proof[..proof.len() - 1], &top));
            }
            let mut longer = proof.clone();
            longer.push(top);
            prop_assert!(!verify_inclusion(&leaf, index, size, &longer, &top));

            // Another index never fits; another size fits only where RFC 9162's path has
            // the same shape (the root, not the proof, pins the size).
            for other in nearby(index) {
                prop_assert!(!verify_inclusion(&leaf, other, size, &proof, &top));
            }
            let shape = path_shape(index, size);
            for other in nearby(size) {
                let fits = other > index && path_shape(index, other) == shape;
                prop_assert_eq!(
                    verify_inclusion(&leaf, index, other, &proof, &top), fits,
                    "size {} as {}", size, other);
            }
        }

        #[test]
        fn consistency_proofs_verify_and_bind(
            seed in any::<u64>(),
            new_size in 1u64..300,
            old_pick in any::<u64>(),
            byte in 0usize..32,
        ) {
            let all = leaves(seed, new_size);
            let old_size = 1 + old_pick % new_size;
            let old_root = root(&all[..old_size as usize]);
            let new_root = root(&all);
            let proof = consistency_proof(all.as_slice(), old_size, new_size).unwrap();
            prop_assert!(verify_consistency(old_size, new_size, &old_root, &new_root, &proof));

            for pos in 0..proof.len() {
                let mut bad = proof.clone();
                bad[pos] = flip(&bad[pos], byte);
                prop_assert!(!verify_consistency(old_size, new_size, &old_root, &new_root, &bad));
            }
            let bad_old = flip(&old_root, byte);
            let bad_new = flip(&new_root, byte);
            prop_assert!(!verify_consistency(old_size, new_size, &bad_old, &new_root, &proof));
            prop_assert!(!verify_consistency(old_size, new_size, &old_root, &bad_new, &proof));
            if !proof.is_empty() {
                let (head, tail) = (&proof[1..], &proof[..proof.len() - 1]);
                prop_assert!(!verify_consistency(old_size, new_size, &old_root, &new_root, head));
                prop_assert!(!verify_consistency(old_size, new_size, &old_root, &new_root, tail));
            }
            let mut longer = proof.clone();
            longer.push(new_root);
            prop_assert!(!verify_consistency(old_size, new_size, &old_root, &new_root, &longer));

            // Other sizes fit only where RFC 9162's proof has the same shape.
            let shape = consistency_shape(old_size, new_size);
            for other in nearby(old_size) {
                let fits = consistency_shape(other, new_size) == shape;
                prop_assert_eq!(
                    verify_consistency(other, new_size, &old_root, &new_root, &proof), fits,
                    "old size {} as {}", old_size, other);
            }
            for other in nearby(new_size) {
                let fits = consistency_shape(old_size, other) == shape;
                prop_assert_eq!(
                    verify_consistency(old_size, other, &old_root, &new_root, &proof), fits,
                    "new size {} as {}", new_size, other);
            }
        }

        #[test]
        fn verifiers_never_panic(
            a in prop_oneof![any::<u64>(), 0u64..70, (u64::MAX - 70)..=u64::MAX],
            b in prop_oneof![any::<u64>(), 0u64..70, (u64::MAX - 70)..=u64::MAX],
            proof in prop::collection::vec(any::<[u8; 32]>(), 0..80),
            r1 in any::<[u8; 32]>(),
            r2 in any::<[u8; 32]>(),
        ) {
            let _ = verify_inclusion(&r1, a, b, &proof, &r2);
            let _ = verify_inclusion(&r1, b, a, &proof, &r2);
            let _ = verify_consistency(a, b, &r1, &r2, &proof);
            let _ = verify_consistency(b, a, &r1, &r2, &proof);
            let _ = verify_consistency(a.min(b), a.max(b), &r1, &r2, &proof);
        }
    }
}
