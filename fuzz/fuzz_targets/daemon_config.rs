//! The daemon's configuration file from arbitrary bytes: never a panic, an
//! error is one line that names what is wrong, and a file that loads holds
//! together: at least one volume, every name and tenant valid, names
//! unique, every volume with its backing, no option the daemon sets
//! itself, keys in kebab-case.
//!
//! The first byte picks raw bytes (bit 0 clear) or tokens (set): each byte
//! then names a word of the format ([`TOKENS`]), so that a short run
//! reaches well-formed tables and their near misses.
#![no_main]

use foresnap_control::config::{Config, Value};
use foresnap_control::valid_name;
use libfuzzer_sys::fuzz_target;

#[rustfmt::skip]
const TOKENS: &[&[u8]] = &[
    b"[daemon]\n", b"[[volume]]\n", b"[volume]\n", b"[[volume.x]]\n", b"name", b"tenant",
    b"backing", b"socket", b"run_dir", b"ring-size", b"ring_size", b"control", b"no_tracking",
    b"dest", b"every", b"id", b"metrics", b" = ", b"=", b"\n", b"\"", b"'", b"\"db\"", b"\"a\"",
    b"\"/x\"", b"\"/y\"", b"\"rel\"", b"\"DB\"", b"[", b"]", b",", b"{", b"}", b"0", b"1", b"-1",
    b"9223372036854775807", b"1.5", b"true", b"false", b"#", b"\"\\u0000\"", b"\"\"", b".",
    b"\"\"\"", b"1979-05-27", b"\r\n", b" ",
];

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let bytes = foresnap_fuzz::expand(mode, rest, TOKENS);
    let Ok(text) = std::str::from_utf8(&bytes) else {
        return;
    };
    let c = match Config::parse(text) {
        Ok(c) => c,
        Err(e) => {
            let msg = e.to_string();
            assert!(
                !msg.is_empty() && !msg.contains('\n'),
                "not one line: {msg:?}"
            );
            return;
        }
    };
    assert!(!c.volumes.is_empty(), "a config without volumes loaded");
    assert!(c.socket.is_absolute() && c.run_dir.is_absolute());
    for (i, v) in c.volumes.iter().enumerate() {
        assert!(valid_name(&v.name) && valid_name(&v.tenant), "{v:?}");
        assert!(
            c.volumes[..i].iter().all(|w| w.name != v.name),
            "duplicate {}",
            v.name
        );
        assert!(v.get("backing").is_some(), "{} has no backing", v.name);
        for o in &v.options {
            assert!(!["control", "no-tracking", "name", "tenant"].contains(&o.key.as_str()));
            assert!(
                o.key
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            );
            assert!(o.line >= 1 && o.line <= text.lines().count().max(1) + 1);
            let words = o.value.args(&o.key);
            match &o.value {
                Value::Bool(false) => assert!(words.is_empty()),
                Value::List(l) => assert_eq!(words.len(), 2 * l.len()),
                _ => assert_eq!(words[0], format!("--{}", o.key)),
            }
        }
    }
});
