package store

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"slices"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgerrcode"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

// maxPublishAttempts bounds the retries of a publish statement that lost a race
// (a concurrent duplicate idempotency key gives 23505) or a deadlock.
const maxPublishAttempts = 5

// NewNotification is one notification to store.
type NewNotification struct {
	// UserID is the recipient (required).
	UserID string
	// Topic is the application's name for the kind of notification (required).
	Topic string
	// Data is a JSON value; empty means {}.
	Data json.RawMessage
	// IdempotencyKey, when not empty, makes a repeat of (UserID, IdempotencyKey) return the
	// first result instead of storing a new row.
	IdempotencyKey string
	// ExpiresAt, when set, hides the notification from replay, inbox and unread counts after it.
	ExpiresAt *time.Time
}

// Notification is a stored notification.
type Notification struct {
	ID        string
	UserID    string
	Seq       int64
	Topic     string
	Data      json.RawMessage
	CreatedAt time.Time
	ReadAt    *time.Time
	ExpiresAt *time.Time
}

// Published is the outcome of storing one NewNotification.
type Published struct {
	ID        string
	UserID    string
	Seq       int64
	CreatedAt time.Time
	// Duplicate reports that the idempotency key was seen before: the other fields are those
	// of the first notification stored with it, and nothing new was stored.
	Duplicate bool
}

// validate returns what is wrong with n as an EINVALID error, its message starting with
// "notification <at>: " when at >= 0; checkData says whether to check its data too.
func validate(n *NewNotification, checkData bool, at int) error {
	var msg string
	switch {
	case n.UserID == "":
		msg = "empty user id"
	case n.Topic == "":
		msg = "empty topic"
	case checkData && len(n.Data) > 0 && !json.Valid(n.Data):
		msg = "data is not valid JSON"
	default:
		return nil
	}
	if at >= 0 {
		msg = fmt.Sprintf("notification %d: %s", at, msg)
	}
	return Errorf(EINVALID, msg)
}

// publishSQL stores a batch in one statement (so one transaction and one NOTIFY). Rows whose
// (user_id, idempotency_key) exists already are not inserted but returned from the existing row
// with dup = true. Each distinct data is sent once ($4) and rows name theirs by its place in
// it ($7, from 1): a fan-out's rows share one data, so its statement is the size of one data
// and not of one per recipient.
//
// Seqs are assigned here, set-based, not by the per-row trigger (which steps aside once
// seqsAssignedSQL ran in the transaction, see migrations/004): one upsert adds each user's row
// count to the user's counter and returns the new last_seq, and a row's seq is last_seq - count
// + its rank among the user's rows (input order). The upsert locks the counter rows in user_id
// order, held until commit, so concurrent batches cannot deadlock, a user's notifications commit
// in seq order, and a rollback gives the seqs back.
const publishSQL = `
WITH input AS (
	SELECT t.id::uuid AS id, t.user_id, t.topic, ($4::text[])[t.data_at]::jsonb AS data, t.ikey, t.expires_at, t.ord
	FROM unnest($1::text[], $2::text[], $3::text[], $7::int[], $5::text[], $6::timestamptz[])
		WITH ORDINALITY AS t(id, user_id, topic, data_at, ikey, expires_at, ord)
), dup AS (
	-- A lookup per keyed row (LATERAL ... LIMIT 1 is never turned into a hash join, which a
	-- plan cached while notifications was small would keep, scanning the whole table).
	SELECT i.id AS req_id, n.id, n.seq, n.created_at
	FROM input i
	CROSS JOIN LATERAL (
		SELECT n.id, n.seq, n.created_at FROM notifications n
		WHERE n.user_id = i.user_id AND n.idempotency_key = i.ikey
		LIMIT 1
	) n
	WHERE i.ikey IS NOT NULL
), fresh AS (
	SELECT i.*, row_number() OVER w AS rank, count(*) OVER w AS n
	FROM input i
	WHERE NOT EXISTS (SELECT 1 FROM dup d WHERE d.req_id = i.id)
	WINDOW w AS (PARTITION BY i.user_id ORDER BY i.ord ROWS BETWEEN UNBOUNDED PRECEDING AND UNBOUNDED FOLLOWING)
), counters AS (
	INSERT INTO user_seqs AS s (user_id, last_seq)
	SELECT f.user_id, f.n FROM fresh f WHERE f.rank = 1 ORDER BY f.user_id
	ON CONFLICT (user_id) DO UPDATE SET last_seq = s.last_seq + EXCLUDED.last_seq
	RETURNING s.user_id, s.last_seq
), ins AS (
	INSERT INTO notifications (id, user_id, seq, topic, data, idempotency_key, expires_at)
	SELECT f.id, f.user_id, c.last_seq - f.n + f.rank, f.topic, f.data, f.ikey, f.expires_at
	FROM fresh f JOIN counters c ON c.user_id = f.user_id
	RETURNING id, seq, created_at
)
SELECT req_id::text, id::text, seq, created_at, true FROM dup
UNION ALL
SELECT id::text, id::text, seq, created_at, false FROM ins`

