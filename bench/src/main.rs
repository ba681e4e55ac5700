//! `tally-bench`: tally's figures next to the physical limit, measured in the same run.
//!
//! Every throughput row is paired with a baseline measured moments before on the same
//! machine (a bare QUIC echo with the same TLS and frame sizes, raw sled inserts with the
//! same group commit), and reported as a ratio, so machine noise mostly cancels. Targets
//! are checked on ratios and printed; nothing here fails on a slow machine, except a
//! workload that does not run at all.
//!
//! `--quick` runs every workload briefly at small sizes (CI keeps the harness working);
//! the full run takes minutes and is what BENCHMARKS.md records.

mod cluster;
mod echo;
mod scale;
mod store;
mod workload;

use clap::Parser;
use serde::Serialize;
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "tally-bench",
    about = "tally benchmarks against the physical limit"
)]
struct Cli {
    /// A few seconds in all, small sizes: checks the harness, not the figures.
    #[arg(long)]
    quick: bool,
    /// Write the rows as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Run only these groups (comma-separated): network, store, disk, reports, scale,
    /// cluster.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Connections in the scale group (default 10,000; 100 with --quick). Smaller runs
    /// help when profiling the daemon's memory per connection.
    #[arg(long)]
    scale_conns: Option<usize>,
    /// `idle_timeout_secs` of the cluster group's servers (default 15, tallyd's own; 5
    /// with --quick): a client notices a killed leader after about this long.
    #[arg(long)]
    cluster_idle_secs: Option<u64>,
    /// Leader kills in the cluster group's failover rows (default 5; 1 with --quick).
    #[arg(long)]
    failover_rounds: Option<usize>,
    /// Internal: serve the echo baseline in this process until stdin closes (the scale
    /// group measures a bare QUIC server's memory in a process of its own).
    #[arg(long, hide = true)]
    echo_server: bool,
}

/// One measured row.
#[derive(Debug, Clone, Serialize, Default)]
pub struct Row {
    /// What was measured.
    pub name: String,
    /// Operations per second.
    pub throughput: Option<f64>,
    /// Latency percentiles, microseconds.
    pub p50_us: Option<f64>,
    /// 99th percentile, microseconds.
    pub p99_us: Option<f64>,
    /// Worst, microseconds.
    pub max_us: Option<f64>,
    /// Resident memory, MiB.
    pub rss_mib: Option<f64>,
    /// Bytes on disk, MiB.
    pub disk_mib: Option<f64>,
    /// Seconds, for one-off timings (the median, when several rounds measured it).
    pub seconds: Option<f64>,
    /// The fewest seconds of several rounds.
    pub seconds_min: Option<f64>,
    /// The most seconds of several rounds.
    pub seconds_max: Option<f64>,
    /// The baseline row's name.
    pub baseline: Option<String>,
    /// This row's figure divided by the baseline's.
    pub ratio: Option<f64>,
    /// The target, in words.
    pub target: Option<String>,
    /// Whether the target was met.
    pub met: Option<bool>,
}

