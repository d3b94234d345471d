package realtime

import (
	"context"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"time"

	"github.com/google/uuid"
)

// Config holds the hub's settings.
type Config struct {
	// PingInterval is how often clients ping; PingTimeout is how long a session
	// may stay silent before it is evicted.
	PingInterval, PingTimeout time.Duration
	// SweepEvery is the sweeper's tick and the wheel's slot width; eviction
	// happens within two of them after the deadline. Default 250ms.
	SweepEvery time.Duration
	// MaxSessionsPerUser refuses new sessions past it (0: no limit).
	MaxSessionsPerUser int
	// QueueLimit bounds the frames queued to one session (replay backlog
	// included); past it the session is ended as a slow consumer.
	QueueLimit int
	// ByeRetry is the retry_ms sent in bye; shutdown adds up to the same again
	// as jitter so that clients do not all come back at once.
	ByeRetry time.Duration
}

// DefaultQueueLimit is the QueueLimit of a zero Config: the server's default live queue (256)
// on top of its default replay (1,000), as cmd/notifyd's config sets them.
const DefaultQueueLimit = 256 + 1000

// Hooks let the owner of the hub observe sessions without the hub knowing who
// records them. Each may be nil and must not block.
type Hooks struct {
	// Started runs once a session is registered and its hello is queued.
	Started func(s *Session)
	// Ended runs once when a session ends.
	Ended func(s *Session, reason Reason)
	// Written runs after a transport wrote frames to its wire.
	Written func(s *Session, frames []Frame)
}

// Hub ties the presence tracker, the heartbeat sweeper and delivery together.
// It knows nothing of HTTP: transports create sessions, register them, drain
// their queues and report what they wrote. Presence is reached only through
// it (Session, UserSessions, Sessions, Kick, Stats), never the tracker.
type Hub struct {
	cfg     Config
	hooks   Hooks
	tracker *Tracker
	wheel   *wheel

	evictions  atomic.Uint64
	deliveries atomic.Uint64
	sweepLast  atomic.Int64 // nanoseconds the last sweep tick took
	sweepMax   atomic.Int64 // and the longest one
	sweepMu    sync.Mutex   // one Sweep at a time; guards sweepBuf
	sweepBuf   []*Session   // Sweep's list of due sessions, kept between ticks
	closing    atomic.Bool
	writers    sync.WaitGroup
	holdMu     sync.Mutex // orders Hold against Shutdown's wait
	draining   bool
	reads      readWaiters // reads of this node awaiting their NOTIFY (control.go)
}

// Stats are the hub's totals.
type Stats struct {
	Sessions    int64               `json:"sessions"`
	Users       int64               `json:"users"`
	ByTransport map[Transport]int64 `json:"by_transport"`
	Evictions   uint64              `json:"evictions"`
	Deliveries  uint64              `json:"deliveries"`
	// SweepLast and SweepMax are how long the last and the longest sweep
	// tick took (Run times them).
	SweepLast time.Duration `json:"-"`
	SweepMax  time.Duration `json:"-"`
}

// NewHub returns a hub; call Run to start its sweeper.
func NewHub(cfg Config, hooks Hooks) *Hub {
	if cfg.SweepEvery <= 0 {
		cfg.SweepEvery = 250 * time.Millisecond
	}
	if cfg.QueueLimit <= 0 {
		cfg.QueueLimit = DefaultQueueLimit
	}
	if cfg.ByeRetry <= 0 {
		cfg.ByeRetry = time.Second
	}
	return &Hub{cfg: cfg, hooks: hooks, tracker: NewTracker(), wheel: newWheel(cfg.SweepEvery, time.Now())}
}

// Config returns the hub's settings.
func (h *Hub) Config() Config { return h.cfg }

// Closing reports whether Shutdown has begun; transports refuse new sessions then.
func (h *Hub) Closing() bool { return h.closing.Load() }

