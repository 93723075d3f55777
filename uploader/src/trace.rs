//! Block traces for the upload simulator (`foresnap simulate --trace FILE
//! --format fio|msr`): a trace file becomes a [`Trace`], the writes it
//! records in time order. Reads change nothing and are skipped (counted in
//! [`Trace::skipped`]); discards (fio `trim`) change content and count as
//! writes.
//!
//! ```text
//! bytes --lines--> one record per line --filter--> writes (stable sort by time)
//! ```
//!
//! [`read`] streams a file line by line through one reused buffer (traces
//! run to gigabytes); [`parse`] runs the same code on bytes in memory. A
//! line is at most [`MAX_LINE`] bytes, so memory stays bounded on a file
//! that is no trace at all. What a trace keeps is 28 bytes a write: a
//! [`TraceWrite`] and its file tag.
//!
//! # fio iolog, version 3
//!
//! What `fio --write_iolog=FILE` writes and `foresnap trace` exports
//! (`foresnap_driver::tracking::trace::write_iolog`):
//!
//! ```text
//! fio version 3 iolog
//! TIME FILE add | open | close
//! TIME FILE read | write | trim OFFSET LENGTH
//! TIME FILE sync | datasync | sync_file_range | wait [OFFSET LENGTH]
//! ```
//!
//! `TIME` is microseconds since the job started. Checked with fio 3.33:
//! `fio --name=t --filename=/tmp/t.img --size=16M --rw=randwrite --bs=4k
//! --rate_iops=50 --runtime=2 --time_based --write_iolog=/tmp/t.iolog
//! --ioengine=psync` logs writes 20,000 apart (141, 20114, 40119, ...) and
//! closes at 2000111: 2 s in microseconds. fio 3.33 logs `sync` and
//! `datasync` with an offset and a length of 0 (`100403 /tmp/t.img sync
//! 14094336 0`); the offset-less form is accepted too. `wait` and
//! `sync_file_range`, which fio can also log, are skipped like syncs.
//! Times are kept as logged, not moved to the first line.
//!
//! Several jobs logging to one file (`--numjobs=2`): fio 3.33 writes each
//! job's log after the other, each under its own `fio version 3 iolog`
//! line and with its own clock starting at 0 (jobs start together, within
//! a millisecond). A header line is therefore accepted anywhere, and the
//! writes are sorted by time, stably, so the sections interleave as they
//! happened and writes logged at one time keep their order.
//!
//! Several files in one log (`--nrfiles`, several jobs): each file gets an
//! index in order of first appearance ([`Trace::files`]), and each write
//! its file's index ([`Trace::file_index`]). The simulator sees one
//! volume, so by default all files are merged, every file's offsets
//! landing on the same volume; [`TraceOptions::disk`] keeps one file by
//! index instead.
//!
//! Version 2 logs (`fio version 2 iolog`, no `TIME` column) are refused:
//! the simulator needs the times. File names with spaces cannot occur (fio
//! reads the name as one word).
//!
//! # MSR Cambridge (SNIA block I/O traces)
//!
//! ```text
//! Timestamp,Hostname,DiskNumber,Type,Offset,Size,ResponseTime
//! 128166372003061629,hm,1,Write,3154152960,4096,2346
//! ```
//!
//! One record a line, an optional header line first. `Timestamp` is a
//! Windows filetime (100 ns ticks since 1601-01-01); times are made
//! relative to the earliest record of the file (any type, any disk) and
//! truncated to whole microseconds. `Type` is `Read` or `Write` (any
//! case); `Offset` and `Size` are bytes. `ResponseTime` is not used, and
//! may be missing. [`TraceOptions::disk`] keeps one `DiskNumber`; the
//! tag of a write is its disk number, and [`Trace::files`] stays empty.
//!
//! # Both formats
//!
//! Blank lines are ignored; `\r\n` line ends and surrounding spaces are
//! accepted. [`Trace::end_us`] is the last time of any record, whatever
//! its kind, disk or file: the trace covers that long even where the kept
//! writes stop earlier. Zero-length writes are skipped (counted in
//! `skipped`): they change nothing and fio logs none. A write whose end
//! passes 2^64 is an error. Any malformed line is an error naming the line
//! (1-based), what is wrong and the start of the line; nothing panics on
//! any input, invalid UTF-8 included. A trace with no records, or with
//! records but no write kept, is an error too: there is nothing to
//! simulate.

use std::collections::HashMap;
use std::fmt;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// Longest line accepted, in bytes (line end excluded). fio reads file
/// names of at most 256 bytes and an MSR record is under 100 bytes, so
/// 4 KiB refuses no real trace and bounds memory on a file that is not one.
pub const MAX_LINE: usize = 4096;

/// How much of a bad line an error quotes, in characters.
const EXCERPT_CHARS: usize = 80;

/// How much of a bad field an error quotes, in characters.
const VALUE_CHARS: usize = 40;

/// A Windows filetime counts 100 ns ticks: 10 a microsecond.
const TICKS_PER_US: u64 = 10;

/// The one fio header this module reads.
const FIO_HEADER: &str = "fio version 3 iolog";

/// The trace file formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TraceFormat {
    /// fio iolog, version 3.
    Fio,
    /// MSR Cambridge CSV.
    Msr,
}

impl FromStr for TraceFormat {
    type Err = TraceError;

    fn from_str(s: &str) -> Result<Self, TraceError> {
        let s = s.trim();
        if s.eq_ignore_ascii_case("fio") {
            Ok(Self::Fio)
        } else if s.eq_ignore_ascii_case("msr") {
            Ok(Self::Msr)
        } else {
            Err(TraceError::UnknownFormat(clip(s, VALUE_CHARS)))
        }
    }
}

impl fmt::Display for TraceFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Fio => "fio",
            Self::Msr => "msr",
        })
    }
}

/// One write: `len` bytes (never 0) at byte `offset`, at `t_us`
/// microseconds into the trace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceWrite {
    pub t_us: u64,
    pub offset: u64,
    pub len: u64,
}

/// What to keep of a trace.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TraceOptions {
    /// Keep only this disk: the `DiskNumber` of an MSR trace, the file
    /// index of a fio log (see [`Trace::files`]). `None` (the default)
    /// keeps all, merged into one volume.
    pub disk: Option<u32>,
}

