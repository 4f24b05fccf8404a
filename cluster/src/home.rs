//! Which node is a caller's home, and since when (specs/operation.md, "Cluster", "Home
//! nodes"). Pure over the members and `now`: the plane feeds every membership it reads; the
//! gateway asks where a caller's call belongs before it claims anything.
//!
//! Every claim of a call (its replay key, its grant, its client head) belongs to one caller,
//! so one node judges them all: the caller's **home**, chosen by rendezvous hashing over the
//! live members ([`home`]), so that a member joining or leaving moves only the callers it
//! gains or had. A node that becomes a caller's home refuses that caller's requests stamped
//! before the previous home can no longer have claimed any ([`Homes::route`]): a request the
//! previous home executed cannot execute again here.
//!
//! A node that leaves on purpose hands over first ([`Homes::leave`]): it stops admitting and
//! publishes, for every caller whose requests it admitted within the clock window, the latest
//! stamp it admitted ([`Handover`]). The next home refuses only requests stamped at or before
//! it, instead of every request for the whole window: a caller's fresh requests pass at once.

use std::collections::{BTreeMap, HashMap, VecDeque};

use serde::{Deserialize, Serialize};

use crate::Member;

/// The most callers a [`Handover`] names one by one; past it, or past [`MAX_MARK_BYTES`], a
/// leaving node hands over one fence for all its callers (its latest admitted stamp, plus one).
pub const MAX_MARKS: usize = 10_000;

/// The most bytes of caller DIDs a [`Handover`] names (etcd refuses a request over 1.5 MiB).
pub const MAX_MARK_BYTES: usize = 512 * 1024;

/// What a node leaving on purpose hands to its callers' next homes, published in etcd in the
/// same transaction that deletes its member key (specs/operation.md, "Cluster", "Planned
/// leave"): requests of a caller it was home to stamped before [`Handover::fence`] are refused
/// `handover` by the next home. Every request the node admitted (and so every replay key and
/// client head it may have claimed) was stamped before that fence.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Handover {
    /// The leaving member's name.
    pub node: String,
    /// The lease of the registration it ends (the member key's `lease`): a handover is taken
    /// only for the member registered under that lease, never for a later run of the node.
    pub lease: i64,
    /// For every caller: requests stamped before it (wall clock, ms; 0 for none) are
    /// refused. The end of the handover windows still open at the leaving node when it left
    /// (it may have gained callers whose previous home claimed until then), or, when it
    /// admitted requests of more than [`MAX_MARKS`] callers within the clock window, its
    /// latest admitted stamp plus one.
    pub fence_ms: u64,
    /// The latest stamp (ms) of a request of each caller (DID text) it admitted within the
    /// clock window: that caller's requests stamped at or before it are refused.
    pub marks: BTreeMap<String, u64>,
    /// Until when (wall clock, ms) it executes, while it drains, the grants it issued (0: it
    /// does not): other nodes send their execution to it until then.
    #[serde(default)]
    pub grants_until_ms: u64,
}

impl Handover {
    /// Requests of `did` stamped before the returned time are refused by its next home;
    /// `None` when none need be.
    pub fn fence(&self, did: &str) -> Option<u64> {
        let mark = self.marks.get(did).map(|s| s.saturating_add(1));
        let all = (self.fence_ms > 0).then_some(self.fence_ms);
        mark.max(all)
    }

    /// The latest fence it sets for any caller (0 for none).
    pub fn latest(&self) -> u64 {
        let mark = self.marks.values().max().map_or(0, |s| s.saturating_add(1));
        mark.max(self.fence_ms)
    }
}

/// The BLAKE3 key-derivation context of the rendezvous score ([`score`]).
pub const HOME_CONTEXT: &str = "didgate 2026 home node v1";

/// The rendezvous score of `member` for the caller `did`: BLAKE3 in key-derivation mode with
/// [`HOME_CONTEXT`] over `u64be(len(node)) || node || did` (the member's name, unique in its
/// cluster, and the caller's DID text, both UTF-8). The home is the member with the greatest
/// score. The name, not the node's key, so that a node given a new key keeps its callers.
pub fn score(member: &Member, did: &str) -> [u8; 32] {
    let mut h = blake3::Hasher::new_derive_key(HOME_CONTEXT);
    h.update(&(member.node.len() as u64).to_be_bytes());
    h.update(member.node.as_bytes());
    h.update(did.as_bytes());
    *h.finalize().as_bytes()
}

/// The home of `did` among `members`: the greatest [`score`] (ties, which take a BLAKE3
/// collision, go to the greater name); `None` when there is no member.
pub fn home<'a>(did: &str, members: &'a [Member]) -> Option<&'a Member> {
    members
        .iter()
        .max_by(|a, b| (score(a, did), &a.node).cmp(&(score(b, did), &b.node)))
}

