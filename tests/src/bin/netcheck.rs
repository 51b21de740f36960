//! `pgvpn-netcheck`: a tiny traffic generator / checker the tunnel tests run inside
//! network namespaces (`ip netns exec`). Every subcommand prints one JSON object on
//! stdout when it is done.
//!
//! ```text
//! pgvpn-netcheck tcp-recv  BIND_ADDR:PORT
//! pgvpn-netcheck tcp-send  ADDR:PORT BYTES SEED
//! pgvpn-netcheck udp-recv  BIND_ADDR:PORT COUNT IDLE_MS TAG
//! pgvpn-netcheck udp-send  ADDR:PORT COUNT PPS SIZE TAG
//! ```
//! TCP: the sender writes BYTES pseudo-random bytes (from SEED) and both sides print the
//! byte count and SHA-256 of what they wrote / read.
//! UDP: datagrams carry `TAG(u32) SEQ(u32)`; the receiver reports distinct sequence
//! numbers, duplicates and what is missing. It exits once it has all COUNT and then
//! nothing new arrived for IDLE_MS (so late duplicates are still counted), or when nothing
//! arrived for IDLE_MS.

use pgvpn_tests::util::{hex, Rng};
use sha2::{Digest, Sha256};
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

fn arg<T: std::str::FromStr>(args: &[String], i: usize, what: &str) -> T {
    args.get(i)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| usage(&format!("missing or bad {what}")))
}

fn usage(msg: &str) -> ! {
    eprintln!("pgvpn-netcheck: {msg}\nusage: tcp-recv ADDR:PORT | tcp-send ADDR:PORT BYTES SEED | udp-recv ADDR:PORT COUNT IDLE_MS TAG | udp-send ADDR:PORT COUNT PPS SIZE TAG");
    std::process::exit(2)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("tcp-recv") => tcp_recv(arg(&args, 1, "address")),
        Some("tcp-send") => tcp_send(
            arg(&args, 1, "address"),
            arg(&args, 2, "bytes"),
            arg(&args, 3, "seed"),
        ),
        Some("udp-recv") => udp_recv(
            arg(&args, 1, "address"),
            arg(&args, 2, "count"),
            arg(&args, 3, "idle ms"),
            arg(&args, 4, "tag"),
        ),
        Some("udp-send") => udp_send(
            arg(&args, 1, "address"),
            arg(&args, 2, "count"),
            arg(&args, 3, "pps"),
            arg(&args, 4, "size"),
            arg(&args, 5, "tag"),
        ),
        _ => usage("unknown subcommand"),
    }
}

fn tcp_recv(addr: SocketAddr) {
    let l = TcpListener::bind(addr).unwrap_or_else(|e| panic!("bind {addr}: {e}"));
    eprintln!("listening on {addr}");
    let (mut s, peer) = l.accept().expect("accept");
    let start = Instant::now();
    let mut h = Sha256::new();
    let mut n: u64 = 0;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(k) => {
                h.update(&buf[..k]);
                n += k as u64;
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => panic!("read: {e}"),
        }
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{}",
        serde_json::json!({"bytes": n, "sha256": hex(&h.finalize()), "peer": peer.to_string(), "seconds": secs})
    );
}

fn tcp_send(addr: SocketAddr, bytes: u64, seed: u64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut s = loop {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
            Ok(s) => break s,
            Err(e) if Instant::now() < deadline => {
                eprintln!("connect {addr}: {e} (retrying)");
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(e) => panic!("connect {addr}: {e}"),
        }
    };
    let start = Instant::now();
    let mut rng = Rng::new(seed);
    let mut h = Sha256::new();
    let mut left = bytes;
    let mut buf = vec![0u8; 32 * 1024];
    while left > 0 {
        let k = left.min(buf.len() as u64) as usize;
        rng.fill(&mut buf[..k]);
        s.write_all(&buf[..k]).expect("write");
        h.update(&buf[..k]);
        left -= k as u64;
    }
    s.shutdown(std::net::Shutdown::Write).expect("shutdown");
    // Wait for the receiver to close its side, so "done" means "all delivered".
    let mut sink = [0u8; 16];
    let _ = s.read(&mut sink);
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{}",
        serde_json::json!({"bytes": bytes, "sha256": hex(&h.finalize()), "seconds": secs})
    );
}

