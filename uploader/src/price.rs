//! The `price` destination policy's arithmetic: a price table per
//! destination, the volume's measured use, and the monthly cost each
//! destination would have ([`forecast`]).
//!
//! The use is what the volume's manifests show ([`Usage::add`]): the
//! objects each snapshot puts, the time between snapshots (an hour until
//! two have closed), the volume's size (which stands for what a
//! destination stores: one whole copy) and chunk count (a restore gets
//! every chunk), and the restores a month the owner expects. Each new snapshot
//! goes to the destination with the lowest forecast; the policy changes
//! destination only for a saving of [`SWITCH_MARGIN`] or more, since a
//! change copies the objects the snapshot shares with its parents
//! ([`crate::copies`]).

use std::fmt;

/// A change of destination needs the new one to be this much cheaper
/// (a fraction of the current forecast).
pub const SWITCH_MARGIN: f64 = 0.10;

/// Snapshots a month assumed until two snapshots have closed: hourly.
pub const PRIOR_SNAPSHOTS_PER_MONTH: f64 = 720.0;

const GIB: f64 = (1u64 << 30) as f64;
const MONTH_MS: f64 = 30.0 * 24.0 * 3600.0 * 1000.0;

/// One destination's prices, in a currency of the owner's choosing
/// (the reports say USD).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Price {
    /// Per GiB stored for a month.
    pub storage_gib_month: f64,
    /// Per 1000 PUT requests.
    pub put_per_1000: f64,
    /// Per 1000 GET requests.
    pub get_per_1000: f64,
    /// Per GiB read out.
    pub egress_gib: f64,
}

impl Price {
    /// Parses `storage=0.023,put=0.005,get=0.0004,egress=0.09`; a field
    /// left out costs nothing.
    pub fn parse(spec: &str) -> Result<Price, String> {
        let mut p = Price::default();
        for part in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let (k, v) = part.split_once('=').ok_or_else(|| {
                format!("invalid price {part:?}: give FIELD=AMOUNT (storage, put, get, egress)")
            })?;
            let v: f64 = v
                .trim()
                .parse()
                .ok()
                .filter(|v: &f64| v.is_finite() && *v >= 0.0)
                .ok_or_else(|| {
                    format!("invalid price {part:?}: the amount must be a number >= 0")
                })?;
            let field = match k.trim() {
                "storage" => &mut p.storage_gib_month,
                "put" => &mut p.put_per_1000,
                "get" => &mut p.get_per_1000,
                "egress" => &mut p.egress_gib,
                other => {
                    return Err(format!(
                        "invalid price field {other:?}: use storage (per GiB-month), put and get \
                         (per 1000 requests), egress (per GiB)"
                    ));
                }
            };
            *field = v;
        }
        Ok(p)
    }
}

/// What the volume's manifests have shown so far.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Usage {
    /// Bytes a destination stores for the volume.
    pub bytes: u64,
    /// Objects the snapshots seen stored (their own, parts included).
    pub objects: u64,
    /// Snapshots seen.
    pub snapshots: u64,
    pub first_close_ms: Option<u64>,
    pub last_close_ms: Option<u64>,
    pub volume_bytes: u64,
    pub chunks: u64,
}

impl Usage {
    /// Counts manifest `m`'s snapshot (manifests come in snapshot order).
    pub fn add(&mut self, m: &crate::format::Manifest) {
        self.snapshots += 1;
        self.objects += m
            .chunks
            .iter()
            .flatten()
            .filter(|r| r.snapshot == m.snapshot)
            .count() as u64;
        self.first_close_ms.get_or_insert(m.closed_ms);
        self.last_close_ms = Some(m.closed_ms);
        self.volume_bytes = m.volume_bytes;
        self.bytes = m.volume_bytes;
        self.chunks = m.chunks.len() as u64;
    }

    /// Snapshots a month, from the closes seen (the prior until two).
    pub fn snapshots_per_month(&self) -> f64 {
        match (self.first_close_ms, self.last_close_ms) {
            (Some(a), Some(b)) if self.snapshots >= 2 && b > a => {
                MONTH_MS / ((b - a) as f64 / (self.snapshots - 1) as f64)
            }
            _ => PRIOR_SNAPSHOTS_PER_MONTH,
        }
    }
}

/// A destination's forecast monthly cost, by part.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Forecast {
    pub storage: f64,
    pub puts: f64,
    pub restores: f64,
}

impl Forecast {
    pub fn total(&self) -> f64 {
        self.storage + self.puts + self.restores
    }
}

impl fmt::Display for Forecast {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:.2} USD/month (storage {:.2}, puts {:.2}, restores {:.2})",
            self.total(),
            self.storage,
            self.puts,
            self.restores
        )
    }
}

