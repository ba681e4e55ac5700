//! What the operations endpoint counts and shows: denials, reloads, the store's
//! health, connection refusals and the heartbeat latency histogram. Written by the
//! ledger task and the connection tasks, read by `http`.

use std::fmt::Write;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use tally_protocol::time::UnixTime;
use tally_protocol::wire::{ClientIdentity, DenialReason, Refused, UNLICENSED_FEATURE};

/// Counters the operations endpoint shows.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Denials by (feature, reason code); features no bundle licenses count under
    /// [`UNLICENSED_FEATURE`], so the map is bounded by the licensed names times the
    /// reason codes, whatever names clients make up.
    pub denials: Mutex<std::collections::BTreeMap<(String, String), u64>>,
    /// The feature names the ledger served at any time since the start (added to at
    /// each reload, never taken from: a feature that ended with a trial is still
    /// worth naming in a denial). Bounded by what the vendor's bundles name.
    pub licensed: RwLock<Arc<std::collections::BTreeSet<String>>>,
    /// The most recent denials, newest last.
    pub recent: Mutex<std::collections::VecDeque<RecentDenial>>,
    /// How long heartbeat requests took to answer (a histogram for `/metrics`).
    pub heartbeat_latency: LatencyHistogram,
    /// Why the seat store cannot be written, while it cannot.
    pub store_error: Mutex<Option<String>>,
    /// Connection attempts refused by the limits.
    pub connections_refused: AtomicU64,
    /// Connection attempts asked to validate their address first.
    pub connections_retried: AtomicU64,
    /// Bundle files refused and the last reload's outcome.
    pub reloads: Mutex<ReloadRecord>,
}

/// What the operations endpoint shows of bundle loading: the refusals of the bundle
/// set in force (from the start, or from the last reload that read the directory),
/// the last reload, and counters for Prometheus.
#[derive(Debug, Default, Clone)]
pub struct ReloadRecord {
    /// Bundle files refused by the load in force.
    pub refused: Vec<Refused>,
    /// The last reload (SIGHUP, `tally admin reload`, the dashboard); `None` before any.
    pub last: Option<LastReload>,
    /// When bundles were last loaded with nothing refused (the start counts).
    pub last_success: Option<UnixTime>,
    /// Reloads that refused a bundle or failed.
    pub failures: u64,
}

/// The last reload, as `/api/status` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LastReload {
    /// When it ran.
    pub at: UnixTime,
    /// Whether everything loaded.
    pub ok: bool,
    /// One line for a person.
    pub summary: String,
}

/// A denial as the dashboard lists it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RecentDenial {
    /// When.
    pub at: String,
    /// The feature.
    pub feature: String,
    /// Who.
    pub user: String,
    /// Where.
    pub host: String,
    /// Why, for people.
    pub reason: String,
}

/// How many recent denials the dashboard keeps.
const RECENT_DENIALS: usize = 50;

impl Metrics {
    /// Records whether the store can be written (`None`) or why not.
    pub fn set_store_error(&self, error: Option<&str>) {
        *self.store_error.lock().expect("metrics lock") = error.map(str::to_string);
    }

    /// Adds feature names that get counters (and journal rows) of their own.
    pub fn set_licensed(&self, names: std::collections::BTreeSet<String>) {
        let mut licensed = self.licensed.write().expect("metrics lock");
        if !names.is_subset(&licensed) {
            let mut all = (**licensed).clone();
            all.extend(names);
            *licensed = Arc::new(all);
        }
    }

    /// The name a denial of `feature` counts under: itself if licensed (now or
    /// earlier in this run), else [`UNLICENSED_FEATURE`].
    pub fn counted_as<'a>(&self, feature: &'a str) -> &'a str {
        if self
            .licensed
            .read()
            .expect("metrics lock")
            .contains(feature)
        {
            feature
        } else {
            UNLICENSED_FEATURE
        }
    }

    /// Counts a denial under the name it counts as, and keeps it among the recent.
    pub(crate) fn denied(
        &self,
        at: UnixTime,
        feature: &str,
        holder: &ClientIdentity,
        reason: &DenialReason,
    ) {
        let key = (
            self.counted_as(feature).to_string(),
            reason.code().to_string(),
        );
        *self
            .denials
            .lock()
            .expect("metrics lock")
            .entry(key)
            .or_default() += 1;
        let mut recent = self.recent.lock().expect("metrics lock");
        if recent.len() >= RECENT_DENIALS {
            recent.pop_front();
        }
        recent.push_back(RecentDenial {
            at: at.to_string(),
            feature: feature.to_string(),
            user: holder.user.clone(),
            host: holder.host.clone(),
            reason: reason.to_string(),
        });
    }
}

