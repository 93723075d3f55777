//! `foresnap.toml`: the daemon's socket and the volumes it serves.
//!
//! ```toml
//! [daemon]
//! socket = "/run/foresnap/daemon.sock"   # the control API (default)
//! run_dir = "/run/foresnap/volumes"      # per-volume sockets (default)
//!
//! [[tenant]]
//! name = "acme"
//! # where acme's volumes may keep snapshots (each volume's dest must lie
//! # inside one of these; no two tenants' places overlap)
//! destinations = ["s3://backups/acme?endpoint=http://127.0.0.1:8333", "file:///srv/acme"]
//! # acme's own S3 key, for its s3:// destinations (the secret's file must
//! # not be readable by group or others)
//! access-key-id = "acme-key"
//! secret-key-file = "/etc/foresnap/acme.secret"
//!
//! [[volume]]
//! name = "db"                # the API's name for it
//! tenant = "acme"            # who owns it: scopes the API
//! backing = "/var/lib/foresnap/db.img"
//! size = "64G"
//! dest = ["s3://backups/acme?endpoint=http://127.0.0.1:8333"]
//! every = "15m"
//! keep-last = 8
//! ```
//!
//! Every volume's `tenant` has a `[[tenant]]`: the places its snapshots may
//! go and the key they are written with are the tenant's own, so no
//! volume can be pointed at another tenant's snapshots. The daemon then
//! proves, before it serves a volume, that the tenant's key can write to
//! each of the volume's destinations.
//!
//! Apart from `name` and `tenant`, a volume's keys are `foresnap serve`'s
//! long options (`ring-size` or `ring_size` for `--ring-size`), so the file
//! and the command line cannot drift apart. This module checks the file's
//! shape (types, names, duplicates); the daemon then checks each volume's
//! options with the same parser as `serve` and names the field of a bad
//! value.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

use serde::Deserialize;
use toml::Spanned;

use crate::{NAME_RULE, valid_name};

/// The default control API socket.
pub const DEFAULT_SOCKET: &str = "/run/foresnap/daemon.sock";
/// The default directory of the volumes' own control sockets.
pub const DEFAULT_RUN_DIR: &str = "/run/foresnap/volumes";

/// What a table describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `[[volume]]`: a device served by `foresnap serve`.
    Volume,
    /// `[[replica]]`: an image kept equal to a volume's newest snapshot by
    /// `foresnap replicate --follow`.
    Replica,
    /// `[[tier]]`: a volume's old snapshots moved from a fast destination
    /// to a slow one by `foresnap tier --watch`.
    Tier,
}

impl Kind {
    /// The table's name, as messages say it.
    pub fn word(self) -> &'static str {
        match self {
            Kind::Volume => "volume",
            Kind::Replica => "replica",
            Kind::Tier => "tier",
        }
    }

    /// Options the daemon sets itself for this kind, with the reason.
    fn reserved(self) -> &'static [(&'static str, &'static str)] {
        match self {
            Kind::Volume => RESERVED,
            Kind::Replica => &[
                ("follow", "the daemon's replicas always follow"),
                ("daemon", "a replica's destinations are given here"),
                ("help", "not an option of a replica"),
                ("version", "not an option of a replica"),
            ],
            Kind::Tier => &[
                ("help", "not an option of a tier"),
                ("version", "not an option of a tier"),
            ],
        }
    }

    /// The option every table of this kind needs, and what it is.
    fn required(self) -> &'static [(&'static str, &'static str)] {
        match self {
            Kind::Volume => &[("backing", "the file or block device to serve")],
            Kind::Replica => &[
                ("to", "the replica image to keep"),
                ("dest", "where the volume's snapshots are"),
            ],
            Kind::Tier => &[
                ("fast", "where the volume's snapshots land"),
                ("slow", "where old ones move to"),
                ("age", "how old a snapshot moves"),
            ],
        }
    }
}

/// Options the daemon sets itself, with the reason a file cannot.
const RESERVED: &[(&str, &str)] = &[
    (
        "control",
        "the daemon puts each volume's control socket in [daemon] run_dir",
    ),
    (
        "no-tracking",
        "a daemon's volumes are tracked: snapshots are what it is for",
    ),
    ("help", "not an option of a volume"),
    ("version", "not an option of a volume"),
];

/// A loaded, well-formed configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub socket: PathBuf,
    pub run_dir: PathBuf,
    pub tenants: Vec<Tenant>,
    pub volumes: Vec<Volume>,
    /// `[[replica]]` tables (their options are `replicate`'s).
    pub replicas: Vec<Volume>,
    /// `[[tier]]` tables (their options are `tier`'s).
    pub tiers: Vec<Volume>,
}

