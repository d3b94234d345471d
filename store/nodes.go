package store

import (
	"context"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
)

// DefaultNodeLease is how long a node's lease lasts after each renewal when NodeOptions.Lease
// is zero. A node renews every lease/nodeRenewDivisor (2 s of the default 10 s), so four
// renewals in a row may fail (a slow database, a short network cut) before its lease lapses,
// and a killed node is declared dead at most lease + lease/nodeRenewDivisor after its last
// renewal (by the first surviving node whose loop runs after the lease lapsed).
const (
	DefaultNodeLease = 10 * time.Second
	nodeRenewDivisor = 5
)

// EndNodeLost is the end reason of the session_history rows of a node whose lease lapsed,
// closed by a surviving node.
const EndNodeLost = "node_lost"

// endShutdown is the end reason of the rows a node stopping cleanly still has open (their end
// records were dropped); the hub ends every session with the same reason on shutdown.
const endShutdown = "shutdown"

// maxNodeIDLen bounds a node id (it is a label of every metric and a column of every session row).
const maxNodeIDLen = 64

// ValidNodeID reports whether id can name a node: 1 to 64 ASCII letters, digits, '.', '_' or
// '-' (what a hostname, a pod name or a Prometheus label value holds without quoting).
func ValidNodeID(id string) bool {
	if id == "" || len(id) > maxNodeIDLen {
		return false
	}
	for i := 0; i < len(id); i++ {
		c := id[i]
		if !('a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' || c == '.' || c == '_' || c == '-') {
			return false
		}
	}
	return true
}

// NodeOptions describe this process as a node of the cluster.
type NodeOptions struct {
	// ID names the node (ValidNodeID); its session_history rows carry it.
	ID string
	// Addr is where the node listens, for operators reading the nodes table; may be empty.
	Addr string
	// Lease is how long the lease lasts after each renewal (DefaultNodeLease when zero).
	Lease time.Duration
	// Log gets the loop's warnings; nil is slog.Default().
	Log *slog.Logger
}

// Node is this process's lease in the nodes table. Start registers it and runs a loop that,
// every lease/5, renews the lease and closes the history of dead nodes (those whose lease
// lapsed: killed, cut off, frozen) as node_lost; Drain marks it draining; Stop ends the loop
// and removes the row. All times compared are the database's (now()), so the nodes' clocks
// never need to agree.
type Node struct {
	s        *Store
	opt      NodeOptions
	instance string // this process; a second process with the same ID takes the row over
	log      *slog.Logger

	startOnce, stopOnce sync.Once
	stop                chan struct{}
	done                chan struct{}
	removeMu            sync.Mutex
	removed             bool         // under removeMu: Stop removed the row; later calls do nothing
	peers               atomic.Int32 // other nodes with a running lease at the loop's last look (Presence.OthersLive)
}

// NewNode returns the node described by opt (not yet registered: see Start).
func (s *Store) NewNode(opt NodeOptions) (*Node, error) {
	if !ValidNodeID(opt.ID) {
		return nil, fmt.Errorf("store: node id %q: want 1 to %d letters, digits, '.', '_' or '-'", opt.ID, maxNodeIDLen)
	}
	if opt.Lease <= 0 {
		opt.Lease = DefaultNodeLease
	}
	log := opt.Log
	if log == nil {
		log = slog.Default()
	}
	n := &Node{s: s, opt: opt, instance: uuid.NewString(), log: log,
		stop: make(chan struct{}), done: make(chan struct{})}
	n.peers.Store(1) // unknown until the loop looks: assume a cluster
	return n, nil
}

// ID is the node's id.
func (n *Node) ID() string { return n.opt.ID }

// RenewEvery is the interval of the node's loop.
func (n *Node) RenewEvery() time.Duration { return n.opt.Lease / nodeRenewDivisor }