// seqsAssignedSQL tells the per-row seq trigger that publishSQL assigns the seqs of this
// transaction's inserts (migrations/004).
const seqsAssignedSQL = `SELECT set_config('notifyd.seqs_assigned', 'on', true)`

// customPlanRows is the batch size from which publishSQL is planned for its arrays (a custom
// plan, about 0.5 ms to make) instead of taking the plan Postgres caches after a few
// executions. That generic plan estimates the batch's rows at a handful and joins them to
// their counters by a nested loop: a million string comparisons for 1,000 rows, but only a few
// thousand, cheaper than planning, for the groups of single publishes.
const customPlanRows = 128

// customPlanSQL makes the transaction's statements be planned for their parameters.
const customPlanSQL = `SELECT set_config('plan_cache_mode', 'force_custom_plan', true)`

// Publish stores all of ns in one transaction (all or nothing) and returns their results in
// input order. Rows are inserted sorted by user id (deadlock-free against concurrent batches)
// with one INSERT ... SELECT FROM unnest statement, so one NOTIFY goes out for the batch.
// Concurrent calls share transactions as PublishOne's do (enqueue): each call still commits
// whole or not at all, since a shared transaction that fails is retried one call at a time.
//
// Idempotency: a row whose (UserID, IdempotencyKey) already exists, or repeats an earlier row
// of the same batch, is not inserted and comes back with Duplicate set and the first result.
// A concurrent insert of the same key (23505) or a deadlock retries the statement, bounded.
// Errors are *Error: an invalid notification fails the whole call with EINVALID (before
// touching the database when Go can tell, else when Postgres rejects the data); EUNAVAILABLE
// means the database failed. ctx bounds the caller's wait; if it ends after the call was
// handed to a transaction, the notifications may still be stored.
func (s *Store) Publish(ctx context.Context, ns []NewNotification) ([]Published, error) {
	if len(ns) == 0 {
		return nil, nil
	}
	for i := range ns {
		// Data shared with the row before (a fan-out) was checked with it.
		shared := i > 0 && sameData(ns[i].Data, ns[i-1].Data)
		if err := validate(&ns[i], !shared, i); err != nil {
			return nil, err
		}
	}
	return s.enqueue(ctx, ns)
}

