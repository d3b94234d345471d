package store

import (
	"context"
	"fmt"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"
)

// Presence answers cluster-wide presence for one node from Postgres: the open session_history
// rows (ended_at IS NULL) of the other nodes whose lease runs. This node's own sessions are not
// read back: its hub has them in memory, at once, while their rows reach Postgres only with the
// recorder's next flush; the caller merges the two. So a session is visible on its own node at
// once and on the others after that flush (RecorderOptions.FlushEvery, 200 ms by default, plus
// the flush's own time). A dead node's sessions leave the answers the moment its lease lapses,
// before a survivor closes their rows as node_lost. Nothing here writes: an idle session costs
// Postgres nothing.
type Presence struct {
	s    *Store
	node *Node

	statsMu  sync.Mutex // one stats query at a time; guards the cache below
	statsAt  time.Time
	statsVal ClusterStats
}

// statsMaxAge is how long a ClusterStats answer is reused: the dashboard asks every second on
// every open tab, and the answer reads every open row of the cluster.
const statsMaxAge = time.Second

// Presence returns the cluster-wide presence seen from this node.
func (n *Node) Presence() *Presence { return &Presence{s: n.s, node: n} }

// Node is this node's id (its own sessions are the caller's to add).
func (p *Presence) Node() string { return p.node.ID() }

// OthersLive reports whether another node held a running lease at the node loop's last look
// (every RenewEvery; true until the first look). When it is false the cluster is this node
// alone and the queries below are skipped by callers that can do without them.
func (p *Presence) OthersLive() bool { return p.node.peers.Load() != 0 }

// refreshPeers counts the other nodes with a running lease for OthersLive; the node's loop
// calls it after each renewal. On an error the last count stays.
func (n *Node) refreshPeers(ctx context.Context) error {
	var others int32
	if err := n.s.pool.QueryRow(ctx, `SELECT count(*)::int FROM nodes WHERE lease_until > now() AND node_id <> $1`,
		n.opt.ID).Scan(&others); err != nil {
		return fmt.Errorf("store: count the live nodes: %w", err)
	}
	n.peers.Store(others)
	return nil
}

// CountElsewhere is how many open sessions user has on the other live nodes, each session id
// once (a session resumed from one node to another may have both rows open for a flush), and
// not counting the session except (the one a connect resumes, which the resume ends). It is
// the cluster part of the per-user session cap: one indexed read
// (session_history_user_open) of the user's open rows.
func (p *Presence) CountElsewhere(ctx context.Context, user, except string) (int, error) {
	var n int
	err := p.s.pool.QueryRow(ctx, `SELECT count(DISTINCT s.session_id)::int
		FROM session_history s JOIN nodes n ON n.node_id = s.node_id
		WHERE s.user_id = $1 AND s.ended_at IS NULL AND s.node_id <> $2 AND s.session_id <> $3
		  AND n.lease_until > now()`, user, p.node.ID(), except).Scan(&n)
	if err != nil {
		return 0, DBError("store: count the sessions of "+user+" on other nodes", err)
	}
	return n, nil
}

// RemoteSession is an open session of another live node, as its session_history row has it.
type RemoteSession struct {
	ID          string
	User        string
	Device      string
	Transport   string
	RemoteAddr  string
	UserAgent   string
	ConnectedAt time.Time
	// LastSeenAt is NULL in the row while the session lives (it is written at its end): nil.
	LastSeenAt *time.Time
	Node       string
}

const remoteSessionColumns = `s.session_id, s.user_id, s.device, s.transport, coalesce(s.remote_addr, ''),
	coalesce(s.user_agent, ''), s.connected_at, s.last_seen_at, s.node_id`

func scanRemoteSessions(rows pgx.Rows) ([]RemoteSession, error) {
	var out []RemoteSession
	seen := map[string]bool{}
	var r RemoteSession
	_, err := pgx.ForEachRow(rows, []any{&r.ID, &r.User, &r.Device, &r.Transport, &r.RemoteAddr, &r.UserAgent,
		&r.ConnectedAt, &r.LastSeenAt, &r.Node}, func() error {
		// Newest first: of two open rows of one session id (a resume across nodes whose old
		// row's end is not flushed yet) the newer one is where the session lives.
		if !seen[r.ID] {
			seen[r.ID] = true
			out = append(out, r)
		}
		return nil
	})
	return out, err
}

// UserSessions lists the open sessions of user on the other live nodes, newest first, each
// session id once.
func (p *Presence) UserSessions(ctx context.Context, user string) ([]RemoteSession, error) {
	rows, err := p.s.pool.Query(ctx, `SELECT `+remoteSessionColumns+`
		FROM session_history s JOIN nodes n ON n.node_id = s.node_id
		WHERE s.user_id = $1 AND s.ended_at IS NULL AND s.node_id <> $2 AND n.lease_until > now()
		ORDER BY s.connected_at DESC`, user, p.node.ID())
	if err != nil {
		return nil, DBError("store: list the sessions of "+user+" on other nodes", err)
	}
	out, err := scanRemoteSessions(rows)
	if err != nil {
		return nil, DBError("store: list the sessions of "+user+" on other nodes", err)
	}
	return out, nil
}

