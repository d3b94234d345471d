package store

import (
	"cmp"
	"context"
	"fmt"
	"math"
	"slices"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
)

// DefaultReplayLimit is the Replay limit used when the caller passes limit <= 0.
const DefaultReplayLimit = 1000

// Inbox page sizes.
const (
	DefaultInboxLimit = 50
	MaxInboxLimit     = 1000
)

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

// listWithUnread runs a notification query and the count of user's unread
// notifications in one round trip.
func (s *Store) listWithUnread(ctx context.Context, user, query string, args ...any) ([]Notification, int64, error) {
	b := &pgx.Batch{}
	b.Queue(query, args...)
	b.Queue(unreadCountSQL, user)
	br := s.pool.SendBatch(ctx, b)
	defer br.Close()
	var ns []Notification
	var unread int64
	rows, err := br.Query()
	if err == nil {
		ns, err = pgx.CollectRows(rows, scanNotification)
	}
	if err == nil {
		err = br.QueryRow().Scan(&unread)
	}
	if err == nil {
		err = br.Close()
	}
	return ns, unread, err
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
		return nil, fmt.Errorf("store: fetch %d range(s): %w", len(ranges), err)
	}
	ns, err := pgx.CollectRows(rows, scanNotification)
	if err != nil {
		return nil, fmt.Errorf("store: fetch %d range(s): %w", len(ranges), err)
	}
	return slices.CompactFunc(ns, func(a, b Notification) bool { return a.UserID == b.UserID && a.Seq == b.Seq }), nil
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
		return nil, fmt.Errorf("store: after (%d users): %w", len(cursors), err)
	}
	ns, err := pgx.CollectRows(rows, scanNotification)
	if err != nil {
		return nil, fmt.Errorf("store: after (%d users): %w", len(cursors), err)
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
		return nil, 0, fmt.Errorf("store: mark read for %q: %w", user, err)
	}
	return changed, unread, nil
}

// Inbox returns the user's unexpired notifications newest first (only unread ones with
// unreadOnly), at most limit (DefaultInboxLimit when <= 0, capped at MaxInboxLimit), with
// seq < beforeSeq when beforeSeq > 0 (paging), plus the user's unread count. One round trip.
func (s *Store) Inbox(ctx context.Context, user string, unreadOnly bool, limit int, beforeSeq int64) ([]Notification, int64, error) {
	if limit <= 0 {
		limit = DefaultInboxLimit
	}
	limit = min(limit, MaxInboxLimit)
	if beforeSeq <= 0 {
		beforeSeq = math.MaxInt64
	}
	cond := ""
	if unreadOnly {
		cond = " AND n.read_at IS NULL"
	}
	ns, unread, err := s.listWithUnread(ctx, user, `SELECT `+notificationCols+` FROM notifications n
		WHERE n.user_id = $1 AND n.seq < $2`+cond+` AND `+unexpired+`
		ORDER BY n.seq DESC LIMIT $3`, user, beforeSeq, limit)
	if err != nil {
		return nil, 0, fmt.Errorf("store: inbox of %q: %w", user, err)
	}
	return ns, unread, nil
}
