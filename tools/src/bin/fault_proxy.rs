//! `foresnap-fault-proxy`: an HTTP/1.1 reverse proxy on 127.0.0.1 in front
//! of an S3 server that injects the faults of a bad network and a bad
//! object store, for tests of the S3 destination.
//!
//! Each client connection gets its own thread and is kept alive across
//! requests; each request is read whole (a `Content-Length` body, also an
//! aws-chunked one, or a `Transfer-Encoding: chunked` body, relayed raw)
//! and sent byte for byte, headers untouched (the SigV4 signature covers
//! the `Host` header, which the server checks as received), on a fresh
//! upstream connection; the whole answer is read before the client gets
//! it. With probability `--rate` a request gets one fault, drawn among the
//! `--kinds` that apply to it:
//!
//! | kind | when | what the client sees |
//! |---|---|---|
//! | `500` | before forwarding | 500 InternalError (S3 XML body) |
//! | `503` | before forwarding | 503 ServiceUnavailable |
//! | `slowdown` | before forwarding | 503 SlowDown (throttling) |
//! | `reset` | half before reading the body, half after forwarding | a TCP reset (SO_LINGER 0, close) and no answer |
//! | `timeout` | before forwarding | no answer for `--stall-ms`, then a close |
//! | `truncate` | after forwarding, object GETs | the full `Content-Length`, half the body, a close |
//! | `flip` | after forwarding, object GETs | one body byte changed, length kept |
//! | `flip-put` | before forwarding, object and part PUTs | the server's answer to a body with one byte changed |
//! | `latency` | before forwarding | the answer, `--latency-ms` late |
//!
//! A request stopped before forwarding never reaches the server, so no
//! fault half-applies a put: the server stores a whole request or nothing
//! (request bodies are never cut). A reset after forwarding is the lost
//! answer: the server applied the request, the client must find out on
//! its retry. Damage to answers is limited to object GETs (path-style
//! `GET /BUCKET/KEY`), whose bytes carry their own checksum: a flipped
//! listing would be corruption no client could detect. A drawn `truncate`
//! or `flip` whose answer has no body to damage (an error, a chunked
//! answer) is not injected and not counted.
//!
//! `flip-put` is the one damage to a request: a byte of an object's (or a
//! multipart part's) body changed on its way to the server, the length
//! kept. A client that sends a checksum of the body (Content-MD5, a signed
//! payload hash) has it refused; one that does not has a damaged object
//! stored as if whole.
//!
//! Requests are numbered as they arrive; the fault of request N depends
//! only on `--seed` and N. `--only TEXT` limits faults to the requests
//! whose target contains TEXT. Counts go to `--stats` as JSON every second and
//! on SIGTERM or SIGINT (then the proxy exits).

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, ValueEnum};

/// Fault kinds (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Kind {
    #[value(name = "500")]
    Internal,
    #[value(name = "503")]
    Unavailable,
    #[value(name = "slowdown")]
    SlowDown,
    Reset,
    Timeout,
    Truncate,
    Flip,
    Latency,
    #[value(name = "flip-put")]
    FlipPut,
}

impl Kind {
    fn name(self) -> String {
        self.to_possible_value()
            .map_or_else(String::new, |v| v.get_name().to_owned())
    }

    /// Whether the kind applies to a request: damage to an answer's body
    /// only to object GETs, damage to a request's body only to object PUTs.
    fn applies(self, object_get: bool, object_put: bool) -> bool {
        match self {
            Kind::Truncate | Kind::Flip => object_get,
            Kind::FlipPut => object_put,
            _ => true,
        }
    }
}

fn parse_rate(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(r) if (0.0..=1.0).contains(&r) => Ok(r),
        _ => Err(format!("{s:?} is not a probability between 0 and 1")),
    }
}

