-- pgvpn 0.1.0 -> 0.2.0, run by `ALTER EXTENSION pgvpn UPDATE` once the 0.2.0 library is
-- installed and the server restarted with shared_preload_libraries = 'pgvpn'.
-- tests/tests/upgrade.rs builds 0.1.0, fills it, runs this and compares the result with
-- a fresh 0.2.0 install. What changes, and why: docs/backup.md ("Upgrades").
--
-- Cost: every existing chunk gets its 0.2.0 indexes built and its flow index computed
-- from its packets, in this one transaction; a large log takes a while.
\echo Use "ALTER EXTENSION pgvpn UPDATE" to load this file. \quit

-- 1. Objects 0.2.0 replaces or no longer has. (channel(): receivers are now woken
-- without LISTEN/NOTIFY, see pgvpn_ext/src/shmem.rs.)
DROP VIEW peer_stats, reject_totals, flows, rejects;
DROP FUNCTION channel();
DROP FUNCTION recv(bigint, int, int);
DROP FUNCTION add_peer(text, regrole, cidr[]);
DROP FUNCTION _prune(interval, interval);

-- 2. Tables.
ALTER TABLE cursors
    ADD COLUMN expired_packets bigint NOT NULL DEFAULT 0,
    ADD COLUMN expired_upto bigint NOT NULL DEFAULT 0;
ALTER TABLE reject_samples DROP CONSTRAINT reject_samples_reason_check;
ALTER TABLE reject_samples ADD CONSTRAINT reject_samples_reason_check
    CHECK (reason IN ('malformed', 'no_route', 'spoofed', 'loop', 'backlog'));
COMMENT ON TABLE reject_samples IS 'pgvpn: a sample of rejected packets (a few per send), pruned with the log';
-- The counters' marks (see sql/schema.sql, traffic). Rows written by 0.1.0 carry none:
-- 0.2.0's shared counters start counting with the restart that loaded it.
ALTER TABLE traffic
    ADD COLUMN mark_packets bigint NOT NULL DEFAULT 0,
    ADD COLUMN mark_bytes bigint NOT NULL DEFAULT 0,
    ADD COLUMN mark_epoch bigint NOT NULL DEFAULT 0;
ALTER TABLE reject_counts
    ADD COLUMN mark bigint NOT NULL DEFAULT 0,
    ADD COLUMN mark_epoch bigint NOT NULL DEFAULT 0;
CREATE FUNCTION _ts(us bigint) RETURNS timestamptz
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS
$$ SELECT CASE WHEN us > 0 THEN '2000-01-01 00:00:00+00'::timestamptz + make_interval(secs => us / 1e6) END $$;

