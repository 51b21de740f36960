-- Audit views. Column names match pgvpn.packets; peers appear by name.

-- Rejects per peer id and reason: the table's totals plus what shared memory counted
-- beyond each row's mark (all of it if the mark is from another life of the counters).
CREATE VIEW reject_totals_by_id AS
SELECT coalesce(c.peer, l.peer) AS peer, coalesce(c.reason, l.reason) AS reason,
       coalesce(c.packets, 0) + _beyond(l.packets, l.epoch, c.mark, c.mark_epoch) AS packets,
       greatest(c.last_at, _ts(l.at)) AS last_at
  FROM reject_counts c
  FULL JOIN _live_rejects() l ON l.peer = c.peer AND l.reason = c.reason;

CREATE VIEW packet_log AS
SELECT p.id, p.sent_at, s.name AS src_peer, d.name AS dst_peer,
       p.ip_version, p.src_addr, p.dst_addr, p.protocol, p.src_port, p.dst_port,
       p.icmp_type, p.tcp_flags, p.length
  FROM packets p
  JOIN peers s ON s.id = p.src_peer
  JOIN peers d ON d.id = p.dst_peer;
COMMENT ON VIEW packet_log IS 'pgvpn: every logged packet, decoded, without payload';

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