// publish is Publish for notifications that passed validate (PublishOne's, checked as each
// call came in).
func (s *Store) publish(ctx context.Context, ns []NewNotification) ([]Published, error) {

	// Sort by user (byte order, stable), drop in-batch repeats of an idempotency key.
	order := make([]int, len(ns))
	for i := range order {
		order[i] = i
	}
	slices.SortStableFunc(order, func(a, b int) int { return cmp.Compare(ns[a].UserID, ns[b].UserID) })

	type ukey struct{ user, key string }
	var (
		firstOf map[ukey]int // made for the first keyed row
		alias   map[int]int  // input index -> input index of the first row with its key
	)
	var (
		sent    []int // input indexes sent, in insertion order
		ids     = make([]string, 0, len(ns))
		users   = make([]string, 0, len(ns))
		topics  = make([]string, 0, len(ns))
		datas   []string // distinct datas, each once (see sameData)
		dataAt  = make([]int32, 0, len(ns))
		last    json.RawMessage // the data of the row before
		keys    = make([]*string, 0, len(ns))
		expires = make([]*time.Time, 0, len(ns))
	)
	for _, i := range order {
		n := &ns[i]
		var key *string
		if n.IdempotencyKey != "" {
			k := ukey{n.UserID, n.IdempotencyKey}
			if first, ok := firstOf[k]; ok {
				if alias == nil {
					alias = map[int]int{}
				}
				alias[i] = first
				continue
			}
			if firstOf == nil {
				firstOf = map[ukey]int{}
			}
			firstOf[k] = i
			key = &n.IdempotencyKey
		}
		id, err := uuid.NewV7()
		if err != nil {
			return nil, fmt.Errorf("store: publish: new id: %w", err)
		}
		if len(datas) == 0 || !sameData(n.Data, last) {
			data := "{}"
			if len(n.Data) > 0 {
				data = string(n.Data)
			}
			datas = append(datas, data)
			last = n.Data
		}
		sent = append(sent, i)
		ids = append(ids, id.String())
		users = append(users, n.UserID)
		topics = append(topics, n.Topic)
		dataAt = append(dataAt, int32(len(datas)))
		keys = append(keys, key)
		expires = append(expires, n.ExpiresAt)
	}

	var done func([]Notification)
	if h := s.hook.Load(); h != nil && *h != nil {
		done = (*h)(users)
	}
	out, err := s.publishRows(ctx, ns, sent, alias, ids, users, topics, datas, keys, expires, dataAt)
	if done == nil {
		return out, err
	}
	if err != nil {
		done(nil)
		return nil, err
	}
	committed := make([]Notification, 0, len(sent))
	for i := range ns {
		p := out[i]
		if p.Duplicate {
			continue
		}
		data := ns[i].Data
		if len(data) == 0 {
			data = emptyData
		}
		committed = append(committed, Notification{ID: p.ID, UserID: p.UserID, Seq: p.Seq, Topic: ns[i].Topic,
			Data: data, CreatedAt: p.CreatedAt, ExpiresAt: ns[i].ExpiresAt})
	}
	done(committed)
	return out, nil
}

// sameData reports whether a and b are the same bytes in memory (a fan-out's
// rows share their data): then the row's data is sent once. Rows with equal
// data in different memory are sent apart, which only costs bytes.
func sameData(a, b json.RawMessage) bool {
	return len(a) == len(b) && (len(a) == 0 || &a[0] == &b[0])
}

// emptyData is what a notification published without data holds.
var emptyData = json.RawMessage("{}")

// publishRows runs the publish statement for the rows Publish prepared, with
// bounded retries, and returns the results in input order.
func (s *Store) publishRows(ctx context.Context, ns []NewNotification, sent []int, alias map[int]int,
	ids, users, topics, datas []string, keys []*string, expires []*time.Time, dataAt []int32) ([]Published, error) {
	byID := make(map[string]Published, len(sent))
	for attempt := 1; ; attempt++ {
		clear(byID)
		err := s.publishOnce(ctx, byID, len(ids), ids, users, topics, datas, keys, expires, dataAt)
		if err == nil {
			break
		}
		what := fmt.Sprintf("store: publish %d notification(s)", len(ns))
		if _, bad := rejectedData(err); bad || attempt >= maxPublishAttempts || !retryable(err) || ctx.Err() != nil {
			return nil, DBError(what, err)
		}
		// Short jittered pause: the conflicting transaction is committing now.
		t := time.NewTimer(time.Duration(attempt) * time.Duration(1+rand.IntN(5)) * time.Millisecond)
		select {
		case <-t.C:
		case <-ctx.Done():
			t.Stop()
			return nil, ctxError(fmt.Sprintf("store: publish %d notification(s)", len(ns)), ctx)
		}
	}

	out := make([]Published, len(ns))
	for j, i := range sent {
		p, ok := byID[ids[j]]
		if !ok {
			return nil, &Error{Code: EINTERNAL, Message: "internal error", Err: fmt.Errorf("store: publish: no result for notification %d", i)}
		}
		p.UserID = ns[i].UserID
		out[i] = p
	}
	for i, first := range alias {
		out[i] = out[first]
		out[i].Duplicate = true
	}
	return out, nil
}