/// A parsed trace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trace {
    /// The writes kept, ascending by time (stable: equal times keep their
    /// order in the file).
    pub writes: Vec<TraceWrite>,
    /// Parallel to `writes`: each write's file index in `files` (fio) or
    /// its disk number (MSR).
    pub file_index: Vec<u32>,
    /// fio: the file names, indexed by first appearance. MSR: empty.
    pub files: Vec<String>,
    /// Records not kept: reads, fio file actions and syncs, zero-length
    /// writes, and writes of other disks or files than
    /// [`TraceOptions::disk`].
    pub skipped: u64,
    /// End of the trace: the last time of any record (kept or not), in
    /// microseconds.
    pub end_us: u64,
    /// Highest `offset + len` of the writes kept: the volume size the
    /// trace needs.
    pub extent: u64,
}

/// Why a trace was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TraceError {
    #[error("unknown trace format {0:?} (expected fio or msr)")]
    UnknownFormat(String),
    // `error`, not `source`: the message includes it (no repeat in chains).
    #[error("cannot read trace {}: {error}", path.display())]
    Io { path: PathBuf, error: io::Error },
    /// A malformed line; `content` is its start, for the message.
    #[error("trace line {line}: {problem}: {content:?}")]
    Line {
        line: u64,
        content: String,
        problem: LineProblem,
    },
    #[error("the trace is empty")]
    Empty,
    #[error("the trace has no writes")]
    NoWrites,
    #[error("the trace has no writes on disk {0}")]
    NoWritesOnDisk(u32),
}

/// What is wrong with a line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LineProblem {
    #[error("not UTF-8 text")]
    NotUtf8,
    #[error("longer than {MAX_LINE} bytes")]
    TooLong,
    #[error("not a fio iolog (the first line should be \"{FIO_HEADER}\")")]
    NotFioLog,
    #[error(
        "a fio version 2 iolog has no timestamps; the simulator needs version 3 \
         (record the trace again with a recent fio's --write_iolog, or foresnap trace)"
    )]
    FioVersion2,
    #[error("unsupported fio iolog header (this build reads \"{FIO_HEADER}\")")]
    FioVersion,
    #[error("{what} (found {found} fields)")]
    Fields { what: &'static str, found: usize },
    #[error("bad {field} {value:?} (expected {expected})")]
    BadField {
        field: &'static str,
        value: String,
        expected: &'static str,
    },
    #[error(
        "unknown action {0:?} (expected add, open, close, read, write, trim, sync, \
         datasync, sync_file_range or wait)"
    )]
    UnknownAction(String),
    #[error("offset {offset} + length {len} passes 2^64")]
    Overflow { offset: u64, len: u64 },
    #[error("more than 2^32 files")]
    TooManyFiles,
}

/// Parses a whole trace held in memory.
pub fn parse(bytes: &[u8], format: TraceFormat, opts: &TraceOptions) -> Result<Trace, TraceError> {
    // A slice never fails to read: the path is only for the type.
    parse_from(bytes, format, opts, Path::new("<memory>"))
}

/// Parses the trace in the file at `path`, streaming it line by line.
pub fn read(path: &Path, format: TraceFormat, opts: &TraceOptions) -> Result<Trace, TraceError> {
    let file = File::open(path).map_err(|error| TraceError::Io {
        path: path.to_owned(),
        error,
    })?;
    parse_from(BufReader::with_capacity(1 << 16, file), format, opts, path)
}

fn parse_from(
    mut input: impl BufRead,
    format: TraceFormat,
    opts: &TraceOptions,
    path: &Path,
) -> Result<Trace, TraceError> {
    let mut parser = Parser::new(format, opts);
    let mut buf = Vec::with_capacity(256);
    let mut line = 0u64;
    // Room for the longest line, its "\r\n", and one byte more to see that
    // a line is too long without reading it all.
    let limit = (MAX_LINE + 3) as u64;
    loop {
        buf.clear();
        let got = (&mut input)
            .take(limit)
            .read_until(b'\n', &mut buf)
            .map_err(|error| TraceError::Io {
                path: path.to_owned(),
                error,
            })?;
        if got == 0 {
            break;
        }
        line += 1;
        parser
            .line(line, &buf)
            .map_err(|problem| TraceError::Line {
                line,
                content: excerpt(&buf),
                problem,
            })?;
    }
    parser.finish()
}

/// The state of one parse.
struct Parser<'o> {
    format: TraceFormat,
    opts: &'o TraceOptions,
    writes: Vec<TraceWrite>,
    file_index: Vec<u32>,
    files: Vec<String>,
    file_ids: HashMap<String, u32>,
    /// The file of the previous line: logs name one file many times in a
    /// row, and a comparison is cheaper than a hash.
    last_file: Option<(u32, usize)>,
    skipped: u64,
    /// Lines that are records (not headers or blank).
    records: u64,
    /// Earliest and latest time of any record, as written (fio:
    /// microseconds; MSR: filetime ticks).
    t_min: u64,
    t_max: u64,
    /// Whether `writes` is in time order so far.
    sorted: bool,
    extent: u64,
}

impl<'o> Parser<'o> {
    fn new(format: TraceFormat, opts: &'o TraceOptions) -> Self {
        Self {
            format,
            opts,
            writes: Vec::new(),
            file_index: Vec::new(),
            files: Vec::new(),
            file_ids: HashMap::new(),
            last_file: None,
            skipped: 0,
            records: 0,
            t_min: u64::MAX,
            t_max: 0,
            sorted: true,
            extent: 0,
        }
    }

    /// One line, `n` counting from 1, with its line end if it has one.
    fn line(&mut self, n: u64, raw: &[u8]) -> Result<(), LineProblem> {
        let raw = raw.strip_suffix(b"\n").unwrap_or(raw);
        let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
        if raw.len() > MAX_LINE {
            return Err(LineProblem::TooLong);
        }
        let mut text = std::str::from_utf8(raw).map_err(|_| LineProblem::NotUtf8)?;
        if n == 1 {
            text = text.strip_prefix('\u{feff}').unwrap_or(text);
        }
        let text = text.trim_ascii();
        match self.format {
            TraceFormat::Fio => self.fio_line(n, text),
            TraceFormat::Msr => self.msr_line(n, text),
        }
    }

