// Package store is the Postgres layer of notifyd: notifications with dense per-user sequence
// numbers, replay and inbox reads, read state, the LISTEN side of change delivery, and the
// off-hot-path Recorder of deliveries and session history.
//
// All SQL references tables unqualified, so the schema is chosen by the connection's
// search_path (tests run each in their own schema, see package storetest).
package store

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgerrcode"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/jackc/tern/v2/migrate"

	"github.com/notifyd/notifyd/migrations"
)

// Defaults used by Open when the corresponding Options field is zero.
const (
	DefaultMaxConns       int32 = 20
	DefaultGroupCommitMax int   = 500
)

// versionTable is tern's version table, unqualified so it lives in the search_path schema.
const versionTable = "schema_version"

// writeTimeout bounds writes that run detached from the caller's context.
const writeTimeout = 30 * time.Second

// ErrClosed is returned by PublishOne after Close. Its code is ESHUTTINGDOWN.
var ErrClosed = &Error{Code: ESHUTTINGDOWN, Message: "the server is restarting; retry later"}

// ErrInvalid matches (errors.Is) every EINVALID error, such as a notification that cannot be
// stored: empty user id or topic, data that is not valid JSON, or data Postgres rejects.
// Nothing of the request is stored.
var ErrInvalid = &Error{Code: EINVALID, Message: "invalid notification"}

// Options tunes a Store. Zero values select the defaults above.
type Options struct {
	// MaxConns is the pool size.
	MaxConns int32
	// GroupCommitMax is the most rows of Publish and PublishOne calls that a group gathers
	// for one transaction (the last call may take it past; a larger call goes alone).
	GroupCommitMax int
	// GroupCommitWait, when set, is how long a group waits for more requests, and only when
	// more are already queued (a lone caller never waits). Zero, the default, waits for none:
	// the requests that arrive while a group commits make the next group.
	GroupCommitWait time.Duration
}

// Store is the notifyd database layer over a *pgxpool.Pool. It is safe for concurrent use.
type Store struct {
	pool *pgxpool.Pool
	opt  Options

	// group commit (PublishOne)
	closeMu  sync.RWMutex // held for reading while enqueueing; for writing when closing
	closed   bool
	reqs     chan *pubReq
	stop     chan struct{}
	loopDone chan struct{}

	replays replayQueue // batched Replay (replay.go)

	hook     atomic.Pointer[PublishHook]   // SetPublishHook
	groupObs atomic.Pointer[GroupObserver] // SetGroupObserver

	stats struct {
		publishStatements atomic.Uint64
		publishOneCalls   atomic.Uint64
		publishGroups     atomic.Uint64
		replayStatements  atomic.Uint64
	}
}

// PublishHook is told, before a publish statement goes to Postgres, which
// users it is for; the function it returns is called once the statement is
// over, with the rows it stored when it committed (repeats of an idempotency
// key left out; not nil, possibly empty), or with nil when it failed. Neither
// may block. notifyd's dispatcher (realtime.Dispatcher.Expect) is the hook: it
// delivers the rows this process publishes from memory, since their commit
// signal often arrives before the statement's answer.
type PublishHook func(users []string) (done func(committed []Notification))

// SetPublishHook installs h for the publish statements that start after it.
func (s *Store) SetPublishHook(h PublishHook) { s.hook.Store(&h) }

// GroupObserver is told how group commit goes (notifyd's metrics implement it). Its methods
// run on the group-commit loop, so they must be quick and must not block.
type GroupObserver interface {
	// Queued is called for each Publish or PublishOne call as its group starts, with how
	// long the call waited in the queue (behind the groups before it).
	Queued(wait time.Duration)
	// Stored is called after each group, before any of its callers is answered, with its rows
	// and how long storing it took: its statement and commit, a retry call by call included.
	Stored(rows int, took time.Duration)
}

// SetGroupObserver installs o for the groups that start after it.
func (s *Store) SetGroupObserver(o GroupObserver) { s.groupObs.Store(&o) }

// Stats are counters of the publish paths since Open (for tests and metrics).
type Stats struct {
	// PublishStatements counts publish statements executed (each is one transaction),
	// retries included.
	PublishStatements uint64
	// PublishOneCalls counts PublishOne calls.
	PublishOneCalls uint64
	// PublishGroups counts group transactions attempted (for PublishOne and Publish callers).
	PublishGroups uint64
	// ReplayStatements counts the statements that served Replay calls (several calls share
	// one when they come at once).
	ReplayStatements uint64
}

// Stats returns the publish counters.
func (s *Store) Stats() Stats {
	return Stats{
		PublishStatements: s.stats.publishStatements.Load(),
		PublishOneCalls:   s.stats.publishOneCalls.Load(),
		PublishGroups:     s.stats.publishGroups.Load(),
		ReplayStatements:  s.stats.replayStatements.Load(),
	}
}

