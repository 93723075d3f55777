//! Export of a ring's write records as a fio iolog, version 3: the format
//! `fio --write_iolog` writes and `fio --read_iolog` replays, so workloads
//! recorded on the device can be replayed by fio and by the upload
//! simulator.
//!
//! ```text
//! fio version 3 iolog
//! 0 FILE add
//! 0 FILE open
//! TIMESTAMP FILE write OFFSET LENGTH
//! TIMESTAMP FILE trim OFFSET LENGTH      (discards and write-zeroes)
//! TIMESTAMP FILE close
//! ```
//!
//! Timestamps are microseconds since the first record: fio 3.33 writes
//! microseconds (checked: a 2 s `--write_iolog` run at 50 IOPS ends near
//! 2,000,000, writes 20,000 apart). Ring records carry milliseconds, so
//! exported times are multiples of 1000.

use std::io::{self, Write};

use super::ring_format::{Record, RecordKind};

/// Unwraps the records' 32-bit millisecond times into a monotonic 64-bit
/// count, in sequence order: a step back of more than half the range is a
/// wrap (records are never 24 days apart), a small one is clock jitter
/// between writers and reads as no time passing.
fn unwrapped_ms(records: &[Record]) -> Vec<u64> {
    let mut out = Vec::with_capacity(records.len());
    let (mut base, mut prev, mut last) = (0u64, None::<u32>, 0u64);
    for r in records {
        if let Some(p) = prev
            && r.time_ms < p
            && p - r.time_ms > u32::MAX / 2
        {
            base += 1 << 32;
        }
        prev = Some(r.time_ms);
        last = last.max(base + u64::from(r.time_ms));
        out.push(last);
    }
    out
}

/// Writes `records` (ascending by sequence) as an iolog naming `file`;
/// returns the number of I/O lines written. Close and preserve records
/// carry no I/O and are left out.
pub fn write_iolog(records: &[Record], file: &str, out: &mut impl Write) -> io::Result<u64> {
    writeln!(out, "fio version 3 iolog")?;
    writeln!(out, "0 {file} add")?;
    writeln!(out, "0 {file} open")?;
    let times = unwrapped_ms(records);
    let t0 = times.first().copied().unwrap_or(0);
    let mut n = 0;
    let mut end = 0;
    for (r, t) in records.iter().zip(times) {
        if let RecordKind::Write {
            offset,
            len,
            zeroing,
            ..
        } = r.kind
        {
            let us = (t - t0) * 1000;
            let action = if zeroing { "trim" } else { "write" };
            writeln!(out, "{us} {file} {action} {offset} {len}")?;
            n += 1;
            end = us;
        }
    }
    writeln!(out, "{end} {file} close")?;
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(seq: u64, time_ms: u32, offset: u64, zeroing: bool) -> Record {
        Record {
            seq,
            epoch: 1,
            time_ms,
            kind: RecordKind::Write {
                offset,
                len: 4096,
                fua: false,
                zeroing,
            },
        }
    }

    #[test]
    fn writes_fio_v3_lines() {
        let recs = [
            w(1, 100, 0, false),
            w(2, 105, 8192, false),
            Record {
                seq: 3,
                epoch: 1,
                time_ms: 106,
                kind: RecordKind::Close,
            },
            w(4, 110, 4096, true),
        ];
        let mut out = Vec::new();
        assert_eq!(write_iolog(&recs, "/dev/ublkb0", &mut out).unwrap(), 3);
        let text = String::from_utf8(out).unwrap();
        assert_eq!(
            text,
            "fio version 3 iolog\n0 /dev/ublkb0 add\n0 /dev/ublkb0 open\n\
             0 /dev/ublkb0 write 0 4096\n5000 /dev/ublkb0 write 8192 4096\n\
             10000 /dev/ublkb0 trim 4096 4096\n10000 /dev/ublkb0 close\n"
        );
    }

    #[test]
    fn times_unwrap_and_never_go_back() {
        let recs = [
            w(1, u32::MAX - 10, 0, false),
            w(2, u32::MAX - 12, 0, false), // jitter between writers
            w(3, 5, 0, false),             // wrapped
            w(4, 20, 0, false),
        ];
        let t = unwrapped_ms(&recs);
        let base = u64::from(u32::MAX - 10);
        assert_eq!(t, vec![base, base, (1 << 32) + 5, (1 << 32) + 20]);
    }
}
