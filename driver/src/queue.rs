//! One hardware queue: a thread with its own io_uring, serving the ublk
//! commands of its tags and the backing I/O they start on the same ring.
//!
//! Each tag carries one request at a time. [`Progress`] is the request's
//! state machine, pure so that its every branch is unit-tested: it says
//! which backing operation to issue next and, once there is nothing left to
//! do, the result the kernel gets. Short transfers are resubmitted for the
//! rest, `EAGAIN` is retried a bounded number of times, and a zero-range
//! the backing file system does not implement (tmpfs) falls back to punch
//! hole plus allocate. Nothing here panics: every failure is a result for
//! the kernel, and a request that cannot even be submitted to io_uring is
//! completed with `-EIO` rather than dropped.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use io_uring::{opcode, squeue, types};
use libublk::BufDesc;
use libublk::UblkIORes;
use libublk::helpers::IoBuf;
use libublk::io::{BufDescList, UblkDev, UblkIOCtx, UblkQueue};

use crate::hydrate::{Hydration, Readiness};
use crate::metrics::{IoMetrics, OpClass, QueueStats};
use crate::request::{Op, Request, completion_result, decode, fallocate_mode};
use crate::tracking::{Begin, Tracker};

/// Index of the backing file in the queue ring's fixed-file table (0 is the
/// ublk char device, registered by libublk).
const BACKING_FD: types::Fixed = types::Fixed(1);
/// Index of the write ring's file, when tracking is on.
pub(crate) const RING_FD: types::Fixed = types::Fixed(2);

/// How many times an `EAGAIN` from the backing store is retried before the
/// request fails. io_uring already punts blocking I/O to its workers, so an
/// `EAGAIN` reaching us is rare and transient; a bound keeps a misbehaving
/// backing store from spinning the queue thread.
const MAX_EAGAIN_RETRIES: u8 = 8;

/// A backing-store operation for one step of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackingOp {
    /// Read `len` bytes at `offset` into the tag buffer at `buf_off`.
    Read { offset: u64, len: u32, buf_off: u32 },
    /// Write `len` bytes at `offset` from the tag buffer at `buf_off`;
    /// `dsync`: durable on completion (`RWF_DSYNC`, the FUA of files).
    Write {
        offset: u64,
        len: u32,
        buf_off: u32,
        dsync: bool,
    },
    /// `fdatasync` the backing store.
    Fdatasync,
    /// `fdatasync` the write ring's file: the records of every write
    /// completed so far become durable (before a FLUSH or FUA write).
    SyncRing,
    /// `fallocate(mode)` over the range.
    Fallocate { offset: u64, len: u64, mode: i32 },
}

/// What the queue loop does next for a tag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Issue(BackingOp),
    /// Complete the request with this result (bytes, 0, or `-errno`).
    Complete(i32),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// Making the write ring durable before a FLUSH or FUA write.
    RingSync,
    Main,
    /// Zero-range unsupported: punching the hole first.
    ZeroPunch,
    /// ... then allocating the range again, so it stays mapped.
    ZeroAlloc,
}

/// The state of one request on one tag.
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    req: Request,
    done: u32,
    step: Step,
    retries: u8,
}

impl Progress {
    /// Starts `req`: its first backing operation. `zero_range`: whether the
    /// backing store is still believed to implement `FALLOC_FL_ZERO_RANGE`;
    /// once a queue has seen it refused ([`Progress::zero_range_refused`]),
    /// it starts write-zeroes at the fallback instead of failing each one.
    /// `tracked`: writes are recorded in a write ring, which FLUSH and FUA
    /// writes make durable first.
    pub fn start(req: Request, zero_range: bool, tracked: bool) -> (Progress, Action) {
        let step = match req.op {
            Op::Flush | Op::Write { fua: true } if tracked => Step::RingSync,
            Op::WriteZeroes { unmap: false } if !zero_range => Step::ZeroPunch,
            _ => Step::Main,
        };
        let p = Progress {
            req,
            done: 0,
            step,
            retries: 0,
        };
        let a = p.issue();
        (p, a)
    }

    /// Whether this request found `FALLOC_FL_ZERO_RANGE` unsupported and is
    /// on the punch-and-allocate fallback.
    pub fn zero_range_refused(&self) -> bool {
        matches!(self.step, Step::ZeroPunch | Step::ZeroAlloc)
            && matches!(self.req.op, Op::WriteZeroes { unmap: false })
    }