// Register writes the node's row with a fresh lease, taking the row over when one exists
// (a restart under the same id). It reports whether that row's lease was still running: after
// a kill -9 and a quick restart that is the process just killed, otherwise another process is
// running with the same id.
func (n *Node) Register(ctx context.Context) (tookOverLive bool, err error) {
	err = n.s.pool.QueryRow(ctx, `
		WITH prev AS (SELECT lease_until > now() AS live FROM nodes WHERE node_id = $1)
		INSERT INTO nodes (node_id, instance, addr, started_at, renewed_at, lease_until)
		VALUES ($1, $2::uuid, nullif($3, ''), now(), now(), now() + make_interval(secs => $4))
		ON CONFLICT (node_id) DO UPDATE SET instance = excluded.instance, addr = excluded.addr,
			started_at = excluded.started_at, renewed_at = excluded.renewed_at,
			lease_until = excluded.lease_until, draining = false
		RETURNING (SELECT coalesce(bool_or(live), false) FROM prev)`,
		n.opt.ID, n.instance, n.opt.Addr, n.opt.Lease.Seconds()).Scan(&tookOverLive)
	if err != nil {
		return false, fmt.Errorf("store: register node %s: %w", n.opt.ID, err)
	}
	return tookOverLive, nil
}

// Start registers the node (see Register) and starts its loop, which runs until Stop.
// ctx bounds the registration only.
func (n *Node) Start(ctx context.Context) error {
	took, err := n.Register(ctx)
	if err != nil {
		return err
	}
	if took {
		n.log.Warn("node id had a live lease: the previous process of this id was killed, or another process runs with the same NOTIFY_NODE_ID",
			"node", n.opt.ID)
	}
	n.startOnce.Do(func() { go n.run() })
	return nil
}

// run is the node's loop: runOnce now and every RenewEvery until Stop.
func (n *Node) run() {
	defer close(n.done)
	t := time.NewTicker(n.RenewEvery())
	defer t.Stop()
	for {
		n.runOnce()
		select {
		case <-n.stop:
			return
		case <-t.C:
		}
	}
}

// runOnce renews the lease, then closes the history of the dead nodes. Each statement is
// bounded by the lease, so a hung database cannot hold the loop past the point where the
// lease is lost anyway.
func (n *Node) runOnce() {
	ctx, cancel := context.WithTimeout(context.Background(), n.opt.Lease)
	defer cancel()
	if err := n.renew(ctx); err != nil {
		n.log.Warn("node lease renewal failed", "err", err)
	}
	if err := n.refreshPeers(ctx); err != nil {
		n.log.Warn("could not count the live nodes", "err", err)
	}
	lost, err := n.ReapDead(ctx)
	if err != nil {
		n.log.Warn("could not close the history of dead nodes", "err", err)
	}
	for _, l := range lost {
		n.log.Warn("node lost: its lease lapsed; its open session history is closed as node_lost",
			"lost_node", l.Node, "sessions", l.Sessions, "last_renewed", l.LastRenewed)
	}
}

// renew extends the lease. When the row is gone (this node was declared dead while it could
// not renew) it is written again; when another process holds it (same id), that is reported.
func (n *Node) renew(ctx context.Context) error {
	tag, err := n.s.pool.Exec(ctx, `UPDATE nodes SET renewed_at = now(), lease_until = now() + make_interval(secs => $3)
		WHERE node_id = $1 AND instance = $2::uuid`, n.opt.ID, n.instance, n.opt.Lease.Seconds())
	if err != nil {
		return fmt.Errorf("store: renew node %s: %w", n.opt.ID, err)
	}
	if tag.RowsAffected() == 1 {
		return nil
	}
	tag, err = n.s.pool.Exec(ctx, `INSERT INTO nodes (node_id, instance, addr, lease_until)
		VALUES ($1, $2::uuid, nullif($3, ''), now() + make_interval(secs => $4))
		ON CONFLICT (node_id) DO NOTHING`, n.opt.ID, n.instance, n.opt.Addr, n.opt.Lease.Seconds())
	if err != nil {
		return fmt.Errorf("store: register node %s again: %w", n.opt.ID, err)
	}
	if tag.RowsAffected() == 0 {
		return fmt.Errorf("store: node %s: its row belongs to another process: two processes run with the same node id", n.opt.ID)
	}
	n.log.Warn("node lease had lapsed and was taken again: a surviving node may have closed this node's open session history as node_lost",
		"node", n.opt.ID)
	return nil
}

