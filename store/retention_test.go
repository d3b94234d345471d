package store_test

import (
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/notifyd/notifyd/store"
	"github.com/notifyd/notifyd/store/storetest"
)

func exec(t *testing.T, s *store.Store, sql string, args ...any) {
	t.Helper()
	if _, err := s.Pool().Exec(testCtx(t), sql, args...); err != nil {
		t.Fatalf("%s: %v", sql, err)
	}
}

// TestPurge checks what one retention pass deletes and what it keeps.
func TestPurge(t *testing.T) {
	t.Parallel()
	s := storetest.New(t)
	ctx := testCtx(t)
	day := 24 * time.Hour
	// Notifications of user u: 1-7 read 40 days ago, 8 read an hour ago, 9-10 unread and
	// published 90 days ago, 11 unread and expired, 12 unread expiring tomorrow.
	publishN(t, s, "u", 12)
	exec(t, s, `UPDATE notifications SET read_at = now() - interval '40 days', created_at = now() - interval '41 days' WHERE seq <= 7`)
	exec(t, s, `UPDATE notifications SET read_at = now() - interval '1 hour' WHERE seq = 8`)
	exec(t, s, `UPDATE notifications SET created_at = now() - interval '90 days' WHERE seq IN (9, 10)`)
	exec(t, s, `UPDATE notifications SET expires_at = now() - interval '1 minute' WHERE seq = 11`)
	exec(t, s, `UPDATE notifications SET expires_at = now() + interval '1 day' WHERE seq = 12`)

	// Deliveries on three days: 45 and 31 days ago (past a 30-day retention) and today.
	now := time.Now()
	for _, ago := range []int{45, 31, 0} {
		at := now.Add(-time.Duration(ago) * day)
		if _, err := s.EnsureDeliveryPartitions(ctx, at, at); err != nil {
			t.Fatal(err)
		}
		exec(t, s, `INSERT INTO deliveries (notification_id, user_id, seq, session_id, transport, replayed, delivered_at)
			SELECT id, user_id, seq, 's', 'websocket', false, $1 FROM notifications`, at)
	}
	// Sessions: one ended 40 days ago, one open since 40 days, one ended an hour ago.
	exec(t, s, `INSERT INTO session_history (id, session_id, user_id, transport, connected_at, ended_at, end_reason) VALUES
		(gen_random_uuid(), 'a', 'u', 'sse', now() - interval '41 days', now() - interval '40 days', 'client_close'),
		(gen_random_uuid(), 'b', 'u', 'sse', now() - interval '41 days', NULL, NULL),
		(gen_random_uuid(), 'c', 'u', 'sse', now() - interval '2 hours', now() - interval '1 hour', 'kicked')`)

	res := purgeUntilDone(t, s, store.RetentionOptions{ReadAge: 30 * day, DeliveryAge: 30 * day, Batch: 3, Pause: -1})
	if res.Skipped || res.ReadDeleted != 7 || res.ExpiredDeleted != 1 || res.SessionsDeleted != 1 || res.PartitionsDropped != 2 {
		t.Fatalf("result %+v", res)
	}
	rows, err := s.Pool().Query(ctx, "SELECT seq FROM notifications ORDER BY seq")
	if err != nil {
		t.Fatal(err)
	}
	seqs, err := pgx.CollectRows(rows, pgx.RowTo[int64])
	if err != nil {
		t.Fatal(err)
	}
	if want := []int64{8, 9, 10, 12}; !equalInts(seqs, want) {
		t.Fatalf("notifications left %v, want %v", seqs, want)
	}
	if n := count(t, s, "SELECT count(*) FROM deliveries"); n != 12 {
		t.Fatalf("%d deliveries left, want today's 12", n)
	}
	if n := count(t, s, "SELECT count(*) FROM session_history"); n != 2 {
		t.Fatalf("%d sessions left, want 2", n)
	}
	old := "deliveries_" + now.Add(-45*day).UTC().Format("20060102")
	if n := count(t, s, "SELECT count(*) FROM pg_class WHERE relname = $1", old); n != 0 {
		t.Fatalf("partition %s still there", old)
	}
	// The days ahead exist.
	ahead := "deliveries_" + now.Add(store.DefaultPartitionsAhead*day).UTC().Format("20060102")
	if n := count(t, s, "SELECT count(*) FROM pg_inherits WHERE inhparent = 'deliveries'::regclass AND inhrelid = $1::regclass", ahead); n != 1 {
		t.Fatalf("partition %s not attached", ahead)
	}

	// A second pass finds nothing to do.
	res, err = s.Purge(ctx, store.RetentionOptions{ReadAge: 30 * day, DeliveryAge: 30 * day})
	if err != nil || res.ReadDeleted+res.ExpiredDeleted+res.SessionsDeleted+int64(res.PartitionsDropped+res.PartitionsMade) != 0 {
		t.Fatalf("second pass %+v, %v", res, err)
	}
}

