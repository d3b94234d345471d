package handlers

import (
	"context"
	"errors"
	"maps"
	"net/http"
	"strconv"
	"sync"
	"time"

	"github.com/notifyd/notifyd/handlers/realtime"
)

// Long-poll settings.
const (
	pollDefaultWait = 25 * time.Second
	pollMaxWait     = 60 * time.Second
)

// pollTransport serves GET /v1/poll. A long-poll session lives in the hub
// between polls like any other; the transport keeps each one's longPoll
// state (longpoll.go) from one poll to the next.
type pollTransport struct {
	api *API

	mu sync.Mutex
	// states holds every live long-poll session by id and, for up to the
	// ping timeout, an ended one whose bye no poll has carried yet.
	states map[string]*longPoll
	// gone are the ids of the sessions lately dropped from states (pollmove.go).
	gone recentIDs
}

// newPoll builds the long-poll transport of a.
func (a *API) newPoll() *pollTransport {
	p := &pollTransport{api: a, states: make(map[string]*longPoll)}
	if a.Moves != nil {
		a.Moves.attach(p.onMove)
	}
	return p
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

// serve is GET /v1/poll. A poll naming a session another node holds
// adopts it (pollmove.go): a session of this node, replayed from the cursor
// without hello, answered like a continuing poll. Without a long-poll session
// of this user to continue it opens one (a session= of another transport is
// resumed) and answers at once with hello, the replay and synced. Otherwise it
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
	opened := false
	switch {
	case st != nil:
	case p.adoptable(cr):
		if st, err = p.adopt(r, cr); err != nil {
			writeError(w, err)
			return
		}
	default:
		if st, err = p.open(r, cr); err != nil {
			writeError(w, err)
			return
		}
		opened, wait = true, 0
	}
	p.answer(w, r, st, cr.cursor, wait, opened)
}

// answer runs one poll of st and writes its answer. The first answer of a
// new session (opened) makes it known to later polls only once it has taken
// hello and the replay: a poll that comes meanwhile with the same id (the
// session it replaced) cannot take them, and gets that session's bye. A poll
// that has to wait is taken off net/http first (park).
func (p *pollTransport) answer(w http.ResponseWriter, r *http.Request, st *longPoll, cursor int64, wait time.Duration, opened bool) {
	a, s := p.api, st.s
	pinned := !opened && !isDone(s)
	if pinned {
		// A poll is a sign of life; while it waits the session cannot be evicted,
		// and its timeout runs again from when the poll returns.
		a.Hub.Touch(s)
		a.Hub.Pin(s)
	}
	x := st.begin(cursor)
	if x.idle() && wait > 0 {
		if p.park(w, x, wait, pinned) {
			return
		}
		x.wait(r.Context(), wait)
	}
	body := p.conclude(x, pinned, opened)
	gone := r.Context().Err() != nil // nobody reads this answer: the next poll is a new connection
	h := w.Header()
	for k, v := range pollHeaders {
		h.Set(k, v)
	}
	w.WriteHeader(http.StatusOK)
	_, err := w.Write(body)
	x.written(gone || err != nil)
}

// conclude finishes a poll's exchange once it is done waiting and returns
// its answer's body: the session is unpinned, a new session (opened) becomes
// known to later polls, and one whose bye this answer carries is forgotten.
func (p *pollTransport) conclude(x *pollExchange, pinned, opened bool) []byte {
	ended := x.finish()
	if pinned {
		p.api.Hub.Unpin(x.lp.s)
	}
	switch {
	case opened && !ended:
		p.track(x.lp)
	case ended:
		p.forget(x.lp)
	}
	return x.body()
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
func (p *pollTransport) park(w http.ResponseWriter, x *pollExchange, wait time.Duration, pinned bool) bool {
	head := w.Header().Clone()
	conn, err := hijack(w)
	if err != nil {
		return false
	}
	release := p.api.Hub.Hold() // Shutdown waits for this answer (the session's bye)
	ctx, cancel := context.WithCancel(context.Background())
	onClose(conn, cancel)
	go func() {
		defer release()
		defer conn.Close()
		defer cancel()
		x.wait(ctx, wait)
		body := p.conclude(x, pinned, false)
		gone := ctx.Err() != nil
		set := maps.Clone(pollHeaders)
		set["Content-Length"] = strconv.Itoa(len(body))
		_ = conn.SetWriteDeadline(time.Now().Add(writeWait))
		_, err := conn.Write(append(responseHead(head, set), body...))
		x.written(gone || err != nil)
	}()
	return true
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
func (p *pollTransport) find(cr connectRequest) *longPoll {
	if cr.resume == "" {
		return nil
	}
	p.mu.Lock()
	st := p.states[cr.resume]
	p.mu.Unlock()
	if st == nil || st.s.User != cr.id.User {
		return nil
	}
	follows, owed := st.follows(cr.cursor)
	cur, ok := p.api.Hub.Session(cr.resume)
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
func (p *pollTransport) owedBye(r *http.Request) (*longPoll, int64) {
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
func (p *pollTransport) open(r *http.Request, cr connectRequest) (*longPoll, error) {
	a := p.api
	s, err := a.openSession(r, cr, realtime.LongPoll)
	if err != nil {
		return nil, err
	}
	a.replay(s, cr.cursor)
	lp := newLongPoll(a.Hub, a.Recorder, s, cr.cursor)
	lp.onAck = func() { a.Negotiate.Delivered(s) }
	return lp, nil
}

// track makes a new session known to later polls, until it ends. No
// goroutine waits for that end: the session's notify hook (called when a
// frame is queued and when it ends) starts one once it has ended.
func (p *pollTransport) track(st *longPoll) {
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
func (p *pollTransport) ended(st *longPoll) {
	if !st.owesBye() {
		p.forget(st)
		return
	}
	time.AfterFunc(p.api.Hub.Config().PingTimeout, func() { p.forget(st) })
}

// forget drops st unless its id already belongs to a newer long-poll session.
func (p *pollTransport) forget(st *longPoll) {
	p.mu.Lock()
	if p.states[st.s.ID] == st {
		delete(p.states, st.s.ID)
		p.gone.add(st.s.ID)
	}
	p.mu.Unlock()
}
