//! The S3-compatible destination: `s3://BUCKET/PREFIX?endpoint=URL&region=R`.
//!
//! Built on aws-sdk-s3. The SDK is async; a [`S3Destination`] owns a small
//! tokio runtime and its methods block on it, so the upload workers (plain
//! threads, see [`crate::engine`]) call it like any other destination, and
//! several workers can have requests in flight at once.
//!
//! - Credentials: the standard AWS chain (environment, shared profile
//!   files with `AWS_PROFILE`, web identity, container and instance
//!   metadata), checked when the destination is opened.
//! - Nothing is overwritten: every put is conditional (`If-None-Match: *`;
//!   a 412 answer means the key exists). Objects above
//!   [`MULTIPART_THRESHOLD`] go up in parts, concurrently, and the
//!   completion is conditional as well; a failed multipart upload is
//!   aborted. Between *concurrent* writers of one key this is only as
//!   atomic as the server: seen in this project's tests, SeaweedFS 4.48
//!   gave one winner among racing puts but several among racing multipart
//!   completions, and s3s-fs 0.14.1 (check, then rename) let most racers
//!   through. One process writes a volume's keys (its ring is locked),
//!   keys are deterministic and content is verified on every read, so a
//!   replacement by a racing writer can never pass as data.
//! - Retries: the SDK's standard mode (exponential backoff with full
//!   jitter, [`MAX_ATTEMPTS`] attempts) for throttling, 5xx and transport
//!   errors; the upload engine backs off and retries whole objects above
//!   that. Connect, read and per-attempt timeouts bound a stalled server
//!   (`timeout=SECONDS` sets the read timeout, the attempt's is 4 times
//!   that). A put whose answer was lost is retried by the SDK and finds
//!   its own object: [`DestError::AlreadyExists`], and the writer checks
//!   what is there ([`crate::restore::SnapshotWriter`] keeps a whole
//!   object of its chunk). The SDK does not retry a body that breaks off
//!   after the answer's head: a get reads again ([`MAX_ATTEMPTS`] in all).
//! - Integrity: every object carries its own crc32c, verified on every
//!   read, so the SDK's optional transfer checksums are only used where
//!   the API requires them (several S3-compatible servers reject the
//!   newer trailer checksums). Bytes damaged in transit fail the reader's
//!   check ([`Destination::get_valid`]): they are read again, with
//!   backoff, and only bytes that fail every attempt are handed back, for
//!   the check to report the object damaged.
//! - A put's body is sent with its `Content-MD5` (S3 and SeaweedFS check
//!   it; a server that does not is no worse off): without it, bytes damaged on the way in were
//!   stored as the object, and the snapshot, complete by its manifest,
//!   could not be restored (the SDK signs no payload hash over plain
//!   HTTP either). A body refused as damaged (`BadDigest`) is sent again,
//!   with backoff, [`MAX_ATTEMPTS`] times in all.

use std::time::Duration;

use aws_config::BehaviorVersion;
use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_sdk_s3::Client;
use aws_sdk_s3::config::{
    ProvideCredentials, Region, RequestChecksumCalculation, ResponseChecksumValidation,
};
use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};

use crate::dest::{DestError, Destination, check_key};

/// Objects larger than this are sent as a multipart upload.
pub const MULTIPART_THRESHOLD: usize = 16 << 20;
/// Part size of a multipart upload (S3's minimum is 5 MiB).
pub const PART_BYTES: usize = 8 << 20;
/// Attempts per request, the first included.
pub const MAX_ATTEMPTS: u32 = 5;
/// Parts of one multipart upload in flight at once.
const PARTS_IN_FLIGHT: usize = 4;
/// Default read timeout, in seconds (`timeout=` in the URL sets it).
pub const READ_TIMEOUT_S: u32 = 30;
/// A request's attempt may take this many read timeouts (by default
/// 120 s: an 8 MiB part at 70 KiB/s).
pub const ATTEMPT_PER_READ: u32 = 4;
/// First wait before a get reads an object again (doubled each time).
const REREAD_BACKOFF: Duration = Duration::from_millis(100);

