//! The master key in a PKCS#11 token (specs/operation.md, "A master key in a token"), on a
//! real SoftHSM2 token initialised by each test in its own temp directory (`SOFTHSM2_CONF`),
//! with real `didgated` processes (the module is loaded in the daemon's process, never in this
//! test's: each test's token directory is its own process's configuration).
//!
//! Without SoftHSM2 (Debian `softhsm2`) the tests print SKIPPED; under `CI=true` they fail.

use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use didgate_client::{CallSpec, Client};
use didgate_daemon::upstream_demo::DemoUpstream;
use didgate_gateway::config::{KmsKind, Pkcs11Settings, RawConfig, RawUpstream, Rule, Settings};
use didgate_protocol::message::RefusalCode;
use didgate_protocol::{Did, Version};
use didgate_tests::{CANARY, Daemon, alice, bin, files_containing, refusal_code};

/// Long and unlike anything else in a log, so a search for it finds only a leak (a 4-digit PIN
/// turned up in a log by chance: a port, a timestamp, a hash).
const PIN: &str = "pin-7c3e91a4d05b";
const SO_PIN: &str = "so-pin-2f8b64e0c917";
/// Where Debian's softhsm2 puts the module (and the multiarch path of other distributions).
const MODULES: &[&str] = &[
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
];

/// A SoftHSM2 token of its own: configuration and token directory in a temp directory.
struct Hsm {
    dir: tempfile::TempDir,
    module: PathBuf,
}

impl Hsm {
    /// Initialises a token labelled `didgate` with [`PIN`]; `None` (SKIPPED) without SoftHSM2.
    fn init() -> anyhow::Result<Option<Self>> {
        let module = MODULES.iter().map(PathBuf::from).find(|p| p.exists());
        let util = which("softhsm2-util");
        let (Some(module), Some(util)) = (module, util) else {
            if std::env::var("CI").is_ok_and(|v| v == "true") {
                anyhow::bail!("SoftHSM2 is not installed and CI=true (.ci/run installs softhsm2)");
            }
            println!("SKIPPED: SoftHSM2 not installed (.ci/run installs it)");
            return Ok(None);
        };
        let dir = tempfile::tempdir()?;
        std::fs::create_dir(dir.path().join("tokens"))?;
        std::fs::write(
            dir.path().join("softhsm2.conf"),
            format!(
                "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
                dir.path().join("tokens").display()
            ),
        )?;
        let hsm = Self { dir, module };
        let out = Command::new(util)
            .args(["--init-token", "--free", "--label", "didgate"])
            .args(["--pin", PIN, "--so-pin", SO_PIN])
            .env("SOFTHSM2_CONF", hsm.conf())
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "softhsm2-util: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(Some(hsm))
    }

    fn conf(&self) -> PathBuf {
        self.dir.path().join("softhsm2.conf")
    }

    fn tokens(&self) -> PathBuf {
        self.dir.path().join("tokens")
    }

    /// The environment of a process that uses the token: its configuration and the PIN.
    fn env(&self) -> Vec<(&'static str, OsString)> {
        vec![
            ("SOFTHSM2_CONF", self.conf().into_os_string()),
            ("HSM_PIN", OsString::from(PIN)),
        ]
    }

    /// `pkcs11-tool`'s listing of the token's secret keys (`None` without OpenSC).
    fn secret_keys(&self) -> anyhow::Result<Option<String>> {
        let Some(tool) = which("pkcs11-tool") else {
            anyhow::ensure!(
                !std::env::var("CI").is_ok_and(|v| v == "true"),
                "pkcs11-tool (OpenSC) is not installed and CI=true (.ci/run installs opensc)"
            );
            println!("SKIPPED: the token key's attributes: pkcs11-tool not installed");
            return Ok(None);
        };
        let out = Command::new(tool)
            .arg("--module")
            .arg(&self.module)
            .args(["--token-label", "didgate", "--login", "--pin", PIN])
            .args(["--list-objects", "--type", "secrkey"])
            .env("SOFTHSM2_CONF", self.conf())
            .output()?;
        anyhow::ensure!(out.status.success(), "pkcs11-tool failed");
        Ok(Some(String::from_utf8_lossy(&out.stdout).into_owned()))
    }
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
}