    fn issue(&self) -> Action {
        let r = &self.req;
        let rest_off = r.offset + u64::from(self.done);
        let rest_len = r.len - self.done;
        Action::Issue(match (r.op, self.step) {
            (_, Step::RingSync) => BackingOp::SyncRing,
            (Op::Read, _) => BackingOp::Read {
                offset: rest_off,
                len: rest_len,
                buf_off: self.done,
            },
            (Op::Write { fua }, _) => BackingOp::Write {
                offset: rest_off,
                len: rest_len,
                buf_off: self.done,
                dsync: fua,
            },
            (Op::Flush, _) => BackingOp::Fdatasync,
            (_, Step::ZeroPunch) => BackingOp::Fallocate {
                offset: r.offset,
                len: u64::from(r.len),
                mode: fallocate_mode(Op::Discard),
            },
            (_, Step::ZeroAlloc) => BackingOp::Fallocate {
                offset: r.offset,
                len: u64::from(r.len),
                mode: libc::FALLOC_FL_KEEP_SIZE,
            },
            (op, Step::Main) => BackingOp::Fallocate {
                offset: r.offset,
                len: u64::from(r.len),
                mode: fallocate_mode(op),
            },
        })
    }

    /// The backing operation last issued returned `res`.
    pub fn on_result(&mut self, res: i32) -> Action {
        if res == -libc::EAGAIN && self.retries < MAX_EAGAIN_RETRIES {
            self.retries += 1;
            return self.issue();
        }
        match (self.req.op, self.step) {
            // The ring could not be made durable: the request must not
            // claim durability.
            (_, Step::RingSync) if res < 0 => Action::Complete(-libc::EIO),
            (_, Step::RingSync) => {
                self.step = Step::Main;
                self.issue()
            }
            (Op::Read | Op::Write { .. }, _) if res > 0 => {
                let n = res.unsigned_abs().min(self.req.len - self.done);
                self.done += n;
                if self.done < self.req.len {
                    self.retries = 0;
                    return self.issue();
                }
                Action::Complete(completion_result(&self.req, res))
            }
            // A transfer of nothing: end of file or a device that stopped
            // making progress. Looping would spin forever.
            (Op::Read | Op::Write { .. }, _) if res == 0 => Action::Complete(-libc::EIO),
            (Op::WriteZeroes { unmap: false }, Step::Main) if res == -libc::EOPNOTSUPP => {
                self.step = Step::ZeroPunch;
                self.issue()
            }
            (Op::WriteZeroes { unmap: false }, Step::ZeroPunch) if res >= 0 => {
                self.step = Step::ZeroAlloc;
                self.issue()
            }
            _ => Action::Complete(completion_result(&self.req, res)),
        }
    }
}

/// Builds the io_uring entry for `op` on the tag buffer at `buf`.
fn sqe_for(op: BackingOp, buf: *mut u8) -> squeue::Entry {
    match op {
        BackingOp::Read {
            offset,
            len,
            buf_off,
        } => {
            // `wrapping_add` keeps this safe code; the offset is within
            // the buffer because `Progress` never exceeds the request
            // length, which decoding bounded by the buffer size.
            opcode::Read::new(BACKING_FD, buf.wrapping_add(buf_off as usize), len)
                .offset(offset)
                .build()
        }
        BackingOp::Write {
            offset,
            len,
            buf_off,
            dsync,
        } => opcode::Write::new(BACKING_FD, buf.wrapping_add(buf_off as usize), len)
            .offset(offset)
            .rw_flags(if dsync { libc::RWF_DSYNC } else { 0 })
            .build(),
        BackingOp::Fdatasync => opcode::Fsync::new(BACKING_FD)
            .flags(types::FsyncFlags::DATASYNC)
            .build(),
        BackingOp::SyncRing => opcode::Fsync::new(RING_FD)
            .flags(types::FsyncFlags::DATASYNC)
            .build(),
        BackingOp::Fallocate { offset, len, mode } => opcode::Fallocate::new(BACKING_FD, len)
            .offset(offset)
            .mode(mode)
            .build(),
    }
}

/// Whether `op` changes the device's content: tracked as a write.
fn is_tracked_write(op: Op) -> Option<(bool, bool)> {
    match op {
        Op::Write { fua } => Some((fua, false)),
        Op::Discard | Op::WriteZeroes { .. } => Some((false, true)),
        Op::Read | Op::Flush => None,
    }
}

