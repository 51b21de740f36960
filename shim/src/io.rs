//! The two things the loops talk to, as small traits: the tun device ([`Tun`]) and the
//! database ([`Database`], which opens the uplink and downlink sessions). The real ones are
//! in device.rs and db.rs; in-memory fakes for the unit tests are in fakes.rs.
//!
//! Like boringtun's `IpSend`/`IpRecv`, the traits are only what the loops need, so a fake
//! is a few lines and the loops never see a file descriptor or a `postgres::Client`.

use std::time::Duration;

use crate::error::DbError;

/// A tun device: bare IP packets in and out. Shared by reference between the reader
/// thread (receiving) and the downlink thread (sending), hence `&self` and `Sync`.
pub trait Tun: Sync {
    fn name(&self) -> &str;

    /// Waits up to `timeout` for a packet and reads it into `buf`. `Ok(None)` if none
    /// came: the caller looks at the stop flag and calls again.
    fn recv_timeout(&self, buf: &mut [u8], timeout: Duration) -> std::io::Result<Option<usize>>;

    /// Reads a packet if one is waiting, without blocking; `Ok(None)` if none is.
    fn try_recv(&self, buf: &mut [u8]) -> std::io::Result<Option<usize>>;

    /// Writes one packet, whole.
    fn send(&self, pkt: &[u8]) -> std::io::Result<()>;
}

/// The database: opens sessions. Where and how to connect is the implementation's
/// business; the loops call these again to reconnect.
pub trait Database: Sync {
    type Uplink: UplinkSession;
    type Downlink: DownlinkSession;

    fn open_uplink(&self) -> Result<Self::Uplink, DbError>;
    fn open_downlink(&self) -> Result<Self::Downlink, DbError>;
}

/// The uplink session: `pgvpn.send()`.
pub trait UplinkSession: Send {
    /// Sends a batch; returns how many packets the database accepted.
    fn send(&mut self, batch: &[Vec<u8>]) -> Result<u64, DbError>;

    /// True once the connection is known to be gone.
    fn is_closed(&self) -> bool;

    /// Before the first send after an idle spell: has the server closed the connection
    /// meanwhile (a restart, a failover), as far as can be seen without a round trip? `Err`
    /// if so. A batch sent into such a connection would be lost, and a failed send is never
    /// resent (it may have committed); a batch held back because of this was never sent.
    /// May take a millisecond.
    fn check(&mut self) -> Result<(), DbError>;
}

/// What `pgvpn.recv()` said, in a NOTICE, about this receiver's packets that retention
/// dropped before they were read: `packets` dropped unread so far (the peer's total, since
/// it was created), ids up to `upto`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expired {
    pub packets: i64,
    pub upto: i64,
}

/// The downlink session: `pgvpn.recv()` (a long poll) and `pgvpn.ack()`.
pub trait DownlinkSession: Send {
    /// The delivery cursor stored in the database when this session was opened.
    fn stored_cursor(&self) -> i64;

    /// Calls `each(id, payload)` for the caller's packets with id > `after`, in id order,
    /// at most `limit` of them; if there are none, the database first waits up to `wait`
    /// for some. Returns how many there were (`limit` means "more may be waiting").
    fn recv(
        &mut self,
        after: i64,
        limit: usize,
        wait: Duration,
        each: &mut dyn FnMut(i64, Option<&[u8]>),
    ) -> Result<usize, DbError>;

    /// Stores the delivery cursor; returns the stored value.
    fn ack(&mut self, upto: i64) -> Result<i64, DbError>;

    /// The expiry reports received since the last call, oldest first.
    fn take_expired(&mut self) -> Vec<Expired>;
}