/// A fault-injecting HTTP/1.1 proxy for S3 tests (see the source's doc).
#[derive(Debug, Parser)]
#[command(name = "foresnap-fault-proxy")]
struct Args {
    /// The S3 server: http://HOST:PORT.
    #[arg(long)]
    upstream: String,
    /// Where to listen: a loopback address only.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Probability of a fault per request.
    #[arg(long, value_parser = parse_rate)]
    rate: f64,
    /// Fault kinds to draw from, comma-separated [default: all].
    #[arg(long, value_enum, value_delimiter = ',')]
    kinds: Vec<Kind>,
    /// Seed of the fault sequence.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Faults only for requests whose target (path and query) contains
    /// this, e.g. `uploadId=` for the parts and completion of multipart
    /// uploads [default: every request].
    #[arg(long, value_name = "TEXT")]
    only: Option<String>,
    /// How long a `timeout` fault holds the connection before closing it.
    #[arg(long, default_value_t = 10_000)]
    stall_ms: u64,
    /// How late a `latency` fault delivers the answer.
    #[arg(long, default_value_t = 500)]
    latency_ms: u64,
    /// JSON counts, rewritten every second and at exit.
    #[arg(long)]
    stats: Option<PathBuf>,
}

/// How many fault kinds there are.
const KINDS: usize = Kind::FlipPut as usize + 1;

/// Counters, read only to report them: `Relaxed` everywhere (no other
/// memory is published through them).
#[derive(Debug, Default)]
struct Stats {
    requests: AtomicU64,
    faults: [AtomicU64; KINDS],
    /// Resets after the server had answered: requests applied, answer lost.
    reset_after_forward: AtomicU64,
    /// One writer of the stats file at a time (they share its temporary).
    writing: std::sync::Mutex<()>,
}

impl Stats {
    fn count(&self, kind: Kind) {
        self.faults[kind as usize].fetch_add(1, Ordering::Relaxed);
    }

    fn json(&self) -> String {
        let faults: serde_json::Map<String, serde_json::Value> = Kind::value_variants()
            .iter()
            .map(|&k| {
                (
                    k.name(),
                    self.faults[k as usize].load(Ordering::Relaxed).into(),
                )
            })
            .collect();
        serde_json::json!({
            "requests": self.requests.load(Ordering::Relaxed),
            "faults": faults,
            "reset_after_forward": self.reset_after_forward.load(Ordering::Relaxed),
        })
        .to_string()
    }

    /// Replaces `path` whole (a reader never sees half a file); returns
    /// holding the file, so that nothing rewrites it before an exit.
    fn write(&self, path: &std::path::Path) -> std::sync::MutexGuard<'_, ()> {
        let guard = self.writing.lock().unwrap_or_else(|p| p.into_inner());
        let tmp = path.with_extension("tmp");
        let r = std::fs::write(&tmp, self.json() + "\n").and_then(|()| std::fs::rename(&tmp, path));
        if let Err(e) = r {
            eprintln!("fault-proxy: cannot write {}: {e}", path.display());
        }
        guard
    }
}

#[derive(Debug)]
struct Proxy {
    upstream: SocketAddr,
    rate: f64,
    kinds: Vec<Kind>,
    seed: u64,
    only: Option<String>,
    stall: Duration,
    latency: Duration,
    stats: Stats,
}

/// splitmix64: a well-mixed 64-bit value from a counter.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A fault drawn for one request, with random bits for its details.
#[derive(Debug, Clone, Copy)]
struct Fault {
    kind: Kind,
    bits: u64,
}

impl Proxy {
    /// The fault of request `n`, if any, among the kinds that apply.
    fn draw(&self, n: u64, object_get: bool, object_put: bool) -> Option<Fault> {
        let a = mix(self.seed ^ mix(n));
        let b = mix(a);
        // 53 random bits as a uniform value in [0, 1).
        let u = (a >> 11) as f64 / (1u64 << 53) as f64;
        let eligible: Vec<Kind> = self
            .kinds
            .iter()
            .copied()
            .filter(|k| k.applies(object_get, object_put))
            .collect();
        if u >= self.rate || eligible.is_empty() {
            return None;
        }
        let i = usize::try_from(b % eligible.len() as u64).unwrap_or(0);
        Some(Fault {
            kind: eligible[i],
            bits: mix(b),
        })
    }
}

/// A request or an answer: its head (start line and headers, as received)
/// and its body (as framed on the wire).
#[derive(Debug, Default)]
struct Message {
    head: Vec<u8>,
    body: Vec<u8>,
    /// The start line's words.
    start: Vec<String>,
    /// Header names lowercased, values trimmed.
    headers: Vec<(String, String)>,
}