/// Where a call of a caller belongs, as this node sees it now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// This node is the caller's home; requests stamped before `fence_ms` (wall clock, ms)
    /// are refused `handover` ([`Homes::route`]).
    Here {
        /// The end of the handover window, if one is open for this caller.
        fence_ms: Option<u64>,
    },
    /// Another member is the caller's home.
    Moved(Member),
    /// This node knows no member (it is not registered, nor is anyone): nothing is admitted.
    Unknown,
}

/// One membership as this node read it.
#[derive(Debug, Clone)]
struct View {
    members: Vec<Member>,
    /// When this node started to use it (wall clock, ms).
    applied_ms: u64,
    /// Whether members may have served that this node never saw (the view before a node's
    /// start, when other nodes served in the cluster before): any caller may have had a home.
    unknown: bool,
    /// The handovers of the members that left in this view, read with it.
    handovers: Vec<Handover>,
}

/// The memberships a node read recently, enough to tell for any caller since when this node
/// has been its home and whether the previous home may still have claimed its requests.
#[derive(Debug)]
pub struct Homes {
    /// This node's name.
    me: String,
    /// The lease TTL, ms: a live member that lost a caller to this node stops claiming that
    /// caller's requests within it (it admits nothing when its view of the members is older
    /// than a third of it: [`crate::ControlPlane`]).
    ttl_ms: u64,
    /// The request window, ms: the clock skew a request may have plus the tolerance between
    /// nodes' clocks. A request a node claimed at time T was stamped before T + this.
    window_ms: u64,
    /// Oldest first; the first is the view before every window still open.
    views: VecDeque<View>,
    /// Whether another node of the gateway served before this one started, or has been a
    /// member in a view this node read since ([`Homes::rejoined`]).
    others_seen: bool,
    /// The latest stamp admitted of each caller within the clock window ([`Homes::admit`]).
    marks: HashMap<String, u64>,
    /// The size of `marks` at which it is pruned next.
    prune_at: usize,
    /// Set once this node leaves ([`Homes::leave`]): it admits nothing more.
    leaving: bool,
    /// Requests this node may have admitted without a mark (an earlier run of it, whose store
    /// it serves from) were stamped before this (wall clock, ms; 0: none): [`Homes::unmarked`].
    unmarked_ms: u64,
}

impl Homes {
    /// The homes of a node named `me` that starts with `members` at `now_ms`. The callers it
    /// is home for may have had another home before it joined: a member still live (which
    /// stops within the TTL), or one that left (which stopped before `now_ms`, its lease gone).
    /// When `others_served` is false (no other node ever served in this cluster, and no other
    /// member is live) nobody else can have claimed anything, and no window is open.
    pub fn new(
        me: &str,
        ttl_ms: u64,
        window_ms: u64,
        members: Vec<Member>,
        others_served: bool,
        now_ms: u64,
    ) -> Self {
        let mut members = members;
        members.sort_by(|a, b| a.node.cmp(&b.node));
        let before: Vec<Member> = members.iter().filter(|m| m.node != me).cloned().collect();
        let mut views = VecDeque::new();
        views.push_back(View {
            unknown: others_served && before.is_empty(),
            members: before,
            applied_ms: now_ms,
            handovers: Vec::new(),
        });
        views.push_back(View {
            members,
            applied_ms: now_ms,
            unknown: false,
            handovers: Vec::new(),
        });
        let others_seen = others_served || views.front().is_some_and(|v| !v.members.is_empty());
        Self {
            me: me.to_string(),
            ttl_ms,
            window_ms,
            views,
            others_seen,
            marks: HashMap::new(),
            prune_at: MIN_PRUNE,
            leaving: false,
            unmarked_ms: 0,
        }
    }

    /// These homes, for a node that may have admitted requests stamped before `until_ms`
    /// without marking them (in an earlier run: the store it serves from holds their replay
    /// keys): a handover fences every caller at least there.
    #[must_use]
    pub fn unmarked(mut self, until_ms: u64) -> Self {
        self.unmarked_ms = until_ms;
        self
    }

    /// Takes `members` as the membership from `now_ms` on (a set equal to the current one
    /// changes nothing), with the `handovers` read with it (those of members that left are
    /// kept), and forgets views whose windows have all closed.
    pub fn apply(&mut self, mut members: Vec<Member>, handovers: &[Handover], now_ms: u64) {
        members.sort_by(|a, b| a.node.cmp(&b.node));
        let same = self.views.back().is_some_and(|v| {
            v.members.len() == members.len()
                && v.members.iter().zip(&members).all(|(a, b)| {
                    a.node == b.node
                        && a.key == b.key
                        && a.address == b.address
                        && a.lease == b.lease
                })
        });
        self.others_seen |= members.iter().any(|m| m.node != self.me);
        if !same {
            // a handover of the registration that left, never of an earlier run of the node
            let left: Vec<Handover> = self
                .members()
                .iter()
                .filter(|m| !members.iter().any(|n| n.node == m.node))
                .filter_map(|m| {
                    handovers
                        .iter()
                        .find(|h| h.node == m.node && h.lease == m.lease)
                })
                .cloned()
                .collect();
            self.views.push_back(View {
                members,
                applied_ms: now_ms,
                unknown: false,
                handovers: left,
            });
        }
        // a view is needed while a window that began after it can still be reported: a fence
        // is at most `ttl + window` after the change, and is reported until requests stamped
        // before it fall out of the clock window (`window` later)
        let horizon = now_ms.saturating_sub(
            self.ttl_ms
                .saturating_add(self.window_ms)
                .saturating_add(self.window_ms),
        );
        while self.views.len() > 1 && self.views[1].applied_ms < horizon {
            self.views.pop_front();
        }
    }

