//! API keys: who may use the gateway, as which tenant, at which priority.
//!
//! Keys live in a file (`--api-keys FILE`; in Kubernetes a Secret mounted as that file) that
//! holds only their SHA-256 digests, each with a name, a tenant and a priority class:
//!
//! ```yaml
//! keys:
//!   - name: team-a-batch          # what logs, metrics and the dashboard show (never the key)
//!     sha256: 2bb80d53...         # hex SHA-256 of the key (`printf %s "$KEY" | sha256sum`)
//!     tenant: team-a              # default: the name
//!     priority: low               # low | normal | high | 0..255 (default normal)
//!     may_set_priority: false     # honour the request's x-kvroute-priority header
//!     may_set_tenant: false       # honour the request's x-kvroute-tenant header
//!     may_debug: false            # answer x-kvroute-debug: 1 with the routing decision
//!     max_prompt_tokens: 8192     # guardrails (each optional; see `quota`)
//!     max_output_tokens: 1024
//!     tokens_per_minute: 200000
//!     max_concurrent: 32
//! ```
//!
//! The file is read again when its contents change (checked every [`RELOAD_EVERY`]); a file
//! that no longer parses keeps the keys that were loaded and logs why. With `--auth off` no key
//! is needed and the headers are honoured from anyone (for `kvroute up` on loopback).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use kvroute_routing::admission::Priority;
use sha2::{Digest, Sha256};

use super::quota::KeyLimits;

/// How often the key file is checked for changes.
pub const RELOAD_EVERY: Duration = Duration::from_secs(2);

/// Largest key file accepted.
pub const MAX_KEY_FILE_BYTES: u64 = 4 << 20;

/// Longest tenant or key name.
pub const MAX_NAME_LEN: usize = 64;

/// One key's identity and rights.
#[derive(Debug, Clone, PartialEq)]
pub struct KeyEntry {
    pub name: String,
    pub tenant: String,
    pub priority: Priority,
    pub may_set_priority: bool,
    pub may_set_tenant: bool,
    pub may_debug: bool,
    pub limits: KeyLimits,
}

/// The keys loaded now, by digest.
#[derive(Debug, Default)]
pub struct KeyRing {
    by_digest: HashMap<[u8; 32], Arc<KeyEntry>>,
}

impl KeyRing {
    pub fn len(&self) -> usize {
        self.by_digest.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_digest.is_empty()
    }

    /// The entry of a presented key.
    pub fn lookup(&self, key: &str) -> Option<Arc<KeyEntry>> {
        self.by_digest.get(&digest(key)).cloned()
    }
}