/// Per-queue state owned by the queue thread.
struct QueueState<'b> {
    qid: u16,
    dev_bytes: u64,
    buf_bytes: u32,
    bufs: &'b [IoBuf<u8>],
    tags: Vec<Option<Progress>>,
    /// The backing store has not refused `FALLOC_FL_ZERO_RANGE` yet.
    zero_range: bool,
    tracker: Option<&'b Tracker>,
    /// Scratch for the blocks a write must copy first (no allocation per
    /// write: sized for the largest request).
    cow: Vec<u64>,
    /// A lazy restore's chunks: requests wait for theirs.
    hydration: Option<&'b Hydration>,
    /// Writes held back while an epoch closes, and requests waiting for a
    /// lazy restore's chunk; resumed by the waker.
    deferred: Vec<(u16, Request)>,
    /// The waker's eventfd read lands here. Leaked on purpose (8 bytes per
    /// queue per device): the read stays armed in the kernel until the
    /// ring is torn down, and a wake that arrives while the queue thread
    /// exits (a lazy restore's hydrator wakes the queues after every chunk)
    /// may still complete into it after this state is gone. Freed memory
    /// there corrupted the heap (glibc: "unaligned tcache chunk detected").
    waker_buf: &'static mut u64,
    /// With metrics on: this queue's stats, and when each tag's command
    /// arrived (empty with metrics off: nothing is timed).
    metrics: Option<Arc<Mutex<QueueStats>>>,
    arrived: Vec<Option<Instant>>,
}

