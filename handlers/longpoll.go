package handlers

import (
	"context"
	"encoding/json"
	"sync"
	"sync/atomic"
	"time"

	"github.com/notifyd/notifyd/handlers/realtime"
	"github.com/notifyd/notifyd/store"
)

// pollBatchWindow is how long a poll that was woken waits for more frames,
// so that a burst comes back in one response.
const pollBatchWindow = 10 * time.Millisecond

// longPoll is one long-poll session between and during polls, apart from
// HTTP (poll.go carries it over requests). It holds which poll is in charge
// of the session, the notifications sent and not yet acknowledged by a
// later poll's cursor (sent again until one is, so that an answer that never
// reached the client is not lost), and whether the session's bye is still
// owed to a poll.
//
// Each poll is one exchange: begin, wait when there is nothing to send yet,
// finish, then written once the transport knows whether the answer was
// written. Two polls of one session overlap only in a race; then only the
// newest takes frames: the older one is told to return at once, and the newer
// one begins only once the older no longer listens to the session's Wake.
type longPoll struct {
	hub *realtime.Hub
	s   *realtime.Session
	rec Recorder // takes the acknowledgements; may be nil
	// onAck, if set, runs when a poll's cursor first covers notifications:
	// the session has delivered (the negotiator learns from it).
	onAck func()

	mu       sync.Mutex
	waiter   *pollWaiter      // the poll in charge of the session
	unacked  []realtime.Frame // notifications sent, not covered by a poll's cursor yet, seq order
	given    int64            // highest seq this session has been given
	acked    int64            // highest cursor a poll has confirmed
	byeSent  bool             // an answer carried the session's last frames and bye
	detached bool             // a poll's client went away before its answer
	quiet    bool             // adopted from another node: its hello and its replay's synced are not sent (pollmove.go)
	endSeen  atomic.Bool      // the transport has seen the session end
	// held are frames taken off the session's queue outside a poll (a
	// relayed read's dedup, pollmove.go), for the next poll to take first.
	held []realtime.Frame
	// handover, for an adopted session, counts the reads it got here and
	// from its old copy's relay (pollmove.go); nil when none are matched.
	handover *readHandover
}

// pollWaiter is one poll in charge of a session.
type pollWaiter struct {
	cancel chan struct{} // closed by a newer poll
	exited chan struct{} // closed once this poll stopped listening
}

// newLongPoll is the state of the registered long-poll session s, whose
// client holds everything up to cursor.
func newLongPoll(hub *realtime.Hub, rec Recorder, s *realtime.Session, cursor int64) *longPoll {
	return &longPoll{hub: hub, rec: rec, s: s, given: cursor, acked: cursor}
}

// follows reports whether a poll with this cursor continues the session
// where its previous poll left it: that poll has returned, its client did not
// vanish before the answer, and the cursor is not behind what the session
// already acknowledged. owed reports that no answer has carried the
// session's bye yet.
func (lp *longPoll) follows(cursor int64) (follows, owed bool) {
	lp.mu.Lock()
	defer lp.mu.Unlock()
	return lp.waiter == nil && !lp.detached && cursor >= lp.acked, !lp.byeSent
}

// owesBye reports whether the ended session's bye has yet to reach a poll.
func (lp *longPoll) owesBye() bool {
	lp.mu.Lock()
	defer lp.mu.Unlock()
	return lp.s.Reason().SendsBye() && !lp.byeSent
}

// handOverBye takes the ended session's bye from this node when no poll has
// carried it yet (another node's poll carries it instead); it reports whether
// it did.
func (lp *longPoll) handOverBye() bool {
	lp.mu.Lock()
	defer lp.mu.Unlock()
	if !isDone(lp.s) || !lp.s.Reason().SendsBye() || lp.byeSent || lp.waiter != nil {
		return false
	}
	lp.byeSent = true
	return true
}