/// One `[[tenant]]`: where its volumes' snapshots may go, and its S3 key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tenant {
    pub name: String,
    /// The line of its `[[tenant]]` header (1-based), for messages.
    pub line: usize,
    /// Destinations (or prefixes of them) its volumes may use.
    pub destinations: Vec<String>,
    /// Its S3 access key id and the file holding the secret; both or
    /// neither, and both when a destination is `s3://`.
    pub access_key_id: Option<String>,
    pub secret_key_file: Option<PathBuf>,
}

impl Config {
    /// The tenant named `name` (every volume's tenant is declared).
    pub fn tenant(&self, name: &str) -> Option<&Tenant> {
        self.tenants.iter().find(|t| t.name == name)
    }
}

/// Where a destination URL keeps its objects, to tell whether one
/// destination lies inside another: the store (`file`, or `s3` with its
/// endpoint) and the path in it (a directory, or bucket and prefix),
/// without trailing `/`. `None` for what is not a destination URL, or a
/// path with empty, `.` or `..` parts (which could step out of a place).
pub fn place(url: &str) -> Option<(String, String)> {
    let (store, path) = if let Some(p) = url.strip_prefix("file://") {
        ("file".to_owned(), p.strip_prefix('/')?)
    } else if let Some(rest) = url.strip_prefix("s3://") {
        let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
        let endpoint = query
            .split('&')
            .find_map(|kv| kv.strip_prefix("endpoint="))
            .unwrap_or("aws")
            .trim_end_matches('/');
        if path.is_empty() || path.starts_with('/') {
            return None;
        }
        (format!("s3 {endpoint}"), path)
    } else {
        return None;
    };
    let path = path.trim_end_matches('/');
    if !path.is_empty()
        && path
            .split('/')
            .any(|p| p.is_empty() || p == "." || p == "..")
    {
        return None;
    }
    Some((store, path.to_owned()))
}

/// Whether destination `inner` lies inside `outer` (both [`place`]s).
pub fn inside(inner: &(String, String), outer: &(String, String)) -> bool {
    inner.0 == outer.0
        && (outer.1.is_empty()
            || inner.1 == outer.1
            || inner
                .1
                .strip_prefix(outer.1.as_str())
                .is_some_and(|r| r.starts_with('/')))
}

/// One `[[volume]]` (or `[[replica]]`: see [`Kind`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Volume {
    pub kind: Kind,
    pub name: String,
    pub tenant: String,
    /// The line of its `[[volume]]` header (1-based), for messages.
    pub line: usize,
    /// `serve`'s options, keys normalized to `kebab-case`, in key order.
    pub options: Vec<Opt>,
}

impl Volume {
    /// The option `key` (kebab-case), if set.
    pub fn get(&self, key: &str) -> Option<&Opt> {
        self.options.iter().find(|o| o.key == key)
    }
}

/// One option of a volume: its key, value and line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Opt {
    pub key: String,
    pub value: Value,
    pub line: usize,
}

/// A value an option can take.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    Str(String),
    Int(u64),
    /// `true` passes the flag, `false` leaves it out.
    Bool(bool),
    /// A repeatable option (`dest`).
    List(Vec<String>),
}

impl Value {
    /// The command-line words of option `--key` with this value.
    pub fn args(&self, key: &str) -> Vec<String> {
        let flag = format!("--{key}");
        match self {
            Value::Str(s) => vec![flag, s.clone()],
            Value::Int(n) => vec![flag, n.to_string()],
            Value::Bool(true) => vec![flag],
            Value::Bool(false) => vec![],
            Value::List(l) => l.iter().flat_map(|s| [flag.clone(), s.clone()]).collect(),
        }
    }
}

/// A bad file: where and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The field, as `volume "db": every` or `daemon.socket`; empty for a
    /// file that is not TOML at all.
    pub field: String,
    /// 1-based line, if known.
    pub line: Option<usize>,
    pub reason: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.line, self.field.is_empty()) {
            (Some(l), false) => write!(f, "line {l}: {}: {}", self.field, self.reason),
            (Some(l), true) => write!(f, "line {l}: {}", self.reason),
            (None, false) => write!(f, "{}: {}", self.field, self.reason),
            (None, true) => write!(f, "{}", self.reason),
        }
    }
}

