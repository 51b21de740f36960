//! pgvpn-shim: moves IP packets between a Linux tun device and the pgvpn database.
//!
//! Threads (all scoped, any one ending stops the others):
//! * reader:   tun --poll/read--> bounded queue (drops + counts when full)
//! * sender:   queue --batch--> `pgvpn.send()` on the uplink connection
//! * downlink: `pgvpn.recv()` (a long poll) --> tun write, `pgvpn.ack()` now and then,
//!   on the downlink connection
//! * main:     waits for SIGINT/SIGTERM or a fatal error, then joins and prints the summary.
//! * metrics:  with --metrics, answers HTTP scrapes of the counters (metrics.rs).
//!
//! The modules are in the library (lib.rs); this file only parses flags and wires threads.

mod metrics;

use std::time::Duration;

use clap::Parser;

use metrics::{Timed, TimedUplink};
use pgvpn_shim::backoff::{retry_open, GaveUp};
use pgvpn_shim::config::{Cli, Config};
use pgvpn_shim::db::{PgDownlink, PgUplink, Postgres};
use pgvpn_shim::device::TunDevice;
use pgvpn_shim::downlink::{self, AckPolicy};
use pgvpn_shim::io::{Database, DownlinkSession, Tun};
use pgvpn_shim::runtime::{
    self, fail, spawn, Shared, EXIT_DEVICE, EXIT_FATAL, EXIT_OK, EXIT_USAGE,
};
use pgvpn_shim::uplink;

fn main() {
    std::process::exit(run());
}

fn run() -> i32 {
    let cli = Cli::try_parse().unwrap_or_else(|e| e.exit()); // usage errors exit 2
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cfg = match Config::from_cli(cli) {
        Ok(c) => c,
        Err(e) => return fail(EXIT_USAGE, e),
    };
    for w in cfg.pg.warnings() {
        log::warn!("{w}");
    }

    let shared = Shared::new();
    if let Err(e) = runtime::install_signal_handlers(&shared.stop) {
        return fail(EXIT_FATAL, format!("installing signal handler: {e}"));
    }
    let metrics_server = match cfg.metrics.map(metrics::bind).transpose() {
        Ok(m) => m,
        Err(e) => return fail(EXIT_USAGE, e),
    };
    if let Some(m) = &metrics_server {
        log::info!("metrics on http://{}/metrics", m.server_addr());
    }

    let tun = match TunDevice::create(&cfg.tun)
        .and_then(|t| t.configure(&cfg.addresses, cfg.mtu).map(|()| t))
    {
        Ok(t) => t,
        Err(e) => return fail(EXIT_DEVICE, e),
    };
    let addrs: Vec<String> = cfg.addresses.iter().map(|a| a.to_string()).collect();
    log::info!(
        "device {} up: addresses {}, mtu {}",
        tun.name(),
        addrs.join(" "),
        cfg.mtu
    );
    let db = Timed {
        inner: Postgres::new(cfg.pg.clone()),
        stats: &shared.stats,
    };
    let ack = AckPolicy {
        interval: cfg.ack_interval,
        every: cfg.ack_every,
    };

    let (tx, rx) = uplink::queue();
    let startup_failure = std::thread::scope(|s| {
        let (shared, tun, db, ack) = (&shared, &tun, &db, &ack);
        // Not `spawn`: the VPN does not stop when the metrics thread ends.
        if let Some(server) = &metrics_server {
            let started = std::thread::Builder::new()
                .name("metrics".into())
                .spawn_scoped(s, move || metrics::serve(server, shared));
            if let Err(e) = started {
                log::warn!("metrics: cannot start a thread: {e}");
            }
        }
        // Read the device from the start: what arrives before the database answers is
        // counted as dropped_db_down instead of silently overflowing the kernel's queue.
        let reader = spawn(s, "tun-reader", shared, move || {
            uplink::run_reader(tun, tx, shared)
        });
        if let Err(e) = reader {
            shared.request_stop();
            return Some(fail(EXIT_FATAL, format!("cannot start a thread: {e}")));
        }

        let (dl, up) = match open_sessions(db, &rx, shared) {
            Ok(pair) => pair,
            Err(GaveUp::Stopped) => {
                log::info!("stopped before connecting to the database");
                return None;
            }
            Err(GaveUp::Fatal(e)) => {
                shared.request_stop();
                return Some(fail(e.class.exit_code(), format!("database: {e}")));
            }
        };
        log::info!("connected as role {}", dl.role);
        log::info!("resumed at id {}", dl.stored_cursor());
        let role = dl.role.clone();

        let batch_max = cfg.batch_max;
        let uplink = spawn(s, "uplink", shared, move || {
            uplink::run_sender(db, up, rx, batch_max, shared)
        });
        let downlink = spawn(s, "downlink", shared, move || {
            downlink::run(tun, db, dl, ack, shared)
        });
        match (uplink, downlink) {
            (Ok(_), Ok(_)) => log::info!("ready: {} <-> database as role {role}", tun.name()),
            (Err(e), _) | (_, Err(e)) => {
                shared.fatal(EXIT_FATAL, format!("cannot start a thread: {e}"))
            }
        }
        while !shared.stopping() {
            std::thread::sleep(Duration::from_millis(50));
        }
        if shared.exit_code() == EXIT_OK {
            log::info!("shutting down");
        }
        // The scope joins the threads: the reader stops within its poll timeout, the sender
        // flushes what was queued, the downlink stores its cursor.
        None
    });
    if let Some(code) = startup_failure {
        return code;
    }
    runtime::finish(&shared)
}

/// Opens both sessions before moving packets, so that a bad role or password is an exit
/// code and not a log line repeated forever. A refused connection is retried; meanwhile
/// what the reader queues is dropped and counted.
fn open_sessions<'a>(
    db: &Timed<'a, Postgres>,
    rx: &uplink::QueueRx,
    shared: &Shared,
) -> Result<(PgDownlink, TimedUplink<'a, PgUplink>), GaveUp> {
    let wait = |d| uplink::drain_for(rx, d, shared);
    let dl = retry_open("connect", true, || db.open_downlink(), wait)?;
    let up = retry_open("connect", true, || db.open_uplink(), wait)?;
    Ok((dl, up))
}
