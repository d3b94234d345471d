package store

import (
	"context"
	"fmt"
	"slices"
	"strings"
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
	// counts batches CountElsewhere: a connect storm asks once per connect.
	counts *batcher[*countReq]

	statsMu  sync.Mutex // one stats query at a time; guards the cache below
	statsAt  time.Time
	statsVal ClusterStats
}

// statsMaxAge is how long a ClusterStats answer is reused: the dashboard asks every second on
// every open tab, and the answer reads every open row of the cluster.
const statsMaxAge = time.Second

// Presence returns the cluster-wide presence seen from this node.
func (n *Node) Presence() *Presence {
	p := &Presence{s: n.s, node: n}
	p.counts = newBatcher(countSlots, countBatchMax, p.countBatch)
	return p
}

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
// the cluster part of the per-user session cap, asked on a connect's path: concurrent calls
// share one statement (a batcher), which reads each user's open rows through the index
// session_history_user_open.
func (p *Presence) CountElsewhere(ctx context.Context, user, except string) (int, error) {
	r := &countReq{batchItem: newBatchItem(), user: user, except: except}
	err := p.counts.do(ctx, r)
	if err == nil {
		err = r.err
	}
	if err != nil {
		return 0, DBError("store: count the sessions of "+user+" on other nodes", err)
	}
	return r.n, nil
}

const (
	countSlots    = 2
	countBatchMax = 256
	countTimeout  = 2 * time.Second // bounds each statement; past it its connects count their own node only
)

// countReq is one queued CountElsewhere call; it is completed once n or err is set.
type countReq struct {
	batchItem
	user, except string
	n            int
	err          error
}

// countElsewhereSQL counts, per request (r.i), the open rows of distinct sessions of the
// request's user on the other live nodes ($3 is this node), leaving out its except session.
const countElsewhereSQL = `SELECT r.i, (SELECT count(DISTINCT s.session_id)::int
		FROM session_history s JOIN nodes n ON n.node_id = s.node_id
		WHERE s.user_id = r.user_id AND s.ended_at IS NULL AND s.node_id <> $3 AND s.session_id <> r.skip
		  AND n.lease_until > now())
	FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS r(user_id, skip, i)`

// countBatch runs one statement for batch and sets every request's count.
func (p *Presence) countBatch(batch []*countReq) {
	users := make([]string, len(batch))
	excepts := make([]string, len(batch))
	for i, r := range batch {
		users[i], excepts[i] = r.user, r.except
	}
	ctx, cancel := context.WithTimeout(context.Background(), countTimeout)
	defer cancel()
	var i int64
	var n int
	err := queryGeneric(ctx, p.s.pool, func(rows pgx.Rows) error {
		_, err := pgx.ForEachRow(rows, []any{&i, &n}, func() error {
			if i < 1 || int(i) > len(batch) {
				return fmt.Errorf("count row for request %d of %d", i, len(batch))
			}
			batch[i-1].n = n
			return nil
		})
		return err
	}, countElsewhereSQL, users, excepts, p.node.ID())
	if err != nil {
		for _, r := range batch {
			r.n, r.err = 0, err
		}
	}
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
// It reads every open row of the cluster in one statement of hash aggregates (57-85 ms for
// 100,000 open sessions of 10 nodes on a shared 2-core machine, BenchmarkPresenceStats; a
// count(DISTINCT) per node and transport sorts them on disk and took 860 ms), so an answer is
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

// statsQuery answers rows of (kind, node, transport, count): a 'node' row per other live node
// with its distinct users (0 without sessions), a 'transport' row per other node and transport
// with its sessions, and one 'remote' and one 'shared' row (see ClusterStats). open holds one
// row per node, user and transport; node_users one per node and user.
const statsQuery = `
	WITH open AS MATERIALIZED (
		SELECT s.node_id, s.user_id, s.transport, count(*) AS n
		FROM session_history s JOIN nodes l ON l.node_id = s.node_id
		WHERE s.ended_at IS NULL AND l.lease_until > now()
		GROUP BY 1, 2, 3
	), node_users AS (
		SELECT node_id, user_id FROM open GROUP BY 1, 2
	), spread AS (
		SELECT bool_or(node_id = $1) AS here, bool_or(node_id <> $1) AS there FROM node_users GROUP BY user_id
	)
	SELECT 'node', l.node_id, l.draining, NULL::text, coalesce(u.users, 0)
	FROM nodes l LEFT JOIN (SELECT node_id, count(*) AS users FROM node_users GROUP BY 1) u ON u.node_id = l.node_id
	WHERE l.lease_until > now() AND l.node_id <> $1
	UNION ALL
	SELECT 'transport', node_id, false, transport, sum(n)::bigint FROM open WHERE node_id <> $1 GROUP BY 2, 4
	UNION ALL
	SELECT 'remote', NULL, false, NULL, count(*) FILTER (WHERE there) FROM spread
	UNION ALL
	SELECT 'shared', NULL, false, NULL, count(*) FILTER (WHERE here AND there) FROM spread`

func (p *Presence) readStats(ctx context.Context) (ClusterStats, error) {
	var st ClusterStats
	rows, err := p.s.pool.Query(ctx, statsQuery, p.node.ID())
	if err != nil {
		return st, DBError("store: read the other nodes' sessions", err)
	}
	byNode := map[string]*NodeLoad{}
	var sessions []struct {
		node, transport string
		n               int64
	}
	var (
		kind      string
		node      *string
		draining  bool
		transport *string
		n         int64
	)
	_, err = pgx.ForEachRow(rows, []any{&kind, &node, &draining, &transport, &n}, func() error {
		switch kind {
		case "node":
			byNode[*node] = &NodeLoad{Node: *node, Draining: draining, Users: n, ByTransport: map[string]int64{}}
		case "transport":
			sessions = append(sessions, struct {
				node, transport string
				n               int64
			}{*node, *transport, n})
		case "remote":
			st.RemoteUsers = n
		case "shared":
			st.SharedUsers = n
		}
		return nil
	})
	if err != nil {
		return st, DBError("store: read the other nodes' sessions", err)
	}
	for _, s := range sessions {
		if l := byNode[s.node]; l != nil {
			l.ByTransport[s.transport] += s.n
			l.Sessions += s.n
		}
	}
	for _, l := range byNode {
		st.Nodes = append(st.Nodes, *l)
	}
	slices.SortFunc(st.Nodes, func(x, y NodeLoad) int { return strings.Compare(x.Node, y.Node) })
	return st, nil
}