-- What a shared counter counted beyond the mark a table row was written with: all of it
-- if the mark is from another life of the counters (before a restart, or another
-- database's, restored from a dump); 0 without a counter. See pgvpn_ext/src/stats.rs.
CREATE FUNCTION _beyond(live bigint, live_epoch bigint, mark bigint, mark_epoch bigint)
RETURNS bigint LANGUAGE sql IMMUTABLE PARALLEL SAFE AS
$$ SELECT coalesce(live - CASE WHEN mark_epoch = live_epoch THEN mark ELSE 0 END, 0) $$;

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

ALTER TABLE chunks ADD COLUMN flow_relid regclass;  -- filled in step 4, then NOT NULL
ALTER TABLE chunks ADD COLUMN sums_relid regclass;  -- filled in step 4, then NOT NULL
COMMENT ON TABLE chunks IS 'pgvpn: the partitions of pgvpn.packets, pgvpn.flow_log and pgvpn.flow_sums, for pgvpn.prune()';
SELECT pg_catalog.pg_extension_config_dump('chunks', '');
SELECT pg_catalog.pg_extension_config_dump('flow_rollup', '');
SELECT pg_catalog.pg_extension_config_dump('reject_counts', '');
SELECT pg_catalog.pg_extension_config_dump('reject_samples', '');
SELECT pg_catalog.pg_extension_config_dump('packet_id', '');
-- The identity behind peers.id: a restore must not hand a new peer the id of an old one.
SELECT pg_catalog.pg_extension_config_dump('peers_id_seq', '');

-- 3. Functions: the SQL ones as in 0.2.0 (sql/peers.sql, sql/retention.sql).
CREATE OR REPLACE FUNCTION _check_allowed_ips(peer_name text, allowed_ips cidr[]) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pgvpn, pg_temp AS $$
DECLARE
    clash record;
BEGIN
    IF allowed_ips IS NULL OR array_position(allowed_ips, NULL) IS NOT NULL THEN
        RAISE EXCEPTION 'allowed_ips must not be or contain NULL'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- Overlapping prefixes are fine (longest prefix wins, as in WireGuard); the very same
    -- prefix on two peers would make routing ambiguous.
    SELECT p.name, ip INTO clash
      FROM peers p, unnest(p.allowed_ips) ip
     WHERE p.removed_at IS NULL AND p.name <> peer_name AND ip = ANY (_check_allowed_ips.allowed_ips)
     LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'prefix % is already routed to peer "%"', clash.ip, clash.name
            USING ERRCODE = 'unique_violation';
    END IF;
END
$$;

CREATE OR REPLACE FUNCTION add_peer(name text, role regrole, allowed_ips cidr[], connection_limit int DEFAULT 8)
RETURNS int
LANGUAGE plpgsql SET search_path = pg_catalog, pgvpn, pg_temp AS $$
DECLARE
    new_id int;
BEGIN
    IF connection_limit IS NULL OR connection_limit < 1 THEN
        RAISE EXCEPTION 'connection_limit must be at least 1, got %', coalesce(connection_limit::text, 'NULL')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF name IS NULL OR name !~ '^[a-z][a-z0-9_]{0,39}$' THEN
        RAISE EXCEPTION 'invalid peer name %', coalesce(quote_literal(name), 'NULL')
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Use 1 to 40 characters: a-z first, then a-z, 0-9 or _.';
    END IF;
    IF role IS NULL THEN
        RAISE EXCEPTION 'role must not be NULL' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF EXISTS (SELECT FROM peers p WHERE p.removed_at IS NULL AND p.name = add_peer.name) THEN
        RAISE EXCEPTION 'peer "%" already exists', name USING ERRCODE = 'duplicate_object';
    END IF;
    IF EXISTS (SELECT FROM peers p WHERE p.removed_at IS NULL AND p.role = add_peer.role) THEN
        RAISE EXCEPTION 'role % is already the peer "%"', role,
            (SELECT p.name FROM peers p WHERE p.removed_at IS NULL AND p.role = add_peer.role)
            USING ERRCODE = 'duplicate_object';
    END IF;
    PERFORM _check_allowed_ips(name, allowed_ips);

    INSERT INTO peers (name, role, allowed_ips) VALUES (name, role, allowed_ips)
    RETURNING id INTO new_id;
    INSERT INTO cursors (peer) VALUES (new_id);
    INSERT INTO traffic (peer, direction) VALUES (new_id, 't'), (new_id, 'r');
    EXECUTE format('GRANT pgvpn_peer TO %s', role);
    EXECUTE format('ALTER ROLE %s CONNECTION LIMIT %s', role, connection_limit);
    RETURN new_id;
END
$$;

CREATE OR REPLACE FUNCTION set_allowed_ips(name text, allowed_ips cidr[]) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pgvpn, pg_temp AS $$
BEGIN
    PERFORM _check_allowed_ips(name, allowed_ips);
    UPDATE peers p SET allowed_ips = set_allowed_ips.allowed_ips
     WHERE p.removed_at IS NULL AND p.name = set_allowed_ips.name;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no peer "%"', name USING ERRCODE = 'undefined_object';
    END IF;
END
$$;

CREATE OR REPLACE FUNCTION remove_peer(name text) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pgvpn, pg_temp AS $$
DECLARE
    old_role regrole;
BEGIN
    UPDATE peers p SET removed_at = now(), role = NULL, allowed_ips = '{}'
      FROM peers old
     WHERE old.id = p.id AND p.removed_at IS NULL AND p.name = remove_peer.name
    RETURNING old.role INTO old_role;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no peer "%"', name USING ERRCODE = 'undefined_object';
    END IF;
    EXECUTE format('REVOKE pgvpn_peer FROM %s', old_role);
    PERFORM pg_terminate_backend(a.pid)
       FROM pg_stat_activity a
      WHERE a.usesysid = old_role::oid AND a.pid <> pg_backend_pid();
END
$$;

CREATE OR REPLACE FUNCTION _chunk_name(k int) RETURNS text
LANGUAGE sql IMMUTABLE AS $$ SELECT format('packets_%s', lpad(k::text, 6, '0')) $$;

CREATE OR REPLACE FUNCTION _open_chunk(k int) RETURNS regclass
LANGUAGE plpgsql SET search_path = pg_catalog, pgvpn, pg_temp AS $$
DECLARE
    rel text := pgvpn._chunk_name(k);
    frel text := replace(pgvpn._chunk_name(k), 'packets_', 'flows_');
    srel text := replace(pgvpn._chunk_name(k), 'packets_', 'sums_');
    lo bigint := k::bigint << 40;
BEGIN
    -- toast_tuple_target = max: a packet up to ~8 KB stays inline (no TOAST side table),
    -- and payload's EXTERNAL storage (copied by LIKE) means no compression attempt.
    EXECUTE format('CREATE TABLE pgvpn.%I (LIKE pgvpn.packets INCLUDING DEFAULTS INCLUDING STORAGE)'
                   ' WITH (toast_tuple_target = 8160)', rel);
    -- Delivery: recv() walks (dst_peer, id). Audits: id (the latest packets, and the id
    -- ranges the flow index points to; appended at the right edge, so cheap), and time
    -- (BRIN is nearly free on an append-only log). The host-pair btree comes later,
    -- once the chunk is closed.
    EXECUTE format('CREATE INDEX %I ON pgvpn.%I (dst_peer, id)', rel || '_delivery', rel);
    EXECUTE format('CREATE INDEX %I ON pgvpn.%I (id)', rel || '_id', rel);
    EXECUTE format('CREATE INDEX %I ON pgvpn.%I USING brin (sent_at, id)', rel || '_time', rel);
    -- The flow index's own indexes: by host either way, by destination port (each newest
    -- first), and by time.
    EXECUTE format('CREATE TABLE pgvpn.%I (LIKE pgvpn.flow_log INCLUDING DEFAULTS)', frel);
    EXECUTE format('CREATE INDEX %I ON pgvpn.%I (src_addr, last_id)', frel || '_src', frel);
    EXECUTE format('CREATE INDEX %I ON pgvpn.%I (dst_addr, last_id)', frel || '_dst', frel);
    EXECUTE format('CREATE INDEX %I ON pgvpn.%I (dst_port, last_id)', frel || '_port', frel);
    -- One conversation (host pair, ports), newest first: packets_between, flow_packets.
    EXECUTE format('CREATE INDEX %I ON pgvpn.%I (src_addr, dst_addr, dst_port, src_port, last_id)',
                   frel || '_pair', frel);
    EXECUTE format('CREATE INDEX %I ON pgvpn.%I USING brin (at, first_id)', frel || '_time', frel);
    EXECUTE format('GRANT SELECT ON pgvpn.%I TO pgvpn_auditor', frel);
    EXECUTE format('ALTER TABLE pgvpn.flow_log ATTACH PARTITION pgvpn.%I FOR VALUES FROM (%s) TO (%s)',
                   frel, lo, lo + (1::bigint << 40));
    -- Its flow summaries: one row per flow (what the upserts of _summarize match), and
    -- the biggest first (top_flows).
    EXECUTE format('CREATE TABLE pgvpn.%I (LIKE pgvpn.flow_sums INCLUDING DEFAULTS)', srel);
    EXECUTE format('CREATE UNIQUE INDEX %I ON pgvpn.%I'
                   ' (src_addr, dst_addr, src_port, dst_port, protocol, src_peer, dst_peer, ip_version)',
                   srel || '_flow', srel);
    EXECUTE format('CREATE INDEX %I ON pgvpn.%I (bytes DESC)', srel || '_bytes', srel);
    EXECUTE format('GRANT SELECT ON pgvpn.%I TO pgvpn_auditor', srel);
    EXECUTE format('ALTER TABLE pgvpn.flow_sums ATTACH PARTITION pgvpn.%I FOR VALUES FROM (%s) TO (%s)',
                   srel, k, k + 1);
    -- Auditors read everything, also a chunk directly (through pgvpn.packets the
    -- parent's grant suffices).
    EXECUTE format('GRANT SELECT ON pgvpn.%I TO pgvpn_auditor', rel);
    EXECUTE format('ALTER TABLE pgvpn.packets ATTACH PARTITION pgvpn.%I FOR VALUES FROM (%s) TO (%s)',
                   rel, lo, lo + (1::bigint << 40));
    INSERT INTO pgvpn.chunks (chunk, relid, flow_relid, sums_relid)
    VALUES (k, format('pgvpn.%I', rel)::regclass, format('pgvpn.%I', frel)::regclass,
            format('pgvpn.%I', srel)::regclass);
    RETURN format('pgvpn.%I', rel)::regclass;
END
$$;

CREATE OR REPLACE FUNCTION _ensure_chunks() RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pgvpn, pg_temp AS $$
DECLARE
    last bigint;
    highest bigint;
    cur int;
BEGIN
    -- Almost always there is nothing to do: find that out without the lock, which
    -- conflicts with itself and is held to the end of the caller's transaction, so that
    -- first sends neither queue behind each other nor wait for a running prune().
    -- Anything missing is checked again under the lock.
    SELECT CASE WHEN is_called THEN last_value ELSE last_value - 1 END INTO last FROM pgvpn.packet_id;
    cur := pgvpn._chunk_of(greatest(last, 1));
    IF (SELECT count(*) FROM pgvpn.chunks WHERE chunk IN (cur, cur + 1)) = 2
       AND NOT EXISTS (SELECT FROM pgvpn.cursors WHERE acked_id > last)
       AND coalesce((SELECT max(id) FROM pgvpn.packets), 0) <= last THEN
        RETURN;
    END IF;
    LOCK TABLE pgvpn.chunks IN SHARE ROW EXCLUSIVE MODE;  -- one at a time, with prune()
    SELECT CASE WHEN is_called THEN last_value ELSE last_value - 1 END INTO last FROM pgvpn.packet_id;
    -- Past every cursor and every logged packet (a restore brings both back; one index
    -- probe per chunk).
    SELECT greatest(max(acked_id), 0) INTO highest FROM pgvpn.cursors;
    highest := greatest(highest, (SELECT max(id) FROM pgvpn.packets));
    IF highest > last THEN
        RAISE WARNING 'pgvpn: the packet id sequence (%) was behind the log (a stored cursor or packet at %); moved it past both',
            last, highest;
        PERFORM setval('pgvpn.packet_id', highest);
        last := highest;
    END IF;
    cur := pgvpn._chunk_of(greatest(last, 1));
    IF NOT EXISTS (SELECT FROM pgvpn.chunks WHERE chunk = cur) THEN
        PERFORM pgvpn._open_chunk(cur);
        UPDATE pgvpn.chunks SET opened_at = clock_timestamp() WHERE chunk = cur;
    END IF;
    IF NOT EXISTS (SELECT FROM pgvpn.chunks WHERE chunk = cur + 1) THEN
        PERFORM pgvpn._open_chunk(cur + 1);
    END IF;
END
$$;

-- Rolls the flow rows logged since the last run up into flow_sums (one row per chunk and
-- flow), up to the highest id handed out so far: h. Exact, because it waits until every
-- row with an id up to h is committed or rolled back. Ids are taken only under a
-- receiver's ordering lock, held to the end of the commit, which is visible before the
-- lock goes (send.rs). So a transaction that took ids up to h and has not finished holds
-- an ordering lock when we look, after reading h; once every such holder has ended, a new
-- statement (a new snapshot: READ COMMITTED only) sees all of its rows. A holder is in
-- its commit, so this takes milliseconds; it waits at most wait_ms and otherwise leaves
-- the rollup to the next run. Returns the summary rows written. Called by _prune, under
-- its lock on chunks (one at a time).
CREATE FUNCTION _summarize(wait_ms int) RETURNS bigint
LANGUAGE plpgsql SET search_path = pg_catalog, pgvpn, pg_temp AS $$
DECLARE
    w bigint := coalesce((SELECT summarized_to FROM flow_rollup), 0);
    h bigint;
    holders text[];
    deadline timestamptz := clock_timestamp() + wait_ms * interval '1 ms';
    c chunks;
    written bigint;
    total bigint := 0;
BEGIN
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE NOTICE 'pgvpn.prune: the flow summaries are rolled up only under READ COMMITTED (this is %); skipped',
            current_setting('transaction_isolation');
        RETURN 0;
    END IF;
    SELECT CASE WHEN is_called THEN last_value ELSE last_value - 1 END INTO h FROM packet_id;
    IF h <= w THEN
        RETURN 0;
    END IF;
    SELECT array_agg(DISTINCT l.virtualtransaction) INTO holders
      FROM pg_locks l
     WHERE l.locktype = 'object' AND l.classid = 'pgvpn.peers'::regclass AND l.objid <> 0
       AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
       AND l.granted AND l.pid IS DISTINCT FROM pg_backend_pid();
    WHILE EXISTS (SELECT FROM pg_locks l WHERE l.locktype = 'virtualxid' AND l.virtualxid = ANY (holders)) LOOP
        IF clock_timestamp() > deadline THEN
            RAISE LOG 'pgvpn.prune: a sender is still committing after %ms; the flow summaries wait for a later run',
                wait_ms;
            RETURN 0;
        END IF;
        PERFORM pg_sleep(0.001);
    END LOOP;
    FOR c IN SELECT * FROM chunks WHERE chunk BETWEEN _chunk_of(w + 1) AND _chunk_of(h) ORDER BY chunk LOOP
        EXECUTE format(
            'INSERT INTO %s AS s SELECT %s, src_peer, dst_peer, ip_version, protocol, src_addr, dst_addr,'
            '       coalesce(src_port, -1), coalesce(dst_port, -1), sum(packets), sum(bytes), min(at), max(at),'
            '       bit_or(tcp_flags), sum(syns), min(first_id), max(last_id)'
            '  FROM %s WHERE first_id > $1 AND first_id <= $2'
            ' GROUP BY src_peer, dst_peer, ip_version, protocol, src_addr, dst_addr, src_port, dst_port'
            ' ON CONFLICT (src_addr, dst_addr, src_port, dst_port, protocol, src_peer, dst_peer, ip_version) DO UPDATE'
            '   SET packets = s.packets + excluded.packets, bytes = s.bytes + excluded.bytes,'
            '       first_seen = least(s.first_seen, excluded.first_seen),'
            '       last_seen = greatest(s.last_seen, excluded.last_seen),'
            '       tcp_flags = coalesce(s.tcp_flags | excluded.tcp_flags, s.tcp_flags, excluded.tcp_flags),'
            '       syns = s.syns + excluded.syns, first_id = least(s.first_id, excluded.first_id),'
            '       last_id = greatest(s.last_id, excluded.last_id)',
            c.sums_relid, c.chunk, c.flow_relid) USING w, h;
        GET DIAGNOSTICS written = ROW_COUNT;
        total := total + written;
    END LOOP;
    INSERT INTO flow_rollup AS r (summarized_to, at) VALUES (h, clock_timestamp())
        ON CONFLICT (one) DO UPDATE SET summarized_to = excluded.summarized_to, at = excluded.at;
    RETURN total;
END
$$;

CREATE OR REPLACE FUNCTION _prune(retention interval, chunk_interval interval, lock_wait_ms int) RETURNS int
LANGUAGE plpgsql SET search_path = pg_catalog, pgvpn, pg_temp AS $$
DECLARE
    cur int;
    spare_ready boolean;
    is_empty boolean;
    old chunks;
    opened timestamptz;
    dropped int := 0;
    saved_timeout text := current_setting('lock_timeout');
BEGIN
    LOCK TABLE chunks IN SHARE ROW EXCLUSIVE MODE;  -- one prune at a time
    PERFORM _ensure_chunks();
    PERFORM _summarize(lock_wait_ms);
    PERFORM set_config('lock_timeout', lock_wait_ms || 'ms', true);
    cur := _chunk_of((SELECT last_value FROM packet_id));
    -- Ready means committed: created by an earlier transaction, not by this one.
    spare_ready := EXISTS (SELECT FROM chunks c WHERE c.chunk = cur + 1
                              AND c.xmin IS DISTINCT FROM xid(pg_current_xact_id_if_assigned()));

    -- Chunks behind the sequence are closed (closed_at may be late if an earlier prune
    -- rolled back: that only keeps packets longer).
    UPDATE chunks SET closed_at = clock_timestamp() WHERE chunk < cur AND closed_at IS NULL;
    UPDATE chunks SET opened_at = clock_timestamp() WHERE chunk = cur AND opened_at IS NULL;

    FOR old IN SELECT * FROM chunks
                WHERE closed_at < clock_timestamp() - retention ORDER BY chunk LOOP
        BEGIN
            -- What goes unread: packets beyond their receiver's cursor (recv() and
            -- peer_stats report it).
            EXECUTE format(
                'UPDATE pgvpn.cursors c SET expired_packets = c.expired_packets + x.n,'
                '       expired_upto = greatest(c.expired_upto, x.upto)'
                '  FROM (SELECT k.dst_peer, count(*) AS n, max(k.id) AS upto'
                '          FROM %s k JOIN pgvpn.cursors c2 ON c2.peer = k.dst_peer AND k.id > c2.acked_id'
                '         GROUP BY k.dst_peer) x'
                ' WHERE c.peer = x.dst_peer', old.relid);
            EXECUTE format('DROP TABLE %s, %s, %s', old.relid, old.flow_relid, old.sums_relid);
            DELETE FROM chunks WHERE chunk = old.chunk;
            dropped := dropped + 1;
        EXCEPTION WHEN lock_not_available THEN
            RAISE LOG 'pgvpn.prune: chunk % is in use (a reader holds the log longer than %ms); it will be dropped on a later run',
                old.chunk, lock_wait_ms;
            EXIT;
        END;
    END LOOP;
    DELETE FROM reject_samples WHERE at < clock_timestamp() - retention;

    -- Closed chunks get their host-pair index once, in bulk (a sort, instead of a
    -- btree insert per packet while the chunk was hot). Only chunks closed by an
    -- earlier prune: no send can still be writing to them.
    FOR old IN SELECT * FROM chunks
                WHERE closed_at IS NOT NULL AND indexed_at IS NULL
                  AND xmin IS DISTINCT FROM xid(pg_current_xact_id_if_assigned())
                ORDER BY chunk LOOP
        BEGIN
            EXECUTE format('CREATE INDEX IF NOT EXISTS %I ON %s (src_addr, dst_addr)',
                           (SELECT relname FROM pg_class WHERE oid = old.relid) || '_hosts',
                           old.relid);
            UPDATE chunks SET indexed_at = clock_timestamp() WHERE chunk = old.chunk;
        EXCEPTION WHEN lock_not_available THEN
            RAISE LOG 'pgvpn.prune: chunk % is busy; its host-pair index waits for a later run', old.chunk;
        END;
    END LOOP;

    SELECT opened_at INTO opened FROM chunks WHERE chunk = cur;
    IF opened < clock_timestamp() - chunk_interval THEN
        EXECUTE format('SELECT NOT EXISTS (SELECT FROM %s)', (SELECT relid FROM chunks WHERE chunk = cur))
           INTO is_empty;
        IF is_empty THEN
            -- An idle VPN keeps its one empty chunk instead of piling up new ones.
            UPDATE chunks SET opened_at = clock_timestamp() WHERE chunk = cur;
        ELSIF spare_ready THEN
            UPDATE chunks SET closed_at = clock_timestamp() WHERE chunk = cur;
            UPDATE chunks SET opened_at = clock_timestamp() WHERE chunk = cur + 1;
            -- Sequences only move forward, so per-receiver id order (send.rs) holds.
            PERFORM setval('packet_id', (cur + 1)::bigint << 40);
            cur := cur + 1;
        END IF;
    END IF;
    -- Keep two spares ahead: the next rotation never waits for a chunk to be created.
    IF NOT EXISTS (SELECT FROM chunks WHERE chunk = cur + 1) THEN
        PERFORM _open_chunk(cur + 1);
    END IF;
    IF NOT EXISTS (SELECT FROM chunks WHERE chunk = cur + 2) THEN
        PERFORM _open_chunk(cur + 2);
    END IF;
    PERFORM set_config('lock_timeout', saved_timeout, true);
    RETURN dropped;
