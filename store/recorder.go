package store

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"sync/atomic"
	"time"
	"unicode/utf8"

	"github.com/google/uuid"
	"github.com/jackc/pgerrcode"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

// Recorder defaults, used when the RecorderOptions field is zero.
const (
	DefaultRecorderBuffer     = 65536
	DefaultRecorderAckBuffer  = 16384
	DefaultRecorderFlushEvery = 200 * time.Millisecond
	DefaultRecorderMaxBatch   = 10000
)

// recorderWriteTimeout bounds one flush; recorderWarnEvery spaces the dropped-records warnings.
const (
	recorderWriteTimeout = 10 * time.Second
	recorderWarnEvery    = 10 * time.Second
)

// Delivery records that a notification was sent to a session.
type Delivery struct {
	NotificationID string // uuid
	UserID         string
	Seq            int64
	SessionID      string
	Device         string
	Transport      string
	Replayed       bool
	PublishedAt    time.Time // the notification's created_at; zero leaves published_at NULL
	At             time.Time // zero means when recorded
}

// Ack records a delivery receipt from the client for one notification sent to a session.
// Receipts for deliveries older than a day are not applied.
type Ack struct {
	NotificationID string // uuid
	SessionID      string
	At             time.Time // zero means when recorded
}

// SessionStart records a session's start in session_history.
type SessionStart struct {
	RowID       string // uuid of the history row; the caller makes it (uuid.NewV7) and ends it with it
	SessionID   string
	UserID      string
	Device      string
	Transport   string
	RemoteAddr  string
	UserAgent   string
	ConnectedAt time.Time // zero means when recorded
}

// SessionEnd records the end of the session_history row RowID.
type SessionEnd struct {
	RowID    string
	LastSeen time.Time // zero leaves last_seen_at NULL
	EndedAt  time.Time // zero means when recorded
	Reason   string
}

// RecorderOptions tunes a Recorder; zero fields take the defaults above.
type RecorderOptions struct {
	// Buffer is the most delivery and session records queued; past it they are dropped (and
	// counted). Acks do not count against it: they have AckBuffer of their own, so a client
	// sending acks can never take the room of anyone's deliveries.
	Buffer int
	// AckBuffer is the most acks queued; past it acks are dropped (and counted).
	AckBuffer int
	// FlushEvery is the flush interval.
	FlushEvery time.Duration
	// MaxBatch is the most records written in one flush (one implicit transaction);
	// a queue reaching it triggers a flush early.
	MaxBatch int
	// NodeID is written into every session_history row it starts (the node serving the
	// session); empty leaves node_id NULL.
	NodeID string
}

// Recorder writes delivery records and session history off the hot path: the recording
// methods only queue (never block), and one Run goroutine writes batches.
type Recorder struct {
	s   *Store
	log *slog.Logger
	opt RecorderOptions

	mu      sync.Mutex
	q       []any // Delivery, Ack, SessionStart and SessionEnd records, in arrival order
	qAcks   int   // the Acks in q (bounded apart: RecorderOptions.AckBuffer)
	closed  bool
	running bool

	wake chan struct{} // cap 1: queue reached MaxBatch
	stop chan struct{} // closed by Close
	done chan struct{} // closed when Run returns

	flushMu   sync.Mutex       // one flush at a time (Run, or Close after Run)
	carry     []Ack            // under flushMu: acks of the last flush that matched nothing yet
	delivered map[string]int64 // under flushMu: highest seq recorded per session
	dropped   atomic.Uint64
	unmatched atomic.Uint64
	recorded  atomic.Uint64
	lastWarn  atomic.Int64 // unix nanos of the last dropped-records warning
}

