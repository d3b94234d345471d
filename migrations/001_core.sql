-- notifyd core schema. Everything is unqualified: the target schema comes from search_path.
-- NB: tern evaluates migrations as Go text/templates, so no double curly braces in this file.

-- Per-user sequence counter. The BEFORE INSERT trigger on notifications bumps it; the row lock it
-- takes is held until commit, so a user's notifications commit in seq order and seqs are dense
-- (a rollback also rolls the counter back).
CREATE TABLE user_seqs (
    user_id  text PRIMARY KEY,
    last_seq bigint NOT NULL
);

CREATE TABLE notifications (
    id              uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id         text NOT NULL,
    seq             bigint NOT NULL,
    topic           text NOT NULL,
    data            jsonb NOT NULL DEFAULT '{}',
    idempotency_key text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    read_at         timestamptz,
    expires_at      timestamptz,
    UNIQUE (user_id, seq)
);

CREATE UNIQUE INDEX notifications_user_idempotency_key
    ON notifications (user_id, idempotency_key) WHERE idempotency_key IS NOT NULL;

-- Unread rows of a user after a seq (replay, badges). expires_at is INCLUDEd so the unread
-- count (which leaves expired rows out) stays an index-only scan.
CREATE INDEX notifications_unread
    ON notifications (user_id, seq) INCLUDE (expires_at) WHERE read_at IS NULL;

-- Assigns the per-user seq, ignoring any seq the inserter supplied.
CREATE FUNCTION notifications_assign_seq() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO user_seqs AS s (user_id, last_seq) VALUES (NEW.user_id, 1)
    ON CONFLICT (user_id) DO UPDATE SET last_seq = s.last_seq + 1
    RETURNING s.last_seq INTO NEW.seq;
    RETURN NEW;
END
$$;

CREATE TRIGGER notifications_assign_seq
    BEFORE INSERT ON notifications
    FOR EACH ROW EXECUTE FUNCTION notifications_assign_seq();

-- One NOTIFY per statement (more only when the payload would pass 7,000 bytes) on channel
-- 'notifyd:<schema>', payload lines "user_id<TAB>min_seq<TAB>max_seq" joined by newlines.
-- Within one statement a user's seqs are contiguous (the counter row stays locked), so a range
-- describes exactly the rows inserted. Every insert path (our API or an application's own
-- INSERT) is delivered this way; NOTIFYs are sent at commit.
CREATE FUNCTION notifications_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    channel text := 'notifyd:' || current_schema();
    payload text := '';
    line    text;
BEGIN
    FOR line IN
        SELECT r.user_id || E'\t' || min(r.seq) || E'\t' || max(r.seq)
        FROM new_rows r
        GROUP BY r.user_id
        ORDER BY r.user_id
    LOOP
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

CREATE TRIGGER notifications_notify
    AFTER INSERT ON notifications
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION notifications_notify();

-- What was sent to which session (written off the hot path by store.Recorder).
CREATE TABLE deliveries (
    notification_id uuid NOT NULL,
    user_id         text NOT NULL,
    seq             bigint NOT NULL,
    session_id      text NOT NULL,
    transport       text NOT NULL,
    replayed        boolean NOT NULL,
    delivered_at    timestamptz NOT NULL,
    acked_at        timestamptz,
    PRIMARY KEY (notification_id, session_id)
);

-- BRIN rather than btree: rows are appended in (nearly) delivered_at order by a single flush
-- loop, the table is the fastest-growing one, and delivered_at is only used for time-range scans
-- (retention deletes, stats). A BRIN index is a few pages and costs almost nothing per insert,
-- where a btree would add a write and grow with every row on the hot insert path.
CREATE INDEX deliveries_delivered_at ON deliveries USING brin (delivered_at);

CREATE TABLE session_history (
    id           uuid PRIMARY KEY,
    session_id   text NOT NULL,
    user_id      text NOT NULL,
    device       text NOT NULL DEFAULT '',
    transport    text NOT NULL,
    remote_addr  text,
    user_agent   text,
    connected_at timestamptz NOT NULL,
    last_seen_at timestamptz,
    ended_at     timestamptz,
    end_reason   text
);

CREATE INDEX session_history_user_connected ON session_history (user_id, connected_at);
CREATE INDEX session_history_open ON session_history (connected_at) WHERE ended_at IS NULL;

---- create above / drop below ----

DROP TABLE session_history;
DROP TABLE deliveries;
DROP TRIGGER notifications_notify ON notifications;
DROP TRIGGER notifications_assign_seq ON notifications;
DROP TABLE notifications;
DROP FUNCTION notifications_notify();
DROP FUNCTION notifications_assign_seq();
DROP TABLE user_seqs;
