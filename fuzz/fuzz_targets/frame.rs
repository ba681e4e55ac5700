//! Frames as the daemon reads requests and the client reads responses.
//!
//! Property: no panic on any input; a frame that splits re-encodes to the same bytes;
//! every request or response that decodes survives encode + decode unchanged.

#![no_main]

use libfuzzer_sys::fuzz_target;
use tally_protocol::frame::{self, FrameError, HEADER_LEN, MAX_REQUEST_LEN, MAX_RESPONSE_LEN};
use tally_protocol::wire::{CheckoutReply, Request, Response};

fn request_round_trip(request: &Request) {
    let bytes = frame::encode_request(request);
    assert_eq!(frame::decode_request_frame(&bytes).as_ref(), Ok(request));
}

fn response_round_trip(response: &Response) {
    let bytes = frame::encode_response(response);
    assert_eq!(frame::decode_response_frame(&bytes).as_ref(), Ok(response));
    // What the client does with a decoded response.
    match response {
        Response::Status(status) => {
            let _ = status.to_json(false);
        }
        Response::Checkout(CheckoutReply::Denied(denial)) => {
            let _ = (denial.to_string(), denial.reason.code());
        }
        _ => {}
    }
}

fuzz_target!(|data: &[u8]| {
    let Some(header) = data.first_chunk::<HEADER_LEN>() else {
        let _ = frame::decode_request_frame(data).map_err(|e| e.to_string());
        return;
    };
    let body = &data[HEADER_LEN..];

    // The daemon: header first, its limit checked before the payload is read, then the
    // version, then the payload of the declared length.
    match frame::parse_header(header, MAX_REQUEST_LEN) {
        Ok(h) => {
            assert!(h.payload_len + 2 <= MAX_REQUEST_LEN);
            if frame::check_request_version(h.version).is_ok() {
                // Decoded whatever the length says, so the fuzzer need not get it right.
                match frame::decode_request(h.version, body) {
                    Ok(request) => request_round_trip(&request),
                    Err(e) => drop(e.to_string()),
                }
            }
        }
        Err(e) => drop(e.to_string()),
    }

    // The client: same, with the response limit; version 0 is negotiation.
    if let Ok(h) = frame::parse_header(header, MAX_RESPONSE_LEN) {
        match frame::decode_response(h.version, body) {
            Ok(response) => response_round_trip(&response),
            Err(FrameError::PeerRejectedVersion { .. }) => assert_eq!(h.version, 0),
            Err(e) => drop(e.to_string()),
        }
    }

    // Whole frames in memory: the split is exact and re-encodes to the input.
    if let Ok((h, payload)) = frame::split_frame(data, MAX_RESPONSE_LEN) {
        assert_eq!(frame::encode_frame(h.version, payload), data);
    }
    if let Ok(request) = frame::decode_request_frame(data) {
        request_round_trip(&request);
    }
    if let Ok(response) = frame::decode_response_frame(data) {
        response_round_trip(&response);
    }

    // Version negotiation is readable by every client, whatever version it names.
    let got = u16::from_be_bytes([data[0], data[1]]);
    match frame::decode_response_frame(&frame::encode_version_negotiation(got)) {
        Err(FrameError::PeerRejectedVersion { message, .. }) => {
            assert!(message.contains(&got.to_string()))
        }
        other => panic!("negotiation frame read as {other:?}"),
    }
});
