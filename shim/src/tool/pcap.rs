//! The capture file: classic pcap or pcapng (the `pcap-file` crate writes both), raw IP
//! packets (LINKTYPE_RAW, 101: each packet starts with its IPv4 or IPv6 header, which is
//! what the log holds) with nanosecond timestamps. In pcapng each packet also carries its
//! log id and its peers in the Enhanced Packet Block's comment.

use std::borrow::Cow;
use std::cell::RefCell;
use std::io::{self, Write};
use std::rc::Rc;
use std::time::{Duration, SystemTime};

use pcap_file::pcap::{PcapHeader, PcapPacket, PcapWriter};
use pcap_file::pcapng::blocks::enhanced_packet::{EnhancedPacketBlock, EnhancedPacketOption};
use pcap_file::pcapng::blocks::interface_description::{
    InterfaceDescriptionBlock, InterfaceDescriptionOption,
};
use pcap_file::pcapng::blocks::section_header::{SectionHeaderBlock, SectionHeaderOption};
use pcap_file::pcapng::PcapNgWriter;
use pcap_file::{DataLink, Endianness, PcapError, TsResolution};

use pgvpn_core::limits::MAX_PACKET;

/// Which file format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Classic pcap (nanosecond timestamps); every tool reads it.
    Pcap,
    /// pcapng: also the log id and the peers of each packet, as its comment.
    Pcapng,
}

/// One packet to write.
pub struct Packet<'a> {
    pub id: i64,
    pub sent_at: SystemTime,
    pub src_peer: &'a str,
    pub dst_peer: &'a str,
    pub data: &'a [u8],
}

impl Packet<'_> {
    /// The pcapng comment: "pgvpn id 123456: alice -> bob".
    pub fn comment(&self) -> String {
        format!(
            "pgvpn id {}: {} -> {}",
            self.id, self.src_peer, self.dst_peer
        )
    }
}

/// The output as the format writers see it: they own a handle, the sink keeps another to
/// flush (neither writer of the crate gives its inner writer back for that).
struct Shared<W: Write>(Rc<RefCell<W>>);

impl<W: Write> Write for Shared<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.borrow_mut().write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.0.borrow_mut().flush()
    }
}

enum Writer<W: Write> {
    Pcap(PcapWriter<Shared<W>>),
    Ng(PcapNgWriter<Shared<W>>),
}

/// A capture file being written.
pub struct Sink<W: Write> {
    writer: Writer<W>,
    out: Rc<RefCell<W>>,
}

fn io_error(e: PcapError) -> io::Error {
    match e {
        PcapError::IoError(e) => e,
        other => io::Error::other(other),
    }
}

/// Since 1970, as the formats count.
fn timestamp(t: SystemTime) -> Duration {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
}

impl<W: Write> Sink<W> {
    /// Writes the file header.
    pub fn new(out: W, format: Format) -> io::Result<Sink<W>> {
        let out = Rc::new(RefCell::new(out));
        let handle = Shared(Rc::clone(&out));
        let snaplen = MAX_PACKET as u32;
        let writer = match format {
            Format::Pcap => {
                let header = PcapHeader {
                    snaplen,
                    datalink: DataLink::RAW,
                    ts_resolution: TsResolution::NanoSecond,
                    endianness: Endianness::native(),
                    ..PcapHeader::default()
                };
                Writer::Pcap(PcapWriter::with_header(handle, header).map_err(io_error)?)
            }
            Format::Pcapng => {
                let section = SectionHeaderBlock {
                    endianness: Endianness::native(),
                    options: vec![SectionHeaderOption::UserApplication(Cow::Owned(format!(
                        "pgvpn {}",
                        env!("CARGO_PKG_VERSION")
                    )))],
                    ..SectionHeaderBlock::default()
                };
                let mut w = PcapNgWriter::with_section_header(handle, section).map_err(io_error)?;
                let interface = InterfaceDescriptionBlock {
                    linktype: DataLink::RAW,
                    snaplen,
                    options: vec![
                        InterfaceDescriptionOption::IfName(Cow::Borrowed("pgvpn")),
                        InterfaceDescriptionOption::IfDescription(Cow::Borrowed(
                            "the pgvpn packet log",
                        )),
                        // The crate writes nanoseconds; without this option readers take
                        // the default, microseconds.
                        InterfaceDescriptionOption::IfTsResol(9),
                    ],
                };
                w.write_pcapng_block(interface).map_err(io_error)?;
                Writer::Ng(w)
            }
        };
        Ok(Sink { writer, out })
    }