impl QueueState<'_> {
    fn handle(&mut self, q: &UblkQueue<'_>, tag: u16, io: &UblkIOCtx) {
        let t = usize::from(tag);
        // The waker's eventfd read carries the tag one past the last
        // request tag (the slot the device reserves with `extra_ios`).
        if io.is_tgt_io() && t == self.tags.len() {
            self.woken(q, io.result());
            return;
        }
        let action = if io.is_tgt_io() {
            match self.tags.get_mut(t).and_then(Option::as_mut) {
                Some(p) => {
                    let a = p.on_result(io.result());
                    // Checked only until the first refusal: reads and
                    // writes pay one bool test.
                    if self.zero_range && p.zero_range_refused() {
                        self.zero_range = false;
                    }
                    a
                }
                // A backing completion for an idle tag cannot happen; if
                // it does, there is no request to answer.
                None => {
                    log::error!(
                        "queue {}: backing completion for idle tag {tag}",
                        q.get_qid()
                    );
                    return;
                }
            }
        } else {
            if let Some(at) = self.arrived.get_mut(t) {
                *at = Some(Instant::now());
            }
            let iod = q.get_iod(tag);
            match decode(
                iod.op_flags,
                iod.start_sector,
                iod.nr_sectors,
                self.dev_bytes,
                self.buf_bytes,
            ) {
                Ok(req) => match self.begin(tag, req) {
                    Some(a) => a,
                    None => return, // deferred
                },
                Err(e) => Action::Complete(e.errno()),
            }
        };
        self.act(q, tag, action);
    }

    /// Starts a decoded request: tracks it if it is a write, unless an
    /// epoch is closing, in which case it is deferred (`None`). On a lazily
    /// restored volume, a request on a chunk not yet there asks for it and
    /// is deferred too; one on a chunk that could not be restored fails.
    fn begin(&mut self, tag: u16, req: Request) -> Option<Action> {
        if let Some(h) = self.hydration
            && req.op != Op::Flush
        {
            let len = u64::from(req.len);
            let stands = if req.op == Op::Read {
                h.read_readiness(req.offset, len)
            } else {
                h.readiness(req.offset, len)
            };
            match stands {
                Readiness::Ready => {}
                Readiness::Pending => {
                    h.want(req.offset, u64::from(req.len));
                    self.deferred.push((tag, req));
                    return None;
                }
                Readiness::Failed => return Some(Action::Complete(-libc::EIO)),
            }
        }
        if let Some(tr) = self.tracker
            && let Some((fua, zeroing)) = is_tracked_write(req.op)
            && tr.begin_write(self.qid, req.offset, req.len, fua, zeroing, &mut self.cow)
                == Begin::Defer
        {
            self.deferred.push((tag, req));
            return None;
        }
        let (p, a) = Progress::start(req, self.zero_range, self.tracker.is_some());
        self.tags[usize::from(tag)] = Some(p);
        Some(a)
    }

    /// The waker fired: an epoch switch finished. Re-arm it and retry the
    /// deferred writes (a new close may defer them again).
    fn woken(&mut self, q: &UblkQueue<'_>, res: i32) {
        if res < 0 && res != -libc::EAGAIN && res != -libc::EINTR {
            log::error!("queue {}: waker read failed: {res}", q.get_qid());
        }
        self.arm_waker(q);
        let deferred = std::mem::take(&mut self.deferred);
        for (tag, req) in deferred {
            if let Some(a) = self.begin(tag, req) {
                self.act(q, tag, a);
            }
        }
    }

    fn arm_waker(&mut self, q: &UblkQueue<'_>) {
        let Some(fd) = self.tracker.and_then(|t| t.waker(self.qid)) else {
            return;
        };
        use std::os::fd::AsRawFd;
        // One past the last request tag (see `handle`).
        let tag = u16::try_from(self.tags.len()).unwrap_or(u16::MAX);
        let ptr: *mut u64 = &raw mut *self.waker_buf;
        let sqe = opcode::Read::new(types::Fd(fd.as_raw_fd()), ptr.cast(), 8)
            .build()
            .user_data(UblkIOCtx::build_user_data(tag, 0, 0, true));
        if let Err(e) = q.ublk_submit_sqe_sync(sqe) {
            // Without a waker, deferred writes would wait for the next
            // request on this queue; say so loudly.
            log::error!("queue {}: cannot arm the epoch waker: {e}", q.get_qid());
        }
    }

    fn act(&mut self, q: &UblkQueue<'_>, tag: u16, action: Action) {
        let t = usize::from(tag);
        let buf = &self.bufs[t];
        let res = match action {
            Action::Issue(op) => {
                let data = UblkIOCtx::build_user_data(tag, 0, 0, true);
                let sqe = sqe_for(op, buf.as_mut_ptr()).user_data(data);
                match q.ublk_submit_sqe_sync(sqe) {
                    Ok(()) => return,
                    Err(e) => {
                        log::error!("queue {}: cannot submit backing I/O: {e}", q.get_qid());
                        -libc::EIO
                    }
                }
            }
            Action::Complete(res) => res,
        };
        let done = self.tags[t].take();
        if let Some(p) = &done
            && let Some(tr) = self.tracker
            && is_tracked_write(p.req.op).is_some()
        {
            tr.end_write(self.qid, p.req.offset, p.req.len);
        }
        if let Some(m) = &self.metrics
            && let Some(at) = self.arrived.get_mut(t).and_then(Option::take)
        {
            let (class, len) = done.as_ref().map_or((OpClass::Invalid, 0), |p| {
                (OpClass::of(p.req.op), p.req.len)
            });
            m.lock().unwrap_or_else(PoisonError::into_inner).record(
                class,
                len,
                at.elapsed(),
                res >= 0,
            );
        }
        if let Err(e) = q.complete_io_cmd_unified(
            tag,
            BufDesc::Slice(buf.as_slice()),
            Ok(UblkIORes::Result(res)),
        ) {
            log::error!("queue {}: cannot complete tag {tag}: {e}", q.get_qid());
        }
    }
}

/// Runs queue `qid` of `dev` until the device stops. Called on the queue's
/// own thread.
pub(crate) fn serve_queue(
    qid: u16,
    dev: &UblkDev,
    dev_bytes: u64,
    zero_range: bool,
    tracker: Option<&Tracker>,
    hydration: Option<&Hydration>,
    metrics: Option<&IoMetrics>,
) {
    let bufs = dev.alloc_queue_io_bufs();
    let queue = match UblkQueue::new(qid, dev)
        .and_then(|q| q.submit_fetch_commands_unified(BufDescList::Slices(Some(&bufs))))
    {
        Ok(q) => q,
        Err(e) => {
            log::error!("queue {qid}: setup failed: {e}");
            return;
        }
    };
    let depth = usize::from(dev.dev_info.queue_depth);
    let block = tracker.map_or(4096, |t| 1u32 << t.map().geometry().block_shift);
    let mut state = QueueState {
        qid,
        dev_bytes,
        buf_bytes: dev.dev_info.max_io_buf_bytes,
        bufs: &bufs,
        tags: vec![None; depth],
        zero_range,
        tracker,
        cow: Vec::with_capacity(
            usize::try_from(dev.dev_info.max_io_buf_bytes / block + 2).unwrap_or(0),
        ),
        hydration,
        deferred: Vec::with_capacity(if tracker.is_some() { depth } else { 0 }),
        waker_buf: Box::leak(Box::new(0)),
        metrics: metrics.map(IoMetrics::queue),
        arrived: if metrics.is_some() {
            vec![None; depth]
        } else {
            Vec::new()
        },
    };
    state.arm_waker(&queue);
    queue.wait_and_handle_io(|q, tag, io| state.handle(q, tag, io));
}

