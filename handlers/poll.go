package handlers

import (
	"context"
	"encoding/json"
	"errors"
	"maps"
	"net/http"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/notifyd/notifyd/handlers/realtime"
	"github.com/notifyd/notifyd/store"
)

// Long-poll settings.
const (
	pollDefaultWait = 25 * time.Second
	pollMaxWait     = 60 * time.Second
	// pollBatchWindow is how long a poll that was woken waits for more
	// frames, so that a burst comes back in one response.
	pollBatchWindow = 10 * time.Millisecond
)

// pollTransport serves GET /v1/poll. A long-poll session lives in the tracker
// between polls like any other; its state here holds what was sent and not
// yet acknowledged by a later poll's cursor, so that a response that never
// reached the client is sent again.
type pollTransport struct {
	api *API

	mu sync.Mutex
	// states holds every live long-poll session by id and, for up to the
	// ping timeout, an ended one whose bye no poll has carried yet.
	states map[string]*pollState
}

// newPoll builds the long-poll transport of a.
func (a *API) newPoll() *pollTransport {
	return &pollTransport{api: a, states: make(map[string]*pollState)}
}

// pollState is one long-poll session between and during polls.
type pollState struct {
	s *realtime.Session

	mu       sync.Mutex
	waiter   *pollWaiter      // the poll now in charge of the session
	unacked  []realtime.Frame // notifications sent, not covered by a poll's cursor yet, seq order
	given    int64            // highest seq this session has been given
	acked    int64            // highest cursor a poll has confirmed
	byeSent  bool             // a response carried the session's last frames and bye
	detached bool             // a poll's client went away before its answer
	endSeen  atomic.Bool      // ended has been started
}

// pollWaiter is one poll request in charge of a session. Two polls of one
// session overlap only in a race (a poll that comes while another waits is a
// new connection, see find); then only the newest takes frames: the older one
// is told to return at once, and the newer one waits until it no longer
// listens to the session's Wake.
type pollWaiter struct {
	cancel chan struct{} // closed by a newer poll
	exited chan struct{} // closed once this poll stopped listening
}

type pollReply struct {
	Session  string      `json:"session"`
	Cursor   int64       `json:"cursor"`
	Messages []jsonFrame `json:"messages"`
}

// parseWait reads the wait parameter in whole seconds (default 25, at most 60).
func parseWait(v string) (time.Duration, error) {
	if v == "" {
		return pollDefaultWait, nil
	}
	n, err := strconv.Atoi(v)
	if err != nil || n < 0 || int64(n) > int64(pollMaxWait/time.Second) { // compared before scaling: n seconds may overflow a Duration
		return 0, errorf(http.StatusBadRequest, "bad_wait", "wait must be a whole number of seconds from 0 to 60")
	}
	return time.Duration(n) * time.Second, nil
}

// serve is GET /v1/poll. Without a long-poll session of this user to
// continue it opens one (a session= of another transport is resumed) and
// answers at once with hello, the replay and synced. Otherwise it
// acknowledges everything up to cursor, and answers with what was sent before
// and not acknowledged plus what is queued, waiting up to wait for something
// to send.
func (p *pollTransport) serve(w http.ResponseWriter, r *http.Request) {
	a := p.api
	wait, err := parseWait(r.URL.Query().Get("wait"))
	if err != nil {
		writeError(w, err)
		return
	}
	cr, err := a.readConnect(r, "")
	if errors.Is(err, errShuttingDown) {
		// While the server drains, a poll still collects its session's bye.
		if st, cursor := p.owedBye(r); st != nil {
			p.answer(w, r, st, cursor, 0, false)
			return
		}
	}
	if err != nil {
		writeError(w, err)
		return
	}
	st := p.find(cr)
	opened := st == nil
	if opened {
		if st, err = p.open(r, cr); err != nil {
			writeError(w, err)
			return
		}
		wait = 0
	}
	p.answer(w, r, st, cr.cursor, wait, opened)
}