// NewSession makes an unregistered session that holds back live
// notifications until FinishReplay; cursor is the highest seq the client holds.
func (h *Hub) NewSession(info SessionInfo, cursor int64) *Session {
	now := time.Now()
	s := &Session{
		SessionInfo: info,
		ConnectedAt: now,
		ConnID:      newConnID(),
		hub:         h,
		limit:       h.cfg.QueueLimit,
		replaying:   true,
		cursor:      cursor,
		wake:        make(chan struct{}, 1),
		done:        make(chan struct{}),
	}
	s.lastSeen.Store(now.UnixNano())
	return s
}

func newConnID() string {
	id, err := uuid.NewV7()
	if err != nil {
		return uuid.NewString()
	}
	return id.String()
}

// Register makes s live: it takes the id of the session named by resume when
// that is a live session of the same user (which is ended with `replaced`),
// queues hello as its first frame and starts its heartbeat deadline. It fails
// with ErrTooManySessions past the per-user limit.
func (h *Hub) Register(s *Session, resume string) error {
	return h.RegisterCounted(s, resume, 0)
}

// RegisterCounted is Register with elsewhere more sessions of the user counted against the
// per-user limit: those the user has on the cluster's other nodes. The limit is checked
// against the sessions here plus elsewhere, under the user's lock as Register checks it.
func (h *Hub) RegisterCounted(s *Session, resume string, elsewhere int) error {
	replaced, err := h.tracker.addCounted(s, resume, h.cfg.MaxSessionsPerUser, elsewhere, func() {
		s.Send(HelloFrame(s, h.cfg.PingInterval, h.cfg.PingTimeout, time.Now()))
	})
	if err != nil {
		return err
	}
	if replaced != nil {
		h.End(replaced, ReasonReplaced)
		s.inheritSent(replaced) // acks of what the replaced connection was sent stay valid
	}
	h.Touch(s)
	if h.hooks.Started != nil {
		h.hooks.Started(s)
	}
	if h.closing.Load() {
		h.End(s, ReasonShutdown)
	}
	return nil
}

// End ends s for reason: it is closed (its writer then says bye where the
// transport can), removed from presence and from the sweeper. Safe to call
// many times and from any goroutine; only the first call counts.
func (h *Hub) End(s *Session, reason Reason) {
	if s.close(reason) {
		one := [1]*Session{s}
		h.retire(one[:], reason)
	}
}

// retire finishes ending sessions that this caller's close has just ended
// (close marks the reason and lets the session's writer say bye): each is
// removed from presence and from the wheel, counted when evicted, and
// reported to the Ended hook. It is the one way a session leaves the hub,
// for End and Sweep alike. A batch is removed from presence at once
// (Tracker.removeAll), which locks each shard once.
func (h *Hub) retire(ended []*Session, reason Reason) {
	if len(ended) == 1 {
		h.tracker.remove(ended[0])
	} else {
		h.tracker.removeAll(ended)
	}
	h.wheel.mu.Lock()
	for _, s := range ended {
		// A swept session is out of the wheel already, but a Touch that
		// raced its close may have put it back.
		h.wheel.unlink(s)
		s.pins = 0
	}
	h.wheel.mu.Unlock()
	if reason == ReasonHeartbeat {
		h.evictions.Add(uint64(len(ended)))
	}
	if h.hooks.Ended != nil {
		for _, s := range ended {
			h.hooks.Ended(s, reason)
		}
	}
}

// keepAll keeps the sessions of ss for which keep is true, compacted into ss
// in their order, and returns them. A large batch is spread over the cores:
// keep is called from several goroutines then, each on its own share.
func keepAll(ss []*Session, keep func(s *Session) bool) []*Session {
	workers := workersFor(len(ss))
	if workers == 1 {
		out := ss[:0]
		for _, s := range ss {
			if keep(s) {
				out = append(out, s)
			}
		}
		return out
	}
	kept := make([][]*Session, workers)
	run(workers, func(w int) {
		share := ss[w*len(ss)/workers : (w+1)*len(ss)/workers]
		k := share[:0]
		for _, s := range share {
			if keep(s) {
				k = append(k, s)
			}
		}
		kept[w] = k
	})
	out := ss[:0]
	for _, k := range kept {
		out = append(out, k...) // k is a prefix of its share: no overlap ahead
	}
	return out
}

