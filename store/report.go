package store

import (
	"context"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"
)

// ReportSection is one table of the delivery report: column names and rows of values
// (time.Time, int64, float64, string, bool or nil).
type ReportSection struct {
	Name    string
	Title   string
	Columns []string
	Rows    [][]any
}

// Report is the delivery report over [Since, Until).
type Report struct {
	Since, Until time.Time
	Sections     []ReportSection
}

// ReportWorkMem is the work_mem the report's transaction runs with: its percentiles and
// first-delivery joins sort a few hundred thousand rows per day of window, which spill to disk
// at the default 4MB and stay in memory at this.
const ReportWorkMem = "64MB"

// whole is a bucket wider than any window: the view functions then return one row per group
// for the whole window.
const whole = "interval '100000 days'"

// reportQueries are the report's sections, each one query over the reporting views
// (migrations/003_reporting.sql) with $1 = since and $2 = until; the last one takes the number
// of users to list as $1.
var reportQueries = []struct{ name, title, sql string }{
	{"delivery_share", "Notifications published, and how soon a first device got them", `
		SELECT published, within_1s, within_10s, within_1m, later, never,
			pct_1s::float8, pct_10s::float8, pct_1m::float8, pct_never::float8
		FROM report_delivery_share($1, ` + whole + `, $2)`},
	{"delivery_latency", "Publish-to-delivery latency by transport (live deliveries; ms)", `
		SELECT transport, deliveries, live, replayed, acked, p50_ms, p90_ms, p95_ms, p99_ms, max_ms
		FROM report_delivery_latency($1, ` + whole + `, $2)`},
	{"delivery_latency_daily", "Publish-to-delivery latency by day and transport (ms)", `
		SELECT bucket_start AS day, transport, deliveries, live, replayed, acked, p50_ms, p90_ms, p95_ms, p99_ms, max_ms
		FROM report_delivery_latency($1, interval '1 day', $2)`},
	{"delivery_latency_hourly", "Publish-to-delivery latency by hour and transport (ms)", `
		SELECT bucket_start AS hour, transport, deliveries, live, replayed, acked, p50_ms, p90_ms, p95_ms, p99_ms, max_ms
		FROM report_delivery_latency($1, interval '1 hour', $2)`},
	{"read_latency", "Publish-to-read latency by transport of the first delivery (ms)", `
		SELECT transport, published, read, p50_ms, p90_ms, p99_ms, max_ms
		FROM report_read_latency($1, ` + whole + `, $2)`},
	{"read_latency_daily", "Publish-to-read latency by day and transport (ms)", `
		SELECT bucket_start AS day, transport, published, read, p50_ms, p90_ms, p99_ms, max_ms
		FROM report_read_latency($1, interval '1 day', $2)`},
	{"sessions", "Connections by transport: durations (s) and how they ended", `
		SELECT transport, sessions, open, p50_s, p90_s, max_s, client_close, heartbeat_timeout, kicked, replaced,
			slow_consumer, shutdown, error, restart, node_lost
		FROM report_sessions($1, $2)`},
	{"transports", "Transports users end up on (their latest connection)", `
		SELECT transport, users, pct_users::float8, never_websocket
		FROM report_transport_mix($1, $2)`},
	{"unread_aging", "Users with the oldest unread notifications", `
		SELECT user_id, sum(unread)::bigint AS unread, min(oldest_at) AS oldest_at,
			sum(older_1d)::bigint AS older_1d, sum(older_7d)::bigint AS older_7d,
			string_agg(topic || ':' || unread, ' ' ORDER BY unread DESC, topic) AS topics
		FROM unread_aging
		GROUP BY user_id
		ORDER BY min(oldest_at), user_id
		LIMIT $1`},
}

// ReportQuery is one query of the report, for tools that time or explain it.
type ReportQuery struct {
	Name, Title, SQL string
	// Args are the query's arguments for a window and a number of users to list.
	Args func(since, until time.Time, top int) []any
}

// ReportQueries returns the report's queries, in order.
func ReportQueries() []ReportQuery {
	out := make([]ReportQuery, len(reportQueries))
	for i, q := range reportQueries {
		out[i] = ReportQuery{Name: q.name, Title: q.title, SQL: q.sql, Args: reportArgs(q.name)}
	}
	return out
}

func reportArgs(name string) func(since, until time.Time, top int) []any {
	if name == "unread_aging" {
		return func(_, _ time.Time, top int) []any { return []any{top} }
	}
	return func(since, until time.Time, _ int) []any { return []any{since, until} }
}

// Report runs the delivery report over [since, until) (until zero: now), listing at most
// unreadLimit users in unread_aging (20 when <= 0). The queries run in one read-only
// repeatable-read transaction (work_mem ReportWorkMem), so every section sees the same data.
func (s *Store) Report(ctx context.Context, since, until time.Time, unreadLimit int) (*Report, error) {
	if until.IsZero() {
		until = time.Now()
	}
	if unreadLimit <= 0 {
		unreadLimit = 20
	}
	rep := &Report{Since: since, Until: until}
	err := pgx.BeginTxFunc(ctx, s.pool, pgx.TxOptions{IsoLevel: pgx.RepeatableRead, AccessMode: pgx.ReadOnly}, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, "SELECT set_config('work_mem', $1, true)", ReportWorkMem); err != nil {
			return err
		}
		for _, q := range reportQueries {
			sec, err := reportSection(ctx, tx, q.name, q.title, q.sql, reportArgs(q.name)(since, until, unreadLimit)...)
			if err != nil {
				return err
			}
			rep.Sections = append(rep.Sections, sec)
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("store: report: %w", err)
	}
	return rep, nil
}

func reportSection(ctx context.Context, tx pgx.Tx, name, title, sql string, args ...any) (ReportSection, error) {
	sec := ReportSection{Name: name, Title: title}
	rows, err := tx.Query(ctx, sql, args...)
	if err != nil {
		return sec, fmt.Errorf("%s: %w", name, err)
	}
	defer rows.Close()
	for _, f := range rows.FieldDescriptions() {
		sec.Columns = append(sec.Columns, f.Name)
	}
	for rows.Next() {
		vals, err := rows.Values()
		if err != nil {
			return sec, fmt.Errorf("%s: %w", name, err)
		}
		sec.Rows = append(sec.Rows, vals)
	}
	if err := rows.Err(); err != nil {
		return sec, fmt.Errorf("%s: %w", name, err)
	}
	return sec, nil
}
