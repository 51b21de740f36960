//! `pgvpn capture`: the packet log as a capture file, in id order; with `--follow`, then
//! live, as packets commit.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, BufWriter, IsTerminal, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

use clap::Args;
use ipnet::IpNet;
use postgres::Client;

use pgvpn_core::cidr;
use pgvpn_core::limits::MAX_WAIT_MS;

use super::error::{ToolError, EXIT_FATAL};
use super::filter::{self, parse_time, Filter, TimeArg};
use super::log::{Log, Row, PAGE_ROWS};
use super::pcap::{Format, Packet, Sink};
use super::progress::Progress;
use super::session::{Canceller, Session};

/// Write the logged packets as a capture file (raw IP, nanosecond timestamps), in id
/// order.
///
/// Filters combine with AND; a flag given several times matches any of its values. Reads
/// pgvpn.packets (a member of pgvpn_auditor may; a peer's role may not: exit code 3).
/// Examples:
///
///   pgvpn capture --host 198.18.0.1 --host 198.18.0.2 --since 1h -w pair.pcap
///
///   pgvpn capture --follow --since now | tshark -r -
#[derive(Debug, Args)]
pub struct CaptureArgs {
    /// Write to FILE; `-` (the default) is stdout, which must not be a terminal.
    #[arg(short = 'w', long = "write", value_name = "FILE")]
    pub write: Option<PathBuf>,

    /// Only packets logged at or after TIME: a time before now ("1h", "30m", "2d",
    /// "1h30m"; units s, m, h, d, w) or anything PostgreSQL reads as a timestamptz
    /// ("2026-12-06 14:00", "today", "now"), in the server's time zone unless it says.
    #[arg(long, value_name = "TIME", value_parser = parse_time)]
    pub since: Option<TimeArg>,

    /// Only packets logged before TIME (as for --since). With --follow, following ends
    /// when this host's clock reaches it.
    #[arg(long, value_name = "TIME", value_parser = parse_time)]
    pub until: Option<TimeArg>,

    /// Only packets from or to this peer (by name; also a removed peer's old packets).
    #[arg(long = "peer", value_name = "NAME")]
    pub peers: Vec<String>,

    /// Only packets whose source or destination address lies in ADDR[/LEN] (v4 or v6; a
    /// bare address is one host).
    #[arg(long = "host", value_name = "ADDR[/LEN]", value_parser = parse_host)]
    pub hosts: Vec<IpNet>,

    /// After the history, keep writing packets as they are logged, flushed as they come,
    /// until SIGINT or SIGTERM (then flush and exit 0). `--since now` skips the history.
    #[arg(long)]
    pub follow: bool,

    /// File format.
    #[arg(long, value_enum, default_value_t = Format::Pcap)]
    pub format: Format,
}

fn parse_host(s: &str) -> Result<IpNet, String> {
    cidr::parse(s).map_err(|e| e.to_string())
}

pub fn run(db: &str, args: CaptureArgs) -> Result<(), ToolError> {
    let to_stdout = args.write.as_ref().is_none_or(|p| p.as_os_str() == "-");
    if to_stdout && io::stdout().is_terminal() {
        return Err(ToolError::Usage(
            "refusing to write a capture file to a terminal: use -w FILE, or a pipe (| tshark -r -)"
                .into(),
        ));
    }

    let mut session = Session::open(db, "capture")?;
    session.require_reader("capture", "pgvpn.packets")?;
    let client = &mut session.client;
    let mut peers = filter::peer_names(client)?;
    let filter = Filter {
        since: resolve(client, &args.since, "--since")?,
        until: resolve(client, &args.until, "--until")?,
        peer_ids: if args.peers.is_empty() {
            None
        } else {
            Some(filter::peer_ids(&args.peers, &peers)?)
        },
        hosts: args.hosts.clone(),
    };
    let log = Log::new(client, &filter)?;

    let out: Box<dyn Write> = match &args.write {
        Some(p) if !to_stdout => Box::new(
            File::create(p)
                .map_err(|e| ToolError::Failed(format!("cannot create {}: {e}", p.display())))?,
        ),
        _ => Box::new(io::stdout()),
    };
    let mut sink = Sink::new(BufWriter::with_capacity(1 << 16, out), args.format)
        .map_err(|e| ToolError::Failed(format!("writing the capture file: {e}")))?;

    let stop = Arc::new(AtomicBool::new(false));
    let signals = SignalWatch::start(Arc::clone(&stop), session.canceller())
        .map_err(|e| ToolError::Failed(format!("installing signal handlers: {e}")))?;
    let mut progress = Progress::new();
    let mut capture = Capture {
        log: &log,
        sink: &mut sink,
        names: args.format == Format::Pcapng,
        peers: &mut peers,
        stop: &stop,
        progress: &mut progress,
        output_closed: false,
    };
    let result = capture.run(&mut session.client, args.follow, filter.until);
    let closed = capture.output_closed;
    signals.finish();
    progress.finish();
    let stopped = stop.load(SeqCst);
    match result {
        Ok(()) => {}
        // A signal ends the capture: the statement it cancelled fails, and that is fine.
        Err(_) if stopped => {}
        // The reader went away (tshark quit, `| head`): nothing left to write to.
        Err(_) if closed => return Ok(()),
        Err(e) => {
            let _ = sink.flush();
            return Err(e);
        }
    }
    match sink.flush() {
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(()),
        r => r.map_err(|e| ToolError::Failed(format!("writing the capture file: {e}"))),
    }
}

