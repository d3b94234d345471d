package store

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
)

// Retention defaults, used when the RetentionOptions field is zero.
const (
	DefaultRetentionRead       = 30 * 24 * time.Hour
	DefaultRetentionDeliveries = 30 * 24 * time.Hour
	DefaultRetentionBatch      = 5000
	DefaultPartitionsAhead     = 7
	DefaultRetentionLock       = 2 * time.Second
	DefaultRetentionPause      = 10 * time.Millisecond
)

// RetentionOptions tunes a retention pass; zero fields take the defaults above.
type RetentionOptions struct {
	// ReadAge: a read notification is deleted this long after it was read. Unread ones are kept
	// until read, or until their own expires_at when the publisher set one.
	ReadAge time.Duration
	// DeliveryAge: delivery records, and the history of sessions that ended, older than this
	// are deleted. Deliveries go by whole days (a day's partition is dropped once all of it is
	// older), so they are kept up to a day longer.
	DeliveryAge time.Duration
	// Batch is the most rows one DELETE statement removes (each is its own short transaction).
	Batch int
	// PartitionsAhead is how many days of delivery partitions are made ahead of today.
	PartitionsAhead int
	// LockTimeout bounds the wait for a table lock (partition attach and detach); past it the
	// step gives up and the next pass tries again, so a long report query never makes writers
	// queue behind retention.
	LockTimeout time.Duration
	// Pause is slept between DELETE batches, to leave the disk to the hot path.
	Pause time.Duration
}

func (o RetentionOptions) withDefaults() RetentionOptions {
	if o.ReadAge <= 0 {
		o.ReadAge = DefaultRetentionRead
	}
	if o.DeliveryAge <= 0 {
		o.DeliveryAge = DefaultRetentionDeliveries
	}
	if o.Batch <= 0 {
		o.Batch = DefaultRetentionBatch
	}
	if o.PartitionsAhead <= 0 {
		o.PartitionsAhead = DefaultPartitionsAhead
	}
	if o.LockTimeout <= 0 {
		o.LockTimeout = DefaultRetentionLock
	}
	if o.Pause < 0 {
		o.Pause = 0
	} else if o.Pause == 0 {
		o.Pause = DefaultRetentionPause
	}
	return o
}

// RetentionResult is what one retention pass did.
type RetentionResult struct {
	// Skipped is true when another node held the retention lock (nothing was done).
	Skipped bool
	// PartitionsMade counts delivery partitions made ahead.
	PartitionsMade int
	// PartitionsDropped counts whole days of deliveries dropped; DeliveriesDropped the rows
	// they held (from the planner's statistics: an estimate).
	PartitionsDropped int
	DeliveriesDropped int64
	// ReadDeleted and ExpiredDeleted count notifications deleted as read long ago and as
	// past their expires_at.
	ReadDeleted    int64
	ExpiredDeleted int64
	// SessionsDeleted counts session_history rows of sessions that ended long ago.
	SessionsDeleted int64
	// Took is how long the pass ran.
	Took time.Duration
}

// EnsureDeliveryPartitions makes the daily partitions of deliveries for every UTC day from
// from to to (inclusive) that has none. It returns how many it made.
func (s *Store) EnsureDeliveryPartitions(ctx context.Context, from, to time.Time) (int, error) {
	return ensurePartitions(ctx, s.pool, from, to, DefaultRetentionLock)
}

