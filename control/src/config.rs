//! `foresnap.toml`: the daemon's socket and the volumes it serves.
//!
//! ```toml
//! [daemon]
//! socket = "/run/foresnap/daemon.sock"   # the control API (default)
//! run_dir = "/run/foresnap/volumes"      # per-volume sockets (default)
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
    pub volumes: Vec<Volume>,
}

/// One `[[volume]]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Volume {
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
    volume: Vec<Spanned<BTreeMap<Spanned<String>, Spanned<toml::Value>>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DaemonSection {
    socket: Option<Spanned<String>>,
    run_dir: Option<Spanned<String>>,
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
        if file.volume.is_empty() {
            return Err(ConfigError {
                field: "volume".into(),
                line: None,
                reason: "no [[volume]]: the daemon would serve nothing".into(),
            });
        }
        let mut volumes: Vec<Volume> = Vec::with_capacity(file.volume.len());
        for (i, table) in file.volume.iter().enumerate() {
            volumes.push(volume(text, i, table)?);
        }
        // What must differ between volumes.
        for (i, v) in volumes.iter().enumerate() {
            for w in &volumes[..i] {
                if v.name == w.name {
                    return Err(ConfigError {
                        field: format!("volume {:?}: name", v.name),
                        line: Some(v.line),
                        reason: format!("also the name of the volume at line {}", w.line),
                    });
                }
                for key in ["backing", "ring", "id", "metrics"] {
                    if let (Some(a), Some(b)) = (v.get(key), w.get(key))
                        && a.value == b.value
                    {
                        return Err(ConfigError {
                            field: format!("volume {:?}: {key}", v.name),
                            line: Some(a.line),
                            reason: format!("volume {:?} has the same {key}", w.name),
                        });
                    }
                }
            }
        }
        Ok(Config {
            socket,
            run_dir,
            volumes,
        })
    }
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

fn volume(text: &str, index: usize, table: &Spanned<Table>) -> Result<Volume, ConfigError> {
    let line = line_of(text, table.span().start);
    let name = match table.get_ref().iter().find(|(k, _)| k.get_ref() == "name") {
        Some((_, v)) => match v.get_ref() {
            toml::Value::String(s) if valid_name(s) => s.clone(),
            other => {
                return Err(ConfigError {
                    field: format!("volume #{}: name", index + 1),
                    line: Some(line_of(text, v.span().start)),
                    reason: format!("{}: {NAME_RULE}", show(other)),
                });
            }
        },
        None => {
            return Err(ConfigError {
                field: format!("volume #{}", index + 1),
                line: Some(line),
                reason: "has no name".into(),
            });
        }
    };
    let field = |key: &str| format!("volume {name:?}: {key}");
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
        if let Some((_, why)) = RESERVED.iter().find(|(r, _)| *r == key) {
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
            reason: "missing: every volume belongs to a tenant".into(),
        });
    };
    if !options.iter().any(|o| o.key == "backing") {
        return Err(ConfigError {
            field: field("backing"),
            line: Some(line),
            reason: "missing: the file or block device to serve".into(),
        });
    }
    Ok(Volume {
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
            ("db", "acme", 5)
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
        assert_eq!(db.get("ring-size").unwrap().line, 9);
    }

    fn err(text: &str) -> String {
        Config::parse(text).unwrap_err().to_string()
    }

    #[test]
    fn a_bad_file_names_the_field_its_line_and_the_reason() {
        let one = |extra: &str| {
            format!("[[volume]]\nname = \"db\"\ntenant = \"acme\"\nbacking = \"/x\"\n{extra}")
        };
        assert!(Config::parse(&one("")).is_ok());
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
                format!("{}\n{}", one(""), one("")),
                "line 6: volume \"db\": name: also the name of the volume at line 1",
            ),
            (
                format!("{}\n{}", one(""), one("").replace("\"db\"", "\"db2\"")),
                "line 9: volume \"db2\": backing: volume \"db\" has the same backing",
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
