//! The tun device: create it (TUNSETIFF ioctl), configure it (`ip`), read and write packets.
//!
//! The device is opened with a raw ioctl through `libc` rather than the `tun` crate: the shim
//! needs one fd that a reader thread polls with a timeout (so it notices shutdown) while
//! another thread writes to it concurrently. With a plain `File` both work through `&File`
//! with no lock or split API, and it is about sixty lines.

use std::ffi::CStr;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;
use std::process::Command;
use std::time::Duration;

use ipnet::IpNet;

const IFF_TUN: libc::c_short = 0x0001;
const IFF_NO_PI: libc::c_short = 0x1000;
/// `_IOW('T', 202, int)`
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;

/// `struct ifreq` as TUNSETIFF reads it: the name, then `ifr_flags` at the start of the
/// 24-byte union.
#[repr(C)]
struct IfReq {
    name: [libc::c_char; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("cannot open /dev/net/tun: {0} (is the tun module loaded, and are we root / CAP_NET_ADMIN?)")]
    Open(io::Error),
    #[error("cannot create tun device {name}: {err}")]
    Create { name: String, err: io::Error },
    #[error("configuring {name}: `{cmd}` failed: {msg}")]
    Ip {
        name: String,
        cmd: String,
        msg: String,
    },
}

/// An open tun device (IFF_TUN | IFF_NO_PI: each read or write is one bare IP packet).
/// The device exists as long as this fd is open; dropping it removes the interface.
#[derive(Debug)]
pub struct Tun {
    file: File,
    name: String,
}

impl Tun {
    pub fn create(name: &str) -> Result<Tun, DeviceError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open("/dev/net/tun")
            .map_err(DeviceError::Open)?;
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            flags: IFF_TUN | IFF_NO_PI,
            _pad: [0; 22],
        };
        for (dst, src) in req
            .name
            .iter_mut()
            .zip(name.bytes().take(libc::IFNAMSIZ - 1))
        {
            *dst = src as libc::c_char;
        }
        // SAFETY: TUNSETIFF reads and writes one struct ifreq, which IfReq lays out.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF as _, &mut req as *mut IfReq) };
        if rc < 0 {
            let err = io::Error::last_os_error();
            return Err(DeviceError::Create {
                name: name.to_string(),
                err,
            });
        }
        // SAFETY: the kernel wrote a NUL-terminated name (at most IFNAMSIZ - 1 bytes).
        let name = unsafe { CStr::from_ptr(req.name.as_ptr()) }
            .to_string_lossy()
            .into_owned();
        Ok(Tun { file, name })
    }

    pub fn name(&self) -> &str {
        &self.name
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
        self.ip(&["link", "set", "dev", dev, "mtu", &mtu, "txqueuelen", "1000"])?;
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

    /// Waits up to `timeout` for a packet to read. False on timeout or signal.
    pub fn wait_readable(&self, timeout: Duration) -> io::Result<bool> {
        let mut pfd = libc::pollfd {
            fd: self.file.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = timeout.as_millis().min(i32::MAX as u128) as libc::c_int;
        // SAFETY: one valid pollfd.
        let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::Interrupted {
                Ok(false)
            } else {
                Err(e)
            };
        }
        // POLLERR / POLLHUP also count as "readable": the read reports the error.
        Ok(rc > 0)
    }

    /// Reads one packet. `Ok(None)` when none is waiting (the fd is non-blocking).
    pub fn read_packet(&self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        loop {
            match (&self.file).read(buf) {
                Ok(n) => return Ok(Some(n)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Writes one packet (the kernel takes it whole or not at all).
    pub fn write_packet(&self, pkt: &[u8]) -> io::Result<()> {
        loop {
            match (&self.file).write(pkt) {
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
