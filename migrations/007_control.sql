-- Control across nodes: every node LISTENs on 'notifyd-control:<schema>' besides the publish
-- channel. Two kinds of payload lines travel on it (store/control.go parses them):
--  * read lines, sent by the trigger below at the commit of any UPDATE that changes read state
--    (notifyd's own mark-read, or an application's plain SQL): every node turns them into `read`
--    frames for the user's local sessions;
--  * session control lines (kick, replace, touch) that a node sends for a session living on
--    another node (store.Control).
-- NB: tern evaluates migrations as Go text/templates, so no double curly braces in this file.

-- For each user whose rows changed read state in the statement, one line:
--   read<TAB>unread<TAB>id,id,…<TAB>user_id          (the ids newly read, in seq order), or, when
--   that line would pass 7,000 bytes,
--   readrange<TAB>unread<TAB>from_seq<TAB>to_seq<TAB>from_us<TAB>to_us<TAB>user_id
-- which the receiving node resolves to ids (store.ReadIDs: rows of the user in the seq range
-- whose read_at, in epoch microseconds, lies in from_us..to_us). Rows marked unread again
-- (read_at set to NULL) give a line with no ids: the count changed.
-- unread is the authoritative count: before counting, the trigger locks the user's user_seqs
-- row (in user order, as a publish does) until commit, so the reads and publishes of one user
-- are serialized; the count sees every transaction that committed before it, and its NOTIFY is
-- queued at commit, after theirs. The last `read` a device gets thus carries the true count.
-- Lines are packed into payloads of at most 7,000 bytes (the NOTIFY limit is 8,000).
CREATE FUNCTION notifications_read_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    channel text := 'notifyd-control:' || current_schema();
    payload text := '';
    line    text;
    r       record;
    unread  bigint;
BEGIN
    FOR r IN
        SELECT n.user_id,
               array_agg(n.id::text ORDER BY n.seq) FILTER (WHERE o.read_at IS NULL) AS ids,
               min(n.seq) FILTER (WHERE o.read_at IS NULL) AS from_seq,
               max(n.seq) FILTER (WHERE o.read_at IS NULL) AS to_seq,
               min(n.read_at) AS from_at,
               max(n.read_at) AS to_at
        FROM old_rows o
        JOIN new_rows n ON n.id = o.id
        WHERE (o.read_at IS NULL) <> (n.read_at IS NULL)
        GROUP BY n.user_id
        ORDER BY n.user_id
    LOOP
        PERFORM 1 FROM user_seqs s WHERE s.user_id = r.user_id FOR UPDATE;
        SELECT count(*) INTO unread FROM notifications n
        WHERE n.user_id = r.user_id AND n.read_at IS NULL AND (n.expires_at IS NULL OR n.expires_at > now());
        line := 'read' || E'\t' || unread || E'\t' || coalesce(array_to_string(r.ids, ','), '') || E'\t' || r.user_id;
        IF octet_length(line) > 7000 THEN
            line := 'readrange' || E'\t' || unread || E'\t' || r.from_seq || E'\t' || r.to_seq
                || E'\t' || floor(extract(epoch FROM r.from_at) * 1000000)::bigint
                || E'\t' || ceil(extract(epoch FROM r.to_at) * 1000000)::bigint
                || E'\t' || r.user_id;
        END IF;
        IF payload <> '' AND octet_length(payload) + 1 + octet_length(line) > 7000 THEN
            PERFORM pg_notify(channel, payload);
            payload := '';
        END IF;
        IF payload = '' THEN
            payload := line;
        ELSE
            payload := payload || E'\n' || line;
        END IF;
    END LOOP;
    IF payload <> '' THEN
        PERFORM pg_notify(channel, payload);
    END IF;
    RETURN NULL;
END
$$;

-- Postgres allows no column list (UPDATE OF read_at) on a trigger with transition tables: it
-- fires for every UPDATE of notifications, and an UPDATE that changes no row's read state
-- costs the join of the two transition tables and sends nothing.
CREATE TRIGGER notifications_read_notify
    AFTER UPDATE ON notifications
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION notifications_read_notify();

-- A kick, resume or message through a node that does not hold the session looks the session
-- up among the open history rows by its id.
CREATE INDEX session_history_open_session ON session_history (session_id) WHERE ended_at IS NULL;

---- create above / drop below ----

DROP INDEX session_history_open_session;
DROP TRIGGER notifications_read_notify ON notifications;
DROP FUNCTION notifications_read_notify();