// publishOnce runs publishSQL once for n notifications (args are its parameters) and puts
// the results in byID.
func (s *Store) publishOnce(ctx context.Context, byID map[string]Published, n int, args ...any) error {
	s.stats.publishStatements.Add(1)
	// One round trip, one implicit transaction: the settings, then the statement.
	b := &pgx.Batch{}
	b.Queue(seqsAssignedSQL)
	if n >= customPlanRows {
		b.Queue(customPlanSQL)
	}
	b.Queue(publishSQL, args...).Query(func(rows pgx.Rows) error {
		for rows.Next() {
			var reqID string
			var p Published
			if err := rows.Scan(&reqID, &p.ID, &p.Seq, &p.CreatedAt, &p.Duplicate); err != nil {
				return err
			}
			byID[reqID] = p
		}
		return rows.Err()
	})
	return s.pool.SendBatch(ctx, b).Close()
}

func retryable(err error) bool {
	var pgErr *pgconn.PgError
	if !errors.As(err, &pgErr) {
		return false
	}
	switch pgErr.Code {
	case pgerrcode.UniqueViolation, pgerrcode.DeadlockDetected, pgerrcode.SerializationFailure:
		return true
	}
	return false
}

// pubReq is one queued Publish or PublishOne call.
type pubReq struct {
	ctx context.Context
	ns  []NewNotification
	at  time.Time   // when it was queued
	res chan pubRes // buffered(1)
}

type pubRes struct {
	ps  []Published
	err error
}

// PublishOne stores one notification: Publish of one, for the API's single publishes.
// Concurrent callers are grouped into shared transactions (group commit, see groupLoop), and
// each caller returns once its row is committed. A group that fails is retried one request at
// a time, so a bad request never fails its neighbours. ctx bounds the caller's wait; if it
// ends after the request was handed to a group, the notification may still be stored.
func (s *Store) PublishOne(ctx context.Context, n NewNotification) (Published, error) {
	if err := validate(&n, true, -1); err != nil {
		return Published{}, err
	}
	s.stats.publishOneCalls.Add(1)
	ps, err := s.enqueue(ctx, []NewNotification{n})
	if err != nil {
		return Published{}, err
	}
	return ps[0], nil
}

// enqueue hands validated notifications to groupLoop and waits for their results.
func (s *Store) enqueue(ctx context.Context, ns []NewNotification) ([]Published, error) {
	r := &pubReq{ctx: ctx, ns: ns, at: time.Now(), res: make(chan pubRes, 1)}
	s.closeMu.RLock()
	if s.closed {
		s.closeMu.RUnlock()
		return nil, ErrClosed
	}
	select {
	case s.reqs <- r:
		s.closeMu.RUnlock()
	case <-ctx.Done():
		s.closeMu.RUnlock()
		return nil, ctxError("store: publish", ctx)
	}
	select {
	case res := <-r.res:
		return res.ps, res.err
	case <-ctx.Done():
		return nil, ctxError("store: publish", ctx)
	}
}