/// A gateway data directory with one upstream (the demo's, key [`CANARY`]) alice may call,
/// its master key in `hsm` (`pin`: how the PIN is given), or in `master.key` when `hsm` is
/// `None`.
struct Site {
    root: tempfile::TempDir,
    upstream: DemoUpstream,
    did: Did,
}

#[derive(Clone, Copy)]
enum Pin {
    Env,
    File,
}

impl Site {
    async fn new(hsm: Option<&Hsm>, pin: Pin) -> anyhow::Result<Self> {
        let root = tempfile::tempdir()?;
        let upstream =
            DemoUpstream::start(zeroize::Zeroizing::new(CANARY.to_string()), None).await?;
        let gw = root.path().join("gateway");
        let did = didgate_gateway::init(&gw, "127.0.0.1:0".parse()?)?;
        let site = Self {
            root,
            upstream,
            did,
        };
        site.configure(hsm, pin)?;
        Ok(site)
    }

    fn gw(&self) -> PathBuf {
        self.root.path().join("gateway")
    }

    fn log(&self) -> PathBuf {
        self.root.path().join("daemon.log")
    }

    /// Writes gateway.toml: the file KMS without `hsm`, else the token.
    fn configure(&self, hsm: Option<&Hsm>, pin: Pin) -> anyhow::Result<()> {
        let config = RawConfig {
            gateway: Settings {
                upstream_timeout_secs: 10,
                kms: if hsm.is_some() {
                    KmsKind::Pkcs11
                } else {
                    KmsKind::File
                },
                handshakes: didgate_tests::no_address_limits(),
                ..Settings::new("127.0.0.1:0".parse()?)
            },
            upstreams: vec![RawUpstream {
                local: true,
                ..RawUpstream::new("payments", self.upstream.base_url(), "payments-key")
            }],
            groups: Default::default(),
            rules: vec![Rule {
                principals: vec![alice().did().to_string()],
                upstream: "payments".into(),
                methods: vec!["GET".into()],
                paths: vec!["/v1/**".into()],
            }],
            did_web: Default::default(),
            pkcs11: hsm.map(|h| Pkcs11Settings {
                module: h.module.display().to_string(),
                token: "didgate".into(),
                key_label: "didgate-master".into(),
                pin_env: matches!(pin, Pin::Env).then(|| "HSM_PIN".into()),
                pin_file: matches!(pin, Pin::File).then(|| "hsm.pin".into()),
            }),
            node: None,
            cluster: None,
        };
        std::fs::write(self.gw().join("gateway.toml"), toml::to_string(&config)?)?;
        Ok(())
    }

