//! Sizes and durations as `wg show` prints them, with its colours: numbers plain, units
//! in cyan (or no colour at all when the output is not a terminal).

use anstyle::{AnsiColor, Style};

/// The styles of one output: wg's on a terminal, none otherwise.
#[derive(Debug, Clone, Copy)]
pub struct Styles {
    /// "peer" (bold yellow) and the peer's name (yellow).
    pub label: Style,
    pub peer: Style,
    pub key: Style,
    pub unit: Style,
    pub warn: Style,
}

impl Styles {
    pub fn new(colour: bool) -> Styles {
        if !colour {
            return Styles {
                label: Style::new(),
                peer: Style::new(),
                key: Style::new(),
                unit: Style::new(),
                warn: Style::new(),
            };
        }
        let yellow = Style::new().fg_color(Some(AnsiColor::Yellow.into()));
        Styles {
            label: yellow.bold(),
            peer: yellow,
            key: Style::new().bold(),
            unit: Style::new().fg_color(Some(AnsiColor::Cyan.into())),
            warn: Style::new().fg_color(Some(AnsiColor::Red.into())),
        }
    }

    /// `text` in `style` (nothing added for the plain style).
    pub fn paint(style: Style, text: &str) -> String {
        format!("{style}{text}{style:#}")
    }
}

/// wg's `bytes()`: "512 B", "1.50 KiB", "45.60 MiB", "1.23 GiB", "2.00 TiB".
pub fn bytes(b: u64, s: &Styles) -> String {
    const K: f64 = 1024.0;
    let unit = |n: String, u: &str| format!("{n} {}", Styles::paint(s.unit, u));
    let f = b as f64;
    if b < 1024 {
        unit(b.to_string(), "B")
    } else if f < K * K {
        unit(format!("{:.2}", f / K), "KiB")
    } else if f < K * K * K {
        unit(format!("{:.2}", f / (K * K)), "MiB")
    } else if f < K * K * K * K {
        unit(format!("{:.2}", f / (K * K * K)), "GiB")
    } else {
        unit(format!("{:.2}", f / (K * K * K * K)), "TiB")
    }
}

/// wg's `pretty_time()`: "1 year, 2 days, 1 minute, 3 seconds" (zero parts left out).
pub fn duration(secs: u64, s: &Styles) -> String {
    let parts = [
        (secs / (365 * 24 * 3600), "year"),
        (secs / (24 * 3600) % 365, "day"),
        (secs / 3600 % 24, "hour"),
        (secs / 60 % 60, "minute"),
        (secs % 60, "second"),
    ];
    let words: Vec<String> = parts
        .iter()
        .filter(|(n, _)| *n > 0)
        .map(|(n, u)| {
            let plural = if *n == 1 { "" } else { "s" };
            format!("{n} {}", Styles::paint(s.unit, &format!("{u}{plural}")))
        })
        .collect();
    words.join(", ")
}

/// wg's `ago()`: "Now", "1 minute, 3 seconds ago", or a warning if the time is ahead of
/// the clock. `at` and `now` are Unix seconds.
pub fn ago(at: f64, now: f64, s: &Styles) -> String {
    let (at, now) = (at.floor() as i64, now.floor() as i64);
    if at == now {
        "Now".to_string()
    } else if at > now {
        format!(
            "({})",
            Styles::paint(
                s.warn,
                "in the future: the clocks of this host and the database differ"
            )
        )
    } else {
        format!("{} ago", duration((now - at) as u64, s))
    }
}

/// "1 packet", "2 packets".
pub fn count(n: i64, what: &str) -> String {
    if n == 1 {
        format!("1 {what}")
    } else {
        format!("{n} {what}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_as_wg_prints_them() {
        let s = Styles::new(false);
        assert_eq!(bytes(0, &s), "0 B");
        assert_eq!(bytes(1023, &s), "1023 B");
        assert_eq!(bytes(1536, &s), "1.50 KiB");
        assert_eq!(bytes(47_815_065, &s), "45.60 MiB");
        assert_eq!(bytes(1_320_702_444, &s), "1.23 GiB");
        assert_eq!(bytes(2 << 40, &s), "2.00 TiB");
    }

    #[test]
    fn durations_as_wg_prints_them() {
        let s = Styles::new(false);
        assert_eq!(duration(63, &s), "1 minute, 3 seconds");
        assert_eq!(duration(1, &s), "1 second");
        assert_eq!(duration(3600 * 25 + 2, &s), "1 day, 1 hour, 2 seconds");
        assert_eq!(
            duration(366 * 86_400, &s),
            "1 year, 1 day",
            "years are 365 days"
        );
        assert_eq!(ago(100.2, 100.9, &s), "Now");
        assert_eq!(ago(37.0, 100.0, &s), "1 minute, 3 seconds ago");
        assert!(ago(200.0, 100.0, &s).contains("future"));
        assert_eq!(count(1, "packet"), "1 packet");
        assert_eq!(count(0, "packet"), "0 packets");
    }

    #[test]
    fn colour_only_when_asked() {
        let c = Styles::new(true);
        assert_eq!(bytes(5, &c), "5 \x1b[36mB\x1b[0m");
        assert_eq!(duration(2, &c), "2 \x1b[36mseconds\x1b[0m");
        assert!(!bytes(5, &Styles::new(false)).contains('\x1b'));
    }
}