    /// The homes of this node after it registered again under a new lease (its old one
    /// expired while it was cut off): a caller may have had another home meanwhile, so it
    /// starts over as a node joining ([`Homes::new`]), in a cluster where others served if
    /// another node of the gateway served before it started or was ever seen since, or if
    /// `others_served` (the caller's view of the registry now) says so.
    pub fn rejoined(&self, members: Vec<Member>, others_served: bool, now_ms: u64) -> Self {
        let others = self.others_seen || others_served;
        let mut again = Self::new(
            &self.me,
            self.ttl_ms,
            self.window_ms,
            members,
            others,
            now_ms,
        );
        again.marks.clone_from(&self.marks);
        again.leaving = self.leaving;
        again.unmarked_ms = self.unmarked_ms;
        again
    }

    /// A member of a retained view that is not in the current one, by its key (`did:key`): a
    /// node that left recently, and may still be draining (it serves the execution of the
    /// grants it issued until they expire: specs/operation.md, "Planned leave").
    pub fn left_member(&self, key: &str, now_ms: u64) -> Option<&Member> {
        let current = self.views.back()?;
        if current.members.iter().any(|m| m.key == key) {
            return None;
        }
        // its latest departure, if it left on purpose and executes its grants until after
        // `now_ms` (a node that died, or stopped for another reason, executes none)
        let pairs: Vec<(&View, &View)> = self.views.iter().zip(self.views.iter().skip(1)).collect();
        let (before, gained) = pairs.into_iter().rev().find(|(before, gained)| {
            before.members.iter().any(|m| m.key == key)
                && !gained.members.iter().any(|m| m.key == key)
        })?;
        let m = before.members.iter().find(|m| m.key == key)?;
        // (a view keeps only the handovers of the registrations that left in it)
        let draining = gained
            .handovers
            .iter()
            .any(|h| h.node == m.node && h.grants_until_ms > now_ms);
        (draining && m.node != self.me).then_some(m)
    }

    /// The request window, ms ([`Homes::new`]).
    pub fn window_ms(&self) -> u64 {
        self.window_ms
    }

    /// The members of the current view.
    pub fn members(&self) -> &[Member] {
        self.views.back().map_or(&[], |v| v.members.as_slice())
    }

    /// Where a call of `did` belongs now. When this node is home, the handover window: if
    /// the caller's home was another member P until this node took it over at time G (this
    /// node's clock), requests stamped before `G + ttl + window` (P was still a member when
    /// this node took over: P stops within the TTL) or before `G + window` (P had left, so it
    /// had stopped) are refused; a window that has closed by `now_ms` is not reported.
    pub fn route(&self, did: &str, now_ms: u64) -> Route {
        let Some(current) = self.views.back() else {
            return Route::Unknown;
        };
        if self.leaving {
            // this node admits nothing more: its callers go to their next homes
            let others: Vec<Member> = current
                .members
                .iter()
                .filter(|m| m.node != self.me)
                .cloned()
                .collect();
            return home(did, &others).map_or(Route::Unknown, |m| Route::Moved(m.clone()));
        }
        let Some(h) = home(did, &current.members) else {
            return Route::Unknown;
        };
        if h.node != self.me {
            return Route::Moved(h.clone());
        }
        // every change still retained that gave this caller to this node from another member
        // opens a window; the latest end of them holds (an earlier previous home may still
        // have been claiming when a later one handed the caller back)
        let mut fence: Option<u64> = None;
        for pair in self.views.iter().collect::<Vec<_>>().windows(2) {
            let (before, gained) = (pair[0], pair[1]);
            if home(did, &gained.members).is_none_or(|h| h.node != self.me) {
                continue;
            }
            let end = match home(did, &before.members) {
                Some(p) if p.node == self.me => continue,
                Some(p) => match self.window_end(p, gained, Some(did)) {
                    Some(end) => end,
                    None => continue,
                },
                // a view with no member gave the caller to nobody
                None if before.unknown => gained.applied_ms.saturating_add(self.window_ms),
                None => continue,
            };
            fence = Some(fence.map_or(end, |f| f.max(end)));
        }
        Route::Here {
            fence_ms: fence.filter(|f| *f > now_ms.saturating_sub(self.window_ms)),
        }
    }

