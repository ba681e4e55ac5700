//! The server identity: an ed25519 key pair in the data directory.
//!
//! The same key signs the TLS certificate, lease tokens and (later) usage reports, and is
//! the key the vendor binds a bundle to. The file is created 0600 and refused when anyone
//! but its owner can read it.

use anyhow::{bail, Context, Result};
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use tally_protocol::keys::SecretKey;

/// File name of the identity key in the data directory.
pub const IDENTITY_FILE: &str = "server.key";

/// Loads the identity key from `data_dir`, creating it if there is none.
/// Returns the key and whether it was created now.
pub fn load_or_create(data_dir: &Path) -> Result<(SecretKey, bool)> {
    let path = data_dir.join(IDENTITY_FILE);
    if path.exists() {
        return Ok((load(&path)?, false));
    }
    let key = generate()?;
    write_secret(&path, &key.to_armored())?;
    Ok((key, true))
}

/// Reads a secret key file, refusing it when group or others may read it.
pub fn load(path: &Path) -> Result<SecretKey> {
    let meta = fs::metadata(path).with_context(|| format!("{}", path.display()))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        bail!(
            "{}: key file is readable by group or others (mode {mode:o}); run `chmod 600 {}`",
            path.display(),
            path.display()
        );
    }
    let text = fs::read_to_string(path).with_context(|| format!("{}", path.display()))?;
    SecretKey::from_armored(&text).with_context(|| format!("{}", path.display()))
}

/// A new key from the OS random source.
pub fn generate() -> Result<SecretKey> {
    let mut seed = [0u8; 32];
    getrandom::getrandom(&mut seed).context("reading the OS random source")?;
    Ok(SecretKey::from_seed(seed))
}

/// Writes `contents` to a new file that only its owner can read, never replacing one.
pub fn write_secret(path: &Path, contents: &str) -> Result<()> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    file.write_all(contents.as_bytes())
        .and_then(|_| file.sync_all())
        .with_context(|| format!("writing {}", path.display()))
}
