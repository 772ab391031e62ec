//! The secret-store port. Values are [`Secret`]s, whose `Debug` and `Display`
//! never show the value, so a secret cannot reach a log by formatting.
//!
//! The embedded adapter keeps secrets in one JSON file, mode 0600, written
//! atomically. The Vault adapter ([`VaultSecretStore`]) keeps them in KV v2
//! and logs in with AppRole.

use std::collections::BTreeMap;
use std::fmt;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use async_trait::async_trait;

pub mod contract;
pub mod vault;

pub use vault::{
    CertificateIssuer, IssuedCertificate, KeyVersion, Transit, VaultConfig, VaultError,
    VaultSecretStore,
};

/// A secret value. Read it with [`Secret::expose`], deliberately.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    /// The store cannot be read or written (I/O, a broken file).
    #[error("secret store {path}: {reason}")]
    Io { path: PathBuf, reason: String },
    /// The store refused us: a sealed Vault, a token without the policy, a
    /// file with the wrong owner or mode. Not the same as a missing secret.
    #[error("secret store refused access: {0}")]
    Denied(String),
    #[error(
        "secret path `{0}` is invalid: use segments of letters, digits, `-` and `_` joined by `/`"
    )]
    InvalidPath(String),
    /// A check-and-set write found another version.
    #[error("secret `{path}` is at version {found:?}, not the {expected:?} this write expected")]
    Conflict {
        path: String,
        expected: Cas,
        found: Option<u64>,
    },
}

/// The precondition of a write: Vault KV v2's `cas` option.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cas {
    /// Write whatever is there.
    Any,
    /// Only if the secret does not exist (Vault's `cas=0`).
    Absent,
    /// Only if the secret is at exactly this version.
    Version(u64),
}

/// A secret with its version; versions of a path only ever go up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Versioned {
    pub value: Secret,
    pub version: u64,
}

#[async_trait]
pub trait SecretStore: Send + Sync + 'static {
    /// `None` when the secret does not exist; [`SecretError::Denied`] when
    /// the store will not say.
    async fn get(&self, path: &str) -> Result<Option<Versioned>, SecretError>;
    /// Writes and returns the new version.
    async fn put(&self, path: &str, value: Secret, cas: Cas) -> Result<u64, SecretError>;
}

/// The secret at `path`, created with `make()` if absent. Safe when several
/// processes race: exactly one creation wins (`Cas::Absent`), and the others
/// read the winner's value.
pub async fn get_or_create(
    store: &dyn SecretStore,
    path: &str,
    make: impl FnOnce() -> Secret,
) -> Result<Secret, SecretError> {
    if let Some(found) = store.get(path).await? {
        return Ok(found.value);
    }
    match store.put(path, make(), Cas::Absent).await {
        Ok(_) => {}
        Err(SecretError::Conflict { .. }) => {}
        Err(e) => return Err(e),
    }
    store
        .get(path)
        .await?
        .map(|v| v.value)
        .ok_or_else(|| SecretError::Io {
            path: PathBuf::from(path),
            reason: "the secret vanished right after it was written".into(),
        })
}

/// Secrets in `<data-dir>/secrets.json`, mode 0600. Every read-modify-write
/// holds an exclusive `flock` on `<data-dir>/secrets.lock`, so the services
/// of one host, each its own process, never lose each other's writes.
pub struct FileSecretStore {
    path: PathBuf,
    lock_path: PathBuf,
}

/// One stored entry. Files written before versions existed hold bare
/// strings, read as version 1.
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(untagged)]
enum Entry {
    Versioned { value: String, version: u64 },
    Legacy(String),
}

impl Entry {
    fn into_versioned(self) -> Versioned {
        match self {
            Entry::Versioned { value, version } => Versioned {
                value: Secret(value),
                version,
            },
            Entry::Legacy(value) => Versioned {
                value: Secret(value),
                version: 1,
            },
        }
    }
}

impl FileSecretStore {
    pub fn new(data_dir: &Path) -> Self {
        FileSecretStore {
            path: data_dir.join("secrets.json"),
            lock_path: data_dir.join("secrets.lock"),
        }
    }

    fn io_err(path: &Path, reason: impl fmt::Display) -> SecretError {
        SecretError::Io {
            path: path.to_path_buf(),
            reason: reason.to_string(),
        }
    }

    /// Runs `f` on the decoded file under the lock, on a blocking thread.
    async fn locked<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Path, &mut BTreeMap<String, Entry>) -> Result<(T, bool), SecretError>
        + Send
        + 'static,
    ) -> Result<T, SecretError> {
        let (path, lock_path) = (self.path.clone(), self.lock_path.clone());
        tokio::task::spawn_blocking(move || {
            let lock = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .mode(0o600)
                .open(&lock_path)
                .map_err(|e| Self::io_err(&lock_path, e))?;
            let _held = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
                .map_err(|(_, e)| Self::io_err(&lock_path, e))?;
            let mut all = read_all(&path)?;
            let (out, changed) = f(&path, &mut all)?;
            if changed {
                let bytes = serde_json::to_vec_pretty(&all).map_err(|e| Self::io_err(&path, e))?;
                write_private_file(&path, &bytes).map_err(|e| Self::io_err(&path, e))?;
            }
            Ok(out)
        })
        .await
        .map_err(|e| Self::io_err(&self.path, e))?
    }
}

