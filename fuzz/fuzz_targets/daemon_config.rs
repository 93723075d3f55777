//! The daemon's configuration file from arbitrary bytes: never a panic, an
//! error is one line that names what is wrong, and a file that loads holds
//! together: at least one volume or replica, every name and tenant valid, names
//! unique, every volume with its backing, no option the daemon sets
//! itself, keys in kebab-case (replicas alike, with their image and
//! destinations, never a volume's backing); every volume's tenant declared, each of its
//! destinations inside one of its tenant's, no two tenants' places
//! overlapping, and an S3 place only with the tenant's own key.
//!
//! The first byte picks raw bytes (bit 0 clear) or tokens (set): each byte
//! then names a word of the format ([`TOKENS`]), so that a short run
//! reaches well-formed tables and their near misses.
#![no_main]

use foresnap_control::config::{Config, Kind, Value, inside, place};
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
    b"[[tenant]]\n", b"[[replica]]\n", b"to", b"follow", b"poll", b"[[tier]]\n", b"fast", b"slow", b"age", b"destinations", b"access-key-id", b"secret_key_file", b"\"file:///b\"",
    b"\"file:///b/c\"", b"\"file:///\"", b"\"file:///b/../c\"", b"\"s3://bkt/p?endpoint=http://h\"",
    b"\"s3://bkt\"", b"\"s3://bkt/p/q\"", b"\"acme\"", b"\"k\"", b"\"/k\"", b"\"file:///b/\"",
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
    assert!(
        !c.volumes.is_empty() || !c.replicas.is_empty() || !c.tiers.is_empty(),
        "a config without volumes, replicas or tiers loaded"
    );
    assert!(c.socket.is_absolute() && c.run_dir.is_absolute());
    for (i, t) in c.tenants.iter().enumerate() {
        assert!(valid_name(&t.name) && !t.destinations.is_empty(), "{t:?}");
        assert_eq!(t.access_key_id.is_some(), t.secret_key_file.is_some());
        for d in &t.destinations {
            let p = place(d).expect("a tenant's destination is a place");
            assert!(!p.0.starts_with("s3") || t.access_key_id.is_some(), "{t:?}");
            for u in &c.tenants[..i] {
                assert_ne!(u.name, t.name);
                for e in &u.destinations {
                    let q = place(e).unwrap();
                    assert!(!inside(&p, &q) && !inside(&q, &p), "{d} and {e} overlap");
                }
            }
        }
    }
    for (kind, list) in [
        (Kind::Volume, &c.volumes),
        (Kind::Replica, &c.replicas),
        (Kind::Tier, &c.tiers),
    ] {
        check_tables(&c, kind, list, text);
    }
    for r in &c.replicas {
        let to = &r.get("to").expect("a replica has its image").value;
        assert!(
            c.volumes
                .iter()
                .all(|v| v.get("backing").is_none_or(|b| b.value != *to)),
            "replica {} writes a volume's backing",
            r.name
        );
    }
});

/// Volumes or replicas: their tenants, places, names, required and
/// reserved keys, and their options' words.
fn check_tables(c: &Config, kind: Kind, tables: &[foresnap_control::config::Volume], text: &str) {
    let (required, reserved): (&[&str], &[&str]) = match kind {
        Kind::Volume => (&["backing"], &["control", "no-tracking", "name", "tenant"]),
        Kind::Replica => (&["to", "dest"], &["follow", "daemon", "name", "tenant"]),
        Kind::Tier => (&["fast", "slow", "age"], &["name", "tenant"]),
    };
    for (i, v) in tables.iter().enumerate() {
        assert_eq!(v.kind, kind);
        let t = c
            .tenant(&v.tenant)
            .expect("every volume's tenant is declared");
        if let Some(o) = v.get("dest") {
            let dests = match &o.value {
                Value::Str(s) => vec![s.clone()],
                Value::List(l) => l.clone(),
                _ => vec![],
            };
            for d in dests {
                let p = place(&d).expect("a volume's destination is a place");
                assert!(
                    t.destinations
                        .iter()
                        .any(|e| inside(&p, &place(e).unwrap())),
                    "{d} is outside tenant {}",
                    t.name
                );
            }
        }
        assert!(valid_name(&v.name) && valid_name(&v.tenant), "{v:?}");
        assert!(
            tables[..i].iter().all(|w| w.name != v.name),
            "duplicate {}",
            v.name
        );
        for key in required {
            assert!(v.get(key).is_some(), "{} has no {key}", v.name);
        }
        for o in &v.options {
            assert!(!reserved.contains(&o.key.as_str()));
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
}
