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
