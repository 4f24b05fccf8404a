//! The etcd key layout of a cluster (specs/operation.md, "Cluster", "Keys in etcd"). Every key
//! is under `/didgate/CLUSTER/`.

/// The prefix of every key of cluster `name`.
pub fn root(name: &str) -> String {
    format!("/didgate/{name}/")
}

/// The prefix of the members: `/didgate/CLUSTER/members/`.
pub fn members(name: &str) -> String {
    format!("{}members/", root(name))
}

/// A member's key: `/didgate/CLUSTER/members/NODE` (its value a [`crate::Member`] as JSON,
/// attached to the node's lease).
pub fn member(name: &str, node: &str) -> String {
    format!("{}{node}", members(name))
}

/// The prefix of the handovers of members that left on purpose: `/didgate/CLUSTER/handovers/`.
pub fn handovers(name: &str) -> String {
    format!("{}handovers/", root(name))
}

/// A leaving member's handover: `/didgate/CLUSTER/handovers/NODE` (its value a
/// [`crate::home::Handover`] as JSON, on a lease of its own), put in the transaction that
/// deletes the member's key.
pub fn handover(name: &str, node: &str) -> String {
    format!("{}{node}", handovers(name))
}

/// The prefix of the revocations: `/didgate/CLUSTER/revoked/`.
pub fn revocations(name: &str) -> String {
    format!("{}revoked/", root(name))
}

/// A revocation's key: the prefix and the lower-case hex of the gateway's revocation key
/// (`d` || DID text, or `g` || grant id: operation.md, "Revocation"); its value is the reason.
pub fn revocation(name: &str, key: &[u8]) -> String {
    format!("{}{}", revocations(name), hex::encode(key))
}

/// The revocation key a revocation's etcd key names, if it is one.
pub fn revocation_key(name: &str, etcd_key: &[u8]) -> Option<Vec<u8>> {
    let prefix = revocations(name);
    let rest = etcd_key.strip_prefix(prefix.as_bytes())?;
    hex::decode(rest).ok()
}

/// The prefix of the published documents of `kind` (`policy`, `upstreams`):
/// `/didgate/CLUSTER/KIND/sets/`.
pub fn document_sets(name: &str, kind: &str) -> String {
    format!("{}{kind}/sets/", root(name))
}

/// A document's key: the prefix and the lower-case hex of its hash.
pub fn document_set(name: &str, kind: &str, hash: &[u8; 32]) -> String {
    format!("{}{}", document_sets(name, kind), hex::encode(hash))
}

/// The key naming the document of `kind` in force: `/didgate/CLUSTER/KIND/current` (its value
/// the hex hash of a document under [`document_sets`]).
pub fn document_current(name: &str, kind: &str) -> String {
    format!("{}{kind}/current", root(name))
}

/// The prefix of the gateway's node revocation lists: `/didgate/CLUSTER/node-revocations/`.
pub fn node_revocations(name: &str) -> String {
    format!("{}node-revocations/", root(name))
}

/// A node revocation list's key: the prefix and its `seq` as 20 decimal digits (so keys sort
/// by `seq`); its value the list's COSE_Sign1 bytes as the gateway signed them.
pub fn node_revocation_list(name: &str, seq: u64) -> String {
    format!("{}{seq:020}", node_revocations(name))
}

/// The prefix of the registry of node chains: `/didgate/CLUSTER/chains/`.
pub fn chains(name: &str) -> String {
    format!("{}chains/", root(name))
}

/// A node's latest signed checkpoint: `/didgate/CLUSTER/chains/NODE` (COSE_Sign1 bytes as the
/// node signed them).
pub fn chain(name: &str, node: &str) -> String {
    format!("{}{node}", chains(name))
}

/// The prefix of the sealed secrets: `/didgate/CLUSTER/secrets/`.
pub fn secrets(name: &str) -> String {
    format!("{}secrets/", root(name))
}

/// A sealed secret's key: `/didgate/CLUSTER/secrets/NAME` (its value the secret's record as
/// the nodes store it: ciphertexts and wrapped data keys only).
pub fn secret(name: &str, secret: &str) -> String {
    format!("{}{secret}", secrets(name))
}

/// The id of the master key every node wraps secrets under: `/didgate/CLUSTER/master-key`
/// (lower-case hex of the 8-byte key id; never the key).
pub fn master_key(name: &str) -> String {
    format!("{}master-key", root(name))
}

/// The prefix of the nodes' published demand: `/didgate/CLUSTER/load/`.
pub fn loads(name: &str) -> String {
    format!("{}load/", root(name))
}

/// A node's demand on the rate-limited upstreams: `/didgate/CLUSTER/load/NODE` (JSON, under
/// the node's lease: [`crate::shares`]).
pub fn load(name: &str, node: &str) -> String {
    format!("{}{node}", loads(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn revocation_keys_round_trip_and_stay_in_their_cluster() {
        let k = revocation("prod", b"ddid:key:z6Mk");
        assert_eq!(k, "/didgate/prod/revoked/646469643a6b65793a7a364d6b");
        assert_eq!(
            revocation_key("prod", k.as_bytes()),
            Some(b"ddid:key:z6Mk".to_vec())
        );
        assert_eq!(revocation_key("test", k.as_bytes()), None);
        assert_eq!(member("prod", "n1"), "/didgate/prod/members/n1");
    }
}