END
$$;

-- The library's functions (as pgrx generates them for 0.2.0).
CREATE OR REPLACE FUNCTION "_live_counters"() RETURNS TABLE (
	"peer" INT,  /* i32 */
	"epoch" bigint,  /* i64 */
	"tx_packets" bigint,  /* i64 */
	"tx_bytes" bigint,  /* i64 */
	"rx_packets" bigint,  /* i64 */
	"rx_bytes" bigint,  /* i64 */
	"tx_at" bigint,  /* i64 */
	"rx_at" bigint,  /* i64 */
	"backlog" bigint  /* i64 */
)
STRICT VOLATILE PARALLEL RESTRICTED
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', '_live_counters_wrapper';

CREATE OR REPLACE FUNCTION "_live_rejects"() RETURNS TABLE (
	"peer" INT,  /* i32 */
	"epoch" bigint,  /* i64 */
	"reason" TEXT,  /* String */
	"packets" bigint,  /* i64 */
	"at" bigint  /* i64 */
)
STRICT VOLATILE PARALLEL RESTRICTED
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', '_live_rejects_wrapper';

CREATE OR REPLACE FUNCTION "ack"(
	"upto_id" bigint /* i64 */
) RETURNS bigint /* i64 */
STRICT VOLATILE SECURITY DEFINER PARALLEL UNSAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'ack_wrapper';

