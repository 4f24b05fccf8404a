//! The master key in a PKCS#11 token (specs/operation.md, "Secrets at rest", "A master key in
//! a token").
//!
//! This module owns the session with the token: loading the module, finding the token by its
//! label, logging in with the PIN (read from an environment variable or a file at each login,
//! never from argv or the configuration), generating and destroying master keys, and wrapping
//! and unwrapping data keys inside the token with AES-256-GCM. The master key is generated
//! inside the token as a sensitive, non-extractable AES-256 key, so this process never holds
//! its bytes. Each master key is a token object with the configured label and a random 8-byte
//! `CKA_ID`, which is its [`KeyId`] (records name the key that wraps their data keys by it).
//!
//! A token that fails (module missing, wrong PIN, token removed, session lost) makes every
//! operation fail with [`KmsError::Unavailable`] (calls: `kms_unavailable`); the next operation
//! at least [`RETRY_AFTER`] later reconnects from scratch (a new module context, session and
//! login), so the gateway recovers without a restart when the token is back. A PIN the token
//! refused as incorrect is not presented again until it changes (a hardware token locks its
//! user PIN after a few wrong attempts). A decryption the
//! token refuses is retried once on a fresh session before it is reported as an authentication
//! failure ([`KmsError::Open`]): SoftHSM2 reports a tampered GCM tag as `CKR_GENERAL_ERROR`,
//! the same code as many device failures.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::types::AuthPin;
use zeroize::Zeroizing;

use crate::kms::{KeyId, Kms, KmsError};

/// How long after a failed connection the next operation tries again.
pub const RETRY_AFTER: Duration = Duration::from_secs(1);
/// Bytes of the GCM nonce (IV) prepended to a wrapped data key.
const IV_LEN: usize = 12;
/// GCM tag, bits.
const TAG_BITS: u64 = 128;

/// Where the token's user PIN comes from: never argv, never the configuration file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PinSource {
    /// An environment variable of the gateway's process.
    Env(String),
    /// A file (its first line; mode 0600 recommended).
    File(PathBuf),
}

/// What identifies the token and the master keys in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenConfig {
    /// The PKCS#11 module (a shared library).
    pub module: PathBuf,
    /// The token's label.
    pub token: String,
    /// The label of the master keys didgate generates in it.
    pub key_label: String,
    /// Where the PIN comes from.
    pub pin: PinSource,
}

/// Why the token cannot be used. Never carries the PIN or key material.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TokenError {
    /// The module cannot be loaded or initialised.
    #[error("PKCS#11 module {module}")]
    Module {
        /// Its path.
        module: String,
        /// What failed.
        #[source]
        source: CkError,
    },
    /// No slot holds a token with the configured label.
    #[error("no PKCS#11 token labelled {0:?}")]
    NoToken(String),
    /// The PIN cannot be read from its source.
    #[error("PKCS#11 PIN from {0}")]
    Pin(String, #[source] std::io::Error),
    /// The PIN source names an environment variable that is not set.
    #[error("PKCS#11 PIN: environment variable {0} is not set")]
    PinUnset(String),
    /// The PIN is the one the token refused last time: it is not presented again until it
    /// changes.
    #[error(
        "PKCS#11 PIN refused earlier and unchanged since: not presented again (a token locks after a few wrong PINs); fix pin_env or pin_file"
    )]
    PinNotRetried,
    /// The token refused the PIN.
    #[error("PKCS#11 login refused (wrong PIN?)")]
    Login(#[source] CkError),
    /// The token has no master key with this label and id.
    #[error("no master key {label:?} with id {id} in the token")]
    NoKey {
        /// The label.
        label: String,
        /// The id, hex.
        id: String,
    },
    /// A connection failed less than [`RETRY_AFTER`] ago (why, as it was reported then).
    #[error("PKCS#11 token unavailable: {0}")]
    Unavailable(String),
    /// A token operation failed.
    #[error("PKCS#11 {0}")]
    Operation(&'static str, #[source] CkError),
}

impl From<TokenError> for KmsError {
    fn from(e: TokenError) -> Self {
        KmsError::Unavailable(Box::new(e))
    }
}

/// The connection to the token: one session, shared by every key of this module in this
/// process, reopened after a failure.
pub struct Token {
    config: TokenConfig,
    state: Mutex<State>,
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Token")
            .field("module", &self.config.module)
            .field("token", &self.config.token)
            .finish_non_exhaustive()
    }
}

