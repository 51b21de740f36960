//! `pgvpn.decode(bytea) → jsonb`: any packet's header, for auditors and for debugging.
use pgrx::prelude::*;
use pgrx::JsonB;
use pgvpn_core::decode;

/// A malformed packet is not an error here (auditors decode reject samples, which are
/// malformed by definition): it yields `{"error": "<why>"}`.
#[pg_extern(name = "decode", immutable, parallel_safe, strict)]
fn decode_packet(packet: &[u8]) -> JsonB {
    JsonB(match decode(packet) {
        Ok(h) => h.to_json(),
        Err(e) => serde_json::json!({ "error": e.to_string() }),
    })
}