CREATE OR REPLACE FUNCTION "cursor"() RETURNS bigint /* i64 */
STRICT VOLATILE SECURITY DEFINER PARALLEL UNSAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'cursor_wrapper';

CREATE OR REPLACE FUNCTION "decode"(
	"packet" bytea /* & [u8] */
) RETURNS jsonb /* JsonB */
IMMUTABLE STRICT PARALLEL SAFE 
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'decode_packet_wrapper';

CREATE OR REPLACE FUNCTION "flush_counters"() RETURNS INT /* i32 */
STRICT VOLATILE PARALLEL UNSAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'flush_counters_wrapper';

CREATE OR REPLACE FUNCTION "log_generation"() RETURNS bigint /* i64 */
STRICT VOLATILE PARALLEL RESTRICTED
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'log_generation_wrapper';

CREATE OR REPLACE FUNCTION "log_wait"(
	"since" bigint, /* i64 */
	"wait_ms" INT /* i32 */
) RETURNS bigint /* i64 */
STRICT VOLATILE PARALLEL UNSAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'log_wait_wrapper';

CREATE OR REPLACE FUNCTION "prune"() RETURNS INT /* i32 */
STRICT VOLATILE PARALLEL UNSAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'prune_wrapper';

CREATE OR REPLACE FUNCTION "recv"(
	"after_id" bigint, /* i64 */
	"max_packets" INT DEFAULT 1024, /* i32 */
	"wait_ms" INT DEFAULT 0, /* i32 */
	"max_bytes" INT DEFAULT 4194304 /* i32 */
) RETURNS TABLE (
	"id" bigint,  /* i64 */
	"payload" bytea  /* Vec < u8 > */
)
STRICT VOLATILE SECURITY DEFINER PARALLEL UNSAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'recv_wrapper';

CREATE OR REPLACE FUNCTION "send"(
	"packets" bytea[] /* Array < & [u8] > */
) RETURNS bigint /* i64 */
STRICT VOLATILE SECURITY DEFINER PARALLEL UNSAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'send_wrapper';

CREATE OR REPLACE FUNCTION "send"(
	"packet" bytea /* & [u8] */
) RETURNS bigint /* i64 */
STRICT VOLATILE SECURITY DEFINER PARALLEL UNSAFE 
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'send_one_wrapper';

CREATE OR REPLACE FUNCTION "peers_changed"()
	RETURNS TRIGGER
	LANGUAGE c
	AS 'MODULE_PATHNAME', 'peers_changed_wrapper';


