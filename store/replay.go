package store

import (
	"context"
	"fmt"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"
)

// Replays of concurrent connects are combined into one statement (a batcher
// of replaySlots slots): a connect storm or a mass reconnect would otherwise
// send one query per client.

// DefaultReplayMaxBytes is the byte bound of Replay when the caller passes maxBytes <= 0.
const DefaultReplayMaxBytes = 4 << 20

const (
	replaySlots    = 4
	replayBatchMax = 256
	replayTimeout  = 10 * time.Second
)

// replayBatchSQL returns, per request (r.i), the user's unread count and the
// unread, unexpired rows above the cursor in seq order, cut by count (lim, the
// caller's limit) and by bytes (max_bytes); a request with no rows comes back
// once with NULL row columns. One statement reads one snapshot, so the rows
// and the count agree.
//
// The byte cut: a row's size is the length of its data as JSON text, and a
// row is kept (keep) when it is among the first lim and the sizes of the rows
// up to and including it add up to at most max_bytes; the first row is always
// kept, so a replay makes progress even past a bound smaller than one row.
// Rows are kept in seq order until the first that is not, so the kept ones
// are a prefix: nothing is skipped. The statement also returns the first row
// that is not kept, without its data, to tell the caller that the replay was
// cut; no later row leaves Postgres.
const replayBatchSQL = `SELECT r.i, c.unread, b.keep, b.id::text, b.user_id, b.seq, b.topic,
	CASE WHEN b.keep THEN b.data END, b.created_at, b.read_at, b.expires_at
FROM unnest($1::text[], $2::bigint[], $3::int[], $4::bigint[]) WITH ORDINALITY AS r(user_id, after, lim, max_bytes, i)
CROSS JOIN LATERAL (SELECT count(*) AS unread FROM notifications n
	WHERE n.user_id = r.user_id AND n.read_at IS NULL AND ` + unexpired + `) c
LEFT JOIN LATERAL (
	SELECT w.*, w.rn <= r.lim AND (w.rn = 1 OR w.run <= r.max_bytes) AS keep
	FROM (SELECT n.*, row_number() OVER o AS rn, sum(n.len) OVER o AS run
		FROM (SELECT n.*, octet_length(n.data::text) AS len FROM notifications n
			WHERE n.user_id = r.user_id AND n.seq > r.after AND n.read_at IS NULL AND ` + unexpired + `
			ORDER BY n.seq LIMIT r.lim + 1) n
		WINDOW o AS (ORDER BY n.seq ROWS UNBOUNDED PRECEDING)) w
	WHERE w.run - w.len <= r.max_bytes OR w.rn <= 2) b ON true
ORDER BY r.i, b.seq`

// replayReq is one queued Replay call; it is completed once ns, unread,
// truncated and err are set.
type replayReq struct {
	batchItem
	user      string
	after     int64
	limit     int
	maxBytes  int
	ns        []Notification
	unread    int64
	truncated bool
	err       error
}

// replayQueue batches the Replay requests and gates them per user.
type replayQueue struct {
	batch *batcher[*replayReq]
	users userGate
}

func newReplayQueue(s *Store) replayQueue {
	return replayQueue{batch: newBatcher(replaySlots, replayBatchMax, s.replayBatch),
		users: userGate{per: MaxReplaysPerUser}}
}

// Replay returns the user's unread, unexpired notifications with seq > after, oldest first:
// at most limit of them (DefaultReplayLimit when limit <= 0) and at most maxBytes of data
// (DefaultReplayMaxBytes when maxBytes <= 0; the first one always, however large). unread is
// the user's total unread count and truncated reports that more such notifications were
// left out: they all have seqs above the last one returned. The rows and the count come from
// one statement, which concurrent Replay calls share (see replayBatchSQL).
//
// At most MaxReplaysPerUser calls for one user run at once; others wait for their turn
// until ctx ends, and then fail with ctx's error.
func (s *Store) Replay(ctx context.Context, user string, after int64, limit, maxBytes int) (ns []Notification, unread int64, truncated bool, err error) {
	if limit <= 0 {
		limit = DefaultReplayLimit
	}
	if maxBytes <= 0 {
		maxBytes = DefaultReplayMaxBytes
	}
	release, err := s.replays.users.acquire(ctx, user)
	if err != nil {
		return nil, 0, false, fmt.Errorf("store: replay %q after %d: waiting for the user's other replays: %w", user, after, err)
	}
	defer release()
	r := &replayReq{batchItem: newBatchItem(), user: user, after: after, limit: limit, maxBytes: maxBytes}
	if err := s.replays.batch.do(ctx, r); err != nil {
		return nil, 0, false, fmt.Errorf("store: replay %q after %d: %w", user, after, err)
	}
	if r.err != nil {
		return nil, 0, false, fmt.Errorf("store: replay %q after %d: %w", user, after, r.err)
	}
	return r.ns, r.unread, r.truncated, nil
}

