//! The policy decision, in Cedar (specs/operation.md, "Policy"). Default deny.
//!
//! A [`PolicySet`] is a Cedar policy set validated (strict mode) against the embedded
//! [`SCHEMA`], the group membership of callers (`[groups]` of `gateway.toml` and an optional
//! Cedar entities file), and its hash. The request is mapped to Cedar as:
//!
//! | Cedar | didgate |
//! | --- | --- |
//! | principal | `Did::"did:key:..."` or `Did::"did:web:..."`, member of its groups (`Group::"NAME"`) |
//! | action | `Action::"GET"` ... `Action::"DELETE"`, in `Action::"read"` (GET, HEAD, OPTIONS) or `Action::"write"` (POST, PUT, PATCH, DELETE) |
//! | resource | `Path::"UPSTREAM/PATH"` in `Upstream::"UPSTREAM"`, attributes `upstream`, `path`, `segments` |
//! | context | `time_ms`, `utc_hour`, `utc_weekday`, `body_len`, `upstream`, `headers`, `query` |
//!
//! A policy's `@id("...")` annotation names its rule family: a refusal names the families of
//! the forbid policies that refused, or says no permit matched, never the policy text. A permit's
//! `@grant_ttl_secs("N")` caps the lifetime of the grants it allows.
//!
//! Without a `policy_file`, the `[[rule]]` list of `gateway.toml` is translated into Cedar text
//! ([`translate_rules`]) with the same meaning as before.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::Path;
use std::str::FromStr;

use cedar_policy as cedar;
use didgate_protocol::{Did, Principal, WebDid};

use crate::config::{Config, ConfigError, Rule};

/// BLAKE3 derive-key context of [`PolicySet::hash`].
pub const HASH_CONTEXT: &str = "didgate 2026 policy-set v1";

/// The family named by a refusal when no permit matched (default deny).
pub const DEFAULT_DENY: &str = "no permit matched";

/// The family named by a refusal when the request cannot be put to Cedar (a method the schema
/// does not know); the gateway's canonical checks make this unreachable.
pub const INVALID_REQUEST: &str = "request outside the policy schema";

/// The methods the schema knows, each a Cedar action.
pub const METHODS: &[&str] = &["GET", "HEAD", "OPTIONS", "POST", "PUT", "PATCH", "DELETE"];

/// The Cedar schema every policy set is validated against (Cedar schema syntax).
pub const SCHEMA: &str = r#"// didgate policy schema, version 1 (specs/operation.md, "Policy").
// A caller: its did:key or did:web. Member of groups ([groups] of gateway.toml, or the entities file).
entity Group in [Group];
entity Did in [Group];
// An upstream named in gateway.toml.
entity Upstream;
// What a call touches: the upstream and the exact (canonical) path.
entity Path in [Upstream] = {
  "upstream": Upstream,
  "path": String,
  "segments": Long,
};
type RequestContext = {
  "time_ms": Long,
  "utc_hour": Long,
  "utc_weekday": Long,
  "body_len": Long,
  "upstream": String,
  "headers": Set<String>,
  "query": Set<String>,
};
action "read";
action "write";
action "GET", "HEAD", "OPTIONS" in ["read"] appliesTo {
  principal: [Did],
  resource: [Path],
  context: RequestContext,
};
action "POST", "PUT", "PATCH", "DELETE" in ["write"] appliesTo {
  principal: [Did],
  resource: [Path],
  context: RequestContext,
};
"#;

/// Example policies (valid against [`SCHEMA`]); `didgated init` writes them, commented out,
/// to `policies.cedar`.
pub const EXAMPLE_POLICIES: &str = r#"// Members of group payers may read anything on payments and create charges, with grants
// that live at most 5 seconds.
@id("payers-charge")
@grant_ttl_secs("5")
permit (
  principal in Group::"payers",
  action in [Action::"GET", Action::"POST"],
  resource in Upstream::"payments"
) when {
  context.body_len <= 65536 &&
  (action == Action::"GET" || resource.path like "/v1/charges*")
};

// One DID may read the balance, during UTC working hours on weekdays.
@id("auditor-balance")
permit (
  principal == Did::"did:key:z6MknGc3ocHs3zdPiJbnaaqDi58NGb4pk1Sp9WxWufuXSdxf",
  action in Action::"read",
  resource
) when {
  resource.upstream == Upstream::"payments" &&
  resource.path == "/v1/balance" &&
  context.utc_weekday < 5 && context.utc_hour >= 8 && context.utc_hour < 18
};

// Exactly one segment below /v1/charges/ (`like` stars also match '/': count segments).
@id("charge-lookup")
permit (principal in Group::"payers", action == Action::"GET", resource)
when { resource.path like "/v1/charges/*" && resource.segments == 3 };

// Nobody deletes, whatever a permit says: forbid overrides permit.
@id("no-deletes")
forbid (principal, action == Action::"DELETE", resource);
"#;

/// The name of the example policy file `didgated init` writes beside `gateway.toml`.
pub const TEMPLATE_FILE: &str = "policies.cedar";

