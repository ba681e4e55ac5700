//! The server identity: an ed25519 key pair in the data directory.
//!
//! The same key signs the TLS certificate, lease tokens and (later) usage reports, and is
//! the key the vendor binds a bundle to. The file is created 0600 and refused when anyone
//! but its owner can read it.

use anyhow::{bail, Context, Result};
use std::fs;
use std::os::unix::fs::PermissionsExt;
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
    let text = crate::files::read_regular_text(path, MAX_SMALL_FILE)
        .with_context(|| format!("{}", path.display()))?;
    SecretKey::from_armored(&text).with_context(|| format!("{}", path.display()))
}

/// Largest key or token file read.
const MAX_SMALL_FILE: u64 = 64 * 1024;

/// A new key from the OS random source.
pub fn generate() -> Result<SecretKey> {
    let mut seed = [0u8; 32];
    getrandom::getrandom(&mut seed).context("reading the OS random source")?;
    Ok(SecretKey::from_seed(seed))
}

/// Writes `contents` to a new file that only its owner can read, never replacing one.
pub fn write_secret(path: &Path, contents: &str) -> Result<()> {
    crate::files::create_atomic(path, contents.as_bytes(), 0o600)
        .with_context(|| format!("creating {}", path.display()))
}

/// File name of the admin token in the data directory.
pub const ADMIN_TOKEN_FILE: &str = "admin.token";

/// Loads the admin token from `data_dir`, creating a random one if there is none.
/// Returns the token and whether it was created now.
pub fn load_or_create_admin_token(data_dir: &Path) -> Result<(String, bool)> {
    let path = data_dir.join(ADMIN_TOKEN_FILE);
    if path.exists() {
        return Ok((load_admin_token(&path)?, false));
    }
    let mut bytes = [0u8; 32];
    getrandom::getrandom(&mut bytes).context("reading the OS random source")?;
    let token = tally_protocol::keys::hex(&bytes);
    write_secret(&path, &format!("{token}\n"))?;
    Ok((token, true))
}

/// Reads an admin token file, refusing it when group or others may read it.
pub fn load_admin_token(path: &Path) -> Result<String> {
    let mode = fs::metadata(path)
        .with_context(|| format!("{}", path.display()))?
        .permissions()
        .mode()
        & 0o777;
    if mode & 0o077 != 0 {
        bail!(
            "{}: token file is readable by group or others (mode {mode:o}); run `chmod 600 {}`",
            path.display(),
            path.display()
        );
    }
    let token = crate::files::read_regular_text(path, MAX_SMALL_FILE)
        .with_context(|| format!("{}", path.display()))?;
    let token = token.trim().to_string();
    if token.len() < 32 {
        bail!(
            "{}: admin token is shorter than 32 characters",
            path.display()
        );
    }
    Ok(token)
}

/// Creates a directory that only its owner can enter, or checks an existing one.
pub fn create_private_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    if !dir.exists() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("creating {}", dir.display()))?;
    }
    Ok(())
}