/// SHA-256 of a key.
pub fn digest(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

/// A short, non-reversible label of a key that is not in any key file (tenant of a request
/// that carried one while keys are off): the first 8 hex digits of its digest.
pub fn key_label(key: &str) -> String {
    digest(key)[..4]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct FileDoc {
    keys: Vec<FileKey>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct FileKey {
    name: String,
    sha256: String,
    #[serde(default)]
    tenant: Option<String>,
    #[serde(default)]
    priority: Option<String>,
    #[serde(default)]
    may_set_priority: bool,
    #[serde(default)]
    may_set_tenant: bool,
    #[serde(default)]
    may_debug: bool,
    #[serde(default)]
    max_prompt_tokens: Option<u64>,
    #[serde(default)]
    max_output_tokens: Option<u64>,
    #[serde(default)]
    tokens_per_minute: Option<u64>,
    #[serde(default)]
    max_concurrent: Option<u32>,
}

fn check_name(what: &str, s: &str) -> Result<(), String> {
    if s.is_empty() || s.len() > MAX_NAME_LEN {
        return Err(format!("{what} {s:?}: 1 to {MAX_NAME_LEN} characters"));
    }
    if !s
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':'))
    {
        return Err(format!(
            "{what} {s:?}: only letters, digits and - _ . : are allowed"
        ));
    }
    Ok(())
}

fn parse_hex32(s: &str) -> Option<[u8; 32]> {
    let s = s.trim();
    if s.len() != 64 || !s.is_ascii() {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

/// Parses a key file (YAML or JSON). Errors name the entry and never echo a digest.
pub fn parse_key_file(text: &str) -> Result<KeyRing, String> {
    let doc: FileDoc = serde_yaml::from_str(text).map_err(|e| format!("not a key file: {e}"))?;
    let mut ring = KeyRing::default();
    let mut names = std::collections::HashSet::new();
    for (i, k) in doc.keys.into_iter().enumerate() {
        let at = format!("keys[{i}]");
        check_name(&format!("{at}.name"), &k.name)?;
        if !names.insert(k.name.clone()) {
            return Err(format!("{at}.name {:?} is used twice", k.name));
        }
        let digest = parse_hex32(&k.sha256)
            .ok_or_else(|| format!("{at}.sha256: expected 64 hex digits (the key's SHA-256)"))?;
        let tenant = k.tenant.unwrap_or_else(|| k.name.clone());
        check_name(&format!("{at}.tenant"), &tenant)?;
        let priority = match k.priority {
            Some(p) => p
                .parse::<Priority>()
                .map_err(|e| format!("{at}.priority: {e}"))?,
            None => Priority::NORMAL,
        };
        for (field, v) in [
            ("max_prompt_tokens", k.max_prompt_tokens),
            ("max_output_tokens", k.max_output_tokens),
            ("tokens_per_minute", k.tokens_per_minute),
            ("max_concurrent", k.max_concurrent.map(u64::from)),
        ] {
            if v == Some(0) {
                return Err(format!(
                    "{at}.{field}: must be at least 1 (leave it out for no limit)"
                ));
            }
        }
        let entry = Arc::new(KeyEntry {
            name: k.name,
            tenant,
            priority,
            may_set_priority: k.may_set_priority,
            may_set_tenant: k.may_set_tenant,
            may_debug: k.may_debug,
            limits: KeyLimits {
                max_prompt_tokens: k.max_prompt_tokens,
                max_output_tokens: k.max_output_tokens,
                tokens_per_minute: k.tokens_per_minute,
                max_concurrent: k.max_concurrent,
            },
        });
        if ring.by_digest.insert(digest, entry).is_some() {
            return Err(format!("{at}: the same key is listed twice"));
        }
    }
    Ok(ring)
}

/// Reads and parses a key file.
pub fn load_key_file(path: &Path) -> Result<(KeyRing, [u8; 32]), String> {
    let meta = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
    if meta.len() > MAX_KEY_FILE_BYTES {
        return Err(format!(
            "{}: {} bytes is over the {MAX_KEY_FILE_BYTES}-byte limit",
            path.display(),
            meta.len()
        ));
    }
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let ring = parse_key_file(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok((ring, digest(&text)))
}

/// Who may call the gateway.
#[derive(Debug)]
pub enum Auth {
    /// No key needed; priority and tenant headers honoured from anyone.
    Off,
    /// A key from the file is needed.
    Keys(Arc<KeyStore>),
}

/// The keys of a file, reloaded when it changes.
#[derive(Debug)]
pub struct KeyStore {
    path: PathBuf,
    state: RwLock<(Arc<KeyRing>, [u8; 32])>,
}

impl KeyStore {
    /// Loads `path` (an error if it does not parse: the gateway does not start without keys).
    pub fn open(path: PathBuf) -> Result<Self, String> {
        let (ring, sum) = load_key_file(&path)?;
        Ok(Self {
            path,
            state: RwLock::new((Arc::new(ring), sum)),
        })
    }

    /// The keys now.
    pub fn ring(&self) -> Arc<KeyRing> {
        Arc::clone(&self.state.read().unwrap_or_else(|p| p.into_inner()).0)
    }

    /// Reads the file again; replaces the keys when its contents changed and parse. Returns
    /// `Ok(true)` when the keys were replaced.
    pub fn reload(&self) -> Result<bool, String> {
        let (ring, sum) = load_key_file(&self.path)?;
        let mut st = self.state.write().unwrap_or_else(|p| p.into_inner());
        if st.1 == sum {
            return Ok(false);
        }
        *st = (Arc::new(ring), sum);
        Ok(true)
    }

    /// Reloads every [`RELOAD_EVERY`] for as long as it runs.
    pub async fn watch(self: Arc<Self>) {
        let mut last_error = None;
        loop {
            tokio::time::sleep(RELOAD_EVERY).await;
            match self.reload() {
                Ok(true) => {
                    tracing::info!(file = %self.path.display(), keys = self.ring().len(), "API keys reloaded");
                    last_error = None;
                }
                Ok(false) => last_error = None,
                Err(e) => {
                    if last_error.as_deref() != Some(e.as_str()) {
                        tracing::error!(error = %e, "API key file unusable; keeping the keys loaded before");
                    }
                    last_error = Some(e);
                }
            }
        }
    }
}

/// The caller of one request, once authenticated.
#[derive(Debug, Clone, PartialEq)]
pub struct Caller {
    pub tenant: String,
    pub priority: Priority,
    /// The key's name (none with `--auth off`).
    pub key_name: Option<String>,
    /// The key's guardrails (none with `--auth off`).
    pub limits: KeyLimits,
    /// May ask for the routing decision (`x-kvroute-debug: 1`; anyone with `--auth off`).
    pub may_debug: bool,
}

/// Why a request was not let in.
#[derive(Debug, Clone, PartialEq)]
pub enum Denied {
    /// No `Authorization: Bearer` key.
    Missing,
    /// A key that is not in the file.
    Unknown,
    /// A header the key may not set, or a malformed one.
    BadHeader(String),
}

/// Decides who a request is: `bearer` is the `Authorization: Bearer` key, `priority` and
/// `tenant` the request's `x-kvroute-priority` / `x-kvroute-tenant` header values.
pub fn identify(
    auth: &Auth,
    bearer: Option<&str>,
    priority: Option<&str>,
    tenant: Option<&str>,
) -> Result<Caller, Denied> {
    let header_priority = |p: &str| {
        p.parse::<Priority>()
            .map_err(|e| Denied::BadHeader(format!("header x-kvroute-priority: {e}")))
    };
    let header_tenant = |t: &str| {
        check_name("header x-kvroute-tenant", t)
            .map(|()| t.to_string())
            .map_err(Denied::BadHeader)
    };
    match auth {
        Auth::Off => Ok(Caller {
            priority: priority
                .map(header_priority)
                .transpose()?
                .unwrap_or(Priority::NORMAL),
            tenant: match tenant {
                Some(t) => header_tenant(t)?,
                None => bearer.map_or_else(
                    || "anonymous".to_string(),
                    |k| format!("key:{}", key_label(k)),
                ),
            },
            key_name: None,
            limits: KeyLimits::default(),
            may_debug: true,
        }),
        Auth::Keys(store) => {
            let key = bearer.ok_or(Denied::Missing)?;
            let entry = store.ring().lookup(key).ok_or(Denied::Unknown)?;
            // A header the key may not set is ignored (the key's own class and tenant stand),
            // so a client cannot raise itself by sending one.
            let priority = match priority {
                Some(p) if entry.may_set_priority => header_priority(p)?,
                _ => entry.priority,
            };
            let tenant = match tenant {
                Some(t) if entry.may_set_tenant => header_tenant(t)?,
                _ => entry.tenant.clone(),
            };
            Ok(Caller {
                tenant,
                priority,
                key_name: Some(entry.name.clone()),
                limits: entry.limits,
                may_debug: entry.may_debug,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(key: &str) -> String {
        digest(key).iter().map(|b| format!("{b:02x}")).collect()
    }

    fn store(text: &str) -> (tempfile::TempDir, Auth) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.yaml");
        std::fs::write(&path, text).unwrap();
        (dir, Auth::Keys(Arc::new(KeyStore::open(path).unwrap())))
    }

    fn two_keys() -> String {
        format!(
            "keys:\n  - name: batch\n    sha256: {}\n    tenant: team-a\n    priority: low\n  - name: admin\n    sha256: {}\n    priority: high\n    may_set_priority: true\n    may_set_tenant: true\n",
            hex("sk-batch"),
            hex("sk-admin")
        )
    }

    #[test]
    fn keys_map_to_tenant_and_class_and_only_allowed_keys_set_headers() {
        let (_d, auth) = store(&two_keys());
        let c = identify(&auth, Some("sk-batch"), Some("255"), Some("other")).unwrap();
        assert_eq!(
            c,
            Caller {
                tenant: "team-a".into(),
                priority: Priority::LOW,
                key_name: Some("batch".into()),
                limits: KeyLimits::default(),
                may_debug: false,
            }
        );
        let c = identify(&auth, Some("sk-admin"), Some("200"), Some("ops")).unwrap();
        assert_eq!((c.tenant.as_str(), c.priority.0), ("ops", 200));
        let c = identify(&auth, Some("sk-admin"), None, None).unwrap();
        assert_eq!((c.tenant.as_str(), c.priority), ("admin", Priority::HIGH));
        assert_eq!(identify(&auth, None, None, None), Err(Denied::Missing));
        assert_eq!(
            identify(&auth, Some("sk-wrong"), None, None),
            Err(Denied::Unknown)
        );
        assert!(matches!(
            identify(&auth, Some("sk-admin"), Some("urgent!"), None),
            Err(Denied::BadHeader(_))
        ));
        assert!(matches!(
            identify(&auth, Some("sk-admin"), None, Some(&"x".repeat(65))),
            Err(Denied::BadHeader(_))
        ));
    }

    #[test]
    fn with_auth_off_headers_are_honoured_and_a_key_is_never_shown() {
        let c = identify(&Auth::Off, Some("sk-secret-123"), None, None).unwrap();
        assert!(
            c.tenant.starts_with("key:") && !c.tenant.contains("sk-"),
            "{c:?}"
        );
        assert_eq!(c.tenant.len(), "key:".len() + 8);
        let c = identify(&Auth::Off, None, Some("high"), Some("t1")).unwrap();
        assert_eq!((c.tenant.as_str(), c.priority), ("t1", Priority::HIGH));
        assert_eq!(
            identify(&Auth::Off, None, None, None).unwrap().tenant,
            "anonymous"
        );
    }

    #[test]
    fn bad_key_files_are_refused_with_the_entry_named() {
        let h = hex("k");
        for (text, says) in [
            ("", "not a key file"),
            ("keys: 3", "not a key file"),
            ("keys:\n  - name: a\n", "sha256"),
            ("keys:\n  - name: a\n    sha256: abc\n", "keys[0].sha256"),
            (
                &format!("keys:\n  - name: a\n    sha256: {}zz\n", &h[..62]) as &str,
                "keys[0].sha256",
            ),
            (
                &format!("keys:\n  - name: 'a b'\n    sha256: {h}\n"),
                "keys[0].name",
            ),
            (
                &format!("keys:\n  - name: a\n    sha256: {h}\n    priority: top\n"),
                "keys[0].priority",
            ),
            (
                &format!(
                    "keys:\n  - name: a\n    sha256: {h}\n  - name: a\n    sha256: {}\n",
                    hex("j")
                ),
                "used twice",
            ),
            (
                &format!("keys:\n  - name: a\n    sha256: {h}\n  - name: b\n    sha256: {h}\n"),
                "listed twice",
            ),
            (
                &format!("keys:\n  - name: a\n    sha256: {h}\n    admin: true\n"),
                "unknown field",
            ),
            (
                &format!("keys:\n  - name: a\n    sha256: {h}\n    tokens_per_minute: 0\n"),
                "keys[0].tokens_per_minute",
            ),
            (
                &format!("keys:\n  - name: a\n    sha256: {h}\n    max_concurrent: -1\n"),
                "not a key file",
            ),
        ] {
            let e = parse_key_file(text).unwrap_err();
            assert!(e.contains(says), "{text:?}: {e}");
            assert!(!e.contains(&h[..16]), "an error never echoes a digest: {e}");
        }
        let dir = tempfile::tempdir().unwrap();
        let big = dir.path().join("big.yaml");
        std::fs::write(&big, vec![b' '; (MAX_KEY_FILE_BYTES + 1) as usize]).unwrap();
        assert!(KeyStore::open(big).unwrap_err().contains("limit"));
        assert!(KeyStore::open(dir.path().join("missing.yaml")).is_err());
    }

    #[test]
    fn a_changed_file_is_reloaded_and_a_broken_one_keeps_the_old_keys() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.yaml");
        std::fs::write(&path, two_keys()).unwrap();
        let s = KeyStore::open(path.clone()).unwrap();
        assert_eq!(s.reload(), Ok(false), "unchanged");
        std::fs::write(
            &path,
            format!("keys:\n  - name: new\n    sha256: {}\n", hex("sk-new")),
        )
        .unwrap();
        assert_eq!(s.reload(), Ok(true));
        assert!(s.ring().lookup("sk-new").is_some());
        assert!(
            s.ring().lookup("sk-batch").is_none(),
            "removed keys stop working"
        );
        std::fs::write(&path, "keys: [").unwrap();
        assert!(s.reload().is_err());
        assert!(
            s.ring().lookup("sk-new").is_some(),
            "the last good keys stay"
        );
    }
}