#[derive(Default)]
struct State {
    live: Option<Live>,
    /// No reconnection before this instant (after a failed one).
    next_try: Option<Instant>,
    /// Why the last connection failed (for the refusals until the next try).
    why: String,
    /// A digest of the PIN the token last refused as incorrect: that PIN is not presented
    /// again (a token locks its user PIN after a few wrong ones); a changed PIN is.
    refused_pin: Option<[u8; 32]>,
}

/// BLAKE3 `derive_key` context of [`State::refused_pin`] (kept in memory only).
const REFUSED_PIN_CONTEXT: &str = "didgate pkcs11 refused pin v1";

struct Live {
    ctx: Pkcs11,
    session: Session,
    keys: HashMap<KeyId, ObjectHandle>,
}

impl Live {
    /// Drops the session and finalises the module, so the next connection starts afresh (a
    /// token removed and put back is found again only by a new `C_Initialize`).
    fn close(self) {
        let Live { ctx, session, .. } = self;
        drop(session);
        if let Err(e) = ctx.finalize() {
            tracing::debug!(%e, "PKCS#11 finalize");
        }
    }
}

impl Token {
    /// A token connection (connects at the first operation).
    pub fn new(config: TokenConfig) -> Arc<Self> {
        Arc::new(Self {
            config,
            state: Mutex::new(State::default()),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &TokenConfig {
        &self.config
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn pin(&self) -> Result<Zeroizing<String>, TokenError> {
        let text = match &self.config.pin {
            PinSource::Env(name) => {
                Zeroizing::new(std::env::var(name).map_err(|_| TokenError::PinUnset(name.clone()))?)
            }
            PinSource::File(path) => Zeroizing::new(
                std::fs::read_to_string(path)
                    .map_err(|e| TokenError::Pin(path.display().to_string(), e))?,
            ),
        };
        let line = text.lines().next().unwrap_or_default().trim();
        Ok(Zeroizing::new(line.to_string()))
    }

    fn connect(&self, refused_pin: &mut Option<[u8; 32]>) -> Result<Live, TokenError> {
        let module = |source| TokenError::Module {
            module: self.config.module.display().to_string(),
            source,
        };
        let ctx = Pkcs11::new(&self.config.module).map_err(module)?;
        match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
            Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
            Err(e) => return Err(module(e)),
        }
        let op = |what| move |e| TokenError::Operation(what, e);
        let mut found = None;
        for slot in ctx
            .get_slots_with_token()
            .map_err(op("listing the slots"))?
        {
            let info = ctx.get_token_info(slot).map_err(op("reading a token"))?;
            if info.label().trim_end() == self.config.token {
                found = Some(slot);
                break;
            }
        }
        let slot = found.ok_or_else(|| TokenError::NoToken(self.config.token.clone()))?;
        let pin = self.pin()?;
        let digest = blake3::derive_key(REFUSED_PIN_CONTEXT, pin.as_bytes());
        if *refused_pin == Some(digest) {
            return Err(TokenError::PinNotRetried);
        }
        let session = ctx.open_rw_session(slot).map_err(op("opening a session"))?;
        match session.login(UserType::User, Some(&AuthPin::from(pin.to_string()))) {
            Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => {}
            Err(e @ CkError::Pkcs11(RvError::PinIncorrect, _)) => {
                *refused_pin = Some(digest);
                return Err(TokenError::Login(e));
            }
            Err(e) => return Err(TokenError::Login(e)),
        }
        *refused_pin = None;
        Ok(Live {
            ctx,
            session,
            keys: HashMap::new(),
        })
    }

    /// Runs `f` on a live session, connecting first if needed. When `f` fails, the session is
    /// closed and, if `retry`, `f` runs once more on a fresh one: the result of that second
    /// run is the answer (a failing token fails to connect: [`KmsError::Unavailable`]).
    fn with<T>(
        &self,
        retry: bool,
        f: impl Fn(&mut Live) -> Result<T, TokenError>,
    ) -> Result<T, TokenError> {
        let mut st = self.state();
        let mut attempts = if retry { 2 } else { 1 };
        loop {
            attempts -= 1;
            let mut live = match st.live.take() {
                Some(live) => live,
                None => {
                    if st.next_try.is_some_and(|at| Instant::now() < at) {
                        return Err(TokenError::Unavailable(st.why.clone()));
                    }
                    match self.connect(&mut st.refused_pin) {
                        Ok(live) => {
                            st.next_try = None;
                            live
                        }
                        Err(e) => {
                            st.next_try = Some(Instant::now() + RETRY_AFTER);
                            st.why = e.to_string();
                            tracing::warn!(error = %e, "PKCS#11 token unavailable");
                            return Err(e);
                        }
                    }
                }
            };
            match f(&mut live) {
                Ok(v) => {
                    st.live = Some(live);
                    return Ok(v);
                }
                Err(e) => {
                    live.close();
                    if attempts == 0 {
                        return Err(e);
                    }
                    tracing::debug!(error = %e, "PKCS#11 operation failed; reconnecting once");
                }
            }
        }
    }

    fn key(&self, live: &mut Live, id: &KeyId) -> Result<ObjectHandle, TokenError> {
        if let Some(h) = live.keys.get(id) {
            return Ok(*h);
        }
        let found = live
            .session
            .find_objects(&[
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::Label(self.config.key_label.as_bytes().to_vec()),
                Attribute::Id(id.to_vec()),
            ])
            .map_err(|e| TokenError::Operation("finding the master key", e))?;
        let h = *found.first().ok_or_else(|| TokenError::NoKey {
            label: self.config.key_label.clone(),
            id: hex::encode(id),
        })?;
        live.keys.insert(*id, h);
        Ok(h)
    }

    /// Generates a new master key in the token: AES-256, sensitive, never extractable, usable
    /// only to encrypt and decrypt, a token object labelled with the configured label and a
    /// fresh random id. Returns the key.
    pub fn generate(self: &Arc<Self>) -> Result<Pkcs11Kms, TokenError> {
        let id: KeyId = rand::random();
        let label = self.config.key_label.as_bytes().to_vec();
        self.with(true, |live| {
            let h = live
                .session
                .generate_key(
                    &Mechanism::AesKeyGen,
                    &[
                        Attribute::Class(ObjectClass::SECRET_KEY),
                        Attribute::KeyType(KeyType::AES),
                        Attribute::ValueLen(32.into()),
                        Attribute::Token(true),
                        Attribute::Private(true),
                        Attribute::Sensitive(true),
                        Attribute::Extractable(false),
                        Attribute::Encrypt(true),
                        Attribute::Decrypt(true),
                        Attribute::Wrap(false),
                        Attribute::Unwrap(false),
                        Attribute::Sign(false),
                        Attribute::Verify(false),
                        Attribute::Derive(false),
                        Attribute::Label(label.clone()),
                        Attribute::Id(id.to_vec()),
                    ],
                )
                .map_err(|e| TokenError::Operation("generating a master key", e))?;
            live.keys.insert(id, h);
            Ok(())
        })?;
        Ok(Pkcs11Kms {
            token: self.clone(),
            id,
        })
    }

    /// The ids of every master key with the configured label in the token.
    pub fn key_ids(&self) -> Result<Vec<KeyId>, TokenError> {
        self.with(true, |live| {
            let handles = live
                .session
                .find_objects(&[
                    Attribute::Class(ObjectClass::SECRET_KEY),
                    Attribute::Label(self.config.key_label.as_bytes().to_vec()),
                ])
                .map_err(|e| TokenError::Operation("listing the master keys", e))?;
            let mut ids = Vec::new();
            for h in handles {
                let attrs = live
                    .session
                    .get_attributes(h, &[AttributeType::Id])
                    .map_err(|e| TokenError::Operation("reading a key's id", e))?;
                for a in attrs {
                    if let Attribute::Id(v) = a
                        && let Ok(id) = KeyId::try_from(v.as_slice())
                    {
                        ids.push(id);
                    }
                }
            }
            Ok(ids)
        })
    }

    /// Destroys the master key `id` (after every data key it wrapped was rewrapped).
    pub fn destroy(&self, id: &KeyId) -> Result<(), TokenError> {
        self.with(true, |live| {
            let h = self.key(live, id)?;
            live.keys.remove(id);
            live.session
                .destroy_object(h)
                .map_err(|e| TokenError::Operation("destroying a master key", e))
        })
    }

    /// Whether the token's session works now (a read of the session's state).
    pub fn check(&self) -> Result<(), TokenError> {
        self.with(true, |live| {
            live.session
                .get_session_info()
                .map(|_| ())
                .map_err(|e| TokenError::Operation("reading the session", e))
        })
    }
}

/// One master key in a token, as a [`Kms`]: data keys are encrypted inside the token with
/// AES-256-GCM (a random 96-bit IV per wrap, the 128-bit tag, the wrap's associated data
/// bound as GCM AAD). A wrapped data key is `IV (12) || ciphertext (32) || tag (16)`.
#[derive(Clone)]
pub struct Pkcs11Kms {
    token: Arc<Token>,
    id: KeyId,
}

impl std::fmt::Debug for Pkcs11Kms {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Pkcs11Kms(id {}, {:?})",
            hex::encode(self.id),
            self.token
        )
    }
}

impl Pkcs11Kms {
    /// The master key `id` in `token` (not checked until it is used).
    pub fn new(token: Arc<Token>, id: KeyId) -> Self {
        Self { token, id }
    }

