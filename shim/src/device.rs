//! The real tun device: created with the `tun` crate, configured with iproute2.
//!
//! The `tun` crate opens /dev/net/tun (TUNSETIFF with `libc::ifreq`, IFF_TUN | IFF_NO_PI)
//! and gives one fd whose `recv_timeout` (poll + read) and `send` both take `&self`: the
//! reader thread polls it with a timeout, so it notices shutdown, while the downlink thread
//! writes to it concurrently, with no lock or split halves.
//!
//! What the crate cannot do is the configuration: it sets a single IPv4 address
//! (SIOCSIFADDR), no IPv6 address and not several; it has no `addrgenmode none`, which
//! is netlink-only and must be set before the link goes up; and no txqueuelen. So the
//! crate is told not to configure anything, and `ip` does all of it, in order.

use std::io;
use std::process::Command;
use std::time::Duration;

use ipnet::IpNet;
use tun::AbstractDevice;

use crate::io::Tun;

/// Queue length of the device, up from the kernel's default of 500: the reader thread
/// drains it continuously, this absorbs bursts.
const TXQUEUELEN: &str = "1000";

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("cannot create tun device {name}: {err} (is the tun module loaded, and are we root / CAP_NET_ADMIN?)")]
    Create { name: String, err: tun::Error },
    #[error("configuring {name}: `{cmd}` failed: {msg}")]
    Ip {
        name: String,
        cmd: String,
        msg: String,
    },
}

/// An open tun device: each read or write is one bare IP packet. The device exists as
/// long as this is open; dropping it removes the interface.
pub struct TunDevice {
    dev: tun::Device,
    name: String,
}

impl TunDevice {
    pub fn create(name: &str) -> Result<TunDevice, DeviceError> {
        let err = |err| DeviceError::Create {
            name: name.to_string(),
            err,
        };
        let mut cfg = tun::Configuration::default();
        cfg.tun_name(name).layer(tun::Layer::L3);
        cfg.platform_config(|p| {
            // No packet information header (IFF_NO_PI, the default), and no configuration
            // by the crate: see the module comment.
            p.ensure_root_privileges(false);
        });
        let dev = tun::create(&cfg).map_err(err)?;
        // recv_timeout polls, then reads; non-blocking, a spurious wake-up cannot hang
        // the reader, and try_recv can drain what is queued.
        dev.set_nonblock().map_err(|e| err(e.into()))?;
        let name = dev.tun_name().map_err(err)?;
        Ok(TunDevice { dev, name })
    }

    /// Configures the device with iproute2 and brings it up:
    /// `addrgenmode none` first, so the kernel invents no fe80:: address (and sends no
    /// router solicitations from it), then mtu + txqueuelen, the addresses, and `up`.
    pub fn configure(&self, addresses: &[IpNet], mtu: u32) -> Result<(), DeviceError> {
        let dev = self.name.as_str();
        let has_v6 = addresses.iter().any(|c| c.addr().is_ipv6());
        match self.ip(&["link", "set", "dev", dev, "addrgenmode", "none"]) {
            Ok(()) => {}
            // Fails on a kernel without IPv6, which only matters if we want IPv6.
            Err(e) if !has_v6 => log::warn!("{e} (ignored: no IPv6 address requested)"),
            Err(e) => return Err(e),
        }
        let mtu = mtu.to_string();
        self.ip(&[
            "link",
            "set",
            "dev",
            dev,
            "mtu",
            &mtu,
            "txqueuelen",
            TXQUEUELEN,
        ])?;
        for a in addresses {
            self.ip(&["addr", "add", &a.to_string(), "dev", dev])?;
        }
        self.ip(&["link", "set", "dev", dev, "up"])
    }

    fn ip(&self, args: &[&str]) -> Result<(), DeviceError> {
        let cmd = format!("ip {}", args.join(" "));
        let err = |msg: String| DeviceError::Ip {
            name: self.name.clone(),
            cmd: cmd.clone(),
            msg,
        };
        log::debug!("running `{cmd}`");
        let out = Command::new("ip")
            .args(args)
            .output()
            .map_err(|e| err(e.to_string()))?;
        if out.status.success() {
            return Ok(());
        }
        let stderr = String::from_utf8_lossy(&out.stderr);
        let msg = stderr
            .split('\n')
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect::<Vec<_>>();
        Err(err(format!("{} ({})", msg.join("; "), out.status)))
    }
}

/// `Ok(None)` for "nothing there (yet)"; EINTR is retried.
fn packet(mut r: impl FnMut() -> io::Result<usize>) -> io::Result<Option<usize>> {
    loop {
        match r() {
            Ok(n) => return Ok(Some(n)),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Ok(None)
            }
            Err(e) => return Err(e),
        }
    }
}

impl Tun for TunDevice {
    fn name(&self) -> &str {
        &self.name
    }

    fn recv_timeout(&self, buf: &mut [u8], timeout: Duration) -> io::Result<Option<usize>> {
        // POLLERR / POLLHUP count as readable: the read then reports the error.
        packet(|| self.dev.recv_timeout(buf, timeout))
    }

    fn try_recv(&self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        packet(|| self.dev.recv(buf))
    }

    /// The kernel takes a packet whole or not at all.
    fn send(&self, pkt: &[u8]) -> io::Result<()> {
        loop {
            match self.dev.send(pkt) {
                Ok(n) if n == pkt.len() => return Ok(()),
                Ok(n) => {
                    return Err(io::Error::other(format!(
                        "short write: {n} of {} bytes",
                        pkt.len()
                    )))
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    #[test]
    fn read_results() {
        assert_eq!(packet(|| Ok(60)).unwrap(), Some(60));
        for kind in [io::ErrorKind::WouldBlock, io::ErrorKind::TimedOut] {
            assert_eq!(packet(|| Err(kind.into())).unwrap(), None, "{kind:?}");
        }
        let calls = Cell::new(0);
        let r = packet(|| {
            calls.set(calls.get() + 1);
            if calls.get() < 3 {
                Err(io::ErrorKind::Interrupted.into())
            } else {
                Ok(1)
            }
        });
        assert_eq!((r.unwrap(), calls.get()), (Some(1), 3), "EINTR is retried");
        // Anything else is the caller's to report (EBADFD once the interface is deleted).
        let e = packet(|| Err(io::Error::from_raw_os_error(77))).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(77));
    }
}
