//! Devices' news: when each was last heard from and its latest metrics, kept in memory by [`ServerDb`] and written
//! in batches by a [`NewsWriter`], with a thin history of the metrics for the dashboard's charts.

use super::db::{ServerDb, ServerDbError, to_json};
use super::{ConnExt, StoreError};
use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};

use crate::fleet::Metrics;

/// A device's metrics are kept for its charts at most this often.
pub const SAMPLE_EVERY_SECS: u64 = 5 * 60;

/// How long samples are kept at most (the dashboard charts them all): 2,016 rows a device.
pub const SAMPLES_KEPT_SECS: u64 = 7 * 86_400;

/// A device's news not yet written: when it was last heard from, its latest metrics, and whether it has used its
/// credential for the first time (which ends its enrollment's retries; [`ServerDb::enroll`] looks here too).
#[derive(Debug, Clone, Default)]
pub(crate) struct Seen {
    pub(crate) last_seen: u64,
    pub(crate) metrics: Option<Metrics>,
    pub(crate) confirmed: bool,
}

/// What the devices' traffic cost the database, since the server started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriteStats {
    /// Heartbeats received.
    pub heartbeats: u64,
    /// Rows written for `last_seen` and metrics.
    pub seen_writes: u64,
    /// The transactions those rows took.
    pub flushes: u64,
}

/// What devices' requests said of them since the last flush, kept in memory by each server process: a heartbeat
/// costs no write, and a device heard from many times between two flushes is written once. Every connection of
/// the process shares it; replicas each keep their own and write it in their own batches.
#[derive(Default)]
pub struct News {
    seen: Mutex<HashMap<String, Seen>>,
    stats: Mutex<WriteStats>,
}

impl News {
    /// The news not written yet, by device id. Held for map operations only, never across a query.
    pub(crate) fn seen(&self) -> MutexGuard<'_, HashMap<String, Seen>> {
        self.seen.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn count(&self, f: impl FnOnce(&mut WriteStats)) {
        f(&mut self.stats.lock().unwrap_or_else(|e| e.into_inner()));
    }

    pub fn stats(&self) -> WriteStats {
        *self.stats.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes the news of up to `limit` devices out of memory, to be written.
    pub(crate) fn take(&self, limit: usize) -> Vec<(String, Seen)> {
        let mut seen = self.seen();
        let ids: Vec<String> = seen.keys().take(limit).cloned().collect();
        ids.into_iter()
            .filter_map(|id| seen.remove_entry(&id))
            .collect()
    }

    /// Puts back news that could not be written, under what arrived meanwhile, for the next flush.
    pub(crate) fn restore(&self, batch: Vec<(String, Seen)>) {
        let mut seen = self.seen();
        for (id, old) in batch {
            let entry = seen.entry(id).or_default();
            entry.last_seen = entry.last_seen.max(old.last_seen);
            entry.confirmed |= old.confirmed;
            if entry.metrics.is_none() {
                entry.metrics = old.metrics;
            }
        }
    }

    pub(crate) fn count_flush(&self, rows: usize) {
        self.count(|s| {
            s.seen_writes += rows as u64;
            s.flushes += 1;
        });
    }
}

/// The dashboard's charts: a sample when the device's last one is older than SAMPLE_EVERY_SECS (?4 is the time
/// before which it is). The check is a lookup in the table's primary key, so a flush still writes one row per
/// device, and one more every five minutes per device that sends metrics.
const SAMPLE_SQL: &str = "INSERT INTO device_samples (device, at, metrics)
     SELECT ?1, CAST(?2 AS BIGINT), ?3 WHERE NOT EXISTS
       (SELECT 1 FROM device_samples WHERE device = ?1 AND at > ?4)
     ON CONFLICT (device, at) DO NOTHING";

impl ServerDb {
    /// Writes a batch of devices' news in one transaction: on a connection other than SQLite's writer
    /// ([`super::Database::write_news`]), so requests go on meanwhile.
    pub(crate) fn write_news(&self, batch: &[(String, Seen)]) -> Result<(), ServerDbError> {
        let err = self.err::<StoreError>();
        let d = self.conn.dialect();
        let update = format!(
            "UPDATE devices SET last_seen = {}, metrics = coalesce(?3, metrics), confirmed = {} WHERE id = ?1",
            d.greatest("last_seen", "?2"),
            d.greatest("confirmed", "?4"),
        );
        let tx = self.conn.begin().map_err(&err)?;
        for (id, news) in batch {
            let metrics = news.metrics.as_ref().map(to_json).transpose()?;
            tx.execute(
                &update,
                crate::args![id, news.last_seen, metrics, news.confirmed],
            )
            .map_err(&err)?;
            if let Some(m) = &news.metrics {
                let since =
                    i64::try_from(news.last_seen).unwrap_or(i64::MAX) - SAMPLE_EVERY_SECS as i64;
                tx.execute(
                    SAMPLE_SQL,
                    crate::args![id, news.last_seen, chart_sample(m), since],
                )
                .map_err(&err)?;
            }
        }
        tx.commit().map_err(&err)
    }
}

/// What the dashboard charts of a heartbeat's metrics, as JSON without the rest (uptime, load, nulls): a sample
/// row is then about 200 bytes instead of 310, which counts at 2,016 rows a device.
fn chart_sample(m: &Metrics) -> String {
    let mut o = serde_json::Map::new();
    let fields: [(&str, Option<serde_json::Value>); 6] = [
        ("cpu_percent", m.cpu_percent.map(Into::into)),
        ("memory_used", m.memory_used.map(Into::into)),
        ("memory_total", m.memory_total.map(Into::into)),
        ("disk_used", m.disk_used.map(Into::into)),
        ("disk_total", m.disk_total.map(Into::into)),
        ("temperature_celsius", m.temperature_celsius.map(Into::into)),
    ];
    for (k, v) in fields {
        if let Some(v) = v {
            o.insert(k.to_string(), v);
        }
    }
    serde_json::Value::Object(o).to_string()
}

impl ServerDb {
    pub(super) fn count(&self, f: impl FnOnce(&mut WriteStats)) {
        self.news.count(f);
    }

