package handlers

import (
	"context"
	"net/http"
	"time"

	"github.com/notifyd/notifyd/handlers/realtime"
	"github.com/notifyd/notifyd/store"
)

// Control reaches sessions held by other nodes of the cluster: *store.Control.
// A session is known there by its open session_history row.
type Control interface {
	// SessionUser returns the user of the open session id, on any node.
	SessionUser(ctx context.Context, id string) (user string, ok bool, err error)
	// SessionOf returns the user and transport of the open session id, on any node.
	SessionOf(ctx context.Context, id string) (user, transport string, ok bool, err error)
	// Kick asks the node holding session id (of user, unless user is "") to end it
	// with `bye kicked`; false when no open session matches.
	Kick(ctx context.Context, id, user string) (bool, error)
	// Replace asks the node holding session id of user to end it with `bye
	// replaced`; false when no open session matches.
	Replace(ctx context.Context, id, user string) (bool, error)
	// Touch refreshes session id on the node holding it; it never blocks.
	Touch(id string)
}

// controlTimeout bounds one control round trip made on a request's behalf.
const controlTimeout = 5 * time.Second

// kickRemote kicks a session this node does not hold; user is "" for the API
// key. It reports whether a session was found.
func (a *API) kickRemote(r *http.Request, id, user string) (bool, error) {
	if a.Control == nil {
		return false, nil
	}
	ctx, cancel := context.WithTimeout(r.Context(), controlTimeout)
	defer cancel()
	return a.Control.Kick(ctx, id, user)
}

// replaceRemote ends, with `bye replaced`, the session named by resume when
// another node holds it for user: the new session takes its place (with an id
// of this node). Failures are logged; the connect goes on as a new session.
func (a *API) replaceRemote(ctx context.Context, resume, user string) {
	if a.Control == nil || resume == "" {
		return
	}
	if s, ok := a.Hub.Session(resume); ok && s.User == user {
		return // local: Register replaces it
	}
	ctx, cancel := context.WithTimeout(ctx, controlTimeout)
	defer cancel()
	if _, err := a.Control.Replace(ctx, resume, user); err != nil {
		a.Log.Warn("resume: could not replace the session on its node", "session", resume, "user", user, "err", err)
	}
}

// remoteSessionUser is the user of a session this node does not hold, if
// another node holds it.
func (a *API) remoteSessionUser(r *http.Request, id string) (string, bool, error) {
	if a.Control == nil {
		return "", false, nil
	}
	ctx, cancel := context.WithTimeout(r.Context(), controlTimeout)
	defer cancel()
	return a.Control.SessionUser(ctx, id)
}

// handleRemoteMessages applies client messages of a session held by another
// node, as handleMessages does for a local one: a read is applied in the
// database (its `read` reaches every node through the read trigger), an ack
// is recorded by session id, and the session is refreshed on its node.
func (a *API) handleRemoteMessages(ctx context.Context, user, session string, msgs []realtime.ClientMessage) []realtime.Frame {
	var replies []realtime.Frame
	for _, m := range msgs {
		switch m.Type {
		case realtime.ClientPing:
			replies = append(replies, realtime.PongFrame(time.Now()))
		case realtime.ClientAck:
			if a.Recorder != nil {
				now := time.Now()
				for _, id := range m.IDs {
					a.Recorder.Acked(store.Ack{NotificationID: id, SessionID: session, At: now})
				}
			}
		case realtime.ClientRead:
			if _, _, err := a.applyRead(ctx, user, m.IDs, m.UpToSeq); err != nil {
				replies = append(replies, realtime.ErrorFrame("unavailable", "could not mark read; retry"))
			}
		}
	}
	a.Control.Touch(session)
	return replies
}
