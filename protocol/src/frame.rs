//! Frames: `[u32 length][u16 protocol version][payload]`, big-endian.
//!
//! `length` counts the bytes after itself (version + payload). Readers parse the 6-byte
//! header first and refuse a length above their limit *before* allocating or reading
//! the payload, so a peer cannot make the daemon allocate more than the limit.
//!
//! Version 0 is reserved for version negotiation: whatever version a client speaks, the
//! daemon answers a frame of a version it does not support with a version-0 frame naming
//! the versions it does. Every client, old or new, can read that answer.

use crate::wire::{Request, Response, PROTOCOL_VERSION};
use serde::{Deserialize, Serialize};

/// Size of the frame header: 4 bytes length, 2 bytes version.
pub const HEADER_LEN: usize = 6;
/// Largest request frame the daemon reads.
pub const MAX_REQUEST_LEN: usize = 64 * 1024;
/// Largest response frame a client reads (status of a big site).
pub const MAX_RESPONSE_LEN: usize = 16 * 1024 * 1024;
/// The frame version reserved for version negotiation.
pub const NEGOTIATION_VERSION: u16 = 0;
/// The QUIC stop code a client uses when it abandons a checkout whose answer it will
/// not read: a grant the server then learns was not received is taken back. Any other
/// stop (code 0 is what a dropped stream sends, also after the answer was read) does
/// not mean the answer was lost.
pub const STOP_ABANDONED: u32 = 0x7461;
/// Lowest protocol version this build serves.
pub const MIN_SUPPORTED_VERSION: u16 = 1;

/// Why a frame was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// Fewer bytes than the frame needs.
    #[error("truncated frame: needed {needed} bytes, got {got}")]
    Truncated {
        /// Bytes needed.
        needed: usize,
        /// Bytes present.
        got: usize,
    },
    /// The length prefix is above the limit.
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// Declared length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The length prefix is too small to hold a version.
    #[error("frame length {0} is too small to hold a version")]
    TooSmall(usize),
    /// The frame's protocol version is not served here.
    #[error("protocol version {got} is not supported (this side speaks {min} to {max})")]
    UnsupportedVersion {
        /// The version in the frame.
        got: u16,
        /// Lowest supported.
        min: u16,
        /// Highest supported.
        max: u16,
    },
    /// The peer answered with version negotiation: it does not speak our version.
    #[error("the server does not speak protocol version {ours}: {message}")]
    PeerRejectedVersion {
        /// The version we sent.
        ours: u16,
        /// The peer's explanation, naming the versions it speaks.
        message: String,
    },
    /// The payload does not decode as a message.
    #[error("malformed message: {0}")]
    Malformed(String),
}

/// A parsed frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// Payload bytes that follow the header.
    pub payload_len: usize,
    /// Protocol version of the payload.
    pub version: u16,
}

/// Parses a header, refusing lengths above `max` (counted over version + payload).
pub fn parse_header(header: &[u8; HEADER_LEN], max: usize) -> Result<FrameHeader, FrameError> {
    let len = u32::from_be_bytes([header[0], header[1], header[2], header[3]]) as usize;
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    if len < 2 {
        return Err(FrameError::TooSmall(len));
    }
    Ok(FrameHeader {
        payload_len: len - 2,
        version: u16::from_be_bytes([header[4], header[5]]),
    })
}

