//! Who is calling, and the routing table, cached per backend.
//!
//! The calling peer is the session's role (`GetOuterUserId`: the login role, or the
//! role chosen with SET ROLE), never an argument: inside our SECURITY DEFINER
//! functions `current_user` is the extension owner, but the outer user is still the
//! peer's own role, so a client cannot claim to be another peer.
//!
//! The cache is reloaded whenever the shared routing generation moved: every committed
//! change of `pgvpn.peers` bumps it (the `peers_changed` trigger, then `txn`'s commit
//! callback). The API refuses REPEATABLE READ and SERIALIZABLE, so a reload always
//! reads the peers as committed now, and a removed peer or a moved prefix takes effect
//! for the next call. (At commit, `txn` checks the generation once more.)
use crate::error::{Error, Result};
use crate::plans::{self, plan_slot};
use crate::shmem;
use pgrx::pg_sys;
use pgrx::prelude::*;
use pgrx::spi::SpiClient;
use pgvpn_core::{cidr, Table};
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

#[derive(Clone, Debug)]
pub struct Caller {
    pub id: i32,
    pub name: String,
}

/// Everything about peers the data path needs, as of one routing generation.
pub struct Peers {
    pub gen: Gen,
    /// `pgvpn.peers`' oid: names this pgvpn's shared slots and its lock objects.
    pub rel: pg_sys::Oid,
    pub table: Table,
    pub names: HashMap<i32, String>,
    by_role: HashMap<pg_sys::Oid, Caller>,
}

impl Peers {
    /// The live peer the session's role belongs to.
    pub fn caller(&self) -> Result<Caller> {
        let role = outer_role();
        self.by_role
            .get(&role)
            .cloned()
            .ok_or_else(|| not_a_peer(role))
    }
}

/// Which peers a cached copy reflects: the shared routing generation (committed
/// changes) and this backend's own uncommitted changes (`txn::peers_changed`).
pub type Gen = (u64, u64);

thread_local! {
    static CACHE: RefCell<Option<Rc<Peers>>> = const { RefCell::new(None) };
}

pub fn outer_role() -> pg_sys::Oid {
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

plan_slot!(ALL_PEERS);
const ALL_PEERS_SQL: &str = "SELECT id, name, role::oid, allowed_ips::text[] \
    FROM pgvpn.peers WHERE removed_at IS NULL";

plan_slot!(PEERS_REL);
const PEERS_REL_SQL: &str = "SELECT 'pgvpn.peers'::regclass::oid";

/// The current peers: the cached copy, or a fresh one if peers changed since.
pub fn current(client: &SpiClient<'_>) -> Result<Rc<Peers>> {
    shmem::require();
    let gen = (shmem::routing_gen(), crate::txn::local_peer_changes());
    if let Some(p) = CACHE.with(|c| c.borrow().clone()) {
        if p.gen == gen {
            return Ok(p);
        }
    }
    let fresh = Rc::new(load(client, gen)?);
    CACHE.with(|c| *c.borrow_mut() = Some(Rc::clone(&fresh)));
    Ok(fresh)
}

/// `current` with its own SPI connection.
pub fn current_now() -> Result<Rc<Peers>> {
    Spi::connect(current)
}

fn load(client: &SpiClient<'_>, gen: Gen) -> Result<Peers> {
    let plan = plans::get(&ALL_PEERS, client, ALL_PEERS_SQL, &[], false)?;
    let mut entries = Vec::new();
    let mut names = HashMap::new();
    let mut by_role = HashMap::new();
    let rel_plan = plans::get(&PEERS_REL, client, PEERS_REL_SQL, &[], false)?;
    let rel = client
        .select(rel_plan, Some(1), &[])?
        .first()
        .get::<pg_sys::Oid>(1)?
        .unwrap_or(pg_sys::InvalidOid);
    for row in client.select(plan, None, &[])? {
        let id: i32 = row.get(1)?.unwrap_or_default();
        let name: String = row.get(2)?.unwrap_or_default();
        if let Some(role) = row.get::<pg_sys::Oid>(3)? {
            by_role.insert(
                role,
                Caller {
                    id,
                    name: name.clone(),
                },
            );
        }
        for ip in row.get::<Vec<String>>(4)?.unwrap_or_default() {
            // cidr's own output format always parses; skip rather than fail a batch if not.
            if let Ok(prefix) = cidr::parse(&ip) {
                entries.push((prefix, id));
            }
        }
        names.insert(id, name);
    }
    Ok(Peers {
        gen,
        rel,
        table: Table::new(entries),
        names,
        by_role,
    })
}

// lib.rs names `trigger::peers_changed`: views.sql creates the trigger.
pub mod trigger {
    use pgrx::prelude::*;

    /// Statement trigger on `pgvpn.peers`: the routing table changes when this
    /// transaction commits (see `txn`).
    #[pg_trigger]
    pub fn peers_changed<'a>(
        _trigger: &'a pgrx::PgTrigger<'a>,
    ) -> Result<Option<PgHeapTuple<'a, pgrx::AllocatedByRust>>, crate::error::Error> {
        crate::txn::peers_changed();
        Ok(None)
    }
}