/// A parsed `s3://` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Url {
    pub bucket: String,
    /// Key prefix without a trailing '/'; may be empty.
    pub prefix: String,
    /// `endpoint=URL`: an S3-compatible server; AWS when absent.
    pub endpoint: Option<String>,
    /// `region=R`; else the AWS chain's region, else `us-east-1`.
    pub region: Option<String>,
    /// `path-style=true|false`: bucket in the path, not the host name.
    /// Default: on with an explicit endpoint (most S3-compatible servers,
    /// and any endpoint given by IP address, need it), off for AWS.
    pub path_style: bool,
    /// `timeout=SECONDS`: the read timeout ([`READ_TIMEOUT_S`] when
    /// absent); a request's attempt may take [`ATTEMPT_PER_READ`] times it.
    pub timeout_s: Option<u32>,
}

impl S3Url {
    /// Parses `s3://BUCKET[/PREFIX][?endpoint=URL&region=R&path-style=B&timeout=S]`.
    pub fn parse(url: &str) -> Result<S3Url, String> {
        let bad = |why: &str| {
            format!(
                "invalid destination {url:?}: {why} \
                 (use s3://BUCKET/PREFIX?endpoint=URL&region=R)"
            )
        };
        let rest = url
            .strip_prefix("s3://")
            .ok_or_else(|| bad("not an s3:// URL"))?;
        let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
        let (bucket, prefix) = path.split_once('/').unwrap_or((path, ""));
        // S3's bucket naming rules (the portable subset).
        let bucket_ok = (3..=63).contains(&bucket.len())
            && bucket
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
            && !bucket.starts_with(['-', '.'])
            && !bucket.ends_with(['-', '.']);
        if !bucket_ok {
            return Err(bad(
                "the bucket name must be 3-63 lowercase letters, digits, '-' or '.'",
            ));
        }
        let prefix = prefix.trim_end_matches('/').to_owned();
        if !prefix.is_empty() {
            check_key(&prefix).map_err(|_| {
                bad("the prefix may hold letters, digits, '.', '_', '-' and '/' between non-empty parts")
            })?;
        }
        let mut u = S3Url {
            bucket: bucket.to_owned(),
            prefix,
            endpoint: None,
            region: None,
            path_style: false,
            timeout_s: None,
        };
        let mut path_style = None;
        for kv in query.split('&').filter(|s| !s.is_empty()) {
            let (k, v) = kv
                .split_once('=')
                .ok_or_else(|| bad(&format!("{kv:?} is not KEY=VALUE")))?;
            let v = percent_decode(v).ok_or_else(|| bad(&format!("bad %-escape in {kv:?}")))?;
            match k {
                "endpoint" => {
                    if !(v.starts_with("http://") || v.starts_with("https://")) {
                        return Err(bad("endpoint must start with http:// or https://"));
                    }
                    u.endpoint = Some(v.trim_end_matches('/').to_owned());
                }
                "region" if !v.is_empty() => u.region = Some(v),
                "path-style" | "path_style" => {
                    path_style = Some(match v.as_str() {
                        "true" | "1" | "yes" => true,
                        "false" | "0" | "no" => false,
                        _ => return Err(bad("path-style takes true or false")),
                    });
                }
                "timeout" => match v.parse::<u32>() {
                    Ok(s) if (1..=3600).contains(&s) => u.timeout_s = Some(s),
                    _ => return Err(bad("timeout takes whole seconds from 1 to 3600")),
                },
                _ => {
                    return Err(bad(&format!(
                        "unknown option {k:?} (known: endpoint, region, path-style, timeout)"
                    )));
                }
            }
        }
        u.path_style = path_style.unwrap_or(u.endpoint.is_some());
        Ok(u)
    }

    /// The canonical form, for messages.
    pub fn display(&self) -> String {
        let mut s = format!("s3://{}", self.bucket);
        if !self.prefix.is_empty() {
            s.push('/');
            s.push_str(&self.prefix);
        }
        if let Some(e) = &self.endpoint {
            s.push_str(&format!(" at {e}"));
        }
        s
    }
}

fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// An access key, given explicitly instead of the AWS chain's.
#[derive(Clone)]
pub struct S3Credentials {
    pub access_key_id: String,
    pub secret_access_key: String,
}