#[cfg(test)]
mod tests {
    use super::*;

    impl Progress {
        fn start_test(req: Request) -> (Progress, Action) {
            Progress::start(req, true, false)
        }
    }

    fn req(op: Op, len: u32) -> Request {
        Request {
            op,
            offset: 1 << 20,
            len,
        }
    }

    #[test]
    fn full_transfer_completes_with_its_length() {
        let (mut p, a) = Progress::start_test(req(Op::Read, 8192));
        assert_eq!(
            a,
            Action::Issue(BackingOp::Read {
                offset: 1 << 20,
                len: 8192,
                buf_off: 0
            })
        );
        assert_eq!(p.on_result(8192), Action::Complete(8192));
    }

    #[test]
    fn short_transfer_resubmits_the_rest() {
        let (mut p, _) = Progress::start_test(req(Op::Write { fua: true }, 8192));
        assert_eq!(
            p.on_result(4096),
            Action::Issue(BackingOp::Write {
                offset: (1 << 20) + 4096,
                len: 4096,
                buf_off: 4096,
                dsync: true
            })
        );
        assert_eq!(p.on_result(4096), Action::Complete(8192));
    }

    #[test]
    fn zero_progress_and_errors_give_eio() {
        let (mut p, _) = Progress::start_test(req(Op::Read, 4096));
        assert_eq!(p.on_result(0), Action::Complete(-libc::EIO));
        let (mut p, _) = Progress::start_test(req(Op::Write { fua: false }, 4096));
        assert_eq!(p.on_result(-libc::ENOSPC), Action::Complete(-libc::EIO));
        let (mut p, _) = Progress::start_test(Request {
            op: Op::Flush,
            offset: 0,
            len: 0,
        });
        assert_eq!(p.on_result(-libc::EIO), Action::Complete(-libc::EIO));
    }

    #[test]
    fn eagain_is_retried_a_bounded_number_of_times() {
        let (mut p, first) = Progress::start_test(req(Op::Read, 4096));
        for _ in 0..MAX_EAGAIN_RETRIES {
            assert_eq!(p.on_result(-libc::EAGAIN), first);
        }
        assert_eq!(p.on_result(-libc::EAGAIN), Action::Complete(-libc::EIO));
    }

    #[test]
    fn flush_is_fdatasync_and_fua_is_dsync() {
        let (_, a) = Progress::start_test(Request {
            op: Op::Flush,
            offset: 0,
            len: 0,
        });
        assert_eq!(a, Action::Issue(BackingOp::Fdatasync));
        let (_, a) = Progress::start_test(req(Op::Write { fua: true }, 4096));
        assert!(matches!(
            a,
            Action::Issue(BackingOp::Write { dsync: true, .. })
        ));
        let (_, a) = Progress::start_test(req(Op::Write { fua: false }, 4096));
        assert!(matches!(
            a,
            Action::Issue(BackingOp::Write { dsync: false, .. })
        ));
    }

    #[test]
    fn discard_punches_and_reports_zero() {
        let (mut p, a) = Progress::start_test(req(Op::Discard, 1 << 20));
        let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        assert_eq!(
            a,
            Action::Issue(BackingOp::Fallocate {
                offset: 1 << 20,
                len: 1 << 20,
                mode: punch
            })
        );
        assert_eq!(p.on_result(0), Action::Complete(0));
        let (mut p, _) = Progress::start_test(req(Op::Discard, 4096));
        assert_eq!(
            p.on_result(-libc::EOPNOTSUPP),
            Action::Complete(-libc::EOPNOTSUPP)
        );
    }

