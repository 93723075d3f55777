//! Ring recovery on arbitrary bytes: never panics, and every record it
//! returns is stored, checksummed, in the slot its sequence names, within
//! one lap of the newest, in ascending order.
#![no_main]

use foresnap_driver::tracking::ring_format::{BitmapPage, Header, RECORD_BYTES, Record, recover};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = Header::decode(data);
    let _ = BitmapPage::decode(data);
    let r = recover(data);
    let slots = (data.len() / RECORD_BYTES) as u64;
    let mut prev = 0;
    for rec in &r.records {
        assert!(rec.seq > prev, "records out of order");
        prev = rec.seq;
        assert!(
            rec.seq.saturating_add(slots) > r.max_seq,
            "record older than one lap"
        );
        let i = usize::try_from(rec.seq % slots).unwrap() * RECORD_BYTES;
        assert_eq!(&data[i..i + RECORD_BYTES], &rec.encode()[..]);
        assert_eq!(Record::decode(&rec.encode()), Some(*rec));
    }
    assert_eq!(r.records.len() as u64 + r.torn, r.max_seq.min(slots));
});
