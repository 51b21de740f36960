//! LISTEN → `pgvpn.recv()` → tun → `pgvpn.ack()`, on one connection.

use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use crate::config::Config;
use crate::device::Tun;
use crate::session::{self, describe, retry_open, Downlink, ErrorClass, GaveUp, RECV_PAGE};
use crate::stats::Stats;
use crate::Shared;

/// Longest long poll in `pgvpn.recv`, so a stop request is noticed promptly.
const STOP_CHECK: Duration = Duration::from_millis(100);

/// Where delivery stands. Survives reconnects: after one, recv resumes after
/// `last_written` (not the stored cursor, which may lag and would cause duplicates).
#[derive(Debug)]
pub struct Progress {
    pub last_written: i64,
    pub last_acked: i64,
    /// When the oldest packet not yet acked was written. The ack clock starts there, not
    /// at the last ack: after an idle spell, the first packet's ack then waits its turn
    /// instead of costing a durable commit right on the latency path.
    pub first_unacked_at: Option<Instant>,
    /// Packets written since the last ack.
    pub unacked: u64,
}

impl Progress {
    pub fn new(cursor: i64) -> Progress {
        Progress {
            last_written: cursor,
            last_acked: cursor,
            first_unacked_at: None,
            unacked: 0,
        }
    }

    /// Records a packet written to the tun device.
    pub fn written(&mut self, id: i64, now: Instant) {
        self.last_written = id;
        self.unacked += 1;
        self.first_unacked_at.get_or_insert(now);
    }

    /// True when the cursor should be stored now: something is unacked and either
    /// `ack_every` packets have been written or the oldest of them is `ack_interval` old.
    pub fn ack_due(&self, now: Instant, cfg: &Config) -> bool {
        self.last_written > self.last_acked
            && (self.unacked >= cfg.ack_every
                || self.until_ack(now, cfg).is_some_and(|d| d.is_zero()))
    }

    /// How long a wait may last without delaying a pending ack.
    pub fn until_ack(&self, now: Instant, cfg: &Config) -> Option<Duration> {
        self.first_unacked_at
            .filter(|_| self.last_written > self.last_acked)
            .map(|t| (t + cfg.ack_interval).saturating_duration_since(now))
    }
}

/// The downlink thread. `dl` is the connection opened at startup; `progress` starts at its
/// stored cursor.
pub fn run(tun: &Tun, mut dl: Downlink, cfg: &Config, shared: &Shared) {
    let mut p = Progress::new(dl.stored_cursor);
    shared.stats.last_acked_id.store(p.last_acked, Relaxed);
    loop {
        let err = match serve(&mut dl, tun, cfg, shared, &mut p) {
            Ok(()) => break, // stopping
            Err(e) => e,
        };
        let class = session::classify(&err);
        match class {
            ErrorClass::Denied => {
                return shared.fatal(class.exit_code(), format!("downlink: {}", describe(&err)));
            }
            ErrorClass::Other => {
                log::warn!("downlink: {}; reconnecting", describe(&err));
                // Do not spin if the database keeps failing the same call.
                if !session::sleep_unless_stopped(Duration::from_secs(1), &shared.stop) {
                    return;
                }
            }
            ErrorClass::Transient => {
                log::info!("downlink: database connection lost, reconnecting");
                log::debug!("downlink: {}", describe(&err));
            }
        }
        let reopened = retry_open(
            "downlink",
            false,
            || Downlink::open(&cfg.pg),
            |d| session::sleep_unless_stopped(d, &shared.stop),
        );
        match reopened {
            Ok(new) => {
                dl = new;
                Stats::add(&shared.stats.reconnects, 1);
                log::info!(
                    "downlink: reconnected, resuming after id {}",
                    p.last_written
                );
            }
            Err(GaveUp::Stopped) => return, // no connection for a final ack
            Err(GaveUp::Fatal(class, msg)) => {
                return shared.fatal(class.exit_code(), format!("downlink: {msg}"));
            }
        }
    }
    // Stopping: store how far we got, so a restart resumes there.
    if p.last_written > p.last_acked {
        match ack(&mut dl, &mut p, shared) {
            Ok(()) => log::debug!("downlink: final ack at id {}", p.last_acked),
            Err(e) => log::warn!("downlink: final ack failed: {}", describe(&e)),
        }
    }
}

