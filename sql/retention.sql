-- Chunks and retention. pgvpn.packets is partitioned by id range; chunk k is the
-- partition for ids [k * 2^40, (k+1) * 2^40), and the id sequence's position says which
-- chunk is being written. pgvpn.prune() (Rust, reads the GUCs) calls _prune() below,
-- which moves the sequence on to the next chunk once the current one is older than
-- pgvpn.chunk_interval, and drops every chunk closed longer ago than pgvpn.retention:
-- DROP TABLE, never a row-wise DELETE.
-- Each run first rolls the flow index up into the flow summaries (_summarize).
--
-- setval() is not transactional, so the sequence only ever moves into a chunk that an
-- earlier, committed prune created: spare chunks are always kept ready ahead. Even if a
-- prune is rolled back, ids never point at a chunk that does not exist.
--
-- Locks, so that retention never stalls the VPN:
-- * a chunk is created as a table of its own and then ATTACHed, which takes only a
--   SHARE UPDATE EXCLUSIVE lock on the log (sends and reads go on);
-- * dropping a chunk needs an ACCESS EXCLUSIVE lock on the log, and a lock request that
--   waits holds back everybody behind it. prune() waits at most pgvpn.prune_lock_timeout
--   for it; if an open reader holds the log longer (an audit, a long poll), the drop is
--   left for the next run and the server log says so. A long audit delays retention,
--   never traffic.
--
-- Chunks are not extension members (see schema.sql): created by a function at run
-- time, they are dumped and restored like any table, with their indexes.
--
-- _ensure_chunks and _open_chunk also run inside the API's calls, whose name lookup is
-- pinned to pg_catalog (pgvpn_ext/src/plans.rs): they name every object with its schema.

CREATE FUNCTION _chunk_of(id bigint) RETURNS int
LANGUAGE sql IMMUTABLE AS $$ SELECT (id >> 40)::int $$;

CREATE FUNCTION _chunk_name(k int) RETURNS text
LANGUAGE sql IMMUTABLE AS $$ SELECT format('packets_%s', lpad(k::text, 6, '0')) $$;

CREATE FUNCTION _open_chunk(k int) RETURNS regclass
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

-- The chunk the sequence points at, and one spare after it. Called by the first send of
-- each backend (a fresh install has no chunk yet) and by prune(). Also repairs a
-- sequence that is behind a stored cursor or a logged packet (a restore from a dump
-- made without it, or a failover to a server that had not seen the newest ids): new
-- ids must be above every cursor, or recv(cursor()) would return nothing, forever, and
-- above every packet, or new packets would be delivered before older ones.
CREATE FUNCTION _ensure_chunks() RETURNS void
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

CREATE FUNCTION _prune(retention interval, chunk_interval interval, lock_wait_ms int) RETURNS int
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