// NewRecorder returns a Recorder writing through s. Start it with Run; stop it with Close.
// log may be nil.
func NewRecorder(s *Store, log *slog.Logger, opt RecorderOptions) *Recorder {
	if log == nil {
		log = slog.Default()
	}
	if opt.Buffer <= 0 {
		opt.Buffer = DefaultRecorderBuffer
	}
	if opt.AckBuffer <= 0 {
		opt.AckBuffer = DefaultRecorderAckBuffer
	}
	if opt.FlushEvery <= 0 {
		opt.FlushEvery = DefaultRecorderFlushEvery
	}
	if opt.MaxBatch <= 0 {
		opt.MaxBatch = DefaultRecorderMaxBatch
	}
	return &Recorder{
		s: s, log: log, opt: opt,
		wake:      make(chan struct{}, 1),
		stop:      make(chan struct{}),
		done:      make(chan struct{}),
		delivered: map[string]int64{},
	}
}

// Delivered queues a delivery record. It never blocks: with the buffer full (or the Recorder
// closed) the record is dropped and counted.
func (r *Recorder) Delivered(d Delivery) {
	if d.At.IsZero() {
		d.At = time.Now()
	}
	r.enqueue(d)
}

// Acked queues an ack (sets acked_at of the delivery). It never blocks; see Delivered.
func (r *Recorder) Acked(a Ack) {
	if a.At.IsZero() {
		a.At = time.Now()
	}
	r.enqueue(a)
}

// SessionStarted queues a session_history row. It never blocks; see Delivered.
func (r *Recorder) SessionStarted(s SessionStart) {
	if s.ConnectedAt.IsZero() {
		s.ConnectedAt = time.Now()
	}
	r.enqueue(s)
}

// SessionEnded queues the end of a session_history row. It never blocks; see Delivered.
func (r *Recorder) SessionEnded(e SessionEnd) {
	if e.EndedAt.IsZero() {
		e.EndedAt = time.Now()
	}
	r.enqueue(e)
}

// enqueue queues one record. The queue holds each record boxed, which
// BenchmarkRecorderQueue shows cheaper than a typed slice per kind: those
// slices of large structs regrow after every flush.
func (r *Recorder) enqueue(rec any) {
	r.mu.Lock()
	_, isAck := rec.(Ack)
	if r.closed || (isAck && r.qAcks >= r.opt.AckBuffer) || (!isAck && len(r.q)-r.qAcks >= r.opt.Buffer) {
		r.mu.Unlock()
		r.drop(1, "buffer full")
		return
	}
	r.q = append(r.q, rec)
	if isAck {
		r.qAcks++
	}
	n := len(r.q)
	r.mu.Unlock()
	if n >= r.opt.MaxBatch {
		select {
		case r.wake <- struct{}{}:
		default:
		}
	}
}

// drop counts n dropped records and warns at most once per recorderWarnEvery.
func (r *Recorder) drop(n int, why string) {
	total := r.dropped.Add(uint64(n))
	now := time.Now().UnixNano()
	last := r.lastWarn.Load()
	if now-last >= int64(recorderWarnEvery) && r.lastWarn.CompareAndSwap(last, now) {
		r.log.Warn("store recorder dropped records", "reason", why, "dropped_total", total)
	}
}

// Dropped returns the number of records dropped (buffer full, closed, invalid, failed flush).
func (r *Recorder) Dropped() uint64 { return r.dropped.Load() }

// Recorded returns the number of records written.
func (r *Recorder) Recorded() uint64 { return r.recorded.Load() }

// Run flushes the queue every FlushEvery (or sooner when MaxBatch records are queued) until
// ctx ends or Close is called, then flushes what is queued and returns. Within a flush it
// applies session starts, then deliveries, then acks, then session ends. Writes are detached
// from ctx (context.WithoutCancel plus a timeout); a failed flush is logged and retried once,
// then its records are counted as dropped. Only one Run is active; extra calls return at once.
func (r *Recorder) Run(ctx context.Context) {
	r.mu.Lock()
	if r.closed || r.running {
		r.mu.Unlock()
		return
	}
	r.running = true
	r.mu.Unlock()
	defer close(r.done)

	t := time.NewTicker(r.opt.FlushEvery)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			r.flushAll(ctx)
			return
		case <-r.stop:
			r.flushAll(ctx)
			return
		case <-t.C:
		case <-r.wake:
		}
		r.flushAll(ctx)
	}
}

