//! Storage figures: group commit against raw sled, disk growth over a million cycles,
//! and exporting and verifying a million-event report.

use crate::{dir_mib, Row, Sizes};
use std::time::Instant;
use tally_daemon::journal::{build_report, usage_event, ReportIdentity};
use tally_daemon::ledger::{Event, ReleaseReason};
use tally_daemon::store::Store;
use tally_protocol::keys::SecretKey;
use tally_protocol::lease::{LeaseId, LeaseRecord, LeaseSecret};
use tally_protocol::report::JournalEntry;
use tally_protocol::time::UnixTime;
use tally_protocol::wire::ClientIdentity;

/// Operations per flush, as the ledger task batches them under load.
const GROUP: u64 = 64;

fn record(i: u64) -> LeaseRecord {
    LeaseRecord {
        id: LeaseId(i),
        secret: LeaseSecret([7; 16]),
        feature: "solver".into(),
        count: 1,
        holder: ClientIdentity {
            user: format!("user{}", i % 500),
            host: format!("ws-{}", i % 200),
            pid: (i % 30_000) as u32,
            program: "solver".into(),
            display: None,
        },
        granted_at: UnixTime(1_800_000_000 + i),
        ttl_secs: 90,
        version: None,
        linger_secs: 0,
        overdraft: false,
        borrowed_until: None,
    }
}

/// Raw sled inserts with one flush per 64, against tally's grant path (lease + journal).
pub fn group_commit(sizes: Sizes) -> anyhow::Result<Vec<Row>> {
    let n: u64 = if sizes.secs < 1.0 { 10_000 } else { 200_000 };
    let dir = tempfile::tempdir()?;
    let db = sled::Config::new()
        .path(dir.path().join("raw"))
        .cache_capacity(64 * 1024 * 1024)
        .open()?;
    // The same flush as the store's: sled's flush, then fdatasync of its log file
    // (sled's own flush stops at sync_file_range; see tally_daemon::store).
    let log = std::fs::File::open(dir.path().join("raw").join("db"))?;
    let flush = || -> anyhow::Result<()> {
        db.flush()?;
        log.sync_data()?;
        Ok(())
    };
    let value = vec![0x42u8; 96];
    let start = Instant::now();
    for i in 0..n {
        db.insert(i.to_be_bytes(), value.as_slice())?;
        if i % GROUP == GROUP - 1 {
            flush()?;
        }
    }
    flush()?;
    let raw = n as f64 / start.elapsed().as_secs_f64();
    let store = Store::open(&dir.path().join("tally"))?;
    let start = Instant::now();
    let mut events = Vec::new();
    let mut journal = Vec::new();
    for i in 0..n {
        let event = Event::Granted(record(i));
        journal.push(JournalEntry {
            seq: i + 1,
            at: UnixTime(1_800_000_000 + i),
            event: usage_event(&event),
        });
        events.push(event);
        if i % GROUP == GROUP - 1 {
            store.append_journal(&journal)?;
            store.apply(&events)?;
            store.flush_blocking()?;
            journal.clear();
            events.clear();
        }
    }
    store.append_journal(&journal)?;
    store.apply(&events)?;
    store.flush_blocking()?;
    let tally = n as f64 / start.elapsed().as_secs_f64();
    Ok(vec![
        Row {
            name: "baseline sled insert, flush per 64".into(),
            throughput: Some(raw),
            ..Row::default()
        },
        Row {
            name: "tally durable grant (lease + journal), flush per 64".into(),
            throughput: Some(tally),
            baseline: Some("baseline sled insert, flush per 64".into()),
            ratio: Some(tally / raw),
            ..Row::default()
        },
    ])
}