    /// [`Homes::route`] for a request of `did` stamped at `stamp_ms`, judged at admission:
    /// when this node is home and the request is not inside the handover window, its stamp is
    /// remembered as the caller's mark ([`Homes::leave`]) before anything is claimed. A stamp
    /// beyond the clock window is not (the request is refused for its clock).
    pub fn admit(&mut self, did: &str, stamp_ms: u64, now_ms: u64) -> Route {
        let route = self.route(did, now_ms);
        if let Route::Here { fence_ms } = route
            && stamp_ms >= fence_ms.unwrap_or(0)
            && stamp_ms <= now_ms.saturating_add(self.window_ms)
        {
            let mark = self.marks.entry(did.to_string()).or_insert(stamp_ms);
            *mark = (*mark).max(stamp_ms);
            if self.marks.len() >= self.prune_at {
                self.prune_marks(now_ms);
            }
        }
        route
    }

    /// Forgets the marks of requests now out of the clock window: a replay of them is refused
    /// for its clock on every node.
    fn prune_marks(&mut self, now_ms: u64) {
        let oldest = now_ms.saturating_sub(self.window_ms);
        self.marks.retain(|_, s| *s >= oldest);
        self.prune_at = (self.marks.len() * 2).max(MIN_PRUNE);
    }

    /// Leaves on purpose at `now_ms`, registered under `lease`, executing its grants while it
    /// drains until `grants_until_ms` (0: not at all): from now on this node admits nothing
    /// ([`Homes::route`] sends every caller to its next home), and the returned handover
    /// names what it admitted. Called under the same lock as [`Homes::admit`], so every
    /// request admitted here is covered.
    pub fn leave(&mut self, lease: i64, grants_until_ms: u64, now_ms: u64) -> Handover {
        self.leaving = true;
        self.prune_marks(now_ms);
        let mut handover = Handover {
            node: self.me.clone(),
            lease,
            fence_ms: self.open_until(),
            marks: self.marks.drain().collect(),
            grants_until_ms,
        };
        let bytes: usize = handover.marks.keys().map(String::len).sum();
        if handover.marks.len() > MAX_MARKS || bytes > MAX_MARK_BYTES {
            handover.fence_ms = handover.latest();
            handover.marks.clear();
        }
        handover
    }

    /// The latest end of a handover window this node may still have open for any caller (0
    /// for none): its callers' next homes wait it out too, as this node would have. At least
    /// [`Homes::unmarked`]: what the node admitted in an earlier run has no mark.
    fn open_until(&self) -> u64 {
        let mut until = self.unmarked_ms;
        for pair in self.views.iter().collect::<Vec<_>>().windows(2) {
            let (before, gained) = (pair[0], pair[1]);
            if !gained.members.iter().any(|m| m.node == self.me) {
                continue;
            }
            if before.unknown {
                until = until.max(gained.applied_ms.saturating_add(self.window_ms));
            }
            // with rendezvous hashing a caller moves from P to this node only when this node
            // joins or P leaves
            let joined = !before.members.iter().any(|m| m.node == self.me);
            for p in before.members.iter().filter(|m| m.node != self.me) {
                let stays = gained.members.iter().any(|m| m.node == p.node);
                if stays && !joined {
                    continue;
                }
                until = until.max(self.window_end(p, gained, None).unwrap_or(0));
            }
        }
        until
    }

    /// When the window ends that the change to `gained` opened for callers this node took from
    /// `p`: for the caller `did`, or for any caller (`None`); `None` when nothing waits.
    fn window_end(&self, p: &Member, gained: &View, did: Option<&str>) -> Option<u64> {
        if gained.members.iter().any(|m| m.node == p.node) {
            // a member that is still one when this node takes over stops within the TTL
            return Some(
                gained
                    .applied_ms
                    .saturating_add(self.ttl_ms)
                    .saturating_add(self.window_ms),
            );
        }
        // one that left had stopped; if it handed over, only what it admitted waits
        match gained.handovers.iter().find(|h| h.node == p.node) {
            Some(h) => did.map_or(Some(h.latest()), |d| h.fence(d)),
            None => Some(gained.applied_ms.saturating_add(self.window_ms)),
        }
    }
}

/// The least size of the marks at which they are pruned.
const MIN_PRUNE: usize = 1024;

#[cfg(test)]
mod tests {
    use super::*;

    fn member(name: &str) -> Member {
        Member {
            node: name.into(),
            key: format!("did:key:{name}"),
            gateway: "did:key:gateway".into(),
            address: format!("127.0.0.1:{}", 4000 + name.len()),
            lease: 1,
            lease_ttl_secs: 10,
            joined_ms: 0,
        }
    }