-- 4. Chunks in the 0.2.0 form: each with its own indexes (no partitioned index on the
-- parent, so a dump restores them once), its part of the flow index (computed from its
-- packets: 0.1.0 stamped every packet of one send with one sent_at, so a flow and a
-- sent_at are a send's flow), readable by auditors, and not an extension member (0.1.0
-- made its first chunks inside CREATE EXTENSION; members are not dumped).
DO $$
DECLARE
    c record;
    rel text;
    frel text;
    srel text;
    lo bigint;
BEGIN
    FOR c IN SELECT chunk, relid FROM pgvpn.chunks ORDER BY chunk LOOP
        rel := (SELECT relname FROM pg_class WHERE oid = c.relid);
        frel := replace(rel, 'packets_', 'flows_');
        srel := replace(rel, 'packets_', 'sums_');
        lo := c.chunk::bigint << 40;
        EXECUTE format('CREATE INDEX %I ON pgvpn.%I (dst_peer, id)', rel || '_delivery', rel);
        EXECUTE format('CREATE INDEX %I ON pgvpn.%I (id)', rel || '_id', rel);
        EXECUTE format('CREATE INDEX %I ON pgvpn.%I USING brin (sent_at, id)', rel || '_time', rel);
        EXECUTE format('GRANT SELECT ON pgvpn.%I TO pgvpn_auditor', rel);
        EXECUTE format('CREATE TABLE pgvpn.%I (LIKE pgvpn.flow_log INCLUDING DEFAULTS)', frel);
        EXECUTE format(
            'INSERT INTO pgvpn.%I (first_id, last_id, at, src_peer, dst_peer, ip_version, protocol,'
            '  src_addr, dst_addr, src_port, dst_port, packets, bytes, tcp_flags, syns)'
            ' SELECT min(id), max(id), sent_at, src_peer, dst_peer, ip_version, protocol,'
            '  src_addr, dst_addr, src_port, dst_port, count(*), sum(length), bit_or(tcp_flags),'
            '  count(*) FILTER (WHERE protocol = 6 AND tcp_flags & 18 = 2)'
            ' FROM pgvpn.%I GROUP BY sent_at, src_peer, dst_peer, ip_version, protocol,'
            '  src_addr, dst_addr, src_port, dst_port', frel, rel);
        EXECUTE format('CREATE INDEX %I ON pgvpn.%I (src_addr, last_id)', frel || '_src', frel);
        EXECUTE format('CREATE INDEX %I ON pgvpn.%I (dst_addr, last_id)', frel || '_dst', frel);
        EXECUTE format('CREATE INDEX %I ON pgvpn.%I (dst_port, last_id)', frel || '_port', frel);
        EXECUTE format('CREATE INDEX %I ON pgvpn.%I (src_addr, dst_addr, dst_port, src_port, last_id)',
                       frel || '_pair', frel);
        EXECUTE format('CREATE INDEX %I ON pgvpn.%I USING brin (at, first_id)', frel || '_time', frel);
        EXECUTE format('GRANT SELECT ON pgvpn.%I TO pgvpn_auditor', frel);
        EXECUTE format('ALTER TABLE pgvpn.flow_log ATTACH PARTITION pgvpn.%I FOR VALUES FROM (%s) TO (%s)',
                       frel, lo, lo + (1::bigint << 40));
        -- Its flow summaries start empty: the first prune() rolls the flow rows up.
        EXECUTE format('CREATE TABLE pgvpn.%I (LIKE pgvpn.flow_sums INCLUDING DEFAULTS)', srel);
        EXECUTE format('CREATE UNIQUE INDEX %I ON pgvpn.%I'
                       ' (src_addr, dst_addr, src_port, dst_port, protocol, src_peer, dst_peer, ip_version)',
                       srel || '_flow', srel);
        EXECUTE format('CREATE INDEX %I ON pgvpn.%I (bytes DESC)', srel || '_bytes', srel);
        EXECUTE format('GRANT SELECT ON pgvpn.%I TO pgvpn_auditor', srel);
        EXECUTE format('ALTER TABLE pgvpn.flow_sums ATTACH PARTITION pgvpn.%I FOR VALUES FROM (%s) TO (%s)',
                       srel, c.chunk, c.chunk + 1);
        -- Made inside this script, so members: no, they are data.
        EXECUTE format('ALTER EXTENSION pgvpn DROP TABLE pgvpn.%I', frel);
        EXECUTE format('ALTER EXTENSION pgvpn DROP TABLE pgvpn.%I', srel);
        UPDATE pgvpn.chunks SET flow_relid = format('pgvpn.%I', frel)::regclass,
                                sums_relid = format('pgvpn.%I', srel)::regclass WHERE chunk = c.chunk;
        IF EXISTS (SELECT FROM pg_depend WHERE classid = 'pg_class'::regclass
                      AND objid = c.relid AND deptype = 'e') THEN
            EXECUTE format('ALTER EXTENSION pgvpn DROP TABLE pgvpn.%I', rel);
        END IF;
    END LOOP;
END
$$;
ALTER TABLE chunks ALTER COLUMN flow_relid SET NOT NULL;
ALTER TABLE chunks ALTER COLUMN sums_relid SET NOT NULL;
-- The partitioned indexes and the child indexes 0.1.0 attached to them.
DROP INDEX packets_delivery, packets_time;
-- One spare was enough in 0.1.0; 0.2.0 keeps two (prune() adds the second).

-- 5. Roles: a peer's sessions are limited (add_peer's default; ALTER ROLE to change).
DO $$
DECLARE
    r regrole;
BEGIN
    FOR r IN SELECT p.role FROM pgvpn.peers p JOIN pg_roles a ON a.oid = p.role
              WHERE p.removed_at IS NULL AND a.rolconnlimit = -1 LOOP
        EXECUTE format('ALTER ROLE %s CONNECTION LIMIT 8', r);
    END LOOP;
END
$$;

-- 6. Views and helpers as in 0.2.0 (sql/views.sql).
-- Rejects per peer id and reason: the table's totals plus what shared memory counted
-- beyond each row's mark (all of it if the mark is from another life of the counters).
CREATE VIEW reject_totals_by_id AS
SELECT coalesce(c.peer, l.peer) AS peer, coalesce(c.reason, l.reason) AS reason,
       coalesce(c.packets, 0) + _beyond(l.packets, l.epoch, c.mark, c.mark_epoch) AS packets,
       greatest(c.last_at, _ts(l.at)) AS last_at
  FROM reject_counts c
  FULL JOIN _live_rejects() l ON l.peer = c.peer AND l.reason = c.reason;

