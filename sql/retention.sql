-- Chunks and retention. pgvpn.packets is partitioned by id range; chunk k is the
-- partition for ids [k * 2^40, (k+1) * 2^40), and the id sequence's position says which
-- chunk is being written. pgvpn.prune() (Rust, reads the GUCs) calls _prune() below,
-- which moves the sequence on to the next chunk once the current one is older than
-- pgvpn.chunk_interval, and drops every chunk closed longer ago than pgvpn.retention:
-- DROP TABLE, never a row-wise DELETE.
--
-- setval() is not transactional, so the sequence only ever moves into a chunk that an
-- earlier, committed prune created: one spare chunk is always kept ready ahead. Even if
-- a prune is rolled back, ids never point at a chunk that does not exist.
--
-- Closed chunks also get their (src_addr, dst_addr) index here, built in one go.

CREATE FUNCTION _chunk_of(id bigint) RETURNS int
LANGUAGE sql IMMUTABLE AS $$ SELECT (id >> 40)::int $$;

CREATE FUNCTION _open_chunk(k int) RETURNS regclass
LANGUAGE plpgsql SET search_path = pg_catalog, pgvpn, pg_temp AS $$
DECLARE
    rel text := format('packets_%s', lpad(k::text, 6, '0'));
    lo bigint := k::bigint << 40;
BEGIN
    -- toast_tuple_target = max: a packet up to ~8 KB stays inline (no TOAST side table),
    -- and payload's EXTERNAL storage means no compression attempt either.
    EXECUTE format(
        'CREATE TABLE pgvpn.%I PARTITION OF pgvpn.packets FOR VALUES FROM (%s) TO (%s)'
        ' WITH (toast_tuple_target = 8160)',
        rel, lo, lo + (1::bigint << 40));
    INSERT INTO chunks (chunk, relid) VALUES (k, format('pgvpn.%I', rel)::regclass);
    RETURN format('pgvpn.%I', rel)::regclass;
END
$$;

CREATE FUNCTION _prune(retention interval, chunk_interval interval) RETURNS int
LANGUAGE plpgsql SET search_path = pg_catalog, pgvpn, pg_temp AS $$
DECLARE
    cur int;
    spare_ready boolean;
    is_empty boolean;
    old chunks;
    opened timestamptz;
    dropped int := 0;
BEGIN
    -- One prune at a time; senders do not take this lock.
    LOCK TABLE chunks IN SHARE ROW EXCLUSIVE MODE;
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
        -- The first chunk was created by CREATE EXTENSION and so belongs to it.
        IF EXISTS (SELECT FROM pg_depend WHERE classid = 'pg_class'::regclass
                      AND objid = old.relid AND deptype = 'e') THEN
            EXECUTE format('ALTER EXTENSION pgvpn DROP TABLE %s', old.relid);
        END IF;
        EXECUTE format('DROP TABLE %s', old.relid);
        DELETE FROM chunks WHERE chunk = old.chunk;
        dropped := dropped + 1;
    END LOOP;
    DELETE FROM reject_samples WHERE at < clock_timestamp() - retention;

    -- Closed chunks get their host-pair index once, in bulk (a sort, instead of a
    -- btree insert per packet while the chunk was hot). Only chunks closed by an
    -- earlier prune: no send can still be writing to them.
    FOR old IN SELECT * FROM chunks
                WHERE closed_at IS NOT NULL AND indexed_at IS NULL
                  AND xmin IS DISTINCT FROM xid(pg_current_xact_id_if_assigned())
                ORDER BY chunk LOOP
        EXECUTE format('CREATE INDEX IF NOT EXISTS %I ON %s (src_addr, dst_addr)',
                       (SELECT relname FROM pg_class WHERE oid = old.relid) || '_hosts',
                       old.relid);
        UPDATE chunks SET indexed_at = clock_timestamp() WHERE chunk = old.chunk;
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
            IF NOT EXISTS (SELECT FROM chunks WHERE chunk = cur + 2) THEN
                PERFORM _open_chunk(cur + 2);
            END IF;
            -- Sequences only move forward, so per-receiver id order (send.rs) holds.
            PERFORM setval('packet_id', (cur + 1)::bigint << 40);
            RETURN dropped;
        END IF;
    END IF;
    IF NOT EXISTS (SELECT FROM chunks WHERE chunk = cur + 1) THEN
        PERFORM _open_chunk(cur + 1);   -- used by the next rotation, once committed
    END IF;
    RETURN dropped;
END
$$;

SELECT _open_chunk(0);
SELECT _open_chunk(1);
UPDATE chunks SET opened_at = clock_timestamp() WHERE chunk = 0;