    fn callers() -> Vec<String> {
        (0..300).map(|i| format!("did:key:caller{i}")).collect()
    }

    const TTL: u64 = 10_000;
    const WINDOW: u64 = 31_000;

    #[test]
    fn homes_spread_and_move_only_with_the_member_that_joins_or_leaves() {
        let three = vec![member("a"), member("b"), member("c")];
        let two = vec![member("a"), member("b")];
        let mut count = HashMap::new();
        for did in callers() {
            let h3 = home(&did, &three).expect("home").node.clone();
            let h2 = home(&did, &two).expect("home").node.clone();
            // removing c moves only c's callers
            if h3 != "c" {
                assert_eq!(h3, h2, "{did}");
            }
            *count.entry(h3).or_insert(0) += 1;
        }
        // each of 3 members is home to a fair share of 300 callers
        for n in ["a", "b", "c"] {
            let c = count[n];
            assert!((60..=140).contains(&c), "{n}: {c}");
        }
        // the order of the members does not matter
        let shuffled = vec![member("c"), member("a"), member("b")];
        for did in callers() {
            assert_eq!(home(&did, &three), home(&did, &shuffled));
        }
        assert_eq!(home("did:key:x", &[]), None);
    }

    #[test]
    fn the_score_is_the_specified_hash() {
        let m = member("a");
        let mut input = Vec::new();
        input.extend_from_slice(&1u64.to_be_bytes());
        input.extend_from_slice(b"a");
        input.extend_from_slice(b"did:key:caller");
        assert_eq!(
            score(&m, "did:key:caller"),
            blake3::derive_key(HOME_CONTEXT, &input)
        );
    }

    #[test]
    fn a_first_node_of_a_new_cluster_opens_no_window() {
        let homes = Homes::new("a", TTL, WINDOW, vec![member("a")], false, 1_000);
        for did in callers() {
            assert_eq!(homes.route(&did, 1_000), Route::Here { fence_ms: None });
        }
    }

    #[test]
    fn a_node_restarting_alone_after_others_served_waits_out_the_window() {
        let homes = Homes::new("a", TTL, WINDOW, vec![member("a")], true, 1_000);
        assert_eq!(
            homes.route("did:key:caller0", 1_000),
            Route::Here {
                fence_ms: Some(1_000 + WINDOW)
            }
        );
    }

    #[test]
    fn a_joining_node_waits_the_ttl_and_the_window_for_callers_it_takes_from_live_members() {
        let all = vec![member("a"), member("b"), member("c")];
        let homes = Homes::new("c", TTL, WINDOW, all.clone(), false, 5_000);
        let mut gained = 0;
        for did in callers() {
            match homes.route(&did, 5_000) {
                Route::Here { fence_ms } => {
                    gained += 1;
                    assert_eq!(fence_ms, Some(5_000 + TTL + WINDOW), "{did}");
                    // the window is reported until requests stamped at `now` pass it
                    let after = 5_000 + TTL + 2 * WINDOW;
                    assert_eq!(homes.route(&did, after), Route::Here { fence_ms: None });
                }
                Route::Moved(m) => assert_ne!(m.node, "c"),
                Route::Unknown => panic!("unknown"),
            }
        }
        assert!(gained > 0);
    }

    #[test]
    fn callers_of_a_member_that_left_wait_only_the_window() {
        let all = vec![member("a"), member("b"), member("c")];
        let mut homes = Homes::new("a", TTL, WINDOW, all.clone(), false, 0);
        // long after a joined: its own windows have closed
        homes.apply(all.clone(), &[], 100_000);
        homes.apply(vec![member("a"), member("b")], &[], 200_000);
        for did in callers() {
            let before = home(&did, &all).expect("home").node.clone();
            match (before.as_str(), homes.route(&did, 200_000)) {
                ("a", r) => assert_eq!(r, Route::Here { fence_ms: None }, "{did}"),
                ("c", Route::Here { fence_ms }) => {
                    assert_eq!(fence_ms, Some(200_000 + WINDOW), "{did}")
                }
                ("c", Route::Moved(m)) => assert_eq!(m.node, "b"),
                (_, Route::Moved(m)) => assert_eq!(m.node, "b"),
                (b, r) => panic!("{did}: {b} {r:?}"),
            }
        }
    }

