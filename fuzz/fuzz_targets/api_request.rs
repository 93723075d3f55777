//! Control API requests from arbitrary bytes: never a panic; decoding
//! either waits for more bytes, refuses with a 4xx, or takes a request
//! that fits the limits and no more bytes than it was given; routing the
//! request either refuses with a 4xx or names a call whose names are
//! valid; and feeding the same bytes one at a time decodes the same (no
//! prefix of a good request is refused, none is taken early).
//!
//! The first byte picks raw bytes (bit 0 clear) or tokens (set).
#![no_main]

use foresnap_control::api::{Call, MAX_BODY, MAX_HEAD, decode, route};
use foresnap_control::valid_name;
use libfuzzer_sys::fuzz_target;

#[rustfmt::skip]
const TOKENS: &[&[u8]] = &[
    b"GET ", b"POST ", b"DELETE ", b"/v1/volumes", b"/v1/destinations", b"/v1/restores", b"/v1/replicas", b"/v1/tiers", b"/",
    b"db", b"snapshots", b"?tenant=", b"acme", b"&", b"?x=1", b" HTTP/1.1\r\n", b"\r\n",
    b"Content-Length: ", b"Transfer-Encoding: chunked\r\n", b"X-Foresnap-Tenant: ", b"0", b"7",
    b"40", b"99999999999999999999", b"{\"volume\":\"db\",\"to\":\"/r.img\"}", b"{\"snapshot\":",
    b"\"to\":\"rel\"", b"}", b"{", b"\"", b"%20", b" ", b"\n", b"\x00", b"\xff",
];

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let bytes = foresnap_fuzz::expand(mode, rest, TOKENS);
    let whole = decode(&bytes);
    match &whole {
        Err(e) => assert!((400..500).contains(&e.status), "{e}"),
        Ok(None) => {}
        Ok(Some((req, n))) => {
            assert!(*n <= bytes.len() && *n <= MAX_HEAD + MAX_BODY);
            assert!(req.body.len() <= MAX_BODY);
            assert!(req.tenant.as_deref().is_none_or(valid_name));
            match route(req) {
                Err(e) => assert!((400..500).contains(&e.status), "{e}"),
                Ok(Call::Volume(v) | Call::Snapshot(v) | Call::Snapshots(v)) => {
                    assert!(valid_name(&v));
                }
                Ok(Call::StartRestore(r)) => {
                    assert!(valid_name(&r.volume) && r.to.starts_with('/'));
                }
                Ok(_) => {}
            }
        }
    }
    // A reader that gets the bytes in pieces stops where the whole did:
    // the first prefix that decodes (or fails) gives the same answer.
    if bytes.len() <= 512 {
        for end in 0..=bytes.len() {
            match decode(&bytes[..end]) {
                Ok(None) => continue,
                Ok(Some((_, n))) => {
                    assert_eq!(n, end, "a request decoded before its last byte arrived");
                    break;
                }
                Err(e) => {
                    assert!(
                        whole.is_err(),
                        "a prefix refused ({e}) what the whole takes"
                    );
                    break;
                }
            }
        }
    }
});
