package main

import (
	"io/fs"
	"time"

	"github.com/notifyd/notifyd/handlers/realtime"
	"github.com/notifyd/notifyd/static"
	"github.com/notifyd/notifyd/store"
)

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

func staticFS() fs.FS { return static.FS }