// answer runs one poll of st and writes its answer. The first answer of a
// new session (opened) makes it known to later polls only once it has taken
// hello and the replay: a poll that comes meanwhile with the same id (the
// session it replaced) cannot take them, and gets that session's bye. A poll
// that has to wait is taken off net/http first (park).
func (p *pollTransport) answer(w http.ResponseWriter, r *http.Request, st *pollState, cursor int64, wait time.Duration, opened bool) {
	a, s := p.api, st.s
	pinned := !opened && !isDone(s)
	if pinned {
		// A poll is a sign of life; while it waits the session cannot be evicted,
		// and its timeout runs again from when the poll returns.
		a.Hub.Touch(s)
		a.Hub.Pin(s)
	}
	me, out, fresh := st.begin(a, cursor)
	if me != nil && len(out) == 0 && len(fresh) == 0 && wait > 0 {
		if p.park(w, st, me, wait, pinned) {
			return
		}
		fresh = st.wait(r.Context(), a, me, wait)
	}
	out, fresh, ended := st.end(a, me, out, fresh)
	if pinned {
		a.Hub.Unpin(s)
	}
	gone := r.Context().Err() != nil // nobody reads this answer: the next poll is a new connection
	switch {
	case opened && !ended:
		p.track(st)
	case ended:
		p.forget(st)
	}
	h := w.Header()
	for k, v := range pollHeaders {
		h.Set(k, v)
	}
	w.WriteHeader(http.StatusOK)
	_, err := w.Write(st.replyBody(out))
	st.answered(a, fresh, gone || err != nil)
}

// pollHeaders go on every poll answer.
var pollHeaders = map[string]string{
	"Content-Type":      "application/json",
	"Cache-Control":     "no-store",
	"X-Accel-Buffering": "no",
}

// park takes the connection of a poll that has to wait from net/http and
// waits on a goroutine of its own, so that a waiting poll keeps neither the
// handler's goroutine nor net/http's buffers (hijack.go). A second goroutine
// reads the connection, to learn that the client went away. The answer
// closes the connection. It reports false, having changed nothing, when the
// connection cannot be taken (HTTP/2).
func (p *pollTransport) park(w http.ResponseWriter, st *pollState, me *pollWaiter, wait time.Duration, pinned bool) bool {
	a, s := p.api, st.s
	head := w.Header().Clone()
	conn, err := hijack(w)
	if err != nil {
		return false
	}
	release := a.Hub.Hold() // Shutdown waits for this answer (the session's bye)
	ctx, cancel := context.WithCancel(context.Background())
	onClose(conn, cancel)
	go func() {
		defer release()
		defer conn.Close()
		defer cancel()
		fresh := st.wait(ctx, a, me, wait)
		out, fresh, ended := st.end(a, me, nil, fresh)
		if pinned {
			a.Hub.Unpin(s)
		}
		if ended {
			p.forget(st)
		}
		gone := ctx.Err() != nil
		body := st.replyBody(out)
		set := maps.Clone(pollHeaders)
		set["Content-Length"] = strconv.Itoa(len(body))
		_ = conn.SetWriteDeadline(time.Now().Add(writeWait))
		_, err := conn.Write(append(responseHead(head, set), body...))
		st.answered(a, fresh, gone || err != nil)
	}()
	return true
}

// replyBody is the JSON answer carrying out.
func (st *pollState) replyBody(out []realtime.Frame) []byte {
	st.mu.Lock()
	reply := pollReply{Session: st.s.ID, Cursor: st.given, Messages: make([]jsonFrame, len(out))}
	st.mu.Unlock()
	for i, f := range out {
		reply.Messages[i] = f.JSON
	}
	body, _ := json.Marshal(reply) // raw JSON frames and plain fields cannot fail
	return body
}

// answered records the outcome of writing an answer: its fresh frames were
// written, or its client is gone (then the next poll is a new connection).
func (st *pollState) answered(a *API, fresh []realtime.Frame, lost bool) {
	if lost {
		st.mu.Lock()
		st.detached = true
		st.mu.Unlock()
		return
	}
	if len(fresh) > 0 {
		// Frames sent again are not recorded again.
		a.Hub.Written(st.s, fresh)
	}
}

func isDone(s *realtime.Session) bool {
	select {
	case <-s.Done():
		return true
	default:
		return false
	}
}