// Close stops accepting records, flushes everything queued and waits for Run to return (or
// for ctx to end). It works whether Run is running, has returned, or was never started.
func (r *Recorder) Close(ctx context.Context) error {
	r.mu.Lock()
	already := r.closed
	r.closed = true
	running := r.running
	r.mu.Unlock()
	if !already {
		close(r.stop)
	}
	if running {
		select {
		case <-r.done:
		case <-ctx.Done():
			return fmt.Errorf("store recorder: close: %w", ctx.Err())
		}
	}
	r.flushAll(ctx) // what came in after Run returned, or everything when Run never ran
	return nil
}

// flushAll writes the queue in chunks of MaxBatch until it was found empty (and the acks
// carried from the last chunk had their second try).
func (r *Recorder) flushAll(ctx context.Context) {
	r.flushMu.Lock()
	defer r.flushMu.Unlock()
	for {
		r.mu.Lock()
		n := min(r.opt.MaxBatch, len(r.q))
		chunk := r.q[:n:n]
		r.q = r.q[n:]
		if len(r.q) == 0 {
			r.q = nil // release the backing array
		}
		for _, rec := range chunk {
			if _, ok := rec.(Ack); ok {
				r.qAcks--
			}
		}
		r.mu.Unlock()
		if len(chunk) == 0 && len(r.carry) == 0 {
			return
		}
		r.flush(ctx, chunk)
	}
}

// flush writes one chunk, plus the acks carried from the previous one. An ack can reach the
// queue before the delivery it acknowledges (the client answers while the transport is still
// reporting what it wrote), so an ack that matched no delivery gets a second try with the next
// chunk; after that it is counted as unmatched (Unmatched), not as dropped.
func (r *Recorder) flush(ctx context.Context, q []any) {
	carried := r.carry
	r.carry = nil
	b := &recorderBatch{delivered: r.delivered, node: r.opt.NodeID}
	n, invalid := b.build(q, carried)
	if invalid > 0 {
		r.drop(invalid, "invalid records")
	}
	if n == 0 && len(b.acks) == 0 {
		return
	}
	var err error
	for attempt := 1; attempt <= 2; attempt++ {
		wctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), recorderWriteTimeout)
		if attempt == 2 && isMissingPartition(err) {
			// A delivery outside the partitions made ahead (a clock far off, a server left
			// running for a week without its retention loop): make its days, then retry.
			lo, hi := b.dayRange()
			if _, perr := r.s.EnsureDeliveryPartitions(wctx, lo, hi); perr != nil {
				r.log.Error("store recorder: make delivery partitions", "err", perr)
			}
		}
		matched := map[ackKey]bool{}
		err = r.s.pool.SendBatch(wctx, b.batch(matched)).Close()
		cancel()
		if err == nil {
			r.finish(b, matched, n, len(carried))
			return
		}
		r.log.Error("store recorder: flush failed", "attempt", attempt, "records", n+len(carried), "err", err)
	}
	r.drop(n+len(carried), "flush failed")
}

// finish counts what a successful flush wrote and carries the new acks that matched nothing.
func (r *Recorder) finish(b *recorderBatch, matched map[ackKey]bool, n, carried int) {
	var unmatched int
	for i, a := range b.acks {
		if matched[ackKey{a.NotificationID, a.SessionID}] {
			continue
		}
		if b.ackWasCarried[i] {
			unmatched++
		} else {
			r.carry = append(r.carry, a)
		}
	}
	// The acks carried now are counted when their second try ends.
	recorded := n + carried - len(r.carry) - unmatched
	r.recorded.Add(uint64(recorded))
	if unmatched > 0 {
		r.unmatched.Add(uint64(unmatched))
		r.log.Debug("store recorder: acks matched no recorded delivery", "acks", unmatched)
	}
	for i, sid := range b.delSids {
		if seq := b.delSeqs[i]; seq > r.delivered[sid] {
			if len(r.delivered) >= maxRememberedSessions {
				clear(r.delivered) // only lets a repeat of an older delivery through (see build)
			}
			r.delivered[sid] = seq
		}
	}
}