fn force_rcvbuf(sock: &UdpSocket, bytes: i32) {
    // SO_RCVBUFFORCE (root) so a burst after a shim restart is not dropped by the socket.
    let v: libc::c_int = bytes;
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
}

fn udp_recv(addr: SocketAddr, count: u32, idle_ms: u64, tag: u32) {
    let sock = UdpSocket::bind(addr).unwrap_or_else(|e| panic!("bind {addr}: {e}"));
    force_rcvbuf(&sock, 64 << 20);
    sock.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    eprintln!("listening on {addr}");
    let mut seen = vec![0u32; count as usize];
    let (mut distinct, mut total, mut foreign, mut out_of_order) = (0u32, 0u64, 0u64, 0u64);
    let mut last_seq: Option<u32> = None;
    let mut last_new = Instant::now();
    let mut buf = vec![0u8; 65536];
    let idle = Duration::from_millis(idle_ms);
    loop {
        match sock.recv(&mut buf) {
            Ok(k) if k >= 8 => {
                let t = u32::from_be_bytes(buf[0..4].try_into().unwrap());
                let seq = u32::from_be_bytes(buf[4..8].try_into().unwrap());
                if t != tag || seq >= count {
                    foreign += 1;
                    continue;
                }
                total += 1;
                if let Some(l) = last_seq {
                    if seq < l {
                        out_of_order += 1;
                    }
                }
                last_seq = Some(seq);
                if seen[seq as usize] == 0 {
                    distinct += 1;
                }
                seen[seq as usize] += 1;
                last_new = Instant::now();
            }
            Ok(_) => foreign += 1,
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                ) => {}
            Err(e) => panic!("recv: {e}"),
        }
        if last_new.elapsed() >= idle {
            break;
        }
    }
    let missing: Vec<u32> = (0..count).filter(|&i| seen[i as usize] == 0).collect();
    let dup_seqs: Vec<u32> = (0..count).filter(|&i| seen[i as usize] > 1).collect();
    println!(
        "{}",
        serde_json::json!({
            "count": count, "received": total, "distinct": distinct,
            "duplicates": total - distinct as u64, "missing": missing.len(),
            "first_missing": missing.iter().take(20).collect::<Vec<_>>(),
            "first_duplicated": dup_seqs.iter().take(20).collect::<Vec<_>>(),
            "out_of_order": out_of_order, "foreign": foreign,
        })
    );
}

fn udp_send(addr: SocketAddr, count: u32, pps: u32, size: usize, tag: u32) {
    let bind: SocketAddr = if addr.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    }
    .parse()
    .unwrap();
    let sock = UdpSocket::bind(bind).expect("bind");
    sock.connect(addr).expect("connect");
    let size = size.max(8);
    let mut buf = vec![0u8; size];
    let mut rng = Rng::new(tag as u64);
    rng.fill(&mut buf);
    buf[0..4].copy_from_slice(&tag.to_be_bytes());
    let start = Instant::now();
    let (mut sent, mut retries) = (0u32, 0u64);
    for seq in 0..count {
        let due = start + Duration::from_secs_f64(seq as f64 / pps.max(1) as f64);
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        }
        buf[4..8].copy_from_slice(&seq.to_be_bytes());
        loop {
            match sock.send(&buf) {
                Ok(_) => break,
                // Local queue full (ENOBUFS) or a transient ICMP error: retry shortly.
                Err(e) if retries < 100_000 => {
                    retries += 1;
                    if retries % 1000 == 1 {
                        eprintln!("send seq {seq}: {e} (retrying)");
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
                Err(e) => panic!("send: {e}"),
            }
        }
        sent += 1;
    }
    println!(
        "{}",
        serde_json::json!({"sent": sent, "retries": retries, "seconds": start.elapsed().as_secs_f64()})
    );
}
