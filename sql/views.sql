-- Audit views. Column names match pgvpn.packets; peers appear by name.

CREATE VIEW packet_log AS
SELECT p.id, p.sent_at, s.name AS src_peer, d.name AS dst_peer,
       p.ip_version, p.src_addr, p.dst_addr, p.protocol, p.src_port, p.dst_port,
       p.icmp_type, p.tcp_flags, p.length
  FROM packets p
  JOIN peers s ON s.id = p.src_peer
  JOIN peers d ON d.id = p.dst_peer;
COMMENT ON VIEW packet_log IS 'pgvpn: every logged packet, decoded, without payload';

-- One row per 5-tuple and direction (ports are NULL for ICMP and fragments).
CREATE VIEW flows AS
SELECT s.name AS src_peer, d.name AS dst_peer, f.ip_version, f.protocol,
       f.src_addr, f.src_port, f.dst_addr, f.dst_port,
       f.packets, f.bytes, f.first_seen, f.last_seen
  FROM (SELECT src_peer, dst_peer, ip_version, protocol, src_addr, src_port, dst_addr, dst_port,
               count(*) AS packets, sum(length) AS bytes,
               min(sent_at) AS first_seen, max(sent_at) AS last_seen
          FROM packets
         GROUP BY src_peer, dst_peer, ip_version, protocol, src_addr, src_port, dst_addr, dst_port) f
  JOIN peers s ON s.id = f.src_peer
  JOIN peers d ON d.id = f.dst_peer;
COMMENT ON VIEW flows IS 'pgvpn: packets and bytes per 5-tuple, first and last seen';

-- What `wg show` tells a WireGuard user, per peer. Counters are kept by send() (they
-- survive pruning); backlog is what was routed to the peer but not acknowledged yet.
CREATE VIEW peer_stats AS
SELECT p.name AS peer, p.role, p.allowed_ips,
       t.packets AS sent_packets, t.bytes AS sent_bytes,
       r.packets AS received_packets, r.bytes AS received_bytes,
       coalesce((SELECT sum(rc.packets) FROM reject_counts rc WHERE rc.peer = p.id), 0)::bigint
           AS rejected,
       c.acked_id AS cursor,
       (SELECT count(*) FROM packets k WHERE k.dst_peer = p.id AND k.id > c.acked_id) AS backlog,
       t.last_at AS last_sent_at, r.last_at AS last_received_at, c.acked_at AS last_ack_at,
       greatest(t.last_at, r.last_at, c.acked_at) AS last_activity,
       p.removed_at
  FROM peers p
  JOIN traffic t ON t.peer = p.id AND t.direction = 't'
  JOIN traffic r ON r.peer = p.id AND r.direction = 'r'
  JOIN cursors c ON c.peer = p.id;
COMMENT ON VIEW peer_stats IS 'pgvpn: per peer traffic, rejects, cursor and backlog';

CREATE VIEW rejects AS
SELECT r.at, p.name AS peer, r.reason, r.detail, r.length, r.head
  FROM reject_samples r
  JOIN peers p ON p.id = r.peer;
COMMENT ON VIEW rejects IS 'pgvpn: a sample of rejected packets (pgvpn.reject_counts counts them all)';

CREATE VIEW reject_totals AS
SELECT p.name AS peer, c.reason, c.packets, c.last_at
  FROM reject_counts c
  JOIN peers p ON p.id = c.peer;
COMMENT ON VIEW reject_totals IS 'pgvpn: rejected packets per peer and reason';
