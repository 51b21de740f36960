//! Who is calling, and the routing table.
//!
//! The calling peer is the session's role (`GetOuterUserId`: the login role, or the
//! role chosen with SET ROLE), never an argument: inside our SECURITY DEFINER
//! functions `current_user` is the extension owner, but the outer user is still the
//! peer's own role, so a client cannot claim to be another peer.
use crate::error::{Error, Result};
use crate::plans::{self, plan_slot};
use pgrx::pg_sys;
use pgrx::spi::SpiClient;
use pgvpn_core::{cidr, Table};
use std::collections::HashMap;

pub struct Caller {
    pub id: i32,
    pub name: String,
}

fn outer_role() -> pg_sys::Oid {
    // SAFETY: reads a backend global; always valid inside a transaction.
    unsafe { pg_sys::GetOuterUserId() }
}

fn not_a_peer(role: pg_sys::Oid) -> Error {
    // SAFETY: with noerr = true it returns NULL for an unknown role instead of raising.
    let p = unsafe { pg_sys::GetUserNameFromId(role, true) };
    let name = if p.is_null() {
        format!("oid {}", role.to_u32())
    } else {
        // SAFETY: a non-NULL result is a palloc'd, NUL-terminated role name.
        unsafe { std::ffi::CStr::from_ptr(p) }
            .to_string_lossy()
            .into_owned()
    };
    Error::NotAPeer(name)
}

plan_slot!(CALLER);
const CALLER_SQL: &str = "SELECT id, name FROM pgvpn.peers \
                          WHERE role = $1::oid::regrole AND removed_at IS NULL";

/// The live peer the session's role belongs to.
pub fn caller(client: &SpiClient<'_>) -> Result<Caller> {
    let role = outer_role();
    let plan = plans::get(&CALLER, client, CALLER_SQL, &[pg_sys::OIDOID], false)?;
    let row = client.select(plan, Some(1), &[role.into()])?;
    if row.is_empty() {
        return Err(not_a_peer(role));
    }
    let row = row.first();
    Ok(Caller {
        id: row.get::<i32>(1)?.unwrap_or_default(),
        name: row.get::<String>(2)?.unwrap_or_default(),
    })
}

/// Everything `send` needs about peers, read once per batch.
pub struct Peers {
    pub me: Caller,
    pub table: Table,
    pub names: HashMap<i32, String>,
}

plan_slot!(ALL_PEERS);
const ALL_PEERS_SQL: &str = "SELECT id, name, role = $1::oid::regrole, allowed_ips::text[] \
                             FROM pgvpn.peers WHERE removed_at IS NULL";

pub fn load(client: &SpiClient<'_>) -> Result<Peers> {
    let role = outer_role();
    let plan = plans::get(&ALL_PEERS, client, ALL_PEERS_SQL, &[pg_sys::OIDOID], false)?;
    let mut me = None;
    let mut entries = Vec::new();
    let mut names = HashMap::new();
    for row in client.select(plan, None, &[role.into()])? {
        let id: i32 = row.get(1)?.unwrap_or_default();
        let name: String = row.get(2)?.unwrap_or_default();
        if row.get::<bool>(3)?.unwrap_or(false) {
            me = Some(Caller {
                id,
                name: name.clone(),
            });
        }
        for ip in row.get::<Vec<String>>(4)?.unwrap_or_default() {
            // cidr's own output format always parses; skip rather than fail a batch if not.
            if let Ok(prefix) = cidr::parse(&ip) {
                entries.push((prefix, id));
            }
        }
        names.insert(id, name);
    }
    let me = me.ok_or_else(|| not_a_peer(role))?;
    Ok(Peers {
        me,
        table: Table::new(entries),
        names,
    })
}

/// The LISTEN channel on which a peer is woken.
pub fn channel_of(name: &str) -> String {
    format!("pgvpn_{name}")
}
