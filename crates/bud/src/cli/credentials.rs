//! The session `bud login` keeps for later commands: one JSON file that only its owner can read
//! (0600, in a 0700 directory), replaced atomically so a crash never leaves half a token.

use std::fmt;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, anyhow};
use serde::{Deserialize, Serialize};

use super::env_var;

/// Overrides the directory the credentials live in (`<config dir>/bud` otherwise); tests point
/// it at a temporary directory.
pub const CONFIG_DIR_VAR: &str = "BUD_CONFIG_DIR";

const FILE_NAME: &str = "credentials.json";

/// A logged-in session with one budapp.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Credentials {
    /// budapp's base URL, without a trailing slash.
    pub url: String,
    pub access_token: String,
    /// Single-use: every refresh returns a new one, which must replace this one on disk at
    /// once, or the next command presents a spent token and the server ends the session.
    pub refresh_token: String,
    pub email: String,
}

// Tokens stay out of logs and panic messages.
impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("url", &self.url)
            .field("email", &self.email)
            .finish_non_exhaustive()
    }
}

/// Where the credentials are kept.
#[derive(Debug, Clone)]
pub struct CredentialsFile {
    path: PathBuf,
}

impl CredentialsFile {
    /// `$BUD_CONFIG_DIR/credentials.json`, else `<config dir>/bud/credentials.json`.
    pub fn locate(env: &[(String, String)]) -> anyhow::Result<Self> {
        let dir = match env_var(env, CONFIG_DIR_VAR) {
            Some(dir) => PathBuf::from(dir),
            None => dirs::config_dir()
                .ok_or_else(|| {
                    anyhow!("cannot find a configuration directory; set {CONFIG_DIR_VAR}")
                })?
                .join("bud"),
        };
        Ok(Self::in_dir(dir))
    }

    pub fn in_dir(dir: impl Into<PathBuf>) -> Self {
        Self { path: dir.into().join(FILE_NAME) }
    }

    /// The saved session, or `None` when nobody has logged in.
    pub fn load(&self) -> anyhow::Result<Option<Credentials>> {
        let text = match fs::read_to_string(&self.path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("reading {}", self.path.display())),
        };
        let credentials = serde_json::from_str(&text).with_context(|| {
            format!("{} is not a saved session; run `bud login` again", self.path.display())
        })?;
        Ok(Some(credentials))
    }

    /// Writes the session, creating the directory (0700) if needed; the file is 0600 from the
    /// moment it exists.
    pub fn save(&self, credentials: &Credentials) -> anyhow::Result<()> {
        let dir = self.path.parent().unwrap_or_else(|| Path::new("."));
        create_private_dir(dir)?;
        let json = serde_json::to_vec_pretty(credentials)?;
        let staging = self.path.with_extension("json.tmp");
        // A stale staging file from a crash may have other permissions; start afresh.
        match fs::remove_file(&staging) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(e).with_context(|| format!("removing {}", staging.display()));
            }
            _ => {}
        }
        let mut options = fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let mut file =
            options.open(&staging).with_context(|| format!("creating {}", staging.display()))?;
        file.write_all(&json)
            .and_then(|()| file.sync_all())
            .with_context(|| format!("writing {}", staging.display()))?;
        fs::rename(&staging, &self.path)
            .with_context(|| format!("replacing {}", self.path.display()))
    }

    /// Forgets the session; false when there was none.
    pub fn remove(&self) -> anyhow::Result<bool> {
        match fs::remove_file(&self.path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e).with_context(|| format!("removing {}", self.path.display())),
        }
    }
}

fn create_private_dir(dir: &Path) -> anyhow::Result<()> {
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir).with_context(|| format!("creating {}", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Credentials {
        Credentials {
            url: "http://127.0.0.1:9081".into(),
            access_token: "access-1".into(),
            refresh_token: "refresh-1".into(),
            email: "admin@bud.local".into(),
        }
    }

    fn env_with_dir(dir: &Path) -> Vec<(String, String)> {
        vec![
            ("HOME".into(), "/nonexistent".into()),
            (CONFIG_DIR_VAR.into(), dir.to_string_lossy().into_owned()),
        ]
    }

    #[test]
    fn credentials_round_trip_through_a_private_file() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("nested").join("bud");
        let file = CredentialsFile::locate(&env_with_dir(&dir)).unwrap();
        assert_eq!(file.path, dir.join("credentials.json"));
        assert_eq!(file.load().unwrap(), None);

        file.save(&sample()).unwrap();
        assert_eq!(file.load().unwrap(), Some(sample()));

        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode(&file.path), 0o600);
            assert_eq!(mode(&dir), 0o700);
        }

        let refreshed = Credentials { refresh_token: "refresh-2".into(), ..sample() };
        file.save(&refreshed).unwrap();
        assert_eq!(file.load().unwrap(), Some(refreshed));
        assert!(!dir.join("credentials.json.tmp").exists());

        assert!(file.remove().unwrap());
        assert_eq!(file.load().unwrap(), None);
        assert!(!file.remove().unwrap());
    }

    #[test]
    fn a_corrupt_file_says_to_log_in_again() {
        let tmp = tempfile::tempdir().unwrap();
        let file = CredentialsFile::in_dir(tmp.path());
        fs::write(&file.path, "{not json").unwrap();
        let message = format!("{:#}", file.load().unwrap_err());
        assert!(message.contains("run `bud login` again"), "{message}");
    }

    #[test]
    fn debug_output_hides_the_tokens() {
        let shown = format!("{:?}", sample());
        assert!(!shown.contains("access-1") && !shown.contains("refresh-1"), "{shown}");
        assert!(shown.contains("admin@bud.local"));
    }
}