-- One row per 5-tuple and direction (ports are NULL for ICMP and fragments), from the
-- flow index: it never reads the packets. The rolled-up part (flow_sums, up to
-- flow_rollup.summarized_to) plus the flow rows logged since, so it is exact whenever it
-- is read; prune() keeps the second part small.
CREATE VIEW flows AS
SELECT s.name AS src_peer, d.name AS dst_peer, f.ip_version, f.protocol,
       f.src_addr, nullif(f.src_port, -1) AS src_port, f.dst_addr, nullif(f.dst_port, -1) AS dst_port,
       f.packets, f.bytes, f.first_seen, f.last_seen, f.tcp_flags, f.syns, f.first_id, f.last_id
  FROM (SELECT src_peer, dst_peer, ip_version, protocol, src_addr, src_port, dst_addr, dst_port,
               sum(packets)::bigint AS packets, sum(bytes)::numeric AS bytes,
               min(first_seen) AS first_seen, max(last_seen) AS last_seen,
               bit_or(tcp_flags) AS tcp_flags, sum(syns)::bigint AS syns,
               min(first_id) AS first_id, max(last_id) AS last_id
          FROM (SELECT src_peer, dst_peer, ip_version, protocol, src_addr, src_port, dst_addr, dst_port,
                       packets, bytes, first_seen, last_seen, tcp_flags, syns, first_id, last_id
                  FROM flow_sums
                UNION ALL
                SELECT src_peer, dst_peer, ip_version, protocol, src_addr, coalesce(src_port, -1),
                       dst_addr, coalesce(dst_port, -1), packets, bytes, at, at, tcp_flags, syns, first_id, last_id
                  FROM flow_log
                 WHERE first_id > coalesce((SELECT summarized_to FROM flow_rollup), 0)) u
         GROUP BY src_peer, dst_peer, ip_version, protocol, src_addr, src_port, dst_addr, dst_port) f
  JOIN peers s ON s.id = f.src_peer
  JOIN peers d ON d.id = f.dst_peer;
COMMENT ON VIEW flows IS 'pgvpn: packets and bytes per 5-tuple, first and last seen (from the flow index)';

-- The n flows of pgvpn.flows with the most bytes, without totalling every flow: the
-- candidates are each chunk's biggest summaries (an index on bytes) and every flow
-- logged since the last rollup; their totals are exact. A flow that is not a candidate
-- has, in each chunk where it appears, at most that chunk's smallest candidate (the chunk
-- was cut off at `depth` rows), and nothing unsummarized; so its total is at most the
-- sum of those cut-off values. Once the n-th candidate reaches that bound, no other flow
-- can beat it; until then the depth grows. Ties come in any order.
CREATE FUNCTION top_flows(n int DEFAULT 10)
RETURNS SETOF flows
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pgvpn, pg_temp
    SET enable_hashjoin = off SET enable_mergejoin = off SET jit = off AS $$
DECLARE
    w bigint := coalesce((SELECT summarized_to FROM flow_rollup), 0);
    depth bigint := 4 * n;
    bound numeric;
    cut boolean;
    nth numeric;
    result flows[];
BEGIN
    IF n IS NULL OR n < 1 OR n > 100000 THEN
        RAISE EXCEPTION 'pgvpn: top_flows(n) needs n between 1 and 100000 (got %)', n
            USING ERRCODE = '22023';
    END IF;
    LOOP
        WITH tops AS (
            SELECT c.chunk, t.src_peer, t.dst_peer, t.ip_version, t.protocol, t.src_addr, t.src_port,
                   t.dst_addr, t.dst_port, t.bytes,
                   count(*) OVER (PARTITION BY c.chunk) AS got, min(t.bytes) OVER (PARTITION BY c.chunk) AS low
              FROM chunks c
             CROSS JOIN LATERAL (SELECT * FROM flow_sums s WHERE s.chunk = c.chunk
                                  ORDER BY s.bytes DESC LIMIT depth) t),
        tail AS (
            SELECT f.src_peer, f.dst_peer, f.ip_version, f.protocol, f.src_addr, coalesce(f.src_port, -1) AS src_port,
                   f.dst_addr, coalesce(f.dst_port, -1) AS dst_port, f.packets, f.bytes, f.at,
                   f.tcp_flags, f.syns, f.first_id, f.last_id
              FROM flow_log f WHERE f.first_id > w),
        cand AS (
            SELECT src_peer, dst_peer, ip_version, protocol, src_addr, src_port, dst_addr, dst_port FROM tops
            UNION
            SELECT src_peer, dst_peer, ip_version, protocol, src_addr, src_port, dst_addr, dst_port FROM tail),
        totals AS (
            SELECT u.src_peer, u.dst_peer, u.ip_version, u.protocol, u.src_addr, u.src_port, u.dst_addr, u.dst_port,
                   sum(u.packets)::bigint AS packets, sum(u.bytes)::numeric AS bytes,
                   min(u.first_seen) AS first_seen, max(u.last_seen) AS last_seen,
                   bit_or(u.tcp_flags) AS tcp_flags, sum(u.syns)::bigint AS syns,
                   min(u.first_id) AS first_id, max(u.last_id) AS last_id
              FROM (SELECT s.src_peer, s.dst_peer, s.ip_version, s.protocol, s.src_addr, s.src_port, s.dst_addr,
                           s.dst_port, s.packets, s.bytes, s.first_seen, s.last_seen, s.tcp_flags, s.syns,
                           s.first_id, s.last_id
                      FROM cand k JOIN flow_sums s
                        ON s.src_addr = k.src_addr AND s.dst_addr = k.dst_addr AND s.src_port = k.src_port
                       AND s.dst_port = k.dst_port AND s.protocol = k.protocol AND s.src_peer = k.src_peer
                       AND s.dst_peer = k.dst_peer AND s.ip_version = k.ip_version
                    UNION ALL
                    SELECT src_peer, dst_peer, ip_version, protocol, src_addr, src_port, dst_addr, dst_port,
                           packets, bytes, at, at, tcp_flags, syns, first_id, last_id FROM tail) u
             GROUP BY u.src_peer, u.dst_peer, u.ip_version, u.protocol, u.src_addr, u.src_port, u.dst_addr, u.dst_port
             ORDER BY bytes DESC LIMIT n),
        named AS (
            SELECT (ps.name, pd.name, t.ip_version, t.protocol, t.src_addr, nullif(t.src_port, -1), t.dst_addr,
                    nullif(t.dst_port, -1), t.packets, t.bytes, t.first_seen, t.last_seen, t.tcp_flags, t.syns,
                    t.first_id, t.last_id)::flows AS r, t.bytes
              FROM totals t JOIN peers ps ON ps.id = t.src_peer JOIN peers pd ON pd.id = t.dst_peer)
        SELECT (SELECT coalesce(sum(low), 0) FROM (SELECT DISTINCT chunk, low FROM tops WHERE got = depth) x),
               (SELECT bool_or(got = depth) FROM tops),
               (SELECT min(bytes) FROM named HAVING count(*) = n),
               (SELECT array_agg(r ORDER BY bytes DESC) FROM named)
          INTO bound, cut, nth, result;
        EXIT WHEN NOT coalesce(cut, false) OR nth >= bound;
        depth := depth * 4;
    END LOOP;
    RETURN QUERY SELECT * FROM unnest(result);
END
$$;

