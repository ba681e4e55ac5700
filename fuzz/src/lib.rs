//! Helpers shared by the fuzz targets and the seed generator.
//!
//! Signed files carry an ed25519 signature that no fuzzer forges, so a target fed only
//! file text would never get past signature checking into the body decoder. Targets that
//! read signed files therefore take two kinds of input:
//!
//! - text (valid UTF-8): the file exactly as the daemon or publisher reads it;
//! - [`RAW`] followed by bytes: a body, which the target signs with a fixed key and
//!   armours before reading it the normal way, so the decoder behind the signature check
//!   is fuzzed too. `0xff` never occurs in UTF-8, so the two kinds cannot be confused.

use tally_protocol::keys::SecretKey;

/// First byte of a raw-body input.
pub const RAW: u8 = 0xff;

/// The key raw bodies are signed with (standing in for a server identity key).
pub fn server_key() -> SecretKey {
    SecretKey::from_seed(*b"tally fuzz server key, public!!!")
}

/// Splits a raw-body input from a text input.
pub enum Input<'a> {
    /// A file as text.
    Text(&'a str),
    /// A body to sign (the bytes after [`RAW`]).
    Raw(&'a [u8]),
    /// Neither (not UTF-8 and not starting with [`RAW`]).
    Other,
}

/// Classifies fuzzer input.
pub fn classify(data: &[u8]) -> Input<'_> {
    match data.split_first() {
        Some((&RAW, rest)) => Input::Raw(rest),
        _ => match std::str::from_utf8(data) {
            Ok(text) => Input::Text(text),
            Err(_) => Input::Other,
        },
    }
}

/// A raw-body input: [`RAW`] then `body`.
pub fn raw(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 1);
    out.push(RAW);
    out.extend_from_slice(body);
    out
}

/// Encodes with the configuration tally_protocol uses for everything (bincode standard).
pub fn encode<T: serde::Serialize>(value: &T) -> Vec<u8> {
    bincode::serde::encode_to_vec(value, bincode::config::standard()).expect("encode to Vec")
}

/// Decodes with the configuration tally_protocol uses (no limit: for trusted seed data).
pub fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Option<T> {
    bincode::serde::decode_from_slice(bytes, bincode::config::standard())
        .ok()
        .map(|(v, _)| v)
}