    #[test]
    fn a_node_that_lost_and_regained_its_membership_alone_opens_no_window() {
        let mut homes = Homes::new("a", TTL, WINDOW, vec![member("a")], false, 0);
        homes.apply(Vec::new(), &[], 1_000);
        homes.apply(vec![member("a")], &[], 2_000);
        assert_eq!(
            homes.route("did:key:caller1", 2_000),
            Route::Here { fence_ms: None }
        );
        // but a member that left in between had been home to some: they wait the window
        let mut homes = Homes::new("a", TTL, WINDOW, vec![member("a"), member("b")], false, 0);
        homes.apply(vec![member("a")], &[], 100_000);
        homes.apply(Vec::new(), &[], 101_000);
        homes.apply(vec![member("a")], &[], 102_000);
        let two = vec![member("a"), member("b")];
        for did in callers() {
            let was_b = home(&did, &two).expect("home").node == "b";
            let fence = if was_b { Some(100_000 + WINDOW) } else { None };
            assert_eq!(
                homes.route(&did, 102_000),
                Route::Here { fence_ms: fence },
                "{did}"
            );
        }
    }

    #[test]
    fn a_window_outlives_the_keep_alive_reads_that_follow_it() {
        // a joins b's cluster at 0: its callers from b wait until TTL + WINDOW; reads of the
        // same membership go on every second, and the window must be reported until requests
        // stamped before its end are out of the clock window
        let all = vec![member("a"), member("b")];
        let mut homes = Homes::new("a", TTL, WINDOW, all.clone(), false, 0);
        let did = callers()
            .into_iter()
            .find(|d| home(d, &all).is_some_and(|m| m.node == "a"))
            .expect("a caller of a");
        let fence = TTL + WINDOW;
        for t in (1_000..fence + WINDOW).step_by(1_000) {
            homes.apply(all.clone(), &[], t);
            homes.apply(vec![member("b"), member("a")], &[], t + 500);
            assert_eq!(
                homes.route(&did, t),
                Route::Here {
                    fence_ms: Some(fence)
                },
                "{t}"
            );
        }
        homes.apply(all.clone(), &[], fence + WINDOW + 1);
        assert_eq!(
            homes.route(&did, fence + WINDOW + 1),
            Route::Here { fence_ms: None }
        );
    }

    #[test]
    fn the_latest_of_several_windows_holds() {
        // a joins p's cluster at 0 (p live: TTL + WINDOW); q joins and takes the caller, then
        // leaves at 2_000 (q left: WINDOW): p may still have claimed until TTL after 0
        let ap = vec![member("a"), member("p")];
        let apq = vec![member("a"), member("p"), member("q")];
        let did = callers()
            .into_iter()
            .find(|d| {
                home(d, &ap).is_some_and(|m| m.node == "a")
                    && home(d, &apq).is_some_and(|m| m.node == "q")
                    && home(d, &[member("p")]).is_some()
            })
            .expect("such a caller");
        let mut homes = Homes::new("a", TTL, WINDOW, ap.clone(), false, 0);
        homes.apply(apq, &[], 1_000);
        homes.apply(ap, &[], 2_000);
        assert_eq!(
            homes.route(&did, 2_000),
            Route::Here {
                fence_ms: Some(TTL + WINDOW)
            }
        );
    }

    #[test]
    fn a_node_registered_again_waits_out_the_window_if_anyone_else_may_have_served() {
        let alone = Homes::new("a", TTL, WINDOW, vec![member("a")], false, 0);
        let again = alone.rejoined(vec![member("a")], false, 50_000);
        assert_eq!(
            again.route("did:key:caller1", 50_000),
            Route::Here { fence_ms: None }
        );
        let again = alone.rejoined(vec![member("a")], true, 50_000);
        assert_eq!(
            again.route("did:key:caller1", 50_000),
            Route::Here {
                fence_ms: Some(50_000 + WINDOW)
            }
        );
        // b was a member once: anyone may have taken a's callers while a was away
        let mut seen = Homes::new("a", TTL, WINDOW, vec![member("a")], false, 0);
        seen.apply(vec![member("a"), member("b")], &[], 1_000);
        seen.apply(vec![member("a")], &[], 2_000);
        let again = seen.rejoined(vec![member("a")], false, 500_000);
        assert_eq!(
            again.route("did:key:caller1", 500_000),
            Route::Here {
                fence_ms: Some(500_000 + WINDOW)
            }
        );
    }

    #[test]
    fn a_node_that_left_the_membership_sends_every_caller_on() {
        let mut homes = Homes::new("a", TTL, WINDOW, vec![member("a"), member("b")], false, 0);
        homes.apply(vec![member("b")], &[], 1_000);
        for did in callers() {
            assert_eq!(homes.route(&did, 1_000), Route::Moved(member("b")));
        }
        homes.apply(Vec::new(), &[], 2_000);
        assert_eq!(homes.route("did:key:caller1", 2_000), Route::Unknown);
    }

    #[test]
    fn old_views_are_forgotten_once_their_windows_closed() {
        let mut homes = Homes::new("a", TTL, WINDOW, vec![member("a")], false, 0);
        for i in 1..100u64 {
            let m = if i % 2 == 0 {
                vec![member("a")]
            } else {
                vec![member("a"), member("b")]
            };
            homes.apply(m, &[], i * 60_000);
        }
        assert!(homes.views.len() <= 3, "{}", homes.views.len());
        // an unchanged membership adds nothing
        let n = homes.views.len();
        homes.apply(homes.members().to_vec(), &[], 99 * 60_000 + 1);
        assert_eq!(homes.views.len(), n);
    }