    fn fio_line(&mut self, n: u64, text: &str) -> Result<(), LineProblem> {
        if text.starts_with("fio version ") {
            // Every job of a run starts its section with a header.
            return match text {
                FIO_HEADER => Ok(()),
                "fio version 2 iolog" => Err(LineProblem::FioVersion2),
                _ => Err(LineProblem::FioVersion),
            };
        }
        if n == 1 {
            return Err(LineProblem::NotFioLog);
        }
        if text.is_empty() {
            return Ok(());
        }
        let mut f = [""; 5];
        let mut found = 0;
        for word in text.split_ascii_whitespace() {
            if let Some(slot) = f.get_mut(found) {
                *slot = word;
            }
            found += 1;
        }
        if found != 3 && found != 5 {
            return Err(LineProblem::Fields {
                what: "expected TIME FILE ACTION [OFFSET LENGTH]",
                found,
            });
        }
        let [time, file, action, offset, len] = f;
        enum Kind {
            File,
            Io { write: bool },
            Other,
        }
        let kind = match action {
            "add" | "open" | "close" => Kind::File,
            "read" => Kind::Io { write: false },
            "write" | "trim" => Kind::Io { write: true },
            "sync" | "datasync" | "sync_file_range" | "wait" => Kind::Other,
            _ => return Err(LineProblem::UnknownAction(clip(action, VALUE_CHARS))),
        };
        let t = number(time, "timestamp", "microseconds")?;
        let io = if found == 5 {
            Some((
                number(offset, "offset", "a byte offset")?,
                number(len, "length", "a byte count")?,
            ))
        } else {
            None
        };
        let tag = self.file_id(file)?;
        self.seen(t);
        match (kind, io) {
            (Kind::File, Some(_)) => Err(LineProblem::Fields {
                what: "add, open and close take no offset or length",
                found,
            }),
            (Kind::Io { .. }, None) => Err(LineProblem::Fields {
                what: "read, write and trim need an offset and a length",
                found,
            }),
            (Kind::Io { write: true }, Some((offset, len))) => self.write(t, offset, len, tag),
            _ => {
                self.skipped += 1;
                Ok(())
            }
        }
    }

    fn msr_line(&mut self, n: u64, text: &str) -> Result<(), LineProblem> {
        if text.is_empty() {
            return Ok(());
        }
        let mut f = [""; 7];
        let mut found = 0;
        for field in text.split(',') {
            if let Some(slot) = f.get_mut(found) {
                *slot = field.trim_ascii();
            }
            found += 1;
        }
        let [time, _host, disk, kind, offset, size, _response] = f;
        if n == 1 && time.eq_ignore_ascii_case("timestamp") {
            return Ok(());
        }
        if found != 6 && found != 7 {
            return Err(LineProblem::Fields {
                what: "expected Timestamp,Hostname,DiskNumber,Type,Offset,Size,ResponseTime",
                found,
            });
        }
        let ticks = number(time, "timestamp", "Windows filetime ticks")?;
        let disk = number(disk, "disk number", "a disk number").and_then(|d| {
            u32::try_from(d).map_err(|_| bad_field("disk number", disk, "a disk number"))
        })?;
        let write = if kind.eq_ignore_ascii_case("write") {
            true
        } else if kind.eq_ignore_ascii_case("read") {
            false
        } else {
            return Err(bad_field("type", kind, "Read or Write"));
        };
        let offset = number(offset, "offset", "a byte offset")?;
        let len = number(size, "size", "a byte count")?;
        self.seen(ticks);
        if write {
            self.write(ticks, offset, len, disk)
        } else {
            self.skipped += 1;
            Ok(())
        }
    }

    /// A record at time `t` (whatever it is).
    fn seen(&mut self, t: u64) {
        self.records += 1;
        self.t_min = self.t_min.min(t);
        self.t_max = self.t_max.max(t);
    }

    /// A write (or trim) of file or disk `tag`: kept unless filtered out
    /// or empty.
    fn write(&mut self, t: u64, offset: u64, len: u64, tag: u32) -> Result<(), LineProblem> {
        let end = offset
            .checked_add(len)
            .ok_or(LineProblem::Overflow { offset, len })?;
        if len == 0 || self.opts.disk.is_some_and(|d| d != tag) {
            self.skipped += 1;
            return Ok(());
        }
        if self.writes.last().is_some_and(|w| t < w.t_us) {
            self.sorted = false;
        }
        self.writes.push(TraceWrite {
            t_us: t,
            offset,
            len,
        });
        self.file_index.push(tag);
        self.extent = self.extent.max(end);
        Ok(())
    }

    /// The index of fio file `name`, given at its first appearance.
    fn file_id(&mut self, name: &str) -> Result<u32, LineProblem> {
        if let Some((id, i)) = self.last_file
            && self.files.get(i).is_some_and(|f| f == name)
        {
            return Ok(id);
        }
        let (id, i) = match self.file_ids.get(name) {
            Some(&id) => (
                id,
                usize::try_from(id).map_err(|_| LineProblem::TooManyFiles)?,
            ),
            None => {
                let i = self.files.len();
                let id = u32::try_from(i).map_err(|_| LineProblem::TooManyFiles)?;
                self.files.push(name.to_owned());
                self.file_ids.insert(name.to_owned(), id);
                (id, i)
            }
        };
        self.last_file = Some((id, i));
        Ok(id)
    }

