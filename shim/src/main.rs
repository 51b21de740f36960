//! pgvpn-shim: moves IP packets between a Linux tun device and the pgvpn database.
//!
//! Threads (all scoped, any one ending stops the others):
//! * reader:   tun --poll/read--> bounded queue (drops + counts when full)
//! * sender:   queue --batch--> `pgvpn.send()` on the uplink connection
//! * downlink: LISTEN / `pgvpn.recv()` --> tun write, `pgvpn.ack()` now and then,
//!   on the downlink connection
//! * main:     waits for SIGINT/SIGTERM or a fatal error, then joins and prints the summary.

mod config;
mod device;
mod downlink;
mod session;
mod stats;
mod uplink;

use std::sync::atomic::{AtomicBool, AtomicI32, Ordering::SeqCst};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use clap::Parser;

use config::{Cli, Config};
use device::Tun;
use session::{retry_open, Downlink, GaveUp, Uplink};
use stats::Stats;

pub const EXIT_OK: i32 = 0;
/// Any other fatal error (extension or database missing, tun read error, a thread panicked;
/// also a second SIGINT/SIGTERM while shutting down).
pub const EXIT_FATAL: i32 = 1;
/// Bad flags or connection string.
pub const EXIT_USAGE: i32 = 2;
/// Authentication failed, the role is not a pgvpn peer, or lacks a privilege.
pub const EXIT_DENIED: i32 = 3;
/// The tun device could not be created or configured.
pub const EXIT_DEVICE: i32 = 4;

/// State shared by all threads.
pub struct Shared {
    /// Set by SIGINT/SIGTERM or by a fatal error: every thread winds down.
    pub stop: Arc<AtomicBool>,
    exit_code: AtomicI32,
    fatal_message: Mutex<Option<String>>,
    pub stats: Stats,
}

impl Shared {
    pub fn new(stop: Arc<AtomicBool>) -> Shared {
        Shared {
            stop,
            exit_code: AtomicI32::new(EXIT_OK),
            fatal_message: Mutex::new(None),
            stats: Stats::default(),
        }
    }

    pub fn stopping(&self) -> bool {
        self.stop.load(SeqCst)
    }

    /// Ends the shim with `code`; the first fatal error wins.
    pub fn fatal(&self, code: i32, msg: String) {
        log::error!("{msg}");
        if self
            .exit_code
            .compare_exchange(EXIT_OK, code, SeqCst, SeqCst)
            .is_ok()
        {
            *self.fatal_message.lock().unwrap_or_else(|e| e.into_inner()) = Some(msg);
        }
        self.stop.store(true, SeqCst);
    }
}

/// Sets the stop flag when a thread ends, however it ends.
struct StopOnExit<'a>(&'a Shared);

impl Drop for StopOnExit<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.fatal(EXIT_FATAL, "a thread panicked".into());
        }
        self.0.stop.store(true, SeqCst);
    }
}

fn main() {
    std::process::exit(run());
}

/// Prints a one-line error on stderr and returns `code`.
fn fail(code: i32, msg: impl std::fmt::Display) -> i32 {
    eprintln!("pgvpn-shim: error: {msg}");
    code
}

fn run() -> i32 {
    let cli = Cli::try_parse().unwrap_or_else(|e| e.exit()); // usage errors exit 2
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cfg = match Config::from_cli(cli) {
        Ok(c) => c,
        Err(e) => return fail(EXIT_USAGE, e),
    };

    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        // A second signal while shutting down exits at once (status 1).
        let r =
            signal_hook::flag::register_conditional_shutdown(sig, EXIT_FATAL, Arc::clone(&stop))
                .and_then(|_| signal_hook::flag::register(sig, Arc::clone(&stop)));
        if let Err(e) = r {
            return fail(EXIT_FATAL, format!("installing signal handler: {e}"));
        }
    }
    let shared = Shared::new(stop);

    let tun = match Tun::create(&cfg.tun)
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

    let (tx, rx) = mpsc::sync_channel::<Vec<u8>>(uplink::QUEUE_SLOTS);
    let startup_failure = std::thread::scope(|s| {
        let (shared, tun, cfg) = (&shared, &tun, &cfg);
        // Read the device from the start: what arrives before the database answers is
        // counted as dropped_db_down instead of silently overflowing the kernel's queue.
        let reader = spawn(s, "tun-reader", shared, move || {
            uplink::run_reader(tun, tx, shared)
        });
        if let Err(e) = reader {
            shared.stop.store(true, SeqCst);
            return Some(fail(EXIT_FATAL, format!("cannot start a thread: {e}")));
        }

        // Open both sessions before moving packets, so that a bad role or password is an
        // exit code and not a log line repeated forever. A refused connection is retried.
        let wait = |d| uplink::drain_for(&rx, d, shared);
        let opened = retry_open("connect", true, || Downlink::open(&cfg.pg), wait).and_then(|dl| {
            Ok((
                dl,
                retry_open("connect", true, || Uplink::open(&cfg.pg), wait)?,
            ))
        });
        let (dl, up) = match opened {
            Ok(pair) => pair,
            Err(GaveUp::Stopped) => {
                log::info!("stopped before connecting to the database");
                return None;
            }
            Err(GaveUp::Fatal(class, msg)) => {
                shared.stop.store(true, SeqCst);
                return Some(fail(class.exit_code(), format!("database: {msg}")));
            }
        };
        log::info!(
            "connected as role {}, listening on channel {}",
            dl.role,
            dl.channel
        );
        log::info!("resumed at id {}", dl.stored_cursor);
        let role = dl.role.clone();

        let uplink = spawn(s, "uplink", shared, move || {
            uplink::run_sender(up, rx, cfg, shared)
        });
        let downlink = spawn(s, "downlink", shared, move || {
            downlink::run(tun, dl, cfg, shared)
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
        if shared.exit_code.load(SeqCst) == EXIT_OK {
            log::info!("shutting down");
        }
        // The scope joins the threads: the reader stops within its poll timeout, the sender
        // flushes what was queued, the downlink stores its cursor.
        None
    });
    if let Some(code) = startup_failure {
        return code;
    }
    summary(&shared)
}

/// Spawns a named scoped thread that stops the shim when it ends.
fn spawn<'scope>(
    s: &'scope std::thread::Scope<'scope, '_>,
    name: &str,
    shared: &'scope Shared,
    f: impl FnOnce() + Send + 'scope,
) -> std::io::Result<std::thread::ScopedJoinHandle<'scope, ()>> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn_scoped(s, move || {
            let _guard = StopOnExit(shared);
            f()
        })
}

fn summary(shared: &Shared) -> i32 {
    log::info!("summary: {}", shared.stats);
    println!("pgvpn-shim summary: {}", shared.stats);
    let code = shared.exit_code.load(SeqCst);
    match shared
        .fatal_message
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take()
    {
        Some(msg) if code != EXIT_OK => fail(code, msg),
        _ => code,
    }
}