-- Audits that find packets through the flow index: the matching flow rows first (a few
-- per stream and second, by host, port or 5-tuple, newest first), then their packets by
-- id range. The newest n packets lie within the newest n matching flow rows, each of
-- which holds at least one of them.
--
-- The functions pin that plan: a nested loop into each chunk's id btree. On a big log the
-- planner otherwise joins the flow rows to the packets with a hash join over a scan of
-- every chunk (its estimate for an id range with unknown bounds is a third of the
-- chunk): 1.4-1.8 s instead of milliseconds on 2M packets (docs/performance.md). The
-- same estimate puts the pinned plan past jit_above_cost, and JIT then compiles for
-- half a second to run a 15 ms query: no JIT either. Every condition on the packets
-- refers to the flow row, none to a constant: with `dst_port = port` alone the planner
-- could, and on 50M packets did, turn the loop round, scanning the whole log for the
-- port and matching each packet against the flow rows (31 s instead of milliseconds).

-- Every packet between two hosts, both directions, in a time range.
CREATE FUNCTION packets_between(a inet, b inet, since timestamptz DEFAULT now() - interval '1 hour',
                                until timestamptz DEFAULT 'infinity')
RETURNS SETOF packet_log
LANGUAGE sql STABLE SET search_path = pg_catalog, pgvpn, pg_temp
    SET enable_hashjoin = off SET enable_mergejoin = off SET jit = off AS $$
    SELECT l.* FROM (
        SELECT f.first_id, f.last_id, f.src_addr, f.dst_addr, f.protocol, f.src_port, f.dst_port FROM flow_log f
         WHERE f.src_addr = a AND f.dst_addr = b AND f.at >= since AND f.at < until
        UNION ALL
        SELECT f.first_id, f.last_id, f.src_addr, f.dst_addr, f.protocol, f.src_port, f.dst_port FROM flow_log f
         WHERE f.src_addr = b AND f.dst_addr = a AND f.at >= since AND f.at < until) f
    CROSS JOIN LATERAL (
        SELECT * FROM packet_log k
         WHERE k.id BETWEEN f.first_id AND f.last_id
           AND k.src_addr = f.src_addr AND k.dst_addr = f.dst_addr AND k.protocol = f.protocol
           AND k.src_port IS NOT DISTINCT FROM f.src_port
           AND k.dst_port IS NOT DISTINCT FROM f.dst_port) l
    ORDER BY l.id
$$;

-- The newest n packets from or to a host.
CREATE FUNCTION host_packets(host inet, n int DEFAULT 100)
RETURNS SETOF packet_log
LANGUAGE sql STABLE SET search_path = pg_catalog, pgvpn, pg_temp
    SET enable_hashjoin = off SET enable_mergejoin = off SET jit = off AS $$
    SELECT l.* FROM (
        (SELECT f.first_id, f.last_id, f.src_addr, f.dst_addr, f.protocol, f.src_port, f.dst_port FROM flow_log f
          WHERE f.src_addr = host ORDER BY f.last_id DESC LIMIT n)
        UNION
        (SELECT f.first_id, f.last_id, f.src_addr, f.dst_addr, f.protocol, f.src_port, f.dst_port FROM flow_log f
          WHERE f.dst_addr = host ORDER BY f.last_id DESC LIMIT n)) f
    CROSS JOIN LATERAL (
        SELECT * FROM packet_log k
         WHERE k.id BETWEEN f.first_id AND f.last_id
           AND k.src_addr = f.src_addr AND k.dst_addr = f.dst_addr AND k.protocol = f.protocol
           AND k.src_port IS NOT DISTINCT FROM f.src_port
           AND k.dst_port IS NOT DISTINCT FROM f.dst_port) l
    ORDER BY l.id DESC LIMIT n
$$;

-- The newest n packets to a destination port (TCP or UDP).
CREATE FUNCTION port_packets(port int, n int DEFAULT 100)
RETURNS SETOF packet_log
LANGUAGE sql STABLE SET search_path = pg_catalog, pgvpn, pg_temp
    SET enable_hashjoin = off SET enable_mergejoin = off SET jit = off AS $$
    SELECT l.* FROM (
        SELECT f.first_id, f.last_id, f.src_addr, f.dst_addr, f.protocol, f.src_port, f.dst_port
          FROM flow_log f
         WHERE f.dst_port = port ORDER BY f.last_id DESC LIMIT n) f
    CROSS JOIN LATERAL (
        SELECT * FROM packet_log k
         WHERE k.id BETWEEN f.first_id AND f.last_id
           AND k.src_addr = f.src_addr AND k.dst_addr = f.dst_addr
           AND k.dst_port = f.dst_port AND k.protocol = f.protocol
           AND k.src_port IS NOT DISTINCT FROM f.src_port) l
    ORDER BY l.id DESC LIMIT n
$$;

-- The newest n packets of one flow (5-tuple, that direction).
CREATE FUNCTION flow_packets(src inet, src_port int, dst inet, dst_port int, protocol int,
                             n int DEFAULT 10)
RETURNS SETOF packet_log
LANGUAGE sql STABLE SET search_path = pg_catalog, pgvpn, pg_temp
    SET enable_hashjoin = off SET enable_mergejoin = off SET jit = off AS $$
    SELECT l.* FROM (
        SELECT f.first_id, f.last_id, f.src_addr, f.dst_addr, f.src_port, f.dst_port, f.protocol
          FROM flow_log f
         WHERE f.src_addr = src AND f.dst_addr = dst AND f.src_port = flow_packets.src_port
           AND f.dst_port = flow_packets.dst_port AND f.protocol = flow_packets.protocol
         ORDER BY f.last_id DESC LIMIT n) f
    CROSS JOIN LATERAL (
        SELECT * FROM packet_log k
         WHERE k.id BETWEEN f.first_id AND f.last_id
           AND k.src_addr = f.src_addr AND k.dst_addr = f.dst_addr AND k.src_port = f.src_port
           AND k.dst_port = f.dst_port AND k.protocol = f.protocol) l
    ORDER BY l.id DESC LIMIT n
$$;

-- The routing table changes when a transaction that changed peers commits: every
-- backend's cached copy is reloaded (pgvpn_ext/src/peers.rs).
CREATE TRIGGER peers_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON peers
    FOR EACH STATEMENT EXECUTE FUNCTION peers_changed();

-- What `wg show` tells a WireGuard user, per peer. Counters: the tables' totals (they
-- survive pruning and restarts) plus what shared memory counted beyond their marks.
-- The backlog is what was routed to the peer beyond its cursor.
CREATE VIEW peer_stats AS
SELECT p.name AS peer, p.role, p.allowed_ips,
       t.packets + _beyond(l.tx_packets, l.epoch, t.mark_packets, t.mark_epoch) AS sent_packets,
       t.bytes + _beyond(l.tx_bytes, l.epoch, t.mark_bytes, t.mark_epoch) AS sent_bytes,
       r.packets + _beyond(l.rx_packets, l.epoch, r.mark_packets, r.mark_epoch) AS received_packets,
       r.bytes + _beyond(l.rx_bytes, l.epoch, r.mark_bytes, r.mark_epoch) AS received_bytes,
       (SELECT coalesce(sum(x.packets), 0)::bigint FROM reject_totals_by_id x WHERE x.peer = p.id)
           AS rejected,
       c.acked_id AS cursor,
       (SELECT count(*) FROM packets k WHERE k.dst_peer = p.id AND k.id > c.acked_id) AS backlog,
       c.expired_packets AS expired_unread,
       greatest(t.last_at, _ts(l.tx_at)) AS last_sent_at,
       greatest(r.last_at, _ts(l.rx_at)) AS last_received_at,
       c.acked_at AS last_ack_at,
       greatest(t.last_at, _ts(l.tx_at), r.last_at, _ts(l.rx_at), c.acked_at) AS last_activity,
       p.removed_at
  FROM peers p
  JOIN traffic t ON t.peer = p.id AND t.direction = 't'
  JOIN traffic r ON r.peer = p.id AND r.direction = 'r'
  JOIN cursors c ON c.peer = p.id
  LEFT JOIN _live_counters() l ON l.peer = p.id;
