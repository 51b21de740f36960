//! Builds `inet[]` array datums straight from `IpAddr`s, so a batch's addresses reach
//! the INSERT without a text round trip per packet.
use pgrx::pg_sys;
use std::net::IpAddr;

/// `PGSQL_AF_INET` / `PGSQL_AF_INET6` from utils/inet.h (AF_INET + 0 / + 1, not the OS values).
const PGSQL_AF_INET: u8 = 2;
const PGSQL_AF_INET6: u8 = 3;

/// A palloc'd `inet` varlena: 4-byte header, family, bits, address bytes.
unsafe fn inet_datum(a: IpAddr) -> pg_sys::Datum {
    let (family, bits, bytes): (u8, u8, Vec<u8>) = match a {
        IpAddr::V4(v4) => (PGSQL_AF_INET, 32, v4.octets().to_vec()),
        IpAddr::V6(v6) => (PGSQL_AF_INET6, 128, v6.octets().to_vec()),
    };
    let size = pg_sys::VARHDRSZ + 2 + bytes.len();
    let p = pg_sys::palloc0(size) as *mut u8;
    pgrx::set_varsize_4b(p as *mut pg_sys::varlena, size as i32);
    *p.add(pg_sys::VARHDRSZ) = family;
    *p.add(pg_sys::VARHDRSZ + 1) = bits;
    std::ptr::copy_nonoverlapping(bytes.as_ptr(), p.add(pg_sys::VARHDRSZ + 2), bytes.len());
    pg_sys::Datum::from(p)
}

/// An `inet[]` (one dimension, no NULLs) in the current memory context.
pub fn inet_array(addrs: &[IpAddr]) -> pg_sys::Datum {
    unsafe {
        let mut elems: Vec<pg_sys::Datum> = addrs.iter().map(|&a| inet_datum(a)).collect();
        let arr = pg_sys::construct_array(
            elems.as_mut_ptr(),
            elems.len() as i32,
            pg_sys::INETOID,
            -1,
            false,
            pg_sys::TYPALIGN_INT as std::ffi::c_char,
        );
        pg_sys::Datum::from(arr)
    }
}
