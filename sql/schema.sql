-- pgvpn schema: peers, the packet log (in chunks), delivery cursors, counters, rejects.
-- Loaded first (bootstrap). The Rust functions and the other sql/ files build on it.

-- Group roles. Roles are cluster-wide, so they may already exist from another database.
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'pgvpn_peer') THEN
        CREATE ROLE pgvpn_peer NOLOGIN;
    END IF;
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'pgvpn_auditor') THEN
        CREATE ROLE pgvpn_auditor NOLOGIN;
    END IF;
END
$$;
COMMENT ON ROLE pgvpn_peer IS 'pgvpn: members may call send/recv/ack; add_peer grants it';
COMMENT ON ROLE pgvpn_auditor IS 'pgvpn: read-only access to the packet log and its views';

CREATE TABLE peers (
    id          int GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name        text NOT NULL CHECK (name ~ '^[a-z][a-z0-9_]{0,39}$'),
    role        regrole,                    -- NULL once the peer is removed
    allowed_ips cidr[] NOT NULL DEFAULT '{}',
    created_at  timestamptz NOT NULL DEFAULT now(),
    removed_at  timestamptz,
    CHECK ((removed_at IS NULL) = (role IS NOT NULL))
);
-- Removed peers stay so that old log rows keep their names; only live names/roles are unique.
CREATE UNIQUE INDEX peers_live_name ON peers (name) WHERE removed_at IS NULL;
CREATE UNIQUE INDEX peers_live_role ON peers (role) WHERE removed_at IS NULL;
COMMENT ON TABLE peers IS 'pgvpn: hosts on the VPN; each logs in as its own role';

-- Delivery state lives here, one row per peer, never in the packet rows.
-- expired_*: packets addressed to the peer that retention dropped before the peer
-- acknowledged them (counted by prune(); recv() tells a receiver that asks from below
-- expired_upto).
CREATE TABLE cursors (
    peer            int PRIMARY KEY REFERENCES peers (id),
    acked_id        bigint NOT NULL DEFAULT 0,
    acked_at        timestamptz,
    expired_packets bigint NOT NULL DEFAULT 0,
    expired_upto    bigint NOT NULL DEFAULT 0
);

-- Traffic counters, one row per peer and direction ('t' sent, 'r' received). Sends
-- count in shared memory (no row is updated per send: that would make these hot rows
-- that any open snapshot slows down); the totals are written here at most once a second
-- and by prune(). The views add what is not written yet: what shared memory counted
-- beyond the mark each row was written with (mark_epoch names the life of the counters
-- the marks are from; see pgvpn_ext/src/stats.rs).
CREATE TABLE traffic (
    peer         int NOT NULL REFERENCES peers (id),
    direction    "char" NOT NULL CHECK (direction IN ('t', 'r')),
    packets      bigint NOT NULL DEFAULT 0,
    bytes        bigint NOT NULL DEFAULT 0,
    last_at      timestamptz,
    mark_packets bigint NOT NULL DEFAULT 0,
    mark_bytes   bigint NOT NULL DEFAULT 0,
    mark_epoch   bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (peer, direction)
) WITH (fillfactor = 50);  -- room for HOT updates

-- CACHE 1 (the default) is essential: a per-backend cache would hand out ids
-- out of order across sessions and break gap-free delivery.
CREATE SEQUENCE packet_id CACHE 1;

