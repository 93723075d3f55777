//! The daemon's two grammars, apart from everything that does I/O so that
//! they can be fuzzed alone (`fuzz/fuzz_targets/daemon_config.rs`,
//! `api_request.rs`):
//!
//! - [`config`]: `/etc/foresnap/foresnap.toml`, the volumes one daemon
//!   serves. A bad file names the field, its line and the reason.
//! - [`api`]: the control API, HTTP/1.1 with JSON bodies on a unix socket:
//!   request decoding with hard limits, routing to [`api::Call`]s, and the
//!   responses (every error a 4xx or 5xx with a JSON body).

pub mod api;
pub mod config;

/// Volume and tenant names: 1 to 63 of `a-z`, `0-9`, `_`, `-`, starting
/// with a letter or digit. They appear in URL paths, socket file names and
/// destination keys, so nothing there needs escaping.
pub fn valid_name(s: &str) -> bool {
    (1..=63).contains(&s.len())
        && s.bytes().enumerate().all(|(i, b)| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || (i > 0 && (b == b'_' || b == b'-'))
        })
}

/// What [`valid_name`] wants, for error messages.
pub const NAME_RULE: &str = "use 1 to 63 of a-z, 0-9, '_' and '-', starting with a letter or digit";
