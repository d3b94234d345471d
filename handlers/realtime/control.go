package realtime

import (
	"context"
	"log/slog"
	"sync"
	"time"

	"github.com/notifyd/notifyd/store"
)

// ReadResolver looks up the ids of a read too large for its NOTIFY
// (store.ControlReadRange): *store.Store.
type ReadResolver interface {
	ReadIDs(ctx context.Context, m store.ControlMessage) ([]string, error)
}

// Control applies the control channel's messages (store.ParseControl) to
// this node's sessions. Every node receives every message; each acts on the
// sessions it holds:
//   - read: a `read` frame to every local session of the user, through the
//     dispatcher's queue (Dispatcher.InOrder) so that it keeps its commit order
//     with the notifications around it;
//   - kick and replace: the local session with that id and user ends with
//     `bye kicked` or `bye replaced`; a node that does not hold it does nothing;
//   - touch: the local sessions named are refreshed (Hub.Touch);
//   - moved, end and relay: handed to OnMove (the long-poll transport's);
//   - ack: the ids go to OnAck with the local session of that id and user, to
//     be admitted as a local ack is; a node that does not hold it does nothing.
type Control struct {
	// OnMove, when set before the listener runs, receives the long-poll moves
	// (store.ControlMoved, store.ControlEnd) and the reads relayed with them
	// (store.ControlRelay), from the listener's goroutine in
	// arrival order; it must not block. Nil drops them.
	OnMove func(store.ControlMessage)
	// OnAck, when set before the listener runs, receives the acks another
	// node forwarded (store.ControlAck) for a session this node holds, with
	// that session, whose User is the message's; from the listener's
	// goroutine, so it must not block. Nil drops them.
	OnAck func(s *Session, ids []string)

	hub      *Hub
	dispatch *Dispatcher
	resolve  ReadResolver
	log      *slog.Logger
}

// NewControl returns the applier; Apply is the listener's OnControl.
func NewControl(hub *Hub, dispatch *Dispatcher, resolve ReadResolver, log *slog.Logger) *Control {
	if log == nil {
		log = slog.Default()
	}
	return &Control{hub: hub, dispatch: dispatch, resolve: resolve, log: log}
}

// Apply handles the messages of one payload, in their order.
func (c *Control) Apply(msgs []store.ControlMessage) {
	var reads []store.ControlMessage
	for _, m := range msgs {
		switch m.Kind {
		case store.ControlRead, store.ControlReadRange:
			if c.hub.tracker.Online(m.User) || c.hub.reads.waiting(m.User) {
				reads = append(reads, m)
			}
		case store.ControlKick:
			c.hub.endIfUser(m.Session, m.User, ReasonKicked)
		case store.ControlReplace:
			c.hub.endIfUser(m.Session, m.User, ReasonReplaced)
		case store.ControlTouch:
			for _, id := range m.IDs {
				if s, ok := c.hub.tracker.Get(id); ok {
					c.hub.Touch(s)
				}
			}
		case store.ControlMoved, store.ControlEnd, store.ControlRelay:
			if c.OnMove != nil {
				c.OnMove(m)
			}
		case store.ControlAck:
			if s, ok := c.hub.tracker.Get(m.Session); ok && s.User == m.User && c.OnAck != nil {
				c.OnAck(s, m.IDs)
			}
		}
	}
	if len(reads) > 0 {
		c.dispatch.InOrder(func(ctx context.Context) { c.broadcastReads(ctx, reads) })
	}
}

// broadcastReads sends each read to the user's local sessions, resolving the
// ids of a read range first (a failed lookup still sends the count).
func (c *Control) broadcastReads(ctx context.Context, reads []store.ControlMessage) {
	for _, m := range reads {
		ids := m.IDs
		if m.Kind == store.ControlReadRange {
			rctx, cancel := context.WithTimeout(ctx, 10*time.Second)
			got, err := c.resolve.ReadIDs(rctx, m)
			cancel()
			if err != nil {
				c.log.Warn("control: read ids not resolved; sending the count alone", "user", m.User, "err", err)
			}
			ids = got
		}
		if len(ids) == 0 {
			c.hub.BroadcastRead(m.User, []string{}, m.Unread)
		}
		// A frame carries at most as many ids as a client may send in one read.
		for rest := ids; len(rest) > 0; {
			n := min(len(rest), MaxIDsPerMessage)
			c.hub.BroadcastRead(m.User, rest[:n], m.Unread)
			rest = rest[n:]
		}
		// Only now: a waiter's answer must not overtake the frames.
		c.hub.reads.applied(m.User, ids)
	}
}

// endIfUser ends the local session with this id if it belongs to user; it
// reports whether there was one.
func (h *Hub) endIfUser(id, user string, reason Reason) bool {
	s, ok := h.tracker.Get(id)
	if !ok || s.User != user {
		return false
	}
	h.End(s, reason)
	return true
}

// ExpectRead prepares to wait for this node to apply a read of user that
// the caller is about to commit (the API or a session's read message): call
// it before the commit, then Wait with an id the read changed. Once Wait
// returns, every local session of the user has been sent the `read`, so a
// session that connects after the caller answers (and replays a snapshot
// that holds the read) is not sent it again, out of date. Done must be
// called when the caller is finished with it.
func (h *Hub) ExpectRead(user string) *ReadWait {
	return h.reads.add(user)
}

// ReadWait is one read awaiting its NOTIFY (Hub.ExpectRead).
type ReadWait struct {
	r    *readWaiters
	user string
	mu   sync.Mutex
	seen map[string]bool // ids of the user's reads applied since ExpectRead
	wake chan struct{}
}

// Wait waits until a read naming id has been applied here, or ctx ends; it
// reports whether it was applied.
func (w *ReadWait) Wait(ctx context.Context, id string) bool {
	for {
		w.mu.Lock()
		ok := w.seen[id]
		w.mu.Unlock()
		if ok {
			return true
		}
		select {
		case <-w.wake:
		case <-ctx.Done():
			return false
		}
	}
}

// Done unregisters w.
func (w *ReadWait) Done() { w.r.remove(w) }

// readWaiters are the ReadWaits of a hub, by user.
type readWaiters struct {
	mu sync.Mutex
	m  map[string][]*ReadWait
}

func (r *readWaiters) add(user string) *ReadWait {
	w := &ReadWait{r: r, user: user, seen: make(map[string]bool), wake: make(chan struct{}, 1)}
	r.mu.Lock()
	if r.m == nil {
		r.m = make(map[string][]*ReadWait)
	}
	r.m[user] = append(r.m[user], w)
	r.mu.Unlock()
	return w
}

func (r *readWaiters) remove(w *ReadWait) {
	r.mu.Lock()
	defer r.mu.Unlock()
	list := r.m[w.user]
	for i, x := range list {
		if x == w {
			list = append(list[:i], list[i+1:]...)
			break
		}
	}
	if len(list) == 0 {
		delete(r.m, w.user)
	} else {
		r.m[w.user] = list
	}
}

func (r *readWaiters) waiting(user string) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.m[user]) > 0
}

// applied tells the user's waiters that ids were read.
func (r *readWaiters) applied(user string, ids []string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, w := range r.m[user] {
		w.mu.Lock()
		for _, id := range ids {
			w.seen[id] = true
		}
		w.mu.Unlock()
		select {
		case w.wake <- struct{}{}:
		default:
		}
	}
}
