package handlers

import (
	"context"
	"net/http"
	"strconv"
	"time"

	"github.com/notifyd/notifyd/handlers/realtime"
	"github.com/notifyd/notifyd/store"
)

// connectRequest is what every transport reads from a connecting client.
type connectRequest struct {
	id     Identity
	cursor int64
	resume string
}

// parseCursor reads a cursor: empty is 0, otherwise a non-negative integer.
func parseCursor(s string) (int64, error) {
	if s == "" {
		return 0, nil
	}
	c, err := strconv.ParseInt(s, 10, 64)
	if err != nil || c < 0 {
		return 0, errorf(http.StatusBadRequest, "bad_cursor", "cursor must be a non-negative integer")
	}
	return c, nil
}

// readConnect authenticates a connecting client and reads cursor and session;
// cursor, when given, overrides the cursor query parameter (SSE's Last-Event-ID).
func (a *API) readConnect(r *http.Request, cursor string) (connectRequest, error) {
	if a.Hub.Closing() {
		return connectRequest{}, errShuttingDown
	}
	id, err := a.Auth.Client(r)
	if err != nil {
		return connectRequest{}, err
	}
	q := r.URL.Query()
	if cursor == "" {
		cursor = q.Get("cursor")
	}
	c, err := parseCursor(cursor)
	if err != nil {
		return connectRequest{}, err
	}
	resume := q.Get("session")
	if len(resume) > 64 {
		return connectRequest{}, errorf(http.StatusBadRequest, "bad_session", "session id is too long")
	}
	return connectRequest{id: id, cursor: c, resume: resume}, nil
}

// growStack grows the calling goroutine's stack to 16 KiB at once, while the
// stack is still shallow. A connect runs deep call chains (the token's JSON
// decoding above all) on net/http's connection goroutine, which starts small:
// the runtime starts goroutines at the average stack in use, and the idle
// connections' goroutines use little. Grown on demand, the stack is copied
// two or three times with every frame of the deep chain adjusted each time;
// BenchmarkAuthClientConnect (in make bench) measures a connect with and
// without it. The goroutine ends when the connect is done and takes the
// stack with it; only transports whose handler returns then (WebSocket, SSE)
// call this.
//
//go:noinline
func growStack() {
	var pad [12 << 10]byte
	touchStack(pad[:])
}

// touchStack reads b, so that growStack's frame is really made (a call the
// compiler may not drop, reading memory it cannot prove unused).
//
//go:noinline
func touchStack(b []byte) byte { return b[len(b)-1] }

// openSession registers a new session for cr on transport tr, within the
// connect rate limits. Its hello is queued; the replay is not (call replay
// once the transport can carry frames).
func (a *API) openSession(r *http.Request, cr connectRequest, tr realtime.Transport) (*realtime.Session, error) {
	if err := a.ConnectLimits.allow(r, cr.id.User); err != nil {
		return nil, err
	}
	s := a.Hub.NewSession(realtime.SessionInfo{
		User: cr.id.User, Device: cr.id.Device, Transport: tr,
		RemoteAddr: r.RemoteAddr, UserAgent: truncateUA(r.UserAgent()), Network: a.sessionNetwork(r),
	}, cr.cursor)
	a.replaceRemote(r.Context(), cr.resume, cr.id.User)
	if err := a.Hub.RegisterCounted(s, cr.resume, a.sessionsElsewhere(r.Context(), cr)); err != nil {
		return nil, err // ErrTooManySessions carries its code: 429 too_many_sessions
	}
	return s, nil
}

// sessionsElsewhere is how many open sessions cr's user has on the cluster's other nodes, for
// the per-user session cap: at most one query on the connect's path, and none without a cap,
// without a cluster (no other live node), or when the sessions here alone reach the cap (the
// hub refuses then, or lets a resume of a session here replace it). When Postgres does not
// answer (the store bounds the query's time), the connect is let through with the cap
// counted on this node alone.
func (a *API) sessionsElsewhere(ctx context.Context, cr connectRequest) int {
	limit := a.Hub.Config().MaxSessionsPerUser
	if a.Presence == nil || limit <= 0 || !a.Presence.OthersLive() || a.Hub.UserSessionCount(cr.id.User) >= limit {
		return 0
	}
	n, err := a.Presence.CountElsewhere(ctx, cr.id.User, cr.resume)
	if err != nil {
		a.Log.Warn("session cap: could not count the sessions on other nodes; counting this node's only",
			"user", cr.id.User, "err", err)
		return 0
	}
	return n
}

func truncateUA(ua string) string {
	if len(ua) > 256 {
		return ua[:256]
	}
	return ua
}

// replay queues the unread backlog above the session's cursor, then synced,
// then switches the session to live delivery. On a database error the session
// is told and ended: the client reconnects and replays then.
func (a *API) replay(s *realtime.Session, cursor int64) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	rows, unread, truncated, err := a.Store.Replay(ctx, s.User, cursor, a.Limits.ReplayLimit, a.Limits.ReplayMaxBytes)
	if err != nil {
		a.Log.Warn("replay failed", "session", s.ID, "user", s.User, "err", err)
		e := apiError(err)
		s.Send(realtime.ErrorFrame(e.Code, e.Message))
		a.Hub.End(s, realtime.ReasonError)
		return
	}
	backlog := make([]realtime.Frame, len(rows))
	for i := range rows {
		backlog[i] = realtime.NotificationFrame(realtime.FromStore(rows[i]), true)
		rows[i] = store.Notification{} // its data is in the frame now
	}
	s.FinishReplay(backlog, unread, truncated)
}