// Unmatched returns the number of acks that matched no recorded delivery (ids the session was
// never sent, or whose delivery record was dropped or is older than a day).
func (r *Recorder) Unmatched() uint64 { return r.unmatched.Load() }

func isMissingPartition(err error) bool {
	var pgErr *pgconn.PgError
	return errors.As(err, &pgErr) && pgErr.Code == pgerrcode.CheckViolation &&
		strings.Contains(pgErr.Message, "no partition")
}

// maxRememberedSessions bounds the Recorder's memory per session: the highest seq recorded.
const maxRememberedSessions = 100_000

// ackWindow bounds how far back a receipt looks for its delivery, so that it reads only the
// latest daily partitions of deliveries.
const ackWindow = 24 * time.Hour

type ackKey struct{ nid, sid string }

// recorderBatch is one chunk turned into column arrays. Acks whose delivery is in the same
// chunk are folded into it (no UPDATE).
type recorderBatch struct {
	delivered map[string]int64 // highest seq recorded per session (read only here)
	node      string           // RecorderOptions.NodeID

	startIDs, startSids, startUsers, startDevices, startTransports, startAddrs, startAgents []string
	startAt                                                                                 []time.Time

	delNids, delUsers, delSids, delDevices, delTransports []string
	delSeqs                                               []int64
	delReplayed                                           []bool
	delPublished                                          []*time.Time
	delAt, delAcked                                       []*time.Time

	acks          []Ack // acks by id to apply by UPDATE
	ackWasCarried []bool

	endIDs, endReasons []string
	endSeen            []*time.Time
	endAt              []time.Time

	minAt, maxAt time.Time // of deliveries and acks
}

func (b *recorderBatch) seeTime(t time.Time) {
	if b.minAt.IsZero() || t.Before(b.minAt) {
		b.minAt = t
	}
	if t.After(b.maxAt) {
		b.maxAt = t
	}
}

// dayRange is the UTC days of the chunk's deliveries.
func (b *recorderBatch) dayRange() (time.Time, time.Time) {
	return b.minAt.UTC().Truncate(24 * time.Hour), b.maxAt.UTC().Truncate(24 * time.Hour)
}