/// Disk after N checkout/checkin cycles with a report exported (and the exported journal
/// compacted) every 100,000 cycles (200,000 events), as a daemon with scheduled reports does.
pub fn disk(sizes: Sizes) -> anyhow::Result<Vec<Row>> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("store");
    let store = Store::open(&path)?;
    let identity = ReportIdentity {
        key: SecretKey::from_seed([9; 32]),
        host_fingerprint: "bench".into(),
        customers: vec!["bench".into()],
        bundle_ids: vec!["bench".into()],
    };
    let mut state = store.report_state()?;
    let mut seq = 0u64;
    let mut events = Vec::new();
    let mut journal = Vec::new();
    let export_every = (sizes.disk_cycles / 10).clamp(1_000, 100_000) * 2;
    let start = Instant::now();
    for i in 0..sizes.disk_cycles {
        let at = UnixTime(1_800_000_000 + i);
        let granted = Event::Granted(record(i));
        let released = Event::Released {
            id: LeaseId(i),
            feature: "solver".into(),
            count: 1,
            holder: "user@ws".into(),
            why: ReleaseReason::Checkin,
        };
        for e in [granted, released] {
            seq += 1;
            journal.push(JournalEntry {
                seq,
                at,
                event: usage_event(&e),
            });
            events.push(e);
        }
        if i % GROUP == GROUP - 1 {
            store.append_journal(&journal)?;
            store.apply(&events)?;
            store.flush_blocking()?;
            journal.clear();
            events.clear();
        }
        if seq.is_multiple_of(export_every) {
            store.append_journal(&journal)?;
            store.apply(&events)?;
            journal.clear();
            events.clear();
            let (entries, _) = store.journal_after(state.last_event)?;
            let exported = build_report(&identity, &state, entries, at);
            store.save_report_state(&exported.state)?;
            store.compact_journal(exported.state.last_event, UnixTime(u64::MAX))?;
            store.flush_blocking()?;
            state = exported.state;
        }
    }
    store.append_journal(&journal)?;
    store.apply(&events)?;
    store.flush_blocking()?;
    let secs = start.elapsed().as_secs_f64();
    let before = dir_mib(&path);
    let (entries, _) = store.journal_after(state.last_event)?;
    let exported = build_report(&identity, &state, entries, UnixTime(u64::MAX / 2));
    store.save_report_state(&exported.state)?;
    store.compact_journal(exported.state.last_event, UnixTime(u64::MAX))?;
    store.flush_blocking()?;
    drop(store);
    let after = dir_mib(&path);
    let n = sizes.disk_cycles;
    Ok(vec![
        Row {
            name: format!("sled after {n} checkout/checkin cycles"),
            throughput: Some(n as f64 / secs),
            disk_mib: Some(before),
            seconds: Some(secs),
            target: Some("<= 64 MiB".into()),
            met: Some(before <= 64.0),
            ..Row::default()
        },
        Row {
            name: "sled after a final export + compaction".into(),
            disk_mib: Some(after),
            ..Row::default()
        },
    ])
}

/// Exports and verifies a report of N journal events.
pub fn reports(sizes: Sizes) -> anyhow::Result<Vec<Row>> {
    let dir = tempfile::tempdir()?;
    let store = Store::open(&dir.path().join("store"))?;
    let mut batch = Vec::with_capacity(10_000);
    for i in 0..sizes.report_events {
        let e = if i % 2 == 0 {
            Event::Granted(record(i / 2))
        } else {
            Event::Released {
                id: LeaseId(i / 2),
                feature: "solver".into(),
                count: 1,
                holder: "ana@ws".into(),
                why: ReleaseReason::Checkin,
            }
        };
        batch.push(JournalEntry {
            seq: i + 1,
            at: UnixTime(1_800_000_000 + i / 2),
            event: usage_event(&e),
        });
        if batch.len() == 10_000 {
            store.append_journal(&batch)?;
            batch.clear();
        }
    }
    store.append_journal(&batch)?;
    store.flush_blocking()?;
    let key = SecretKey::from_seed([9; 32]);
    let identity = ReportIdentity {
        key: key.clone(),
        host_fingerprint: "bench".into(),
        customers: vec!["bench".into()],
        bundle_ids: vec!["bench".into()],
    };
    let start = Instant::now();
    let state = store.report_state()?;
    let (entries, _) = store.journal_after(state.last_event)?;
    let exported = build_report(&identity, &state, entries, UnixTime(1_900_000_000));
    store.save_report_state(&exported.state)?;
    store.flush_blocking()?;
    let export_secs = start.elapsed().as_secs_f64();
    let file = dir.path().join("bench.report");
    std::fs::write(&file, &exported.text)?;
    let size = exported.text.len() as f64 / (1024.0 * 1024.0);
    let bundle = crate::workload::bench_bundle(&key, "bench", 10);
    let start = Instant::now();
    let text = std::fs::read_to_string(&file)?;
    let links = tally_publisher::reconcile::verify_chain(
        &bundle,
        &[tally_publisher::reconcile::ReportFile {
            name: "bench.report".into(),
            text,
        }],
    )
    .map_err(|p| anyhow::anyhow!(p.join("; ")))?;
    let verify_secs = start.elapsed().as_secs_f64();
    anyhow::ensure!(links[0].report.report.events.len() as u64 == sizes.report_events);
    let n = sizes.report_events;
    Ok(vec![
        Row {
            name: format!("export report of {n} events (sled -> signed)"),
            seconds: Some(export_secs),
            throughput: Some(n as f64 / export_secs),
            disk_mib: Some(size),
            ..Row::default()
        },
        Row {
            name: format!("verify report of {n} events"),
            seconds: Some(verify_secs),
            throughput: Some(n as f64 / verify_secs),
            target: Some("<= 3 s for 1,000,000".into()),
            met: Some(verify_secs * 1_000_000.0 / n as f64 <= 3.0),
            ..Row::default()
        },
    ])
}