/// The monthly cost at a destination priced `p` of keeping what `u` shows
/// stored, of the puts its snapshots make, and of `restores_per_month`
/// whole restores (a GET per chunk, the volume's bytes out).
pub fn forecast(p: &Price, u: &Usage, restores_per_month: f64) -> Forecast {
    let per_snapshot = if u.snapshots == 0 {
        0.0
    } else {
        u.objects as f64 / u.snapshots as f64
    };
    Forecast {
        storage: p.storage_gib_month * u.bytes as f64 / GIB,
        puts: p.put_per_1000 * per_snapshot * u.snapshots_per_month() / 1000.0,
        restores: restores_per_month
            * (p.get_per_1000 * u.chunks as f64 / 1000.0
                + p.egress_gib * u.volume_bytes as f64 / GIB),
    }
}

/// The destination for the next snapshot: `current` unless another's
/// forecast is lower by [`SWITCH_MARGIN`] of it; with nothing measured
/// yet (no current), the lowest storage price. Ties go to the first.
pub fn choose(
    prices: &[Price],
    u: &Usage,
    restores_per_month: f64,
    current: Option<usize>,
) -> usize {
    let costs: Vec<f64> = prices
        .iter()
        .map(|p| forecast(p, u, restores_per_month).total())
        .collect();
    let Some(cur) = current else {
        return (0..prices.len())
            .min_by(|&a, &b| {
                prices[a]
                    .storage_gib_month
                    .total_cmp(&prices[b].storage_gib_month)
            })
            .unwrap_or(0);
    };
    let best = (0..prices.len())
        .min_by(|&a, &b| costs[a].total_cmp(&costs[b]))
        .unwrap_or(cur);
    if costs[best] < costs[cur] * (1.0 - SWITCH_MARGIN) {
        best
    } else {
        cur
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_price_spec_parses_and_bad_ones_say_why() {
        let p = Price::parse("storage=0.023, put=0.005,get=0.0004,egress=0.09").unwrap();
        assert_eq!(
            p,
            Price {
                storage_gib_month: 0.023,
                put_per_1000: 0.005,
                get_per_1000: 0.0004,
                egress_gib: 0.09
            }
        );
        assert_eq!(Price::parse("storage=1").unwrap().put_per_1000, 0.0);
        for (bad, why) in [
            ("storage", "give FIELD=AMOUNT"),
            ("storage=-1", "a number >= 0"),
            ("storage=x", "a number >= 0"),
            ("storage=inf", "a number >= 0"),
            ("disk=1", "invalid price field \"disk\""),
        ] {
            let e = Price::parse(bad).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn the_forecast_adds_storage_puts_and_restores() {
        let p = Price {
            storage_gib_month: 2.0,
            put_per_1000: 1.0,
            get_per_1000: 0.5,
            egress_gib: 0.1,
        };
        // 3 snapshots an hour apart (720 a month), 10 objects each, 1 GiB
        // stored, a 4 GiB volume of 1024 chunks, 2 restores a month.
        let u = Usage {
            bytes: 1 << 30,
            objects: 30,
            snapshots: 3,
            first_close_ms: Some(0),
            last_close_ms: Some(2 * 3600 * 1000),
            volume_bytes: 4 << 30,
            chunks: 1024,
        };
        assert!((u.snapshots_per_month() - 720.0).abs() < 1e-9);
        let f = forecast(&p, &u, 2.0);
        assert!((f.storage - 2.0).abs() < 1e-9);
        assert!((f.puts - 7.2).abs() < 1e-9, "10 x 720 puts: {f}");
        assert!((f.restores - 2.0 * (0.512 + 0.4)).abs() < 1e-9, "{f}");
        assert!(f.to_string().starts_with("11.02 USD/month"), "{f}");
    }

    #[test]
    fn the_cheapest_wins_past_the_margin() {
        let cheap_storage = Price {
            storage_gib_month: 0.01,
            put_per_1000: 5.0,
            ..Price::default()
        };
        let cheap_puts = Price {
            storage_gib_month: 0.02,
            put_per_1000: 0.005,
            ..Price::default()
        };
        let prices = [cheap_storage, cheap_puts];
        // Nothing measured: the cheapest storage.
        assert_eq!(choose(&prices, &Usage::default(), 1.0, None), 0);
        // Many small objects: the puts dominate.
        let small = Usage {
            bytes: 4 << 20,
            objects: 4,
            snapshots: 1,
            ..Usage::default()
        };
        assert_eq!(choose(&prices, &small, 1.0, Some(0)), 1);
        // Much data, few puts: storage dominates.
        let big = Usage {
            bytes: 1 << 40,
            objects: 1,
            snapshots: 1,
            ..Usage::default()
        };
        assert_eq!(choose(&prices, &big, 1.0, Some(1)), 0);
        // A saving under the margin does not move.
        let near = [
            Price {
                storage_gib_month: 1.0,
                ..Price::default()
            },
            Price {
                storage_gib_month: 0.95,
                ..Price::default()
            },
        ];
        assert_eq!(choose(&near, &big, 0.0, Some(0)), 0);
        assert_eq!(choose(&near, &big, 0.0, None), 1);
    }
}