// Touch records a sign of life from s and moves its deadline.
func (h *Hub) Touch(s *Session) {
	now := time.Now().UnixNano()
	s.lastSeen.Store(now)
	deadline := now + int64(h.cfg.PingTimeout)
	if s.slot.Load() == h.wheel.slotOf(deadline) {
		return // already in the right slot: the common case costs no lock
	}
	h.wheel.mu.Lock()
	if !s.isClosed() {
		h.wheel.schedule(s, deadline)
	}
	h.wheel.mu.Unlock()
}

// Pin keeps s from being evicted while a long-poll request waits on it; Unpin
// lets its timeout run again from now.
func (h *Hub) Pin(s *Session) {
	h.wheel.mu.Lock()
	s.pins++
	h.wheel.unlink(s)
	h.wheel.mu.Unlock()
}

// Unpin undoes one Pin and touches s.
func (h *Hub) Unpin(s *Session) {
	h.wheel.mu.Lock()
	if s.pins > 0 {
		s.pins--
	}
	h.wheel.mu.Unlock()
	h.Touch(s)
}

// Sweep evicts every session whose heartbeat deadline has passed at now and
// returns how many it evicted. Its cost grows with the sessions that expire.
// A session touched since its slot came due goes back in the wheel; the
// others are ended as End would, in one batch: closed over several cores
// (closing one costs a cache miss on its done channel, which the cores take
// in parallel), then retired together.
func (h *Hub) Sweep(now time.Time) int {
	h.sweepMu.Lock()
	defer h.sweepMu.Unlock()
	due := h.wheel.expire(now.UnixNano(), h.sweepBuf[:0])
	if len(due) == 0 {
		return 0
	}
	defer func() {
		clear(due) // keep no ended session alive
		if cap(due) <= 1<<16 {
			h.sweepBuf = due[:0]
		}
	}()
	// One pass over the cores rechecks each deadline and closes the late
	// ones; retire then finishes them as a batch.
	ended := keepAll(due, func(s *Session) bool {
		deadline := s.lastSeen.Load() + int64(h.cfg.PingTimeout)
		if deadline <= now.UnixNano() {
			return s.close(ReasonHeartbeat)
		}
		// Touched between the slot's expiry and now: put it back.
		h.wheel.mu.Lock()
		if !s.isClosed() {
			h.wheel.schedule(s, deadline)
		}
		h.wheel.mu.Unlock()
		return false
	})
	h.retire(ended, ReasonHeartbeat)
	return len(ended)
}

// Run sweeps every SweepEvery until ctx ends.
func (h *Hub) Run(ctx context.Context) {
	t := time.NewTicker(h.cfg.SweepEvery)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case now := <-t.C:
			start := time.Now()
			h.Sweep(now)
			took := int64(time.Since(start))
			h.sweepLast.Store(took)
			if took > h.sweepMax.Load() {
				h.sweepMax.Store(took) // only this goroutine writes it
			}
		}
	}
}

// Deliver queues live notifications to every session of their users. ns may
// mix users; each notification is encoded once, only if someone is online.
func (h *Hub) Deliver(ns []Notification) {
	var sessions []*Session
	for i := 0; i < len(ns); {
		user := ns[i].User
		j := i + 1
		for j < len(ns) && ns[j].User == user {
			j++
		}
		sessions = h.tracker.appendUserSessions(sessions[:0], user)
		if len(sessions) > 0 {
			for _, n := range ns[i:j] {
				f := NotificationFrame(n, false)
				for _, s := range sessions {
					s.deliver(f)
				}
			}
		}
		i = j
	}
	clear(sessions)
}