// build fills b from q and the carried acks; it returns the number of valid records of q and
// of invalid ones (bad uuids) left out.
func (b *recorderBatch) build(q []any, carried []Ack) (n, invalid int) {
	for _, rec := range q {
		s, ok := rec.(SessionStart)
		if !ok {
			continue
		}
		if !validUUID(s.RowID) {
			invalid++
			continue
		}
		n++
		b.startIDs = append(b.startIDs, s.RowID)
		b.startSids = append(b.startSids, clean(s.SessionID))
		b.startUsers = append(b.startUsers, clean(s.UserID))
		b.startDevices = append(b.startDevices, clean(s.Device))
		b.startTransports = append(b.startTransports, clean(s.Transport))
		b.startAddrs = append(b.startAddrs, clean(s.RemoteAddr))
		b.startAgents = append(b.startAgents, clean(s.UserAgent))
		b.startAt = append(b.startAt, s.ConnectedAt)
	}

	// Deliveries, the first of a (notification, session) only. A session is sent its seqs in
	// increasing order, each once, so a delivery at or below the highest seq recorded for its
	// session before is a repeat; so is a second one in this chunk.
	first := make(map[ackKey]int, len(q))
	for _, rec := range q {
		d, ok := rec.(Delivery)
		if !ok {
			continue
		}
		if !validUUID(d.NotificationID) {
			invalid++
			continue
		}
		n++
		k := ackKey{d.NotificationID, d.SessionID}
		if _, dup := first[k]; dup {
			continue
		}
		sid := clean(d.SessionID)
		if d.Seq > 0 && d.Seq <= b.delivered[sid] {
			continue
		}
		first[k] = len(b.delNids)
		b.seeTime(d.At)
		at := d.At
		var pub *time.Time
		if !d.PublishedAt.IsZero() {
			pub = &d.PublishedAt
		}
		b.delNids = append(b.delNids, d.NotificationID)
		b.delUsers = append(b.delUsers, clean(d.UserID))
		b.delSeqs = append(b.delSeqs, d.Seq)
		b.delSids = append(b.delSids, sid)
		b.delDevices = append(b.delDevices, clean(d.Device))
		b.delTransports = append(b.delTransports, clean(d.Transport))
		b.delReplayed = append(b.delReplayed, d.Replayed)
		b.delPublished = append(b.delPublished, pub)
		b.delAt = append(b.delAt, &at)
		b.delAcked = append(b.delAcked, nil)
	}
	ackInto := func(i int, at time.Time) {
		if b.delAcked[i] == nil || at.Before(*b.delAcked[i]) {
			b.delAcked[i] = &at
		}
	}

	all := carried[:len(carried):len(carried)]
	for _, rec := range q {
		if a, ok := rec.(Ack); ok {
			all = append(all, a)
		}
	}
	for i, a := range all {
		isNew := i >= len(carried)
		if !validUUID(a.NotificationID) {
			invalid++
			continue
		}
		if isNew {
			n++
		}
		if j, ok := first[ackKey{a.NotificationID, a.SessionID}]; ok {
			ackInto(j, a.At) // folded into its delivery: matched
			continue
		}
		b.seeTime(a.At)
		b.acks = append(b.acks, a)
		b.ackWasCarried = append(b.ackWasCarried, !isNew)
	}

	for _, rec := range q {
		e, ok := rec.(SessionEnd)
		if !ok {
			continue
		}
		if !validUUID(e.RowID) {
			invalid++
			continue
		}
		n++
		var seen *time.Time
		if !e.LastSeen.IsZero() {
			seen = &e.LastSeen
		}
		b.endIDs = append(b.endIDs, e.RowID)
		b.endSeen = append(b.endSeen, seen)
		b.endAt = append(b.endAt, e.EndedAt)
		b.endReasons = append(b.endReasons, clean(e.Reason))
	}
	return n, invalid
}