fn read_all(path: &Path) -> Result<BTreeMap<String, Entry>, SecretError> {
    match std::fs::read(path) {
        Ok(bytes) => {
            let mode = std::fs::metadata(path)
                .map_err(|e| FileSecretStore::io_err(path, e))?
                .permissions()
                .mode();
            if mode & 0o077 != 0 {
                return Err(SecretError::Denied(format!(
                    "{} has mode {:o}; it must be 0600 (run chmod 600)",
                    path.display(),
                    mode & 0o777
                )));
            }
            serde_json::from_slice(&bytes)
                .map_err(|e| FileSecretStore::io_err(path, format!("not valid JSON: {e}")))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(BTreeMap::new()),
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            Err(SecretError::Denied(format!("{}: {e}", path.display())))
        }
        Err(e) => Err(FileSecretStore::io_err(path, e)),
    }
}

pub(crate) fn check_path(path: &str) -> Result<(), SecretError> {
    let ok = !path.is_empty()
        && path.split('/').all(|seg| {
            !seg.is_empty()
                && seg
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        });
    if ok {
        Ok(())
    } else {
        Err(SecretError::InvalidPath(path.to_string()))
    }
}

#[async_trait]
impl SecretStore for FileSecretStore {
    async fn get(&self, path: &str) -> Result<Option<Versioned>, SecretError> {
        check_path(path)?;
        let key = path.to_string();
        self.locked(move |_, all| Ok((all.remove(&key).map(Entry::into_versioned), false)))
            .await
    }

    async fn put(&self, path: &str, value: Secret, cas: Cas) -> Result<u64, SecretError> {
        check_path(path)?;
        let key = path.to_string();
        self.locked(move |_, all| {
            let found = all.get(&key).map(|e| match e {
                Entry::Versioned { version, .. } => *version,
                Entry::Legacy(_) => 1,
            });
            let ok = match cas {
                Cas::Any => true,
                Cas::Absent => found.is_none(),
                Cas::Version(v) => found == Some(v),
            };
            if !ok {
                return Err(SecretError::Conflict {
                    path: key,
                    expected: cas,
                    found,
                });
            }
            let version = found.unwrap_or(0) + 1;
            all.insert(
                key,
                Entry::Versioned {
                    value: value.0,
                    version,
                },
            );
            Ok((version, true))
        })
        .await
    }
}

/// Creates `dir` if needed and makes it 0700, on every start and not only
/// when new: the data dir holds keys, state and apps' env values.
pub fn ensure_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

/// Writes `contents` to `path` atomically, readable by the owner only (0600).
/// The temporary file's name is unique per process and call, so writers in
/// several processes never share one.
pub fn write_private_file(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let mut name = path.as_os_str().to_owned();
    name.push(format!(
        ".tmp.{}.{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let tmp = PathBuf::from(name);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    file.write_all(contents)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// The trimmed contents of `path`, or `make()` written there (0600) first.
/// A file that others may read is refused: it has leaked already, or will.
pub fn read_or_create_private_file(
    path: &Path,
    make: impl FnOnce() -> String,
) -> std::io::Result<String> {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let mode = std::fs::metadata(path)?.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::PermissionDenied,
                    format!(
                        "{} has mode {mode:o}, so others may read it; it must be 0600 (run chmod 600 {}; if others did read it, replace the key)",
                        path.display(),
                        path.display()
                    ),
                ));
            }
            Ok(text.trim().to_string())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let value = make();
            write_private_file(path, format!("{value}\n").as_bytes())?;
            Ok(value)
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_file_store_passes_the_contract() {
        let dir = tempfile::tempdir().unwrap();
        let reopen = {
            let dir = dir.path().to_path_buf();
            move || Box::new(FileSecretStore::new(&dir)) as Box<dyn SecretStore>
        };
        contract::run(&FileSecretStore::new(dir.path()), reopen, "contract").await;
        let mode = std::fs::metadata(dir.path().join("secrets.json"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[tokio::test]
    async fn a_readable_file_is_denied_not_missing() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileSecretStore::new(dir.path());
        store.put("a", Secret::new("x"), Cas::Any).await.unwrap();
        std::fs::set_permissions(
            dir.path().join("secrets.json"),
            std::fs::Permissions::from_mode(0o644),
        )
        .unwrap();
        let error = store.get("a").await.unwrap_err();
        assert!(matches!(error, SecretError::Denied(_)), "{error}");
        assert!(error.to_string().contains("0600"));
    }

    #[tokio::test]
    async fn files_from_before_versions_read_as_version_one() {
        let dir = tempfile::tempdir().unwrap();
        write_private_file(
            &dir.path().join("secrets.json"),
            br#"{"auth/signing-key": "old"}"#,
        )
        .unwrap();
        let store = FileSecretStore::new(dir.path());
        let found = store.get("auth/signing-key").await.unwrap().unwrap();
        assert_eq!((found.value.expose(), found.version), ("old", 1));
        assert_eq!(
            store
                .put("auth/signing-key", Secret::new("new"), Cas::Version(1))
                .await
                .unwrap(),
            2
        );
    }

    #[test]
    fn a_key_file_others_can_read_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("admin.key");
        let key = read_or_create_private_file(&path, || "k1".into()).unwrap();
        assert_eq!(
            read_or_create_private_file(&path, || "k2".into()).unwrap(),
            key
        );
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let error = read_or_create_private_file(&path, || "k3".into()).unwrap_err();
        assert!(error.to_string().contains("chmod 600"), "{error}");
    }

    #[test]
    fn private_dirs_are_0700_on_every_start() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        std::fs::create_dir(&data).unwrap();
        std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).unwrap();
        ensure_private_dir(&data).unwrap();
        let mode = std::fs::metadata(&data).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
    }

    #[test]
    fn debug_and_display_redact() {
        let s = Secret::new("hunter2");
        assert!(!format!("{s:?} {s}").contains("hunter2"));
    }
}
