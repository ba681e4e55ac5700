//! Frames on a peer RPC stream: `[u32 length][u16 version][bincode payload]`, big-endian,
//! `length` counting the version and the payload.
//!
//! The length is checked against the bound before anything is allocated, and bincode
//! decodes with the same bound, so a peer claiming a huge frame costs nothing.

use serde::de::DeserializeOwned;
use serde::Serialize;

/// The frame format this build writes and reads. A newer peer that changes the layout of
/// the payload bumps it (and the ALPN if it cannot speak version 1 any more).
pub const FRAME_VERSION: u16 = 1;

/// The largest frame either side writes or reads: openraft sends snapshots in chunks
/// (`Config::snapshot_max_chunk_size`, 3 MiB by default) and append-entries in batches
/// (`max_payload_entries`, 300 by default) of small ledger commands, both well inside it.
pub const MAX_FRAME: usize = 16 * 1024 * 1024;

/// Why a frame could not be written or read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// The frame would exceed (or a peer claimed one exceeding) the bound.
    #[error("peer frame of {len} bytes exceeds the {limit}-byte bound")]
    TooLarge {
        /// The length written or claimed.
        len: usize,
        /// The bound.
        limit: usize,
    },
    /// The frame is too short to hold a version.
    #[error("peer frame of {0} bytes is too short to hold a format version")]
    TooShort(usize),
    /// The frame's format version is not one this build reads.
    #[error("peer frame format version {0} is not understood (this build reads {FRAME_VERSION})")]
    Version(u16),
    /// bincode could not encode the message (a bug).
    #[error("encoding a peer message: {0}")]
    Encode(bincode::error::EncodeError),
    /// The payload is not a message this build understands.
    #[error("undecodable peer message: {0}")]
    Decode(bincode::error::DecodeError),
    /// The stream could not be written.
    #[error("writing to the peer: {0}")]
    Write(#[from] quinn::WriteError),
    /// The stream was already finished or reset.
    #[error("peer stream closed: {0}")]
    Closed(#[from] quinn::ClosedStream),
    /// The stream could not be read to the end of the frame.
    #[error("reading from the peer: {0}")]
    Read(#[from] quinn::ReadExactError),
}

impl FrameError {
    /// Whether the connection itself failed (so the dialler should re-dial), as opposed to
    /// this one stream or message.
    pub fn is_connection_lost(&self) -> bool {
        matches!(
            self,
            FrameError::Write(quinn::WriteError::ConnectionLost(_))
                | FrameError::Read(quinn::ReadExactError::ReadError(
                    quinn::ReadError::ConnectionLost(_)
                ))
        )
    }
}

fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<MAX_FRAME>()
}

/// Encodes `value` into a whole frame, refusing one above the bound.
pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, FrameError> {
    let mut out = vec![0u8; 6];
    bincode::serde::encode_into_std_write(value, &mut out, bincode::config::standard())
        .map_err(FrameError::Encode)?;
    let len = out.len() - 4;
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge {
            len,
            limit: MAX_FRAME,
        });
    }
    out[..4].copy_from_slice(&(len as u32).to_be_bytes());
    out[4..6].copy_from_slice(&FRAME_VERSION.to_be_bytes());
    Ok(out)
}

/// Decodes the body of a frame (what follows the length) into a message.
pub fn decode<T: DeserializeOwned>(body: &[u8]) -> Result<T, FrameError> {
    let [hi, lo, payload @ ..] = body else {
        return Err(FrameError::TooShort(body.len()));
    };
    let version = u16::from_be_bytes([*hi, *lo]);
    if version != FRAME_VERSION {
        return Err(FrameError::Version(version));
    }
    let (value, used) =
        bincode::serde::decode_from_slice(payload, config()).map_err(FrameError::Decode)?;
    if used != payload.len() {
        return Err(FrameError::Decode(
            bincode::error::DecodeError::OtherString(format!(
                "{} bytes left over after the message",
                payload.len() - used
            )),
        ));
    }
    Ok(value)
}

/// Writes one frame holding `value`.
pub async fn write<T: Serialize>(
    send: &mut quinn::SendStream,
    value: &T,
) -> Result<(), FrameError> {
    let bytes = encode(value)?;
    send.write_all(&bytes).await?;
    Ok(())
}

/// Reads one frame and decodes it; the claimed length is judged before the body is read.
pub async fn read<T: DeserializeOwned>(recv: &mut quinn::RecvStream) -> Result<T, FrameError> {
    let mut len = [0u8; 4];
    recv.read_exact(&mut len).await?;
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge {
            len,
            limit: MAX_FRAME,
        });
    }
    if len < 2 {
        return Err(FrameError::TooShort(len));
    }
    let mut body = vec![0u8; len];
    recv.read_exact(&mut body).await?;
    decode(&body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_survives_a_frame() {
        let bytes = encode(&("vote", 7u64)).unwrap();
        let len = u32::from_be_bytes(bytes[..4].try_into().unwrap()) as usize;
        assert_eq!(len, bytes.len() - 4);
        let back: (String, u64) = decode(&bytes[4..]).unwrap();
        assert_eq!(back, ("vote".to_string(), 7));
    }

    #[test]
    fn another_version_and_trailing_bytes_are_refused() {
        let mut bytes = encode(&7u64).unwrap();
        bytes[5] = 9;
        assert!(matches!(
            decode::<u64>(&bytes[4..]),
            Err(FrameError::Version(9))
        ));
        let mut bytes = encode(&7u64).unwrap();
        bytes.push(0);
        assert!(matches!(
            decode::<u64>(&bytes[4..]),
            Err(FrameError::Decode(_))
        ));
        assert!(matches!(decode::<u64>(&[0]), Err(FrameError::TooShort(1))));
    }

    #[test]
    fn a_frame_above_the_bound_is_not_written() {
        let big = vec![0u8; MAX_FRAME];
        assert!(matches!(encode(&big), Err(FrameError::TooLarge { .. })));
    }
}
