-- Cluster-wide presence (store/presence.go): a user's open sessions on every node, read by the
-- per-user session cap at connect and by GET /v1/users/{user}/sessions. The index holds only
-- open rows, so the read stays a few index entries however long the user's history is.
-- NB: tern evaluates migrations as Go text/templates, so no double curly braces in this file.

CREATE INDEX session_history_user_open ON session_history (user_id, node_id) WHERE ended_at IS NULL;

---- create above / drop below ----

DROP INDEX session_history_user_open;
