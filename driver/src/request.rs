//! Decoding of ublk requests and the mapping of their outcomes to the
//! result the kernel gets.
//!
//! Pure functions over the request descriptor's plain fields, so that every
//! branch runs in unit tests without a kernel. The queue loop
//! ([`crate::queue`]) turns a [`Request`] into io_uring operations on the
//! backing store and calls [`completion_result`] with what they returned.

use libublk::sys;

/// Bytes per sector in ublk's descriptor, whatever the logical block size.
pub const SECTOR_SHIFT: u32 = 9;

/// What the kernel asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Read,
    /// `fua`: the data must be durable when the request completes.
    Write {
        fua: bool,
    },
    /// Make completed writes durable (`fdatasync` of the backing store).
    Flush,
    /// The range's content is no longer needed: punch a hole.
    Discard,
    /// Zero the range. `unmap`: the kernel allows deallocating it (punch a
    /// hole); otherwise it must stay allocated (zero range).
    WriteZeroes {
        unmap: bool,
    },
}

/// One decoded request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub op: Op,
    /// Byte offset on the device.
    pub offset: u64,
    /// Length in bytes (0 for a flush).
    pub len: u32,
}

/// Why a descriptor cannot be served. Each maps to one errno.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecodeError {
    /// An operation this target does not implement (zoned ops, WRITE_SAME).
    Unsupported(u8),
    /// The range leaves the device or overflows.
    OutOfRange,
    /// A data transfer larger than the per-tag buffer.
    TooLarge,
}

impl DecodeError {
    /// The negative errno the kernel gets for this request.
    pub fn errno(self) -> i32 {
        match self {
            DecodeError::Unsupported(_) => -libc::EOPNOTSUPP,
            DecodeError::OutOfRange => -libc::EIO,
            DecodeError::TooLarge => -libc::EINVAL,
        }
    }
}

/// Decodes a descriptor's fields (`op_flags`, `start_sector`, `nr_sectors`)
/// for a device of `dev_bytes` bytes whose per-tag buffer holds `buf_bytes`.
pub fn decode(
    op_flags: u32,
    start_sector: u64,
    nr_sectors: u32,
    dev_bytes: u64,
    buf_bytes: u32,
) -> Result<Request, DecodeError> {
    let op_code = (op_flags & 0xff) as u8;
    let flags = op_flags >> 8 << 8;
    let op = match u32::from(op_code) {
        sys::UBLK_IO_OP_READ => Op::Read,
        sys::UBLK_IO_OP_WRITE => Op::Write {
            fua: flags & sys::UBLK_IO_F_FUA != 0,
        },
        sys::UBLK_IO_OP_FLUSH => Op::Flush,
        sys::UBLK_IO_OP_DISCARD => Op::Discard,
        sys::UBLK_IO_OP_WRITE_ZEROES => Op::WriteZeroes {
            unmap: flags & sys::UBLK_IO_F_NOUNMAP == 0,
        },
        _ => return Err(DecodeError::Unsupported(op_code)),
    };
    if op == Op::Flush {
        return Ok(Request {
            op,
            offset: 0,
            len: 0,
        });
    }
    let offset = start_sector
        .checked_mul(1 << SECTOR_SHIFT)
        .ok_or(DecodeError::OutOfRange)?;
    let len64 = u64::from(nr_sectors) << SECTOR_SHIFT;
    let end = offset.checked_add(len64).ok_or(DecodeError::OutOfRange)?;
    if len64 == 0 || end > dev_bytes {
        return Err(DecodeError::OutOfRange);
    }
    let len = u32::try_from(len64).map_err(|_| DecodeError::TooLarge)?;
    if matches!(op, Op::Read | Op::Write { .. }) && len > buf_bytes {
        return Err(DecodeError::TooLarge);
    }
    Ok(Request { op, offset, len })
}

/// `fallocate(2)` mode for a discard or write-zeroes, as the kernel's loop
/// driver does it: a discard or an unmapping write-zeroes punches a hole
/// (reads return zeroes, space is freed); a write-zeroes that must keep the
/// blocks allocated zeroes the range in place.
pub fn fallocate_mode(op: Op) -> i32 {
    match op {
        Op::Discard | Op::WriteZeroes { unmap: true } => {
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
        }
        Op::WriteZeroes { unmap: false } => libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
        Op::Read | Op::Write { .. } | Op::Flush => 0,
    }
}