// replayBatch runs one statement for batch and sets every request's results.
func (s *Store) replayBatch(batch []*replayReq) {
	users := make([]string, len(batch))
	afters := make([]int64, len(batch))
	limits := make([]int32, len(batch))
	maxBytes := make([]int64, len(batch))
	for i, r := range batch {
		users[i], afters[i], limits[i], maxBytes[i] = r.user, r.after, int32(min(r.limit, 1<<30)), int64(r.maxBytes)
	}
	ctx, cancel := context.WithTimeout(context.Background(), replayTimeout)
	defer cancel()
	err := s.scanReplays(ctx, batch, users, afters, limits, maxBytes)
	if err != nil {
		for _, r := range batch {
			r.ns, r.unread, r.truncated, r.err = nil, 0, false, err
		}
	}
}

func (s *Store) scanReplays(ctx context.Context, batch []*replayReq, args ...any) error {
	s.stats.replayStatements.Add(1)
	return queryGeneric(ctx, s.pool, func(rows pgx.Rows) error { return scanReplayRows(rows, batch) }, replayBatchSQL, args...)
}

// scanReplayRows hands the rows of replayBatchSQL to the requests of batch.
func scanReplayRows(rows pgx.Rows, batch []*replayReq) error {
	for rows.Next() {
		var (
			i      int64
			unread int64
			keep   *bool
			id     *string
			n      Notification
			user   *string
			seq    *int64
			topic  *string
			data   []byte
			at     *time.Time
		)
		if err := rows.Scan(&i, &unread, &keep, &id, &user, &seq, &topic, &data, &at, &n.ReadAt, &n.ExpiresAt); err != nil {
			return err
		}
		if i < 1 || int(i) > len(batch) {
			return fmt.Errorf("replay row for request %d of %d", i, len(batch))
		}
		r := batch[i-1]
		r.unread = unread
		switch {
		case id == nil:
			continue // no rows for this request
		case keep == nil || !*keep:
			r.truncated = true // the first row past the bounds: it only says there is more
			continue
		}
		n.ID, n.UserID, n.Seq, n.Topic, n.Data, n.CreatedAt = *id, *user, *seq, *topic, data, *at
		r.ns = append(r.ns, n)
	}
	return rows.Err()
}

// MaxReplaysPerUser is how many Replay calls of one user run at once. A user's
// devices reconnecting together take turns rather than each holding a backlog
// in memory at the same moment.
const MaxReplaysPerUser = 2

// userGate lets at most per holders of one key in at once. Keys with no
// holder and no waiter take no memory.
type userGate struct {
	per   int
	mu    sync.Mutex
	users map[string]*userSlots
}

// userSlots is one key's semaphore; refs counts its holders and waiters.
type userSlots struct {
	sem  chan struct{}
	refs int
}

// acquire waits until user has a free slot or ctx ends. The caller calls
// release exactly once when done.
func (g *userGate) acquire(ctx context.Context, user string) (release func(), err error) {
	g.mu.Lock()
	if g.users == nil {
		g.users = make(map[string]*userSlots)
	}
	u := g.users[user]
	if u == nil {
		u = &userSlots{sem: make(chan struct{}, g.per)}
		g.users[user] = u
	}
	u.refs++
	g.mu.Unlock()
	select {
	case u.sem <- struct{}{}:
		return func() { <-u.sem; g.leave(user, u) }, nil
	case <-ctx.Done():
		g.leave(user, u)
		return nil, ctx.Err()
	}
}

func (g *userGate) leave(user string, u *userSlots) {
	g.mu.Lock()
	if u.refs--; u.refs == 0 {
		delete(g.users, user)
	}
	g.mu.Unlock()
}
