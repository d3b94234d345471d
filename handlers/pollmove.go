package handlers

import (
	"context"
	"encoding/json"
	"net/http"
	"sync"
	"time"

	"github.com/notifyd/notifyd/handlers/realtime"
	"github.com/notifyd/notifyd/store"
)

// A long-poll session moves to whichever node receives its poll (behind a
// load balancer without sticky sessions, each poll may land on another node).
// A poll naming a session this node neither holds nor ended adopts it: the
// node registers a session of its own for the client, replays the
// notifications above the poll's cursor into it without hello (the client
// had one) and without synced (unless the replay was cut short), answers with
// the new session id, which the client polls with from then on, and tells the
// other nodes through the control channel (store.Control.Move) that the old id moved. The
// node that held it acknowledges up to the cursor and ends it without a bye
// (reasonMoved); if it had ended already and its bye had not reached the
// client (kicked, heartbeat_timeout), it sends that reason back, and the
// adopting node ends the new session with it, so the bye reaches the client.
//
// A `read` queued on the old copy (committed while no poll waited there) is
// not in the replay, which carries notifications only: the old node relays
// each one to the adopted session (store.ControlRelay), which queues it for
// its next poll. A read committed while both copies were registered reaches
// both; the adopted session sends it once (readHandover).

// reasonMoved ends a long-poll session whose client polls another node now;
// it sends no bye (no poll of the client waits here any more).
const reasonMoved realtime.Reason = "moved"

// moveTimeout bounds the NOTIFY telling the other nodes of a move.
const moveTimeout = 2 * time.Second

// Moves carries long-poll moves (store.ControlMoved, store.ControlEnd)
// between the nodes of a cluster: Send tells the others, and Received
// (realtime.Control.OnMove, called for the moves of the control channel)
// hands a move another node sent to the long-poll transport.
type Moves struct {
	// Send tells every node of a move (store.Control.Move).
	Send func(ctx context.Context, m store.ControlMessage) error

	mu     sync.Mutex
	onMove func(store.ControlMessage)
}

// Received applies a move another node sent; before the router exists it is
// dropped. It does not block: it is called from the listener's goroutine.
func (mv *Moves) Received(m store.ControlMessage) {
	mv.mu.Lock()
	on := mv.onMove
	mv.mu.Unlock()
	if on != nil {
		on(m)
	}
}

// attach makes on the receiver of moves.
func (mv *Moves) attach(on func(store.ControlMessage)) {
	mv.mu.Lock()
	mv.onMove = on
	mv.mu.Unlock()
}

// adoptable reports whether a poll naming resume should adopt it: moves are
// on, and this node neither holds a session of that id, nor keeps state for
// it (an ended session whose bye is owed is answered by find), nor ended it
// lately (the client's next poll after a bye opens a new session).
func (p *pollTransport) adoptable(cr connectRequest) bool {
	if p.api.Moves == nil || cr.resume == "" {
		return false
	}
	if _, ok := p.api.Hub.Session(cr.resume); ok {
		return false
	}
	p.mu.Lock()
	_, known := p.states[cr.resume]
	gone := p.gone.has(cr.resume)
	p.mu.Unlock()
	if known || gone {
		return false
	}
	// Only a long-poll session of the poll's own user moves. A WebSocket or SSE
	// session, open on another node or ended anywhere, is resumed instead: the
	// poll opens a new session (hello, replay, synced) and an open one is
	// replaced; another user's session id opens a new session. A session whose
	// history row is not written yet (a poll right after its session started)
	// moves; the node holding it checks the user when it hears of the move.
	if p.api.Control != nil {
		ctx, cancel := context.WithTimeout(context.Background(), controlTimeout)
		defer cancel()
		ref, ok, err := p.api.Control.SessionOf(ctx, cr.resume)
		if err == nil && ok && (ref.Transport != string(realtime.LongPoll) || ref.User != cr.id.User) {
			return false
		}
	}
	return true
}