/// The result the kernel gets for a finished request whose last backing
/// operation returned `res` (bytes or a negative errno).
///
/// The single place where backing errors become block-layer errors: every
/// failure of the backing store is `-EIO` to the writer (an `ENOSPC` or
/// `EINVAL` of the backing file system means nothing to the device's user),
/// except `EOPNOTSUPP` on a discard or write-zeroes, which tells the block
/// layer to stop sending them.
pub fn completion_result(req: &Request, res: i32) -> i32 {
    if res < 0 {
        return match req.op {
            Op::Discard | Op::WriteZeroes { .. } if res == -libc::EOPNOTSUPP => res,
            _ => -libc::EIO,
        };
    }
    match req.op {
        // Data transfers report their length; the queue loop has already
        // resubmitted short transfers, so reaching here means all of it.
        Op::Read | Op::Write { .. } => i32::try_from(req.len).unwrap_or(-libc::EIO),
        Op::Flush | Op::Discard | Op::WriteZeroes { .. } => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEV: u64 = 1 << 30;
    const BUF: u32 = 512 << 10;

    fn op_flags(op: u32, flags: u32) -> u32 {
        op | flags
    }

    #[test]
    fn decodes_each_supported_op() {
        let r = decode(sys::UBLK_IO_OP_READ, 8, 8, DEV, BUF).unwrap();
        assert_eq!(
            r,
            Request {
                op: Op::Read,
                offset: 4096,
                len: 4096
            }
        );

        let w = decode(
            op_flags(sys::UBLK_IO_OP_WRITE, sys::UBLK_IO_F_FUA),
            0,
            1,
            DEV,
            BUF,
        )
        .unwrap();
        assert_eq!(w.op, Op::Write { fua: true });
        let w = decode(sys::UBLK_IO_OP_WRITE, 0, 1, DEV, BUF).unwrap();
        assert_eq!(w.op, Op::Write { fua: false });

        let f = decode(sys::UBLK_IO_OP_FLUSH, 0, 0, DEV, BUF).unwrap();
        assert_eq!(
            f,
            Request {
                op: Op::Flush,
                offset: 0,
                len: 0
            }
        );

        let d = decode(sys::UBLK_IO_OP_DISCARD, 16, 2048, DEV, BUF).unwrap();
        assert_eq!(
            d,
            Request {
                op: Op::Discard,
                offset: 8192,
                len: 1 << 20
            }
        );

        let z = decode(sys::UBLK_IO_OP_WRITE_ZEROES, 0, 8, DEV, BUF).unwrap();
        assert_eq!(z.op, Op::WriteZeroes { unmap: true });
        let z = decode(
            op_flags(sys::UBLK_IO_OP_WRITE_ZEROES, sys::UBLK_IO_F_NOUNMAP),
            0,
            8,
            DEV,
            BUF,
        )
        .unwrap();
        assert_eq!(z.op, Op::WriteZeroes { unmap: false });
    }

    #[test]
    fn refuses_unsupported_and_out_of_range() {
        let e = decode(sys::UBLK_IO_OP_ZONE_APPEND, 0, 8, DEV, BUF).unwrap_err();
        assert_eq!(e.errno(), -libc::EOPNOTSUPP);
        let e = decode(sys::UBLK_IO_OP_WRITE_SAME, 0, 8, DEV, BUF).unwrap_err();
        assert_eq!(e, DecodeError::Unsupported(4));

        // One sector past the end.
        let last = (DEV >> SECTOR_SHIFT) - 1;
        decode(sys::UBLK_IO_OP_READ, last, 1, DEV, BUF).unwrap();
        let e = decode(sys::UBLK_IO_OP_READ, last, 2, DEV, BUF).unwrap_err();
        assert_eq!(e.errno(), -libc::EIO);
        // Offset arithmetic that would overflow.
        let e = decode(sys::UBLK_IO_OP_WRITE, u64::MAX >> 4, 1, DEV, BUF).unwrap_err();
        assert_eq!(e, DecodeError::OutOfRange);
        // Empty transfers are malformed.
        assert!(decode(sys::UBLK_IO_OP_WRITE, 0, 0, DEV, BUF).is_err());
        // Larger than the per-tag buffer.
        let e = decode(sys::UBLK_IO_OP_WRITE, 0, (BUF >> 9) + 1, DEV, BUF).unwrap_err();
        assert_eq!(e.errno(), -libc::EINVAL);
        // A discard may be larger than the buffer: it carries no data.
        decode(sys::UBLK_IO_OP_DISCARD, 0, (BUF >> 9) * 4, DEV, BUF).unwrap();
    }

    #[test]
    fn backing_failures_become_eio() {
        let w = Request {
            op: Op::Write { fua: false },
            offset: 0,
            len: 4096,
        };
        for e in [
            libc::ENOSPC,
            libc::EIO,
            libc::EINVAL,
            libc::EBADF,
            libc::EDQUOT,
        ] {
            assert_eq!(completion_result(&w, -e), -libc::EIO, "errno {e}");
        }
        assert_eq!(completion_result(&w, 4096), 4096);

        let d = Request {
            op: Op::Discard,
            offset: 0,
            len: 4096,
        };
        assert_eq!(completion_result(&d, -libc::EOPNOTSUPP), -libc::EOPNOTSUPP);
        assert_eq!(completion_result(&d, -libc::ENOSPC), -libc::EIO);
        assert_eq!(completion_result(&d, 0), 0);

        let f = Request {
            op: Op::Flush,
            offset: 0,
            len: 0,
        };
        assert_eq!(completion_result(&f, -libc::EIO), -libc::EIO);
        assert_eq!(completion_result(&f, 0), 0);
    }

    #[test]
    fn fallocate_modes_follow_the_loop_driver() {
        let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        assert_eq!(fallocate_mode(Op::Discard), punch);
        assert_eq!(fallocate_mode(Op::WriteZeroes { unmap: true }), punch);
        assert_eq!(
            fallocate_mode(Op::WriteZeroes { unmap: false }),
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
        );
    }

    proptest::proptest! {
        #[test]
        fn decode_never_panics_and_stays_in_bounds(
            op_flags: u32, start: u64, nr: u32, dev in 0u64..(1 << 50), buf in 0u32..(1 << 24)
        ) {
            if let Ok(r) = decode(op_flags, start, nr, dev, buf) {
                if r.op != Op::Flush {
                    proptest::prop_assert!(r.offset + u64::from(r.len) <= dev);
                    proptest::prop_assert!(r.len > 0);
                }
                if matches!(r.op, Op::Read | Op::Write { .. }) {
                    proptest::prop_assert!(r.len <= buf);
                }
            }
        }
    }
}
