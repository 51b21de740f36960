//! Builds `inet` datums straight from `IpAddr`s, so a batch's addresses reach the log
//! without a text round trip per packet.
use pgrx::pg_sys;
use std::net::IpAddr;

/// `PGSQL_AF_INET` / `PGSQL_AF_INET6` from utils/inet.h (AF_INET + 0 / + 1, not the OS values).
const PGSQL_AF_INET: u8 = 2;
const PGSQL_AF_INET6: u8 = 3;

/// A palloc'd `inet` varlena in the current memory context: 4-byte header, family,
/// bits, address bytes (the layout of `inet_struct` in utils/inet.h).
pub fn inet_datum(a: IpAddr) -> pg_sys::Datum {
    let (family, bits, bytes): (u8, u8, Vec<u8>) = match a {
        IpAddr::V4(v4) => (PGSQL_AF_INET, 32, v4.octets().to_vec()),
        IpAddr::V6(v6) => (PGSQL_AF_INET6, 128, v6.octets().to_vec()),
    };
    let mut body = Vec::with_capacity(2 + bytes.len());
    body.extend_from_slice(&[family, bits]);
    body.extend_from_slice(&bytes);
    let size = pg_sys::VARHDRSZ + body.len();
    // SAFETY: palloc0 returns `size` writable bytes (or raises an ERROR, never null); the
    // header write stays within the first VARHDRSZ of them and the copy fills the rest.
    unsafe {
        let p = pg_sys::palloc0(size).cast::<u8>();
        pgrx::set_varsize_4b(p.cast::<pg_sys::varlena>(), size as i32);
        std::ptr::copy_nonoverlapping(body.as_ptr(), p.add(pg_sys::VARHDRSZ), body.len());
        pg_sys::Datum::from(p)
    }
}
