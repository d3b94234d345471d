package handlers

import (
	"context"
	"errors"
	"io"
	"net/http"
	"time"

	"github.com/go-chi/chi/v5"

	"github.com/notifyd/notifyd/handlers/realtime"
	"github.com/notifyd/notifyd/store"
)

// handleMessages applies client messages of session s, on any transport, and
// returns the replies a WebSocket would carry (pong, error). A read reaches
// every session of the user, s included, through the read trigger (applyRead).
func (a *API) handleMessages(ctx context.Context, s *realtime.Session, msgs []realtime.ClientMessage) []realtime.Frame {
	return a.applyMessages(ctx, s.User, msgs, func(ids []string) { a.applyAcks(s, ids) })
}

// applyMessages applies client messages of a session of user, wherever it
// lives: a ping is answered, a read applied in the database (its `read`
// reaches every session through the read trigger), and acks handed to ack.
// It returns the replies (pong, error).
func (a *API) applyMessages(ctx context.Context, user string, msgs []realtime.ClientMessage, ack func(ids []string)) []realtime.Frame {
	var replies []realtime.Frame
	for _, m := range msgs {
		switch m.Type {
		case realtime.ClientPing:
			replies = append(replies, realtime.PongFrame(time.Now()))
		case realtime.ClientAck:
			ack(m.IDs)
		case realtime.ClientRead:
			if _, _, err := a.applyRead(ctx, user, m.IDs, m.UpToSeq); err != nil {
				replies = append(replies, realtime.ErrorFrame("unavailable", "could not mark read; retry"))
			}
		}
	}
	return replies
}

// applyAcks records the acks of ids that s was sent and had not acked
// (admitAcks), and tells the negotiator when there was one. Nothing is
// answered: a receipt asks for no reply, and a refused one has nothing for
// the client to fix. Acks sent through another node arrive here too
// (receiveAcks).
func (a *API) applyAcks(s *realtime.Session, ids []string) {
	if a.admitAcks(s, ids) {
		// Only an ack of a notification this session was sent shows that its
		// transport delivered: the negotiator learns from nothing else.
		a.Negotiate.Delivered(s)
	}
}

// admitAcks queues to the recorder the acks of ids that s was sent and had
// not acked; the others (never sent to s, acked already, or past the
// session's ack rate) are dropped and counted, never queued, so one client's
// acks cannot crowd out anyone's delivery records. It reports whether any was
// admitted. It never blocks.
func (a *API) admitAcks(s *realtime.Session, ids []string) bool {
	now := time.Now()
	admitted, limited, unknown := s.AdmitAcks(ids, a.Limits.AckRate, now)
	a.Metrics.acksRefused(limited, unknown)
	if len(admitted) == 0 {
		return false
	}
	if a.Recorder != nil {
		for _, id := range admitted {
			a.Recorder.Acked(store.Ack{NotificationID: id, SessionID: s.ID, At: now})
		}
	}
	return true
}

// applyRead marks notifications read. The commit's NOTIFY from the read
// trigger (migration 007) tells every session of the user on every node,
// this one's too, as it does for a read made by an application's own SQL:
// one path for every source. The trigger serializes the reads of one user
// in Postgres and computes the unread count under that lock, so the counts
// devices see arrive in commit order and the last one is the true count:
// badges never drift. The answer waits (readApplyWait at most) until this
// node has applied the NOTIFY, so that a session that connects here after
// the answer is not sent the read after its replay, out of date; with no
// Control (no listener for it) there is nothing to wait for.
func (a *API) applyRead(ctx context.Context, user string, ids []string, upToSeq int64) ([]string, int64, error) {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
	defer cancel()
	wait := a.Hub.ExpectRead(user)
	defer wait.Done()
	changed, unread, err := a.Store.MarkRead(ctx, user, ids, upToSeq)
	if err != nil {
		a.Log.Warn("mark read failed", "user", user, "err", err)
		return nil, 0, err
	}
	if len(changed) > 0 && a.Control != nil {
		// Answer once this node's sessions have the read: a device that
		// connects after the answer replays a snapshot that holds it already.
		wctx, cancel := context.WithTimeout(ctx, readApplyWait)
		defer cancel()
		wait.Wait(wctx, changed[0])
	}
	return changed, unread, nil
}

// readApplyWait bounds how long a read waits for this node to apply its
// NOTIFY (longer only while the listener is disconnected).
const readApplyWait = time.Second

// readBody reads a request body of at most limit bytes.
func readBody(w http.ResponseWriter, r *http.Request, limit int64) ([]byte, error) {
	b, err := io.ReadAll(http.MaxBytesReader(w, r.Body, limit))
	if err != nil {
		var tooBig *http.MaxBytesError
		if errors.As(err, &tooBig) {
			return nil, errorf(http.StatusRequestEntityTooLarge, "too_large", "message is too large")
		}
		return nil, errorf(http.StatusBadRequest, "bad_request", "could not read the body")
	}
	return b, nil
}

// protocolErrorFrame turns a parse error into the error message sent back.
func protocolErrorFrame(err error) realtime.Frame {
	var pe *realtime.ProtocolError
	if errors.As(err, &pe) {
		return realtime.ErrorFrame(pe.Code, pe.Message)
	}
	return realtime.ErrorFrame("bad_message", err.Error())
}

type messagesReply struct {
	Messages []jsonFrame `json:"messages"`
}

// jsonFrame writes a frame's encoded message as it is.
type jsonFrame []byte

// MarshalJSON returns the frame's JSON unchanged.
func (f jsonFrame) MarshalJSON() ([]byte, error) { return f, nil }

// postMessages is POST /v1/sessions/{session}/messages: the upstream of SSE
// and long-poll clients (WebSocket clients may use it too).
func (a *API) postMessages(w http.ResponseWriter, r *http.Request) {
	id, err := a.Auth.Client(r)
	if err != nil {
		writeError(w, err)
		return
	}
	sid := chi.URLParam(r, "session")
	s, ok := a.Hub.Session(sid)
	remote := false
	if !ok {
		// Held by another node, maybe (handlers/control.go).
		user, found, err := a.remoteSessionUser(r, sid)
		if err != nil {
			a.Log.Warn("messages: session lookup failed", "session", sid, "err", err)
			writeError(w, err)
			return
		}
		ok, remote = found && user == id.User, true
	}
	// Another user's session answers as an unknown one: session ids are not probed.
	if !ok || (!remote && s.User != id.User) {
		writeError(w, errorf(http.StatusNotFound, "unknown_session", "no live session with this id"))
		return
	}
	body, err := readBody(w, r, a.Limits.MaxMessageBytes)
	if err != nil {
		writeError(w, err)
		return
	}
	if !remote {
		a.Hub.Touch(s)
	}
	msgs, err := realtime.ParseClientMessages(body)
	if err != nil {
		// Malformed input is an HTTP error; nothing of it is applied.
		var pe *realtime.ProtocolError
		if errors.As(err, &pe) {
			err = errorf(http.StatusBadRequest, pe.Code, pe.Message)
		}
		writeError(w, err)
		return
	}
	var replies []realtime.Frame
	if remote {
		replies = a.handleRemoteMessages(r.Context(), id.User, sid, msgs)
	} else {
		replies = a.handleMessages(r.Context(), s, msgs)
	}
	out := messagesReply{Messages: make([]jsonFrame, len(replies))}
	for i, f := range replies {
		out.Messages[i] = f.JSON
	}
	writeJSON(w, http.StatusOK, out)
}