/// The example policy file `didgated init` writes: a valid, empty set (default deny: every
/// example is commented out), used only once `policy_file` names it.
pub fn template() -> String {
    let mut out = String::from(
        "// didgate policies in Cedar (specs/operation.md, \"Policy\"). Not used until gateway.toml\n\
         // names this file: [gateway] policy_file = \"policies.cedar\" (the [[rule]] list must then\n\
         // be empty). Check with `didgated policy check policies.cedar`; apply a change to a\n\
         // running gateway with `didgated policy reload` or SIGHUP.\n\
         //\n\
         // Default deny: with no policy, every call is refused. Forbid overrides permit.\n\
         // principal: Did::\"did:key:...\", in Group::\"NAME\" ([groups] of gateway.toml, or\n\
         //   the entities file named by entities_file).\n\
         // action: Action::\"GET\" ... Action::\"DELETE\"; Action::\"read\" = GET, HEAD, OPTIONS;\n\
         //   Action::\"write\" = POST, PUT, PATCH, DELETE.\n\
         // resource: in Upstream::\"NAME\"; resource.upstream (Upstream), resource.path (String,\n\
         //   the canonical path without query), resource.segments (Long, the number of '/').\n\
         // context: time_ms, utc_hour (0-23), utc_weekday (0 = Monday), body_len (Long);\n\
         //   upstream (String); headers, query (Set<String> of names).\n\
         // @id(\"NAME\") names a policy's rule family: a refusal names the families of the\n\
         // forbids that refused (or says no permit matched), never the policy text.\n\
         // @grant_ttl_secs(\"N\") on a permit caps the lifetime of the grants it allows.\n\
         //\n\
         // Examples (remove the leading // to use them):\n//\n",
    );
    for line in EXAMPLE_POLICIES.lines() {
        if line.is_empty() {
            out.push_str("//\n");
        } else {
            out.push_str("// ");
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// The inputs of a decision besides the DID, upstream, method and path.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RequestContext {
    /// The gateway's clock when it decides, milliseconds since the Unix epoch.
    pub time_ms: u64,
    /// The signed body length, bytes.
    pub body_len: u64,
    /// The names of the headers the caller set (lower case).
    pub headers: Vec<String>,
    /// The names of the query parameters.
    pub query: Vec<String>,
}

/// The decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// At least one permit matched and no forbid did.
    Allow {
        /// The smallest `@grant_ttl_secs` of the permits that matched, if any has one. The
        /// grant lives `min(grant_ttl_secs of gateway.toml, this)` ([`Decision::grant_ttl`]).
        ttl_secs: Option<u64>,
    },
    /// Refused: by forbid policies, or because no permit matched.
    Deny {
        /// The rule families (`@id`) of the forbid policies that refused, sorted and joined by
        /// `", "`, or [`DEFAULT_DENY`] (or [`INVALID_REQUEST`]). Never policy text.
        family: String,
    },
}

impl Decision {
    /// The grant lifetime for an allowed call: the configured lifetime, capped by the
    /// matching permits. `None` for a refusal.
    pub fn grant_ttl(&self, configured_secs: u64) -> Option<u64> {
        match self {
            Self::Allow { ttl_secs } => {
                Some(ttl_secs.map_or(configured_secs, |cap| cap.min(configured_secs)))
            }
            Self::Deny { .. } => None,
        }
    }

    /// The `reason` of a `policy` refusal: names the rule family, never the policy text.
    pub fn refusal_reason(&self) -> Option<String> {
        match self {
            Self::Allow { .. } => None,
            Self::Deny { family } if family == DEFAULT_DENY || family == INVALID_REQUEST => {
                Some(format!("{family} (default deny)"))
            }
            Self::Deny { family } => Some(format!("forbidden by policy family {family}")),
        }
    }
}

/// Why a policy set cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PolicyError {
    /// A file cannot be read.
    #[error("cannot read {0}: {1}")]
    Read(String, #[source] std::io::Error),
    /// `gateway.toml` (re-read on reload) is unusable.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The policy text (named by the first field) does not parse as Cedar; the second field
    /// is the line and column of the first error, when it has one.
    #[error("{0}: {at}", at = located(.1, .2.as_ref()))]
    Parse(
        String,
        Option<(usize, usize)>,
        #[source] Box<cedar::ParseErrors>,
    ),
    /// The policies do not validate against the schema, or break a didgate rule
    /// (annotations, templates).
    #[error("{0}: {1}")]
    Invalid(String, String),
    /// The entities file holds an entity of a type other than Did and Group.
    #[error("entities: {0}")]
    Entities(String),
    /// The entities file, or the membership it and `[groups]` make, does not conform to the
    /// schema.
    #[error("entities: {0}")]
    EntitiesFile(#[source] Box<cedar::entities_errors::EntitiesError>),
    /// A member of a `[groups]` group, or a Did entity of the entities file, is not a DID
    /// (`at` names it).
    #[error("entities: {at}: {source}")]
    Member {
        /// `group NAME: MEMBER`, or the entity's uid.
        at: String,
        /// Why.
        #[source]
        source: didgate_protocol::web::PrincipalError,
    },
    /// A `[[rule]]` cannot be translated into Cedar.
    #[error("{0}")]
    Translate(String),
    /// Internal: the embedded schema does not build.
    #[error("schema: {0}")]
    Schema(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// What `didgated policy check` reports about a valid file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    /// Number of policies.
    pub policies: usize,
    /// Of which permits.
    pub permits: usize,
    /// Of which forbids.
    pub forbids: usize,
    /// The rule families (`@id`, or Cedar's `policyN` for a policy without one), sorted.
    pub families: Vec<String>,
    /// Validator warnings (the set is still valid).
    pub warnings: Vec<String>,
}

/// Entity type names, built once.
#[derive(Debug, Clone)]
struct Types {
    did: cedar::EntityTypeName,
    group: cedar::EntityTypeName,
    upstream: cedar::EntityTypeName,
    path: cedar::EntityTypeName,
    action: cedar::EntityTypeName,
}

impl Types {
    fn new() -> Result<Self, PolicyError> {
        let t = |n: &str| {
            cedar::EntityTypeName::from_str(n).map_err(|e| PolicyError::Schema(Box::new(e)))
        };
        Ok(Self {
            did: t("Did")?,
            group: t("Group")?,
            upstream: t("Upstream")?,
            path: t("Path")?,
            action: t("Action")?,
        })
    }

    fn uid(ty: &cedar::EntityTypeName, id: &str) -> cedar::EntityUid {
        cedar::EntityUid::from_type_name_and_id(ty.clone(), cedar::EntityId::new(id))
    }
}

/// A compiled, validated Cedar policy set with the callers' group membership.
#[derive(Debug)]
pub struct PolicySet {
    policies: cedar::PolicySet,
    types: Types,
    /// The action entities of the schema (method -> read/write groups); each decision adds the
    /// principal and the resource to a copy.
    actions: cedar::Entities,
    /// did -> every group it is in (transitively).
    groups_of: HashMap<String, HashSet<cedar::EntityUid>>,
    /// policy id -> rule family.
    families: HashMap<cedar::PolicyId, String>,
    /// permit id -> `@grant_ttl_secs`.
    ttl_caps: HashMap<cedar::PolicyId, u64>,
    /// Forbid policy ids.
    forbids: HashSet<cedar::PolicyId>,
    /// DIDs named in the policies, groups or entities (a did:web among them is the only kind
    /// the gateway resolves).
    known: HashSet<String>,
    summary: Summary,
    hash: [u8; 32],
    /// The entities of recent decisions, keyed by [`entity_key`]: they depend on nothing but
    /// (DID, upstream, path) (the context, which holds the time, is built per decision), and
    /// building them (a copy of the action entities, the resource's attributes, Cedar's
    /// transitive closure) cost about three times the evaluation itself.
    entities: Recent<std::sync::Arc<cedar::Entities>>,
    /// The context attributes the policies read, in a fixed order; `None` when a policy uses
    /// the context other than by naming its attributes (then no decision is cached).
    reads: Option<Vec<ContextAttr>>,
    /// Recent decisions, keyed by [`decision_key`]: the same inputs give the same decision over
    /// one policy set, so a hit is the decision Cedar would make; a policy set that reads
    /// `utc_hour` misses once per hour. A decision whose evaluation had errors is not kept
    /// (its warning is logged on every call).
    decisions: Recent<Decision>,
}

/// A bounded map of recent results, one per policy set (a reload starts empty). When full it
/// is emptied, so a caller that sends a new path every time costs what it did before the
/// cache, and it holds at most [`Recent::CAP`] entries.
#[derive(Debug)]
struct Recent<V>(std::sync::Mutex<HashMap<[u8; 32], V>>);

impl<V: Clone> Recent<V> {
    /// Entries kept at most (a few KiB each for entities).
    const CAP: usize = 512;

    fn new() -> Self {
        Self(std::sync::Mutex::default())
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<[u8; 32], V>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn get(&self, key: &[u8; 32]) -> Option<V> {
        self.map().get(key).cloned()
    }

    fn insert(&self, key: [u8; 32], value: V) {
        let mut map = self.map();
        if map.len() >= Self::CAP {
            map.clear();
        }
        map.insert(key, value);
    }
}

/// BLAKE3 over length-prefixed `parts`, the start of an unambiguous cache key.
fn keyed(parts: &[&str]) -> blake3::Hasher {
    let mut h = blake3::Hasher::new();
    for part in parts {
        length_prefixed(&mut h, part);
    }
    h
}

fn length_prefixed(h: &mut blake3::Hasher, s: &str) {
    h.update(&(s.len() as u64).to_be_bytes());
    h.update(s.as_bytes());
}

/// The key of the entities of a decision about (did, upstream, path).
fn entity_key(did: &str, upstream: &str, path: &str) -> [u8; 32] {
    *keyed(&[did, upstream, path]).finalize().as_bytes()
}

/// The key of a decision: the DID, upstream, method and path (which fix the entities), then
/// each read attribute's tag and value (numbers as u64, names counted and length-prefixed).
fn decision_key(
    did: &str,
    upstream: &str,
    method: &str,
    path: &str,
    ctx: &RequestContext,
    reads: &[ContextAttr],
) -> [u8; 32] {
    let mut h = keyed(&[did, upstream, method, path]);
    for attr in reads {
        h.update(&[*attr as u8]);
        let number = match attr {
            ContextAttr::TimeMs => ctx.time_ms,
            ContextAttr::UtcHour => utc_hour(ctx.time_ms),
            ContextAttr::UtcWeekday => utc_weekday(ctx.time_ms),
            ContextAttr::BodyLen => ctx.body_len,
            // the upstream is in the key already
            ContextAttr::Upstream => continue,
            ContextAttr::Headers => ctx.headers.len() as u64,
            ContextAttr::Query => ctx.query.len() as u64,
        };
        h.update(&number.to_be_bytes());
        let names = match attr {
            ContextAttr::Headers => &ctx.headers,
            ContextAttr::Query => &ctx.query,
            _ => continue,
        };
        for n in names {
            length_prefixed(&mut h, n);
        }
    }
    *h.finalize().as_bytes()
}

/// An attribute of a decision's context (specs/operation.md, "The request in Cedar").
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum ContextAttr {
    TimeMs,
    UtcHour,
    UtcWeekday,
    BodyLen,
    Upstream,
    Headers,
    Query,
}

impl ContextAttr {
    fn named(name: &str) -> Option<Self> {
        Some(match name {
            "time_ms" => Self::TimeMs,
            "utc_hour" => Self::UtcHour,
            "utc_weekday" => Self::UtcWeekday,
            "body_len" => Self::BodyLen,
            "upstream" => Self::Upstream,
            "headers" => Self::Headers,
            "query" => Self::Query,
            _ => return None,
        })
    }
}

/// The hour of the day (UTC, 0-23) at `time_ms`.
fn utc_hour(time_ms: u64) -> u64 {
    time_ms / 3_600_000 % 24
}

/// The day of the week (UTC, Monday = 0) at `time_ms`: 1970-01-01 was a Thursday.
fn utc_weekday(time_ms: u64) -> u64 {
    (time_ms / 86_400_000 + 3) % 7
}

/// The context attributes `policies` read, sorted; `None` (no decision cached) when one of
/// them uses `context` other than as `context.NAME`, `context["NAME"]` or `context has NAME`,
/// cannot be read as Cedar JSON, or reads `time_ms` (which differs on every call: caching
/// would only cost a lookup and an insertion each time).
fn context_reads(policies: &cedar::PolicySet) -> Option<Vec<ContextAttr>> {
    let mut reads = BTreeSet::new();
    for p in policies.policies() {
        let json = p.to_json().ok()?;
        for c in json.get("conditions")?.as_array()? {
            context_reads_in(c.get("body")?, &mut reads)?;
        }
    }
    if reads.contains(&ContextAttr::TimeMs) {
        return None;
    }
    Some(reads.into_iter().collect())
}

/// Adds the context attributes EST expression `e` reads to `reads`; `None` when it uses the
/// context as a whole.
fn context_reads_in(e: &serde_json::Value, reads: &mut BTreeSet<ContextAttr>) -> Option<()> {
    use serde_json::Value;
    match e {
        Value::Array(items) => items.iter().try_for_each(|x| context_reads_in(x, reads)),
        Value::Object(m) => {
            if m.get("Var").and_then(Value::as_str) == Some("context") {
                return None;
            }
            // an expression is an object with one key, its operator: `{".": {"left": ..,
            // "attr": ..}}`; anything else is walked whole
            for op in [".", "has"] {
                if m.len() == 1
                    && let Some(access) = m.get(op)
                    && access
                        .get("left")
                        .and_then(|l| l.get("Var"))
                        .and_then(Value::as_str)
                        == Some("context")
                {
                    let name = access.get("attr").and_then(Value::as_str)?;
                    reads.insert(ContextAttr::named(name)?);
                    return Some(());
                }
            }
            m.values().try_for_each(|v| context_reads_in(v, reads))
        }
        _ => Some(()),
    }
}

fn schema() -> Result<cedar::Schema, PolicyError> {
    cedar::Schema::from_cedarschema_str(SCHEMA)
        .map(|(s, _warnings)| s)
        .map_err(|e| PolicyError::Schema(Box::new(e)))
}

/// Renders a Cedar parse or validation error with its location in `text` when it has one.
fn describe(e: &dyn miette::Diagnostic, text: &str) -> String {
    located(&location(e, text), e)
}

/// The line and column (from 1) in `text` of a Cedar error's first label, if it has one.
fn location(e: &dyn miette::Diagnostic, text: &str) -> Option<(usize, usize)> {
    let offset = e.labels().and_then(|mut l| l.next()).map(|l| l.offset())?;
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let col = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
    Some((line, col))
}

/// A Cedar error's text and help, after its location `at` when known.
fn located(at: &Option<(usize, usize)>, e: &dyn miette::Diagnostic) -> String {
    let mut out = e.to_string();
    if let Some(help) = e.help() {
        out.push_str(&format!(" ({help})"));
    }
    match at {
        Some((line, col)) => format!("line {line} column {col}: {out}"),
        None => out,
    }
}

/// Cedar string literal body: escapes `\`, `"` and control characters.
fn cedar_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            c if c.is_control() => out.push_str(&format!("\\u{{{:x}}}", c as u32)),
            c => out.push(c),
        }
    }
    out
}

impl PolicySet {
    /// Loads the policy set a configuration names: the Cedar file `policy_file` (relative to
    /// `data_dir`), or else the translation of its `[[rule]]` list; with the membership of
    /// `[groups]` and of the entities file `entities_file`, if any.
    pub fn load(data_dir: &Path, config: &Config) -> Result<Self, PolicyError> {
        let doc = Self::document(data_dir, config)?;
        Self::compile(
            &doc.source,
            &doc.text,
            config.groups(),
            doc.entities.as_deref(),
        )
    }

    /// What [`PolicySet::load`] compiles, as read from the files a configuration names: the
    /// policy text (or the `[[rule]]` translation) and the entities file; what a cluster node
    /// publishes so that every node compiles the same (with its own `[groups]`).
    pub fn document(
        data_dir: &Path,
        config: &Config,
    ) -> Result<didgate_cluster::PolicyDocument, PolicyError> {
        let read = |name: &str| {
            let p = data_dir.join(name);
            std::fs::read_to_string(&p)
                .map(|t| (p.display().to_string(), t))
                .map_err(|e| PolicyError::Read(p.display().to_string(), e))
        };
        let (source, text) = match &config.gateway().policy_file {
            Some(f) => read(f)?,
            None => (
                "gateway.toml [[rule]]".to_string(),
                translate_rules(config.rules())?,
            ),
        };
        let entities = match &config.gateway().entities_file {
            Some(f) => Some(read(f)?.1),
            None => None,
        };
        Ok(didgate_cluster::PolicyDocument {
            source,
            text,
            entities,
        })
    }

    /// Validates the Cedar policy file at `path` against the schema (strict mode) and the
    /// didgate annotation rules, without loading any membership.
    pub fn check_file(path: &Path) -> Result<Summary, PolicyError> {
        Ok(Self::check_file_against(path, None)?.0)
    }

    /// Like [`PolicySet::check_file`], and with `known` (a data directory's names,
    /// [`KnownNames::load`]) also lists every group, upstream, action and operation path the
    /// policies name that `known` lacks ([`PolicySet::unknown_names`]).
    pub fn check_file_against(
        path: &Path,
        known: Option<&KnownNames>,
    ) -> Result<(Summary, Vec<UnknownName>), PolicyError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| PolicyError::Read(path.display().to_string(), e))?;
        let set = Self::compile(&path.display().to_string(), &text, &BTreeMap::new(), None)?;
        let unknown = match known {
            Some(k) => set.unknown_names(k)?,
            None => Vec::new(),
        };
        Ok((set.summary, unknown))
    }

    /// Compiles policy text (`source` names it in errors) with the membership of `groups`
    /// (group name -> member DIDs) and of a Cedar entities JSON document.
    pub fn compile(
        source: &str,
        text: &str,
        groups: &BTreeMap<String, Vec<String>>,
        entities_json: Option<&str>,
    ) -> Result<Self, PolicyError> {
        let schema = schema()?;
        let types = Types::new()?;
        let policies = cedar::PolicySet::from_str(text)
            .map_err(|e| PolicyError::Parse(source.into(), location(&e, text), Box::new(e)))?;
        let invalid = |m: String| PolicyError::Invalid(source.into(), m);
        if policies.templates().next().is_some() {
            return Err(invalid(
                "policy templates (?principal, ?resource) are not supported".into(),
            ));
        }
        let warnings = validate_text(source, text, &policies, &schema)?;
        let Annotations {
            families,
            ttl_caps,
            forbids,
            permits,
            forbid_count,
        } = annotations(source, &policies)?;
        let mut family_list: Vec<String> = families.values().cloned().collect();
        family_list.sort();
        family_list.dedup();
        let summary = Summary {
            policies: permits + forbid_count,
            permits,
            forbids: forbid_count,
            families: family_list,
            warnings,
        };

        let (groups_of, membership) = membership(groups, entities_json, &schema, &types)?;
        let actions = schema
            .action_entities()
            .map_err(|e| PolicyError::Schema(Box::new(e)))?;

        let mut known: HashSet<String> = groups_of.keys().cloned().collect();
        known.extend(dids_in(text));

        let mut hasher = blake3::Hasher::new_derive_key(HASH_CONTEXT);
        hasher.update(&(text.len() as u64).to_be_bytes());
        hasher.update(text.as_bytes());
        for line in &membership {
            hasher.update(line.as_bytes());
        }
        Ok(Self {
            types,
            actions,
            groups_of,
            families,
            ttl_caps,
            forbids,
            known,
            summary,
            hash: *hasher.finalize().as_bytes(),
            entities: Recent::new(),
            reads: context_reads(&policies),
            decisions: Recent::new(),
            policies,
        })
    }

    /// The set's hash, recorded in every audit entry it decided: BLAKE3 in derive-key mode
    /// with [`HASH_CONTEXT`] over `u64be(len(text)) || text || membership`, where membership
    /// is one line `CHILD in ANCESTOR\n` per (entity, transitive ancestor) pair, entity uids
    /// written as Cedar prints them (`Did::"did:key:..."`, `Group::"payers"`), lines sorted
    /// bytewise.
    pub fn hash(&self) -> [u8; 32] {
        self.hash
    }

    /// What the set holds.
    pub fn summary(&self) -> &Summary {
        &self.summary
    }

    /// Whether the policy text, the groups or the entities name this DID (its refusals are
    /// audited one by one; others are counted into the aggregate entry).
    pub fn knows(&self, did: &str) -> bool {
        self.known.contains(did)
    }

    /// Decides the exact (DID, upstream, method, path) in `ctx`. Default deny; forbid
    /// overrides permit; a forbid policy whose evaluation fails counts as matching (fail
    /// closed), a permit whose evaluation fails as not matching.
    pub fn decide(
        &self,
        did: &str,
        upstream: &str,
        method: &str,
        path: &str,
        ctx: &RequestContext,
    ) -> Decision {
        let deny = |family: &str| Decision::Deny {
            family: family.to_string(),
        };
        let key = self
            .reads
            .as_deref()
            .map(|reads| decision_key(did, upstream, method, path, ctx, reads));
        if let Some(hit) = key.as_ref().and_then(|k| self.decisions.get(k)) {
            return hit;
        }
        let Some(request) = self.request(did, upstream, method, path, ctx) else {
            return deny(INVALID_REQUEST);
        };
        let Some(entities) = self.entities_for(did, upstream, path, &request) else {
            return deny(INVALID_REQUEST);
        };
        let response =
            cedar::Authorizer::new().is_authorized(&request.2, &self.policies, &entities);
        let decision = self.decision(&response);
        if let Some(key) = key
            && response.diagnostics().errors().next().is_none()
        {
            self.decisions.insert(key, decision.clone());
        }
        decision
    }

    /// The entities of a decision about (did, upstream, path), from the cache or built (and
    /// kept): `None` when Cedar refuses them (an invalid request).
    fn entities_for(
        &self,
        did: &str,
        upstream: &str,
        path: &str,
        request: &(cedar::EntityUid, cedar::EntityUid, cedar::Request),
    ) -> Option<std::sync::Arc<cedar::Entities>> {
        let key = entity_key(did, upstream, path);
        if let Some(hit) = self.entities.get(&key) {
            return Some(hit);
        }
        let built = std::sync::Arc::new(self.build_entities(did, upstream, path, request)?);
        self.entities.insert(key, built.clone());
        Some(built)
    }

    /// Builds the entities of a decision: the action entities, the principal with its groups,
    /// the resource with its attributes, its upstream.
    fn build_entities(
        &self,
        did: &str,
        upstream: &str,
        path: &str,
        request: &(cedar::EntityUid, cedar::EntityUid, cedar::Request),
    ) -> Option<cedar::Entities> {
        let principal = cedar::Entity::new_no_attrs(
            request.0.clone(),
            self.groups_of.get(did).cloned().unwrap_or_default(),
        );
        let up = Types::uid(&self.types.upstream, upstream);
        let resource = cedar::Entity::new(
            request.1.clone(),
            [
                (
                    "upstream".to_string(),
                    cedar::RestrictedExpression::new_entity_uid(up.clone()),
                ),
                (
                    "path".to_string(),
                    cedar::RestrictedExpression::new_string(path.into()),
                ),
                (
                    "segments".to_string(),
                    cedar::RestrictedExpression::new_long(
                        i64::try_from(path.matches('/').count()).unwrap_or(i64::MAX),
                    ),
                ),
            ]
            .into_iter()
            .collect(),
            [up.clone()].into_iter().collect(),
        );
        self.actions
            .clone()
            .add_entities(
                [
                    principal,
                    resource.ok()?,
                    cedar::Entity::new_no_attrs(up, HashSet::new()),
                ],
                None,
            )
            .ok()
    }

    /// The decision Cedar's response makes, with the families of the forbid policies that
    /// refused (or failed to evaluate: a forbid in error refuses) and the permits' TTL caps.
    fn decision(&self, response: &cedar::Response) -> Decision {
        let deny = |family: &str| Decision::Deny {
            family: family.to_string(),
        };
        let diagnostics = response.diagnostics();
        let mut refusing = BTreeSet::new();
        for e in diagnostics.errors() {
            let cedar::AuthorizationError::PolicyEvaluationError(e) = e;
            tracing::warn!(policy = %self.family(e.policy_id()), error = %e.inner(), "policy evaluation error");
            if self.forbids.contains(e.policy_id()) {
                refusing.insert(self.family(e.policy_id()));
            }
        }
        match response.decision() {
            cedar::Decision::Allow if refusing.is_empty() => Decision::Allow {
                ttl_secs: diagnostics
                    .reason()
                    .filter_map(|id| self.ttl_caps.get(id).copied())
                    .min(),
            },
            cedar::Decision::Allow => deny(&join(refusing)),
            cedar::Decision::Deny => {
                refusing.extend(
                    diagnostics
                        .reason()
                        .filter(|id| self.forbids.contains(*id))
                        .map(|id| self.family(id)),
                );
                if refusing.is_empty() {
                    deny(DEFAULT_DENY)
                } else {
                    deny(&join(refusing))
                }
            }
        }
    }

    fn family(&self, id: &cedar::PolicyId) -> String {
        self.families
            .get(id)
            .cloned()
            .unwrap_or_else(|| id.to_string())
    }

    /// (principal, resource, request), built to the schema (checking it again per request
    /// would cost more than the decision).
    fn request(
        &self,
        did: &str,
        upstream: &str,
        method: &str,
        path: &str,
        ctx: &RequestContext,
    ) -> Option<(cedar::EntityUid, cedar::EntityUid, cedar::Request)> {
        // the request is built to the schema; only the method needs checking
        if !METHODS.contains(&method) {
            return None;
        }
        let principal = Types::uid(&self.types.did, did);
        let action = Types::uid(&self.types.action, method);
        let resource = Types::uid(&self.types.path, &format!("{upstream}{path}"));
        let long =
            |v: u64| cedar::RestrictedExpression::new_long(i64::try_from(v).unwrap_or(i64::MAX));
        let names = |v: &[String]| {
            cedar::RestrictedExpression::new_set(
                v.iter()
                    .map(|s| cedar::RestrictedExpression::new_string(s.clone())),
            )
        };
        let context = cedar::Context::from_pairs([
            ("time_ms".to_string(), long(ctx.time_ms)),
            ("utc_hour".to_string(), long(utc_hour(ctx.time_ms))),
            ("utc_weekday".to_string(), long(utc_weekday(ctx.time_ms))),
            ("body_len".to_string(), long(ctx.body_len)),
            (
                "upstream".to_string(),
                cedar::RestrictedExpression::new_string(upstream.into()),
            ),
            ("headers".to_string(), names(&ctx.headers)),
            ("query".to_string(), names(&ctx.query)),
        ])
        .ok()?;
        let request =
            cedar::Request::new(principal.clone(), action, resource.clone(), context, None).ok()?;
        Some((principal, resource, request))
    }
}