// batch is the chunk as one pgx.Batch (one round trip, one implicit transaction): session
// starts, deliveries, acks, session ends. The ack UPDATE reports what it
// matched into matched.
func (b *recorderBatch) batch(matched map[ackKey]bool) *pgx.Batch {
	pb := &pgx.Batch{}
	since := b.minAt.Add(-ackWindow)
	// Records are receipts, not data a client waits for: the flush need not wait for its WAL to
	// reach the disk (a Postgres crash may lose the last fraction of a second of them; the
	// database stays consistent).
	pb.Queue(`SELECT set_config('synchronous_commit', 'off', true)`)
	// Every statement below joins a few hundred rows of arrays to a table that only grows
	// (deliveries, session_history). The generic plan Postgres caches after a few flushes is
	// costed for the tables as they were then: made while they were small, its joins stay hash
	// joins over a scan of the whole table (today's deliveries, on every flush; auto_explain
	// shows it) for as long as the connection keeps it. Custom plans (a fraction of a
	// millisecond per flush) are costed for the arrays at hand and the tables as they are.
	pb.Queue(customPlanSQL)
	if len(b.startIDs) > 0 {
		pb.Queue(`INSERT INTO session_history (id, session_id, user_id, device, transport, remote_addr, user_agent, connected_at, node_id)
			SELECT id::uuid, sid, uid, dev, tr, nullif(addr, ''), nullif(ua, ''), at, nullif($9, '')
			FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[], $8::timestamptz[])
				AS t(id, sid, uid, dev, tr, addr, ua, at)
			ON CONFLICT (id) DO NOTHING`,
			b.startIDs, b.startSids, b.startUsers, b.startDevices, b.startTransports, b.startAddrs, b.startAgents, b.startAt, b.node)
	}
	if len(b.delNids) > 0 {
		// One row per notification and session: build drops repeats (by the session's highest
		// seq recorded, in memory), and a flush retried after an unclear failure repeats its
		// rows exactly, delivered_at included, so the key catches those. (Looking in the table
		// for an earlier row would cost an index probe per row and partition, or, planned as a
		// hash join, a scan of the day's deliveries on every flush.)
		pb.Queue(`INSERT INTO deliveries (notification_id, user_id, seq, session_id, device, transport, replayed,
				published_at, delivered_at, acked_at)
			SELECT t.nid::uuid, t.uid, t.seq, t.sid, t.dev, t.tr, t.rep, t.pub, t.at, t.ack
			FROM unnest($1::text[], $2::text[], $3::bigint[], $4::text[], $5::text[], $6::text[], $7::boolean[],
				$8::timestamptz[], $9::timestamptz[], $10::timestamptz[]) AS t(nid, uid, seq, sid, dev, tr, rep, pub, at, ack)
			ON CONFLICT DO NOTHING`,
			b.delNids, b.delUsers, b.delSeqs, b.delSids, b.delDevices, b.delTransports, b.delReplayed,
			b.delPublished, b.delAt, b.delAcked)
	}
	if len(b.acks) > 0 {
		nids := make([]string, len(b.acks))
		sids := make([]string, len(b.acks))
		at := make([]time.Time, len(b.acks))
		for i, a := range b.acks {
			nids[i], sids[i], at[i] = a.NotificationID, clean(a.SessionID), a.At
		}
		// Matched means the delivery is recorded, acked now or before.
		pb.Queue(`WITH a AS (
				SELECT nid::uuid AS nid, sid, min(at) AS at
				FROM unnest($1::text[], $2::text[], $3::timestamptz[]) AS a(nid, sid, at) GROUP BY 1, 2
			), upd AS (
				UPDATE deliveries d SET acked_at = a.at FROM a
				WHERE d.notification_id = a.nid AND d.session_id = a.sid AND d.acked_at IS NULL AND d.delivered_at >= $4
			)
			SELECT d.notification_id::text, d.session_id FROM deliveries d JOIN a
				ON d.notification_id = a.nid AND d.session_id = a.sid AND d.delivered_at >= $4`,
			nids, sids, at, since).Query(func(rows pgx.Rows) error {
			for rows.Next() {
				var k ackKey
				if err := rows.Scan(&k.nid, &k.sid); err != nil {
					return err
				}
				matched[k] = true
			}
			return rows.Err()
		})
	}
	if len(b.endIDs) > 0 {
		pb.Queue(`UPDATE session_history s SET last_seen_at = coalesce(e.seen, s.last_seen_at), ended_at = e.ended,
				end_reason = nullif(e.reason, '')
			FROM unnest($1::text[], $2::timestamptz[], $3::timestamptz[], $4::text[]) AS e(id, seen, ended, reason)
			WHERE s.id = e.id::uuid`, b.endIDs, b.endSeen, b.endAt, b.endReasons)
	}
	return pb
}

func validUUID(s string) bool {
	_, err := uuid.Parse(s)
	return err == nil
}

// clean makes s storable as Postgres text: valid UTF-8 without NUL bytes.
func clean(s string) string {
	if utf8.ValidString(s) && !strings.Contains(s, "\x00") {
		return s
	}
	return strings.ReplaceAll(strings.ToValidUTF8(s, "\uFFFD"), "\x00", "")
}
