package realtime

import (
	"net/netip"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/time/rate"
)

// SessionInfo describes a new session before it is registered.
type SessionInfo struct {
	User       string
	Device     string
	Transport  Transport
	RemoteAddr string
	UserAgent  string
	// Network is the client's network as negotiate counts it (its /24 or /48,
	// behind trusted proxies); the zero Prefix when unknown.
	Network netip.Prefix
}

// Session is one live connection of one device over one transport. Every
// transport implements it the same way: the hub queues frames with Deliver and
// Send, the transport's single writer takes them with Take when Wake fires and
// moves them onto its wire, and ends when Done is closed.
//
// Concurrency: the queue, cursor and replay state are guarded by mu; lastSeen is
// atomic; the wheel fields belong to the hub's wheel and are guarded by its lock.
type Session struct {
	// ID is the session id, given when the session is registered
	// (Tracker.add); it then stays.
	ID string
	SessionInfo
	// ConnectedAt is when this connection was accepted.
	ConnectedAt time.Time
	// ConnID identifies this connection (a UUIDv7); unlike ID it is new on
	// every resume, so session history has one row per connection.
	ConnID string

	hub      *Hub
	lastSeen atomic.Int64 // unix nanoseconds
	idSlot   uint32       // the tracker's slot for ID, fixed with it

	mu        sync.Mutex
	queue     []Frame
	limit     int
	replaying bool
	pending   []Frame       // live notifications that arrived during replay
	cursor    int64         // highest seq queued to this session
	sent      sentRing      // notifications taken by the writer, not yet acked (bounded by limit)
	acks      *rate.Limiter // acks of this session, made by the first AdmitAcks
	closed    bool
	reason    Reason
	wake      chan struct{}
	done      chan struct{}
	// notify, when set (SetNotify), is called with mu held after a frame is
	// queued and when the session ends. It must not block: a transport that
	// keeps no idle writer goroutine starts one from it.
	notify func()

	// wheel state, guarded by wheel.mu; slot (0 when out of the wheel) is
	// also read without the lock on Touch's fast path.
	slot       atomic.Int64
	prev, next *Session
	pins       int
}

// Wake is signalled (level-triggered, capacity one) whenever frames are queued.
func (s *Session) Wake() <-chan struct{} { return s.wake }

// Done is closed when the session has ended; Reason then says why.
func (s *Session) Done() <-chan struct{} { return s.done }

// Reason says why the session ended, once Done is closed.
func (s *Session) Reason() Reason {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.reason
}

// Cursor is the highest notification seq queued to this session.
func (s *Session) Cursor() int64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.cursor
}

// LastSeen is the last sign of life from the client.
func (s *Session) LastSeen() time.Time { return time.Unix(0, s.lastSeen.Load()) }

// SetNotify sets a function called (with the session's lock held, so it
// must only start work, never block or call back into the session) after
// every queued frame and when the session ends, besides the Wake and Done
// signals. The WebSocket transport uses it to run a writer goroutine only
// while there is something to write.
func (s *Session) SetNotify(fn func()) {
	s.mu.Lock()
	s.notify = fn
	s.mu.Unlock()
}

// Take removes and returns every queued frame, oldest first. The
// notifications among them are remembered as sent (see AdmitAcks) before the
// writer puts them on the wire, so their acks can never arrive first.
func (s *Session) Take() []Frame {
	s.mu.Lock()
	defer s.mu.Unlock()
	q := s.queue
	s.queue = nil
	for i := range q {
		if q[i].Type == TypeNotification {
			s.sent.add(q[i].ID, s.limit)
		}
	}
	return q
}

// inheritSent gives s the sent notifications of from, the connection it
// resumes and replaces (same session id), so that the client's acks of what
// it got over the old connection are still admitted. s has taken nothing yet
// but its hello.
func (s *Session) inheritSent(from *Session) {
	from.mu.Lock()
	sent := from.sent
	sent.ids = slices.Clone(sent.ids)
	from.mu.Unlock()
	s.mu.Lock()
	if s.sent.live == 0 {
		s.sent = sent
	}
	s.mu.Unlock()
}

