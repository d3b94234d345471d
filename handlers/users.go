package handlers

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"slices"
	"strconv"
	"time"

	"github.com/go-chi/chi/v5"

	"github.com/notifyd/notifyd/handlers/realtime"
	"github.com/notifyd/notifyd/store"
)

// userParam reads and checks {user}, and that the caller may act for that user.
func (a *API) userParam(r *http.Request) (string, error) {
	user := chi.URLParam(r, "user")
	if !ValidUser(user) {
		return "", errorf(http.StatusBadRequest, "bad_user", "invalid user id")
	}
	return user, a.Auth.PublisherOrUser(r, user)
}

// inboxHead is an inbox item without its data, which inboxEncoder appends.
type inboxHead struct {
	ID        string  `json:"id"`
	Seq       int64   `json:"seq"`
	Topic     string  `json:"topic"`
	CreatedAt string  `json:"created_at"`
	ReadAt    *string `json:"read_at"`
}

// inboxEncoder encodes inbox items, {"id","seq","topic","created_at","read_at","data"},
// escaped as writeJSON escapes. Data is compacted through buffers reused from
// row to row, so a page costs one row's worth of memory, not its size.
type inboxEncoder struct {
	compact, out bytes.Buffer
}

// item returns n's JSON, valid until the next call.
func (e *inboxEncoder) item(n store.Notification) ([]byte, error) {
	head, err := json.Marshal(inboxHead{ID: n.ID, Seq: n.Seq, Topic: n.Topic,
		CreatedAt: n.CreatedAt.UTC().Format(realtime.TimeFormat), ReadAt: wireTimePtr(n.ReadAt)})
	if err != nil {
		return nil, err
	}
	e.compact.Reset()
	if err := json.Compact(&e.compact, n.Data); err != nil {
		return nil, fmt.Errorf("notification %s: data: %w", n.ID, err)
	}
	e.out.Reset()
	e.out.Write(head[:len(head)-1])
	e.out.WriteString(`,"data":`)
	json.HTMLEscape(&e.out, e.compact.Bytes())
	e.out.WriteByte('}')
	return e.out.Bytes(), nil
}

func wireTimePtr(t *time.Time) *string {
	if t == nil {
		return nil
	}
	s := t.UTC().Format(realtime.TimeFormat)
	return &s
}

// inbox is GET /v1/users/{user}/notifications: {"notifications":[...],"unread":N,"truncated":B}.
// The page is encoded row by row as Postgres sends it, never held whole; it is
// bounded by Limits.InboxMaxBytes of data (truncated: the client asks again
// below the last seq). A client that does not read holds the query's database
// connection for at most writeWait: then the response is cut.
func (a *API) inbox(w http.ResponseWriter, r *http.Request) {
	user, err := a.userParam(r)
	if err != nil {
		writeError(w, err)
		return
	}
	q := r.URL.Query()
	limit := 50
	if v := q.Get("limit"); v != "" {
		if limit, err = strconv.Atoi(v); err != nil || limit < 1 || limit > 1000 {
			writeError(w, errorf(http.StatusBadRequest, "bad_limit", "limit must be 1 to 1000"))
			return
		}
	}
	before, err := parseCursor(q.Get("before_seq"))
	if err != nil {
		writeError(w, errorf(http.StatusBadRequest, "bad_before_seq", "before_seq must be a non-negative integer"))
		return
	}
	unreadOnly := false
	if v := q.Get("unread"); v != "" {
		if unreadOnly, err = strconv.ParseBool(v); err != nil {
			writeError(w, errorf(http.StatusBadRequest, "bad_unread", "unread must be true or false"))
			return
		}
	}
	rc := http.NewResponseController(w)
	_ = rc.SetWriteDeadline(time.Now().Add(writeWait))
	defer func() { _ = rc.SetWriteDeadline(time.Time{}) }() // the connection may serve another request
	var enc inboxEncoder
	started := false
	start := func() error {
		started = true
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(http.StatusOK)
		_, err := io.WriteString(w, `{"notifications":[`)
		return err
	}
	unread, truncated, err := a.Store.Inbox(r.Context(), store.InboxQuery{User: user, UnreadOnly: unreadOnly,
		Limit: limit, BeforeSeq: before, MaxBytes: a.Limits.InboxMaxBytes}, func(n store.Notification) error {
		var err error
		b, err := enc.item(n)
		if err != nil {
			return err
		}
		if !started {
			err = start()
		} else {
			_, err = io.WriteString(w, ",")
		}
		if err == nil {
			_, err = w.Write(b)
		}
		return err
	})
	if err != nil && !started {
		a.publishFailed(w, r, err)
		return
	}
	if err != nil {
		// The status and part of the page are out: cut the response, so that
		// the client sees a failed request rather than a short page.
		a.Log.Warn("inbox: page cut", "user", user, "err", err)
		panic(http.ErrAbortHandler)
	}
	if !started {
		_ = start()
	}
	_, _ = fmt.Fprintf(w, `],"unread":%d,"truncated":%t}`+"\n", unread, truncated)
	_ = rc.Flush()
}

type readRequest struct {
	IDs     []string `json:"ids"`
	UpToSeq int64    `json:"up_to_seq"`
}