func ensurePartitions(ctx context.Context, db interface {
	Begin(context.Context) (pgx.Tx, error)
}, from, to time.Time, lockTimeout time.Duration) (int, error) {
	tx, err := db.Begin(ctx)
	if err != nil {
		return 0, fmt.Errorf("store: make delivery partitions: %w", err)
	}
	defer func() { _ = tx.Rollback(context.WithoutCancel(ctx)) }()
	if _, err := tx.Exec(ctx, "SELECT set_config('lock_timeout', $1, true)", pgInterval(lockTimeout)); err != nil {
		return 0, fmt.Errorf("store: make delivery partitions: %w", err)
	}
	var made int
	if err := tx.QueryRow(ctx, "SELECT deliveries_ensure_partitions($1::date, $2::date)",
		from.UTC().Format(time.DateOnly), to.UTC().Format(time.DateOnly)).Scan(&made); err != nil {
		return 0, fmt.Errorf("store: make delivery partitions %s..%s: %w", from.UTC().Format(time.DateOnly), to.UTC().Format(time.DateOnly), err)
	}
	if err := tx.Commit(ctx); err != nil {
		return 0, fmt.Errorf("store: make delivery partitions: %w", err)
	}
	return made, nil
}

func pgInterval(d time.Duration) string { return fmt.Sprintf("%dms", max(1, d.Milliseconds())) }

// Purge runs one retention pass: it makes the delivery partitions ahead, drops the days of
// deliveries older than DeliveryAge (DETACH ... CONCURRENTLY, then DROP: no lock that blocks
// inserts or reads), and deletes in batches of Batch rows the notifications read more than
// ReadAge ago, those past their expires_at, and the history of sessions that ended more than
// DeliveryAge ago. Nodes sharing a database take turns through an advisory lock; a node that
// finds it taken skips the pass. Each step goes on when an earlier one failed; the errors are
// joined.
func (s *Store) Purge(ctx context.Context, opt RetentionOptions) (RetentionResult, error) {
	opt = opt.withDefaults()
	start := time.Now()
	var res RetentionResult
	conn, err := s.pool.Acquire(ctx)
	if err != nil {
		return res, fmt.Errorf("store: retention: %w", err)
	}
	defer conn.Release()
	const lockKey = `hashtext('notifyd.retention:' || current_schema())`
	var got bool
	if err := conn.QueryRow(ctx, "SELECT pg_try_advisory_lock("+lockKey+")").Scan(&got); err != nil {
		return res, fmt.Errorf("store: retention: lock: %w", err)
	}
	if !got {
		res.Skipped = true
		return res, nil
	}
	defer func() {
		uctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
		defer cancel()
		if _, err := conn.Exec(uctx, "SELECT pg_advisory_unlock("+lockKey+")"); err != nil {
			conn.Conn().Close(uctx) // closing the session releases the lock
		}
	}()

	var errs []error
	now := time.Now()
	if res.PartitionsMade, err = ensurePartitions(ctx, conn, now.AddDate(0, 0, -1), now.AddDate(0, 0, opt.PartitionsAhead), opt.LockTimeout); err != nil {
		errs = append(errs, err)
	}
	if err := dropDeliveryDays(ctx, conn, now.Add(-opt.DeliveryAge), opt.LockTimeout, &res); err != nil {
		errs = append(errs, err)
	}
	steps := []struct {
		what string
		sql  string
		arg  any
		n    *int64
	}{
		{"read notifications", `DELETE FROM notifications WHERE id IN (
			SELECT id FROM notifications WHERE read_at < $1 ORDER BY read_at LIMIT $2)`, now.Add(-opt.ReadAge), &res.ReadDeleted},
		{"expired notifications", `DELETE FROM notifications WHERE id IN (
			SELECT id FROM notifications WHERE expires_at < $1 ORDER BY expires_at LIMIT $2)`, now, &res.ExpiredDeleted},
		{"session history", `DELETE FROM session_history WHERE id IN (
			SELECT id FROM session_history WHERE connected_at < $1 AND ended_at < $1 ORDER BY connected_at LIMIT $2)`,
			now.Add(-opt.DeliveryAge), &res.SessionsDeleted},
	}
	for _, st := range steps {
		if err := deleteInBatches(ctx, conn, st.sql, st.arg, opt, st.n); err != nil {
			errs = append(errs, fmt.Errorf("store: retention: %s: %w", st.what, err))
		}
	}
	res.Took = time.Since(start)
	return res, errors.Join(errs...)
}