// adopt registers a session of this node for a poll that names a session
// another node held (cr.resume) and replays from the poll's cursor into it,
// quietly (no hello, no synced unless the replay was cut), then tells the
// other nodes that cr.resume moved. The session is known to later polls at once.
func (p *pollTransport) adopt(r *http.Request, cr connectRequest) (*longPoll, error) {
	a := p.api
	from := cr.resume
	// Not a connect: the connect limits counted the session once, where it
	// opened. A new id here: the old one lives on another node.
	s := a.Hub.NewSession(realtime.SessionInfo{
		User: cr.id.User, Device: cr.id.Device, Transport: realtime.LongPoll,
		RemoteAddr: r.RemoteAddr, UserAgent: truncateUA(r.UserAgent()), Network: a.sessionNetwork(r),
	}, cr.cursor)
	// It takes the old copy's place one for one: the cap counts this node's
	// sessions, not the cluster's (no query for the other nodes on a poll).
	if err := a.Hub.Register(s, ""); err != nil {
		return nil, err // ErrTooManySessions carries its code: 429 too_many_sessions
	}
	lp := newLongPoll(a.Hub, a.Recorder, s, cr.cursor)
	lp.quiet = true
	lp.handover = &readHandover{until: time.Now().Add(handoverFor), here: map[string]int{}, relayed: map[string]int{}}
	lp.onAck = func() { a.Negotiate.Delivered(s) }
	a.replay(s, cr.cursor)
	p.track(lp)
	ctx, cancel := context.WithTimeout(r.Context(), moveTimeout)
	defer cancel()
	if err := a.Moves.Send(ctx, store.ControlMessage{Kind: store.ControlMoved, Session: from, To: s.ID, User: cr.id.User, Cursor: cr.cursor}); err != nil {
		// The old copy then ends at its heartbeat timeout; until then presence lists both.
		a.Log.Warn("long-poll move: could not tell the other nodes", "from", from, "session", s.ID, "err", err)
	}
	return lp, nil
}

// onMove applies a move another node sent; one naming a session this node
// does not hold as a long-poll of that user is ignored.
//
// moved: the session's client polls the other node now. A live session is
// acknowledged up to the cursor the client polled there with and ended
// without a bye. An ended one whose bye no poll carried sends its reason
// back (end), for the adopting node to end its session with.
//
// end: the adopted session is ended for the reason its old copy ended with.
//
// relay: a read queued on the old copy goes to the adopted session, once.
//
// It runs on the listener's goroutine, which delivers every commit: the end
// it sends back goes out from a goroutine of its own (bounded by
// moveTimeout), so no round trip holds the listener up.
func (p *pollTransport) onMove(m store.ControlMessage) {
	p.mu.Lock()
	st := p.states[m.Session]
	p.mu.Unlock()
	if st == nil || st.s.User != m.User {
		return
	}
	switch m.Kind {
	case store.ControlRelay:
		st.relay(realtime.ReadFrame(m.IDs, m.Unread))
	case store.ControlEnd:
		if reason := realtime.Reason(m.Reason); reason.SendsBye() {
			p.api.Hub.End(st.s, reason)
		}
	case store.ControlMoved:
		if cur, ok := p.api.Hub.Session(m.Session); ok && cur == st.s {
			st.mu.Lock()
			st.ackLocked(m.Cursor)
			reads := st.takeReadsLocked()
			st.mu.Unlock()
			p.api.Hub.End(st.s, reasonMoved)
			p.relayReads(m, reads)
			return
		}
		if !st.handOverBye() {
			return
		}
		p.forget(st)
		end := store.ControlMessage{Kind: store.ControlEnd, Session: m.To, Reason: string(st.s.Reason()), User: m.User}
		go func() {
			ctx, cancel := context.WithTimeout(context.Background(), moveTimeout)
			defer cancel()
			if err := p.api.Moves.Send(ctx, end); err != nil {
				p.api.Log.Warn("long-poll move: could not pass the bye on", "session", m.Session, "to", m.To, "err", err)
			}
		}()
	}
}

// relayReads sends the reads taken off a moved session's old copy to the
// session adopting it (m.To), in their order, from a goroutine of its own
// (each NOTIFY bounded by moveTimeout), so that no round trip holds the
// listener up.
func (p *pollTransport) relayReads(m store.ControlMessage, reads []realtime.Frame) {
	if len(reads) == 0 {
		return
	}
	msgs := make([]store.ControlMessage, 0, len(reads))
	for _, f := range reads {
		var r struct {
			IDs    []string `json:"ids"`
			Unread int64    `json:"unread"`
		}
		_ = json.Unmarshal(f.JSON, &r) // the hub's own frame
		msgs = append(msgs, store.ControlMessage{Kind: store.ControlRelay, Session: m.To, User: m.User, Unread: r.Unread, IDs: r.IDs})
	}
	go func() {
		for _, rm := range msgs {
			ctx, cancel := context.WithTimeout(context.Background(), moveTimeout)
			err := p.api.Moves.Send(ctx, rm)
			cancel()
			if err != nil {
				p.api.Log.Warn("long-poll move: could not relay a read", "session", m.Session, "to", m.To, "err", err)
				return
			}
		}
	}()
}