/// Builds a frame around an encoded payload.
pub fn encode_frame(version: u16, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(&((payload.len() + 2) as u32).to_be_bytes());
    out.extend_from_slice(&version.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// Encodes a request frame in the current protocol version.
pub fn encode_request(request: &Request) -> Vec<u8> {
    encode_frame(PROTOCOL_VERSION, &crate::encode(request))
}

/// Encodes a response frame in the current protocol version.
pub fn encode_response(response: &Response) -> Vec<u8> {
    encode_frame(PROTOCOL_VERSION, &crate::encode(response))
}

/// Encodes the answer to a request of protocol `version` (a supported one) in that
/// version, as [`Response::for_version`] makes it decodable there: a daemon answers
/// each client in the version it spoke.
pub fn encode_response_for(version: u16, response: Response) -> Vec<u8> {
    let version = version.clamp(MIN_SUPPORTED_VERSION, PROTOCOL_VERSION);
    encode_frame(version, &crate::encode(&response.for_version(version)))
}

/// The body of a version-0 frame. Its layout never changes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct VersionNegotiation {
    min: u16,
    max: u16,
    message: String,
}

/// The answer to a frame of unsupported version `got`.
pub fn encode_version_negotiation(got: u16) -> Vec<u8> {
    let body = VersionNegotiation {
        min: MIN_SUPPORTED_VERSION,
        max: PROTOCOL_VERSION,
        message: format!(
            "protocol version {got} is not supported; this tallyd speaks versions \
             {MIN_SUPPORTED_VERSION} to {PROTOCOL_VERSION}"
        ),
    };
    encode_frame(NEGOTIATION_VERSION, &crate::encode(&body))
}

/// Checks that the daemon serves `version`.
pub fn check_request_version(version: u16) -> Result<(), FrameError> {
    if (MIN_SUPPORTED_VERSION..=PROTOCOL_VERSION).contains(&version) {
        Ok(())
    } else {
        Err(FrameError::UnsupportedVersion {
            got: version,
            min: MIN_SUPPORTED_VERSION,
            max: PROTOCOL_VERSION,
        })
    }
}

/// Decodes a request payload of a supported version.
pub fn decode_request(version: u16, payload: &[u8]) -> Result<Request, FrameError> {
    check_request_version(version)?;
    crate::decode::<Request, MAX_REQUEST_LEN>(payload).map_err(|e| FrameError::Malformed(e.0))
}

/// Decodes a response payload, turning a negotiation frame into its error.
pub fn decode_response(version: u16, payload: &[u8]) -> Result<Response, FrameError> {
    if version == NEGOTIATION_VERSION {
        let n: VersionNegotiation = crate::decode::<_, 4096>(payload)
            .map_err(|e| FrameError::Malformed(format!("version negotiation: {}", e.0)))?;
        return Err(FrameError::PeerRejectedVersion {
            ours: PROTOCOL_VERSION,
            message: n.message,
        });
    }
    // A version-1 answer (a daemon's reply to what it could not attribute to a
    // version) decodes as version 2: version 2 only added variants at the ends.
    if !(MIN_SUPPORTED_VERSION..=PROTOCOL_VERSION).contains(&version) {
        return Err(FrameError::UnsupportedVersion {
            got: version,
            min: MIN_SUPPORTED_VERSION,
            max: PROTOCOL_VERSION,
        });
    }
    crate::decode::<Response, MAX_RESPONSE_LEN>(payload).map_err(|e| FrameError::Malformed(e.0))
}

/// Splits a complete frame held in memory into header and payload.
pub fn split_frame(buf: &[u8], max: usize) -> Result<(FrameHeader, &[u8]), FrameError> {
    let header: &[u8; HEADER_LEN] = buf
        .get(..HEADER_LEN)
        .and_then(|h| h.try_into().ok())
        .ok_or(FrameError::Truncated {
            needed: HEADER_LEN,
            got: buf.len(),
        })?;
    let header = parse_header(header, max)?;
    let payload = &buf[HEADER_LEN..];
    if payload.len() < header.payload_len {
        return Err(FrameError::Truncated {
            needed: HEADER_LEN + header.payload_len,
            got: buf.len(),
        });
    }
    if payload.len() > header.payload_len {
        return Err(FrameError::Malformed(format!(
            "{} bytes after the frame",
            payload.len() - header.payload_len
        )));
    }
    Ok((header, payload))
}

/// Decodes a whole request frame held in memory.
pub fn decode_request_frame(buf: &[u8]) -> Result<Request, FrameError> {
    let (header, payload) = split_frame(buf, MAX_REQUEST_LEN)?;
    decode_request(header.version, payload)
}

/// Decodes a whole response frame held in memory.
pub fn decode_response_frame(buf: &[u8]) -> Result<Response, FrameError> {
    let (header, payload) = split_frame(buf, MAX_RESPONSE_LEN)?;
    decode_response(header.version, payload)
}