    /// Runs `didgated ARGS --data GW` with `env`, `stdin` fed; (success, stdout + stderr).
    fn didgated(
        &self,
        args: &[&str],
        env: &[(&'static str, OsString)],
        stdin: Option<&str>,
    ) -> anyhow::Result<(bool, String)> {
        use std::io::Write;
        let mut child = Command::new(bin("didgated")?)
            .args(args)
            .arg("--data")
            .arg(self.gw())
            .envs(env.iter().map(|(k, v)| (*k, v.as_os_str())))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        if let Some(text) = stdin
            && let Some(mut input) = child.stdin.take()
        {
            input.write_all(text.as_bytes())?;
        }
        drop(child.stdin.take());
        let out = child.wait_with_output()?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        Ok((out.status.success(), text))
    }

    fn start(&self, env: &[(&'static str, OsString)]) -> anyhow::Result<Daemon> {
        let env: Vec<(&str, &OsStr)> = env.iter().map(|(k, v)| (*k, v.as_os_str())).collect();
        Daemon::start_with_env(&self.gw(), &self.log(), &env)
    }

    async fn client(&self, d: &Daemon, name: &str) -> anyhow::Result<Client> {
        Ok(Client::open(
            alice(),
            &self.root.path().join(name),
            d.addr,
            self.did.clone(),
        )
        .await?)
    }
}

fn balance() -> CallSpec {
    CallSpec::new("payments", "GET", "/v1/balance")
}

/// Asserts nothing in the gateway's data directory or its log holds the secret.
fn assert_no_secret_material(site: &Site) {
    assert!(
        files_containing(&site.gw(), CANARY.as_bytes()).is_empty(),
        "the credential is in the data directory"
    );
    let log = std::fs::read_to_string(site.log()).unwrap_or_default();
    assert!(!log.contains(CANARY), "the credential is in the log");
    assert!(!log.contains(PIN), "the PIN is in the log");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_key_in_the_token_serves_rotates_and_survives_a_restart() -> anyhow::Result<()> {
    let Some(hsm) = Hsm::init()? else {
        return Ok(());
    };
    let site = Site::new(Some(&hsm), Pin::Env).await?;
    let env = hsm.env();
    let (ok, out) = site.didgated(&["kms", "init-pkcs11"], &env, None)?;
    assert!(ok, "{out}");
    assert!(out.contains("is now in the PKCS#11 token"), "{out}");
    assert!(
        !site.gw().join("master.key").exists(),
        "master.key is removed: no key material in the data directory"
    );
    let key_id = out
        .split("master key ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .unwrap_or_default()
        .to_string();
    if let Some(keys) = hsm.secret_keys()? {
        assert!(keys.contains(&key_id), "{keys}");
        assert!(keys.contains("never extractable"), "{keys}");
        assert!(keys.contains("sensitive"), "{keys}");
    }
    // a second init is refused: the key is already there
    let (ok, out) = site.didgated(&["kms", "init-pkcs11"], &env, None)?;
    assert!(!ok && out.contains("already in the token"), "{out}");

    let (ok, out) = site.didgated(&["secret", "add", "payments-key"], &env, Some(CANARY))?;
    assert!(ok, "{out}");
    let d = site.start(&env)?;
    let c = site.client(&d, "alice").await?;
    assert_eq!(c.call(balance()).await?.status, 200);
    assert_eq!(site.upstream.seen().len(), 1, "the upstream got the call");

    // rotation through the running daemon: calls keep working, the old key is destroyed
    let (ok, out) = site.didgated(&["kms", "rotate"], &env, None)?;
    assert!(ok && out.contains("1 data keys rewrapped"), "{out}");
    assert_eq!(c.call(balance()).await?.status, 200);
    if let Some(keys) = hsm.secret_keys()? {
        assert!(!keys.contains(&key_id), "the old key is destroyed: {keys}");
        assert_eq!(keys.matches("didgate-master").count(), 1, "{keys}");
    }
    c.close().await;
    drop(c);
    d.stop()?;

    // a stop in the middle of a rotation (after the new key was generated, before the batch
    // naming it) leaves a key with the label that no record names: the next start destroys it
    if let Some(tool) = which("pkcs11-tool") {
        let made = Command::new(tool)
            .arg("--module")
            .arg(&hsm.module)
            .args(["--token-label", "didgate", "--login", "--pin", PIN])
            .args([
                "--keygen",
                "--key-type",
                "AES:32",
                "--label",
                "didgate-master",
            ])
            .args(["--id", "0102030405060708"])
            .env("SOFTHSM2_CONF", hsm.conf())
            .output()?;
        assert!(
            made.status.success(),
            "{}",
            String::from_utf8_lossy(&made.stderr)
        );
        let keys = hsm.secret_keys()?.unwrap_or_default();
        assert_eq!(keys.matches("didgate-master").count(), 2, "{keys}");
    }

    // restart: the store names the token's key; calls work
    let d = site.start(&env)?;
    if let Some(keys) = hsm.secret_keys()? {
        assert!(
            !keys.contains("0102030405060708"),
            "the leftover key is destroyed: {keys}"
        );
        assert_eq!(keys.matches("didgate-master").count(), 1, "{keys}");
    }
    let c = site.client(&d, "alice").await?;
    assert_eq!(c.call(balance()).await?.status, 200);
    c.close().await;
    drop(c);
    d.stop()?;
    assert_no_secret_material(&site);
    // the chain (with its kms_rotated entries) verifies
    let out = Command::new(bin("didgate-audit")?)
        .arg("verify")
        .arg("--gateway")
        .arg(site.gw())
        .arg("--client")
        .arg(site.root.path().join("alice"))
        .output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_kms_store_with_secrets_migrates_into_the_token() -> anyhow::Result<()> {
    let Some(hsm) = Hsm::init()? else {
        return Ok(());
    };
    // a store of the file KMS, with a secret of two versions and another secret
    let site = Site::new(None, Pin::Env).await?;
    let (ok, out) = site.didgated(&["secret", "add", "payments-key"], &[], Some("sk-old-0001"))?;
    assert!(ok, "{out}");
    let (ok, out) = site.didgated(&["secret", "rotate", "payments-key"], &[], Some(CANARY))?;
    assert!(ok, "{out}");
    let (ok, out) = site.didgated(&["secret", "add", "other-key"], &[], Some("sk-other-0002"))?;
    assert!(ok, "{out}");
    assert!(site.gw().join("master.key").exists());

    // the token is configured; before the migration the file key still opens the secrets
    site.configure(Some(&hsm), Pin::Env)?;
    let env = hsm.env();
    let (ok, out) = site.didgated(&["kms", "init-pkcs11"], &env, None)?;
    assert!(!ok && out.contains("kms migrate --to pkcs11"), "{out}");
    let (ok, out) = site.didgated(&["kms", "migrate", "--to", "pkcs11"], &env, None)?;
    assert!(ok, "{out}");
    assert!(
        out.contains("3 data keys rewrapped in 2 secrets") && out.contains("master.key removed"),
        "{out}"
    );
    assert!(!site.gw().join("master.key").exists());
    let (ok, out) = site.didgated(&["kms", "migrate", "--to", "pkcs11"], &env, None)?;
    assert!(!ok && out.contains("already in the token"), "{out}");

    let d = site.start(&env)?;
    let c = site.client(&d, "alice").await?;
    assert_eq!(c.call(balance()).await?.status, 200);
    let (ok, out) = site.didgated(&["secret", "list"], &env, None)?;
    assert!(ok && out.contains("other-key"), "{out}");
    c.close().await;
    drop(c);
    d.stop()?;
    assert_no_secret_material(&site);

    // without the token configured, the store says where its key is instead of failing
    // obscurely
    site.configure(None, Pin::Env)?;
    let (ok, out) = site.didgated(&["secret", "list"], &[], None)?;
    assert!(!ok && out.contains("is in a PKCS#11 token"), "{out}");
    Ok(())
}

/// Wrong PIN, a token gone mid-run and a module that is not there: calls that need the
/// secret are refused `kms_unavailable` (typed, audited as `failed`; a version 1 client gets
/// `secret_unavailable`), and the gateway recovers by itself when the token is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_failures_refuse_calls_kms_unavailable_and_recover_without_a_restart()
-> anyhow::Result<()> {
    let Some(hsm) = Hsm::init()? else {
        return Ok(());
    };
    let site = Site::new(Some(&hsm), Pin::File).await?;
    let pin_file = site.gw().join("hsm.pin");
    std::fs::write(&pin_file, format!("{PIN}\n"))?;
    let env = vec![("SOFTHSM2_CONF", hsm.conf().into_os_string())];
    let (ok, out) = site.didgated(&["kms", "init-pkcs11"], &env, None)?;
    assert!(ok, "{out}");
    let (ok, out) = site.didgated(&["secret", "add", "payments-key"], &env, Some(CANARY))?;
    assert!(ok, "{out}");

    // 1. a wrong PIN at start: the daemon starts, calls needing the secret are refused
    std::fs::write(&pin_file, "wrong-pin-e3a1\n")?;
    let d = site.start(&env)?;
    let c = site.client(&d, "alice").await?;
    assert_eq!(
        refusal_code(&c.call(balance()).await),
        Some(RefusalCode::KmsUnavailable)
    );
    assert!(
        site.upstream.seen().is_empty(),
        "no upstream call without the secret"
    );
    // the refused PIN is not presented again (a hardware token would lock its user PIN): the
    // later reconnections say so instead of logging in
    let deadline = Instant::now() + Duration::from_secs(20);
    let log = loop {
        let log = std::fs::read_to_string(site.log())?;
        if log.matches("not presented again").count() >= 2 {
            break log;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "no second reconnection within 20 s"
        );
        assert_eq!(
            refusal_code(&c.call(balance()).await),
            Some(RefusalCode::KmsUnavailable)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let first_skip = log.find("not presented again").unwrap_or_default();
    assert!(
        !log[first_skip..].contains("login refused"),
        "a refused PIN was presented again:\n{log}"
    );
    // the PIN fixed: the next call after the retry interval works, no restart
    std::fs::write(&pin_file, format!("{PIN}\n"))?;
    until_ok(&c).await?;

    // 2. the token's directory removed mid-run: refused; restored: served again
    let away = hsm.dir.path().join("tokens.away");
    std::fs::rename(hsm.tokens(), &away)?;
    assert_eq!(
        refusal_code(&c.call(balance()).await),
        Some(RefusalCode::KmsUnavailable)
    );
    let v1 = Client::open(
        alice(),
        &site.root.path().join("alice-v1"),
        d.addr,
        site.did.clone(),
    )
    .await?
    .speaking(Version::V1)?;
    assert_eq!(
        refusal_code(&v1.call(balance()).await),
        Some(RefusalCode::SecretUnavailable),
        "a version 1 client gets the version 1 code"
    );
    std::fs::rename(&away, hsm.tokens())?;
    until_ok(&c).await?;
    v1.close().await;
    c.close().await;
    drop((c, v1));
    d.stop()?;
    let failed: Vec<_> = didgate_tests::gateway_entries_in(&site.gw())?
        .into_iter()
        .filter(|e| e.kind == didgate_audit::entry::EntryKind::Failed)
        .filter_map(|e| e.code)
        .collect();
    assert!(
        failed.iter().filter(|c| *c == "kms_unavailable").count() >= 3,
        "each refusal is a failed entry with its code: {failed:?}"
    );

    // 3. the module path missing: the daemon starts, calls and admin commands say why
    let broken = Hsm {
        dir: tempfile::tempdir()?,
        module: PathBuf::from("/nonexistent/libpkcs11.so"),
    };
    site.configure(Some(&broken), Pin::File)?;
    let d = site.start(&env)?;
    let c = site.client(&d, "alice-2").await?;
    assert_eq!(
        refusal_code(&c.call(balance()).await),
        Some(RefusalCode::KmsUnavailable)
    );
    let (ok, out) = site.didgated(&["kms", "rotate"], &env, None)?;
    assert!(!ok && out.contains("/nonexistent/libpkcs11.so"), "{out}");
    c.close().await;
    drop(c);
    d.stop()?;
    assert_no_secret_material(&site);
    Ok(())
}

/// Calls until one is served (the token reconnects at most once a second), with a deadline.
async fn until_ok(c: &Client) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match c.call(balance()).await {
            Ok(a) if a.status == 200 => return Ok(()),
            r => {
                anyhow::ensure!(
                    Instant::now() < deadline,
                    "not served again within 20 s: {:?}",
                    refusal_code(&r)
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}