fn join(families: BTreeSet<String>) -> String {
    families.into_iter().collect::<Vec<_>>().join(", ")
}

fn family_of(policies: &cedar::PolicySet, id: &cedar::PolicyId) -> String {
    policies
        .policy(id)
        .and_then(|p| p.annotation("id"))
        .map_or_else(|| id.to_string(), str::to_string)
}

/// Every did:key and did:web named in `text` (entity literals, or anywhere else).
fn dids_in(text: &str) -> HashSet<String> {
    let mut out = did_keys_in(text);
    let mut rest = text;
    while let Some(i) = rest.find("did:web:") {
        let tail = &rest[i..];
        let len = tail
            .bytes()
            .take_while(|b| b.is_ascii_alphanumeric() || b":.%_~-".contains(b))
            .count();
        if let Some(candidate) = tail.get(..len)
            && WebDid::parse(candidate).is_ok()
        {
            out.insert(candidate.to_string());
        }
        rest = &tail["did:web:".len()..];
    }
    out
}

fn did_keys_in(text: &str) -> HashSet<String> {
    const B58: &[u8] = b"123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz";
    let mut out = HashSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("did:key:") {
        let tail = &rest[i..];
        let len = "did:key:".len()
            + tail
                .bytes()
                .skip("did:key:".len())
                .take_while(|b| B58.contains(b))
                .count();
        if let Some(candidate) = tail.get(..len)
            && Did::parse(candidate).is_ok()
        {
            out.insert(candidate.to_string());
        }
        rest = &tail["did:key:".len()..];
    }
    out
}

