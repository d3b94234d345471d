package store_test

import (
	"context"
	"fmt"
	"os"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/notifyd/notifyd/store"
	"github.com/notifyd/notifyd/store/storetest"
)

// scaleSQL fills a migrated schema with 2,000,000 notifications of 100,000 users published over
// the last 31 days (80% read within 48 h, 5% with an expiry), 10,000,000 deliveries (five per
// notification: four live within 2 s, one replayed within 6 h; 90% acked; transports 11/16
// WebSocket, 3/16 SSE, 2/16 long-poll by user) and 1,000,000 connections in session_history.
var scaleSQL = []string{
	`SELECT deliveries_ensure_partitions((now() - interval '32 days')::date, (now() + interval '7 days')::date)`,
	`ALTER TABLE notifications DISABLE TRIGGER USER`,
	`INSERT INTO notifications (id, user_id, seq, topic, data, created_at, read_at, expires_at)
	 SELECT gen_random_uuid(), 'user' || (g % 100000), g / 100000 + 1,
	        (ARRAY['order.shipped','order.created','chat.message','promo','security.alert',
	               'invoice.ready','comment.reply','friend.request','reminder','digest'])[1 + (g % 7 + (g / 100000) % 3)],
	        '{}', c,
	        CASE WHEN g % 5 <> 0 AND c + r * interval '48 hours' < now() THEN c + r * interval '48 hours' END,
	        CASE WHEN g % 20 = 0 THEN c + interval '7 days' END
	 FROM (SELECT g, now() - interval '31 days' + (g::float8 / 2000000) * interval '31 days' AS c, random() ^ 3 AS r
	       FROM generate_series(0, 1999999) g) s`,
	`INSERT INTO user_seqs (user_id, last_seq) SELECT user_id, max(seq) FROM notifications GROUP BY user_id`,
	`ALTER TABLE notifications ENABLE TRIGGER USER`,
	`INSERT INTO deliveries (notification_id, user_id, seq, session_id, device, transport, replayed, published_at, delivered_at, acked_at)
	 SELECT n.id, n.user_id, n.seq,
	        n.user_id || '-' || k || '-' || (extract(epoch FROM n.created_at)::bigint / 3600),
	        'device' || k,
	        CASE WHEN (hashtext(n.user_id) & 15) < 11 THEN 'websocket' WHEN (hashtext(n.user_id) & 15) < 14 THEN 'sse' ELSE 'longpoll' END,
	        k = 5, n.created_at, x.at,
	        CASE WHEN random() < 0.9 THEN x.at + random() * interval '200 milliseconds' END
	 FROM notifications n
	 CROSS JOIN generate_series(1, 5) k
	 CROSS JOIN LATERAL (SELECT CASE WHEN k = 5 THEN n.created_at + random() * interval '6 hours'
	                                 ELSE n.created_at + (random() ^ 4) * interval '2 seconds' END AS at) x
	 ORDER BY x.at`, // the Recorder appends in delivered_at order
	`INSERT INTO session_history (id, session_id, user_id, device, transport, connected_at, last_seen_at, ended_at, end_reason)
	 SELECT gen_random_uuid(), 's' || g, 'user' || (g % 100000), 'device' || (g % 5),
	        CASE WHEN (hashtext('user' || (g % 100000)) & 15) < 11 THEN 'websocket'
	             WHEN (hashtext('user' || (g % 100000)) & 15) < 14 THEN 'sse' ELSE 'longpoll' END,
	        c, e, CASE WHEN g < 999000 THEN e END,
	        CASE WHEN g >= 999000 THEN NULL
	             WHEN g % 100 < 70 THEN 'client_close' WHEN g % 100 < 80 THEN 'heartbeat_timeout'
	             WHEN g % 100 < 88 THEN 'replaced' WHEN g % 100 < 89 THEN 'kicked'
	             WHEN g % 100 < 90 THEN 'slow_consumer' ELSE 'shutdown' END
	 FROM (SELECT g, now() - interval '31 days' + (g::float8 / 1000000) * interval '31 days' AS c,
	              now() - interval '31 days' + (g::float8 / 1000000) * interval '31 days' + random() * interval '2 hours' AS e
	       FROM generate_series(0, 999999) g) s`,
	`VACUUM (ANALYZE)`, // what autovacuum does after a bulk of inserts (visibility map, BRIN summaries)
}