impl Message {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    fn has_token(&self, name: &str, token: &str) -> bool {
        self.header(name)
            .is_some_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    }

    fn chunked(&self) -> bool {
        self.has_token("transfer-encoding", "chunked")
    }

    fn content_length(&self) -> io::Result<Option<usize>> {
        self.header("content-length")
            .map(|v| {
                v.parse()
                    .map_err(|_| bad(format!("bad Content-Length {v:?}")))
            })
            .transpose()
    }

    fn write_to(&self, w: &mut impl Write) -> io::Result<()> {
        w.write_all(&self.head)?;
        w.write_all(&self.body)?;
        w.flush()
    }
}

fn bad(why: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, why)
}

/// Longest head accepted (S3 heads are a few KiB).
const MAX_HEAD: usize = 64 << 10;

/// Reads a head; `None` on a clean end of stream before it.
fn read_head(r: &mut impl BufRead) -> io::Result<Option<Message>> {
    let mut m = Message::default();
    loop {
        let start = m.head.len();
        let n = r
            .by_ref()
            .take(MAX_HEAD as u64)
            .read_until(b'\n', &mut m.head)?;
        if n == 0 {
            return if m.head.is_empty() {
                Ok(None)
            } else {
                Err(bad("end of stream in a head".into()))
            };
        }
        if m.head.len() >= MAX_HEAD {
            return Err(bad("head too long".into()));
        }
        let line = String::from_utf8_lossy(&m.head[start..]);
        let line = line.trim_end_matches(['\r', '\n']);
        if line.is_empty() {
            if m.start.is_empty() {
                return Err(bad("no start line".into()));
            }
            return Ok(Some(m));
        }
        if m.start.is_empty() {
            m.start = line.split(' ').map(str::to_owned).collect();
        } else if let Some((k, v)) = line.split_once(':') {
            m.headers
                .push((k.trim().to_ascii_lowercase(), v.trim().to_owned()));
        }
    }
}

/// Reads a chunked body raw, trailers included.
fn read_chunked(r: &mut impl BufRead, out: &mut Vec<u8>) -> io::Result<()> {
    loop {
        let start = out.len();
        r.read_until(b'\n', out)?;
        let line = String::from_utf8_lossy(&out[start..]);
        let size = line.split([';', '\r', '\n']).next().unwrap_or("").trim();
        let size =
            usize::from_str_radix(size, 16).map_err(|_| bad(format!("bad chunk size {size:?}")))?;
        if size == 0 {
            // Trailers, up to an empty line.
            loop {
                let start = out.len();
                if r.read_until(b'\n', out)? == 0 || out[start..].trim_ascii().is_empty() {
                    return Ok(());
                }
            }
        }
        let start = out.len();
        out.resize(start + size + 2, 0);
        r.read_exact(&mut out[start..])?;
    }
}

/// Reads the body `m`'s head announces (`until_eof`: an answer with
/// neither length nor chunks runs to the end of the stream).
fn read_body(r: &mut impl BufRead, m: &mut Message, until_eof: bool) -> io::Result<()> {
    if m.chunked() {
        read_chunked(r, &mut m.body)
    } else if let Some(n) = m.content_length()? {
        m.body.resize(n, 0);
        r.read_exact(&mut m.body)
    } else if until_eof {
        r.read_to_end(&mut m.body).map(drop)
    } else {
        Ok(())
    }
}

/// Closes with a TCP reset instead of a FIN.
fn reset(s: &TcpStream) {
    use std::os::fd::AsRawFd;
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt(2) on a socket this thread owns, with a pointer
    // to a live `linger` and its exact size; it only sets a socket option.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const linger).cast(),
            libc::socklen_t::try_from(std::mem::size_of::<libc::linger>()).unwrap_or(8),
        );
    }
}

/// An S3 error answer to a `method` request (a HEAD's has no body).
fn s3_error(method: &str, status: &str, code: &str) -> Vec<u8> {
    let body = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>{code}</Code>\
         <Message>injected by foresnap-fault-proxy</Message></Error>"
    );
    let mut m = format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/xml\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    if method != "HEAD" {
        m.push_str(&body);
    }
    m.into_bytes()
}

