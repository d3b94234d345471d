-- Nodes of a cluster: every notifyd process keeps a lease row here (store/nodes.go), and its
-- session_history rows carry its node id, so that a node starting up closes only its own
-- leftovers and a surviving node closes the rows of a node whose lease lapsed (README,
-- "Running several nodes").
-- NB: tern evaluates migrations as Go text/templates, so no double curly braces in this file.

-- nodes: one row per live node. lease_until is set from the database clock (now() + the lease)
-- on every renewal, so nodes' clocks never need to agree. instance is the process: a second
-- process started with the same node id takes the row over, and the first one sees it on its
-- next renewal. draining is set on SIGTERM, while the node still serves its grace period.
CREATE TABLE nodes (
    node_id     text PRIMARY KEY,
    instance    uuid NOT NULL,
    addr        text,
    started_at  timestamptz NOT NULL DEFAULT now(),
    renewed_at  timestamptz NOT NULL DEFAULT now(),
    lease_until timestamptz NOT NULL,
    draining    boolean NOT NULL DEFAULT false
);

-- node_id is NULL for rows written before this migration.
ALTER TABLE session_history ADD COLUMN node_id text;

-- A node's open rows, found at its start (its own leftovers) and when it is declared dead.
CREATE INDEX session_history_node_open ON session_history (node_id) WHERE ended_at IS NULL;

-- session_log gains the node that served the connection (a new last column).
CREATE OR REPLACE VIEW session_log AS
SELECT s.session_id, s.user_id, s.device, s.transport, s.remote_addr, s.user_agent, s.connected_at,
       s.last_seen_at, s.ended_at, s.end_reason, s.ended_at IS NULL AS open,
       extract(epoch FROM coalesce(s.ended_at, now()) - s.connected_at) AS duration_s,
       s.node_id
FROM session_history s;

-- report_sessions gains node_lost (a new last column): connections of a node whose lease lapsed
-- (killed, cut off), closed by a surviving node. A function's result columns cannot change in
-- place, hence DROP and CREATE.
DROP FUNCTION report_sessions(timestamptz, timestamptz);
CREATE FUNCTION report_sessions(since timestamptz, until timestamptz DEFAULT 'infinity')
RETURNS TABLE (transport text, sessions bigint, open bigint, p50_s double precision, p90_s double precision,
               max_s double precision, client_close bigint, heartbeat_timeout bigint, kicked bigint,
               replaced bigint, slow_consumer bigint, shutdown bigint, error bigint, restart bigint,
               node_lost bigint)
LANGUAGE sql STABLE AS $$
    SELECT s.transport, count(*), count(*) FILTER (WHERE s.ended_at IS NULL),
           percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM s.ended_at - s.connected_at)),
           percentile_cont(0.9) WITHIN GROUP (ORDER BY extract(epoch FROM s.ended_at - s.connected_at)),
           max(extract(epoch FROM s.ended_at - s.connected_at)),
           count(*) FILTER (WHERE s.end_reason = 'client_close'),
           count(*) FILTER (WHERE s.end_reason = 'heartbeat_timeout'),
           count(*) FILTER (WHERE s.end_reason = 'kicked'),
           count(*) FILTER (WHERE s.end_reason = 'replaced'),
           count(*) FILTER (WHERE s.end_reason = 'slow_consumer'),
           count(*) FILTER (WHERE s.end_reason = 'shutdown'),
           count(*) FILTER (WHERE s.end_reason = 'error'),
           count(*) FILTER (WHERE s.end_reason = 'restart'),
           count(*) FILTER (WHERE s.end_reason = 'node_lost')
    FROM session_history s
    WHERE s.connected_at < until AND (s.ended_at IS NULL OR s.ended_at >= since)
    GROUP BY s.transport
    ORDER BY s.transport
$$;

---- create above / drop below ----

DROP FUNCTION report_sessions(timestamptz, timestamptz);
CREATE FUNCTION report_sessions(since timestamptz, until timestamptz DEFAULT 'infinity')
RETURNS TABLE (transport text, sessions bigint, open bigint, p50_s double precision, p90_s double precision,
               max_s double precision, client_close bigint, heartbeat_timeout bigint, kicked bigint,
               replaced bigint, slow_consumer bigint, shutdown bigint, error bigint, restart bigint)
LANGUAGE sql STABLE AS $$
    SELECT s.transport, count(*), count(*) FILTER (WHERE s.ended_at IS NULL),
           percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM s.ended_at - s.connected_at)),
           percentile_cont(0.9) WITHIN GROUP (ORDER BY extract(epoch FROM s.ended_at - s.connected_at)),
           max(extract(epoch FROM s.ended_at - s.connected_at)),
           count(*) FILTER (WHERE s.end_reason = 'client_close'),
           count(*) FILTER (WHERE s.end_reason = 'heartbeat_timeout'),
           count(*) FILTER (WHERE s.end_reason = 'kicked'),
           count(*) FILTER (WHERE s.end_reason = 'replaced'),
           count(*) FILTER (WHERE s.end_reason = 'slow_consumer'),
           count(*) FILTER (WHERE s.end_reason = 'shutdown'),
           count(*) FILTER (WHERE s.end_reason = 'error'),
           count(*) FILTER (WHERE s.end_reason = 'restart')
    FROM session_history s
    WHERE s.connected_at < until AND (s.ended_at IS NULL OR s.ended_at >= since)
    GROUP BY s.transport
    ORDER BY s.transport
$$;
DROP VIEW session_log;
CREATE VIEW session_log AS
SELECT s.session_id, s.user_id, s.device, s.transport, s.remote_addr, s.user_agent, s.connected_at,
       s.last_seen_at, s.ended_at, s.end_reason, s.ended_at IS NULL AS open,
       extract(epoch FROM coalesce(s.ended_at, now()) - s.connected_at) AS duration_s
FROM session_history s;
DROP INDEX session_history_node_open;
ALTER TABLE session_history DROP COLUMN node_id;
DROP TABLE nodes;
