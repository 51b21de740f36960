//! The floor under the tunnel's idle ping. A ping and its reply each cross the database
//! as a `send` whose commit must be durable before the receiver's `recv` can see it: two
//! durable commits, each with its client round trip, whatever pgvpn does around them.
//! Measured the pgbench way: a one-row `INSERT` that commits on its own, from one
//! client over the unix socket, paced (one every [`INTERVAL`], as idle pings are) so
//! that each commit meets an idle WAL writer and disk, as a ping does.

use super::measure::percentile;
use super::{check_interrupt, Result};
use pgvpn_tests::{db_error, Cluster};
use std::time::{Duration, Instant};

pub const INTERVAL: Duration = Duration::from_millis(10);

#[derive(Clone, Copy, Debug)]
pub struct Floor {
    pub samples: usize,
    /// One INSERT + commit, client side.
    pub commit_p50_ms: f64,
    pub commit_p99_ms: f64,
}

impl Floor {
    /// Two durable commits plus their round trips.
    pub fn floor_ms(&self) -> f64 {
        2.0 * self.commit_p50_ms
    }
}

pub fn measure(cluster: &Cluster, db: &str, samples: usize) -> Result<Floor> {
    let mut c = cluster.superuser(db);
    c.batch_execute(
        "CREATE SCHEMA IF NOT EXISTS bench_floor;
         CREATE TABLE IF NOT EXISTS bench_floor.commits (at timestamptz NOT NULL DEFAULT now(), v int NOT NULL);
         SET synchronous_commit = on",
    )
    .map_err(|e| db_error(&e))?;
    let insert = c
        .prepare("INSERT INTO bench_floor.commits (v) VALUES ($1)")
        .map_err(|e| db_error(&e))?;
    let mut times = Vec::with_capacity(samples);
    let mut next = Instant::now();
    for i in 0..samples {
        check_interrupt()?;
        next += INTERVAL;
        if let Some(d) = next.checked_duration_since(Instant::now()) {
            std::thread::sleep(d);
        }
        let t = Instant::now();
        c.execute(&insert, &[&(i as i32)])
            .map_err(|e| db_error(&e))?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    Ok(Floor {
        samples,
        commit_p50_ms: percentile(&times, 50.0),
        commit_p99_ms: percentile(&times, 99.0),
    })
}