fn resolve(
    client: &mut Client,
    arg: &Option<TimeArg>,
    flag: &str,
) -> Result<Option<SystemTime>, ToolError> {
    arg.as_ref().map(|t| t.resolve(client, flag)).transpose()
}

/// One capture in progress.
struct Capture<'a, W: Write> {
    log: &'a Log,
    sink: &'a mut Sink<W>,
    /// Peer names are needed (pcapng comments), and reloaded while following.
    names: bool,
    peers: &'a mut HashMap<i32, String>,
    stop: &'a AtomicBool,
    progress: &'a mut Progress,
    output_closed: bool,
}

impl<W: Write> Capture<'_, W> {
    fn stopping(&self) -> bool {
        self.stop.load(SeqCst)
    }

    fn run(
        &mut self,
        client: &mut Client,
        follow: bool,
        until: Option<SystemTime>,
    ) -> Result<(), ToolError> {
        if !follow {
            // The log as it is: no need to wait for commits under way.
            let head = self.log.head(client)?;
            self.copy(client, 0, head)?;
            return Ok(());
        }
        // Read before the first head: a commit after this wakes the first wait.
        let mut token = self.log.generation(client)?;
        let stop = self.stop;
        let stopping = || stop.load(SeqCst);
        let Some(head) = self.log.settled_head(client, &stopping)? else {
            return Ok(());
        };
        let mut cursor = self.copy(client, 0, head)?;
        self.progress.following();
        loop {
            if self.stopping() {
                return Ok(());
            }
            let left = match until {
                None => Duration::from_millis(MAX_WAIT_MS as u64),
                Some(t) => match t.duration_since(SystemTime::now()) {
                    Ok(d) if !d.is_zero() => d.min(Duration::from_millis(MAX_WAIT_MS as u64)),
                    _ => return Ok(()),
                },
            };
            let Some(head) = self.log.settled_head(client, &stopping)? else {
                return Ok(());
            };
            if head > cursor {
                if self.names {
                    // A peer added since: its packets are below the head, its row is
                    // committed before them.
                    *self.peers = filter::peer_names(client)?;
                }
                cursor = self.copy(client, cursor, head)?;
                continue;
            }
            token = self.log.wait(client, token, left)?;
        }
    }

    /// Writes the matching packets with `after < id <= upto`, page by page, flushed after
    /// each; returns the new cursor (`upto`, or less if stopped).
    fn copy(&mut self, client: &mut Client, after: i64, upto: i64) -> Result<i64, ToolError> {
        let mut cursor = after;
        loop {
            let mut bytes = 0u64;
            let (sink, peers, names) = (&mut *self.sink, &*self.peers, self.names);
            let mut closed = false;
            let mut each = |row: &Row<'_>| {
                let name = |id: i32| -> String {
                    match (names, peers.get(&id)) {
                        (true, Some(n)) => n.clone(),
                        _ => format!("#{id}"),
                    }
                };
                let (src, dst) = (name(row.src_peer), name(row.dst_peer));
                bytes += row.payload.len() as u64;
                sink.packet(&Packet {
                    id: row.id,
                    sent_at: row.sent_at,
                    src_peer: &src,
                    dst_peer: &dst,
                    data: row.payload,
                })
                .map_err(|e| {
                    closed = e.kind() == io::ErrorKind::BrokenPipe;
                    ToolError::Failed(format!("writing the capture file: {e}"))
                })
            };
            let page = self.log.page(client, cursor, upto, &mut each);
            self.output_closed |= closed;
            let (n, last) = page?;
            self.progress.add(n as u64, bytes);
            self.sink.flush().map_err(|e| {
                self.output_closed |= e.kind() == io::ErrorKind::BrokenPipe;
                ToolError::Failed(format!("writing the capture file: {e}"))
            })?;
            if n < PAGE_ROWS {
                return Ok(upto);
            }
            cursor = last;
            if self.stopping() {
                return Ok(cursor);
            }
        }
    }
}

/// SIGINT/SIGTERM: set the stop flag and cancel the statement the capture waits in (a
/// wait for commits lasts up to a minute). A second signal exits at once (status 1).
struct SignalWatch {
    handle: signal_hook::iterator::Handle,
    done: Arc<AtomicBool>,
    thread: JoinHandle<()>,
}

impl SignalWatch {
    fn start(stop: Arc<AtomicBool>, canceller: Canceller) -> io::Result<SignalWatch> {
        use signal_hook::consts::{SIGINT, SIGTERM};
        let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM])?;
        let handle = signals.handle();
        let done = Arc::new(AtomicBool::new(false));
        let finished = Arc::clone(&done);
        let thread = std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                for _ in signals.forever() {
                    if stop.swap(true, SeqCst) {
                        std::process::exit(EXIT_FATAL);
                    }
                    // A cancel that arrives between two statements is lost; repeat it
                    // until the capture has wound down.
                    for _ in 0..50 {
                        if finished.load(SeqCst) {
                            break;
                        }
                        canceller.cancel();
                        std::thread::sleep(Duration::from_millis(100));
                    }
                }
            })?;
        Ok(SignalWatch {
            handle,
            done,
            thread,
        })
    }

    fn finish(self) {
        self.done.store(true, SeqCst);
        self.handle.close();
        let _ = self.thread.join();
    }
}