-- µs since 2000-01-01 (PostgreSQL's TimestampTz, as the shared counters keep it) as a
-- timestamptz; 0 means never.
CREATE FUNCTION _ts(us bigint) RETURNS timestamptz
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS
$$ SELECT CASE WHEN us > 0 THEN '2000-01-01 00:00:00+00'::timestamptz + make_interval(secs => us / 1e6) END $$;

-- What a shared counter counted beyond the mark a table row was written with: all of it
-- if the mark is from another life of the counters (before a restart, or another
-- database's, restored from a dump); 0 without a counter. See pgvpn_ext/src/stats.rs.
CREATE FUNCTION _beyond(live bigint, live_epoch bigint, mark bigint, mark_epoch bigint)
RETURNS bigint LANGUAGE sql IMMUTABLE PARALLEL SAFE AS
$$ SELECT coalesce(live - CASE WHEN mark_epoch = live_epoch THEN mark ELSE 0 END, 0) $$;

-- The audit log. Append-only; chunked by id range so that pgvpn.prune() drops
-- whole chunks. Chunk k holds ids [k * 2^40, (k+1) * 2^40).
CREATE TABLE packets (
    id         bigint NOT NULL,
    sent_at    timestamptz NOT NULL,
    src_peer   int NOT NULL,
    dst_peer   int NOT NULL,
    ip_version smallint NOT NULL,
    src_addr   inet NOT NULL,
    dst_addr   inet NOT NULL,
    protocol   smallint NOT NULL,
    src_port   int,
    dst_port   int,
    icmp_type  smallint,
    tcp_flags  smallint,
    length     int NOT NULL,
    payload    bytea NOT NULL
) PARTITION BY RANGE (id);
-- Packets are mostly incompressible: never try.
ALTER TABLE packets ALTER COLUMN payload SET STORAGE EXTERNAL;
COMMENT ON TABLE packets IS 'pgvpn: every packet that crossed the VPN, one row each';
-- The chunks (partitions) and their indexes are created by pgvpn._open_chunk() in
-- retention.sql, never by this script: objects made by CREATE EXTENSION belong to the
-- extension and pg_dump skips them, while the log is data that a dump must keep. So
-- the parent has no partitioned indexes either (a restore would meet indexes created
-- twice); each chunk carries its own.

-- The flow index: what audits search first. send() already decodes every packet; at
-- commit it writes one row per distinct flow (5-tuple and peers) of each transaction:
-- packets, bytes, the OR of the TCP flags, the SYNs, the first and last packet id and
-- the time. An audit finds flows here (a few rows per TCP stream and second, not one
-- per packet) and fetches their packets from pgvpn.packets by id range. Insert-only on
-- purpose: an upsert per flow and minute would be a hot row that every open snapshot
-- slows down. Chunked with the log by first_id, and dropped with it.
CREATE TABLE flow_log (
    first_id   bigint NOT NULL,
    last_id    bigint NOT NULL,
    at         timestamptz NOT NULL,
    src_peer   int NOT NULL,
    dst_peer   int NOT NULL,
    ip_version smallint NOT NULL,
    protocol   smallint NOT NULL,
    src_addr   inet NOT NULL,
    dst_addr   inet NOT NULL,
    src_port   int,
    dst_port   int,
    packets    int NOT NULL,
    bytes      bigint NOT NULL,
    tcp_flags  smallint,              -- OR of the packets' flags (TCP only)
    syns       int NOT NULL           -- packets with SYN and not ACK
) PARTITION BY RANGE (first_id);
COMMENT ON TABLE flow_log IS 'pgvpn: per transaction and flow: packets, bytes, flags, id range (the audit index)';

-- Flow summaries: the flow index rolled up per chunk and flow by prune() (_summarize in
-- retention.sql), so that per-flow totals (pgvpn.flows, pgvpn.top_flows) read one row per
-- flow and chunk instead of one per transaction, and the top flows come from an index
-- on bytes. Flow rows with first_id up to flow_rollup.summarized_to are in here; newer
-- ones are added live by the views, so the totals are exact at any moment. Ports are
-- -1 where the packets have none (a key column must be NOT NULL to be matched by
-- plain equality). Chunked like the log, and dropped with it.
CREATE TABLE flow_sums (
    chunk      int NOT NULL,
    src_peer   int NOT NULL,
    dst_peer   int NOT NULL,
    ip_version smallint NOT NULL,
    protocol   smallint NOT NULL,
    src_addr   inet NOT NULL,
    dst_addr   inet NOT NULL,
    src_port   int NOT NULL,          -- -1: none
    dst_port   int NOT NULL,          -- -1: none
    packets    bigint NOT NULL,
    bytes      bigint NOT NULL,
    first_seen timestamptz NOT NULL,
    last_seen  timestamptz NOT NULL,
    tcp_flags  smallint,
    syns       bigint NOT NULL,
    first_id   bigint NOT NULL,
    last_id    bigint NOT NULL
) PARTITION BY RANGE (chunk);
COMMENT ON TABLE flow_sums IS 'pgvpn: the flow index per chunk and flow, rolled up by prune() (ports -1 = none)';

-- How far the flow index is rolled up into flow_sums. At most one row; none means
-- nothing yet (no row is inserted here, so a restore brings back exactly the dumped one).
CREATE TABLE flow_rollup (
    one           boolean PRIMARY KEY DEFAULT true CHECK (one),
    summarized_to bigint NOT NULL,    -- flow rows with first_id <= this are in flow_sums
    at            timestamptz NOT NULL
);
COMMENT ON TABLE flow_rollup IS 'pgvpn: flow rows up to summarized_to are rolled up into flow_sums';

CREATE TABLE chunks (
    chunk      int PRIMARY KEY,
    relid      regclass NOT NULL,     -- its part of pgvpn.packets
    flow_relid regclass NOT NULL,     -- its part of pgvpn.flow_log
    sums_relid regclass NOT NULL,     -- its part of pgvpn.flow_sums
    opened_at  timestamptz,           -- when ids started going here; NULL for the spare
    closed_at  timestamptz,           -- set when the next chunk takes over
    indexed_at timestamptz            -- when prune() built its host-pair index
);
COMMENT ON TABLE chunks IS 'pgvpn: the partitions of pgvpn.packets, pgvpn.flow_log and pgvpn.flow_sums, for pgvpn.prune()';

-- Rejected packets: counted per peer and reason, and a capped sample kept for auditors.
CREATE TABLE reject_counts (
    peer       int NOT NULL REFERENCES peers (id),
    reason     text NOT NULL,
    packets    bigint NOT NULL DEFAULT 0,
    last_at    timestamptz,
    mark       bigint NOT NULL DEFAULT 0,  -- as in traffic
    mark_epoch bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (peer, reason)
);

CREATE TABLE reject_samples (
    at      timestamptz NOT NULL,
    peer    int NOT NULL,
    reason  text NOT NULL CHECK (reason IN ('malformed', 'no_route', 'spoofed', 'loop', 'backlog')),
    detail  text NOT NULL,
    length  int NOT NULL,
    head    bytea NOT NULL           -- the first bytes of the packet, enough for its headers
);
CREATE INDEX reject_samples_at ON reject_samples USING brin (at);
COMMENT ON TABLE reject_samples IS 'pgvpn: a sample of rejected packets (a few per send), pruned with the log';

-- Every table's rows belong in backups (the chunks are not extension members and are
-- dumped like any table), and so does the id sequence: a restore must hand out ids
-- above every stored cursor.
SELECT pg_catalog.pg_extension_config_dump('peers', '');
SELECT pg_catalog.pg_extension_config_dump('cursors', '');
SELECT pg_catalog.pg_extension_config_dump('traffic', '');
SELECT pg_catalog.pg_extension_config_dump('chunks', '');
SELECT pg_catalog.pg_extension_config_dump('flow_rollup', '');
SELECT pg_catalog.pg_extension_config_dump('reject_counts', '');
SELECT pg_catalog.pg_extension_config_dump('reject_samples', '');
SELECT pg_catalog.pg_extension_config_dump('packet_id', '');
-- The identity behind peers.id: a restore must not hand a new peer the id of an old one.
SELECT pg_catalog.pg_extension_config_dump('peers_id_seq', '');
