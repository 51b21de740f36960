//! `pgvpn-arrivals`: receives numbered UDP datagrams (netcheck's format: `TAG(u32)
//! SEQ(u32)`, big-endian) and writes one line per datagram to a file as it arrives:
//! `SEQ MICROS`, the wall-clock time in microseconds since the Unix epoch. The failover and
//! partition tests read the file while the stream runs, to time outages to the datagram.
//!
//! ```text
//! pgvpn-arrivals BIND_ADDR:PORT TAG IDLE_MS OUT_FILE
//! ```
//! Exits once nothing with TAG arrived for IDLE_MS (counted from the last one, or from the
//! start), printing `{"received": N}`.

use std::fs::File;
use std::io::{ErrorKind, Write};
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

fn usage() -> ! {
    eprintln!("usage: pgvpn-arrivals BIND_ADDR:PORT TAG IDLE_MS OUT_FILE");
    std::process::exit(2)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() != 4 {
        usage();
    }
    let addr: SocketAddr = args[0].parse().unwrap_or_else(|_| usage());
    let tag: u32 = args[1].parse().unwrap_or_else(|_| usage());
    let idle = Duration::from_millis(args[2].parse().unwrap_or_else(|_| usage()));
    let mut out = File::create(&args[3]).unwrap_or_else(|e| panic!("create {}: {e}", args[3]));

    let sock = UdpSocket::bind(addr).unwrap_or_else(|e| panic!("bind {addr}: {e}"));
    // A backlog delivered at once after an outage must not overflow the socket.
    let v: libc::c_int = 64 << 20;
    // SAFETY: a valid socket fd and a pointer to an int of the size passed.
    unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            &v as *const _ as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
    sock.set_read_timeout(Some(Duration::from_millis(100)))
        .expect("set_read_timeout");
    eprintln!("listening on {addr}");
    let mut buf = vec![0u8; 65536];
    let mut last = Instant::now();
    let mut received: u64 = 0;
    while last.elapsed() < idle {
        match sock.recv(&mut buf) {
            Ok(k) if k >= 8 && buf[0..4] == tag.to_be_bytes() => {
                let seq = u32::from_be_bytes(buf[4..8].try_into().expect("4 bytes"));
                let at = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .expect("after 1970")
                    .as_micros();
                // One write per datagram: the test reads the file while we run.
                writeln!(out, "{seq} {at}").expect("write arrivals");
                received += 1;
                last = Instant::now();
            }
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                ) => {}
            Err(e) => panic!("recv: {e}"),
        }
    }
    println!("{{\"received\": {received}}}");
}
