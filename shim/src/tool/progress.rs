//! The progress line of a capture: packets, bytes and rates, on stderr when it is a
//! terminal, nothing at all otherwise (scripts and pipes see a clean stderr).

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{HumanCount, ProgressBar, ProgressDrawTarget, ProgressStyle};

/// The bar's position is bytes (so indicatif's estimator gives the byte rate); the
/// message carries the packets.
const TEMPLATE: &str =
    "{spinner} {prefix}{msg}, {binary_bytes} ({binary_bytes_per_sec}), {elapsed}";

pub struct Progress {
    bar: ProgressBar,
    packets: u64,
    start: Instant,
}

impl Progress {
    /// Drawn only if stderr is a terminal.
    pub fn new() -> Progress {
        let bar = if std::io::stderr().is_terminal() {
            let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
            if let Ok(style) = ProgressStyle::with_template(TEMPLATE) {
                bar.set_style(style);
            }
            bar.enable_steady_tick(Duration::from_millis(200));
            bar
        } else {
            ProgressBar::hidden()
        };
        let p = Progress {
            bar,
            packets: 0,
            start: Instant::now(),
        };
        p.show();
        p
    }

    fn show(&self) {
        let secs = self.start.elapsed().as_secs_f64().max(0.001);
        self.bar.set_message(format!(
            "{} packets ({:.0} packets/s)",
            HumanCount(self.packets),
            self.packets as f64 / secs
        ));
    }

    /// After each page.
    pub fn add(&mut self, packets: u64, bytes: u64) {
        self.packets += packets;
        self.bar.inc(bytes);
        self.show();
    }

    /// The history is written; from here on new packets as they commit.
    pub fn following(&self) {
        self.bar.set_prefix("following: ");
    }

    /// Leaves the last line on the terminal.
    pub fn finish(&self) {
        self.show();
        self.bar.finish();
    }
}