    /// A caller whose home among `members` is `node`.
    fn caller_of(node: &str, members: &[Member]) -> String {
        callers()
            .into_iter()
            .find(|d| home(d, members).is_some_and(|m| m.node == node))
            .expect("a caller")
    }

    #[test]
    fn a_planned_leave_hands_over_what_it_admitted_and_nothing_else_waits() {
        let all = vec![member("a"), member("b")];
        let mut a = Homes::new("a", TTL, WINDOW, all.clone(), false, 0);
        let mut b = Homes::new("b", TTL, WINDOW, all.clone(), true, 0);
        // long after both joined: no window open
        let t = 200_000;
        a.apply(all.clone(), &[], t);
        b.apply(all.clone(), &[], t);
        let busy = caller_of("a", &all);
        let quiet = callers()
            .into_iter()
            .filter(|d| *d != busy)
            .find(|d| home(d, &all).is_some_and(|m| m.node == "a"))
            .expect("another caller of a");
        assert_eq!(a.admit(&busy, t - 5, t), Route::Here { fence_ms: None });
        assert_eq!(a.admit(&busy, t + 20, t), Route::Here { fence_ms: None });
        assert_eq!(a.admit(&busy, t + 10, t), Route::Here { fence_ms: None });
        // a stamp beyond the clock window is refused for its clock: not remembered
        a.admit(&busy, t + WINDOW + 1, t);
        let handover = a.leave(1, 0, t + 30);
        assert_eq!(handover.node, "a");
        assert_eq!(handover.fence_ms, 0, "no window was open at a");
        assert_eq!(handover.marks.get(&busy), Some(&(t + 20)));
        assert!(!handover.marks.contains_key(&quiet));
        // a admits nothing more: its callers go to b
        assert_eq!(a.admit(&busy, t + 40, t + 40), Route::Moved(member("b")));
        // b takes a's callers: the busy one's requests stamped at or before its mark wait,
        // nothing else does
        b.apply(vec![member("b")], std::slice::from_ref(&handover), t + 60);
        assert_eq!(
            b.route(&busy, t + 60),
            Route::Here {
                fence_ms: Some(t + 21)
            }
        );
        assert_eq!(b.route(&quiet, t + 60), Route::Here { fence_ms: None });
        // without the handover, the whole window
        let mut c = Homes::new("b", TTL, WINDOW, all.clone(), true, 0);
        c.apply(all.clone(), &[], t);
        c.apply(vec![member("b")], &[], t + 60);
        assert_eq!(
            c.route(&quiet, t + 60),
            Route::Here {
                fence_ms: Some(t + 60 + WINDOW)
            }
        );
        // a handover of a member that did not leave in that view is not taken
        let mut d = Homes::new("b", TTL, WINDOW, all.clone(), true, 0);
        d.apply(all.clone(), &[], t);
        d.apply(all.clone(), std::slice::from_ref(&handover), t + 60);
        assert_eq!(d.route(&busy, t + 60), Route::Moved(member("a")));
    }

    #[test]
    fn a_node_leaving_inside_its_own_window_hands_the_window_on() {
        // a joins b's cluster at 1_000 and leaves at 2_000: the callers it took from b (still
        // a member) wait until TTL + WINDOW after 1_000 at their next home, as they did at a
        let all = vec![member("a"), member("b")];
        let mut a = Homes::new("a", TTL, WINDOW, all.clone(), false, 1_000);
        let handover = a.leave(1, 0, 2_000);
        assert_eq!(handover.fence_ms, 1_000 + TTL + WINDOW);
        let did = caller_of("a", &all);
        assert_eq!(handover.fence(&did), Some(1_000 + TTL + WINDOW));
        // a member joining later takes nothing from a member that stays: no window at a
        let mut a = Homes::new("a", TTL, WINDOW, vec![member("a")], false, 0);
        a.apply(all.clone(), &[], 1_000);
        assert_eq!(a.leave(1, 0, 2_000).fence_ms, 0);
        // a caller a took from a member that handed over waits for that member's marks
        let abc = vec![member("a"), member("b"), member("c")];
        let mut a = Homes::new("a", TTL, WINDOW, abc.clone(), false, 0);
        a.apply(abc, &[], 100_000);
        let from_c = Handover {
            node: "c".into(),
            lease: 1,
            fence_ms: 0,
            marks: [("did:key:x".to_string(), 100_500)].into(),
            grants_until_ms: 0,
        };
        a.apply(all, &[from_c], 101_000);
        assert_eq!(a.leave(1, 0, 101_100).fence_ms, 100_501);
    }

