//! Block traces from arbitrary bytes, in both formats: never a panic, and
//! a trace that parses holds together: writes in time order, none empty,
//! all inside the extent and the trace's end, each tagged, and only the
//! chosen disk's when one is chosen.
//!
//! The first byte picks the format (bit 0), whether to keep one disk (bit
//! 1, the disk in bits 4-5), whether to put a fio header first (bit 2),
//! and whether the rest is text or tokens (bit 3): each byte then names a
//! word of the formats ([`TOKENS`]). libFuzzer does not guess words like
//! `write` from byte comparisons in a short run; tokens reach well-formed
//! records, and their near misses, at once.
#![no_main]

use foresnap_uploader::trace::{TraceFormat, TraceOptions, parse};
use libfuzzer_sys::fuzz_target;

#[rustfmt::skip]
const TOKENS: &[&[u8]] = &[
    b"0", b"1", b"2", b"3", b"4", b"5", b"6", b"7", b"8", b"9", b" ", b" ", b",", b",", b"\n",
    b"\n", b"\r", b"\t", b"f", b"g", b"h", b"add", b"open", b"close", b"read", b"write", b"trim",
    b"sync", b"datasync", b"sync_file_range", b"wait", b"Write", b"Read", b"WRITE",
    b"Timestamp", b"fio version 3 iolog", b"fio version 2 iolog", b"18446744073709551615",
    b"4294967295", b"4096", b"-", b"+", b".", b"\xef\xbb\xbf", b"\xff",
];

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let format = if mode & 1 == 0 {
        TraceFormat::Fio
    } else {
        TraceFormat::Msr
    };
    let opts = TraceOptions {
        disk: (mode & 2 != 0).then_some(u32::from(mode >> 4) & 3),
    };
    let mut input = Vec::new();
    if mode & 4 != 0 {
        input.extend_from_slice(b"fio version 3 iolog\n");
    }
    if mode & 8 != 0 {
        for &b in rest {
            input.extend_from_slice(TOKENS[usize::from(b) % TOKENS.len()]);
        }
    } else {
        input.extend_from_slice(rest);
    }
    let Ok(t) = parse(&input, format, &opts) else {
        return;
    };
    assert!(!t.writes.is_empty(), "a trace without writes parsed");
    assert_eq!(t.writes.len(), t.file_index.len(), "untagged writes");
    for pair in t.writes.windows(2) {
        assert!(pair[0].t_us <= pair[1].t_us, "writes out of time order");
    }
    for (w, &tag) in t.writes.iter().zip(&t.file_index) {
        assert!(w.len > 0, "an empty write was kept");
        let end = w.offset.checked_add(w.len).expect("write end overflows");
        assert!(end <= t.extent, "a write past the extent");
        assert!(w.t_us <= t.end_us, "a write after the trace's end");
        assert!(
            opts.disk.is_none_or(|d| d == tag),
            "a write of another disk"
        );
        if format == TraceFormat::Fio {
            assert!((tag as usize) < t.files.len(), "a write of no file");
        }
    }
});