impl std::fmt::Debug for S3Credentials {
    // Never the secret, not even in a debug log.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Credentials")
            .field("access_key_id", &self.access_key_id)
            .finish_non_exhaustive()
    }
}

/// See the module doc.
#[derive(Debug)]
pub struct S3Destination {
    url: S3Url,
    client: Client,
    rt: tokio::runtime::Runtime,
}

/// The HTTP status of a failed request, if the server answered.
fn status<E>(e: &SdkError<E, aws_sdk_s3::config::http::HttpResponse>) -> Option<u16> {
    e.raw_response().map(|r| r.status().as_u16())
}

/// Whether the server refused a body as damaged in transit: its
/// `Content-MD5` did not match the bytes received.
fn bad_digest<E: ProvideErrorMetadata>(e: &SdkError<E>) -> bool {
    e.as_service_error()
        .and_then(ProvideErrorMetadata::code)
        .is_some_and(|c| c == "BadDigest" || c == "InvalidDigest")
}

/// The `Content-MD5` header of `body`: its MD5, base64.
fn content_md5(body: &[u8]) -> String {
    use base64::Engine as _;
    use md5::Digest as _;
    base64::engine::general_purpose::STANDARD.encode(md5::Md5::digest(body))
}

/// Sends what `send` builds until the server stops refusing the body as
/// damaged in transit, waiting [`REREAD_BACKOFF`] doubled in between,
/// [`MAX_ATTEMPTS`] times at most; the last answer.
async fn resend_damaged<T, E, F, Fut>(what: &str, mut send: F) -> Result<T, SdkError<E>>
where
    E: ProvideErrorMetadata,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, SdkError<E>>>,
{
    let mut wait = REREAD_BACKOFF;
    let mut attempt = 1;
    loop {
        let r = send().await;
        match &r {
            Err(e) if bad_digest(e) && attempt < MAX_ATTEMPTS => {
                log::warn!("{what}: the body arrived damaged; sending it again in {wait:?}");
                tokio::time::sleep(wait).await;
                wait *= 2;
                attempt += 1;
            }
            _ => return r,
        }
    }
}

impl S3Destination {
    /// Connects to the bucket of `url` with the credentials of the
    /// standard AWS chain: see [`S3Destination::open_with`].
    pub fn open(url: S3Url) -> Result<S3Destination, DestError> {
        Self::open_with(url, None)
    }