    #[test]
    fn past_the_most_marks_one_fence_covers_every_caller() {
        let mut a = Homes::new("a", TTL, WINDOW, vec![member("a")], false, 0);
        let t = 100_000;
        for i in 0..=MAX_MARKS as u64 {
            a.admit(&format!("did:key:c{i}"), t + i % 7, t);
        }
        let handover = a.leave(1, 0, t);
        assert!(handover.marks.is_empty());
        assert_eq!(handover.fence_ms, t + 7);
        assert_eq!(handover.fence("did:key:anyone"), Some(t + 7));
        // marks out of the clock window are forgotten
        let mut a = Homes::new("a", TTL, WINDOW, vec![member("a")], false, 0);
        a.admit("did:key:old", t, t);
        let handover = a.leave(1, 0, t + WINDOW + 1);
        assert!(handover.marks.is_empty());
        assert_eq!(handover.fence("did:key:old"), None);
        // nor past the bytes an etcd request may carry
        let mut a = Homes::new("a", TTL, WINDOW, vec![member("a")], false, 0);
        let long = "x".repeat(1_000);
        for i in 0..600u64 {
            a.admit(&format!("did:web:{long}{i}"), t + i, t);
        }
        let handover = a.leave(1, 0, t);
        assert!(handover.marks.is_empty());
        assert_eq!(handover.fence_ms, t + 600);
    }

    #[test]
    fn a_handover_of_an_earlier_registration_of_the_node_is_not_taken() {
        let all = vec![member("a"), member("b")];
        let t = 200_000;
        let did = caller_of("a", &all);
        let mut b = Homes::new("b", TTL, WINDOW, all.clone(), true, 0);
        b.apply(all.clone(), &[], t);
        // a's earlier run left a handover under lease 7; the a that left now is lease 1
        let old = Handover {
            node: "a".into(),
            lease: 7,
            fence_ms: 0,
            marks: BTreeMap::new(),
            grants_until_ms: 0,
        };
        b.apply(vec![member("b")], &[old], t + 10);
        assert_eq!(
            b.route(&did, t + 10),
            Route::Here {
                fence_ms: Some(t + 10 + WINDOW)
            }
        );
        // and a node that died is not sent grants: only one that left with a handover and
        // executes its grants, until it stops
        assert_eq!(b.left_member("did:key:a", t + 10), None);
        let mut c = Homes::new("b", TTL, WINDOW, all.clone(), true, 0);
        let h = Handover {
            node: "a".into(),
            lease: 1,
            grants_until_ms: t + 5_000,
            ..Handover::default()
        };
        c.apply(vec![member("b")], std::slice::from_ref(&h), t);
        assert_eq!(c.left_member("did:key:a", t), Some(&member("a")));
        assert_eq!(c.left_member("did:key:a", t + 5_000), None, "done");
        assert_eq!(c.left_member("did:key:b", t), None, "a member now");
        let none = Handover {
            grants_until_ms: 0,
            ..h.clone()
        };
        let mut d = Homes::new("b", TTL, WINDOW, all.clone(), true, 0);
        d.apply(vec![member("b")], &[none], t);
        assert_eq!(d.left_member("did:key:a", t), None, "executes none");
        // a came back, then died: its latest departure came with no handover
        c.apply(all.clone(), &[], t + 100);
        c.apply(vec![member("b")], &[], t + 200);
        assert_eq!(c.left_member("did:key:a", t + 200), None);
        // a member registered again under a new lease is a change of the membership: a
        // handover of the new lease is taken
        let mut e = Homes::new("b", TTL, WINDOW, all.clone(), true, 0);
        let mut renewed = member("a");
        renewed.lease = 2;
        e.apply(vec![renewed, member("b")], &[], t);
        let h2 = Handover {
            lease: 2,
            ..h.clone()
        };
        e.apply(vec![member("b")], &[h2], t + 10);
        assert_eq!(e.left_member("did:key:a", t + 10).map(|m| m.lease), Some(2));
    }

    #[test]
    fn what_an_earlier_run_admitted_unmarked_is_handed_over_and_marks_survive_a_registration() {
        // an earlier run of the node admitted requests stamped up to 59_000 (its store's replay
        // keys say so): its next homes refuse everything stamped before then too
        let a = Homes::new("a", TTL, WINDOW, vec![member("a")], false, 60_000).unmarked(59_001);
        let mut again = a.rejoined(vec![member("a")], false, 60_500);
        let handover = again.leave(1, 0, 61_000);
        assert_eq!(handover.fence_ms, 59_001);
        // marks survive a registration again
        let mut a = Homes::new("a", TTL, WINDOW, vec![member("a")], false, 0);
        a.admit("did:key:x", 100_000, 100_000);
        let mut again = a.rejoined(vec![member("a")], false, 100_500);
        assert_eq!(
            again.leave(1, 0, 101_000).marks.get("did:key:x"),
            Some(&100_000)
        );
    }
}