// Recent lists the newest limit open sessions of the other live nodes, newest first.
func (p *Presence) Recent(ctx context.Context, limit int) ([]RemoteSession, error) {
	rows, err := p.s.pool.Query(ctx, `SELECT `+remoteSessionColumns+`
		FROM session_history s JOIN nodes n ON n.node_id = s.node_id
		WHERE s.ended_at IS NULL AND s.node_id <> $1 AND n.lease_until > now()
		ORDER BY s.connected_at DESC LIMIT $2`, p.node.ID(), limit)
	if err != nil {
		return nil, DBError("store: list the recent sessions of other nodes", err)
	}
	out, err := scanRemoteSessions(rows)
	if err != nil {
		return nil, DBError("store: list the recent sessions of other nodes", err)
	}
	return out, nil
}

// NodeLoad is one live node's open sessions.
type NodeLoad struct {
	Node        string
	Draining    bool
	Sessions    int64
	Users       int64
	ByTransport map[string]int64
}

// ClusterStats are the other live nodes' open sessions.
type ClusterStats struct {
	// Nodes are the other nodes with a running lease, by id (one without sessions too).
	Nodes []NodeLoad
	// RemoteUsers counts the users with an open session on another live node, each once.
	RemoteUsers int64
	// SharedUsers counts those of them who also have an open row of this node: this node's
	// users plus RemoteUsers minus SharedUsers is the cluster's users (exact but for this
	// node's rows, which trail its memory by a recorder flush).
	SharedUsers int64
}

// Stats reads the other live nodes' open sessions: per node, and the cluster's distinct users.
// It reads every open row of the cluster (two statements in one round trip), so an answer is
// reused for a second (statsMaxAge).
func (p *Presence) Stats(ctx context.Context) (ClusterStats, error) {
	p.statsMu.Lock()
	defer p.statsMu.Unlock()
	if !p.statsAt.IsZero() && time.Since(p.statsAt) < statsMaxAge {
		return p.statsVal, nil
	}
	st, err := p.readStats(ctx)
	if err != nil {
		return ClusterStats{}, err
	}
	p.statsAt, p.statsVal = time.Now(), st
	return st, nil
}

func (p *Presence) readStats(ctx context.Context) (ClusterStats, error) {
	var st ClusterStats
	b := &pgx.Batch{}
	// Per node and transport, with a per-node row of distinct users (transport NULL); a node
	// without sessions has one row with NULL transport and zero counts.
	b.Queue(`SELECT n.node_id, n.draining, s.transport, count(s.session_id), count(DISTINCT s.user_id)
		FROM nodes n LEFT JOIN session_history s ON s.node_id = n.node_id AND s.ended_at IS NULL
		WHERE n.lease_until > now() AND n.node_id <> $1
		GROUP BY GROUPING SETS ((n.node_id, n.draining), (n.node_id, n.draining, s.transport))
		ORDER BY n.node_id`, p.node.ID())
	b.Queue(`SELECT count(*) FILTER (WHERE there), count(*) FILTER (WHERE here AND there)
		FROM (SELECT bool_or(s.node_id = $1) AS here, bool_or(s.node_id <> $1) AS there
		      FROM session_history s JOIN nodes n ON n.node_id = s.node_id
		      WHERE s.ended_at IS NULL AND n.lease_until > now()
		      GROUP BY s.user_id) u`, p.node.ID())
	br := p.s.pool.SendBatch(ctx, b)
	defer br.Close()
	rows, err := br.Query()
	if err != nil {
		return st, DBError("store: read the other nodes' sessions", err)
	}
	var (
		node      string
		draining  bool
		transport *string
		sessions  int64
		users     int64
	)
	_, err = pgx.ForEachRow(rows, []any{&node, &draining, &transport, &sessions, &users}, func() error {
		if len(st.Nodes) == 0 || st.Nodes[len(st.Nodes)-1].Node != node {
			st.Nodes = append(st.Nodes, NodeLoad{Node: node, Draining: draining, ByTransport: map[string]int64{}})
		}
		l := &st.Nodes[len(st.Nodes)-1]
		if transport == nil {
			// The per-node row, or the LEFT JOIN's row of a node without sessions (whose
			// counts are zero either way).
			if users > l.Users {
				l.Users = users
			}
			return nil
		}
		l.ByTransport[*transport] += sessions
		l.Sessions += sessions
		return nil
	})
	if err != nil {
		return st, DBError("store: read the other nodes' sessions", err)
	}
	if err := br.QueryRow().Scan(&st.RemoteUsers, &st.SharedUsers); err != nil {
		return st, DBError("store: count the cluster's users", err)
	}
	return st, nil
}
