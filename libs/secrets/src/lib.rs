//! The secret-store port. Values are [`Secret`]s, whose `Debug` and `Display`
//! never show the value, so a secret cannot reach a log by formatting.
//!
//! The embedded adapter keeps secrets in one JSON file, mode 0600, written
//! atomically. The Vault adapter (KV v2, AppRole login) comes with cluster mode.

use std::collections::BTreeMap;
use std::fmt;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use tokio::sync::Mutex;

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
    #[error("secret store {path}: {reason}")]
    Io { path: PathBuf, reason: String },
    #[error(
        "secret path `{0}` is invalid: use segments of letters, digits, `-` and `_` joined by `/`"
    )]
    InvalidPath(String),
}

#[async_trait]
pub trait SecretStore: Send + Sync + 'static {
    async fn get(&self, path: &str) -> Result<Option<Secret>, SecretError>;
    async fn put(&self, path: &str, value: Secret) -> Result<(), SecretError>;
}

/// Secrets in `<data-dir>/secrets.json`, mode 0600.
pub struct FileSecretStore {
    path: PathBuf,
    lock: Mutex<()>,
}

impl FileSecretStore {
    pub fn new(data_dir: &Path) -> Self {
        FileSecretStore {
            path: data_dir.join("secrets.json"),
            lock: Mutex::new(()),
        }
    }

    fn io_err(&self, reason: impl fmt::Display) -> SecretError {
        SecretError::Io {
            path: self.path.clone(),
            reason: reason.to_string(),
        }
    }

    async fn read_all(&self) -> Result<BTreeMap<String, String>, SecretError> {
        match tokio::fs::read(&self.path).await {
            Ok(bytes) => {
                let mode = tokio::fs::metadata(&self.path)
                    .await
                    .map_err(|e| self.io_err(e))?
                    .permissions()
                    .mode();
                if mode & 0o077 != 0 {
                    return Err(self.io_err(format!(
                        "mode is {:o}; it must be 0600 (run chmod 600)",
                        mode & 0o777
                    )));
                }
                serde_json::from_slice(&bytes)
                    .map_err(|e| self.io_err(format!("not valid JSON: {e}")))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(BTreeMap::new()),
            Err(e) => Err(self.io_err(e)),
        }
    }
}

fn check_path(path: &str) -> Result<(), SecretError> {
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
    async fn get(&self, path: &str) -> Result<Option<Secret>, SecretError> {
        check_path(path)?;
        let _guard = self.lock.lock().await;
        Ok(self.read_all().await?.remove(path).map(Secret))
    }

    async fn put(&self, path: &str, value: Secret) -> Result<(), SecretError> {
        check_path(path)?;
        let _guard = self.lock.lock().await;
        let mut all = self.read_all().await?;
        all.insert(path.to_string(), value.0);
        let bytes = serde_json::to_vec_pretty(&all).map_err(|e| self.io_err(e))?;
        let target = self.path.clone();
        tokio::task::spawn_blocking(move || write_private_file(&target, &bytes))
            .await
            .map_err(|e| self.io_err(e))?
            .map_err(|e| self.io_err(e))
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
    async fn round_trips_with_mode_0600() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileSecretStore::new(dir.path());
        assert_eq!(store.get("auth/signing-key").await.unwrap(), None);
        store
            .put("auth/signing-key", Secret::new("s3cret"))
            .await
            .unwrap();
        assert_eq!(
            store
                .get("auth/signing-key")
                .await
                .unwrap()
                .unwrap()
                .expose(),
            "s3cret"
        );
        let mode = std::fs::metadata(dir.path().join("secrets.json"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        // A second store over the same dir sees the value.
        assert!(
            FileSecretStore::new(dir.path())
                .get("auth/signing-key")
                .await
                .unwrap()
                .is_some()
        );
    }

    #[tokio::test]
    async fn refuses_a_readable_file_and_bad_paths() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileSecretStore::new(dir.path());
        store.put("a", Secret::new("x")).await.unwrap();
        std::fs::set_permissions(
            dir.path().join("secrets.json"),
            std::fs::Permissions::from_mode(0o644),
        )
        .unwrap();
        assert!(
            store
                .get("a")
                .await
                .unwrap_err()
                .to_string()
                .contains("0600")
        );
        assert!(matches!(
            store.get("../etc").await,
            Err(SecretError::InvalidPath(_))
        ));
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
