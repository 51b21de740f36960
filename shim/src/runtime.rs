//! What all threads share: the stop flag, the first fatal error and its exit code, the
//! counters. Also the exit codes, the signal handlers, and thread spawning such that any
//! thread ending stops the others.
//!
//! This is the bottom layer: it knows nothing of the device or the database.

use std::sync::atomic::{AtomicBool, AtomicI32, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::stats::Stats;

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
    /// Set by SIGINT/SIGTERM or by a fatal error: every thread winds down. An `Arc`
    /// because the signal handlers hold it too.
    pub stop: Arc<AtomicBool>,
    exit_code: AtomicI32,
    fatal_message: Mutex<Option<String>>,
    pub stats: Stats,
}

impl Default for Shared {
    fn default() -> Self {
        Shared::new()
    }
}

impl Shared {
    pub fn new() -> Shared {
        Shared {
            stop: Arc::new(AtomicBool::new(false)),
            exit_code: AtomicI32::new(EXIT_OK),
            fatal_message: Mutex::new(None),
            stats: Stats::default(),
        }
    }

    pub fn stopping(&self) -> bool {
        self.stop.load(SeqCst)
    }

    /// Asks every thread to wind down, without an error.
    pub fn request_stop(&self) {
        self.stop.store(true, SeqCst);
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
        self.request_stop();
    }

    /// The exit code so far: `EXIT_OK` unless a fatal error happened.
    pub fn exit_code(&self) -> i32 {
        self.exit_code.load(SeqCst)
    }

    fn take_fatal_message(&self) -> Option<String> {
        self.fatal_message
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }
}

/// Sets the stop flag when a thread ends, however it ends.
pub struct StopOnExit<'a>(pub &'a Shared);

impl Drop for StopOnExit<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.fatal(EXIT_FATAL, "a thread panicked".into());
        }
        self.0.request_stop();
    }
}

/// SIGINT and SIGTERM set `stop`; a second one while shutting down exits at once
/// (status 1).
pub fn install_signal_handlers(stop: &Arc<AtomicBool>) -> std::io::Result<()> {
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        // Registered first, so it sees the flag as it was before this signal.
        signal_hook::flag::register_conditional_shutdown(sig, EXIT_FATAL, Arc::clone(stop))?;
        signal_hook::flag::register(sig, Arc::clone(stop))?;
    }
    Ok(())
}

/// Spawns a named scoped thread that stops the shim when it ends.
pub fn spawn<'scope>(
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

/// Sleeps `d` in short slices, returning false early if the shim is stopping.
pub fn sleep_unless_stopped(d: Duration, shared: &Shared) -> bool {
    let end = Instant::now() + d;
    loop {
        if shared.stopping() {
            return false;
        }
        let now = Instant::now();
        if now >= end {
            return true;
        }
        std::thread::sleep((end - now).min(Duration::from_millis(50)));
    }
}

/// Prints a one-line error on stderr and returns `code`.
pub fn fail(code: i32, msg: impl std::fmt::Display) -> i32 {
    eprintln!("pgvpn-shim: error: {msg}");
    code
}

/// After the threads have ended: logs and prints the counter summary, then the fatal error
/// if there was one. Returns the exit code.
pub fn finish(shared: &Shared) -> i32 {
    log::info!("summary: {}", shared.stats);
    println!("pgvpn-shim summary: {}", shared.stats);
    let code = shared.exit_code();
    match shared.take_fatal_message() {
        Some(msg) if code != EXIT_OK => fail(code, msg),
        _ => code,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_fatal_error_wins_and_stops() {
        let s = Shared::new();
        assert_eq!(s.exit_code(), EXIT_OK);
        s.fatal(EXIT_DENIED, "denied".into());
        s.fatal(EXIT_FATAL, "later".into());
        assert!(s.stopping());
        assert_eq!(s.exit_code(), EXIT_DENIED);
        assert_eq!(s.take_fatal_message().as_deref(), Some("denied"));
    }

    #[test]
    fn a_thread_ending_stops_the_others_and_a_panic_is_fatal() {
        let s = Shared::new();
        std::thread::scope(|sc| {
            spawn(sc, "quiet", &s, || {}).unwrap().join().unwrap();
        });
        assert!(s.stopping());
        assert_eq!(s.exit_code(), EXIT_OK, "ending normally is not an error");

        let s = Shared::new();
        std::thread::scope(|sc| {
            let h = spawn(sc, "boom", &s, || panic!("test panic")).unwrap();
            assert!(h.join().is_err());
        });
        assert!(s.stopping());
        assert_eq!(s.exit_code(), EXIT_FATAL);
    }

    #[test]
    fn sleep_returns_early_on_stop() {
        let s = Shared::new();
        let t = Instant::now();
        assert!(sleep_unless_stopped(Duration::from_millis(20), &s));
        assert!(t.elapsed() >= Duration::from_millis(20));
        s.request_stop();
        let t = Instant::now();
        assert!(!sleep_unless_stopped(Duration::from_secs(10), &s));
        assert!(t.elapsed() < Duration::from_secs(1));
    }
}