impl std::error::Error for ConfigError {}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    daemon: Option<Spanned<DaemonSection>>,
    #[serde(default)]
    tenant: Vec<Spanned<TenantSection>>,
    #[serde(default)]
    volume: Vec<Spanned<Table>>,
    #[serde(default)]
    replica: Vec<Spanned<Table>>,
    #[serde(default)]
    tier: Vec<Spanned<Table>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DaemonSection {
    socket: Option<Spanned<String>>,
    run_dir: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TenantSection {
    name: Spanned<String>,
    destinations: Spanned<Vec<Spanned<String>>>,
    #[serde(rename = "access-key-id", alias = "access_key_id")]
    access_key_id: Option<Spanned<String>>,
    #[serde(rename = "secret-key-file", alias = "secret_key_file")]
    secret_key_file: Option<Spanned<String>>,
}

/// The 1-based line of byte `at` of `text`.
fn line_of(text: &str, at: usize) -> usize {
    text.as_bytes()[..at.min(text.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

impl Config {
    /// Parses and checks `text`, the contents of a configuration file.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let file: File = toml::from_str(text).map_err(|e| ConfigError {
            field: String::new(),
            line: e.span().map(|s| line_of(text, s.start)),
            // toml's message without its own rendering of the line.
            reason: e.message().trim().to_owned(),
        })?;
        let at = |s: std::ops::Range<usize>| Some(line_of(text, s.start));
        let (mut socket, mut run_dir) = (
            PathBuf::from(DEFAULT_SOCKET),
            PathBuf::from(DEFAULT_RUN_DIR),
        );
        if let Some(d) = &file.daemon {
            for (field, value, out) in [
                ("daemon.socket", &d.get_ref().socket, &mut socket),
                ("daemon.run_dir", &d.get_ref().run_dir, &mut run_dir),
            ] {
                if let Some(v) = value {
                    if !v.get_ref().starts_with('/') || v.get_ref().contains('\0') {
                        return Err(ConfigError {
                            field: field.into(),
                            line: at(v.span()),
                            reason: format!("{:?} is not an absolute path", v.get_ref()),
                        });
                    }
                    *out = PathBuf::from(v.get_ref());
                }
            }
        }
        let tenants = tenants(text, &file.tenant)?;
        if file.volume.is_empty() && file.replica.is_empty() && file.tier.is_empty() {
            return Err(ConfigError {
                field: "volume".into(),
                line: None,
                reason: "no [[volume]], [[replica]] or [[tier]]: the daemon would serve nothing"
                    .into(),
            });
        }
        let mut volumes: Vec<Volume> = Vec::with_capacity(file.volume.len());
        for (i, t) in file.volume.iter().enumerate() {
            let v = volume(text, i, t, Kind::Volume)?;
            within_tenant(&v, &tenants)?;
            volumes.push(v);
        }
        let mut replicas: Vec<Volume> = Vec::with_capacity(file.replica.len());
        for (i, t) in file.replica.iter().enumerate() {
            let v = volume(text, i, t, Kind::Replica)?;
            within_tenant(&v, &tenants)?;
            replicas.push(v);
        }
        let mut tiers: Vec<Volume> = Vec::with_capacity(file.tier.len());
        for (i, t) in file.tier.iter().enumerate() {
            let v = volume(text, i, t, Kind::Tier)?;
            within_tenant(&v, &tenants)?;
            tiers.push(v);
        }
        // What must differ between volumes, and between replicas.
        for (list, keys) in [
            (&volumes, &["backing", "ring", "id", "metrics"][..]),
            (&replicas, &["to"][..]),
            (&tiers, &[][..]),
        ] {
            for (i, v) in list.iter().enumerate() {
                let what = v.kind.word();
                for w in &list[..i] {
                    if v.name == w.name {
                        return Err(ConfigError {
                            field: format!("{what} {:?}: name", v.name),
                            line: Some(v.line),
                            reason: format!("also the name of the {what} at line {}", w.line),
                        });
                    }
                    for &key in keys {
                        if let (Some(a), Some(b)) = (v.get(key), w.get(key))
                            && a.value == b.value
                        {
                            return Err(ConfigError {
                                field: format!("{what} {:?}: {key}", v.name),
                                line: Some(a.line),
                                reason: format!("{what} {:?} has the same {key}", w.name),
                            });
                        }
                    }
                }
            }
        }
        // A replica never writes a volume's backing.
        for r in &replicas {
            if let Some(to) = r.get("to")
                && let Some(v) = volumes
                    .iter()
                    .find(|v| v.get("backing").is_some_and(|b| b.value == to.value))
            {
                return Err(ConfigError {
                    field: format!("replica {:?}: to", r.name),
                    line: Some(to.line),
                    reason: format!(
                        "the backing of volume {:?}: a replica is its own image",
                        v.name
                    ),
                });
            }
        }
        Ok(Config {
            socket,
            run_dir,
            tenants,
            volumes,
            replicas,
            tiers,
        })
    }
}

/// The `[[tenant]]` tables, checked: names, places, keys, and that no two
/// tenants' places overlap.
fn tenants(text: &str, tables: &[Spanned<TenantSection>]) -> Result<Vec<Tenant>, ConfigError> {
    let mut out: Vec<Tenant> = Vec::with_capacity(tables.len());
    for (i, t) in tables.iter().enumerate() {
        let line = line_of(text, t.span().start);
        let t = t.get_ref();
        let at = |s: std::ops::Range<usize>| Some(line_of(text, s.start));
        let name = t.name.get_ref();
        if !valid_name(name) {
            return Err(ConfigError {
                field: format!("tenant #{}: name", i + 1),
                line: at(t.name.span()),
                reason: format!("{name:?}: {NAME_RULE}"),
            });
        }
        let field = |key: &str| format!("tenant {name:?}: {key}");
        if let Some(other) = out.iter().find(|o| o.name == *name) {
            return Err(ConfigError {
                field: field("name"),
                line: at(t.name.span()),
                reason: format!("also the name of the tenant at line {}", other.line),
            });
        }
        if t.destinations.get_ref().is_empty() {
            return Err(ConfigError {
                field: field("destinations"),
                line: at(t.destinations.span()),
                reason: "empty: list where this tenant's snapshots may go".into(),
            });
        }
        let mut has_s3 = false;
        for d in t.destinations.get_ref() {
            let bad = |reason: String| ConfigError {
                field: field("destinations"),
                line: at(d.span()),
                reason,
            };
            let Some(p) = place(d.get_ref()) else {
                return Err(bad(format!(
                    "{:?} is not a destination: use file:///PATH or s3://BUCKET/PREFIX?endpoint=URL",
                    d.get_ref()
                )));
            };
            has_s3 |= p.0.starts_with("s3");
            // Whole places are compared, so either order of two
            // overlapping tenants is caught at the second one.
            for o in &out {
                for od in &o.destinations {
                    let q = place(od).unwrap_or_default();
                    if inside(&p, &q) || inside(&q, &p) {
                        return Err(bad(format!(
                            "{:?} overlaps {od:?} of tenant {:?} (line {}): a tenant's destinations are its own",
                            d.get_ref(),
                            o.name,
                            o.line
                        )));
                    }
                }
            }
        }
        let key_id = t.access_key_id.as_ref().map(|k| k.get_ref().clone());
        let secret = t.secret_key_file.as_ref();
        if let Some(s) = secret
            && (!s.get_ref().starts_with('/') || s.get_ref().contains('\0'))
        {
            return Err(ConfigError {
                field: field("secret-key-file"),
                line: at(s.span()),
                reason: format!("{:?} is not an absolute path", s.get_ref()),
            });
        }
        if let Some(k) = &t.access_key_id
            && (k.get_ref().is_empty() || !k.get_ref().bytes().all(|b| b.is_ascii_graphic()))
        {
            return Err(ConfigError {
                field: field("access-key-id"),
                line: at(k.span()),
                reason: "give the key id: printable characters, no spaces".into(),
            });
        }
        if key_id.is_some() != secret.is_some() {
            return Err(ConfigError {
                field: field(if key_id.is_some() {
                    "secret-key-file"
                } else {
                    "access-key-id"
                }),
                line: Some(line),
                reason: "missing: give access-key-id and secret-key-file together".into(),
            });
        }
        if has_s3 && key_id.is_none() {
            return Err(ConfigError {
                field: field("access-key-id"),
                line: Some(line),
                reason: "missing: an s3:// destination is written with the tenant's own key \
                         (access-key-id and secret-key-file), never the daemon's"
                    .into(),
            });
        }
        out.push(Tenant {
            name: name.clone(),
            line,
            destinations: t
                .destinations
                .get_ref()
                .iter()
                .map(|d| d.get_ref().clone())
                .collect(),
            access_key_id: key_id,
            secret_key_file: secret.map(|s| PathBuf::from(s.get_ref())),
        });
    }
    Ok(out)
}

/// A table's tenant is declared, and each of its destinations (`dest`,
/// and a tier's `fast` and `slow`) lies inside one of the tenant's.
fn within_tenant(v: &Volume, tenants: &[Tenant]) -> Result<(), ConfigError> {
    let Some(t) = tenants.iter().find(|t| t.name == v.tenant) else {
        return Err(ConfigError {
            field: format!("{} {:?}: tenant", v.kind.word(), v.name),
            line: Some(v.line),
            reason: format!(
                "{:?} is not declared: add a [[tenant]] with name = {:?} and its destinations",
                v.tenant, v.tenant
            ),
        });
    };
    for key in ["dest", "fast", "slow"] {
        let Some(dest) = v.get(key) else {
            continue;
        };
        let dests = match &dest.value {
            Value::Str(s) => std::slice::from_ref(s),
            Value::List(l) => l.as_slice(),
            // The command's parser refuses these with the field's name.
            Value::Int(_) | Value::Bool(_) => continue,
        };
        for d in dests {
            let ok = place(d).is_some_and(|p| {
                t.destinations
                    .iter()
                    .filter_map(|td| place(td))
                    .any(|q| inside(&p, &q))
            });
            if !ok {
                return Err(ConfigError {
                    field: format!("{} {:?}: {key}", v.kind.word(), v.name),
                    line: Some(dest.line),
                    reason: format!(
                        "{d:?} is not inside a destination of tenant {:?} ({})",
                        t.name,
                        t.destinations.join(", ")
                    ),
                });
            }
        }
    }
    Ok(())
}

/// A value in a message: strings quoted, numbers as written, the rest by
/// their type.
fn show(v: &toml::Value) -> String {
    match v {
        toml::Value::String(s) => format!("{s:?}"),
        toml::Value::Integer(n) => n.to_string(),
        toml::Value::Float(x) => x.to_string(),
        toml::Value::Boolean(b) => b.to_string(),
        other => format!("a {}", other.type_str()),
    }
}

type Table = BTreeMap<Spanned<String>, Spanned<toml::Value>>;

fn volume(
    text: &str,
    index: usize,
    table: &Spanned<Table>,
    kind: Kind,
) -> Result<Volume, ConfigError> {
    let what = kind.word();
    let line = line_of(text, table.span().start);
    let name = match table.get_ref().iter().find(|(k, _)| k.get_ref() == "name") {
        Some((_, v)) => match v.get_ref() {
            toml::Value::String(s) if valid_name(s) => s.clone(),
            other => {
                return Err(ConfigError {
                    field: format!("{what} #{}: name", index + 1),
                    line: Some(line_of(text, v.span().start)),
                    reason: format!("{}: {NAME_RULE}", show(other)),
                });
            }
        },
        None => {
            return Err(ConfigError {
                field: format!("{what} #{}", index + 1),
                line: Some(line),
                reason: "has no name".into(),
            });
        }
    };
    let field = |key: &str| format!("{what} {name:?}: {key}");
    let mut tenant = None;
    let mut options = Vec::new();
    for (k, v) in table.get_ref() {
        let key = k.get_ref().replace('_', "-");
        let kline = line_of(text, k.span().start);
        let bad = |reason: String| ConfigError {
            field: field(k.get_ref()),
            line: Some(kline),
            reason,
        };
        if key.is_empty()
            || !key.starts_with(|c: char| c.is_ascii_lowercase())
            || !key
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            return Err(bad(
                "not an option name: use serve's long options, as ring-size".into(),
            ));
        }
        if let Some((_, why)) = kind.reserved().iter().find(|(r, _)| *r == key) {
            return Err(bad(format!("cannot be set here: {why}")));
        }
        if options.iter().any(|o: &Opt| o.key == key) {
            return Err(bad("given twice (as - and _ spellings)".into()));
        }
        let value = match v.get_ref() {
            toml::Value::String(s) if s.contains('\0') => {
                return Err(bad("holds a NUL character".into()));
            }
            toml::Value::String(s) => Value::Str(s.clone()),
            toml::Value::Integer(n) => {
                Value::Int(u64::try_from(*n).map_err(|_| bad(format!("{n} is negative")))?)
            }
            toml::Value::Boolean(b) => Value::Bool(*b),
            toml::Value::Array(a) => Value::List(
                a.iter()
                    .map(|x| match x {
                        toml::Value::String(s) if !s.contains('\0') => Ok(s.clone()),
                        other => Err(bad(format!("{} in a list: give strings", show(other)))),
                    })
                    .collect::<Result<_, _>>()?,
            ),
            other => {
                return Err(bad(format!(
                    "{} value: give a string, a number, true/false or a list of strings",
                    other.type_str()
                )));
            }
        };
        match key.as_str() {
            "name" => {}
            "tenant" => match value {
                Value::Str(s) if valid_name(&s) => tenant = Some(s),
                _ => return Err(bad(format!("{}: {NAME_RULE}", show(v.get_ref())))),
            },
            _ => options.push(Opt {
                key,
                value,
                line: kline,
            }),
        }
    }
    let Some(tenant) = tenant else {
        return Err(ConfigError {
            field: field("tenant"),
            line: Some(line),
            reason: format!("missing: every {what} belongs to a tenant"),
        });
    };
    for (key, what) in kind.required() {
        if !options.iter().any(|o| o.key == *key) {
            return Err(ConfigError {
                field: field(key),
                line: Some(line),
                reason: format!("missing: {what}"),
            });
        }
    }
    Ok(Volume {
        kind,
        name,
        tenant,
        line,
        options,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[daemon]
socket = "/tmp/d.sock"

[[tenant]]
name = "acme"
destinations = ["file:///b1", "file:///b2/"]

[[tenant]]
name = "globex"
destinations = ["s3://globex-backups?endpoint=http://127.0.0.1:8333"]
access_key_id = "globex"
secret-key-file = "/etc/foresnap/globex.secret"

[[volume]]
name = "db"
tenant = "acme"
backing = "/var/lib/db.img"
ring_size = "4M"
dest = ["file:///b1", "file:///b2"]
dest-policy = "mirror"
every = "15m"
keep-last = 8
utc = true

[[volume]]
name = "logs"
tenant = "globex"
backing = "/var/lib/logs.img"
"#;

    #[test]
    fn a_good_file_gives_every_volume_its_options() {
        let c = Config::parse(GOOD).unwrap();
        assert_eq!(c.socket, PathBuf::from("/tmp/d.sock"));
        assert_eq!(c.run_dir, PathBuf::from(DEFAULT_RUN_DIR));
        assert_eq!(c.volumes.len(), 2);
        let db = &c.volumes[0];
        assert_eq!(
            (db.name.as_str(), db.tenant.as_str(), db.line),
            ("db", "acme", 15)
        );
        let args: Vec<String> = db
            .options
            .iter()
            .flat_map(|o| o.value.args(&o.key))
            .collect();
        assert_eq!(
            args.join(" "),
            "--backing /var/lib/db.img --dest file:///b1 --dest file:///b2 --dest-policy mirror \
             --every 15m --keep-last 8 --ring-size 4M --utc"
        );
        assert_eq!(db.get("ring-size").unwrap().line, 19);
        let globex = c.tenant("globex").unwrap();
        assert_eq!(globex.access_key_id.as_deref(), Some("globex"));
        assert_eq!(
            globex.secret_key_file.as_deref(),
            Some(std::path::Path::new("/etc/foresnap/globex.secret"))
        );
        assert_eq!(c.tenant("acme").unwrap().access_key_id, None);
    }

    fn err(text: &str) -> String {
        Config::parse(text).unwrap_err().to_string()
    }

    #[test]
    fn a_bad_file_names_the_field_its_line_and_the_reason() {
        let one = |extra: &str| {
            format!("[[volume]]\nname = \"db\"\ntenant = \"acme\"\nbacking = \"/x\"\n{extra}")
        };
        // The same, after a tenant acme of 2 lines.
        let with = |extra: &str| {
            format!(
                "[[tenant]]\nname = \"acme\"\ndestinations = [\"file:///b\"]\n{}",
                one(extra)
            )
        };
        assert!(Config::parse(&with("")).is_ok());
        let cases = [
            (
                one("ring_size = -4"),
                "line 5: volume \"db\": ring_size: -4 is negative",
            ),
            (
                one("control = \"/s\""),
                "line 5: volume \"db\": control: cannot be set here",
            ),
            (
                one("no_tracking = true"),
                "line 5: volume \"db\": no_tracking: cannot be set here",
            ),
            (
                one("Every = \"1m\""),
                "line 5: volume \"db\": Every: not an option name",
            ),
            (
                one("every = 1.5"),
                "line 5: volume \"db\": every: float value",
            ),
            (
                one("dest = [\"a\", 3]"),
                "line 5: volume \"db\": dest: 3 in a list",
            ),
            (
                one("ring-size = \"1M\"\nring_size = \"2M\""),
                "line 6: volume \"db\": ring_size: given twice",
            ),
            (
                one("[volume.x]\ny = 1"),
                "line 5: volume \"db\": x: table value",
            ),
            (
                "[[volume]]\nname = \"DB\"\n".into(),
                "line 2: volume #1: name: \"DB\": use 1 to 63",
            ),
            (
                "[[volume]]\ntenant = \"a\"\n".into(),
                "line 1: volume #1: has no name",
            ),
            (
                "[[volume]]\nname = \"db\"\nbacking = \"/x\"\n".into(),
                "line 1: volume \"db\": tenant: missing",
            ),
            (
                "[[volume]]\nname = \"db\"\ntenant = \"a b\"\n".into(),
                "line 3: volume \"db\": tenant: \"a b\": use 1 to 63",
            ),
            (
                "[[volume]]\nname = \"db\"\ntenant = \"a\"\n".into(),
                "line 1: volume \"db\": backing: missing",
            ),
            (
                format!("{}\n{}", with(""), one("")),
                "line 9: volume \"db\": name: also the name of the volume at line 4",
            ),
            (
                format!("{}\n{}", with(""), one("").replace("\"db\"", "\"db2\"")),
                "line 12: volume \"db2\": backing: volume \"db\" has the same backing",
            ),
            // Tenants.
            (
                one(""),
                "line 1: volume \"db\": tenant: \"acme\" is not declared",
            ),
            (
                with("dest = \"file:///c\""),
                "line 8: volume \"db\": dest: \"file:///c\" is not inside a destination of tenant \"acme\" (file:///b)",
            ),
            (
                with("dest = [\"file:///b/v\", \"file:///bb\"]"),
                "line 8: volume \"db\": dest: \"file:///bb\" is not inside",
            ),
            (
                with("dest = \"file:///b/../c\""),
                "line 8: volume \"db\": dest: \"file:///b/../c\" is not inside",
            ),
            (
                format!(
                    "[[tenant]]\nname = \"globex\"\ndestinations = [\"file:///\"]\n{}",
                    with("")
                ),
                "line 6: tenant \"acme\": destinations: \"file:///b\" overlaps \"file:///\" of tenant \"globex\" (line 1)",
            ),
            (
                format!(
                    "[[tenant]]\nname = \"acme\"\ndestinations = [\"s3://b/x?endpoint=http://h:1\"]\n\
                     access-key-id = \"k\"\nsecret-key-file = \"/s\"\n\
                     [[tenant]]\nname = \"globex\"\ndestinations = [\"s3://b/x/y?endpoint=http://h:1/\"]\n{}",
                    one("")
                ),
                "line 8: tenant \"globex\": destinations: \"s3://b/x/y?endpoint=http://h:1/\" overlaps",
            ),
            (
                "[[tenant]]\nname = \"acme\"\ndestinations = [\"s3://bkt\"]\n".into(),
                "line 1: tenant \"acme\": access-key-id: missing: an s3:// destination is written with the tenant's own key",
            ),
            (
                "[[tenant]]\nname = \"acme\"\ndestinations = [\"file:///b\"]\naccess-key-id = \"k\"\n".into(),
                "line 1: tenant \"acme\": secret-key-file: missing: give access-key-id and secret-key-file together",
            ),
            (
                "[[tenant]]\nname = \"acme\"\ndestinations = [\"file:///b\"]\naccess-key-id = \"k\"\nsecret-key-file = \"s\"\n".into(),
                "line 5: tenant \"acme\": secret-key-file: \"s\" is not an absolute path",
            ),
            (
                "[[tenant]]\nname = \"acme\"\ndestinations = []\n".into(),
                "line 3: tenant \"acme\": destinations: empty",
            ),
            (
                "[[tenant]]\nname = \"acme\"\ndestinations = [\"ftp://x\"]\n".into(),
                "line 3: tenant \"acme\": destinations: \"ftp://x\" is not a destination",
            ),
            (
                "[[tenant]]\nname = \"Acme\"\ndestinations = [\"file:///b\"]\n".into(),
                "line 2: tenant #1: name: \"Acme\": use 1 to 63",
            ),
            (
                "[[tenant]]\nname = \"acme\"\ndestinations = [\"file:///b\"]\n\
                 [[tenant]]\nname = \"acme\"\ndestinations = [\"file:///c\"]\n".into(),
                "line 5: tenant \"acme\": name: also the name of the tenant at line 1",
            ),
            (
                "[[tenant]]\nname = \"acme\"\ndestinations = [\"file:///b\"]\nkey = 1\n".into(),
                "line 4: unknown field `key`",
            ),
            (
                format!("[daemon]\nsocket = \"rel.sock\"\n{}", one("")),
                "line 2: daemon.socket: \"rel.sock\" is not an absolute path",
            ),
            (
                format!("[daemon]\nport = 3\n{}", one("")),
                "line 2: unknown field `port`",
            ),
            ("[daemon]\n".into(), "volume: no [[volume]]"),
            ("[[volume]\n".into(), "line 1: "),
            ("volume = 3\n".into(), "line 1: invalid type"),
        ];
        for (text, want) in cases {
            let got = err(&text);
            assert!(got.starts_with(want), "{text:?}:\n got {got}\nwant {want}");
            assert!(!got.contains('\n'), "one line: {got:?}");
        }
    }

    #[test]
    fn replicas_are_checked_like_volumes_with_their_own_keys() {
        let tenant = "[[tenant]]\nname = \"acme\"\ndestinations = [\"file:///b\"]\n";
        let replica = |extra: &str| {
            format!(
                "{tenant}[[replica]]\nname = \"db\"\ntenant = \"acme\"\nto = \"/r.img\"\n\
                 dest = [\"file:///b\"]\n{extra}"
            )
        };
        let c = Config::parse(&replica("poll = \"2s\"\n")).unwrap();
        assert!(c.volumes.is_empty());
        let r = &c.replicas[0];
        assert_eq!((r.kind, r.name.as_str(), r.line), (Kind::Replica, "db", 4));
        assert_eq!(r.get("poll").unwrap().value, Value::Str("2s".into()));
        let cases = [
            (
                replica("follow = true"),
                "line 9: replica \"db\": follow: cannot be set here: the daemon's replicas always follow",
            ),
            (
                replica("").replace("to = \"/r.img\"\n", ""),
                "line 4: replica \"db\": to: missing: the replica image to keep",
            ),
            (
                replica("").replace("dest = [\"file:///b\"]\n", ""),
                "line 4: replica \"db\": dest: missing: where the volume's snapshots are",
            ),
            (
                replica("").replace("dest = [\"file:///b\"]", "dest = [\"file:///c\"]"),
                "line 8: replica \"db\": dest: \"file:///c\" is not inside a destination of tenant \"acme\"",
            ),
            (
                format!(
                    "{}[[replica]]\nname = \"db2\"\ntenant = \"acme\"\nto = \"/r.img\"\ndest = [\"file:///b\"]\n",
                    replica("")
                ),
                "line 12: replica \"db2\": to: replica \"db\" has the same to",
            ),
            (
                format!(
                    "{}[[volume]]\nname = \"v\"\ntenant = \"acme\"\nbacking = \"/r.img\"\n",
                    replica("")
                ),
                "line 7: replica \"db\": to: the backing of volume \"v\": a replica is its own image",
            ),
        ];
        for (text, want) in cases {
            let got = err(&text);
            assert!(got.starts_with(want), "{text:?}:\n got {got}\nwant {want}");
        }
    }

    #[test]
    fn a_tier_needs_both_destinations_inside_its_tenant() {
        let tier = |extra: &str| {
            format!(
                "[[tenant]]\nname = \"acme\"\ndestinations = [\"file:///fast\", \"file:///slow\"]\n\
                 [[tier]]\nname = \"db\"\ntenant = \"acme\"\nfast = \"file:///fast\"\n{extra}"
            )
        };
        let c = Config::parse(&tier("slow = \"file:///slow/db\"\nage = \"7d\"\n")).unwrap();
        assert_eq!((c.tiers[0].kind, c.tiers[0].line), (Kind::Tier, 4));
        let cases = [
            (
                tier("slow = \"file:///other\"\nage = \"7d\"\n"),
                "line 8: tier \"db\": slow: \"file:///other\" is not inside a destination of tenant \"acme\"",
            ),
            (
                tier("slow = \"file:///slow\"\n"),
                "line 4: tier \"db\": age: missing: how old a snapshot moves",
            ),
        ];
        for (text, want) in cases {
            let got = err(&text);
            assert!(got.starts_with(want), "{text:?}:\n got {got}\nwant {want}");
        }
    }

    #[test]
    fn false_leaves_a_flag_out_and_lists_repeat_it() {
        assert!(Value::Bool(false).args("utc").is_empty());
        assert_eq!(Value::Bool(true).args("utc"), ["--utc"]);
        assert_eq!(
            Value::List(vec!["a".into(), "b".into()]).args("dest"),
            ["--dest", "a", "--dest", "b"]
        );
        assert_eq!(Value::Int(3).args("id"), ["--id", "3"]);
    }
}