/// Runs until the shim stops (Ok) or the connection fails (Err).
fn serve(
    dl: &mut Downlink,
    tun: &Tun,
    cfg: &Config,
    shared: &Shared,
    p: &mut Progress,
) -> Result<(), postgres::Error> {
    let stats = &shared.stats;
    let mut warned_write = false;
    // After a full page more is waiting: ask again at once. Otherwise let the database
    // wait for the next packet (woken by our LISTEN), but not past a due ack.
    let mut wait = Duration::ZERO;
    loop {
        if shared.stopping() {
            return Ok(());
        }
        let rows = dl.recv(p.last_written, wait)?;
        Stats::add(&stats.received, rows.len() as u64);
        for row in &rows {
            let id: i64 = row.try_get(0)?;
            let payload: Option<&[u8]> = row.try_get(1)?;
            let res = match payload {
                Some(pkt) => tun.write_packet(pkt).map(|()| pkt.len()),
                None => Err(std::io::Error::other("NULL payload")),
            };
            match res {
                Ok(len) => {
                    Stats::add(&stats.written, 1);
                    Stats::add(&stats.written_bytes, len as u64);
                }
                Err(e) => {
                    // Skipped, not retried: one bad packet must not stall the rest.
                    Stats::add(&stats.write_errors, 1);
                    if !warned_write {
                        log::warn!("downlink: writing packet {id} to {}: {e}", tun.name());
                        warned_write = true;
                    } else {
                        log::debug!("downlink: writing packet {id} to {}: {e}", tun.name());
                    }
                }
            }
            p.written(id, Instant::now());
        }
        if p.ack_due(Instant::now(), cfg) {
            ack(dl, p, shared)?;
        }
        wait = if rows.len() >= RECV_PAGE as usize {
            Duration::ZERO
        } else {
            let now = Instant::now();
            p.until_ack(now, cfg)
                .map_or(STOP_CHECK, |a| a.min(STOP_CHECK))
        };
    }
}

fn ack(dl: &mut Downlink, p: &mut Progress, shared: &Shared) -> Result<(), postgres::Error> {
    let stored = dl.ack(p.last_written)?;
    p.last_acked = stored.max(p.last_written);
    p.first_unacked_at = None;
    p.unacked = 0;
    shared.stats.last_acked_id.store(stored, Relaxed);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(interval_ms: u64, every: u64) -> Config {
        Config {
            pg: postgres::Config::new(),
            addresses: vec![],
            tun: "t".into(),
            mtu: 1500,
            batch_max: 256,
            ack_interval: Duration::from_millis(interval_ms),
            ack_every: every,
        }
    }

    #[test]
    fn ack_policy() {
        let c = cfg(200, 4096);
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut p = Progress::new(10);
        assert!(
            !p.ack_due(t0 + Duration::from_secs(9), &c),
            "nothing written"
        );
        assert_eq!(p.until_ack(t0, &c), None);

        // After an idle spell the first packet is not acked at once: its clock starts now.
        p.written(11, t0);
        assert!(!p.ack_due(t0, &c));
        assert!(!p.ack_due(t0 + ms(199), &c));
        p.written(12, t0 + ms(100));
        assert!(
            p.ack_due(t0 + ms(200), &c),
            "the oldest unacked packet is 200 ms old"
        );
        assert_eq!(p.until_ack(t0 + ms(50), &c), Some(ms(150)));
        assert_eq!(
            p.until_ack(t0 + Duration::from_secs(1), &c),
            Some(Duration::ZERO)
        );

        // ack_every packets: at once.
        let mut q = Progress::new(0);
        for id in 1..=4096 {
            q.written(id, t0);
        }
        assert!(q.ack_due(t0, &c), "ack_every packets written");
        let c3 = cfg(200, 3);
        let mut r = Progress::new(0);
        r.written(1, t0);
        r.written(2, t0);
        assert!(!r.ack_due(t0, &c3));
        r.written(3, t0);
        assert!(r.ack_due(t0, &c3));
    }
}