    pub fn write_stats(&self) -> WriteStats {
        self.news.stats()
    }

    /// Deletes the metrics samples taken before `before` among the `limit` oldest rows; how many it deleted.
    /// Rows are added in time order, so the first in the engine's order of insertion are the oldest samples
    /// ([`super::Dialect::insertion_order`]): a slice reads `limit` rows, where a search by `at` (which has no
    /// index on SQLite) would read the whole table, 20 million rows at 10,000 devices, under the server's lock. A
    /// sample written a flush late waits for the next prune.
    pub fn prune_samples(&self, before: u64, limit: usize) -> Result<usize, ServerDbError> {
        let sql = format!(
            "DELETE FROM device_samples WHERE (device, at) IN
               (SELECT device, at FROM
                 (SELECT device, at FROM device_samples ORDER BY {} LIMIT ?2) oldest
                WHERE at < ?1)",
            self.conn.dialect().insertion_order("at")
        );
        self.conn
            .execute(&sql, crate::args![before, limit])
            .map(|n| n as usize)
            .map_err(self.err())
    }
}

#[cfg(test)]
mod tests {
    use super::super::Row;
    use super::super::db::fixtures::{open, request, token};
    use super::*;

    #[test]
    fn samples_are_pruned_oldest_first_a_slice_at_a_time() {
        let (_dir, db) = open();
        let token = token(&db, None, None);
        let a = db.enroll(&token, &request("a"), 0).unwrap();
        let count = |db: &ServerDb| -> usize {
            db.conn
                .one("SELECT count(*) FROM device_samples", crate::args![])
                .unwrap()
        };
        let tx = db.conn.begin().unwrap();
        for at in 0..1000u64 {
            tx.execute(
                "INSERT INTO device_samples (device, at, metrics) VALUES (?1, ?2, '{}')",
                crate::args![&a.device_id, at],
            )
            .unwrap();
        }
        tx.commit().unwrap();
        assert_eq!(db.prune_samples(450, 200).unwrap(), 200);
        assert_eq!(db.prune_samples(450, 200).unwrap(), 200);
        assert_eq!(
            db.prune_samples(450, 200).unwrap(),
            50,
            "stops at the young"
        );
        assert_eq!(db.prune_samples(450, 200).unwrap(), 0);
        assert_eq!(count(&db), 550);
    }

    #[test]
    fn a_flush_writes_news_and_samples_once_per_interval() {
        let (_dir, db) = open();
        let token = token(&db, None, None);
        let a = db.enroll(&token, &request("a"), 0).unwrap();
        let writer = db.sibling().unwrap().unwrap();
        let news = |at: u64| {
            (
                a.device_id.clone(),
                Seen {
                    last_seen: at,
                    metrics: Some(Metrics {
                        cpu_percent: Some(12.5),
                        ..Metrics::default()
                    }),
                    confirmed: true,
                },
            )
        };
        writer.write_news(&[news(1_000)]).unwrap();
        writer
            .write_news(&[news(1_000 + SAMPLE_EVERY_SECS - 1)])
            .unwrap();
        writer
            .write_news(&[news(1_000 + SAMPLE_EVERY_SECS + 1)])
            .unwrap();
        // An older report of the device's time never moves it back.
        writer.write_news(&[news(10)]).unwrap();
        let (last_seen, samples): (u64, u64) = db
            .conn
            .row(
                "SELECT last_seen, (SELECT count(*) FROM device_samples) FROM devices WHERE id = ?1",
                crate::args![&a.device_id],
                Row::read,
            )
            .unwrap()
            .unwrap();
        assert_eq!(last_seen, 1_000 + SAMPLE_EVERY_SECS + 1);
        assert_eq!(samples, 2, "one sample per five minutes");
    }
}
