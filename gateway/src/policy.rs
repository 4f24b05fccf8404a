//! The policy decision: one pure function, default deny (specs/protocol.md, "Policy").
//! A policy engine replaces the body of [`Policy::decide`] later; callers do not change.

use std::collections::{BTreeMap, HashSet};

use didgate_protocol::Did;

use crate::config::Rule;

/// The decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// A rule allows the call.
    Allow,
    /// No rule allows it.
    Deny,
}

/// Compiled rules.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    rules: Vec<CompiledRule>,
    known: HashSet<String>,
}

#[derive(Debug, Clone)]
struct CompiledRule {
    principals: HashSet<String>,
    upstream: String,
    methods: Vec<String>,
    paths: Vec<String>,
}

impl Policy {
    /// Compiles rules, expanding groups.
    pub fn new(rules: &[Rule], groups: &BTreeMap<String, Vec<String>>) -> Self {
        let mut known = HashSet::new();
        let compiled = rules
            .iter()
            .map(|r| {
                let mut principals = HashSet::new();
                for p in &r.principals {
                    match p.strip_prefix("group:") {
                        Some(g) => principals.extend(groups.get(g).into_iter().flatten().cloned()),
                        None => {
                            principals.insert(p.clone());
                        }
                    }
                }
                known.extend(principals.iter().cloned());
                CompiledRule {
                    principals,
                    upstream: r.upstream.clone(),
                    methods: r.methods.clone(),
                    paths: r.paths.clone(),
                }
            })
            .collect();
        for members in groups.values() {
            known.extend(members.iter().cloned());
        }
        Self {
            rules: compiled,
            known,
        }
    }

    /// Whether policy names this DID at all (its refusals are audited one by one).
    pub fn knows(&self, did: &Did) -> bool {
        self.known.contains(did.as_str())
    }

    /// Decides the exact (DID, upstream, method, path). Default deny.
    pub fn decide(&self, did: &Did, upstream: &str, method: &str, path: &str) -> Decision {
        let allowed = self.rules.iter().any(|r| {
            r.upstream == upstream
                && r.principals.contains(did.as_str())
                && r.methods.iter().any(|m| m == method)
                && r.paths.iter().any(|p| path_matches(p, path))
        });
        if allowed {
            Decision::Allow
        } else {
            Decision::Deny
        }
    }
}

/// Matches a path against a pattern: literal segments, `*` for exactly one non-empty segment,
/// and a final `**` for one or more remaining segments.
pub fn path_matches(pattern: &str, path: &str) -> bool {
    let mut pat = pattern.split('/');
    let mut segs = path.split('/');
    loop {
        match (pat.next(), segs.next()) {
            (None, None) => return true,
            (Some("**"), Some(s)) => return !s.is_empty() && pat.next().is_none(),
            (Some("*"), Some(s)) => {
                if s.is_empty() {
                    return false;
                }
            }
            (Some(p), Some(s)) => {
                if p != s {
                    return false;
                }
            }
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use didgate_protocol::Identity;

    #[test]
    fn patterns() {
        assert!(path_matches("/v1/charges", "/v1/charges"));
        assert!(!path_matches("/v1/charges", "/v1/charges/x"));
        assert!(path_matches("/v1/charges/*", "/v1/charges/ch_1"));
        assert!(!path_matches("/v1/charges/*", "/v1/charges/"));
        assert!(!path_matches("/v1/charges/*", "/v1/charges/a/b"));
        assert!(path_matches("/v1/**", "/v1/a/b"));
        assert!(!path_matches("/v1/**", "/v1"));
        assert!(!path_matches("/v1/**", "/v2/a"));
    }

    #[test]
    fn truth_table() {
        let a = Identity::from_seed(&[1; 32]);
        let b = Identity::from_seed(&[2; 32]);
        let rule = |who: &str, m: &str| Rule {
            principals: vec![who.into()],
            upstream: "pay".into(),
            methods: vec![m.into()],
            paths: vec!["/v1/*".into()],
        };
        // empty rule set denies everyone
        assert_eq!(
            Policy::new(&[], &BTreeMap::new()).decide(a.did(), "pay", "GET", "/v1/x"),
            Decision::Deny
        );
        let mut groups = BTreeMap::new();
        groups.insert("g".to_string(), vec![b.did().to_string()]);
        let p = Policy::new(
            &[rule(a.did().as_str(), "GET"), rule("group:g", "POST")],
            &groups,
        );
        assert_eq!(p.decide(a.did(), "pay", "GET", "/v1/x"), Decision::Allow);
        assert_eq!(p.decide(a.did(), "pay", "POST", "/v1/x"), Decision::Deny);
        assert_eq!(p.decide(b.did(), "pay", "POST", "/v1/x"), Decision::Allow);
        assert_eq!(p.decide(b.did(), "other", "POST", "/v1/x"), Decision::Deny);
        assert_eq!(p.decide(a.did(), "pay", "GET", "/v2/x"), Decision::Deny);
        assert!(p.knows(b.did()));
        assert!(!p.knows(Identity::from_seed(&[3; 32]).did()));
    }
}