/// Sends `req` to the server on a new connection; its answer.
fn forward(p: &Proxy, req: &Message) -> io::Result<Message> {
    let up = TcpStream::connect_timeout(&p.upstream, Duration::from_secs(5))?;
    up.set_read_timeout(Some(Duration::from_secs(300)))?;
    req.write_to(&mut &up)?;
    let mut r = BufReader::new(&up);
    loop {
        let mut m = read_head(&mut r)?.ok_or_else(|| bad("no answer".into()))?;
        let status: u16 = m.start.get(1).and_then(|s| s.parse().ok()).unwrap_or(0);
        // An interim answer (100 Continue): the client had its own.
        if (100..200).contains(&status) {
            continue;
        }
        let bodiless = req.start[0] == "HEAD" || status == 204 || status == 304;
        if !bodiless {
            read_body(&mut r, &mut m, true)?;
        }
        return Ok(m);
    }
}

/// Serves one client connection until it closes.
fn serve(p: &Proxy, client: TcpStream) -> io::Result<()> {
    let mut r = BufReader::new(&client);
    let mut w = &client;
    while let Some(mut req) = read_head(&mut r)? {
        let n = p.stats.requests.fetch_add(1, Ordering::Relaxed);
        let method = req.start[0].clone();
        let target = req.start.get(1).cloned().unwrap_or_default();
        let path = target.split('?').next().unwrap_or("");
        let has_key = path
            .trim_start_matches('/')
            .split_once('/')
            .is_some_and(|(_, key)| !key.is_empty());
        let object_get = method == "GET" && has_key;
        // A put with a body of its own (not a server-side copy); whether
        // it has 2 bytes or more is known once the body is read.
        let object_put = method == "PUT"
            && has_key
            && req.header("x-amz-copy-source").is_none()
            && req.content_length()?.is_some_and(|n| n >= 2);
        let targeted = p.only.as_ref().is_none_or(|t| target.contains(t.as_str()));
        let fault = targeted
            .then(|| p.draw(n, object_get, object_put))
            .flatten();
        let kind = fault.map(|f| f.kind);
        let bits = fault.map_or(0, |f| f.bits);
        let note = |what: &str| eprintln!("fault-proxy: #{n} {method} {target}: {what}");
        let reset_first = bits & 1 == 0;
        if kind == Some(Kind::Reset) && reset_first {
            p.stats.count(Kind::Reset);
            note("reset before the body");
            reset(&client);
            return Ok(());
        }
        if req.has_token("expect", "100-continue") {
            w.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
        }
        read_body(&mut r, &mut req, false)?;
        if kind == Some(Kind::FlipPut) && req.body.len() >= 2 {
            p.stats.count(Kind::FlipPut);
            let at = usize::try_from(bits >> 8).unwrap_or(0) % req.body.len();
            // Never 0: the byte changes.
            req.body[at] ^= u8::try_from(bits % 255 + 1).unwrap_or(1);
            note(&format!("flipped byte {at} of the request body"));
        }
        let close = req.has_token("connection", "close")
            || req.start.get(2).is_some_and(|v| v == "HTTP/1.0");
        let error = match kind {
            Some(Kind::Internal) => Some(("500 Internal Server Error", "InternalError")),
            Some(Kind::Unavailable) => Some(("503 Service Unavailable", "ServiceUnavailable")),
            Some(Kind::SlowDown) => Some(("503 Slow Down", "SlowDown")),
            _ => None,
        };
        if let (Some((status, code)), Some(k)) = (error, kind) {
            p.stats.count(k);
            note(code);
            w.write_all(&s3_error(&method, status, code))?;
            w.flush()?;
            if close {
                return Ok(());
            }
            continue;
        }
        match kind {
            Some(Kind::Timeout) => {
                p.stats.count(Kind::Timeout);
                note("stall");
                std::thread::sleep(p.stall);
                return client.shutdown(Shutdown::Both);
            }
            Some(Kind::Latency) => {
                p.stats.count(Kind::Latency);
                note("latency");
                std::thread::sleep(p.latency);
            }
            _ => {}
        }
        let mut resp = match forward(p, &req) {
            Ok(m) => m,
            Err(e) => {
                eprintln!("fault-proxy: #{n} {method} {target}: upstream: {e}");
                w.write_all(&s3_error(&method, "502 Bad Gateway", "BadGateway"))?;
                return Ok(());
            }
        };
        let status = resp.start.get(1).map_or("", String::as_str);
        let bodiless = method == "HEAD" || status == "204" || status == "304";
        let damageable = object_get
            && matches!(status, "200" | "206")
            && !resp.chunked()
            && resp.body.len() >= 2;
        match kind {
            Some(Kind::Reset) => {
                p.stats.count(Kind::Reset);
                p.stats.reset_after_forward.fetch_add(1, Ordering::Relaxed);
                note("reset after the server answered");
                reset(&client);
                return Ok(());
            }
            Some(Kind::Truncate) if damageable => {
                p.stats.count(Kind::Truncate);
                note("truncated");
                w.write_all(&resp.head)?;
                w.write_all(&resp.body[..resp.body.len() / 2])?;
                w.flush()?;
                return client.shutdown(Shutdown::Both);
            }
            Some(Kind::Flip) if damageable => {
                p.stats.count(Kind::Flip);
                let at = usize::try_from(bits >> 8).unwrap_or(0) % resp.body.len();
                // Never 0: the byte changes.
                resp.body[at] ^= u8::try_from(bits % 255 + 1).unwrap_or(1);
                note(&format!("flipped byte {at}"));
            }
            _ => {}
        }
        resp.write_to(&mut w)?;
        // An answer framed by the end of its stream ends with the connection.
        let eof_framed = !bodiless && resp.content_length()?.is_none() && !resp.chunked();
        if close || eof_framed || resp.has_token("connection", "close") {
            return Ok(());
        }
    }
    Ok(())
}