    pub fn packet(&mut self, p: &Packet<'_>) -> io::Result<()> {
        let ts = timestamp(p.sent_at);
        let len = p.data.len() as u32;
        match &mut self.writer {
            Writer::Pcap(w) => w.write_packet(&PcapPacket::new(ts, len, p.data)),
            Writer::Ng(w) => w.write_pcapng_block(EnhancedPacketBlock {
                interface_id: 0,
                timestamp: ts,
                original_len: len,
                data: Cow::Borrowed(p.data),
                options: vec![EnhancedPacketOption::Comment(Cow::Owned(p.comment()))],
            }),
        }
        .map(|_| ())
        .map_err(io_error)
    }

    pub fn flush(&mut self) -> io::Result<()> {
        self.out.borrow_mut().flush()
    }

    /// The output (tests).
    #[cfg(test)]
    pub fn into_inner(self) -> W {
        drop(self.writer);
        Rc::try_unwrap(self.out)
            .ok()
            .expect("the writer was dropped")
            .into_inner()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pcap_file::pcap::PcapReader;
    use pcap_file::pcapng::{Block, PcapNgReader};

    fn packets() -> Vec<(i64, SystemTime, Vec<u8>)> {
        let t = SystemTime::UNIX_EPOCH + Duration::new(1_765_000_000, 123_456_000);
        vec![
            (7, t, vec![0x45, 0, 0, 20, 1, 2, 3]),
            (9, t + Duration::from_micros(1), vec![0x60; 41]),
        ]
    }

    fn write(format: Format) -> Vec<u8> {
        let mut sink = Sink::new(Vec::new(), format).unwrap();
        for (id, at, data) in packets() {
            sink.packet(&Packet {
                id,
                sent_at: at,
                src_peer: "alice",
                dst_peer: "bob",
                data: &data,
            })
            .unwrap();
        }
        sink.flush().unwrap();
        sink.into_inner()
    }

    #[test]
    fn pcap_is_raw_ip_with_nanoseconds() {
        let bytes = write(Format::Pcap);
        // the nanosecond magic, in the byte order of the file
        let magic = u32::from_ne_bytes(bytes[..4].try_into().unwrap());
        assert_eq!(magic, 0xA1B2_3C4D);
        let linktype = u32::from_ne_bytes(bytes[20..24].try_into().unwrap());
        assert_eq!(linktype, 101, "LINKTYPE_RAW");
        let mut r = PcapReader::new(&bytes[..]).unwrap();
        assert_eq!(r.header().ts_resolution, TsResolution::NanoSecond);
        for (_, at, data) in packets() {
            let p = r.next_packet().unwrap().unwrap();
            assert_eq!(p.timestamp, timestamp(at));
            assert_eq!(&p.data[..], &data[..]);
            assert_eq!(p.orig_len as usize, data.len());
        }
        assert!(r.next_packet().is_none());
    }

    #[test]
    fn pcapng_carries_id_and_peers() {
        let bytes = write(Format::Pcapng);
        let mut r = PcapNgReader::new(&bytes[..]).unwrap();
        let mut got = Vec::new();
        while let Some(b) = r.next_block() {
            match b.unwrap() {
                Block::InterfaceDescription(i) => {
                    assert_eq!(i.linktype, DataLink::RAW);
                    assert!(i
                        .options
                        .contains(&InterfaceDescriptionOption::IfTsResol(9)));
                }
                Block::EnhancedPacket(p) => {
                    let options: Vec<_> = p.options.into_iter().map(|o| o.into_owned()).collect();
                    got.push((p.timestamp, p.data.to_vec(), options))
                }
                _ => {}
            }
        }
        let want = packets();
        assert_eq!(got.len(), want.len());
        for ((ts, data, opts), (id, at, wdata)) in got.into_iter().zip(want) {
            assert_eq!(ts, timestamp(at));
            assert_eq!(data, wdata);
            assert_eq!(
                opts,
                vec![EnhancedPacketOption::Comment(Cow::Owned(format!(
                    "pgvpn id {id}: alice -> bob"
                )))]
            );
        }
    }
}