// pollExchange is one poll's part in its session: what its answer carries.
type pollExchange struct {
	lp     *longPoll
	me     *pollWaiter      // nil when a newer poll took over before this one began
	resend []realtime.Frame // sent before and not acknowledged
	fresh  []realtime.Frame // sent for the first time
	out    []realtime.Frame // the answer's frames, once finished
}

// begin starts a poll's exchange: it takes charge of the session (an older
// poll returns at once), acknowledges the notifications up to cursor, and
// takes what to send at once: those sent before and not acknowledged, then
// what is queued.
func (lp *longPoll) begin(cursor int64) *pollExchange {
	x := &pollExchange{lp: lp, me: lp.enter()}
	lp.mu.Lock()
	if lp.waiter != x.me {
		lp.mu.Unlock()
		close(x.me.exited)
		x.me = nil
		return x
	}
	x.resend = lp.ackLocked(cursor)
	select {
	case <-lp.s.Wake(): // whatever signalled it is taken now
	default:
	}
	fresh, overflow := lp.takeLocked()
	lp.mu.Unlock()
	if overflow {
		lp.hub.End(lp.s, realtime.ReasonSlowConsumer)
	}
	x.fresh = fresh
	return x
}

// enter makes a new poll the one in charge of lp and waits until the poll it
// replaces (told to return) no longer listens to the session's Wake.
func (lp *longPoll) enter() *pollWaiter {
	me := &pollWaiter{cancel: make(chan struct{}), exited: make(chan struct{})}
	lp.mu.Lock()
	old := lp.waiter
	lp.waiter = me
	if old != nil {
		close(old.cancel)
	}
	lp.mu.Unlock()
	if old != nil {
		<-old.exited
	}
	return me
}

// idle reports that x is in charge of the session and has nothing to send
// yet: the poll may wait.
func (x *pollExchange) idle() bool {
	return x.me != nil && len(x.resend) == 0 && len(x.fresh) == 0
}

// wait blocks until frames are queued (then waits pollBatchWindow more so a
// burst goes in one answer), the session ends, a newer poll arrives, ctx
// ends (the client left), or d passes; it keeps the frames it took.
func (x *pollExchange) wait(ctx context.Context, d time.Duration) {
	lp, s := x.lp, x.lp.s
	timeout := time.NewTimer(d)
	defer timeout.Stop()
	for {
		select {
		case <-s.Wake():
		case <-s.Done():
			return
		case <-x.me.cancel:
			return
		case <-ctx.Done():
			return
		case <-timeout.C:
			return
		}
		batch := time.NewTimer(pollBatchWindow)
		select {
		case <-batch.C:
		case <-s.Done():
		case <-x.me.cancel:
		case <-ctx.Done():
		case <-timeout.C:
		}
		batch.Stop()
		if ctx.Err() != nil {
			return // nothing taken: it stays queued for the next poll
		}
		lp.mu.Lock()
		if lp.waiter != x.me {
			lp.mu.Unlock()
			return
		}
		fresh, overflow := lp.takeLocked()
		lp.mu.Unlock()
		if overflow {
			lp.hub.End(s, realtime.ReasonSlowConsumer)
		}
		if len(fresh) > 0 {
			x.fresh = append(x.fresh, fresh...)
			return
		}
	}
}

// finish ends the exchange begin started and fixes the answer's frames
// (out). Once the session has ended, the first poll to finish carries its
// last frames and its bye, and ended is true. A poll a newer one took over
// from carries nothing: the newer one sends everything.
func (x *pollExchange) finish() (ended bool) {
	if x.me == nil {
		return false
	}
	defer close(x.me.exited)
	lp, s := x.lp, x.lp.s
	lp.mu.Lock()
	defer lp.mu.Unlock()
	if lp.waiter != x.me {
		x.resend, x.fresh = nil, nil
		return false
	}
	lp.waiter = nil
	if isDone(s) && !lp.byeSent {
		last, _ := lp.takeLocked()
		x.fresh = append(x.fresh, last...)
		if reason := s.Reason(); reason.SendsBye() {
			x.fresh = append(x.fresh, lp.hub.Bye(reason))
		}
		lp.byeSent = true
		ended = true
	}
	x.out = append(x.resend, x.fresh...)
	return ended
}