// AckLimit bounds the ack ids one session may send: Rate per second, with
// bursts of Burst. A zero Burst limits nothing.
type AckLimit struct {
	Rate  rate.Limit
	Burst int
}

// AdmitAcks sorts the ids of a client's acks. It returns those the session's
// writer took (Take) and that were not acked before, now marked acked, in
// order; limited counts the ids past lim, refused unread, and unknown the
// others: ids never sent to this session, sent so long ago that the session
// forgot them (more than its queue limit of notifications since), or acked
// already.
func (s *Session) AdmitAcks(ids []string, lim AckLimit, now time.Time) (admitted []string, limited, unknown int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if lim.Burst > 0 && s.acks == nil {
		s.acks = rate.NewLimiter(lim.Rate, lim.Burst)
	}
	for i, id := range ids {
		if s.acks != nil && !s.acks.AllowN(now, 1) {
			return admitted, len(ids) - i, unknown
		}
		if s.sent.take(id) {
			admitted = append(admitted, id)
		} else {
			unknown++
		}
	}
	return admitted, 0, unknown
}

// Send queues a frame that is not a notification (pong, read, error). It
// returns false when the session has ended or its queue overflowed, in which
// case the session is ended as a slow consumer.
func (s *Session) Send(f Frame) bool {
	s.mu.Lock()
	ok, overflow := s.pushLocked(f)
	s.mu.Unlock()
	if overflow {
		s.hub.End(s, ReasonSlowConsumer)
	}
	return ok
}

// deliver queues a live notification frame. During replay it is held back and
// merged when the replay is done; a seq at or below the cursor is dropped, so
// within one session seqs only increase and nothing is sent twice.
func (s *Session) deliver(f Frame) {
	s.mu.Lock()
	var overflow bool
	switch {
	case s.closed:
	case s.replaying:
		s.pending = append(s.pending, f)
		overflow = len(s.pending) > s.limit
	case f.Seq > s.cursor:
		s.cursor = f.Seq
		_, overflow = s.pushLocked(f)
	}
	s.mu.Unlock()
	if overflow {
		s.hub.End(s, ReasonSlowConsumer)
	}
}

// FinishReplay queues the replay backlog (replayed notification frames in seq
// order), then `synced`, then the live notifications that arrived meanwhile,
// and switches the session to live delivery.
func (s *Session) FinishReplay(backlog []Frame, unread int64, truncated bool) {
	s.mu.Lock()
	var overflow bool
	push := func(f Frame) {
		if !overflow {
			_, overflow = s.pushLocked(f)
		}
	}
	for _, f := range backlog {
		if f.Seq > s.cursor {
			s.cursor = f.Seq
			push(f)
		}
	}
	push(SyncedFrame(s.cursor, unread, truncated))
	slices.SortStableFunc(s.pending, func(a, b Frame) int { return int(a.Seq - b.Seq) })
	for _, f := range s.pending {
		if f.Seq > s.cursor {
			s.cursor = f.Seq
			push(f)
		}
	}
	s.pending = nil
	s.replaying = false
	s.mu.Unlock()
	if overflow {
		s.hub.End(s, ReasonSlowConsumer)
	}
}

// pushLocked appends f to the queue. It reports whether f was queued and
// whether the queue overflowed (the caller then ends the session).
func (s *Session) pushLocked(f Frame) (queued, overflow bool) {
	if s.closed {
		return false, false
	}
	if len(s.queue) >= s.limit {
		return false, true
	}
	s.queue = append(s.queue, f)
	select {
	case s.wake <- struct{}{}:
	default:
	}
	if s.notify != nil {
		s.notify()
	}
	return true, false
}

// close marks the session ended; it reports whether this call ended it.
func (s *Session) close(reason Reason) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return false
	}
	s.closed = true
	s.reason = reason
	s.pending = nil
	close(s.done)
	if s.notify != nil {
		s.notify()
	}
	return true
}