// TestReportAtScale loads 10 million deliveries and 2 million notifications into its own schema,
// then times every report query (with its EXPLAIN ANALYZE plan), the point lookups, the whole
// report and one retention pass. It runs only with NOTIFYD_BENCH_REPORT=1 (make bench-report)
// and writes its findings to $NOTIFYD_BENCH_OUT (default: the test log).
func TestReportAtScale(t *testing.T) {
	if os.Getenv("NOTIFYD_BENCH_REPORT") == "" {
		t.Skip("set NOTIFYD_BENCH_REPORT=1 (make bench-report): loads 10M rows")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 55*time.Minute)
	defer cancel()
	s, err := store.Open(ctx, storetest.URL(t), store.Options{MaxConns: 4})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if err := s.Migrate(ctx); err != nil {
		t.Fatal(err)
	}
	var out strings.Builder
	logf := func(format string, args ...any) {
		fmt.Fprintf(&out, format+"\n", args...)
		t.Logf(format, args...)
	}
	load, err := s.Pool().Acquire(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := load.Exec(ctx, "SET work_mem = '256MB'"); err != nil {
		t.Fatal(err)
	}
	for _, sql := range scaleSQL {
		start := time.Now()
		if _, err := load.Exec(ctx, sql); err != nil {
			t.Fatalf("%s: %v", sql, err)
		}
		logf("load: %-60.60s %s", strings.Join(strings.Fields(sql), " "), time.Since(start).Round(time.Millisecond))
	}
	load.Release()
	var nDeliv, nNotes, nSessions int64
	if err := s.Pool().QueryRow(ctx, `SELECT (SELECT count(*) FROM deliveries), (SELECT count(*) FROM notifications),
		(SELECT count(*) FROM session_history)`).Scan(&nDeliv, &nNotes, &nSessions); err != nil {
		t.Fatal(err)
	}
	logf("rows: %d deliveries, %d notifications, %d sessions", nDeliv, nNotes, nSessions)

	until := time.Now()
	since := until.Add(-24 * time.Hour)
	type timing struct {
		name string
		best time.Duration
	}
	var timings []timing
	// run times a query three times (best of three) and prints its plan.
	// The queries run on one connection with the report's work_mem, as `notifyd report` runs them.
	conn, err := s.Pool().Acquire(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Release()
	if _, err := conn.Exec(ctx, "SELECT set_config('work_mem', $1, false)", store.ReportWorkMem); err != nil {
		t.Fatal(err)
	}
	run := func(name, sql string, args ...any) {
		var runs []time.Duration
		for range 3 {
			start := time.Now()
			rows, err := conn.Query(ctx, sql, args...)
			if err != nil {
				t.Fatalf("%s: %v", name, err)
			}
			for rows.Next() {
			}
			if err := rows.Err(); err != nil {
				t.Fatalf("%s: %v", name, err)
			}
			runs = append(runs, time.Since(start))
		}
		best := slices.Min(runs)
		timings = append(timings, timing{name, best})
		rows, err := conn.Query(ctx, "EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) "+sql, args...)
		if err != nil {
			t.Fatalf("explain %s: %v", name, err)
		}
		plan, err := pgx.CollectRows(rows, pgx.RowTo[string])
		if err != nil {
			t.Fatalf("explain %s: %v", name, err)
		}
		logf("\n### %s: best of 3 = %s (runs %v)\n```\n%s\n```", name, best.Round(time.Millisecond), runs, strings.Join(plan, "\n"))
	}
	for _, q := range store.ReportQueries() {
		run(q.Name, q.SQL, q.Args(since, until, 20)...)
	}
	var someID string
	if err := s.Pool().QueryRow(ctx, "SELECT id::text FROM notifications WHERE created_at > now() - interval '2 days' LIMIT 1").Scan(&someID); err != nil {
		t.Fatal(err)
	}
	run("notification_status (one id)", "SELECT * FROM notification_status WHERE id = $1", someID)
	run("delivery_log (one id)", "SELECT * FROM delivery_log WHERE notification_id = $1", someID)
	run("user_transports (one user)", "SELECT * FROM user_transports WHERE user_id = 'user4242'")
	run("unread_aging (old unread, one week)", "SELECT user_id, sum(unread) FROM unread_aging WHERE oldest_at < now() - interval '7 days' GROUP BY user_id ORDER BY 2 DESC LIMIT 20")
	run("report_delivery_latency 7 days by day", "SELECT * FROM report_delivery_latency(now() - interval '7 days', interval '1 day')")

	start := time.Now()
	if _, err := s.Report(ctx, since, until, 20); err != nil {
		t.Fatal(err)
	}
	whole := time.Since(start)

	start = time.Now()
	res, err := s.Purge(ctx, store.RetentionOptions{})
	if err != nil {
		t.Fatal(err)
	}
	logf("\nretention pass (30 days, batches of %d): %s: %+v", store.DefaultRetentionBatch, time.Since(start).Round(time.Millisecond), res)

	logf("\n| query (window 24 h unless said) | best of 3 |\n|---|---|")
	for _, tm := range timings {
		logf("| %s | %s |", tm.name, tm.best.Round(time.Millisecond))
	}
	logf("| whole report (`notifyd report`, one transaction) | %s |", whole.Round(time.Millisecond))
	if path := os.Getenv("NOTIFYD_BENCH_OUT"); path != "" {
		if err := os.WriteFile(path, []byte(out.String()), 0o644); err != nil {
			t.Fatal(err)
		}
	}
}