/// Translates a `[[rule]]` list into Cedar text with the same meaning: one permit per rule,
/// `@id("rule-N")` (N = its index in the list). Path patterns become `like` patterns with a
/// segment count. A pattern with a `*` segment followed by a literal segment and a final `**`
/// has no exact translation and is refused (write such a policy in a policy file).
pub fn translate_rules(rules: &[Rule]) -> Result<String, PolicyError> {
    let mut out = String::from(
        "// Generated from the [[rule]] list of gateway.toml (specs/protocol.md, \"Policy\").\n",
    );
    for (i, r) in rules.iter().enumerate() {
        let principals: Vec<String> = r
            .principals
            .iter()
            .map(|p| match p.strip_prefix("group:") {
                Some(g) => format!("principal in Group::\"{}\"", cedar_escape(g)),
                None => format!("principal == Did::\"{}\"", cedar_escape(p)),
            })
            .collect();
        let methods: Vec<String> = r
            .methods
            .iter()
            .filter(|m| METHODS.contains(&m.as_str()))
            .map(|m| format!("Action::\"{m}\""))
            .collect();
        let mut paths = Vec::new();
        for p in &r.paths {
            match pattern_condition(p) {
                Ok(Some(c)) => paths.push(c),
                Ok(None) => {}
                Err(why) => {
                    return Err(PolicyError::Translate(format!(
                        "rule {i}: path pattern {p:?}: {why}; write this rule in a policy file (policy_file)"
                    )));
                }
            }
        }
        if principals.is_empty() || methods.is_empty() || paths.is_empty() {
            out.push_str(&format!("\n// rule-{i} allows nothing\n"));
            continue;
        }
        out.push_str(&format!(
            "\n@id(\"rule-{i}\")\npermit (\n  principal,\n  action in [{}],\n  resource in Upstream::\"{}\"\n) when {{\n  ({}) &&\n  ({})\n}};\n",
            methods.join(", "),
            cedar_escape(&r.upstream),
            principals.join(" || "),
            paths.join(" ||\n   "),
        ));
    }
    Ok(out)
}

/// The Cedar condition on `resource` for one legacy path pattern, exact for canonical paths
/// (specs/protocol.md, "Canonical requests"). `Ok(None)`: the pattern never matches.
fn pattern_condition(pattern: &str) -> Result<Option<String>, &'static str> {
    let Some(rest) = pattern.strip_prefix('/') else {
        return Ok(None);
    };
    let segs: Vec<&str> = rest.split('/').collect();
    let n = segs.len();
    let last_is_any = segs.last() == Some(&"**");
    if segs[..n - 1].contains(&"**") {
        return Ok(None);
    }
    let mut like = String::new();
    let mut seen_star = false;
    for (k, s) in segs.iter().enumerate() {
        like.push('/');
        match *s {
            "*" | "**" => {
                seen_star = true;
                like.push('*');
            }
            lit => {
                // canonical paths hold only printable ASCII, never a backslash
                if !lit.bytes().all(|b| (0x21..0x7f).contains(&b) && b != b'\\') {
                    return Ok(None);
                }
                if seen_star && last_is_any && k < n - 1 {
                    return Err("a literal segment after `*` cannot precede a final `**`");
                }
                for c in lit.chars() {
                    match c {
                        '*' => like.push_str("\\*"),
                        '"' => like.push_str("\\\""),
                        c => like.push(c),
                    }
                }
            }
        }
    }
    let mut cond = format!("resource.path like \"{like}\"");
    if last_is_any {
        // one or more further segments, the first not empty
        cond.push_str(&format!(
            " && resource.segments >= {n} && !(resource.segments == {n} && resource.path like \"*/\")"
        ));
    } else {
        cond.push_str(&format!(" && resource.segments == {n}"));
        if segs.last() == Some(&"*") {
            cond.push_str(" && !(resource.path like \"*/\")");
        }
    }
    Ok(Some(format!("({cond})")))
}

/// Legacy matcher of `[[rule]]` path patterns: literal segments, `*` for exactly one
/// non-empty segment, and a final `**` for one or more remaining segments. [`translate_rules`]
/// is exact with respect to it on canonical paths.
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

/// Validates `policies` (parsed from `text`) against the schema in strict mode: the errors
/// refuse the set, the warnings are returned for the summary.
fn validate_text(
    source: &str,
    text: &str,
    policies: &cedar::PolicySet,
    schema: &cedar::Schema,
) -> Result<Vec<String>, PolicyError> {
    let invalid = |m: String| PolicyError::Invalid(source.into(), m);
    let result =
        cedar::Validator::new(schema.clone()).validate(policies, cedar::ValidationMode::Strict);
    if !result.validation_passed() {
        let errors: Vec<String> = result
            .validation_errors()
            .map(|e| {
                format!(
                    "policy {}: {}",
                    family_of(policies, e.policy_id()),
                    describe(e, text)
                )
            })
            .collect();
        return Err(invalid(errors.join("; ")));
    }
    let warnings: Vec<String> = result
        .validation_warnings()
        .map(|w| {
            format!(
                "policy {}: {}",
                family_of(policies, w.policy_id()),
                describe(w, text)
            )
        })
        .collect();
    Ok(warnings)
}

/// What a policy set's annotations say.
struct Annotations {
    /// Policy id -> its family (`@id`, else its own id).
    families: HashMap<cedar::PolicyId, String>,
    /// Policy id -> its `@grant_ttl_secs`.
    ttl_caps: HashMap<cedar::PolicyId, u64>,
    /// The forbid policies.
    forbids: HashSet<cedar::PolicyId>,
    permits: usize,
    forbid_count: usize,
}

/// Reads and checks the `@id` and `@grant_ttl_secs` annotations of every policy.
fn annotations(source: &str, policies: &cedar::PolicySet) -> Result<Annotations, PolicyError> {
    let invalid = |m: String| PolicyError::Invalid(source.into(), m);
    let mut families = HashMap::new();
    let mut ttl_caps = HashMap::new();
    let mut forbids = HashSet::new();
    let (mut permits, mut forbid_count) = (0, 0);
    for p in policies.policies() {
        let family = match p.annotation("id") {
            Some(id) => {
                if id.is_empty()
                    || id.len() > 64
                    || !id
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-_.:/".contains(&b))
                {
                    return Err(invalid(format!(
                        "policy {}: @id must be 1-64 characters of letters, digits and - _ . : /",
                        p.id()
                    )));
                }
                id.to_string()
            }
            None => p.id().to_string(),
        };
        match p.effect() {
            cedar::Effect::Permit => permits += 1,
            cedar::Effect::Forbid => {
                forbid_count += 1;
                forbids.insert(p.id().clone());
            }
        }
        if let Some(ttl) = p.annotation("grant_ttl_secs") {
            if p.effect() == cedar::Effect::Forbid {
                return Err(invalid(format!(
                    "policy {family}: @grant_ttl_secs applies to permit policies only"
                )));
            }
            let secs = ttl.parse::<u64>().ok().filter(|s| *s >= 1).ok_or_else(|| {
                invalid(format!(
                    "policy {family}: @grant_ttl_secs must be a whole number of seconds >= 1, not {ttl:?}"
                ))
            })?;
            ttl_caps.insert(p.id().clone(), secs);
        }
        families.insert(p.id().clone(), family);
    }
    Ok(Annotations {
        families,
        ttl_caps,
        forbids,
        permits,
        forbid_count,
    })
}

/// DID -> the groups it is in (transitively), and the membership lines the set's hash
/// covers: from `[groups]` and the entities file, merged.
type Membership = (HashMap<String, HashSet<cedar::EntityUid>>, BTreeSet<String>);

/// The membership of `groups` and of the entities document `entities_json`.
fn membership(
    groups: &BTreeMap<String, Vec<String>>,
    entities_json: Option<&str>,
    schema: &cedar::Schema,
    types: &Types,
) -> Result<Membership, PolicyError> {
    // Membership: [groups] and the entities file, merged.
    let mut parents: BTreeMap<cedar::EntityUid, HashSet<cedar::EntityUid>> = BTreeMap::new();
    for (group, members) in groups {
        let g = Types::uid(&types.group, group);
        parents.entry(g.clone()).or_default();
        for m in members {
            Principal::parse(m).map_err(|source| PolicyError::Member {
                at: format!("group {group}: {m}"),
                source,
            })?;
            parents
                .entry(Types::uid(&types.did, m))
                .or_default()
                .insert(g.clone());
        }
    }
    if let Some(json) = entities_json {
        let file = cedar::Entities::from_json_str(json, Some(schema))
            .map_err(|e| PolicyError::EntitiesFile(Box::new(e)))?;
        for e in file.iter() {
            let (uid, _attrs, ps) = e.clone().into_inner();
            let ty = uid.type_name();
            if *ty == types.action {
                continue;
            }
            if *ty != types.did && *ty != types.group {
                return Err(PolicyError::Entities(format!(
                    "{uid}: the entities file holds only Did and Group entities"
                )));
            }
            if *ty == types.did {
                Principal::parse(uid.id().unescaped()).map_err(|source| PolicyError::Member {
                    at: uid.to_string(),
                    source,
                })?;
            }
            parents.entry(uid).or_default().extend(ps);
        }
    }
    let base = cedar::Entities::from_entities(
        parents
            .iter()
            .map(|(uid, ps)| cedar::Entity::new_no_attrs(uid.clone(), ps.clone())),
        Some(schema),
    )
    .map_err(|e| PolicyError::EntitiesFile(Box::new(e)))?;
    let mut groups_of = HashMap::new();
    let mut membership = BTreeSet::new();
    for e in base.iter() {
        let uid = e.uid();
        if *uid.type_name() != types.did && *uid.type_name() != types.group {
            continue;
        }
        let ancestors: HashSet<cedar::EntityUid> = base
            .ancestors(&uid)
            .into_iter()
            .flatten()
            .cloned()
            .collect();
        for a in &ancestors {
            membership.insert(format!("{uid} in {a}\n"));
        }
        if *uid.type_name() == types.did {
            groups_of.insert(uid.id().unescaped().to_string(), ancestors);
        }
    }
    Ok((groups_of, membership))
}