    /// The token it lives in.
    pub fn token(&self) -> &Arc<Token> {
        &self.token
    }
}

impl Kms for Pkcs11Kms {
    fn key_id(&self) -> KeyId {
        self.id
    }

    fn wrap(&self, data_key: &[u8; 32], aad: &[u8]) -> Result<Vec<u8>, KmsError> {
        let mut iv: [u8; IV_LEN] = rand::random();
        let ct = self.token.with(true, |live| {
            let key = self.token.key(live, &self.id)?;
            let mut iv = iv;
            let params = GcmParams::new(&mut iv, aad, TAG_BITS.into())
                .map_err(|e| TokenError::Operation("GCM parameters", e))?;
            live.session
                .encrypt(&Mechanism::AesGcm(params), key, data_key)
                .map_err(|e| TokenError::Operation("wrapping a data key", e))
        })?;
        let mut out = iv.to_vec();
        out.extend_from_slice(&ct);
        iv.fill(0);
        Ok(out)
    }

    fn unwrap(&self, wrapped: &[u8], aad: &[u8]) -> Result<Zeroizing<[u8; 32]>, KmsError> {
        let (Some(iv), Some(ct)) = (wrapped.get(..IV_LEN), wrapped.get(IV_LEN..)) else {
            return Err(KmsError::Malformed);
        };
        let iv: [u8; IV_LEN] = iv.try_into().map_err(|_| KmsError::Malformed)?;
        let decrypted = self.token.with(true, |live| {
            let key = self.token.key(live, &self.id)?;
            let mut iv = iv;
            let params = GcmParams::new(&mut iv, aad, TAG_BITS.into())
                .map_err(|e| TokenError::Operation("GCM parameters", e))?;
            live.session
                .decrypt(&Mechanism::AesGcm(params), key, ct)
                .map(Zeroizing::new)
                .map_err(|e| TokenError::Operation("unwrapping a data key", e))
        });
        let plain = match decrypted {
            Ok(p) => p,
            // the token refused the decryption twice, on two sessions: if it is up now, the
            // ciphertext (or its binding) is what failed
            Err(TokenError::Operation("unwrapping a data key", _))
                if self.token.check().is_ok() =>
            {
                return Err(KmsError::Open(hex::encode(self.id)));
            }
            Err(e) => return Err(e.into()),
        };
        let mut out = Zeroizing::new([0u8; 32]);
        if plain.len() != out.len() {
            return Err(KmsError::Open(hex::encode(self.id)));
        }
        out.copy_from_slice(&plain);
        Ok(out)
    }
}