    fn finish(self) -> Result<Trace, TraceError> {
        if self.records == 0 {
            return Err(TraceError::Empty);
        }
        if self.writes.is_empty() {
            return Err(match self.opts.disk {
                Some(disk) => TraceError::NoWritesOnDisk(disk),
                None => TraceError::NoWrites,
            });
        }
        let (mut writes, mut file_index) = (self.writes, self.file_index);
        if !self.sorted {
            let mut both: Vec<(TraceWrite, u32)> = writes.into_iter().zip(file_index).collect();
            // Stable: writes logged at one time keep their order.
            both.sort_by_key(|(w, _)| w.t_us);
            (writes, file_index) = both.into_iter().unzip();
        }
        let end_us = match self.format {
            TraceFormat::Fio => self.t_max,
            TraceFormat::Msr => {
                let t0 = self.t_min;
                for w in &mut writes {
                    w.t_us = w.t_us.saturating_sub(t0) / TICKS_PER_US;
                }
                self.t_max.saturating_sub(t0) / TICKS_PER_US
            }
        };
        Ok(Trace {
            writes,
            file_index,
            files: self.files,
            skipped: self.skipped,
            end_us,
            extent: self.extent,
        })
    }
}

/// A decimal `u64`: ASCII digits only (no sign, no spaces), no overflow.
fn number(text: &str, field: &'static str, expected: &'static str) -> Result<u64, LineProblem> {
    let bad = || bad_field(field, text, expected);
    if text.is_empty() {
        return Err(bad());
    }
    text.bytes().try_fold(0u64, |v, b| {
        let digit = b.wrapping_sub(b'0');
        if digit > 9 {
            return Err(bad());
        }
        v.checked_mul(10)
            .and_then(|v| v.checked_add(u64::from(digit)))
            .ok_or_else(bad)
    })
}

fn bad_field(field: &'static str, value: &str, expected: &'static str) -> LineProblem {
    LineProblem::BadField {
        field,
        value: clip(value, VALUE_CHARS),
        expected,
    }
}

/// The first `max` characters of `text`, with `…` if there was more.
fn clip(text: &str, max: usize) -> String {
    let mut out: String = text.chars().take(max).collect();
    if text.chars().nth(max).is_some() {
        out.push('…');
    }
    out
}