// deleteInBatches runs sql (which deletes at most $2 rows older than $1) until it deletes
// fewer than a batch, adding the rows deleted to n.
func deleteInBatches(ctx context.Context, conn *pgxpool.Conn, sql string, before any, opt RetentionOptions, n *int64) error {
	for {
		tag, err := conn.Exec(ctx, sql, before, opt.Batch)
		if err != nil {
			return err
		}
		*n += tag.RowsAffected()
		if tag.RowsAffected() < int64(opt.Batch) {
			return nil
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(opt.Pause):
		}
	}
}

// dropDeliveryDays detaches (concurrently) and drops every partition of deliveries that ends at
// or before cutoff, first finishing any detach an earlier pass left half done.
func dropDeliveryDays(ctx context.Context, conn *pgxpool.Conn, cutoff time.Time, lockTimeout time.Duration, res *RetentionResult) error {
	rows, err := conn.Query(ctx, `
		SELECT c.relname, i.inhdetachpending, greatest(c.reltuples, 0)::bigint
		FROM pg_inherits i
		JOIN pg_class c ON c.oid = i.inhrelid
		WHERE i.inhparent = 'deliveries'::regclass
		  AND substring(pg_get_expr(c.relpartbound, c.oid) FROM 'TO \(''([^'']+)''\)')::timestamptz <= $1
		ORDER BY c.relname`, cutoff)
	if err != nil {
		return fmt.Errorf("store: retention: list delivery partitions: %w", err)
	}
	type part struct {
		name    string
		pending bool
		rows    int64
	}
	parts, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (part, error) {
		var p part
		err := r.Scan(&p.name, &p.pending, &p.rows)
		return p, err
	})
	if err != nil {
		return fmt.Errorf("store: retention: list delivery partitions: %w", err)
	}
	if _, err := conn.Exec(ctx, "SELECT set_config('lock_timeout', $1, false)", pgInterval(lockTimeout)); err != nil {
		return fmt.Errorf("store: retention: %w", err)
	}
	defer func() { _, _ = conn.Exec(context.WithoutCancel(ctx), "RESET lock_timeout") }()
	var errs []error
	for _, p := range parts {
		name := pgx.Identifier{p.name}.Sanitize()
		mode := "CONCURRENTLY" // cannot run in a transaction: conn is in autocommit
		if p.pending {
			mode = "FINALIZE"
		}
		if _, err := conn.Exec(ctx, "ALTER TABLE deliveries DETACH PARTITION "+name+" "+mode); err != nil {
			errs = append(errs, fmt.Errorf("store: retention: detach %s: %w", p.name, err))
			continue
		}
		if _, err := conn.Exec(ctx, "DROP TABLE "+name); err != nil {
			errs = append(errs, fmt.Errorf("store: retention: drop %s: %w", p.name, err))
			continue
		}
		res.PartitionsDropped++
		res.DeliveriesDropped += p.rows
	}
	return errors.Join(errs...)
}

// RunRetention runs Purge now and then every every until ctx ends, logging what each pass did.
func (s *Store) RunRetention(ctx context.Context, every time.Duration, opt RetentionOptions, log *slog.Logger) {
	if log == nil {
		log = slog.Default()
	}
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		res, err := s.Purge(ctx, opt)
		switch {
		case ctx.Err() != nil:
			return
		case err != nil:
			log.Error("retention pass failed", "err", err)
		case !res.Skipped:
			log.Info("retention pass", "read_deleted", res.ReadDeleted, "expired_deleted", res.ExpiredDeleted,
				"delivery_days_dropped", res.PartitionsDropped, "deliveries_dropped", res.DeliveriesDropped,
				"sessions_deleted", res.SessionsDeleted, "partitions_made", res.PartitionsMade, "took", res.Took)
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}
