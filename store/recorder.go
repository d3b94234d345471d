package store

import (
	"context"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"sync/atomic"
	"time"
	"unicode/utf8"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
)

// Recorder defaults, used when the RecorderOptions field is zero.
const (
	DefaultRecorderBuffer     = 65536
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
	Transport      string
	Replayed       bool
	At             time.Time // zero means when recorded
}

// Ack records a delivery receipt from the client for a notification sent to a session.
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
	// Buffer is the most records queued; past it records are dropped (and counted).
	Buffer int
	// FlushEvery is the flush interval.
	FlushEvery time.Duration
	// MaxBatch is the most records written in one flush (one implicit transaction);
	// a queue reaching it triggers a flush early.
	MaxBatch int
}

type recKind uint8

const (
	kindDelivery recKind = iota
	kindAck
	kindStart
	kindEnd
)

// recQueue is a FIFO of records: order holds the kinds in arrival order, the typed slices the
// records of each kind in arrival order (so no record is boxed).
type recQueue struct {
	order  []recKind
	deliv  []Delivery
	acks   []Ack
	starts []SessionStart
	ends   []SessionEnd
}

// popFront removes and returns the first n records (all if fewer).
func (q *recQueue) popFront(n int) recQueue {
	n = min(n, len(q.order))
	var cnt [4]int
	for _, k := range q.order[:n] {
		cnt[k]++
	}
	head := recQueue{
		order:  q.order[:n:n],
		deliv:  q.deliv[:cnt[kindDelivery]:cnt[kindDelivery]],
		acks:   q.acks[:cnt[kindAck]:cnt[kindAck]],
		starts: q.starts[:cnt[kindStart]:cnt[kindStart]],
		ends:   q.ends[:cnt[kindEnd]:cnt[kindEnd]],
	}
	q.order = q.order[n:]
	q.deliv = q.deliv[cnt[kindDelivery]:]
	q.acks = q.acks[cnt[kindAck]:]
	q.starts = q.starts[cnt[kindStart]:]
	q.ends = q.ends[cnt[kindEnd]:]
	return head
}

// Recorder writes delivery records and session history off the hot path: the recording
// methods only queue (never block), and one Run goroutine writes batches.
type Recorder struct {
	s   *Store
	log *slog.Logger
	opt RecorderOptions

	mu      sync.Mutex
	q       recQueue
	closed  bool
	running bool

	wake chan struct{} // cap 1: queue reached MaxBatch
	stop chan struct{} // closed by Close
	done chan struct{} // closed when Run returns

	flushMu  sync.Mutex // one flush at a time (Run, or Close after Run)
	dropped  atomic.Uint64
	recorded atomic.Uint64
	lastWarn atomic.Int64 // unix nanos of the last dropped-records warning
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
	if opt.FlushEvery <= 0 {
		opt.FlushEvery = DefaultRecorderFlushEvery
	}
	if opt.MaxBatch <= 0 {
		opt.MaxBatch = DefaultRecorderMaxBatch
	}
	return &Recorder{
		s: s, log: log, opt: opt,
		wake: make(chan struct{}, 1),
		stop: make(chan struct{}),
		done: make(chan struct{}),
	}
}

// Delivered queues a delivery record. It never blocks: with the buffer full (or the Recorder
// closed) the record is dropped and counted.
func (r *Recorder) Delivered(d Delivery) {
	if d.At.IsZero() {
		d.At = time.Now()
	}
	r.enqueue(kindDelivery, func(q *recQueue) { q.deliv = append(q.deliv, d) })
}

// Acked queues an ack (sets acked_at of the delivery). It never blocks; see Delivered.
func (r *Recorder) Acked(a Ack) {
	if a.At.IsZero() {
		a.At = time.Now()
	}
	r.enqueue(kindAck, func(q *recQueue) { q.acks = append(q.acks, a) })
}

// SessionStarted queues a session_history row. It never blocks; see Delivered.
func (r *Recorder) SessionStarted(s SessionStart) {
	if s.ConnectedAt.IsZero() {
		s.ConnectedAt = time.Now()
	}
	r.enqueue(kindStart, func(q *recQueue) { q.starts = append(q.starts, s) })
}

// SessionEnded queues the end of a session_history row. It never blocks; see Delivered.
func (r *Recorder) SessionEnded(e SessionEnd) {
	if e.EndedAt.IsZero() {
		e.EndedAt = time.Now()
	}
	r.enqueue(kindEnd, func(q *recQueue) { q.ends = append(q.ends, e) })
}