    /// Connects to the bucket of `url`: loads credentials (`creds`, or the
    /// standard AWS chain) and checks that the bucket answers, so that a
    /// wrong endpoint, bucket or key is reported here, once, and not by
    /// every upload. Explicit credentials are for a destination whose
    /// owner is not the process (a tenant's own keys).
    pub fn open_with(url: S3Url, creds: Option<S3Credentials>) -> Result<S3Destination, DestError> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("s3-io")
            .enable_all()
            .build()
            .map_err(|e| DestError::Io {
                dest: url.display(),
                op: "start the S3 runtime for",
                key: String::new(),
                error: e,
            })?;
        let shown = url.display();
        let fail = |op: &'static str, why: String| DestError::Remote {
            dest: shown.clone(),
            op,
            key: String::new(),
            why,
        };
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .retry_config(
                RetryConfig::standard()
                    .with_max_attempts(MAX_ATTEMPTS)
                    .with_initial_backoff(Duration::from_millis(200))
                    .with_max_backoff(Duration::from_secs(10)),
            )
            .timeout_config({
                let read = url.timeout_s.unwrap_or(READ_TIMEOUT_S);
                TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(5))
                    .read_timeout(Duration::from_secs(read.into()))
                    .operation_attempt_timeout(Duration::from_secs(
                        (read * ATTEMPT_PER_READ).into(),
                    ))
                    .build()
            });
        if let Some(r) = &url.region {
            loader = loader.region(Region::new(r.clone()));
        }
        if let Some(c) = creds {
            loader = loader.credentials_provider(aws_sdk_s3::config::Credentials::new(
                c.access_key_id,
                c.secret_access_key,
                None,
                None,
                "foresnap",
            ));
        }
        let sdk = rt.block_on(loader.load());
        let provider = sdk.credentials_provider().ok_or_else(|| {
            fail(
                "find credentials for",
                "no AWS credential provider is configured".into(),
            )
        })?;
        rt.block_on(provider.provide_credentials()).map_err(|e| {
            fail(
                "find credentials for",
                format!(
                    "{} (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE)",
                    DisplayErrorContext(&e)
                ),
            )
        })?;
        let mut b = aws_sdk_s3::config::Builder::from(&sdk)
            .force_path_style(url.path_style)
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired);
        if sdk.region().is_none() {
            b = b.region(Region::new("us-east-1"));
        }
        if let Some(e) = &url.endpoint {
            b = b.endpoint_url(e);
        }
        let client = Client::from_conf(b.build());
        let d = S3Destination { url, client, rt };
        d.rt.block_on(d.client.head_bucket().bucket(&d.url.bucket).send())
            .map_err(|e| {
                let why = match status(&e) {
                    Some(404) => "no such bucket".to_owned(),
                    Some(403) => "access denied (check the credentials)".to_owned(),
                    _ => DisplayErrorContext(&e).to_string(),
                };
                fail("open bucket", why)
            })?;
        Ok(d)
    }

    /// The parsed URL.
    pub fn s3_url(&self) -> &S3Url {
        &self.url
    }

    fn full_key(&self, key: &str) -> Result<String, DestError> {
        check_key(key)?;
        Ok(if self.url.prefix.is_empty() {
            key.to_owned()
        } else {
            format!("{}/{key}", self.url.prefix)
        })
    }

    fn remote<E>(&self, op: &'static str, key: &str, e: &SdkError<E>) -> DestError
    where
        E: std::error::Error + ProvideErrorMetadata + 'static,
    {
        let why = match e {
            SdkError::ServiceError(s) => format!(
                "HTTP {}: {}",
                s.raw().status().as_u16(),
                s.err().message().or(s.err().code()).unwrap_or("no message")
            ),
            other => DisplayErrorContext(other).to_string(),
        };
        DestError::Remote {
            dest: self.url(),
            op,
            key: key.to_owned(),
            why,
        }
    }

    fn exists(&self, key: &str) -> DestError {
        DestError::AlreadyExists {
            dest: self.url(),
            key: key.to_owned(),
        }
    }

    /// One GET of `full`; a failure comes with whether reading again may
    /// help (the body broke off: the SDK retried the request, not that).
    async fn get_once(&self, full: &str, key: &str) -> Result<Vec<u8>, (DestError, bool)> {
        let out = match self
            .client
            .get_object()
            .bucket(&self.url.bucket)
            .key(full)
            .send()
            .await
        {
            Ok(o) => o,
            Err(e) if status(&e) == Some(404) => {
                let e = DestError::NotFound {
                    dest: self.url(),
                    key: key.to_owned(),
                };
                return Err((e, false));
            }
            Err(e) => return Err((self.remote("get", key, &e), false)),
        };
        let broken = |why: String| {
            let e = DestError::Remote {
                dest: self.url(),
                op: "read",
                key: key.to_owned(),
                why,
            };
            (e, true)
        };
        let expected = out.content_length();
        let body = out
            .body
            .collect()
            .await
            .map_err(|e| broken(DisplayErrorContext(&e).to_string()))?;
        let bytes: Vec<u8> = body.into_bytes().into();
        match expected {
            Some(n) if u64::try_from(n).ok() != Some(bytes.len() as u64) => Err(broken(format!(
                "the body has {} bytes, Content-Length said {n}",
                bytes.len()
            ))),
            _ => Ok(bytes),
        }
    }

    async fn put_multipart(&self, full: &str, key: &str, bytes: &[u8]) -> Result<(), DestError> {
        let created = self
            .client
            .create_multipart_upload()
            .bucket(&self.url.bucket)
            .key(full)
            .send()
            .await
            .map_err(|e| self.remote("start multipart upload of", key, &e))?;
        let id = created.upload_id().unwrap_or_default().to_owned();
        let result = self.send_parts(full, key, &id, bytes).await;
        if result.is_err() {
            // Leave no parts behind (they are billed); the error that
            // matters is the first one.
            let _ = self
                .client
                .abort_multipart_upload()
                .bucket(&self.url.bucket)
                .key(full)
                .upload_id(&id)
                .send()
                .await;
        }
        result
    }

    async fn send_parts(
        &self,
        full: &str,
        key: &str,
        id: &str,
        bytes: &[u8],
    ) -> Result<(), DestError> {
        let mut parts = Vec::new();
        for (i, window) in bytes.chunks(PART_BYTES * PARTS_IN_FLIGHT).enumerate() {
            let mut set = tokio::task::JoinSet::new();
            for (j, part) in window.chunks(PART_BYTES).enumerate() {
                let number = i32::try_from(i * PARTS_IN_FLIGHT + j + 1).unwrap_or(i32::MAX);
                let (client, bucket, full, id) = (
                    self.client.clone(),
                    self.url.bucket.clone(),
                    full.to_owned(),
                    id.to_owned(),
                );
                let (md5, part) = (content_md5(part), part.to_vec());
                let what = format!("{}: part {number} of {key}", self.url());
                set.spawn(async move {
                    let send = || {
                        client
                            .upload_part()
                            .bucket(&bucket)
                            .key(&full)
                            .upload_id(&id)
                            .part_number(number)
                            .content_md5(&md5)
                            .body(ByteStream::from(part.clone()))
                            .send()
                    };
                    (number, resend_damaged(&what, send).await)
                });
            }
            while let Some(done) = set.join_next().await {
                let (number, r) = done.map_err(|e| DestError::Remote {
                    dest: self.url(),
                    op: "upload a part of",
                    key: key.to_owned(),
                    why: e.to_string(),
                })?;
                let out = r.map_err(|e| self.remote("upload a part of", key, &e))?;
                parts.push(
                    CompletedPart::builder()
                        .part_number(number)
                        .set_e_tag(out.e_tag().map(str::to_owned))
                        .build(),
                );
            }
        }
        parts.sort_by_key(|p| p.part_number());
        let r = self
            .client
            .complete_multipart_upload()
            .bucket(&self.url.bucket)
            .key(full)
            .upload_id(id)
            .if_none_match("*")
            .multipart_upload(
                CompletedMultipartUpload::builder()
                    .set_parts(Some(parts))
                    .build(),
            )
            .send()
            .await;
        match r {
            Ok(_) => Ok(()),
            Err(e) if status(&e) == Some(412) => Err(self.exists(key)),
            Err(e) => Err(self.remote("complete multipart upload of", key, &e)),
        }
    }
}

