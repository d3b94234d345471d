package realtime

import (
	"context"
	"log/slog"
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
//   - touch: the local sessions named are refreshed (Hub.Touch).
type Control struct {
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
			if c.hub.tracker.Online(m.User) {
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
		for len(ids) > 0 {
			n := min(len(ids), MaxIDsPerMessage)
			c.hub.BroadcastRead(m.User, ids[:n], m.Unread)
			ids = ids[n:]
		}
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