func (r *Recorder) enqueue(k recKind, add func(*recQueue)) {
	r.mu.Lock()
	if r.closed || len(r.q.order) >= r.opt.Buffer {
		r.mu.Unlock()
		r.drop(1, "buffer full")
		return
	}
	r.q.order = append(r.q.order, k)
	add(&r.q)
	n := len(r.q.order)
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

// flushAll writes the queue in chunks of MaxBatch until it was found empty.
func (r *Recorder) flushAll(ctx context.Context) {
	r.flushMu.Lock()
	defer r.flushMu.Unlock()
	for {
		r.mu.Lock()
		chunk := r.q.popFront(r.opt.MaxBatch)
		if len(r.q.order) == 0 {
			r.q = recQueue{} // release the backing arrays
		}
		r.mu.Unlock()
		if len(chunk.order) == 0 {
			return
		}
		r.flush(ctx, chunk)
	}
}

func (r *Recorder) flush(ctx context.Context, q recQueue) {
	b, n, invalid := buildRecorderBatch(q)
	if invalid > 0 {
		r.drop(invalid, "invalid records")
	}
	if n == 0 {
		return
	}
	var err error
	for attempt := 1; attempt <= 2; attempt++ {
		wctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), recorderWriteTimeout)
		err = r.s.pool.SendBatch(wctx, b).Close()
		cancel()
		if err == nil {
			r.recorded.Add(uint64(n))
			return
		}
		r.log.Error("store recorder: flush failed", "attempt", attempt, "records", n, "err", err)
	}
	r.drop(n, "flush failed")
}

// buildRecorderBatch turns a chunk into one pgx.Batch (one round trip, one implicit
// transaction): session starts, deliveries, acks, session ends. It returns the number of
// valid records in it and of invalid ones (bad uuids) left out.
func buildRecorderBatch(q recQueue) (b *pgx.Batch, n, invalid int) {
	b = &pgx.Batch{}
	if len(q.starts) > 0 {
		var ids, sids, users, devices, transports, addrs, agents []string
		var at []time.Time
		for _, s := range q.starts {
			if !validUUID(s.RowID) {
				invalid++
				continue
			}
			ids = append(ids, s.RowID)
			sids = append(sids, clean(s.SessionID))
			users = append(users, clean(s.UserID))
			devices = append(devices, clean(s.Device))
			transports = append(transports, clean(s.Transport))
			addrs = append(addrs, clean(s.RemoteAddr))
			agents = append(agents, clean(s.UserAgent))
			at = append(at, s.ConnectedAt)
		}
		if len(ids) > 0 {
			n += len(ids)
			b.Queue(`INSERT INTO session_history (id, session_id, user_id, device, transport, remote_addr, user_agent, connected_at)
				SELECT id::uuid, sid, uid, dev, tr, nullif(addr, ''), nullif(ua, ''), at
				FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[], $8::timestamptz[])
					AS t(id, sid, uid, dev, tr, addr, ua, at)
				ON CONFLICT (id) DO NOTHING`, ids, sids, users, devices, transports, addrs, agents, at)
		}
	}
	if len(q.deliv) > 0 {
		var nids, users, sids, transports []string
		var seqs []int64
		var replayed []bool
		var at []time.Time
		for _, d := range q.deliv {
			if !validUUID(d.NotificationID) {
				invalid++
				continue
			}
			nids = append(nids, d.NotificationID)
			users = append(users, clean(d.UserID))
			seqs = append(seqs, d.Seq)
			sids = append(sids, clean(d.SessionID))
			transports = append(transports, clean(d.Transport))
			replayed = append(replayed, d.Replayed)
			at = append(at, d.At)
		}
		if len(nids) > 0 {
			n += len(nids)
			b.Queue(`INSERT INTO deliveries (notification_id, user_id, seq, session_id, transport, replayed, delivered_at)
				SELECT nid::uuid, uid, seq, sid, tr, rep, at
				FROM unnest($1::text[], $2::text[], $3::bigint[], $4::text[], $5::text[], $6::boolean[], $7::timestamptz[])
					AS t(nid, uid, seq, sid, tr, rep, at)
				ON CONFLICT DO NOTHING`, nids, users, seqs, sids, transports, replayed, at)
		}
	}
	if len(q.acks) > 0 {
		var nids, sids []string
		var at []time.Time
		for _, a := range q.acks {
			if !validUUID(a.NotificationID) {
				invalid++
				continue
			}
			nids = append(nids, a.NotificationID)
			sids = append(sids, clean(a.SessionID))
			at = append(at, a.At)
		}
		if len(nids) > 0 {
			n += len(nids)
			b.Queue(`UPDATE deliveries d SET acked_at = a.at
				FROM unnest($1::text[], $2::text[], $3::timestamptz[]) AS a(nid, sid, at)
				WHERE d.notification_id = a.nid::uuid AND d.session_id = a.sid AND d.acked_at IS NULL`, nids, sids, at)
		}
	}
	if len(q.ends) > 0 {
		var ids, reasons []string
		var seen []*time.Time
		var ended []time.Time
		for _, e := range q.ends {
			if !validUUID(e.RowID) {
				invalid++
				continue
			}
			ids = append(ids, e.RowID)
			var ls *time.Time
			if !e.LastSeen.IsZero() {
				ls = &e.LastSeen
			}
			seen = append(seen, ls)
			ended = append(ended, e.EndedAt)
			reasons = append(reasons, clean(e.Reason))
		}
		if len(ids) > 0 {
			n += len(ids)
			b.Queue(`UPDATE session_history s SET last_seen_at = coalesce(e.seen, s.last_seen_at), ended_at = e.ended,
					end_reason = nullif(e.reason, '')
				FROM unnest($1::text[], $2::timestamptz[], $3::timestamptz[], $4::text[]) AS e(id, seen, ended, reason)
				WHERE s.id = e.id::uuid`, ids, seen, ended, reasons)
		}
	}
	return b, n, invalid
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