// takeReadsLocked takes the reads queued on a session that moved away; its
// other frames stay for a poll that may still wait here.
func (lp *longPoll) takeReadsLocked() []realtime.Frame {
	var reads, rest []realtime.Frame
	for _, f := range append(lp.held, lp.dedupLocked(lp.s.Take())...) {
		if f.Type == realtime.TypeRead {
			reads = append(reads, f)
		} else {
			rest = append(rest, f)
		}
	}
	lp.held = rest
	return reads
}

// handoverFor bounds how long an adopted session matches the reads relayed
// from its old copy against those it got here: a relay follows the move
// within a control round trip or two.
const handoverFor = 10 * time.Second

// readHandover counts, by frame, the reads an adopted session got from this
// node's broadcasts (here) and from its old copy's relay (relayed). A read
// committed while both copies were registered arrives both ways: the client
// gets each frame as often as the more frequent way carries it, so once.
// (Two distinct reads with the same ids and count in the handover window
// count as one: the client's state after them is the same.)
type readHandover struct {
	until         time.Time
	here, relayed map[string]int
}

// activeHandover returns lp's handover while it runs; it drops one that ended.
func (lp *longPoll) activeHandover() *readHandover {
	if lp.handover != nil && time.Now().After(lp.handover.until) {
		lp.handover = nil
	}
	return lp.handover
}

// dedupLocked passes frames taken off the session's queue, dropping a read
// from this node that the relay already carried. A relayed read is marked
// Replayed (it comes from the old copy, not from this node's broadcast) and
// was counted when it arrived.
func (lp *longPoll) dedupLocked(frames []realtime.Frame) []realtime.Frame {
	h := lp.activeHandover()
	if h == nil {
		return frames
	}
	out := frames[:0]
	for _, f := range frames {
		if f.Type == realtime.TypeRead && !f.Replayed {
			k := string(f.JSON)
			h.here[k]++
			if h.here[k] <= h.relayed[k] {
				continue
			}
		}
		out = append(out, f)
	}
	clear(frames[len(out):])
	return out
}

// relay queues a read relayed from the session's old copy unless this node
// sent the same read already. The session's queue is taken into held first,
// so that every read from this node queued before the relay is counted.
func (lp *longPoll) relay(f realtime.Frame) {
	lp.mu.Lock()
	send := true
	var overflow bool
	if h := lp.activeHandover(); h != nil {
		lp.held = append(lp.held, lp.dedupLocked(lp.s.Take())...)
		overflow = len(lp.held) > lp.hub.Config().QueueLimit
		k := string(f.JSON)
		h.relayed[k]++
		send = h.relayed[k] > h.here[k]
	}
	lp.mu.Unlock()
	if overflow {
		lp.hub.End(lp.s, realtime.ReasonSlowConsumer)
		return
	}
	if send {
		f.Replayed = true
		lp.s.Send(f)
	}
}

// recentIDs remembers the last recentIDsMax session ids that ended on this
// node, so that a poll naming one opens a new session rather than adopting it.
type recentIDs struct {
	set  map[string]struct{}
	ring []string
	next int
}

const recentIDsMax = 4096

func (r *recentIDs) add(id string) {
	if r.set == nil {
		r.set = make(map[string]struct{}, recentIDsMax)
		r.ring = make([]string, recentIDsMax)
	}
	if _, ok := r.set[id]; ok {
		return
	}
	delete(r.set, r.ring[r.next])
	r.ring[r.next] = id
	r.set[id] = struct{}{}
	r.next = (r.next + 1) % recentIDsMax
}

func (r *recentIDs) has(id string) bool {
	_, ok := r.set[id]
	return ok
}

// keepSynced reports whether an adopted session's replay must still end in
// synced: the replay was cut short (truncated), and the client must learn it.
func keepSynced(f realtime.Frame) bool {
	var m struct {
		Truncated bool `json:"truncated"`
	}
	_ = json.Unmarshal(f.JSON, &m) // the hub's own frame
	return m.Truncated
}