/// Names of a data directory that policies may refer to: what `didgated policy check --data
/// DIR` compares the entity literals and paths of the policies with (specs/operation.md,
/// "Policy").
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KnownNames {
    /// Groups: the keys of `[groups]`, and the `Group` entities of the entities file and the
    /// groups they are in.
    pub groups: BTreeSet<String>,
    /// Upstreams: the names of the `[[upstream]]` tables.
    pub upstreams: BTreeSet<String>,
    /// Every `[[upstream.operation]]`, in configuration order.
    pub operations: Vec<KnownOperation>,
}

/// One `[[upstream.operation]]` of [`KnownNames`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KnownOperation {
    /// Its upstream.
    pub upstream: String,
    /// Its name.
    pub name: String,
    /// Its method.
    pub method: String,
    /// Its path template (whole segments may be `{param}`).
    pub path: String,
}

impl KnownNames {
    /// The names of `DIR/gateway.toml` and of the entities file it names.
    pub fn load(data_dir: &Path) -> Result<Self, PolicyError> {
        let config = Config::load(&data_dir.join("gateway.toml"))?;
        Self::of_config(data_dir, &config)
    }

    /// The names of `config`, its entities file read relative to `data_dir`.
    pub fn of_config(data_dir: &Path, config: &Config) -> Result<Self, PolicyError> {
        let mut groups: BTreeSet<String> = config.groups().keys().cloned().collect();
        if let Some(f) = &config.gateway().entities_file {
            let p = data_dir.join(f);
            let json = std::fs::read_to_string(&p)
                .map_err(|e| PolicyError::Read(p.display().to_string(), e))?;
            groups.extend(entity_groups(&json)?);
        }
        let upstreams = config
            .upstreams()
            .iter()
            .map(|u| u.name().to_string())
            .collect();
        let operations = config
            .upstreams()
            .iter()
            .flat_map(|u| {
                u.operations().iter().map(move |op| KnownOperation {
                    upstream: u.name().to_string(),
                    name: op.name.clone(),
                    method: op.method.clone(),
                    path: op.path.clone(),
                })
            })
            .collect();
        Ok(Self {
            groups,
            upstreams,
            operations,
        })
    }
}

/// The `Group` entities of a Cedar entities document, and the groups its entities are in.
fn entity_groups(json: &str) -> Result<BTreeSet<String>, PolicyError> {
    let schema = schema()?;
    let types = Types::new()?;
    let entities = cedar::Entities::from_json_str(json, Some(&schema))
        .map_err(|e| PolicyError::EntitiesFile(Box::new(e)))?;
    let mut out = BTreeSet::new();
    for e in entities.iter() {
        let (uid, _attrs, parents) = e.clone().into_inner();
        for u in std::iter::once(uid).chain(parents) {
            if *u.type_name() == types.group {
                out.insert(u.id().unescaped().to_string());
            }
        }
    }
    Ok(out)
}

/// A name a policy refers to that the data directory does not know (`policy check --data`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownName {
    /// The policy: its `@id`, or `policyN` without one.
    pub policy: String,
    /// What it names and what is known, e.g. `Group::"agnets" is not a group of gateway.toml
    /// (known: agents, readers)`.
    pub message: String,
}

impl std::fmt::Display for UnknownName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "policy \"{}\": {}", self.policy, self.message)
    }
}

impl PolicySet {
    /// Every group, upstream, action and operation the policies name that `known` lacks, in
    /// the order of the policies, each once per policy (specs/operation.md, "Policy"). Names are
    /// read from the policies' syntax trees: the scope's entities, and in the conditions every
    /// entity literal, every string compared with `context.upstream`, and the paths a permit
    /// requires (`resource.path == "P"` or `like "P"` in a `when` clause, not under a `!`).
    pub fn unknown_names(&self, known: &KnownNames) -> Result<Vec<UnknownName>, PolicyError> {
        let mut policies: Vec<&cedar::Policy> = self.policies.policies().collect();
        policies.sort_by_key(|p| policy_order(p.id()));
        let mut out = Vec::new();
        let mut seen = HashSet::new();
        for p in policies {
            let policy = family_of(&self.policies, p.id());
            let named = Named::of(p).map_err(|e| PolicyError::Invalid(policy.clone(), e))?;
            for message in named.unknown(known) {
                if seen.insert((policy.clone(), message.clone())) {
                    out.push(UnknownName {
                        policy: policy.clone(),
                        message,
                    });
                }
            }
        }
        Ok(out)
    }
}

/// Policies in the order of the text (`policy0`, `policy1`, ... as Cedar names them).
fn policy_order(id: &cedar::PolicyId) -> (usize, String) {
    let id = id.to_string();
    let n = id
        .strip_prefix("policy")
        .and_then(|n| n.parse().ok())
        .unwrap_or(usize::MAX);
    (n, id)
}

/// An element of a `like` pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
enum LikeElem {
    /// `*`: any run of characters.
    Any,
    /// Literal text.
    Text(String),
}

/// A path a permit requires: `resource.path == "P"` or `resource.path like "P"`.
#[derive(Debug, Clone, PartialEq, Eq)]
enum PathName {
    Exact(String),
    Like(Vec<LikeElem>),
}

impl PathName {
    /// Whether this path names the operation whose path template is `template`: an exact path
    /// segment by segment (a `{param}` segment stands for any non-empty one); a `like` pattern
    /// against the template as written (as the catalog decides an operation).
    fn names(&self, template: &str) -> bool {
        match self {
            Self::Exact(path) => {
                let t: Vec<&str> = template.split('/').collect();
                let p: Vec<&str> = path.split('/').collect();
                t.len() == p.len()
                    && t.iter().zip(&p).all(|(t, p)| {
                        t == p
                            || (t.len() > 2
                                && t.starts_with('{')
                                && t.ends_with('}')
                                && !p.is_empty())
                    })
            }
            Self::Like(pattern) => like(pattern, template),
        }
    }

    /// As Cedar text.
    fn render(&self) -> String {
        match self {
            Self::Exact(p) => format!("resource.path == \"{}\"", cedar_escape(p)),
            Self::Like(elems) => {
                let mut s = String::new();
                for e in elems {
                    match e {
                        LikeElem::Any => s.push('*'),
                        LikeElem::Text(t) => s.push_str(&cedar_escape(t).replace('*', "\\*")),
                    }
                }
                format!("resource.path like \"{s}\"")
            }
        }
    }
}

/// Cedar's `like`: each [`LikeElem::Any`] matches any run of characters, `/` included.
fn like(pattern: &[LikeElem], s: &str) -> bool {
    let p: Vec<Option<char>> = pattern
        .iter()
        .flat_map(|e| match e {
            LikeElem::Any => vec![None],
            LikeElem::Text(t) => t.chars().map(Some).collect(),
        })
        .collect();
    let s: Vec<char> = s.chars().collect();
    let (mut pi, mut si) = (0, 0);
    // the last `*` seen and where in `s` it has been tried up to
    let mut star: Option<(usize, usize)> = None;
    while let Some(c) = s.get(si) {
        match p.get(pi) {
            Some(None) => {
                star = Some((pi, si));
                pi += 1;
            }
            Some(Some(pc)) if pc == c => {
                pi += 1;
                si += 1;
            }
            _ => match star {
                Some((sp, ss)) => {
                    pi = sp + 1;
                    si = ss + 1;
                    star = Some((sp, ss + 1));
                }
                None => return false,
            },
        }
    }
    p.iter().skip(pi).all(Option::is_none)
}

/// What one policy names.
#[derive(Debug, Default)]
struct Named {
    /// Entity literals (type, id), in the order met: scope first, then conditions.
    entities: Vec<(String, String)>,
    /// Strings compared with `context.upstream`.
    upstreams: Vec<String>,
    /// Paths a permit requires in its `when` clauses (not under a `!`).
    paths: Vec<PathName>,
}

impl Named {
    /// Reads the scope from the policy's syntax tree, and its conditions from their Cedar JSON
    /// (EST) form.
    fn of(p: &cedar::Policy) -> Result<Self, String> {
        let mut named = Self::default();
        match p.principal_constraint() {
            cedar::PrincipalConstraint::In(u)
            | cedar::PrincipalConstraint::Eq(u)
            | cedar::PrincipalConstraint::IsIn(_, u) => named.uid(&u),
            cedar::PrincipalConstraint::Any | cedar::PrincipalConstraint::Is(_) => {}
        }
        match p.action_constraint() {
            cedar::ActionConstraint::In(us) => us.iter().for_each(|u| named.uid(u)),
            cedar::ActionConstraint::Eq(u) => named.uid(&u),
            cedar::ActionConstraint::Any => {}
        }
        match p.resource_constraint() {
            cedar::ResourceConstraint::In(u)
            | cedar::ResourceConstraint::Eq(u)
            | cedar::ResourceConstraint::IsIn(_, u) => named.uid(&u),
            cedar::ResourceConstraint::Any | cedar::ResourceConstraint::Is(_) => {}
        }
        let json = p.to_json().map_err(|e| e.to_string())?;
        let permit = p.effect() == cedar::Effect::Permit;
        let conditions = json.get("conditions").and_then(serde_json::Value::as_array);
        for c in conditions.into_iter().flatten() {
            let when = c.get("kind").and_then(serde_json::Value::as_str) == Some("when");
            if let Some(body) = c.get("body") {
                named.walk(body, permit && when);
            }
        }
        Ok(named)
    }

    fn uid(&mut self, u: &cedar::EntityUid) {
        self.entities
            .push((u.type_name().to_string(), u.id().unescaped().to_string()));
    }