/// The start of a raw line, for an error message: line end removed,
/// invalid UTF-8 replaced.
fn excerpt(raw: &[u8]) -> String {
    let raw = raw.strip_suffix(b"\n").unwrap_or(raw);
    let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
    // A character is at most 4 bytes: enough bytes for the excerpt.
    let head = raw.get(..EXCERPT_CHARS * 4 + 1).unwrap_or(raw);
    clip(&String::from_utf8_lossy(head), EXCERPT_CHARS)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fio(text: &str) -> Result<Trace, TraceError> {
        parse(text.as_bytes(), TraceFormat::Fio, &TraceOptions::default())
    }

    fn msr(text: &str) -> Result<Trace, TraceError> {
        parse(text.as_bytes(), TraceFormat::Msr, &TraceOptions::default())
    }

    fn w(t_us: u64, offset: u64, len: u64) -> TraceWrite {
        TraceWrite { t_us, offset, len }
    }

    fn disk(n: u32) -> TraceOptions {
        TraceOptions { disk: Some(n) }
    }

    #[test]
    fn fio_hand_written() {
        let t = fio("fio version 3 iolog\n\
                     0 /dev/sdb add\n\
                     5 /dev/sdb open\n\
                     10 /dev/sdb write 0 4096\n\
                     12 /dev/sdb read 0 4096\n\
                     \n\
                     20 /dev/sdb trim 8192 512\n\
                     21 /dev/sdb sync\n\
                     22 /dev/sdb datasync 8192 0\n\
                     25 /dev/sdb write 1048576 65536\n\
                     26 /dev/sdb wait 0 100\n\
                     30 /dev/sdb close\n")
        .unwrap();
        assert_eq!(
            t.writes,
            vec![w(10, 0, 4096), w(20, 8192, 512), w(25, 1 << 20, 65536)]
        );
        assert_eq!(t.file_index, vec![0, 0, 0]);
        assert_eq!(t.files, vec!["/dev/sdb".to_owned()]);
        // add, open, read, sync, datasync, wait, close
        assert_eq!(t.skipped, 7);
        assert_eq!(t.end_us, 30);
        assert_eq!(t.extent, (1 << 20) + 65536);
    }

    /// The first lines of a real log and its last, from fio 3.33:
    /// `fio --name=m --filename=/tmp/t.img --size=16M --rw=randrw --bs=4k
    /// --rate_iops=20 --runtime=1 --time_based --fsync=3
    /// --write_iolog=/tmp/m.iolog --ioengine=psync`.
    const FIO_3_33_RANDRW: &str = "\
fio version 3 iolog
29 /tmp/t.img add
5012 /tmp/t.img open
5028 /tmp/t.img read 1011712 4096
5201 /tmp/t.img write 12419072 4096
50157 /tmp/t.img read 14143488 4096
50394 /tmp/t.img write 7884800 4096
100206 /tmp/t.img read 6742016 4096
100386 /tmp/t.img write 14094336 4096
100403 /tmp/t.img sync 14094336 0
1000172 /tmp/t.img close
";

    #[test]
    fn fio_3_33_log() {
        let t = fio(FIO_3_33_RANDRW).unwrap();
        assert_eq!(
            t.writes,
            vec![
                w(5201, 12419072, 4096),
                w(50394, 7884800, 4096),
                w(100386, 14094336, 4096)
            ]
        );
        assert_eq!(t.skipped, 7);
        assert_eq!(t.end_us, 1000172);
        assert_eq!(t.extent, 14094336 + 4096);
    }

    /// Two files, from fio 3.33 (`--nrfiles=2 --filename_format='fj.$filenum'
    /// --fdatasync=2`, otherwise as above): the first lines and the last.
    const FIO_3_33_TWO_FILES: &str = "\
fio version 3 iolog
23 /tmp/fj.0 add
28 /tmp/fj.1 add
141 /tmp/fj.0 open
145 /tmp/fj.0 write 249856 4096
176 /tmp/fj.1 open
50127 /tmp/fj.1 write 3104768 4096
50169 /tmp/fj.0 datasync 3104768 0
100165 /tmp/fj.1 write 3534848 4096
150234 /tmp/fj.0 write 1970176 4096
1000236 /tmp/fj.1 close
";

    #[test]
    fn fio_files_merge_or_filter() {
        let all = fio(FIO_3_33_TWO_FILES).unwrap();
        assert_eq!(
            all.files,
            vec!["/tmp/fj.0".to_owned(), "/tmp/fj.1".to_owned()]
        );
        assert_eq!(all.writes.len(), 4);
        assert_eq!(all.file_index, vec![0, 1, 1, 0]);
        assert_eq!(all.end_us, 1000236);
        let one = parse(FIO_3_33_TWO_FILES.as_bytes(), TraceFormat::Fio, &disk(1)).unwrap();
        assert_eq!(
            one.writes,
            vec![w(50127, 3104768, 4096), w(100165, 3534848, 4096)]
        );
        assert_eq!(one.file_index, vec![1, 1]);
        assert_eq!(one.skipped, all.skipped + 2);
        // The end is the trace's, not the kept writes'.
        assert_eq!(one.end_us, 1000236);
        let e = parse(FIO_3_33_TWO_FILES.as_bytes(), TraceFormat::Fio, &disk(2)).unwrap_err();
        assert_eq!(e.to_string(), "the trace has no writes on disk 2");
    }

    /// `--numjobs=2` with one log: fio 3.33 writes the jobs' sections one
    /// after the other, each with its header and its clock from 0 (the
    /// shape of a real log, shortened).
    #[test]
    fn fio_job_sections_interleave_by_time() {
        let t = fio("fio version 3 iolog\n\
                     29 /tmp/t.img add\n\
                     236 /tmp/t.img open\n\
                     241 /tmp/t.img write 1011712 4096\n\
                     50144 /tmp/t.img write 12419072 4096\n\
                     1000143 /tmp/t.img close\n\
                     fio version 3 iolog\n\
                     23 /tmp/t.img add\n\
                     167 /tmp/t.img open\n\
                     169 /tmp/t.img write 4272128 4096\n\
                     50144 /tmp/t.img write 3047424 4096\n\
                     100080 /tmp/t.img write 10076160 4096\n\
                     1000100 /tmp/t.img close\n")
        .unwrap();
        assert_eq!(
            t.writes,
            vec![
                w(169, 4272128, 4096),
                w(241, 1011712, 4096),
                // Equal times keep the file's order.
                w(50144, 12419072, 4096),
                w(50144, 3047424, 4096),
                w(100080, 10076160, 4096),
            ]
        );
        assert_eq!(t.file_index, vec![0; 5]);
        assert_eq!(t.end_us, 1000143);
    }

    #[test]
    fn fio_version_2_is_refused_for_lack_of_times() {
        let e = fio("fio version 2 iolog\n/dev/sdb add\n/dev/sdb write 0 4096\n").unwrap_err();
        let msg = e.to_string();
        assert!(msg.starts_with("trace line 1: "), "{msg}");
        assert!(
            msg.contains("no timestamps") && msg.contains("version 3"),
            "{msg}"
        );
        let e = fio("fio version 4 iolog\n").unwrap_err();
        assert!(matches!(
            e,
            TraceError::Line {
                line: 1,
                problem: LineProblem::FioVersion,
                ..
            }
        ));
    }

    #[test]
    fn foresnap_export_parses_back() {
        use foresnap_driver::tracking::ring_format::{Record, RecordKind};
        use foresnap_driver::tracking::trace::write_iolog;
        let rec = |seq: u64, time_ms: u32, offset: u64, len: u32, zeroing: bool| Record {
            seq,
            epoch: 1,
            time_ms,
            kind: RecordKind::Write {
                offset,
                len,
                fua: false,
                zeroing,
            },
        };
        let records = [
            rec(1, 100, 0, 4096, false),
            rec(2, 105, 8192, 65536, false),
            Record {
                seq: 3,
                epoch: 1,
                time_ms: 106,
                kind: RecordKind::Close,
            },
            rec(4, 110, 4096, 4096, true),
            rec(5, 2100, 1 << 30, 512, false),
        ];
        let mut out = Vec::new();
        assert_eq!(write_iolog(&records, "/dev/ublkb0", &mut out).unwrap(), 4);
        let t = parse(&out, TraceFormat::Fio, &TraceOptions::default()).unwrap();
        assert_eq!(
            t.writes,
            vec![
                w(0, 0, 4096),
                w(5000, 8192, 65536),
                w(10000, 4096, 4096),
                w(2_000_000, 1 << 30, 512),
            ]
        );
        assert_eq!(t.files, vec!["/dev/ublkb0".to_owned()]);
        assert_eq!(t.skipped, 3); // add, open, close
        assert_eq!(t.end_us, 2_000_000);
        assert_eq!(t.extent, (1 << 30) + 512);
    }

    #[test]
    fn msr_hand_written() {
        let t = msr(
            "Timestamp,Hostname,DiskNumber,Type,Offset,Size,ResponseTime\r\n\
                     128166372003061629,hm,1,Write,3154152960,4096,2346\r\n\
                     128166372003061700,hm,1,Read,0,512,100\r\n\
                     128166372003062629,hm,0,write,8192,16384,50\r\n\
                     \r\n\
                     128166372003072629,hm,1,WRITE,0,0,1\r\n\
                     128166372003082629,hm,1, Write , 4096 , 512\r\n",
        )
        .unwrap();
        assert_eq!(
            t.writes,
            vec![
                w(0, 3154152960, 4096),
                w(100, 8192, 16384),
                w(2100, 4096, 512)
            ]
        );
        assert_eq!(t.file_index, vec![1, 0, 1]);
        assert!(t.files.is_empty());
        // the read and the zero-length write
        assert_eq!(t.skipped, 2);
        assert_eq!(t.end_us, 2100);
        assert_eq!(t.extent, 3154152960 + 4096);
    }

    /// The first record of the MSR Cambridge traces, 128166372003061629,
    /// is 2007-02-22 17:00:00.3061629 UTC: 11644473600 s from 1601 to
    /// 1970, 1172163600 s from 1970 to that hour (13566 days + 17 h).
    #[test]
    fn msr_filetime_by_hand() {
        let start = 128_166_372_003_061_629u64;
        let to_1970 = 11_644_473_600 * 10_000_000;
        assert_eq!(
            start - to_1970,
            (1_172_163_600 * 10_000_000) + 3_061_629,
            "the hand computation"
        );
        assert_eq!((13_566 * 86_400) + (17 * 3_600), 1_172_163_600);
        // 1 h 2 min 3.4567891 s later: 37234567891 ticks.
        let later = start + 37_234_567_891;
        let text = format!("{start},h,0,Write,0,4096,1\n{later},h,0,Write,4096,4096,1\n");
        let t = msr(&text).unwrap();
        assert_eq!(t.writes[1].t_us, 3_723_456_789);
        assert_eq!(t.end_us, 3_723_456_789);
        // Times are relative to the earliest record, even a later line.
        let text = format!("{later},h,0,Write,0,4096,1\n{start},h,0,Read,0,512,1\n");
        let t = msr(&text).unwrap();
        assert_eq!(t.writes, vec![w(3_723_456_789, 0, 4096)]);
    }

    #[test]
    fn msr_disk_filter() {
        let text = "100,h,0,Write,0,4096,1\n\
                    200,h,1,Write,8192,4096,1\n\
                    300,h,2,Read,0,4096,1\n\
                    400,h,0,Write,4096,4096,1\n\
                    900,h,2,Write,0,512,1\n";
        let t = parse(text.as_bytes(), TraceFormat::Msr, &disk(0)).unwrap();
        assert_eq!(t.writes, vec![w(0, 0, 4096), w(30, 4096, 4096)]);
        assert_eq!(t.skipped, 3);
        assert_eq!(t.end_us, 80);
        let t = parse(text.as_bytes(), TraceFormat::Msr, &disk(1)).unwrap();
        assert_eq!(t.writes, vec![w(10, 8192, 4096)]);
        assert_eq!(t.extent, 8192 + 4096);
        let e = parse(text.as_bytes(), TraceFormat::Msr, &disk(7)).unwrap_err();
        assert!(matches!(e, TraceError::NoWritesOnDisk(7)));
        assert_eq!(msr(text).unwrap().writes.len(), 4);
    }

    #[test]
    fn every_bad_line_is_named() {
        use TraceFormat::{Fio, Msr};
        const H: &str = "fio version 3 iolog\n0 f add\n";
        // (format, lines after H for fio, line named, what the message says)
        #[rustfmt::skip]
        let cases: &[(TraceFormat, &str, u64, &str)] = &[
            (Fio, "1 f write 12x 4096\n", 3, "bad offset \"12x\" (expected a byte offset)"),
            (Fio, "1 f write 0 -1\n", 3, "bad length \"-1\""),
            (Fio, "1 f write +0 1\n", 3, "bad offset \"+0\""),
            (Fio, "x f write 0 1\n", 3, "bad timestamp \"x\""),
            (Fio, "\n1 f write 0\n", 4, "expected TIME FILE ACTION"),
            (Fio, "1 f write\n", 3, "need an offset and a length"),
            (Fio, "1 f close 0 4096\n", 3, "take no offset or length"),
            (Fio, "1 f append 0 4096\n", 3, "unknown action \"append\""),
            (Fio, "1 f write 18446744073709551615 2\n", 3, "passes 2^64"),
            (Fio, "1 f write 18446744073709551616 2\n", 3, "bad offset"),
            (Fio, "1 f read 0 4096 7\n", 3, "found 6 fields"),
            (Fio, "fio version 2 iolog\n", 3, "no timestamps"),
            (Msr, "1,h,0,Write,0,4096,1\n1,h,0,Write,0,4096\n1,h,0,Write\n", 3, "expected Timestamp,Hostname"),
            (Msr, "1,h,0,Write,0,4096,1,9\n", 1, "found 8 fields"),
            (Msr, "1,h,0,Flush,0,4096,1\n", 1, "bad type \"Flush\" (expected Read or Write)"),
            (Msr, "1,h,4294967296,Write,0,4096,1\n", 1, "bad disk number"),
            (Msr, "1,h,0,Write,0,,1\n", 1, "bad size \"\""),
            (Msr, "1.5,h,0,Write,0,1,1\n", 1, "bad timestamp \"1.5\""),
            (Msr, "Hostname,h,0,Write,0,1,1\n", 1, "bad timestamp"),
            (Msr, "1,h,0,Write,0,1,1\nTimestamp,h,0,Write,0,1,1\n", 2, "bad timestamp"),
            (Msr, "1,h,0,Write,18446744073709551615,1,1\n", 1, "passes 2^64"),
        ];
        let mut cases: Vec<(TraceFormat, String, u64, &str)> = cases
            .iter()
            .map(|&(f, lines, n, what)| match f {
                Fio => (f, format!("{H}{lines}"), n, what),
                Msr => (f, lines.to_owned(), n, what),
            })
            .collect();
        // Without the header, line 1 is named.
        cases.push((Fio, "0 f add\n".to_owned(), 1, "not a fio iolog"));
        cases.push((
            Fio,
            "\nfio version 3 iolog\n".to_owned(),
            1,
            "not a fio iolog",
        ));
        for (format, text, line, what) in &cases {
            let e = parse(text.as_bytes(), *format, &TraceOptions::default()).unwrap_err();
            let msg = e.to_string();
            assert!(
                matches!(e, TraceError::Line { line: l, .. } if l == *line),
                "{text:?}: {msg}"
            );
            assert!(msg.starts_with(&format!("trace line {line}: ")), "{msg}");
            assert!(msg.contains(what), "{text:?}: {msg}");
            // The message quotes the line.
            let bad = text
                .lines()
                .nth(usize::try_from(*line).unwrap() - 1)
                .unwrap();
            assert!(msg.ends_with(&format!("{:?}", bad.trim())), "{msg}");
        }
    }

    #[test]
    fn error_message_reads_well() {
        let e = fio("fio version 3 iolog\n0 f write 12x 4096\n").unwrap_err();
        assert_eq!(
            e.to_string(),
            "trace line 2: bad offset \"12x\" (expected a byte offset): \"0 f write 12x 4096\""
        );
    }

    #[test]
    fn long_and_binary_lines_are_named() {
        let mut text = b"fio version 3 iolog\n0 f add\n1 f write 0 \xff\xfe\n".to_vec();
        let e = parse(&text, TraceFormat::Fio, &TraceOptions::default()).unwrap_err();
        assert!(
            matches!(
                e,
                TraceError::Line {
                    line: 3,
                    problem: LineProblem::NotUtf8,
                    ..
                }
            ),
            "{e}"
        );
        text.truncate(28);
        text.extend_from_slice(&[b'9'; MAX_LINE * 3]);
        text.extend_from_slice(b" f write 0 1\n");
        let e = parse(&text, TraceFormat::Fio, &TraceOptions::default()).unwrap_err();
        assert!(
            matches!(
                e,
                TraceError::Line {
                    line: 3,
                    problem: LineProblem::TooLong,
                    ..
                }
            ),
            "{e}"
        );
        // The quote is cut.
        assert!(e.to_string().len() < 200, "{e}");
        // The longest line allowed passes, with "\r\n" too.
        let name = "f".repeat(MAX_LINE - "1  write 0 1".len());
        let ok = format!("fio version 3 iolog\r\n1 {name} write 0 1\r\n");
        assert_eq!(fio(&ok).unwrap().writes, vec![w(1, 0, 1)]);
        let long = format!("fio version 3 iolog\r\n1 {name}g write 0 1\r\n");
        assert!(matches!(
            fio(&long),
            Err(TraceError::Line {
                line: 2,
                problem: LineProblem::TooLong,
                ..
            })
        ));
    }

    #[test]
    fn nothing_to_simulate_is_an_error() {
        assert!(matches!(fio(""), Err(TraceError::Empty)));
        assert!(matches!(
            fio("fio version 3 iolog\n"),
            Err(TraceError::Empty)
        ));
        assert!(matches!(msr(""), Err(TraceError::Empty)));
        assert!(matches!(
            msr("Timestamp,Hostname,DiskNumber,Type,Offset,Size,ResponseTime\n\n"),
            Err(TraceError::Empty)
        ));
        let e = fio("fio version 3 iolog\n0 f add\n0 f open\n3 f read 0 4096\n4 f close\n")
            .unwrap_err();
        assert_eq!(e.to_string(), "the trace has no writes");
        let e = fio("fio version 3 iolog\n0 f write 0 0\n").unwrap_err();
        assert!(matches!(e, TraceError::NoWrites));
        assert!(matches!(
            msr("1,h,0,Read,0,4096,1\n"),
            Err(TraceError::NoWrites)
        ));
    }

    #[test]
    fn read_streams_a_file_like_parse() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.iolog");
        std::fs::write(&path, FIO_3_33_RANDRW).unwrap();
        let opts = TraceOptions::default();
        assert_eq!(
            read(&path, TraceFormat::Fio, &opts).unwrap(),
            fio(FIO_3_33_RANDRW).unwrap()
        );
        let missing = dir.path().join("missing.csv");
        let e = read(&missing, TraceFormat::Msr, &opts).unwrap_err();
        assert!(matches!(&e, TraceError::Io { path, .. } if *path == missing));
        assert!(e.to_string().contains("missing.csv"), "{e}");
        // A file with no newline at all is refused without reading it whole.
        std::fs::write(&path, vec![b'7'; 1 << 20]).unwrap();
        let e = read(&path, TraceFormat::Msr, &opts).unwrap_err();
        assert!(matches!(
            e,
            TraceError::Line {
                line: 1,
                problem: LineProblem::TooLong,
                ..
            }
        ));
    }

    #[test]
    fn format_names() {
        assert_eq!("fio".parse::<TraceFormat>().unwrap(), TraceFormat::Fio);
        assert_eq!(" MSR ".parse::<TraceFormat>().unwrap(), TraceFormat::Msr);
        let e = "blktrace".parse::<TraceFormat>().unwrap_err();
        assert_eq!(
            e.to_string(),
            "unknown trace format \"blktrace\" (expected fio or msr)"
        );
        assert_eq!(TraceFormat::Msr.to_string(), "msr");
    }

    /// Writes in time order, rendered in both formats.
    fn render(writes: &[TraceWrite]) -> (String, String) {
        let mut fio = String::from("fio version 3 iolog\n0 v add\n0 v open\n");
        let mut msr = String::from("Timestamp,Hostname,DiskNumber,Type,Offset,Size,ResponseTime\n");
        let base = 128_166_372_000_000_000u64;
        for w in writes {
            fio.push_str(&format!("{} v write {} {}\n", w.t_us, w.offset, w.len));
            fio.push_str(&format!("{} v read {} {}\n", w.t_us, w.offset, w.len));
            let ticks = base + w.t_us * TICKS_PER_US;
            msr.push_str(&format!("{ticks},h,0,Write,{},{},10\n", w.offset, w.len));
        }
        (fio, msr)
    }

    /// Words a field may hold instead of the right one: near misses.
    #[rustfmt::skip]
    const WRONG: &[&str] = &[
        "", "-1", "+1", "x", "1.5", "18446744073709551616", "4294967296", "\u{feff}", "a b",
        "fio version 3 iolog", "fio version 2 iolog", "Timestamp", "append", "ÿ",
    ];
    const ACTIONS: &[&str] = &[
        "add", "open", "close", "read", "write", "trim", "sync", "datasync", "wait",
    ];

    /// One line of a generated trace: a record, and maybe one field
    /// (index `spoil`, when in range) replaced by `wrong`, or the last
    /// fields dropped (`spoil` 7).
    type Gen = (u64, bool, &'static str, u64, u64, u32, usize, &'static str);

    fn gen_line() -> impl proptest::strategy::Strategy<Value = Gen> {
        (
            0u64..1_000,
            proptest::bool::ANY,
            proptest::sample::select(ACTIONS),
            0u64..1 << 20,
            0u64..3,
            0u32..3,
            0usize..60,
            proptest::sample::select(WRONG),
        )
    }

    /// Renders the lines in `format`; returns the text, whether a line was
    /// spoilt, and the writes expected (time, file or disk tag).
    fn render_gen(format: TraceFormat, lines: &[Gen]) -> (String, bool, Vec<(u64, u32)>) {
        let mut text = String::new();
        if format == TraceFormat::Fio {
            text.push_str(FIO_HEADER);
            text.push('\n');
        }
        let (mut spoilt, mut expect) = (false, Vec::new());
        let mut names: Vec<bool> = Vec::new();
        for &(t, name, action, offset, len, disk, spoil, wrong) in lines {
            let len = len * 512;
            let mut f: Vec<String> = match format {
                TraceFormat::Fio => {
                    let file = if name { "g" } else { "f" };
                    let mut f = vec![t.to_string(), file.to_owned(), action.to_owned()];
                    if !matches!(action, "add" | "open" | "close") {
                        f.extend([offset.to_string(), len.to_string()]);
                    }
                    f
                }
                TraceFormat::Msr => {
                    let kind = if matches!(action, "write" | "trim") {
                        "Write"
                    } else {
                        "Read"
                    };
                    [
                        t.to_string(),
                        "h".into(),
                        disk.to_string(),
                        kind.into(),
                        offset.to_string(),
                        len.to_string(),
                        "9".into(),
                    ]
                    .into()
                }
            };
            let write = matches!(action, "write" | "trim") && len > 0;
            if spoil < f.len() {
                f[spoil] = wrong.to_owned();
                spoilt = true;
            } else if spoil == 7 {
                f.truncate(2);
                spoilt = true;
            } else if write {
                let tag = match format {
                    TraceFormat::Fio => {
                        if !names.contains(&name) {
                            names.push(name);
                        }
                        u32::try_from(names.iter().position(|&n| n == name).unwrap()).unwrap()
                    }
                    TraceFormat::Msr => disk,
                };
                expect.push((t, tag));
            } else if format == TraceFormat::Fio && !names.contains(&name) {
                names.push(name);
            }
            let sep = if format == TraceFormat::Fio { " " } else { "," };
            text.push_str(&f.join(sep));
            text.push('\n');
        }
        (text, spoilt, expect)
    }

    proptest::proptest! {
        /// Arbitrary bytes never panic, in either format, filtered or not;
        /// what parses is consistent.
        #[test]
        fn garbage_never_panics(
            bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..512),
            header in proptest::bool::ANY,
        ) {
            let mut input = if header { b"fio version 3 iolog\n".to_vec() } else { Vec::new() };
            input.extend_from_slice(&bytes);
            for format in [TraceFormat::Fio, TraceFormat::Msr] {
                for opts in [TraceOptions::default(), disk(0)] {
                    if let Ok(t) = parse(&input, format, &opts) {
                        proptest::prop_assert!(!t.writes.is_empty());
                        proptest::prop_assert_eq!(t.writes.len(), t.file_index.len());
                        proptest::prop_assert!(t.writes.windows(2).all(|p| p[0].t_us <= p[1].t_us));
                        proptest::prop_assert!(t.writes.iter().all(|w| w.len > 0 && w.offset + w.len <= t.extent && w.t_us <= t.end_us));
                    }
                }
            }
        }

        /// Traces of well-formed lines, some spoilt by one near miss: a
        /// spoilt trace may fail but never panics, and an unspoilt one
        /// gives exactly the writes it holds, stably sorted and filtered.
        #[test]
        fn generated_lines(
            lines in proptest::collection::vec(gen_line(), 0..40),
            msr_format in proptest::bool::ANY,
            keep in proptest::option::of(0u32..3),
        ) {
            let format = if msr_format { TraceFormat::Msr } else { TraceFormat::Fio };
            let (text, spoilt, mut expect) = render_gen(format, &lines);
            let opts = TraceOptions { disk: keep };
            let got = parse(text.as_bytes(), format, &opts);
            if spoilt {
                if let Ok(t) = got {
                    proptest::prop_assert!(t.writes.windows(2).all(|p| p[0].t_us <= p[1].t_us));
                    proptest::prop_assert!(t.writes.iter().all(|w| w.len > 0 && w.offset + w.len <= t.extent && w.t_us <= t.end_us));
                }
                return Ok(());
            }
            expect.retain(|&(_, tag)| keep.is_none_or(|k| k == tag));
            expect.sort_by_key(|&(t, _)| t);
            match got {
                Ok(t) => {
                    let t0 = lines.iter().map(|l| l.0).min().unwrap_or(0);
                    let rebase = |x: u64| if format == TraceFormat::Msr { (x - t0) / TICKS_PER_US } else { x };
                    let want: Vec<(u64, u32)> = expect.iter().map(|&(x, tag)| (rebase(x), tag)).collect();
                    let have: Vec<(u64, u32)> = t.writes.iter().map(|w| w.t_us).zip(t.file_index.iter().copied()).collect();
                    proptest::prop_assert_eq!(have, want);
                    let end = lines.iter().map(|l| l.0).max().unwrap_or(0);
                    proptest::prop_assert_eq!(t.end_us, rebase(end));
                }
                Err(TraceError::Empty) => proptest::prop_assert!(lines.is_empty()),
                Err(TraceError::NoWrites | TraceError::NoWritesOnDisk(_)) => proptest::prop_assert!(expect.is_empty()),
                Err(e) => proptest::prop_assert!(false, "{}", e),
            }
        }

        /// Writes in time order come back as they went in, from both
        /// formats.
        #[test]
        fn round_trip(
            steps in proptest::collection::vec((0u64..5_000_000, 0u64..1 << 40, 1u64..1 << 24), 1..64),
        ) {
            let mut t = 0;
            let writes: Vec<TraceWrite> = steps
                .iter()
                .map(|&(dt, offset, len)| {
                    t += dt;
                    w(t, offset, len)
                })
                .collect();
            let (fio_text, msr_text) = render(&writes);
            let extent = writes.iter().map(|w| w.offset + w.len).max();
            let f = fio(&fio_text).unwrap();
            proptest::prop_assert_eq!(&f.writes, &writes);
            proptest::prop_assert_eq!(f.skipped, 2 + writes.len() as u64);
            proptest::prop_assert_eq!(Some(f.extent), extent);
            let m = msr(&msr_text).unwrap();
            let t0 = writes[0].t_us;
            let moved: Vec<TraceWrite> = writes.iter().map(|x| w(x.t_us - t0, x.offset, x.len)).collect();
            proptest::prop_assert_eq!(&m.writes, &moved);
            proptest::prop_assert_eq!(m.end_us, t - t0);
        }
    }
}
