//! The operator's commands on a data directory: `didgated init` ([`init`]), and the secret
//! and KMS commands ([`admin`]): through the running daemon's control socket when one answers
//! ([`crate::control`]), else on the store directly ([`open_dir`]); the daemon's socket server
//! runs the same [`secret_command`]. Also their text and JSON output ([`describe`]).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use didgate_audit::Chain;
use didgate_audit::store::Store;
use didgate_io::{fmt_utc, now_ms};
use didgate_protocol::{Did, Identity};

use crate::config::Config;
use crate::control::{Reply, Request};
use crate::datadir::{DataDir, SPACES, private_data_dir};
use crate::secrets::{DEFAULT_GRACE_SECS, SecretError, SecretInfo, Secrets};
use crate::upstreams::UpstreamSet;
use crate::{config, kms, policy};

/// Why `init` or a secret command failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AdminError {
    /// The data directory already holds a gateway.
    #[error("{0} already holds a gateway identity; refusing to overwrite it")]
    Exists(String),
    /// I/O.
    #[error("{0}: {1}")]
    Io(String, #[source] std::io::Error),
    /// Identity.
    #[error(transparent)]
    Identity(#[from] didgate_io::identity::IdentityError),
    /// KMS.
    #[error(transparent)]
    Kms(#[from] kms::KmsError),
    /// Store.
    #[error(transparent)]
    Store(#[from] didgate_audit::StoreError),
    /// Configuration.
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    /// Secret lifecycle.
    #[error(transparent)]
    Secrets(#[from] SecretError),
    /// Bad input.
    #[error("{0}")]
    Invalid(String),
    /// The data directory may be written by others, or its modes cannot be tightened.
    #[error("data directory: {0}")]
    DataDir(#[from] didgate_io::hardening::HardeningError),
}

/// `didgated init`: creates the identity (0600), the master key (0600), the store, a
/// commented `gateway.toml` and an example `policies.cedar` (not referenced until
/// `policy_file` names it). Returns the gateway DID.
pub fn init(dir: &Path, listen: SocketAddr) -> Result<Did, AdminError> {
    let d = DataDir::new(dir);
    if d.identity().exists() {
        return Err(AdminError::Exists(dir.display().to_string()));
    }
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| AdminError::Io(dir.display().to_string(), e))?;
    }
    // every file below is created private whatever the caller's umask
    private_data_dir(dir)?;
    let identity = Identity::generate();
    didgate_io::identity::create(&d.identity(), &identity)?;
    kms::LocalKms::create(&d.master_key())?;
    drop(Store::open(&d.store(), SPACES)?);
    if !d.config().exists() {
        std::fs::write(d.config(), config::template(listen))
            .map_err(|e| AdminError::Io(d.config().display().to_string(), e))?;
    }
    let policies = dir.join(policy::TEMPLATE_FILE);
    if !policies.exists() {
        std::fs::write(&policies, policy::template())
            .map_err(|e| AdminError::Io(policies.display().to_string(), e))?;
    }
    // what was created under a looser umask (an embedding process) is made private too
    private_data_dir(dir)?;
    Ok(identity.did().clone())
}

/// `didgated secret add` on the store directly (no daemon may run; the `didgated` command goes
/// through the control socket when one does): seals `plaintext` under a fresh data key as
/// version 1 and stores only the ciphertext and display form.
pub fn add_secret(dir: &Path, name: &str, plaintext: &str) -> Result<SecretInfo, AdminError> {
    let opened = open_dir(dir)?;
    Ok(opened.secrets.add(name, plaintext, now_ms())?)
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, SecretError> + Send + 'static,
) -> Result<T, SecretError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|source| SecretError::Task {
            what: "task failed",
            source,
        })?
}

/// Runs a secret or KMS control command (`secret_*`, `kms_rotate`) on `secrets`: in the daemon
/// for a control-socket request, or in the admin command when no daemon runs. `config` is
/// needed by `secret_test` only.
pub async fn secret_command(
    secrets: &Arc<Secrets>,
    upstreams: Option<&UpstreamSet>,
    req: &Request,
) -> Reply {
    match run_command(secrets, upstreams, req).await {
        Ok(reply) => reply,
        Err(e) => Reply {
            ok: false,
            error: Some(e.to_string()),
            ..Default::default()
        },
    }
}

async fn run_command(
    secrets: &Arc<Secrets>,
    upstreams: Option<&UpstreamSet>,
    req: &Request,
) -> Result<Reply, SecretError> {
    let now = now_ms();
    let s = secrets.clone();
    let one = |info: SecretInfo| Reply {
        ok: true,
        secrets: Some(vec![info]),
        ..Default::default()
    };
    Ok(match req {
        Request::SecretAdd { name, value } => {
            let (name, value) = (name.clone(), value.clone());
            one(blocking(move || s.add(&name, value.expose(), now)).await?)
        }
        Request::SecretRotate { name, value } => {
            let (name, value) = (name.clone(), value.clone());
            one(blocking(move || s.rotate(&name, value.expose(), now)).await?)
        }
        Request::SecretDisable { name } => {
            let name = name.clone();
            one(blocking(move || s.disable(&name, now)).await?)
        }
        Request::SecretEnable { name } => {
            let name = name.clone();
            one(blocking(move || s.enable(&name, now)).await?)
        }
        Request::SecretDelete { name } => {
            let name = name.clone();
            one(blocking(move || s.delete(&name, now)).await?)
        }
        Request::SecretList => Reply {
            ok: true,
            secrets: Some(blocking(move || s.list()).await?),
            ..Default::default()
        },
        Request::SecretTest { name, version } => {
            let upstreams = upstreams.ok_or_else(|| {
                SecretError::Invalid("secret test needs gateway.toml (the upstreams)".into())
            })?;
            Reply {
                ok: true,
                probes: Some(secrets.probe(upstreams, name, *version, now).await?),
                ..Default::default()
            }
        }
        Request::KmsRotate => Reply {
            ok: true,
            kms: Some(blocking(move || s.kms_rotate(now)).await?),
            ..Default::default()
        },
        Request::KmsToToken { init } => {
            let init = *init;
            Reply {
                ok: true,
                kms: Some(blocking(move || s.kms_to_token(init, now)).await?),
                ..Default::default()
            }
        }
        _ => return Err(SecretError::Invalid("not a secret command".into())),
    })
}

/// The secrets of a data directory opened directly by an admin command (no daemon runs), with
/// the gateway's chain their entries go to. Dropping it closes the chain (a final checkpoint)
/// and releases the store.
#[derive(Debug)]
pub struct DirSecrets {
    /// The secrets.
    pub secrets: Arc<Secrets>,
    /// `gateway.toml`, if the directory has one (for `secret test`).
    pub config: Option<Config>,
}

impl Drop for DirSecrets {
    fn drop(&mut self) {
        self.secrets.chain().close();
    }
}

/// Opens the secrets of `data` directly (no daemon may run): the store and the gateway's chain
/// (switched to this release's format if an older release wrote it), `gateway.toml` if present
/// (for `secret_grace_secs`, the checkpoint policy and the upstreams), and the master key.
/// Blocks on the chain: call it from a blocking thread or a command's start.
pub fn open_dir(data: &Path) -> Result<DirSecrets, SecretError> {
    private_data_dir(data)?;
    let d = DataDir::new(data);
    if !d.store().join("version").is_file() {
        return Err(SecretError::Invalid(format!(
            "{} holds no gateway store (run `didgated init`)",
            data.display()
        )));
    }
    let config = if d.config().exists() {
        Some(Config::load(&d.config())?)
    } else {
        None
    };
    let grace = config
        .as_ref()
        .map_or(DEFAULT_GRACE_SECS, |c| c.secret_grace().as_secs());
    let policy = config
        .as_ref()
        .map(Config::checkpoint_policy)
        .unwrap_or_default();
    let identity = didgate_io::identity::load(&d.identity()).map_err(SecretError::Identity)?;
    let store = Store::open(&d.store(), SPACES)?;
    let chain = Chain::open(
        store,
        Arc::new(identity),
        didgate_audit::entry::Role::Gateway,
        now_ms(),
        policy,
    )?;
    let token = config.as_ref().and_then(|c| c.token_config(data));
    let secrets = match Secrets::open(data, chain.clone(), grace, token, now_ms()) {
        Ok(s) => s,
        Err(e) => {
            chain.close();
            return Err(e);
        }
    };
    Ok(DirSecrets {
        secrets: Arc::new(secrets),
        config,
    })
}

/// Runs a secret or KMS command for `didgated`: through the daemon's control socket when one
/// answers (the value travels over the 0600 socket, never argv), else on the store directly.
pub async fn admin(data: &Path, req: &Request) -> Result<Reply, SecretError> {
    if let Some(reply) = crate::control::call(data, req).await {
        return reply.map_err(|e| SecretError::Io("control socket".into(), e));
    }
    let data = data.to_path_buf();
    let dir = blocking(move || open_dir(&data)).await?;
    if dir.config.as_ref().is_some_and(|c| c.cluster().is_some())
        && (req.secret_written().is_some()
            || matches!(req, Request::KmsRotate | Request::KmsToToken { .. }))
    {
        close(dir).await?;
        return Err(SecretError::Invalid(
            "this node is a cluster member and is not running: start it so the change reaches every node (a change made here alone would be replaced by the cluster's at its next start)".into(),
        ));
    }
    // `secret test` without a daemon: the upstreams of gateway.toml, with their own clients
    // on the one rustls provider (ring), as the daemon installs it at start
    let upstreams = match (&dir.config, req) {
        (Some(c), Request::SecretTest { .. }) => {
            didgate_io::tls::install_provider();
            Some(UpstreamSet::of_config(c).map_err(|e| SecretError::Invalid(e.to_string()))?)
        }
        _ => None,
    };
    let reply = secret_command(&dir.secrets, upstreams.as_ref(), req).await;
    close(dir).await?;
    Ok(reply)
}

/// Closes directly opened secrets (their chain's final checkpoint) off the async threads.
async fn close(dir: DirSecrets) -> Result<(), SecretError> {
    tokio::task::spawn_blocking(move || drop(dir))
        .await
        .map_err(|source| SecretError::Task {
            what: "closing the chain",
            source,
        })
}

/// Renders the secrets as the `secret list` table: name, version, prefix, status, last use.
pub fn render_list(secrets: &[SecretInfo]) -> String {
    let mut rows = vec![[
        "NAME".to_string(),
        "VERSION".into(),
        "PREFIX".into(),
        "STATUS".into(),
        "LAST USE".into(),
    ]];
    for s in secrets {
        let mut status = s.status.clone();
        if let Some(p) = s.purge_ms {
            status.push_str(&format!(" (purged {})", fmt_utc(p)));
        }
        let retired = s.versions.iter().filter(|v| v.retired_ms.is_some()).count();
        let mut version = s.version.to_string();
        if retired > 0 {
            version.push_str(&format!(" (+{retired} in grace)"));
        }
        rows.push([
            s.name.clone(),
            version,
            s.display.clone(),
            status,
            s.last_used_ms.map_or_else(|| "never".into(), fmt_utc),
        ]);
    }
    let mut widths = [0usize; 5];
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r.iter()) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    for r in &rows {
        let line: Vec<String> = r
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// What `didgated` prints for a successful reply to `req` (JSON with `json`). Returns the text
/// and whether every `secret test` probe succeeded.
pub fn describe(req: &Request, reply: &Reply, json: bool) -> (String, bool) {
    let secrets = reply.secrets.as_deref().unwrap_or_default();
    let first = secrets.first();
    let until = |info: &SecretInfo| {
        info.versions
            .iter()
            .filter_map(|v| v.usable_until_ms.map(|u| (v.version, u)))
            .map(|(v, u)| format!("; version {v} stays usable until {}", fmt_utc(u)))
            .collect::<String>()
    };
    if json {
        let value = match req {
            Request::SecretTest { .. } => serde_json::to_string_pretty(&reply.probes),
            Request::KmsRotate | Request::KmsToToken { .. } => {
                serde_json::to_string_pretty(&reply.kms)
            }
            Request::SecretList => serde_json::to_string_pretty(&secrets),
            _ => serde_json::to_string_pretty(&first),
        };
        let ok = reply.probes.as_ref().is_none_or(|p| p.iter().all(|p| p.ok));
        return (value.unwrap_or_default() + "\n", ok);
    }
    let text = match (req, first) {
        (Request::SecretList, _) => render_list(secrets),
        (Request::SecretTest { name, .. }, _) => {
            let mut out = String::new();
            let probes = reply.probes.as_deref().unwrap_or_default();
            for p in probes {
                let verdict = match (p.ok, p.status, &p.error) {
                    (true, Some(s), _) => format!("{s} ok"),
                    (false, Some(s), _) => format!("{s} failed"),
                    (_, None, Some(e)) => format!("failed: {e}"),
                    _ => "failed".into(),
                };
                out.push_str(&format!(
                    "secret {name} version {} via {}: {} {} -> {verdict}\n",
                    p.version, p.upstream, p.method, p.path
                ));
            }
            let ok = probes.iter().all(|p| p.ok);
            return (out, ok);
        }
        (Request::KmsRotate, _) => match &reply.kms {
            Some(k) => format!(
                "master key rotated ({} -> {}): {} data keys rewrapped in {} secrets; no secret was decrypted\n",
                k.old_key_id, k.new_key_id, k.data_keys, k.secrets
            ),
            None => "master key rotated\n".into(),
        },
        (Request::KmsToToken { .. }, _) => match &reply.kms {
            Some(k) => format!(
                "master key {} is now in the PKCS#11 token ({} replaced): {} data keys rewrapped in {} secrets; master.key removed (nothing in the data directory can open a secret now)\n",
                k.new_key_id, k.old_key_id, k.data_keys, k.secrets
            ),
            None => "master key moved to the PKCS#11 token\n".into(),
        },
        (Request::SecretAdd { .. }, Some(i)) => {
            format!(
                "secret {} version {} stored ({})\n",
                i.name, i.version, i.display
            )
        }
        (Request::SecretRotate { .. }, Some(i)) => format!(
            "secret {} rotated to version {} ({}){}\n",
            i.name,
            i.version,
            i.display,
            until(i)
        ),
        (Request::SecretDelete { .. }, Some(i)) => format!(
            "secret {} deleted; `didgated secret enable {}` restores it until {}, then it is purged\n",
            i.name,
            i.name,
            i.purge_ms.map(fmt_utc).unwrap_or_default()
        ),
        (_, Some(i)) => format!("secret {} version {} is {}\n", i.name, i.version, i.status),
        (_, None) => "done\n".into(),
    };
    (text, true)
}
