-- Peer administration. These run as the caller (an admin): registering a peer grants a
-- role membership, which needs the privileges of a role administrator anyway.

CREATE FUNCTION _check_allowed_ips(peer_name text, allowed_ips cidr[]) RETURNS void
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

-- connection_limit becomes the role's CONNECTION LIMIT: one peer's sessions must not be
-- able to take every connection slot of the server. Change it later with ALTER ROLE.
CREATE FUNCTION add_peer(name text, role regrole, allowed_ips cidr[], connection_limit int DEFAULT 8)
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

CREATE FUNCTION set_allowed_ips(name text, allowed_ips cidr[]) RETURNS void
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

-- The peer's log rows, counters and cursor stay (an audit log forgets nothing);
-- its role loses pgvpn_peer, its packets stop being routed from the next one on, and its
-- open sessions are ended (a session that is already open keeps no access either).
CREATE FUNCTION remove_peer(name text) RETURNS void
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