    /// Walks an EST expression; `positive`: a path met here is one the policy requires.
    fn walk(&mut self, e: &serde_json::Value, positive: bool) {
        use serde_json::Value;
        match e {
            Value::Array(items) => items.iter().for_each(|x| self.walk(x, positive)),
            Value::Object(m) => {
                if let Some(uid) = m.get("__entity").and_then(entity_ref) {
                    self.entities.push(uid);
                    return;
                }
                if let Some(arg) = m.get("!") {
                    self.walk(arg, !positive);
                    return;
                }
                if let Some(operands) = m.get("==") {
                    self.compare(operands, positive);
                }
                if let Some(operands) = m.get("!=") {
                    self.compare(operands, false);
                }
                if positive
                    && let Some(l) = m.get("like")
                    && is_attr(l.get("left"), "resource", "path")
                    && let Some(pattern) = l.get("pattern").and_then(like_pattern)
                {
                    self.paths.push(PathName::Like(pattern));
                }
                m.values().for_each(|v| self.walk(v, positive));
            }
            _ => {}
        }
    }

    /// `X == "s"` or `"s" == X` with X `context.upstream` or (`positive`) `resource.path`.
    fn compare(&mut self, operands: &serde_json::Value, positive: bool) {
        let (Some(l), Some(r)) = (operands.get("left"), operands.get("right")) else {
            return;
        };
        for (x, y) in [(l, r), (r, l)] {
            let Some(s) = y.get("Value").and_then(serde_json::Value::as_str) else {
                continue;
            };
            if is_attr(Some(x), "context", "upstream") {
                self.upstreams.push(s.to_string());
            }
            if positive && is_attr(Some(x), "resource", "path") {
                self.paths.push(PathName::Exact(s.to_string()));
            }
        }
    }

    /// One message per name `known` lacks.
    fn unknown(&self, known: &KnownNames) -> Vec<String> {
        let mut out = Vec::new();
        // the known upstreams this policy names: its paths are compared with their operations
        let mut upstreams: BTreeSet<&str> = BTreeSet::new();
        let of_upstream = |id: &str| {
            known.upstreams.iter().find(|u| {
                id.strip_prefix(u.as_str())
                    .is_some_and(|r| r.starts_with('/'))
            })
        };
        for (ty, id) in &self.entities {
            let shown = format!("{ty}::\"{}\"", cedar_escape(id));
            match ty.as_str() {
                "Group" if !known.groups.contains(id) => out.push(format!(
                    "{shown} is not a group of gateway.toml (known: {})",
                    list(&known.groups)
                )),
                "Upstream" if known.upstreams.contains(id) => {
                    upstreams.insert(id.as_str());
                }
                "Upstream" => out.push(format!(
                    "{shown} is not an upstream of gateway.toml (known: {})",
                    list(&known.upstreams)
                )),
                "Action" if !is_action(id) => out.push(format!(
                    "{shown} is not an action of the schema (known: {}, read, write)",
                    METHODS.join(", ")
                )),
                "Path" => match of_upstream(id) {
                    Some(u) => {
                        upstreams.insert(u.as_str());
                    }
                    None => out.push(format!(
                        "{shown} does not start with an upstream of gateway.toml (known: {})",
                        list(&known.upstreams)
                    )),
                },
                _ => {}
            }
        }
        for s in &self.upstreams {
            if known.upstreams.contains(s) {
                upstreams.insert(s.as_str());
            } else {
                out.push(format!(
                    "context.upstream \"{}\" is not an upstream of gateway.toml (known: {})",
                    cedar_escape(s),
                    list(&known.upstreams)
                ));
            }
        }
        let operations: Vec<&KnownOperation> = known
            .operations
            .iter()
            .filter(|o| upstreams.is_empty() || upstreams.contains(o.upstream.as_str()))
            .collect();
        if operations.is_empty() {
            // nothing to compare with: these upstreams list no operations
            return out;
        }
        for path in &self.paths {
            if !operations.iter().any(|o| path.names(&o.path)) {
                out.push(format!(
                    "{} names no operation of gateway.toml (known: {})",
                    path.render(),
                    list(
                        operations.iter().map(|o| format!(
                            "{}.{} ({} {})",
                            o.upstream, o.name, o.method, o.path
                        ))
                    )
                ));
            }
        }
        out
    }
}

fn is_action(id: &str) -> bool {
    METHODS.contains(&id) || id == "read" || id == "write"
}

/// `{"type": T, "id": I}` of an EST entity reference.
fn entity_ref(v: &serde_json::Value) -> Option<(String, String)> {
    let ty = v.get("type")?.as_str()?;
    let id = v.get("id")?.as_str()?;
    Some((ty.to_string(), id.to_string()))
}

/// Whether `e` is the EST of `VAR.ATTR`.
fn is_attr(e: Option<&serde_json::Value>, var: &str, attr: &str) -> bool {
    let Some(get) = e.and_then(|e| e.get(".")) else {
        return false;
    };
    get.get("attr").and_then(serde_json::Value::as_str) == Some(attr)
        && get
            .get("left")
            .and_then(|l| l.get("Var"))
            .and_then(serde_json::Value::as_str)
            == Some(var)
}

/// The EST form of a `like` pattern: `"Wildcard"` or `{"Literal": "text"}` elements.
fn like_pattern(v: &serde_json::Value) -> Option<Vec<LikeElem>> {
    v.as_array()?
        .iter()
        .map(|e| match e.as_str() {
            Some("Wildcard") => Some(LikeElem::Any),
            Some(_) => None,
            None => Some(LikeElem::Text(e.get("Literal")?.as_str()?.to_string())),
        })
        .collect()
}

