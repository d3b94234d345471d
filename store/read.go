package store

import (
	"cmp"
	"context"
	"fmt"
	"math"
	"slices"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgtype"
)

// DefaultReplayLimit is the Replay limit used when the caller passes limit <= 0.
const DefaultReplayLimit = 1000

// Inbox page sizes.
const (
	DefaultInboxLimit = 50
	MaxInboxLimit     = 1000
)

// DefaultInboxMaxBytes is the byte bound of an inbox page when InboxQuery.MaxBytes <= 0.
const DefaultInboxMaxBytes = 4 << 20

const notificationCols = `n.id::text, n.user_id, n.seq, n.topic, n.data, n.created_at, n.read_at, n.expires_at`

// unexpired is the condition for a notification that has not expired.
const unexpired = `(n.expires_at IS NULL OR n.expires_at > now())`

const unreadCountSQL = `SELECT count(*) FROM notifications n WHERE n.user_id = $1 AND n.read_at IS NULL AND ` + unexpired

func scanNotification(row pgx.CollectableRow) (Notification, error) {
	var n Notification
	var data []byte
	err := row.Scan(&n.ID, &n.UserID, &n.Seq, &n.Topic, &data, &n.CreatedAt, &n.ReadAt, &n.ExpiresAt)
	n.Data = data
	return n, err
}

// SeqRange is a user's seqs From..To, inclusive: what a commit signal (Listener) reports and
// what Fetch reads. It is the one range type of notifyd; the realtime dispatcher uses it too.
type SeqRange struct {
	UserID   string
	From, To int64
}

// Fetch returns the unexpired notifications in the given ranges (any read state), ordered by
// user (byte order) then seq, each once even when ranges overlap. One query.
func (s *Store) Fetch(ctx context.Context, ranges []SeqRange) ([]Notification, error) {
	if len(ranges) == 0 {
		return nil, nil
	}
	users := make([]string, len(ranges))
	froms := make([]int64, len(ranges))
	tos := make([]int64, len(ranges))
	for i, r := range ranges {
		users[i], froms[i], tos[i] = r.UserID, r.From, r.To
	}
	rows, err := s.pool.Query(ctx, `SELECT `+notificationCols+`
		FROM unnest($1::text[], $2::bigint[], $3::bigint[]) AS r(user_id, f, t)
		JOIN notifications n ON n.user_id = r.user_id AND n.seq BETWEEN r.f AND r.t
		WHERE `+unexpired+`
		ORDER BY n.user_id COLLATE "C", n.seq`, users, froms, tos)
	if err != nil {
		return nil, DBError(fmt.Sprintf("store: fetch %d range(s)", len(ranges)), err)
	}
	ns, err := pgx.CollectRows(rows, scanNotification)
	if err != nil {
		return nil, DBError(fmt.Sprintf("store: fetch %d range(s)", len(ranges)), err)
	}
	return slices.CompactFunc(ns, func(a, b Notification) bool { return a.UserID == b.UserID && a.Seq == b.Seq }), nil
}

// UnreadUpTo returns, for each user of upTo, how many of the user's notifications with seq up
// to upTo[user] are unread and unexpired: after a catch-up, the count a session that has
// received everything up to that seq should show (later rows reach it as notifications).
func (s *Store) UnreadUpTo(ctx context.Context, upTo map[string]int64) (map[string]int64, error) {
	users := make([]string, 0, len(upTo))
	seqs := make([]int64, 0, len(upTo))
	for u, seq := range upTo {
		users = append(users, u)
		seqs = append(seqs, seq)
	}
	rows, err := s.pool.Query(ctx, `SELECT c.user_id, (SELECT count(*) FROM notifications n
			WHERE n.user_id = c.user_id AND n.seq <= c.up_to AND n.read_at IS NULL AND `+unexpired+`)
		FROM unnest($1::text[], $2::bigint[]) AS c(user_id, up_to)`, users, seqs)
	if err != nil {
		return nil, DBError(fmt.Sprintf("store: unread counts (%d users)", len(upTo)), err)
	}
	out := make(map[string]int64, len(upTo))
	var user string
	var n int64
	if _, err := pgx.ForEachRow(rows, []any{&user, &n}, func() error { out[user] = n; return nil }); err != nil {
		return nil, DBError(fmt.Sprintf("store: unread counts (%d users)", len(upTo)), err)
	}
	return out, nil
}