// find returns the long-poll state a poll continues, or nil for a new
// session (which resumes cr.resume when that is a live session of the user:
// the old transport gets bye replaced, the poll hello and the replay).
//
// A poll continues a live long-poll session of its user when it follows the
// session's previous poll: that one has returned (the client's loop polls
// again only then), its client did not vanish before the answer, and the
// cursor is not behind what the session already acknowledged. Anything else
// is a new connection of the device (a client that gave up on a poll and
// started over, a reloaded page that lost its place) and resumes. A poll for
// an ended session that still owes its bye (kicked, evicted, or replaced by
// another transport while no poll waited) gets that bye.
func (p *pollTransport) find(cr connectRequest) *pollState {
	if cr.resume == "" {
		return nil
	}
	p.mu.Lock()
	st := p.states[cr.resume]
	p.mu.Unlock()
	if st == nil || st.s.User != cr.id.User {
		return nil
	}
	st.mu.Lock()
	follows := st.waiter == nil && !st.detached && cr.cursor >= st.acked
	owed := !st.byeSent
	st.mu.Unlock()
	cur, ok := p.api.Hub.Tracker().Get(cr.resume)
	switch {
	case ok && cur == st.s:
		if follows {
			return st
		}
		return nil
	case isDone(st.s) && owed:
		return st
	}
	return nil
}

// owedBye finds, for a poll refused because the server drains, the ended
// session of the poll's user that still owes its bye.
func (p *pollTransport) owedBye(r *http.Request) (*pollState, int64) {
	id, err := p.api.Auth.Client(r)
	if err != nil {
		return nil, 0
	}
	q := r.URL.Query()
	cursor, err := parseCursor(q.Get("cursor"))
	if err != nil {
		return nil, 0
	}
	p.mu.Lock()
	st := p.states[q.Get("session")]
	p.mu.Unlock()
	if st == nil || st.s.User != id.User || !isDone(st.s) {
		return nil, 0
	}
	return st, cursor
}

// open registers a new long-poll session and queues hello, the replay and synced.
func (p *pollTransport) open(r *http.Request, cr connectRequest) (*pollState, error) {
	a := p.api
	s, err := a.openSession(r, cr, realtime.LongPoll)
	if err != nil {
		return nil, err
	}
	a.replay(s, cr.cursor)
	return &pollState{s: s, given: cr.cursor, acked: cr.cursor}, nil
}

// track makes a new session known to later polls, until it ends. No
// goroutine waits for that end: the session's notify hook (called when a
// frame is queued and when it ends) starts one once it has ended.
func (p *pollTransport) track(st *pollState) {
	p.mu.Lock()
	p.states[st.s.ID] = st
	p.mu.Unlock()
	s := st.s
	endOnce := func() {
		if isDone(s) && st.endSeen.CompareAndSwap(false, true) {
			go p.ended(st)
		}
	}
	s.SetNotify(endOnce)
	endOnce() // it may have ended before the hook was set
}

// ended runs when a long-poll session ends. Its state is dropped, unless the
// session's bye has not reached a poll yet: then it is kept for the ping
// timeout, so that the next poll learns why (kicked, heartbeat_timeout, ...).
func (p *pollTransport) ended(st *pollState) {
	st.mu.Lock()
	owed := st.s.Reason().SendsBye() && !st.byeSent
	st.mu.Unlock()
	if !owed {
		p.forget(st)
		return
	}
	time.AfterFunc(p.api.Hub.Config().PingTimeout, func() { p.forget(st) })
}

// forget drops st unless its id already belongs to a newer long-poll session.
func (p *pollTransport) forget(st *pollState) {
	p.mu.Lock()
	if p.states[st.s.ID] == st {
		delete(p.states, st.s.ID)
	}
	p.mu.Unlock()
}

// begin starts one poll's exchange: it takes charge of the session (an
// older poll returns at once), acknowledges the notifications up to cursor,
// and returns what to send at once: those sent before and not acknowledged,
// then what is queued. If nothing is, the poll may wait for frames (wait)
// before it calls end. me is nil when a newer poll has already taken over.
func (st *pollState) begin(a *API, cursor int64) (me *pollWaiter, out, fresh []realtime.Frame) {
	s := st.s
	me = st.enter()
	st.mu.Lock()
	if st.waiter != me {
		st.mu.Unlock()
		close(me.exited)
		return nil, nil, nil
	}
	out = st.ackLocked(a, cursor)
	select {
	case <-s.Wake(): // whatever signalled it is taken now
	default:
	}
	fresh, overflow := st.takeLocked(a)
	st.mu.Unlock()
	if overflow {
		a.Hub.End(s, realtime.ReasonSlowConsumer)
	}
	return me, out, fresh
}

