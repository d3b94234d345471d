-- notifyd's own publish statement assigns seqs for a whole batch at once: one upsert of each
-- user's counter by the user's row count, then seq = new last_seq - count + rank. The per-row
-- trigger stays for every other INSERT (an application's own), and steps aside only in a
-- transaction that set notifyd.seqs_assigned = 'on' (store.publishSQL does, with SET LOCAL
-- semantics). Why: the trigger runs a PL/pgSQL upsert for every row, about half the cost of a
-- 1,000-row insert; the batch upsert does the same locking (each user's counter row is locked
-- until commit, in user order) in one statement.
-- NB: tern evaluates migrations as Go text/templates, so no double curly braces in this file.
DROP TRIGGER notifications_assign_seq ON notifications;
CREATE TRIGGER notifications_assign_seq
    BEFORE INSERT ON notifications
    FOR EACH ROW
    WHEN (current_setting('notifyd.seqs_assigned', true) IS DISTINCT FROM 'on')
    EXECUTE FUNCTION notifications_assign_seq();

---- create above / drop below ----

DROP TRIGGER notifications_assign_seq ON notifications;
CREATE TRIGGER notifications_assign_seq
    BEFORE INSERT ON notifications
    FOR EACH ROW EXECUTE FUNCTION notifications_assign_seq();