/// `a, b, c` (`none` when empty; the first 12 and how many more).
fn list<T: std::fmt::Display>(items: impl IntoIterator<Item = T>) -> String {
    const SHOWN: usize = 12;
    let items: Vec<String> = items.into_iter().map(|i| i.to_string()).collect();
    if items.is_empty() {
        return "none".into();
    }
    let mut out = items
        .iter()
        .take(SHOWN)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if items.len() > SHOWN {
        out.push_str(&format!(", ... ({} more)", items.len() - SHOWN));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use didgate_protocol::Identity;

    fn ctx() -> RequestContext {
        RequestContext {
            time_ms: 1_700_000_000_000,
            body_len: 10,
            headers: vec!["content-type".into()],
            query: vec![],
        }
    }

    fn set(text: &str) -> PolicySet {
        PolicySet::compile("test", text, &BTreeMap::new(), None).expect("valid policy set")
    }

    fn allowed(d: &Decision) -> bool {
        matches!(d, Decision::Allow { .. })
    }

    fn legacy(rules: &[Rule], groups: &BTreeMap<String, Vec<String>>) -> PolicySet {
        let text = translate_rules(rules).expect("translates");
        PolicySet::compile("rules", &text, groups, None).expect("translation validates")
    }

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
        let c = ctx();
        // empty rule set denies everyone
        assert_eq!(
            legacy(&[], &BTreeMap::new()).decide(a.did().as_str(), "pay", "GET", "/v1/x", &c),
            Decision::Deny {
                family: DEFAULT_DENY.into()
            }
        );
        let mut groups = BTreeMap::new();
        groups.insert("g".to_string(), vec![b.did().to_string()]);
        let p = legacy(
            &[rule(a.did().as_str(), "GET"), rule("group:g", "POST")],
            &groups,
        );
        assert_eq!(
            p.decide(a.did().as_str(), "pay", "GET", "/v1/x", &c),
            Decision::Allow { ttl_secs: None }
        );
        assert!(!allowed(&p.decide(
            a.did().as_str(),
            "pay",
            "POST",
            "/v1/x",
            &c
        )));
        assert!(allowed(&p.decide(
            b.did().as_str(),
            "pay",
            "POST",
            "/v1/x",
            &c
        )));
        assert!(!allowed(&p.decide(
            b.did().as_str(),
            "other",
            "POST",
            "/v1/x",
            &c
        )));
        assert!(!allowed(&p.decide(
            a.did().as_str(),
            "pay",
            "GET",
            "/v2/x",
            &c
        )));
        assert!(!allowed(&p.decide(
            a.did().as_str(),
            "pay",
            "get",
            "/v1/x",
            &c
        )));
        assert!(!allowed(&p.decide(
            a.did().as_str(),
            "pay",
            "TRACE",
            "/v1/x",
            &c
        )));
        assert!(p.knows(a.did().as_str()));
        assert!(p.knows(b.did().as_str()));
        assert!(!p.knows(Identity::from_seed(&[3; 32]).did().as_str()));
    }

    /// The translation of every pattern agrees with the legacy matcher on canonical paths.
    #[test]
    fn translation_is_exact() {
        let a = Identity::from_seed(&[1; 32]);
        let patterns = [
            "/",
            "/v1",
            "/v1/",
            "/v1/charges",
            "/v1/charges/*",
            "/v1/*/refunds",
            "/*/*",
            "/*",
            "/v1/**",
            "/**",
            "/v1/*/**",
            "/*/**",
            "/v1/a*b",
            "/v1/**/x",
            "v1/x",
            "/v1/\"q\"",
        ];
        let paths = [
            "/",
            "/v1",
            "/v1/",
            "/v2",
            "/v1/charges",
            "/v1/charges/",
            "/v1/charges/ch_1",
            "/v1/charges/ch_1/",
            "/v1/charges/a/b",
            "/v1/x/refunds",
            "/v1/x/refunds/",
            "/v1/x/y/refunds",
            "/v1/a*b",
            "/v1/aXb",
            "/v1/a/x",
            "/v1/\"q\"",
            "/a/b/c/d/e",
        ];
        for pat in patterns {
            let rules = [Rule {
                principals: vec![a.did().to_string()],
                upstream: "pay".into(),
                methods: vec!["GET".into()],
                paths: vec![pat.into()],
            }];
            let p = legacy(&rules, &BTreeMap::new());
            for path in paths {
                assert_eq!(
                    allowed(&p.decide(a.did().as_str(), "pay", "GET", path, &ctx())),
                    path_matches(pat, path),
                    "pattern {pat} path {path}"
                );
            }
        }
        let refused = [Rule {
            principals: vec![a.did().to_string()],
            upstream: "pay".into(),
            methods: vec!["GET".into()],
            paths: vec!["/v1/*/x/**".into()],
        }];
        assert!(matches!(
            translate_rules(&refused),
            Err(PolicyError::Translate(_))
        ));
    }

    #[test]
    fn empty_set_denies() {
        let p = set("");
        let a = Identity::from_seed(&[1; 32]);
        let d = p.decide(a.did().as_str(), "pay", "GET", "/v1/x", &ctx());
        assert_eq!(
            d,
            Decision::Deny {
                family: DEFAULT_DENY.into()
            }
        );
        assert_eq!(
            d.refusal_reason().as_deref(),
            Some("no permit matched (default deny)")
        );
        assert!(!p.knows(a.did().as_str()));
    }

    #[test]
    fn permit_forbid_and_families() {
        let a = Identity::from_seed(&[1; 32]);
        let text = format!(
            r#"
            @id("all")
            permit (principal == Did::"{a}", action, resource);
            @id("no-deletes")
            forbid (principal, action == Action::"DELETE", resource);
            @id("no-admin")
            forbid (principal, action, resource) when {{ resource.path like "/admin*" }};
            "#,
            a = a.did()
        );
        let p = set(&text);
        assert!(p.knows(a.did().as_str()));
        assert!(allowed(&p.decide(
            a.did().as_str(),
            "pay",
            "GET",
            "/v1/x",
            &ctx()
        )));
        // a method outside the schema never matches, even an unconstrained action
        assert!(!allowed(&p.decide(
            a.did().as_str(),
            "pay",
            "TRACE",
            "/v1/x",
            &ctx()
        )));
        let d = p.decide(a.did().as_str(), "pay", "DELETE", "/admin/x", &ctx());
        assert_eq!(
            d,
            Decision::Deny {
                family: "no-admin, no-deletes".into()
            }
        );
        let reason = d.refusal_reason().expect("a reason");
        assert_eq!(reason, "forbidden by policy family no-admin, no-deletes");
        assert!(!reason.contains("like"), "never the policy text");
        assert_eq!(p.summary().permits, 1);
        assert_eq!(p.summary().forbids, 2);
        assert_eq!(p.summary().families, ["all", "no-admin", "no-deletes"]);
    }

    #[test]
    fn decisions_made_from_cached_entities_are_the_decisions_of_fresh_ones() {
        let a = Identity::from_seed(&[1; 32]);
        let b = Identity::from_seed(&[2; 32]);
        let text = format!(
            r#"
            permit (principal == Did::"{a}", action, resource) when {{ resource.path like "/v1/*" }};
            permit (principal == Did::"{b}", action, resource in Upstream::"ab");
            "#,
            a = a.did(),
            b = b.did()
        );
        let p = set(&text);
        let (a, b) = (a.did().to_string(), b.did().to_string());
        let (a, b) = (a.as_str(), b.as_str());
        let decide =
            |did: &str, up: &str, path: &str| allowed(&p.decide(did, up, "GET", path, &ctx()));
        // each triple decided twice (the second from the cache) and never from another's
        // entities: another DID, another path, an upstream/path split of the same bytes
        for _ in 0..2 {
            assert!(decide(a, "pay", "/v1/x"));
            assert!(!decide(b, "pay", "/v1/x"));
            assert!(!decide(a, "pay", "/v2/x"));
            assert!(decide(b, "ab", "/c"));
            assert!(!decide(b, "a", "b/c"));
        }
        // bounded: past its capacity it starts again
        for i in 0..(Recent::<Decision>::CAP + 10) {
            assert!(decide(a, "pay", &format!("/v1/{i}")));
        }
        assert!(p.entities.map().len() <= Recent::<Decision>::CAP);
        assert_ne!(entity_key("a", "bc", "/"), entity_key("ab", "c", "/"));
    }

    #[test]
    fn groups_and_entities() {
        let a = Identity::from_seed(&[1; 32]);
        let b = Identity::from_seed(&[2; 32]);
        let c = Identity::from_seed(&[3; 32]);
        let text = r#"
            permit (principal in Group::"payers", action in Action::"write", resource in Upstream::"pay");
            permit (principal in Group::"staff", action in Action::"read", resource);
        "#;
        let groups = [("payers".to_string(), vec![a.did().to_string()])]
            .into_iter()
            .collect();
        // b is in ops, ops in staff (nested groups from the entities file)
        let entities = format!(
            r#"[
              {{"uid": {{"type": "Did", "id": "{b}"}}, "attrs": {{}}, "parents": [{{"type": "Group", "id": "ops"}}]}},
              {{"uid": {{"type": "Group", "id": "ops"}}, "attrs": {{}}, "parents": [{{"type": "Group", "id": "staff"}}]}}
            ]"#,
            b = b.did()
        );
        let p = PolicySet::compile("t", text, &groups, Some(&entities)).expect("valid");
        let c0 = ctx();
        assert!(allowed(&p.decide(
            a.did().as_str(),
            "pay",
            "POST",
            "/v1/charges",
            &c0
        )));
        assert!(!allowed(&p.decide(
            a.did().as_str(),
            "other",
            "POST",
            "/v1/charges",
            &c0
        )));
        assert!(!allowed(&p.decide(
            a.did().as_str(),
            "pay",
            "GET",
            "/v1/charges",
            &c0
        )));
        assert!(allowed(&p.decide(
            b.did().as_str(),
            "other",
            "HEAD",
            "/x",
            &c0
        )));
        assert!(!allowed(&p.decide(
            b.did().as_str(),
            "pay",
            "POST",
            "/x",
            &c0
        )));
        assert!(!allowed(&p.decide(
            c.did().as_str(),
            "pay",
            "GET",
            "/x",
            &c0
        )));
        assert!(
            p.knows(a.did().as_str()) && p.knows(b.did().as_str()) && !p.knows(c.did().as_str())
        );
        // membership is part of the hash
        let other =
            PolicySet::compile("t", text, &BTreeMap::new(), Some(&entities)).expect("valid");
        assert_ne!(p.hash(), other.hash());
        // an entities file may not define resources
        let bad = r#"[{"uid": {"type": "Upstream", "id": "pay"}, "attrs": {}, "parents": []}]"#;
        assert!(matches!(
            PolicySet::compile("t", text, &BTreeMap::new(), Some(bad)),
            Err(PolicyError::Entities(_) | PolicyError::EntitiesFile(_))
        ));
    }

    #[test]
    fn like_patterns_and_context() {
        let a = Identity::from_seed(&[1; 32]);
        let p = set(&format!(
            r#"
            permit (principal == Did::"{a}", action == Action::"POST", resource)
            when {{
              resource.upstream == Upstream::"payments" &&
              resource.path like "/v1/charges*" &&
              context.body_len <= 100 &&
              !(context.headers.contains("x-debug")) &&
              context.upstream == "payments"
            }};
            "#,
            a = a.did()
        ));
        let mut c = ctx();
        assert!(allowed(&p.decide(
            a.did().as_str(),
            "payments",
            "POST",
            "/v1/charges",
            &c
        )));
        assert!(allowed(&p.decide(
            a.did().as_str(),
            "payments",
            "POST",
            "/v1/charges/x/y",
            &c
        )));
        assert!(!allowed(&p.decide(
            a.did().as_str(),
            "payments",
            "POST",
            "/v1/refunds",
            &c
        )));
        assert!(!allowed(&p.decide(
            a.did().as_str(),
            "other",
            "POST",
            "/v1/charges",
            &c
        )));
        c.body_len = 101;
        assert!(!allowed(&p.decide(
            a.did().as_str(),
            "payments",
            "POST",
            "/v1/charges",
            &c
        )));
        c.body_len = 100;
        c.headers.push("x-debug".into());
        assert!(!allowed(&p.decide(
            a.did().as_str(),
            "payments",
            "POST",
            "/v1/charges",
            &c
        )));
    }

    #[test]
    fn time_context() {
        let a = Identity::from_seed(&[1; 32]);
        let p = set(&format!(
            r#"permit (principal == Did::"{a}", action, resource)
               when {{ context.utc_weekday < 5 && context.utc_hour >= 8 && context.utc_hour < 18 }};"#,
            a = a.did()
        ));
        // 2024-01-01 was a Monday
        let monday = 1_704_067_200_000u64;
        let at = |ms: u64| RequestContext {
            time_ms: ms,
            ..ctx()
        };
        let hour = 3_600_000;
        assert!(allowed(&p.decide(
            a.did().as_str(),
            "u",
            "GET",
            "/",
            &at(monday + 9 * hour)
        )));
        assert!(!allowed(&p.decide(
            a.did().as_str(),
            "u",
            "GET",
            "/",
            &at(monday + 19 * hour)
        )));
        assert!(!allowed(&p.decide(
            a.did().as_str(),
            "u",
            "GET",
            "/",
            &at(monday + 5 * 24 * hour + 9 * hour)
        )));
    }

    /// The decision cache is keyed by the context attributes the policies read: a policy
    /// reading none decides once per (DID, upstream, method, path); one reading the hour is
    /// decided again when the hour changes, never answered from another hour's decision.
    #[test]
    fn decisions_are_cached_over_exactly_the_context_the_policies_read() {
        use ContextAttr::{BodyLen, Headers, Upstream, UtcHour, UtcWeekday};
        let a = Identity::from_seed(&[1; 32]);
        let did = a.did().to_string();
        let plain = set(&format!(
            r#"permit (principal == Did::"{did}", action == Action::"GET", resource);"#
        ));
        assert_eq!(plain.reads.as_deref(), Some(&[][..]));
        let mut c = ctx();
        for body_len in 0..5 {
            c.body_len = body_len;
            c.time_ms += 3_600_000;
            assert!(allowed(&plain.decide(&did, "u", "GET", "/x", &c)));
        }
        assert!(!allowed(&plain.decide(&did, "u", "POST", "/x", &c)));
        assert_eq!(
            plain.decisions.map().len(),
            2,
            "one decision per (DID, upstream, method, path) when no context is read"
        );

        let hours = set(&format!(
            r#"permit (principal == Did::"{did}", action, resource)
               when {{ context.utc_weekday < 5 && context.utc_hour < 12 &&
                       context.headers.contains("x-a") && context.upstream == "u" &&
                       (context has body_len) }};"#
        ));
        assert_eq!(
            hours.reads.as_deref(),
            Some(&[UtcHour, UtcWeekday, BodyLen, Upstream, Headers][..])
        );
        // 2024-01-01 was a Monday
        let monday = 1_704_067_200_000u64;
        let at = |hour: u64, headers: &[&str]| RequestContext {
            time_ms: monday + hour * 3_600_000,
            headers: headers.iter().map(|h| (*h).to_string()).collect(),
            ..ctx()
        };
        let decide = |c: &RequestContext| allowed(&hours.decide(&did, "u", "GET", "/", c));
        assert!(decide(&at(9, &["x-a"])));
        assert!(!decide(&at(13, &["x-a"])), "the next hour is decided anew");
        assert!(!decide(&at(9, &[])), "other headers are decided anew");
        assert!(decide(&at(9, &["x-a"])));
        assert!(!decide(&at(9 + 24 * 5, &["x-a"])), "Saturday");
        assert_eq!(hours.decisions.map().len(), 4);
    }

    /// A policy that uses the context as a whole (not one attribute of it) turns the decision
    /// cache off: its key could not name everything the decision depends on. So does one that
    /// reads `time_ms` (every call would miss). `context["NAME"]` is `context.NAME`.
    #[test]
    fn a_policy_using_the_whole_context_or_the_time_is_not_cached() {
        let a = Identity::from_seed(&[1; 32]);
        let did = a.did().to_string();
        let policy = |cond: &str| {
            set(&format!(
                r#"permit (principal == Did::"{did}", action, resource) when {{ {cond} }};"#
            ))
        };
        assert_eq!(
            policy(r#"context["utc_hour"] < 12"#).reads,
            Some(vec![ContextAttr::UtcHour])
        );
        assert_eq!(policy("context.time_ms > 0").reads, None);
        assert_eq!(policy("{k: context}.k.body_len < 5").reads, None);
        let whole = policy("(if true then context else context).body_len < 5");
        assert_eq!(whole.reads, None);
        let mut c = ctx();
        c.body_len = 1;
        assert!(allowed(&whole.decide(&did, "u", "GET", "/", &c)));
        c.body_len = 10;
        assert!(!allowed(&whole.decide(&did, "u", "GET", "/", &c)));
        assert!(whole.decisions.map().is_empty(), "nothing kept");

        let mut reads = BTreeSet::new();
        let whole = serde_json::json!({"==": {
            "left": {"Var": "context"},
            "right": {"Record": {}}
        }});
        assert_eq!(context_reads_in(&whole, &mut reads), None);
        let attr = serde_json::json!({"&&": {
            "left": {".": {"left": {"Var": "context"}, "attr": "time_ms"}},
            "right": {"has": {"left": {"Var": "context"}, "attr": "query"}}
        }});
        assert_eq!(context_reads_in(&attr, &mut reads), Some(()));
        assert_eq!(
            reads.into_iter().collect::<Vec<_>>(),
            [ContextAttr::TimeMs, ContextAttr::Query]
        );
        let unknown = serde_json::json!({".": {"left": {"Var": "context"}, "attr": "other"}});
        assert_eq!(context_reads_in(&unknown, &mut BTreeSet::new()), None);
    }

    #[test]
    fn ttl_cap() {
        let a = Identity::from_seed(&[1; 32]);
        let p = set(&format!(
            r#"
            @id("short") @grant_ttl_secs("3")
            permit (principal == Did::"{a}", action == Action::"POST", resource);
            @id("long") @grant_ttl_secs("60")
            permit (principal == Did::"{a}", action in [Action::"POST", Action::"GET"], resource);
            @id("free")
            permit (principal == Did::"{a}", action == Action::"PUT", resource);
            "#,
            a = a.did()
        ));
        let post = p.decide(a.did().as_str(), "u", "POST", "/", &ctx());
        assert_eq!(post, Decision::Allow { ttl_secs: Some(3) });
        assert_eq!(post.grant_ttl(10), Some(3));
        let get = p.decide(a.did().as_str(), "u", "GET", "/", &ctx());
        assert_eq!(get, Decision::Allow { ttl_secs: Some(60) });
        assert_eq!(get.grant_ttl(10), Some(10), "the configured TTL still caps");
        let put = p.decide(a.did().as_str(), "u", "PUT", "/", &ctx());
        assert_eq!(put.grant_ttl(10), Some(10));
        // invalid caps are refused
        for bad in [
            r#"@grant_ttl_secs("0") permit (principal, action, resource);"#,
            r#"@grant_ttl_secs("soon") permit (principal, action, resource);"#,
            r#"@grant_ttl_secs("5") forbid (principal, action, resource);"#,
        ] {
            assert!(
                matches!(
                    PolicySet::compile("t", bad, &BTreeMap::new(), None),
                    Err(PolicyError::Invalid(..))
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn invalid_policies_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cases = [
            // parse error
            ("permit (principal, action, resource", "Parse"),
            // unknown attribute (strict validation)
            (
                r#"permit (principal, action, resource) when { resource.host == "x" };"#,
                "Invalid",
            ),
            // unknown action
            (
                r#"permit (principal, action == Action::"get", resource);"#,
                "Invalid",
            ),
            // a Did has no attributes
            (
                r#"permit (principal, action, resource) when { principal.name == "x" };"#,
                "Invalid",
            ),
            // type error
            (
                r#"permit (principal, action, resource) when { context.body_len like "1*" };"#,
                "Invalid",
            ),
            // templates
            (
                "permit (principal == ?principal, action, resource);",
                "Invalid",
            ),
            // bad family name
            (
                r#"@id("has space") permit (principal, action, resource);"#,
                "Invalid",
            ),
        ];
        for (text, kind) in cases {
            let f = dir.path().join("p.cedar");
            std::fs::write(&f, text).expect("write");
            let e = PolicySet::check_file(&f).expect_err(text);
            let got = match e {
                PolicyError::Parse(..) => "Parse",
                PolicyError::Invalid(..) => "Invalid",
                _ => "other",
            };
            assert_eq!(got, kind, "{text}: {e}");
        }
        let f = dir.path().join(TEMPLATE_FILE);
        std::fs::write(&f, template()).expect("write");
        let s = PolicySet::check_file(&f).expect("the template validates");
        assert_eq!(s.policies, 0, "the template denies everything");
        let f = dir.path().join("good.cedar");
        std::fs::write(&f, EXAMPLE_POLICIES).expect("write");
        let s = PolicySet::check_file(&f).expect("the example validates");
        assert_eq!(s.policies, 4);
        assert!(PolicySet::check_file(&dir.path().join("missing.cedar")).is_err());
    }

    #[test]
    fn hash_is_domain_separated_over_text() {
        let a = set("permit (principal, action, resource);");
        let b = set("permit (principal, action, resource);\n");
        assert_ne!(a.hash(), b.hash(), "the hash covers the exact text");
        let text = "permit (principal, action, resource);";
        let mut h = blake3::Hasher::new_derive_key(HASH_CONTEXT);
        h.update(&(text.len() as u64).to_be_bytes());
        h.update(text.as_bytes());
        assert_eq!(a.hash(), *h.finalize().as_bytes());
    }

    fn known() -> KnownNames {
        let op = |upstream: &str, name: &str, method: &str, path: &str| KnownOperation {
            upstream: upstream.into(),
            name: name.into(),
            method: method.into(),
            path: path.into(),
        };
        KnownNames {
            groups: ["agents".to_string(), "readers".to_string()].into(),
            upstreams: ["openai".to_string(), "payments".to_string()].into(),
            operations: vec![
                op("openai", "chat", "POST", "/v1/chat/completions"),
                op("payments", "get_charge", "GET", "/v1/charges/{id}"),
            ],
        }
    }

    fn unknown(text: &str) -> Vec<String> {
        set(text)
            .unknown_names(&known())
            .expect("names")
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    #[test]
    fn like_is_cedars() {
        let p = |s: &str| {
            s.split('*')
                .enumerate()
                .flat_map(|(i, t)| {
                    let any = (i > 0).then_some(LikeElem::Any);
                    any.into_iter()
                        .chain((!t.is_empty()).then(|| LikeElem::Text(t.to_string())))
                })
                .collect::<Vec<_>>()
        };
        for (pattern, s, m) in [
            ("/v1/*", "/v1/a/b", true),
            ("/v1/*", "/v2/a", false),
            ("*/", "/v1/", true),
            ("*/", "/v1", false),
            ("/v1/models*", "/v1/models", true),
            ("/v1/*/x*y", "/v1/a/xzzy", true),
            ("/v1/*/x*y", "/v1/a/xzzyz", false),
            ("", "", true),
            ("*", "", true),
        ] {
            assert_eq!(like(&p(pattern), s), m, "{pattern} {s}");
        }
        let exact = PathName::Exact("/v1/charges/ch_1".into());
        assert!(exact.names("/v1/charges/{id}"));
        assert!(!PathName::Exact("/v1/charges/".into()).names("/v1/charges/{id}"));
        assert!(!PathName::Exact("/v1/charges".into()).names("/v1/charges/{id}"));
    }

    #[test]
    fn unknown_names_are_read_from_the_syntax_tree() {
        // known names, in every position: nothing to report; a forbid's path and an unless's
        // path are no operation and need none; strings that merely look like names are text
        let clean = r#"
@id("a")
permit (principal in Group::"agents", action in [Action::"POST", Action::"read"],
        resource in Upstream::"openai")
when { resource.path == "/v1/chat/completions" && principal in Group::"readers" }
unless { resource.path == "/admin" };
@id("b")
permit (principal, action == Action::"GET", resource)
when { resource.upstream == Upstream::"payments" && resource.path like "/v1/charges/*"
       && !(resource.path like "/nothing*") && context.upstream == "payments" };
@id("c")
forbid (principal, action, resource == Path::"payments/v1/balance")
when { resource.path == "/v1/Group::agnets" && context.upstream like "Upstream::*" };
"#;
        assert_eq!(unknown(clean), Vec::<String>::new());
        let typos = r#"
@id("a")
permit (principal in Group::"agnets", action, resource in Upstream::"opneai")
when { principal in Group::"agnets" && resource.path == "/v1/chat/completoins" };
permit (principal, action, resource == Path::"opneai/v1/x")
when { context.upstream != "paymnets" };
@id("b")
permit (principal, action, resource in Upstream::"payments")
when { resource.path == "/v1/chat/completions" };
"#;
        assert_eq!(
            unknown(typos),
            [
                r#"policy "a": Group::"agnets" is not a group of gateway.toml (known: agents, readers)"#,
                r#"policy "a": Upstream::"opneai" is not an upstream of gateway.toml (known: openai, payments)"#,
                r#"policy "a": resource.path == "/v1/chat/completoins" names no operation of gateway.toml (known: openai.chat (POST /v1/chat/completions), payments.get_charge (GET /v1/charges/{id}))"#,
                r#"policy "policy1": Path::"opneai/v1/x" does not start with an upstream of gateway.toml (known: openai, payments)"#,
                r#"policy "policy1": context.upstream "paymnets" is not an upstream of gateway.toml (known: openai, payments)"#,
                // an operation of another upstream than the one the policy names
                r#"policy "b": resource.path == "/v1/chat/completions" names no operation of gateway.toml (known: payments.get_charge (GET /v1/charges/{id}))"#,
            ]
        );
        // no operation listed: paths are not compared
        let none = KnownNames {
            operations: Vec::new(),
            ..known()
        };
        let found = set(typos).unknown_names(&none).expect("names");
        assert!(found.iter().all(|u| !u.message.contains("operation")));
    }
}