// Only one node purges at a time: a pass that finds the lock taken skips.
func TestPurgeSkipsWhenLocked(t *testing.T) {
	t.Parallel()
	s := storetest.New(t)
	ctx := testCtx(t)
	conn, err := s.Pool().Acquire(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Release()
	if _, err := conn.Exec(ctx, "SELECT pg_advisory_lock(hashtext('notifyd.retention:' || current_schema()))"); err != nil {
		t.Fatal(err)
	}
	res, err := s.Purge(ctx, store.RetentionOptions{})
	if err != nil || !res.Skipped {
		t.Fatalf("%+v, %v: want skipped", res, err)
	}
	if _, err := conn.Exec(ctx, "SELECT pg_advisory_unlock(hashtext('notifyd.retention:' || current_schema()))"); err != nil {
		t.Fatal(err)
	}
	if res, err := s.Purge(ctx, store.RetentionOptions{}); err != nil || res.Skipped {
		t.Fatalf("%+v, %v: want a pass", res, err)
	}
}

// Dropping a day of deliveries never blocks the writers: while a long transaction holds a
// lock on a partition, inserts of today's deliveries go on, and the pass gives up on that day
// after its lock timeout (and finishes it on a later pass). It times inserts, so it does not
// run in parallel with the other tests.
func TestPurgeDoesNotBlockWriters(t *testing.T) {
	s := storetest.New(t)
	ctx := testCtx(t)
	old := time.Now().AddDate(0, 0, -40)
	if _, err := s.EnsureDeliveryPartitions(ctx, old, old); err != nil {
		t.Fatal(err)
	}
	exec(t, s, `INSERT INTO deliveries (notification_id, user_id, seq, session_id, transport, replayed, delivered_at)
		VALUES (gen_random_uuid(), 'u', 1, 's', 'sse', false, $1)`, old)
	// A report that reads the old day and stays open.
	tx, err := s.Pool().Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = tx.Rollback(ctx) }()
	if _, err := tx.Exec(ctx, "SELECT count(*) FROM deliveries WHERE delivered_at < now() - interval '39 days'"); err != nil {
		t.Fatal(err)
	}
	writer, err := s.Pool().Acquire(ctx) // connected before the pass starts
	if err != nil {
		t.Fatal(err)
	}
	defer writer.Release()
	done := make(chan error, 1)
	go func() {
		_, err := s.Purge(ctx, store.RetentionOptions{LockTimeout: 300 * time.Millisecond})
		done <- err
	}()
	// Writers go on meanwhile: none waits for the pass's lock timeout.
	var slowest time.Duration
	for range 20 {
		start := time.Now()
		if _, err := writer.Exec(ctx, `INSERT INTO deliveries (notification_id, user_id, seq, session_id, transport, replayed, delivered_at)
			VALUES (gen_random_uuid(), 'u', 1, 's', 'sse', false, now())`); err != nil {
			t.Fatal(err)
		}
		slowest = max(slowest, time.Since(start))
		time.Sleep(10 * time.Millisecond)
	}
	if slowest >= 250*time.Millisecond {
		t.Fatalf("an insert took %s while retention ran", slowest)
	}
	if err := <-done; err != nil {
		t.Logf("pass with a reader holding the old day: %v", err)
	}
	if err := tx.Rollback(ctx); err != nil {
		t.Fatal(err)
	}
	res := purgeUntilDone(t, s, store.RetentionOptions{})
	if n := count(t, s, "SELECT count(*) FROM deliveries"); n != 20 {
		t.Fatalf("%d deliveries, want today's 20 (result %+v)", n, res)
	}
}

// purgeUntilDone runs retention passes until one ends without error (bounded), adding up what
// they did. DETACH ... CONCURRENTLY waits for every older snapshot in the database, and the
// test database is shared with other tests that may hold one longer than the lock timeout; a
// pass then gives up on that day and the next one finishes it, as in production.
func purgeUntilDone(t *testing.T, s *store.Store, opt store.RetentionOptions) store.RetentionResult {
	t.Helper()
	var sum store.RetentionResult
	deadline := time.Now().Add(2 * time.Minute)
	for {
		res, err := s.Purge(testCtx(t), opt)
		sum.ReadDeleted += res.ReadDeleted
		sum.ExpiredDeleted += res.ExpiredDeleted
		sum.SessionsDeleted += res.SessionsDeleted
		sum.PartitionsDropped += res.PartitionsDropped
		sum.PartitionsMade += res.PartitionsMade
		sum.Skipped = sum.Skipped || res.Skipped
		if err == nil {
			return sum
		}
		if time.Now().After(deadline) {
			t.Fatalf("retention still failing: %v", err)
		}
		t.Logf("retention pass: %v (retrying)", err)
		time.Sleep(200 * time.Millisecond)
	}
}

func equalInts(a, b []int64) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}