// markRead is POST /v1/users/{user}/read.
func (a *API) markRead(w http.ResponseWriter, r *http.Request) {
	user, err := a.userParam(r)
	if err != nil {
		writeError(w, err)
		return
	}
	var req readRequest
	if err := decodeJSON(w, r, 1<<20, &req); err != nil {
		writeError(w, err)
		return
	}
	if (len(req.IDs) == 0) == (req.UpToSeq == 0) || req.UpToSeq < 0 || len(req.IDs) > realtime.MaxIDsPerMessage {
		writeError(w, errorf(http.StatusBadRequest, "bad_request", "give ids (at most 1000) or a positive up_to_seq"))
		return
	}
	changed, unread, err := a.applyRead(r.Context(), user, req.IDs, req.UpToSeq)
	if err != nil {
		a.publishFailed(w, r, err)
		return
	}
	if changed == nil {
		changed = []string{}
	}
	writeJSON(w, http.StatusOK, map[string]any{"ids": changed, "unread": unread})
}

type sessionView struct {
	ID          string             `json:"id"`
	User        string             `json:"user"`
	Device      string             `json:"device"`
	Transport   realtime.Transport `json:"transport"`
	ConnectedAt string             `json:"connected_at"`
	LastSeenAt  string             `json:"last_seen_at"`
	RemoteAddr  string             `json:"remote_addr"`
	UserAgent   string             `json:"user_agent"`
}

func viewSession(s *realtime.Session) sessionView {
	return sessionView{ID: s.ID, User: s.User, Device: s.Device, Transport: s.Transport,
		ConnectedAt: s.ConnectedAt.UTC().Format(realtime.TimeFormat),
		LastSeenAt:  s.LastSeen().UTC().Format(realtime.TimeFormat),
		RemoteAddr:  s.RemoteAddr, UserAgent: s.UserAgent}
}

// userSessions is GET /v1/users/{user}/sessions: the user's devices.
func (a *API) userSessions(w http.ResponseWriter, r *http.Request) {
	user, err := a.userParam(r)
	if err != nil {
		writeError(w, err)
		return
	}
	list := a.Hub.UserSessions(user)
	out := make([]sessionView, len(list))
	for i, s := range list {
		out[i] = viewSession(s)
	}
	writeJSON(w, http.StatusOK, map[string]any{"sessions": out})
}

// kick is DELETE /v1/sessions/{session}: the API key, or the session's own user.
func (a *API) kick(w http.ResponseWriter, r *http.Request) {
	id := chi.URLParam(r, "session")
	s, ok := a.Hub.Session(id)
	user := "" // the user the session must belong to; "" for the API key
	if !a.Auth.Publisher(r) {
		client, err := a.Auth.Client(r)
		if err != nil {
			writeError(w, err)
			return
		}
		user = client.User
		ok = ok && s.User == user // another user's session answers as an unknown one
	}
	// A session that ended since the lookup is no longer live either; one
	// that resumed in its place has the same id and the same user.
	kicked := ok && a.Hub.Kick(id)
	if s == nil {
		// Not held here: the node that holds it ends it (handlers/control.go).
		var err error
		if kicked, err = a.kickRemote(r, id, user); err != nil {
			a.Log.Warn("kick: session lookup failed", "session", id, "err", err)
			writeError(w, err)
			return
		}
	}
	if !kicked {
		writeError(w, errorf(http.StatusNotFound, "unknown_session", "no live session with this id"))
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

// stats is GET /v1/stats.
func (a *API) stats(w http.ResponseWriter, r *http.Request) {
	if !a.Auth.Publisher(r) {
		writeError(w, errUnauthorized)
		return
	}
	st := a.Hub.Stats()
	out := map[string]any{
		"sessions": st.Sessions, "users": st.Users, "by_transport": st.ByTransport,
		"evictions": st.Evictions, "deliveries": st.Deliveries,
		"sweep": map[string]float64{"last_ms": st.SweepLast.Seconds() * 1000, "max_ms": st.SweepMax.Seconds() * 1000},
	}
	if a.Metrics != nil {
		for k, v := range a.Metrics.statsExtra() {
			out[k] = v
		}
	}
	if r.URL.Query().Get("recent") != "" {
		out["recent_sessions"] = a.recentSessions(50)
	}
	writeJSON(w, http.StatusOK, out)
}

// recentSessions lists the newest live sessions, newest first.
func (a *API) recentSessions(n int) []sessionView {
	all := a.Hub.Sessions()
	// Partial selection would do; live sessions are few enough for a sort.
	sortByConnected(all)
	if len(all) > n {
		all = all[:n]
	}
	out := make([]sessionView, len(all))
	for i, s := range all {
		out[i] = viewSession(s)
	}
	return out
}

// devToken is GET /v1/dev/token?user=&device= (dev mode only): a client token,
// and the API key so the demo page can publish.
func (a *API) devToken(w http.ResponseWriter, r *http.Request) {
	user := r.URL.Query().Get("user")
	if !ValidUser(user) {
		writeError(w, errorf(http.StatusBadRequest, "bad_user", "invalid user id"))
		return
	}
	tok, err := a.Auth.NewToken(user, r.URL.Query().Get("device"), 24*time.Hour)
	if err != nil {
		writeError(w, err)
		return
	}
	writeJSON(w, http.StatusOK, map[string]string{"user": user, "token": tok, "api_key": string(a.Auth.apiKey)})
}

func sortByConnected(list []*realtime.Session) {
	slices.SortFunc(list, func(x, y *realtime.Session) int { return y.ConnectedAt.Compare(x.ConnectedAt) })
}