// After returns, for catch-up, the unread, unexpired notifications with seq greater than each
// user's cursor, at most limitPerUser per user (DefaultReplayLimit when <= 0), ordered by user
// (byte order) then seq. Read ones are left out as in Replay: a session whose cursor is below
// the user's read history (a device that connected without a cursor) was never owed them, and
// sending them after a lost NOTIFY would show that history as new.
func (s *Store) After(ctx context.Context, cursors map[string]int64, limitPerUser int) ([]Notification, error) {
	if len(cursors) == 0 {
		return nil, nil
	}
	if limitPerUser <= 0 {
		limitPerUser = DefaultReplayLimit
	}
	users := make([]string, 0, len(cursors))
	afters := make([]int64, 0, len(cursors))
	for u, a := range cursors {
		users = append(users, u)
		afters = append(afters, a)
	}
	rows, err := s.pool.Query(ctx, `SELECT `+notificationCols+`
		FROM unnest($1::text[], $2::bigint[]) AS c(user_id, after)
		CROSS JOIN LATERAL (
			SELECT * FROM notifications n
			WHERE n.user_id = c.user_id AND n.seq > c.after AND n.read_at IS NULL AND `+unexpired+`
			ORDER BY n.seq LIMIT $3
		) n
		ORDER BY n.user_id COLLATE "C", n.seq`, users, afters, limitPerUser)
	if err != nil {
		return nil, DBError(fmt.Sprintf("store: after (%d users)", len(cursors)), err)
	}
	ns, err := pgx.CollectRows(rows, scanNotification)
	if err != nil {
		return nil, DBError(fmt.Sprintf("store: after (%d users)", len(cursors)), err)
	}
	return ns, nil
}

// MarkRead marks unread notifications of user as read: those with the given ids, and when
// upToSeq > 0 all with seq <= upToSeq. It returns the ids it changed (each id is changed by
// exactly one caller, even under concurrency) and the user's unread count afterwards. Unknown,
// malformed or other users' ids are ignored. One round trip, one transaction.
func (s *Store) MarkRead(ctx context.Context, user string, ids []string, upToSeq int64) (changed []string, unread int64, err error) {
	valid := make([]string, 0, len(ids))
	for _, id := range ids {
		if u, err := uuid.Parse(id); err == nil {
			valid = append(valid, u.String())
		}
	}
	if upToSeq < 0 {
		upToSeq = 0 // seq <= 0 matches nothing
	}
	b := &pgx.Batch{}
	if len(valid) > 0 || upToSeq > 0 {
		b.Queue(`UPDATE notifications n SET read_at = now()
			WHERE n.user_id = $1 AND n.read_at IS NULL AND (n.id = ANY($2::text[]::uuid[]) OR n.seq <= $3)
			RETURNING n.id::text, n.seq`, user, valid, upToSeq)
	}
	b.Queue(unreadCountSQL, user)
	br := s.pool.SendBatch(ctx, b)
	defer br.Close()
	if len(valid) > 0 || upToSeq > 0 {
		type idSeq struct {
			id  string
			seq int64
		}
		var rows pgx.Rows
		rows, err = br.Query()
		var got []idSeq
		if err == nil {
			got, err = pgx.CollectRows(rows, func(r pgx.CollectableRow) (idSeq, error) {
				var v idSeq
				err := r.Scan(&v.id, &v.seq)
				return v, err
			})
		}
		slices.SortFunc(got, func(a, b idSeq) int { return cmp.Compare(a.seq, b.seq) })
		for _, v := range got {
			changed = append(changed, v.id)
		}
	}
	if err == nil {
		err = br.QueryRow().Scan(&unread)
	}
	if err == nil {
		err = br.Close()
	}
	if err != nil {
		return nil, 0, DBError(fmt.Sprintf("store: mark read for %q", user), err)
	}
	return changed, unread, nil
}

