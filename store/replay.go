package store

import (
	"context"
	"fmt"
	"time"
)

// Replays of concurrent connects are combined into one statement: a connect
// storm or a mass reconnect would otherwise send one query per client and
// queue for pool connections, while Postgres spends its time on per-statement
// overhead rather than rows. Replay queues its request; whoever holds one of
// replaySlots runs everything queued (up to replayBatchMax) in one statement
// and hands each caller its rows. A lone connect finds a free slot and runs
// its own request at once, so batching adds no wait when it is quiet.
const (
	replaySlots    = 4
	replayBatchMax = 256
	replayTimeout  = 10 * time.Second
)

// replayBatchSQL returns, per request (r.i), the user's unread count and the
// unread, unexpired rows above the cursor, at most lim of them, in seq order;
// a request with no rows comes back once with NULL row columns. One statement
// reads one snapshot, so the rows and the count agree.
const replayBatchSQL = `SELECT r.i, c.unread, ` + notificationCols + `
FROM unnest($1::text[], $2::bigint[], $3::int[]) WITH ORDINALITY AS r(user_id, after, lim, i)
CROSS JOIN LATERAL (SELECT count(*) AS unread FROM notifications n
	WHERE n.user_id = r.user_id AND n.read_at IS NULL AND ` + unexpired + `) c
LEFT JOIN LATERAL (SELECT * FROM notifications n
	WHERE n.user_id = r.user_id AND n.seq > r.after AND n.read_at IS NULL AND ` + unexpired + `
	ORDER BY n.seq LIMIT r.lim) n ON true
ORDER BY r.i, n.seq`

// replayReq is one queued Replay call; done is closed once ns, unread and err are set.
type replayReq struct {
	user   string
	after  int64
	limit  int // rows asked for: the caller's limit plus one, to tell truncation
	ns     []Notification
	unread int64
	err    error
	done   chan struct{}
}

// replayQueue holds the Replay requests not yet taken by a batch.
type replayQueue struct {
	slots   chan struct{}
	pending chan *replayReq
}

func newReplayQueue() replayQueue {
	return replayQueue{slots: make(chan struct{}, replaySlots), pending: make(chan *replayReq, 16*replayBatchMax)}
}

// Replay returns the user's unread, unexpired notifications with seq > after, oldest first,
// at most limit (DefaultReplayLimit when limit <= 0); unread is the user's total unread count
// and truncated reports that more such notifications were left out. The rows and the count
// come from one statement, which concurrent Replay calls share (see replayBatchSQL).
func (s *Store) Replay(ctx context.Context, user string, after int64, limit int) (ns []Notification, unread int64, truncated bool, err error) {
	if limit <= 0 {
		limit = DefaultReplayLimit
	}
	r := &replayReq{user: user, after: after, limit: limit + 1, done: make(chan struct{})}
	select {
	case s.replays.pending <- r:
	case <-ctx.Done():
		return nil, 0, false, fmt.Errorf("store: replay %q after %d: %w", user, after, ctx.Err())
	}
	for {
		select {
		case <-r.done:
			if r.err != nil {
				return nil, 0, false, fmt.Errorf("store: replay %q after %d: %w", user, after, r.err)
			}
			ns = r.ns
			if len(ns) > limit {
				ns, truncated = ns[:limit], true
			}
			return ns, r.unread, truncated, nil
		case s.replays.slots <- struct{}{}:
			batch := s.takeReplays()
			if len(batch) > 0 {
				s.replayBatch(batch)
			}
			<-s.replays.slots
			if len(batch) == 0 {
				// r is in a batch that another caller is running.
				select {
				case <-r.done:
				case <-ctx.Done():
				}
			}
		case <-ctx.Done():
			// r stays queued or in flight; whoever runs it drops the result.
			return nil, 0, false, fmt.Errorf("store: replay %q after %d: %w", user, after, ctx.Err())
		}
	}
}

// takeReplays removes up to replayBatchMax queued requests.
func (s *Store) takeReplays() []*replayReq {
	var batch []*replayReq
	for len(batch) < replayBatchMax {
		select {
		case r := <-s.replays.pending:
			batch = append(batch, r)
		default:
			return batch
		}
	}
	return batch
}

// replayBatch runs one statement for batch and completes every request in it.
// It is detached from the callers' contexts: one caller giving up must not
// fail the others.
func (s *Store) replayBatch(batch []*replayReq) {
	users := make([]string, len(batch))
	afters := make([]int64, len(batch))
	limits := make([]int32, len(batch))
	for i, r := range batch {
		users[i], afters[i], limits[i] = r.user, r.after, int32(min(r.limit, 1<<30))
	}
	ctx, cancel := context.WithTimeout(context.Background(), replayTimeout)
	defer cancel()
	err := s.scanReplays(ctx, batch, users, afters, limits)
	for _, r := range batch {
		if err != nil {
			r.ns, r.unread, r.err = nil, 0, err
		}
		close(r.done)
	}
}

func (s *Store) scanReplays(ctx context.Context, batch []*replayReq, args ...any) error {
	s.stats.replayStatements.Add(1)
	rows, err := s.pool.Query(ctx, replayBatchSQL, args...)
	if err != nil {
		return err
	}
	defer rows.Close()
	for rows.Next() {
		var (
			i      int64
			unread int64
			id     *string
			n      Notification
			user   *string
			seq    *int64
			topic  *string
			data   []byte
			at     *time.Time
		)
		if err := rows.Scan(&i, &unread, &id, &user, &seq, &topic, &data, &at, &n.ReadAt, &n.ExpiresAt); err != nil {
			return err
		}
		if i < 1 || int(i) > len(batch) {
			return fmt.Errorf("replay row for request %d of %d", i, len(batch))
		}
		r := batch[i-1]
		r.unread = unread
		if id == nil {
			continue // no rows for this request
		}
		n.ID, n.UserID, n.Seq, n.Topic, n.Data, n.CreatedAt = *id, *user, *seq, *topic, data, *at
		r.ns = append(r.ns, n)
	}
	return rows.Err()
}
