//! The server identity: an ed25519 key pair in the data directory.
//!
//! The same key signs the TLS certificate, lease tokens and (later) usage reports, and is
//! the key the vendor binds a bundle to. The file is created 0600 and refused when anyone
//! but its owner can read it.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use tally_protocol::keys::{KeyError, SecretKey};

/// Why a key or token file, or the private directory, could not be used. The texts
/// name the file and hold their cause (no error chain: printers say it once).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityError {
    /// The file could not be inspected or read.
    #[error("{path}: {cause}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        cause: std::io::Error,
    },
    /// The file or directory could not be created.
    #[error("creating {path}: {cause}")]
    Create {
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        cause: std::io::Error,
    },
    /// Group or others may read the file: a secret that is no longer one.
    #[error(
        "{path}: {what} file is readable by group or others (mode {mode:o}); run `chmod 600 {path}`"
    )]
    Exposed {
        /// The file.
        path: PathBuf,
        /// "key" or "token".
        what: &'static str,
        /// Its permission bits.
        mode: u32,
    },
    /// The key file does not hold a key.
    #[error("{path}: {cause}")]
    Key {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        cause: KeyError,
    },
    /// The admin token is too short to be a secret.
    #[error("{path}: admin token is shorter than 32 characters")]
    ShortToken {
        /// The file.
        path: PathBuf,
    },
    /// The OS random source failed.
    #[error("reading the OS random source: {0}")]
    Random(getrandom::Error),
}

fn read_error(path: &Path) -> impl FnOnce(std::io::Error) -> IdentityError + '_ {
    move |cause| IdentityError::Read {
        path: path.to_path_buf(),
        cause,
    }
}

/// File name of the identity key in the data directory.
pub const IDENTITY_FILE: &str = "server.key";

/// Loads the identity key from `data_dir`, creating it if there is none.
/// Returns the key and whether it was created now.
pub fn load_or_create(data_dir: &Path) -> Result<(SecretKey, bool), IdentityError> {
    let path = data_dir.join(IDENTITY_FILE);
    if path.exists() {
        return Ok((load(&path)?, false));
    }
    let key = generate()?;
    write_secret(&path, &key.to_armored())?;
    Ok((key, true))
}

/// Reads a secret key file, refusing it when group or others may read it.
pub fn load(path: &Path) -> Result<SecretKey, IdentityError> {
    let meta = fs::metadata(path).map_err(read_error(path))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(IdentityError::Exposed {
            path: path.to_path_buf(),
            what: "key",
            mode,
        });
    }
    let text = crate::files::read_regular_text(path, MAX_SMALL_FILE).map_err(read_error(path))?;
    SecretKey::from_armored(&text).map_err(|cause| IdentityError::Key {
        path: path.to_path_buf(),
        cause,
    })
}

/// Largest key or token file read.
const MAX_SMALL_FILE: u64 = 64 * 1024;

/// A new key from the OS random source.
pub fn generate() -> Result<SecretKey, IdentityError> {
    let mut seed = [0u8; 32];
    getrandom::getrandom(&mut seed).map_err(IdentityError::Random)?;
    Ok(SecretKey::from_seed(seed))
}

/// Writes `contents` to a new file that only its owner can read, never replacing one.
pub fn write_secret(path: &Path, contents: &str) -> Result<(), IdentityError> {
    crate::files::create_atomic(path, contents.as_bytes(), 0o600).map_err(|cause| {
        IdentityError::Create {
            path: path.to_path_buf(),
            cause,
        }
    })
}

/// File name of the admin token in the data directory.
pub const ADMIN_TOKEN_FILE: &str = "admin.token";

/// Loads the admin token from `data_dir`, creating a random one if there is none.
/// Returns the token and whether it was created now.
pub fn load_or_create_admin_token(data_dir: &Path) -> Result<(String, bool), IdentityError> {
    let path = data_dir.join(ADMIN_TOKEN_FILE);
    if path.exists() {
        return Ok((load_admin_token(&path)?, false));
    }
    let mut bytes = [0u8; 32];
    getrandom::getrandom(&mut bytes).map_err(IdentityError::Random)?;
    let token = tally_protocol::keys::hex(&bytes);
    write_secret(&path, &format!("{token}\n"))?;
    Ok((token, true))
}

/// Reads an admin token file, refusing it when group or others may read it.
pub fn load_admin_token(path: &Path) -> Result<String, IdentityError> {
    let mode = fs::metadata(path)
        .map_err(read_error(path))?
        .permissions()
        .mode()
        & 0o777;
    if mode & 0o077 != 0 {
        return Err(IdentityError::Exposed {
            path: path.to_path_buf(),
            what: "token",
            mode,
        });
    }
    let token = crate::files::read_regular_text(path, MAX_SMALL_FILE).map_err(read_error(path))?;
    let token = token.trim().to_string();
    if token.len() < 32 {
        return Err(IdentityError::ShortToken {
            path: path.to_path_buf(),
        });
    }
    Ok(token)
}

/// Creates a directory that only its owner can enter, or checks an existing one.
pub fn create_private_dir(dir: &Path) -> Result<(), IdentityError> {
    use std::os::unix::fs::DirBuilderExt;
    if !dir.exists() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|cause| IdentityError::Create {
                path: dir.to_path_buf(),
                cause,
            })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_files_others_can_read_or_too_short_are_refused_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join(IDENTITY_FILE);
        write_secret(&key, &generate().unwrap().to_armored()).unwrap();
        assert!(load(&key).is_ok());
        fs::set_permissions(&key, fs::Permissions::from_mode(0o644)).unwrap();
        let p = key.display();
        assert_eq!(
            load(&key).unwrap_err().to_string(),
            format!("{p}: key file is readable by group or others (mode 644); run `chmod 600 {p}`")
        );
        let token = dir.path().join(ADMIN_TOKEN_FILE);
        write_secret(&token, "short\n").unwrap();
        assert_eq!(
            load_admin_token(&token).unwrap_err().to_string(),
            format!(
                "{}: admin token is shorter than 32 characters",
                token.display()
            )
        );
        let e = write_secret(&token, "again").unwrap_err().to_string();
        assert!(
            e.starts_with(&format!("creating {}: ", token.display())),
            "{e}"
        );
    }
}