impl Destination for S3Destination {
    fn put(&self, key: &str, bytes: &[u8]) -> Result<(), DestError> {
        let full = self.full_key(key)?;
        if bytes.len() > MULTIPART_THRESHOLD {
            // A multipart upload is long: do not start one for a key that
            // is there already.
            let head = self.rt.block_on(
                self.client
                    .head_object()
                    .bucket(&self.url.bucket)
                    .key(&full)
                    .send(),
            );
            match head {
                Ok(_) => return Err(self.exists(key)),
                Err(e) if status(&e) == Some(404) => {}
                Err(e) => return Err(self.remote("check", key, &e)),
            }
            return self.rt.block_on(self.put_multipart(&full, key, bytes));
        }
        let md5 = content_md5(bytes);
        let send = || {
            self.client
                .put_object()
                .bucket(&self.url.bucket)
                .key(&full)
                .if_none_match("*")
                .content_md5(&md5)
                .body(ByteStream::from(bytes.to_vec()))
                .send()
        };
        let what = format!("{}: put {key}", self.url());
        let r = self.rt.block_on(resend_damaged(&what, send));
        match r {
            Ok(_) => Ok(()),
            Err(e) if status(&e) == Some(412) => Err(self.exists(key)),
            Err(e) => Err(self.remote("put", key, &e)),
        }
    }

    fn get(&self, key: &str) -> Result<Vec<u8>, DestError> {
        self.get_valid(key, &|_| true)
    }