COMMENT ON VIEW peer_stats IS 'pgvpn: per peer traffic, rejects, cursor and backlog';

CREATE VIEW rejects AS
SELECT r.at, p.name AS peer, r.reason, r.detail, r.length, r.head
  FROM reject_samples r
  JOIN peers p ON p.id = r.peer;
COMMENT ON VIEW rejects IS 'pgvpn: a sample of rejected packets (pgvpn.reject_totals counts them all)';

CREATE VIEW reject_totals AS
SELECT p.name AS peer, x.reason, x.packets, x.last_at
  FROM reject_totals_by_id x
  JOIN peers p ON p.id = x.peer;
COMMENT ON VIEW reject_totals IS 'pgvpn: rejected packets per peer and reason';

-- For Prometheus exporters (sql_exporter, postgres_exporter): one row per metric, peer
-- and reason. Cheap on purpose, it runs on every scrape: counters come from the tables
-- and shared memory, the backlog is the shared estimate (packets routed to the peer
-- beyond what was waiting at its last ack), its age one index probe per peer, and the
-- log's size comes from the catalog. No count over the log.
CREATE FUNCTION metrics() RETURNS TABLE (metric text, peer text, reason text, value double precision)
LANGUAGE sql STABLE SET search_path = pg_catalog, pgvpn, pg_temp AS $$
    WITH l AS (SELECT * FROM _live_counters()),
    p AS (
        SELECT p.id, p.name,
               t.packets + _beyond(l.tx_packets, l.epoch, t.mark_packets, t.mark_epoch) AS tx_packets,
               t.bytes + _beyond(l.tx_bytes, l.epoch, t.mark_bytes, t.mark_epoch) AS tx_bytes,
               r.packets + _beyond(l.rx_packets, l.epoch, r.mark_packets, r.mark_epoch) AS rx_packets,
               r.bytes + _beyond(l.rx_bytes, l.epoch, r.mark_bytes, r.mark_epoch) AS rx_bytes,
               coalesce(l.backlog, 0) AS backlog,
               c.acked_id
          FROM peers p
          JOIN traffic t ON t.peer = p.id AND t.direction = 't'
          JOIN traffic r ON r.peer = p.id AND r.direction = 'r'
          JOIN cursors c ON c.peer = p.id
          LEFT JOIN l ON l.peer = p.id
         WHERE p.removed_at IS NULL)
    SELECT 'pgvpn_sent_packets_total', name, NULL, tx_packets::float8 FROM p
    UNION ALL SELECT 'pgvpn_sent_bytes_total', name, NULL, tx_bytes::float8 FROM p
    UNION ALL SELECT 'pgvpn_received_packets_total', name, NULL, rx_packets::float8 FROM p
    UNION ALL SELECT 'pgvpn_received_bytes_total', name, NULL, rx_bytes::float8 FROM p
    UNION ALL SELECT 'pgvpn_backlog_packets', name, NULL, backlog::float8 FROM p
    UNION ALL SELECT 'pgvpn_cursor', name, NULL, acked_id::float8 FROM p
    UNION ALL
    SELECT 'pgvpn_backlog_oldest_seconds', p.name, NULL,
           coalesce(extract(epoch FROM clock_timestamp() - o.sent_at), 0)::float8
      FROM p LEFT JOIN LATERAL (
           SELECT k.sent_at FROM packets k WHERE k.dst_peer = p.id AND k.id > p.acked_id
            ORDER BY k.id LIMIT 1) o ON true
    UNION ALL
    SELECT 'pgvpn_rejected_packets_total', pe.name, x.reason, x.packets::float8
      FROM reject_totals_by_id x JOIN peers pe ON pe.id = x.peer
    UNION ALL
    SELECT 'pgvpn_log_bytes', NULL, NULL,
           coalesce(sum(pg_total_relation_size(c.relid)), 0)::float8 FROM chunks c
    UNION ALL SELECT 'pgvpn_log_chunks', NULL, NULL, count(*)::float8 FROM chunks
    UNION ALL
    SELECT 'pgvpn_log_oldest_chunk_seconds', NULL, NULL,
           coalesce(extract(epoch FROM clock_timestamp() - min(opened_at)), 0)::float8 FROM chunks
$$;
COMMENT ON FUNCTION metrics() IS 'pgvpn: metrics for Prometheus exporters, one row per metric, peer and reason';

-- 7. Privileges as in 0.2.0 (sql/grants.sql).
-- Privileges, applied last. Functions are executable by PUBLIC by default in Postgres;
-- in pgvpn nothing is, except what is granted below.
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA pgvpn FROM PUBLIC;
REVOKE ALL ON ALL TABLES IN SCHEMA pgvpn FROM PUBLIC;
REVOKE ALL ON SCHEMA pgvpn FROM PUBLIC;

-- Peers: the data path only. These are SECURITY DEFINER and find the peer from the
-- session role, so a peer reaches its own packets and nothing else.
GRANT USAGE ON SCHEMA pgvpn TO pgvpn_peer;
GRANT EXECUTE ON FUNCTION
    send(bytea[]), send(bytea), recv(bigint, int, int, int), ack(bigint), cursor(), decode(bytea)
    TO pgvpn_peer;

-- Auditors: read everything, change nothing. (Partitions created later by prune()
-- need no grant: privileges are checked on pgvpn.packets.)
GRANT USAGE ON SCHEMA pgvpn TO pgvpn_auditor;
GRANT SELECT ON ALL TABLES IN SCHEMA pgvpn TO pgvpn_auditor;
GRANT EXECUTE ON FUNCTION decode(bytea), _ts(bigint), _beyond(bigint, bigint, bigint, bigint),
    _live_counters(), _live_rejects(),
    log_generation(), log_wait(bigint, int), metrics(),
    packets_between(inet, inet, timestamptz, timestamptz), host_packets(inet, int),
    port_packets(int, int), flow_packets(inet, int, inet, int, int, int), top_flows(int)
    TO pgvpn_auditor;

-- 8. The chunks' privileges are their own, not the extension's. PostgreSQL 15 records
-- every GRANT run inside an extension script in pg_init_privs, members or not (and keeps
-- the record when ALTER EXTENSION DROP releases a member), and pg_dump then dumps only
-- the difference from that record: a dump of the upgraded database would restore its
-- chunks without the auditors' SELECT. Chunks made later by prune() have no record, so
-- none is kept for these either.
DELETE FROM pg_catalog.pg_init_privs i
 USING pgvpn.chunks c
 WHERE i.classoid = 'pg_catalog.pg_class'::pg_catalog.regclass
   AND i.objoid IN (c.relid, c.flow_relid, c.sums_relid);
