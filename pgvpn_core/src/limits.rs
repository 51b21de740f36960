//! The bounds of the SQL API and the shim's defaults. Each figure lives here once; the
//! extension enforces the bounds, the shim and the tests read them from here, and the
//! README points here.

/// Most packets one `pgvpn.send` call takes: keeps a statement's memory bounded.
pub const MAX_BATCH_PACKETS: usize = 65_536;

/// Most bytes of packets one transaction may send (in one `send` call or several). They
/// are logged at commit while the receivers' ordering locks are held, so this bounds how
/// long another sender to the same receiver can wait: at about 1 Gbit/s of inserts,
/// 8 MiB take some 70 ms. The shim splits its batches to stay below it.
pub const MAX_TXN_BYTES: usize = 8 << 20;

/// Largest packet pgvpn logs: neither IPv4 nor non-jumbo IPv6 can express more.
pub const MAX_PACKET: usize = 65_535;

/// Rejected packets kept with their headers per `send` call; the rest are only counted.
pub const SAMPLES_PER_BATCH: usize = 8;

/// Bytes of a rejected packet kept in its sample (enough for IPv6 + extension headers).
pub const SAMPLE_HEAD: usize = 128;

/// Largest page `pgvpn.recv` hands out at once.
pub const MAX_RECV_PACKETS: i32 = 65_536;

/// Most bytes one `pgvpn.recv` page may ask for (the default is 4 MiB).
pub const MAX_RECV_BYTES: i32 = 64 << 20;

/// Default size cap of a `pgvpn.recv` page.
pub const DEFAULT_RECV_BYTES: i32 = 4 << 20;

/// Longest long poll of `pgvpn.recv`, in milliseconds: keeps a waiting statement (and
/// its snapshot) short-lived.
pub const MAX_WAIT_MS: i32 = 60_000;

/// Default MTU of the shim's tun device: 8000.
///
/// pgvpn adds no outer header (packets travel as rows, not inside UDP), so the tunnel's
/// MTU is free of the path MTU, and the database's cost is mostly per row: larger
/// packets move more bytes per row. 8000 is the largest size whose row still fits in one
/// 8 kB heap page (the log's chunks set `toast_tuple_target` to the maximum and store
/// payloads uncompressed), so no packet takes a TOAST detour. Measured on one backend
/// (`make bench`, "DB ceiling" rows): 8000-byte packets go into `pgvpn.send` at
/// ~1.1 Gbit/s, 1400-byte ones at ~0.7 Gbit/s. Both ends should use the same value.
pub const DEFAULT_MTU: u32 = 8000;

/// The smallest MTU IPv6 allows on a link.
pub const MIN_MTU_IPV6: u32 = 1280;