// pollReply is a poll's answer.
type pollReply struct {
	Session  string      `json:"session"`
	Cursor   int64       `json:"cursor"`
	Messages []jsonFrame `json:"messages"`
}

// body is the JSON answer of a finished exchange.
func (x *pollExchange) body() []byte {
	lp := x.lp
	lp.mu.Lock()
	reply := pollReply{Session: lp.s.ID, Cursor: lp.given, Messages: make([]jsonFrame, len(x.out))}
	lp.mu.Unlock()
	for i, f := range x.out {
		reply.Messages[i] = f.JSON
	}
	body, _ := json.Marshal(reply) // raw JSON frames and plain fields cannot fail
	return body
}

// written records the outcome of writing the answer: its fresh frames
// reached the wire (frames sent again are not recorded again), or its client
// is gone (lost), and the next poll is a new connection, which resumes.
func (x *pollExchange) written(lost bool) {
	lp := x.lp
	if lost {
		lp.mu.Lock()
		lp.detached = true
		lp.mu.Unlock()
		return
	}
	if len(x.fresh) > 0 {
		lp.hub.Written(lp.s, x.fresh)
	}
}

// ackLocked drops the notifications up to cursor, which the client confirms
// it holds, recording each as acknowledged, and returns the rest to send again.
func (lp *longPoll) ackLocked(cursor int64) []realtime.Frame {
	lp.acked = max(lp.acked, cursor)
	n := 0
	for n < len(lp.unacked) && lp.unacked[n].Seq <= cursor {
		n++
	}
	if n > 0 {
		if lp.onAck != nil {
			lp.onAck()
		}
		if lp.rec != nil {
			now := time.Now()
			for _, f := range lp.unacked[:n] {
				lp.rec.Acked(store.Ack{NotificationID: f.ID, SessionID: lp.s.ID, At: now})
			}
		}
		rest := copy(lp.unacked, lp.unacked[n:])
		clear(lp.unacked[rest:])
		lp.unacked = lp.unacked[:rest]
	}
	if len(lp.unacked) == 0 {
		return nil
	}
	return append([]realtime.Frame(nil), lp.unacked...)
}

// takeLocked takes the session's queued frames and keeps their notifications
// until a cursor covers them. overflow reports that more are kept than the
// session's queue may hold: the client does not acknowledge, and the session
// is ended as a slow consumer.
func (lp *longPoll) takeLocked() (fresh []realtime.Frame, overflow bool) {
	fresh = append(lp.held, lp.dedupLocked(lp.s.Take())...)
	lp.held = nil
	if lp.quiet {
		fresh = lp.quietLocked(fresh)
	}
	for _, f := range fresh {
		if f.Type != realtime.TypeNotification {
			continue
		}
		lp.unacked = append(lp.unacked, f)
		if f.Seq > lp.given {
			lp.given = f.Seq
		}
	}
	return fresh, len(lp.unacked) > lp.hub.Config().QueueLimit
}

// quietLocked drops an adopted session's hello and the synced that ends its
// replay (kept when the replay was cut short), the client having had both on
// the node it polled before; the frames after that synced go as they are.
func (lp *longPoll) quietLocked(frames []realtime.Frame) []realtime.Frame {
	out := frames[:0]
	for i, f := range frames {
		switch {
		case !lp.quiet:
			out = append(out, f)
		case f.Type == realtime.TypeHello:
		case f.Type == realtime.TypeSynced:
			lp.quiet = false
			if keepSynced(f) {
				out = append(out, f)
			}
		default:
			out = append(out, f)
		}
		frames[i] = realtime.Frame{}
	}
	return out
}

// isDone reports whether s has ended.
func isDone(s *realtime.Session) bool {
	select {
	case <-s.Done():
		return true
	default:
		return false
	}
}