// EnsureDatabase creates the database named in url if it does not exist, connecting to the
// database "postgres" with the same credentials.
func EnsureDatabase(ctx context.Context, url string) error {
	cfg, err := pgx.ParseConfig(url)
	if err != nil {
		return fmt.Errorf("store: parse database url: %w", err)
	}
	name := cfg.Database
	if name == "" {
		return errors.New("store: database url names no database")
	}
	admin := cfg.Copy()
	admin.Database = "postgres"
	conn, err := pgx.ConnectConfig(ctx, admin)
	if err != nil {
		return fmt.Errorf("store: connect to database postgres: %w", err)
	}
	defer conn.Close(context.WithoutCancel(ctx))

	var exists bool
	if err := conn.QueryRow(ctx, "SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)", name).Scan(&exists); err != nil {
		return fmt.Errorf("store: look up database %q: %w", name, err)
	}
	if exists {
		return nil
	}
	if _, err := conn.Exec(ctx, "CREATE DATABASE "+pgx.Identifier{name}.Sanitize()); err != nil {
		// Another node may have created it at the same moment: 42P04, or 23505 on the
		// pg_database catalog index when both got past the existence check.
		var pgErr *pgconn.PgError
		if errors.As(err, &pgErr) && (pgErr.Code == pgerrcode.DuplicateDatabase || pgErr.Code == pgerrcode.UniqueViolation) {
			return nil
		}
		return fmt.Errorf("store: create database %q: %w", name, err)
	}
	return nil
}

// Open creates the connection pool (and checks it with a ping) and starts the PublishOne
// group-commit loop. It does not migrate: call Migrate.
func Open(ctx context.Context, url string, opt Options) (*Store, error) {
	if opt.MaxConns <= 0 {
		opt.MaxConns = DefaultMaxConns
	}
	if opt.GroupCommitMax <= 0 {
		opt.GroupCommitMax = DefaultGroupCommitMax
	}
	cfg, err := pgxpool.ParseConfig(url)
	if err != nil {
		return nil, fmt.Errorf("store: parse database url: %w", err)
	}
	cfg.MaxConns = opt.MaxConns
	if _, ok := cfg.ConnConfig.RuntimeParams["application_name"]; !ok {
		cfg.ConnConfig.RuntimeParams["application_name"] = "notifyd"
	}
	pool, err := pgxpool.NewWithConfig(ctx, cfg)
	if err != nil {
		return nil, fmt.Errorf("store: create pool: %w", err)
	}
	if err := pool.Ping(ctx); err != nil {
		pool.Close()
		return nil, fmt.Errorf("store: ping: %w", err)
	}
	s := &Store{
		pool:     pool,
		opt:      opt,
		reqs:     make(chan *pubReq, 4*opt.GroupCommitMax),
		stop:     make(chan struct{}),
		loopDone: make(chan struct{}),
	}
	s.replays = newReplayQueue(s)
	go s.groupLoop()
	return s, nil
}

// Migrate applies the embedded migrations (migrations.FS) with tern/v2 on a dedicated
// connection. tern holds a Postgres advisory lock while it works, so nodes starting at once
// migrate once.
func (s *Store) Migrate(ctx context.Context) error {
	conn, err := pgx.ConnectConfig(ctx, s.pool.Config().ConnConfig.Copy())
	if err != nil {
		return fmt.Errorf("store: migrate: connect: %w", err)
	}
	defer conn.Close(context.WithoutCancel(ctx))
	m, err := migrate.NewMigrator(ctx, conn, versionTable)
	if err != nil {
		return fmt.Errorf("store: migrate: new migrator: %w", err)
	}
	if err := m.LoadMigrations(migrations.FS); err != nil {
		return fmt.Errorf("store: migrate: load migrations: %w", err)
	}
	if err := m.Migrate(ctx); err != nil {
		return fmt.Errorf("store: migrate: %w", err)
	}
	return nil
}

// Pool returns the underlying connection pool.
func (s *Store) Pool() *pgxpool.Pool { return s.pool }

// Ping checks that the database answers.
func (s *Store) Ping(ctx context.Context) error {
	if err := s.pool.Ping(ctx); err != nil {
		return fmt.Errorf("store: ping: %w", err)
	}
	return nil
}

// Close stops the group-commit loop, after storing what is already queued, then closes the
// pool. PublishOne calls made after Close return ErrClosed.
func (s *Store) Close() {
	s.closeMu.Lock()
	already := s.closed
	s.closed = true
	s.closeMu.Unlock()
	if !already {
		close(s.stop)
		<-s.loopDone
	}
	s.pool.Close()
}

// EndStaleSessions marks the session_history rows of node nodeID that never ended (a crash,
// a kill) as ended at their last sign of life (last_seen_at, else connected_at) with the given
// reason; rows without a node (written before nodes existed) count as its own. Other nodes'
// rows are left alone: they are live, or closed by ReapDead once their node's lease lapses.
// Call it at startup, after the node registered and before sessions are accepted. It returns
// the number of rows changed.
func (s *Store) EndStaleSessions(ctx context.Context, nodeID, reason string) (int64, error) {
	tag, err := s.pool.Exec(ctx, `
		UPDATE session_history
		SET ended_at = coalesce(last_seen_at, connected_at), end_reason = $2
		WHERE ended_at IS NULL AND (node_id = $1 OR node_id IS NULL)`, nodeID, reason)
	if err != nil {
		return 0, fmt.Errorf("store: end stale sessions: %w", err)
	}
	return tag.RowsAffected(), nil
}