// InboxQuery selects one page of a user's inbox.
type InboxQuery struct {
	User string
	// UnreadOnly leaves out the notifications already read.
	UnreadOnly bool
	// Limit is the most rows (DefaultInboxLimit when <= 0, capped at MaxInboxLimit).
	Limit int
	// BeforeSeq, when > 0, keeps only seq < BeforeSeq (paging back).
	BeforeSeq int64
	// MaxBytes bounds the page's data (DefaultInboxMaxBytes when <= 0).
	MaxBytes int
}

// inboxSQL is one inbox page, newest first ($1 user, $2 before seq, $3 limit,
// $4 max bytes; cond adds the unread filter), cut by bytes as replayBatchSQL
// cuts a replay: rows are kept while the lengths of their data as JSON text
// add up to at most $4 (the first row always), and the first row that is not
// kept comes without its data, to say the page was cut.
func inboxSQL(cond string) string {
	return `SELECT w.rn = 1 OR w.run <= $4 AS keep, w.id::text, w.user_id, w.seq, w.topic,
	CASE WHEN w.rn = 1 OR w.run <= $4 THEN w.data END, w.created_at, w.read_at, w.expires_at
FROM (SELECT n.*, row_number() OVER o AS rn, sum(n.len) OVER o AS run
	FROM (SELECT n.*, octet_length(n.data::text) AS len FROM notifications n
		WHERE n.user_id = $1 AND n.seq < $2` + cond + ` AND ` + unexpired + `
		ORDER BY n.seq DESC LIMIT $3) n
	WINDOW o AS (ORDER BY n.seq DESC ROWS UNBOUNDED PRECEDING)) w
WHERE w.run - w.len <= $4 OR w.rn <= 2
ORDER BY w.seq DESC`
}

// Inbox calls each with the user's unexpired notifications newest first (only unread ones
// with UnreadOnly), at most Limit of them and at most MaxBytes of data (the first one
// always), with seq < BeforeSeq when BeforeSeq > 0, as Postgres sends them: a page is never
// held in memory whole. n.Data is the driver's buffer, valid only during the call. When each
// returns an error Inbox stops and returns it. unread is the user's unread count; truncated
// reports that the byte bound ended the page before Limit rows while more match: the next
// page starts below the last seq given. One round trip.
func (s *Store) Inbox(ctx context.Context, q InboxQuery, each func(n Notification) error) (unread int64, truncated bool, err error) {
	limit := q.Limit
	if limit <= 0 {
		limit = DefaultInboxLimit
	}
	limit = min(limit, MaxInboxLimit)
	before := q.BeforeSeq
	if before <= 0 {
		before = math.MaxInt64
	}
	maxBytes := q.MaxBytes
	if maxBytes <= 0 {
		maxBytes = DefaultInboxMaxBytes
	}
	cond := ""
	if q.UnreadOnly {
		cond = " AND n.read_at IS NULL"
	}
	b := &pgx.Batch{}
	b.Queue(inboxSQL(cond), q.User, before, limit, int64(maxBytes))
	b.Queue(unreadCountSQL, q.User)
	br := s.pool.SendBatch(ctx, b)
	defer br.Close()
	truncated, err = scanInbox(br, each)
	if err == nil {
		err = br.QueryRow().Scan(&unread)
	}
	if err == nil {
		err = br.Close()
	}
	if err != nil {
		return 0, false, DBError(fmt.Sprintf("store: inbox of %q", q.User), err)
	}
	return unread, truncated, nil
}

// scanInbox reads inboxSQL's rows into each.
func scanInbox(br pgx.BatchResults, each func(Notification) error) (truncated bool, err error) {
	rows, err := br.Query()
	if err != nil {
		return false, err
	}
	defer rows.Close()
	for rows.Next() {
		var (
			keep bool
			n    Notification
			data pgtype.DriverBytes
		)
		if err := rows.Scan(&keep, &n.ID, &n.UserID, &n.Seq, &n.Topic, &data, &n.CreatedAt, &n.ReadAt, &n.ExpiresAt); err != nil {
			return false, err
		}
		if !keep {
			truncated = true // the first row past the bound: it only says there is more
			continue
		}
		n.Data = []byte(data)
		if err := each(n); err != nil {
			return false, err
		}
	}
	return truncated, rows.Err()
}
