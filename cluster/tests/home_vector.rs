//! `specs/vectors/home.json` (specs/protocol.md, "Home nodes"): the cluster's rendezvous
//! hashing gives every score and home the vector holds.

use std::path::Path;

use didgate_cluster::{Member, home};

fn member(name: &str) -> Member {
    Member {
        node: name.into(),
        key: String::new(),
        gateway: String::new(),
        address: String::new(),
        lease: 0,
        lease_ttl_secs: 0,
        joined_ms: 0,
    }
}

#[test]
fn the_home_vector_is_what_the_cluster_computes() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../specs/vectors/home.json");
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).expect("the vector")).expect("json");
    assert_eq!(v["context"], home::HOME_CONTEXT);
    for s in v["scores"].as_array().expect("scores") {
        let m = member(s["node"].as_str().expect("node"));
        let did = s["did"].as_str().expect("did");
        assert_eq!(hex::encode(home::score(&m, did)), s["score"], "{did}");
    }
    let all = [member("node-1"), member("node-2"), member("node-3")];
    for h in v["homes"].as_array().expect("homes") {
        let did = h["did"].as_str().expect("did");
        assert_eq!(
            home::home(did, &all).map(|m| m.node.as_str()),
            h["home_of_all_three"].as_str()
        );
        assert_eq!(
            home::home(did, &all[..2]).map(|m| m.node.as_str()),
            h["home_of_node_1_and_node_2"].as_str()
        );
    }
}