    /// Reads again what broke off or failed `valid` in transit; see the
    /// module doc.
    fn get_valid(&self, key: &str, valid: &dyn Fn(&[u8]) -> bool) -> Result<Vec<u8>, DestError> {
        let full = self.full_key(key)?;
        self.rt.block_on(async {
            let mut wait = REREAD_BACKOFF;
            let mut attempt = 1;
            loop {
                let last = attempt == MAX_ATTEMPTS;
                let why = match self.get_once(&full, key).await {
                    // The last bytes, even refused: the caller's check
                    // names the damage.
                    Ok(bytes) if last || valid(&bytes) => return Ok(bytes),
                    Ok(_) => format!("{}: get {key}: the bytes fail their check", self.url()),
                    Err((e, transient)) if transient && !last => e.to_string(),
                    Err((e, _)) => return Err(e),
                };
                log::warn!("{why}; reading it again in {wait:?}");
                tokio::time::sleep(wait).await;
                wait *= 2;
                attempt += 1;
            }
        })
    }

    fn list(&self, prefix: &str) -> Result<Vec<String>, DestError> {
        let full = self.full_key(prefix.trim_end_matches('/'))? + "/";
        let strip = if self.url.prefix.is_empty() {
            0
        } else {
            self.url.prefix.len() + 1
        };
        self.rt.block_on(async {
            let mut keys = Vec::new();
            let mut pages = self
                .client
                .list_objects_v2()
                .bucket(&self.url.bucket)
                .prefix(&full)
                .into_paginator()
                .send();
            while let Some(page) = pages.next().await {
                let page = page.map_err(|e| self.remote("list", prefix, &e))?;
                for o in page.contents() {
                    if let Some(k) = o.key().and_then(|k| k.get(strip..)) {
                        keys.push(k.to_owned());
                    }
                }
            }
            keys.sort();
            Ok(keys)
        })
    }

    fn delete(&self, key: &str) -> Result<(), DestError> {
        let full = self.full_key(key)?;
        let r = self.rt.block_on(
            self.client
                .delete_object()
                .bucket(&self.url.bucket)
                .key(&full)
                .send(),
        );
        match r {
            Ok(_) => Ok(()),
            Err(e) if status(&e) == Some(404) => Ok(()),
            Err(e) => Err(self.remote("delete", key, &e)),
        }
    }

    fn url(&self) -> String {
        self.url.display()
    }

    /// The request body: the SDK takes the bytes it sends as its own.
    fn object_copies(&self) -> u64 {
        1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_with_defaults_and_refuse_garbage() {
        let u =
            S3Url::parse("s3://backups/db/prod?endpoint=http://127.0.0.1:8333&region=eu-west-1")
                .unwrap();
        assert_eq!(u.bucket, "backups");
        assert_eq!(u.prefix, "db/prod");
        assert_eq!(u.endpoint.as_deref(), Some("http://127.0.0.1:8333"));
        assert_eq!(u.region.as_deref(), Some("eu-west-1"));
        assert!(u.path_style, "an explicit endpoint defaults to path style");

        let u = S3Url::parse("s3://backups").unwrap();
        assert_eq!(
            (u.prefix.as_str(), u.endpoint, u.path_style),
            ("", None, false)
        );
        let u =
            S3Url::parse("s3://backups/x/?endpoint=http%3A%2F%2Fh%3A1&path-style=false").unwrap();
        assert_eq!(u.prefix, "x");
        assert_eq!(u.endpoint.as_deref(), Some("http://h:1"));
        assert!(!u.path_style);
        assert_eq!(u.timeout_s, None);
        let u = S3Url::parse("s3://backups?timeout=3&endpoint=http://h:1").unwrap();
        assert_eq!(u.timeout_s, Some(3));

        for bad in [
            "s3://",
            "s3://B",
            "s3://Upper",
            "s3://-bucket",
            "s3://bucket/../x",
            "s3://bucket/a//b",
            "s3://bucket?endpoint=ftp://x",
            "s3://bucket?endpoint",
            "s3://bucket?colour=red",
            "s3://bucket?path-style=maybe",
            "s3://bucket?region=%zz",
            "s3://bucket?timeout=0",
            "s3://bucket?timeout=1.5",
            "s3://bucket?timeout=3601",
            "file:///x",
        ] {
            let e = S3Url::parse(bad).unwrap_err();
            assert!(e.contains("invalid destination"), "{bad}: {e}");
        }
    }
}