/// Sizes for a run.
#[derive(Debug, Clone, Copy)]
pub struct Sizes {
    /// Seconds per throughput workload and round.
    pub secs: f64,
    /// Rounds of every network workload (echo and tally alternate).
    pub rounds: usize,
    /// Checkout/checkin cycles for the disk figure.
    pub disk_cycles: u64,
    /// Journal events for the report figure.
    pub report_events: u64,
    /// Connections for the scale figure.
    pub scale_conns: usize,
    /// Leases per connection for the scale figure.
    pub scale_leases_per_conn: usize,
    /// Heartbeat interval during the scale figure, seconds.
    pub scale_heartbeat_secs: u64,
    /// The cluster group's `idle_timeout_secs`: how long a client takes to notice a
    /// killed server (tallyd's default, 15 s, in a full run).
    pub cluster_idle_secs: u64,
    /// Leader kills in the failover rows.
    pub failover_rounds: usize,
    /// Clients holding a seat each while the leader is killed.
    pub failover_holders: usize,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if cli.echo_server {
        return echo::serve_until_stdin_closes();
    }
    let sizes = if cli.quick {
        Sizes {
            secs: 0.3,
            rounds: 1,
            disk_cycles: 20_000,
            report_events: 20_000,
            scale_conns: 100,
            scale_leases_per_conn: 10,
            scale_heartbeat_secs: 2,
            cluster_idle_secs: 5,
            failover_rounds: 1,
            failover_holders: 4,
        }
    } else {
        Sizes {
            secs: 3.0,
            rounds: 3,
            disk_cycles: 1_000_000,
            report_events: 1_000_000,
            scale_conns: 10_000,
            scale_leases_per_conn: 10,
            scale_heartbeat_secs: 30,
            cluster_idle_secs: 15,
            failover_rounds: 5,
            failover_holders: 16,
        }
    };
    let sizes = Sizes {
        scale_conns: cli.scale_conns.unwrap_or(sizes.scale_conns),
        cluster_idle_secs: cli.cluster_idle_secs.unwrap_or(sizes.cluster_idle_secs),
        failover_rounds: cli.failover_rounds.unwrap_or(sizes.failover_rounds),
        ..sizes
    };
    let wants = |g: &str| cli.only.is_empty() || cli.only.iter().any(|o| o == g);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let mut rows = Vec::new();
    if wants("network") {
        rows.extend(runtime.block_on(workload::network(sizes))?);
    }
    if wants("store") {
        rows.extend(store::group_commit(sizes)?);
    }
    if wants("disk") {
        rows.extend(store::disk(sizes)?);
    }
    if wants("reports") {
        rows.extend(store::reports(sizes)?);
    }
    if wants("scale") {
        rows.extend(runtime.block_on(scale::scale(sizes))?);
    }
    if wants("cluster") {
        rows.extend(runtime.block_on(cluster::cluster(sizes))?);
    }
    print_table(&rows);
    if let Some(path) = cli.json {
        std::fs::write(&path, serde_json::to_string_pretty(&rows)?)?;
        println!("rows written to {}", path.display());
    }
    let missed = rows.iter().filter(|r| r.met == Some(false)).count();
    println!(
        "{} row(s), {} target(s) met, {missed} missed{}",
        rows.len(),
        rows.iter().filter(|r| r.met == Some(true)).count(),
        if cli.quick {
            " (quick mode: sizes too small for the targets to mean much)"
        } else {
            ""
        }
    );
    Ok(())
}

fn fmt(v: Option<f64>, digits: usize) -> String {
    v.map(|v| format!("{v:.digits$}"))
        .unwrap_or_else(|| "-".into())
}

fn print_table(rows: &[Row]) {
    println!(
        "{:<46} {:>11} {:>9} {:>9} {:>9} {:>8} {:>8} {:>7} {:>7}  target",
        "row", "ops/s", "p50 µs", "p99 µs", "max µs", "RSS MiB", "disk MiB", "secs", "ratio",
    );
    for r in rows {
        let mut target = match (&r.target, r.met) {
            (Some(t), Some(true)) => format!("{t}: met"),
            (Some(t), Some(false)) => format!("{t}: MISSED"),
            (Some(t), None) => t.clone(),
            _ => String::new(),
        };
        if let (Some(min), Some(max)) = (r.seconds_min, r.seconds_max) {
            target = format!("min {min:.2} s, max {max:.2} s (secs: median){target}");
        }
        println!(
            "{:<46} {:>11} {:>9} {:>9} {:>9} {:>8} {:>8} {:>7} {:>7}  {}",
            r.name,
            fmt(r.throughput, 0),
            fmt(r.p50_us, 0),
            fmt(r.p99_us, 0),
            fmt(r.max_us, 0),
            fmt(r.rss_mib, 1),
            fmt(r.disk_mib, 1),
            fmt(r.seconds, 2),
            fmt(r.ratio, 2),
            target
        );
    }
}

/// Latency percentiles of a sample, microseconds.
pub fn percentiles(mut us: Vec<f64>) -> (Option<f64>, Option<f64>, Option<f64>) {
    if us.is_empty() {
        return (None, None, None);
    }
    us.sort_by(|a, b| a.total_cmp(b));
    let at = |q: f64| us[((us.len() as f64 - 1.0) * q).round() as usize];
    (Some(at(0.5)), Some(at(0.99)), us.last().copied())
}

/// Resident memory of a process, MiB.
pub fn rss_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(kb / 1024.0)
}

/// Bytes of a directory tree, MiB.
pub fn dir_mib(path: &std::path::Path) -> f64 {
    fn walk(p: &std::path::Path) -> u64 {
        match std::fs::metadata(p) {
            Ok(m) if m.is_dir() => std::fs::read_dir(p)
                .map(|d| d.filter_map(|e| e.ok()).map(|e| walk(&e.path())).sum())
                .unwrap_or(0),
            Ok(m) => m.len(),
            Err(_) => 0,
        }
    }
    walk(path) as f64 / (1024.0 * 1024.0)
}