// LostNode is a dead node whose history ReapDead closed.
type LostNode struct {
	Node        string
	LastRenewed time.Time
	Sessions    int64 // open session_history rows closed as node_lost
}

// ReapDead closes the open session_history rows of every other node whose lease lapsed, as
// ended at the node's last renewal (or at their connect, when later) with reason node_lost,
// and deletes those nodes' rows. Exactly one of several nodes running it at once handles each
// dead node: the transaction takes the dead rows FOR UPDATE SKIP LOCKED, so the others skip
// what it holds, and once it commits the rows are gone. With no lease lapsed (nearly always)
// it costs one read of the nodes table.
func (n *Node) ReapDead(ctx context.Context) ([]LostNode, error) {
	var some bool
	if err := n.s.pool.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM nodes WHERE lease_until < now() AND node_id <> $1)`,
		n.opt.ID).Scan(&some); err != nil {
		return nil, fmt.Errorf("store: look for dead nodes: %w", err)
	}
	if !some {
		return nil, nil
	}
	var lost []LostNode
	err := pgx.BeginFunc(ctx, n.s.pool, func(tx pgx.Tx) error {
		lost = lost[:0]
		rows, err := tx.Query(ctx, `SELECT node_id, renewed_at FROM nodes WHERE lease_until < now() AND node_id <> $1
			ORDER BY node_id FOR UPDATE SKIP LOCKED`, n.opt.ID)
		if err != nil {
			return err
		}
		lost, err = pgx.CollectRows(rows, func(r pgx.CollectableRow) (LostNode, error) {
			var l LostNode
			return l, r.Scan(&l.Node, &l.LastRenewed)
		})
		if err != nil {
			return err
		}
		// One statement per dead node (they are few): each finds its rows by
		// session_history_node_open.
		for i := range lost {
			tag, err := tx.Exec(ctx, `UPDATE session_history SET ended_at = greatest(connected_at, $2), end_reason = $3
				WHERE node_id = $1 AND ended_at IS NULL`, lost[i].Node, lost[i].LastRenewed, EndNodeLost)
			if err != nil {
				return err
			}
			lost[i].Sessions = tag.RowsAffected()
			if _, err := tx.Exec(ctx, `DELETE FROM nodes WHERE node_id = $1`, lost[i].Node); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("store: close the history of dead nodes: %w", err)
	}
	return lost, nil
}

// Drain marks the node draining (it is shutting down and serves only its grace period).
func (n *Node) Drain(ctx context.Context) error {
	if _, err := n.s.pool.Exec(ctx, `UPDATE nodes SET draining = true WHERE node_id = $1 AND instance = $2::uuid`,
		n.opt.ID, n.instance); err != nil {
		return fmt.Errorf("store: mark node %s draining: %w", n.opt.ID, err)
	}
	return nil
}

// Stop ends the loop and removes the node's row (once; later calls return nil); the rows of its history still open (their
// end records were dropped) are closed as shutdown with it. Call it once the sessions have
// ended and the recorder is flushed. When the database cannot be reached the row stays, and
// a surviving node closes what is left as node_lost once the lease lapses.
func (n *Node) Stop(ctx context.Context) error {
	n.stopOnce.Do(func() { close(n.stop) })
	n.startOnce.Do(func() { close(n.done) }) // never started: no loop to wait for
	select {
	case <-n.done:
	case <-ctx.Done():
		return fmt.Errorf("store: stop node %s: %w", n.opt.ID, ctx.Err())
	}
	n.removeMu.Lock()
	defer n.removeMu.Unlock()
	if n.removed {
		return nil
	}
	_, err := n.s.pool.Exec(ctx, `
		WITH gone AS (DELETE FROM nodes WHERE node_id = $1 AND instance = $2::uuid RETURNING node_id)
		UPDATE session_history s SET ended_at = now(), end_reason = $3
		FROM gone WHERE s.node_id = gone.node_id AND s.ended_at IS NULL`, n.opt.ID, n.instance, endShutdown)
	if err != nil {
		return fmt.Errorf("store: remove node %s: %w", n.opt.ID, err)
	}
	n.removed = true
	return nil
}