// end finishes the exchange begin started and returns the frames to send;
// once the session ended, with its last frames and bye (ended). fresh are
// the frames sent for the first time.
func (st *pollState) end(a *API, me *pollWaiter, out, fresh []realtime.Frame) (all, freshAll []realtime.Frame, ended bool) {
	if me == nil {
		return nil, nil, false
	}
	defer close(me.exited)
	s := st.s
	st.mu.Lock()
	defer st.mu.Unlock()
	if st.waiter != me {
		// A newer poll took over while this one waited: it sends everything.
		return nil, nil, false
	}
	st.waiter = nil
	if isDone(s) && !st.byeSent {
		last, _ := st.takeLocked(a)
		fresh = append(fresh, last...)
		if reason := s.Reason(); reason.SendsBye() {
			fresh = append(fresh, a.Hub.Bye(reason))
		}
		st.byeSent = true
		ended = true
	}
	return append(out, fresh...), fresh, ended
}

// enter makes a new poll the one in charge of st and waits until the poll it
// replaces (told to return) no longer listens to the session's Wake.
func (st *pollState) enter() *pollWaiter {
	me := &pollWaiter{cancel: make(chan struct{}), exited: make(chan struct{})}
	st.mu.Lock()
	old := st.waiter
	st.waiter = me
	if old != nil {
		close(old.cancel)
	}
	st.mu.Unlock()
	if old != nil {
		<-old.exited
	}
	return me
}

// wait blocks until frames are queued (then waits pollBatchWindow more so a
// burst goes in one response), the session ends, a newer poll arrives, the
// client leaves, or wait passes; it returns the frames it took.
func (st *pollState) wait(ctx context.Context, a *API, me *pollWaiter, wait time.Duration) []realtime.Frame {
	s := st.s
	timeout := time.NewTimer(wait)
	defer timeout.Stop()
	for {
		select {
		case <-s.Wake():
		case <-s.Done():
			return nil
		case <-me.cancel:
			return nil
		case <-ctx.Done():
			return nil
		case <-timeout.C:
			return nil
		}
		batch := time.NewTimer(pollBatchWindow)
		select {
		case <-batch.C:
		case <-s.Done():
		case <-me.cancel:
		case <-ctx.Done():
		case <-timeout.C:
		}
		batch.Stop()
		if ctx.Err() != nil {
			return nil // nothing taken: it stays queued for the next poll
		}
		st.mu.Lock()
		if st.waiter != me {
			st.mu.Unlock()
			return nil
		}
		fresh, overflow := st.takeLocked(a)
		st.mu.Unlock()
		if overflow {
			a.Hub.End(s, realtime.ReasonSlowConsumer)
		}
		if len(fresh) > 0 {
			return fresh
		}
	}
}

// ackLocked drops the notifications up to cursor, which the client confirms
// it holds, recording each as acknowledged, and returns the rest to send again.
func (st *pollState) ackLocked(a *API, cursor int64) []realtime.Frame {
	st.acked = max(st.acked, cursor)
	n := 0
	for n < len(st.unacked) && st.unacked[n].Seq <= cursor {
		n++
	}
	if n > 0 {
		a.Negotiate.Delivered(st.s)
		if a.Recorder != nil {
			now := time.Now()
			for _, f := range st.unacked[:n] {
				a.Recorder.Acked(store.Ack{NotificationID: f.ID, SessionID: st.s.ID, At: now})
			}
		}
		rest := copy(st.unacked, st.unacked[n:])
		clear(st.unacked[rest:])
		st.unacked = st.unacked[:rest]
	}
	if len(st.unacked) == 0 {
		return nil
	}
	return append([]realtime.Frame(nil), st.unacked...)
}

// takeLocked takes the session's queued frames and keeps their notifications
// until a cursor covers them. overflow reports that more are kept than the
// session's queue may hold: the client does not acknowledge, and the session
// is ended as a slow consumer.
func (st *pollState) takeLocked(a *API) (fresh []realtime.Frame, overflow bool) {
	fresh = st.s.Take()
	for _, f := range fresh {
		if f.Type != realtime.TypeNotification {
			continue
		}
		st.unacked = append(st.unacked, f)
		if f.Seq > st.given {
			st.given = f.Seq
		}
	}
	return fresh, len(st.unacked) > a.Hub.Config().QueueLimit
}