fn main() -> std::process::ExitCode {
    match run(Args::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("foresnap-fault-proxy: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    if !args.listen.ip().is_loopback() {
        bail!(
            "--listen {}: only loopback addresses are allowed",
            args.listen
        );
    }
    let hostport = args
        .upstream
        .strip_prefix("http://")
        .with_context(|| format!("--upstream {:?}: use http://HOST:PORT", args.upstream))?
        .trim_end_matches('/');
    let upstream = hostport
        .to_socket_addrs()
        .with_context(|| format!("--upstream {:?}", args.upstream))?
        .next()
        .with_context(|| format!("--upstream {:?}: no address", args.upstream))?;
    let listener =
        TcpListener::bind(args.listen).with_context(|| format!("bind {}", args.listen))?;
    let proxy = Arc::new(Proxy {
        upstream,
        rate: args.rate,
        kinds: if args.kinds.is_empty() {
            Kind::value_variants().to_vec()
        } else {
            let mut k = args.kinds;
            k.sort_by_key(|&k| k as u8);
            k.dedup();
            k
        },
        seed: args.seed,
        only: args.only,
        stall: Duration::from_millis(args.stall_ms),
        latency: Duration::from_millis(args.latency_ms),
        stats: Stats::default(),
    });
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
    ])
    .context("cannot install signal handlers")?;
    {
        let (p, path) = (proxy.clone(), args.stats.clone());
        std::thread::spawn(move || {
            if signals.forever().next().is_some() {
                let _held = path.as_ref().map(|path| p.stats.write(path));
                std::process::exit(0);
            }
        });
    }
    if let Some(path) = args.stats {
        let p = proxy.clone();
        drop(p.stats.write(&path));
        std::thread::spawn(move || {
            loop {
                std::thread::sleep(Duration::from_secs(1));
                drop(p.stats.write(&path));
            }
        });
    }
    println!("listening http://{}", listener.local_addr()?);
    io::stdout().flush()?;
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        let p = proxy.clone();
        std::thread::spawn(move || {
            if let Err(e) = serve(&p, conn) {
                // A client that went away mid-request is no news.
                if e.kind() != io::ErrorKind::ConnectionReset
                    && e.kind() != io::ErrorKind::BrokenPipe
                {
                    eprintln!("fault-proxy: connection: {e}");
                }
            }
        });
    }
    Ok(())
}