    #[test]
    fn zero_range_falls_back_to_punch_then_allocate() {
        let (mut p, a) = Progress::start_test(req(Op::WriteZeroes { unmap: false }, 4096));
        let zero = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;
        assert_eq!(
            a,
            Action::Issue(BackingOp::Fallocate {
                offset: 1 << 20,
                len: 4096,
                mode: zero
            })
        );
        let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        assert_eq!(
            p.on_result(-libc::EOPNOTSUPP),
            Action::Issue(BackingOp::Fallocate {
                offset: 1 << 20,
                len: 4096,
                mode: punch
            })
        );
        assert_eq!(
            p.on_result(0),
            Action::Issue(BackingOp::Fallocate {
                offset: 1 << 20,
                len: 4096,
                mode: libc::FALLOC_FL_KEEP_SIZE
            })
        );
        assert!(p.zero_range_refused());
        assert_eq!(p.on_result(0), Action::Complete(0));
        // A queue that learnt it starts at the fallback.
        let (p, a) = Progress::start(req(Op::WriteZeroes { unmap: false }, 4096), false, false);
        assert!(p.zero_range_refused());
        assert_eq!(
            a,
            Action::Issue(BackingOp::Fallocate {
                offset: 1 << 20,
                len: 4096,
                mode: punch
            })
        );
        // Other ops are not affected by the learnt flag.
        let (p, _) = Progress::start(req(Op::WriteZeroes { unmap: true }, 4096), false, false);
        assert!(!p.zero_range_refused());
        // If punching is unsupported as well, the block layer is told.
        let (mut p, _) = Progress::start_test(req(Op::WriteZeroes { unmap: false }, 4096));
        p.on_result(-libc::EOPNOTSUPP);
        assert_eq!(
            p.on_result(-libc::EOPNOTSUPP),
            Action::Complete(-libc::EOPNOTSUPP)
        );
    }

    #[test]
    fn tracked_flush_and_fua_sync_the_ring_first() {
        let flush = Request {
            op: Op::Flush,
            offset: 0,
            len: 0,
        };
        let (mut p, a) = Progress::start(flush, true, true);
        assert_eq!(a, Action::Issue(BackingOp::SyncRing));
        assert_eq!(p.on_result(0), Action::Issue(BackingOp::Fdatasync));
        assert_eq!(p.on_result(0), Action::Complete(0));
        let (mut p, a) = Progress::start(req(Op::Write { fua: true }, 4096), true, true);
        assert_eq!(a, Action::Issue(BackingOp::SyncRing));
        assert!(matches!(
            p.on_result(0),
            Action::Issue(BackingOp::Write { dsync: true, .. })
        ));
        assert_eq!(p.on_result(4096), Action::Complete(4096));
        // A ring that cannot be made durable fails the request: it must
        // not report durability it does not have.
        let (mut p, _) = Progress::start(flush, true, true);
        assert_eq!(p.on_result(-libc::EIO), Action::Complete(-libc::EIO));
        // Plain writes and reads do not sync the ring.
        let (_, a) = Progress::start(req(Op::Write { fua: false }, 4096), true, true);
        assert!(matches!(a, Action::Issue(BackingOp::Write { .. })));
        let (_, a) = Progress::start(req(Op::Read, 4096), true, true);
        assert!(matches!(a, Action::Issue(BackingOp::Read { .. })));
        assert_eq!(is_tracked_write(Op::Discard), Some((false, true)));
        assert_eq!(is_tracked_write(Op::Flush), None);
    }

    #[test]
    fn over_long_results_are_clamped() {
        // A backing store claiming more than was asked cannot push `done`
        // past the request or the buffer.
        let (mut p, _) = Progress::start_test(req(Op::Read, 4096));
        assert_eq!(p.on_result(1 << 20), Action::Complete(4096));
    }

    proptest::proptest! {
        /// Any sequence of backing results ends in a completion within a
        /// bounded number of steps, and never issues a transfer outside
        /// the request.
        #[test]
        fn progress_terminates_and_stays_in_range(
            results in proptest::collection::vec(-200i32..70000, 1..200),
            write in proptest::bool::ANY,
            len in 1u32..128,
        ) {
            let len = len * 512;
            let op = if write { Op::Write { fua: false } } else { Op::Read };
            let (mut p, mut a) = Progress::start_test(Request { op, offset: 0, len });
            for r in results {
                match a {
                    Action::Complete(_) => break,
                    Action::Issue(BackingOp::Read { offset, len: l, buf_off })
                    | Action::Issue(BackingOp::Write { offset, len: l, buf_off, .. }) => {
                        proptest::prop_assert!(u64::from(buf_off) == offset);
                        proptest::prop_assert!(buf_off + l == len);
                    }
                    Action::Issue(_) => proptest::prop_assert!(false, "unexpected op"),
                }
                a = p.on_result(r);
            }
        }
    }
}
