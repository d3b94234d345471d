package handlers

import (
	"context"
	"net/http"
	"sync"
	"time"

	"github.com/notifyd/notifyd/handlers/realtime"
	"github.com/notifyd/notifyd/store"
)

// Control reaches sessions held by other nodes of the cluster: *store.Control.
// A session is known there by its session_history rows: an open row of a live
// node is a session that node holds; SessionOf also finds ended ones.
type Control interface {
	// SessionOf returns the newest history row of session id, on any node,
	// open or ended; ok is false when there is none.
	SessionOf(ctx context.Context, id string) (ref store.SessionRef, ok bool, err error)
	// Kick asks the node holding session id (of user, unless user is "") to end it
	// with `bye kicked`; false when no open session matches.
	Kick(ctx context.Context, id, user string) (bool, error)
	// Replace asks the node holding session id of user to end it with `bye
	// replaced`; false when no open session matches.
	Replace(ctx context.Context, id, user string) (bool, error)
	// Touch refreshes session id on the node holding it; it never blocks.
	Touch(id string)
	// Ack forwards acks of session id of user to the node holding it, which
	// admits them (Acks); skipped counts the ids that cannot be a
	// notification's (they hold a separator) and were not sent.
	Ack(ctx context.Context, id, user string, ids []string) (skipped int, err error)
}

// Acks hands the acks that other nodes forwarded (store.ControlAck,
// realtime.Control.OnAck) for sessions of this node to the handlers, which
// admit them as they do a local ack: only ids the session was sent, at its
// ack rate, refusals counted here.
type Acks struct {
	mu    sync.Mutex
	apply func(s *realtime.Session, ids []string)
}

// Received admits acks another node forwarded for s (whose user the message
// named); before the router exists they are dropped. It does not block: it
// is called from the listener's goroutine.
func (k *Acks) Received(s *realtime.Session, ids []string) {
	k.mu.Lock()
	apply := k.apply
	k.mu.Unlock()
	if apply != nil {
		apply(s, ids)
	}
}

// attach makes a the receiver of forwarded acks.
func (k *Acks) attach(a *API) {
	k.mu.Lock()
	k.apply = a.receiveAcks
	k.mu.Unlock()
}

// receiveAcks applies acks forwarded by another node as applyAcks does; the
// negotiator's write, which may wait on the database, runs apart from the
// listener's goroutine.
func (a *API) receiveAcks(s *realtime.Session, ids []string) {
	if a.admitAcks(s, ids) && a.Negotiate != nil {
		go a.Negotiate.Delivered(s)
	}
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
	// Alone (no other node holds a lease, or none can see sessions without
	// history rows), no other node can hold it: no round trip on the connect.
	if a.Control == nil || resume == "" || a.Presence == nil || !a.Presence.OthersLive() {
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
	ref, ok, err := a.Control.SessionOf(ctx, id)
	return ref.User, ok && ref.Live, err
}

// handleRemoteMessages applies client messages of a session held by another
// node, as handleMessages does for a local one: a read is applied in the
// database (its `read` reaches every node through the read trigger), acks
// are forwarded to the node holding the session, which alone knows what it
// sent it (and keeps its ack rate), and the session is refreshed on its node.
// Nothing of an ack is recorded here.
func (a *API) handleRemoteMessages(ctx context.Context, user, session string, msgs []realtime.ClientMessage) []realtime.Frame {
	replies := a.applyMessages(ctx, user, msgs, func(ids []string) { a.forwardAcks(ctx, user, session, ids) })
	a.Control.Touch(session)
	return replies
}

// forwardAcks sends acks of a session another node holds to that node. Ids
// that cannot be sent (no notification's id holds a separator) are counted
// refused here; a failed send is logged (a receipt asks for no reply).
func (a *API) forwardAcks(ctx context.Context, user, session string, ids []string) {
	ctx, cancel := context.WithTimeout(ctx, controlTimeout)
	defer cancel()
	skipped, err := a.Control.Ack(ctx, session, user, ids)
	a.Metrics.acksRefused(0, skipped)
	if err != nil {
		a.Log.Warn("messages: acks not forwarded to the session's node", "session", session, "user", user, "acks", len(ids), "err", err)
	}
}
