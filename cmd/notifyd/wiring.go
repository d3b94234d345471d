package main

import (
	"context"
	"io/fs"
	"time"

	"github.com/notifyd/notifyd/handlers"
	"github.com/notifyd/notifyd/handlers/realtime"
	"github.com/notifyd/notifyd/static"
	"github.com/notifyd/notifyd/store"
)

// storeSource lets the dispatcher read notifications from the store.
type storeSource struct{ st *store.Store }

func (s storeSource) Fetch(ctx context.Context, rs []realtime.Range) ([]realtime.Notification, error) {
	ranges := make([]store.SeqRange, len(rs))
	for i, r := range rs {
		ranges[i] = store.SeqRange{UserID: r.User, From: r.From, To: r.To}
	}
	ns, err := s.st.Fetch(ctx, ranges)
	return fromStore(ns), err
}

func (s storeSource) After(ctx context.Context, cursors map[string]int64, limit int) ([]realtime.Notification, error) {
	ns, err := s.st.After(ctx, cursors, limit)
	return fromStore(ns), err
}

func fromStore(ns []store.Notification) []realtime.Notification {
	out := make([]realtime.Notification, len(ns))
	for i := range ns {
		out[i] = handlers.FromStore(ns[i])
	}
	return out
}

func toRanges(cs []store.Change) []realtime.Range {
	out := make([]realtime.Range, len(cs))
	for i, c := range cs {
		out[i] = realtime.Range{User: c.UserID, From: c.From, To: c.To}
	}
	return out
}

func sessionStart(s *realtime.Session) store.SessionStart {
	return store.SessionStart{RowID: s.ConnID, SessionID: s.ID, UserID: s.User, Device: s.Device,
		Transport: string(s.Transport), RemoteAddr: s.RemoteAddr, UserAgent: s.UserAgent, ConnectedAt: s.ConnectedAt}
}

// recordDeliveries hands every notification a transport wrote to the recorder.
func recordDeliveries(rec *store.Recorder, s *realtime.Session, frames []realtime.Frame) {
	now := time.Now()
	for i := range frames {
		f := &frames[i]
		if f.Type == realtime.TypeNotification {
			rec.Delivered(store.Delivery{NotificationID: f.ID, UserID: s.User, Seq: f.Seq, SessionID: s.ID, Device: s.Device,
				Transport: string(s.Transport), Replayed: f.Replayed, PublishedAt: f.CreatedAt, At: now})
		}
	}
}

// publishHook hands what this node publishes to the dispatcher (see
// realtime.Dispatcher.Expect). Repeats of an idempotency key were delivered
// when first stored, and rows that expire are left to the store's filtering.
func publishHook(d *realtime.Dispatcher) store.PublishHook {
	return func(users []string) func([]store.NewNotification, []store.Published) {
		committed := d.Expect(users)
		return func(ns []store.NewNotification, res []store.Published) {
			out := make([]realtime.Notification, 0, len(res))
			for i, p := range res {
				if p.Duplicate || ns[i].ExpiresAt != nil {
					continue
				}
				out = append(out, realtime.Notification{ID: p.ID, User: ns[i].UserID, Seq: p.Seq,
					Topic: ns[i].Topic, Data: ns[i].Data, CreatedAt: p.CreatedAt})
			}
			committed(out)
		}
	}
}

func staticFS() fs.FS { return static.FS }