// BroadcastRead tells every session of user that ids were read and what the
// unread count now is.
func (h *Hub) BroadcastRead(user string, ids []string, unread int64) {
	f := ReadFrame(ids, unread)
	for _, s := range h.tracker.UserSessions(user) {
		s.Send(f)
	}
}

// Kick ends the session with this id (`bye kicked`); false if it is not live.
func (h *Hub) Kick(id string) bool {
	s, ok := h.tracker.Get(id)
	if !ok {
		return false
	}
	h.End(s, ReasonKicked)
	return true
}

// Session returns the live session with this id.
func (h *Hub) Session(id string) (*Session, bool) { return h.tracker.Get(id) }

// UserSessions returns the live sessions of user (a copy).
func (h *Hub) UserSessions(user string) []*Session { return h.tracker.UserSessions(user) }

// UserSessionCount is how many live sessions user has here.
func (h *Hub) UserSessionCount(user string) int { return h.tracker.sessionsOf(user) }

// Sessions returns every live session.
func (h *Hub) Sessions() []*Session { return h.tracker.All() }

// Cursors returns, for every user online, the lowest cursor of their
// sessions: catching up from there after a lost NOTIFY reaches everyone.
func (h *Hub) Cursors() map[string]int64 {
	out := make(map[string]int64)
	h.tracker.Users(func(user string, list []*Session) {
		low := int64(-1)
		for _, s := range list {
			if c := s.Cursor(); low < 0 || c < low {
				low = c
			}
		}
		out[user] = low
	})
	return out
}

// Written is called by a transport after it wrote frames to its wire.
func (h *Hub) Written(s *Session, frames []Frame) {
	var n uint64
	for i := range frames {
		if frames[i].Type == TypeNotification {
			n++
		}
	}
	h.deliveries.Add(n)
	if h.hooks.Written != nil {
		h.hooks.Written(s, frames)
	}
}

// Bye is the bye frame for reason, with the retry delay the client should wait.
func (h *Hub) Bye(reason Reason) Frame {
	retry := h.cfg.ByeRetry
	if reason == ReasonShutdown {
		retry += rand.N(h.cfg.ByeRetry)
	}
	return ByeFrame(reason, retry)
}

// Hold counts a transport's writer that Shutdown waits for. Call the
// returned function once the connection's last write (its bye) is done;
// calls after the first do nothing. Once Shutdown is waiting, a new hold is
// not counted (its session was refused or ended already).
func (h *Hub) Hold() (release func()) {
	h.holdMu.Lock()
	defer h.holdMu.Unlock()
	if h.draining {
		return func() {}
	}
	h.writers.Add(1)
	var once sync.Once
	return func() { once.Do(h.writers.Done) }
}

// Shutdown refuses new sessions, ends every session with `bye shutdown` and
// waits until every Hold has been released or ctx ends.
func (h *Hub) Shutdown(ctx context.Context) error {
	h.closing.Store(true)
	for _, s := range h.tracker.All() {
		h.End(s, ReasonShutdown)
	}
	h.holdMu.Lock()
	h.draining = true
	h.holdMu.Unlock()
	done := make(chan struct{})
	go func() {
		h.writers.Wait()
		close(done)
	}()
	select {
	case <-done:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// Stats returns the hub's totals.
func (h *Hub) Stats() Stats {
	sessions, users, byTransport := h.tracker.Counts()
	return Stats{Sessions: sessions, Users: users, ByTransport: byTransport,
		Evictions: h.evictions.Load(), Deliveries: h.deliveries.Load(),
		SweepLast: time.Duration(h.sweepLast.Load()), SweepMax: time.Duration(h.sweepMax.Load())}
}

func (s *Session) isClosed() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.closed
}