/// Upper bounds (inclusive, in microseconds) of the heartbeat latency histogram's
/// buckets: 0.5 ms to 5 s. A heartbeat is answered by the ledger task without waiting
/// for a flush, so most land in the first buckets; the upper ones show a stalled task.
pub const LATENCY_BUCKETS_MICROS: [u64; 13] = [
    500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000,
    2_500_000, 5_000_000,
];

/// A Prometheus histogram of durations with the [`LATENCY_BUCKETS_MICROS`] bounds:
/// lock-free, so the connection tasks that answer heartbeats never wait on each other.
#[derive(Debug, Default)]
pub struct LatencyHistogram {
    /// Observations per bucket (not cumulative), the last one for "above every bound".
    buckets: [std::sync::atomic::AtomicU64; LATENCY_BUCKETS_MICROS.len() + 1],
    /// Observations in all.
    count: std::sync::atomic::AtomicU64,
    /// Sum of the observations, in microseconds (584,000 years fit in a u64).
    sum_micros: std::sync::atomic::AtomicU64,
}

impl LatencyHistogram {
    /// Records one duration.
    pub fn observe(&self, took: Duration) {
        use std::sync::atomic::Ordering::Relaxed;
        let micros = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        let i = LATENCY_BUCKETS_MICROS.partition_point(|&bound| bound < micros);
        self.buckets[i].fetch_add(1, Relaxed);
        self.sum_micros.fetch_add(micros, Relaxed);
        self.count.fetch_add(1, Relaxed);
    }

    /// Observations recorded so far.
    pub fn count(&self) -> u64 {
        self.count.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Writes the histogram as `name` (a base name in seconds) in the text format:
    /// cumulative `_bucket{le=..}` lines ending with `+Inf`, then `_sum` and `_count`.
    /// `_count` is the `+Inf` bucket itself, so the two agree even mid-update.
    pub(crate) fn render(&self, out: &mut String, name: &str, help: &str) {
        use std::sync::atomic::Ordering::Relaxed;
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (i, bound) in LATENCY_BUCKETS_MICROS.iter().enumerate() {
            cumulative += self.buckets[i].load(Relaxed);
            let _ = writeln!(
                out,
                "{name}_bucket{{le=\"{}\"}} {cumulative}",
                *bound as f64 / 1e6
            );
        }
        cumulative += self.buckets[LATENCY_BUCKETS_MICROS.len()].load(Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {cumulative}");
        let sum = self.sum_micros.load(Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum {sum}\n{name}_count {cumulative}");
    }
}

#[cfg(test)]
mod tests {
    use super::Metrics;
    use tally_protocol::time::UnixTime;
    use tally_protocol::wire::{ClientIdentity, DenialReason, UNLICENSED_FEATURE};

    /// Issue 20, scenario 4: every denial, rate-limited ones included, added a counter
    /// under the name the client chose.
    #[test]
    fn denial_counters_are_keyed_by_licensed_names_only() {
        let m = Metrics::default();
        m.set_licensed(["solver".to_string()].into());
        // A reload that drops a feature keeps its counters' name.
        m.set_licensed(["viewer".to_string()].into());
        let who = ClientIdentity {
            user: "mallory".into(),
            host: "ws".into(),
            pid: 1,
            program: "p".into(),
            display: None,
        };
        let limited = DenialReason::RateLimited { retry_after_ms: 5 };
        for i in 0..1_000 {
            m.denied(UnixTime(0), &format!("junk-{i}"), &who, &limited);
        }
        m.denied(UnixTime(0), "solver", &who, &limited);
        m.denied(UnixTime(0), "viewer", &who, &limited);
        let denials = m.denials.lock().unwrap();
        let keys: Vec<&str> = denials.keys().map(|(f, _)| f.as_str()).collect();
        assert_eq!(keys, vec![UNLICENSED_FEATURE, "solver", "viewer"]);
        assert_eq!(
            denials[&(UNLICENSED_FEATURE.to_string(), "rate_limited".to_string())],
            1_000
        );
        assert_eq!(m.recent.lock().unwrap().len(), 50);
    }
}
