//! The decoder meets random, truncated, oversize and version-skewed frames: it answers
//! each with a typed error and never panics or allocates beyond its limit.

use proptest::prelude::*;
use tally_protocol::frame::*;
use tally_protocol::lease::{LeaseId, LeaseSecret};
use tally_protocol::wire::*;

fn sample_requests() -> Vec<Request> {
    vec![
        Request::Hello(Hello {
            client: ClientIdentity {
                user: "ana".into(),
                host: "ws-12".into(),
                pid: 4242,
                program: "solver".into(),
                display: Some(":0".into()),
            },
        }),
        Request::Checkout(CheckoutRequest {
            feature: "solver".into(),
            count: 2,
            version: Some("2027.1".into()),
            build_date: None,
            wait_secs: 30,
            borrow_secs: 0,
        }),
        Request::Heartbeat(HeartbeatRequest {
            leases: vec![LeaseRef {
                id: LeaseId(7),
                secret: LeaseSecret([9; 16]),
            }],
        }),
        Request::Checkin(CheckinRequest { leases: vec![] }),
        Request::Status(StatusRequest { admin_token: None }),
    ]
}

#[test]
fn every_request_round_trips() {
    for request in sample_requests() {
        let frame = encode_request(&request);
        assert_eq!(decode_request_frame(&frame).unwrap(), request);
    }
}

#[test]
fn every_truncation_is_a_typed_error() {
    for request in sample_requests() {
        let frame = encode_request(&request);
        for cut in 0..frame.len() {
            let err = decode_request_frame(&frame[..cut]).unwrap_err();
            assert!(matches!(err, FrameError::Truncated { .. }), "{cut}: {err}");
        }
    }
}

#[test]
fn oversize_length_is_refused_before_reading() {
    let mut frame = vec![0xff, 0xff, 0xff, 0xff, 0, 1];
    frame.extend_from_slice(&[0; 16]);
    assert_eq!(
        decode_request_frame(&frame),
        Err(FrameError::TooLarge {
            len: u32::MAX as usize,
            max: MAX_REQUEST_LEN
        })
    );
    let header: [u8; HEADER_LEN] = [0, 0x10, 0, 1, 0, 1];
    assert!(matches!(
        parse_header(&header, MAX_REQUEST_LEN),
        Err(FrameError::TooLarge { .. })
    ));
}

#[test]
fn hostile_inner_lengths_do_not_allocate_past_the_limit() {
    // A checkout whose feature-name length claims 2^62 bytes: bincode's limit refuses it
    // instead of trying to allocate.
    let mut payload = vec![1u8]; // variant Checkout
    payload.push(0xfd); // varint u64 marker
    payload.extend_from_slice(&(1u64 << 62).to_le_bytes());
    let frame = encode_frame(1, &payload);
    assert!(matches!(
        decode_request_frame(&frame),
        Err(FrameError::Malformed(_))
    ));
}

#[test]
fn unknown_version_gets_a_negotiation_answer() {
    let frame = encode_frame(99, b"whatever a future client sends");
    assert_eq!(
        decode_request_frame(&frame),
        Err(FrameError::UnsupportedVersion {
            got: 99,
            min: 1,
            max: PROTOCOL_VERSION
        })
    );
    let answer = encode_version_negotiation(99);
    match decode_response_frame(&answer) {
        Err(FrameError::PeerRejectedVersion { message, .. }) => {
            assert!(message.contains("version 99"), "{message}");
        }
        other => panic!("expected a negotiation error, got {other:?}"),
    }
}

#[test]
fn unknown_request_variant_is_malformed_not_a_panic() {
    let frame = encode_frame(PROTOCOL_VERSION, &[200, 0, 0]);
    assert!(matches!(
        decode_request_frame(&frame),
        Err(FrameError::Malformed(_))
    ));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = decode_request_frame(&bytes);
        let _ = decode_response_frame(&bytes);
    }

    #[test]
    fn random_payloads_under_a_valid_header_never_panic(
        payload in proptest::collection::vec(any::<u8>(), 0..512),
        version in 0u16..3,
    ) {
        let frame = encode_frame(version, &payload);
        let _ = decode_request_frame(&frame);
        let _ = decode_response_frame(&frame);
    }

    #[test]
    fn mutated_valid_frames_never_panic(index in 0usize..64, byte in any::<u8>(), which in 0usize..5) {
        let mut frame = encode_request(&sample_requests()[which]);
        let i = index % frame.len();
        frame[i] = byte;
        let _ = decode_request_frame(&frame);
    }
}