// groupLoop forms groups of Publish and PublishOne requests and stores them one transaction
// at a time: while a group commits, requests queue up and become the next, larger group. One
// at a time because commits that sent a NOTIFY run one at a time anyway (Postgres holds a
// database-wide lock from the NOTIFY's queueing through the WAL flush): a second transaction
// in flight only splits the arrivals into smaller groups, more commits and more Postgres CPU
// per row, and its requests wait as long (cmd/notifybench/PERFORMANCE-NOTES.md has the
// measurements). The cost: what queues behind a long group waits for it (a batch of 1,000 is
// about 20 ms of Postgres time), and a group that waits on a lock (an application's
// transaction holding a user's counter row) holds up the groups behind it, at most
// writeTimeout.
func (s *Store) groupLoop() {
	defer close(s.loopDone)
	for {
		select {
		case first := <-s.reqs:
			s.storeGroup(s.collect(first, true))
		case <-s.stop:
			// Close holds off new senders; store what is queued.
			for {
				select {
				case r := <-s.reqs:
					s.storeGroup(s.collect(r, false))
				default:
					return
				}
			}
		}
	}
}

// collect returns first plus what is queued, until the group holds GroupCommitMax rows (it
// may pass that by the last request's rows). With wait, and when others were queued (a busy
// moment), it waits up to GroupCommitWait (if set) for the group to fill.
func (s *Store) collect(first *pubReq, wait bool) []*pubReq {
	group := []*pubReq{first}
	rows, limit := len(first.ns), s.opt.GroupCommitMax
drain:
	for rows < limit {
		select {
		case r := <-s.reqs:
			group = append(group, r)
			rows += len(r.ns)
		default:
			break drain
		}
	}
	if !wait || s.opt.GroupCommitWait <= 0 || len(group) == 1 || rows >= limit {
		return group
	}
	t := time.NewTimer(s.opt.GroupCommitWait)
	defer t.Stop()
	for rows < limit {
		select {
		case r := <-s.reqs:
			group = append(group, r)
			rows += len(r.ns)
		case <-t.C:
			return group
		case <-s.stop:
			return group
		}
	}
	return group
}

// storeGroup stores the group in one transaction, or request by request if that fails.
func (s *Store) storeGroup(group []*pubReq) {
	live := group[:0]
	rows := 0
	for _, r := range group {
		if err := r.ctx.Err(); err != nil {
			r.res <- pubRes{err: ctxError("store: publish", r.ctx)}
			continue
		}
		live = append(live, r)
		rows += len(r.ns)
	}
	if len(live) == 0 {
		return
	}
	s.stats.publishGroups.Add(1)
	started := time.Now()
	// The observer hears of the group before any of its callers has an answer, so that a
	// caller that has one finds its group in the metrics.
	stored := func() {}
	if obs := s.groupObs.Load(); obs != nil {
		for _, r := range live {
			(*obs).Queued(started.Sub(r.at))
		}
		stored = func() { (*obs).Stored(rows, time.Since(started)) }
	}
	// Detached from the callers: one caller giving up must not fail the others.
	ctx, cancel := context.WithTimeout(context.Background(), writeTimeout)
	defer cancel()
	ns := live[0].ns
	if len(live) > 1 {
		ns = make([]NewNotification, 0, rows)
		for _, r := range live {
			ns = append(ns, r.ns...)
		}
	}
	res := make([]pubRes, len(live))
	if ps, err := s.publish(ctx, ns); err == nil {
		for i, r := range live {
			res[i] = pubRes{ps: ps[:len(r.ns):len(r.ns)]}
			ps = ps[len(r.ns):]
		}
	} else if len(live) == 1 {
		res[0] = pubRes{err: err}
	} else {
		// Call by call, so that a bad call fails alone. A group fails rarely (data Postgres
		// refuses, a lost race on an idempotency key); its callers are answered once every
		// call is stored, and the retries count in the group's time.
		for i, r := range live {
			ps, err := s.publish(ctx, r.ns)
			res[i] = pubRes{ps: ps, err: err}
		}
	}
	stored()
	for i, r := range live {
		r.res <- res[i]
	}
}
