package handlers

import (
	"encoding/json"
	"net/http"
	"slices"
	"strconv"
	"time"

	"github.com/go-chi/chi/v5"

	"github.com/notifyd/notifyd/handlers/realtime"
)

// userParam reads and checks {user}, and that the caller may act for that user.
func (a *API) userParam(r *http.Request) (string, error) {
	user := chi.URLParam(r, "user")
	if !ValidUser(user) {
		return "", errorf(http.StatusBadRequest, "bad_user", "invalid user id")
	}
	return user, a.Auth.PublisherOrUser(r, user)
}

type inboxItem struct {
	ID        string          `json:"id"`
	Seq       int64           `json:"seq"`
	Topic     string          `json:"topic"`
	Data      json.RawMessage `json:"data"`
	CreatedAt string          `json:"created_at"`
	ReadAt    *string         `json:"read_at"`
}

func wireTimePtr(t *time.Time) *string {
	if t == nil {
		return nil
	}
	s := t.UTC().Format(realtime.TimeFormat)
	return &s
}

// inbox is GET /v1/users/{user}/notifications.
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
	rows, unread, err := a.Store.Inbox(r.Context(), user, unreadOnly, limit, before)
	if err != nil {
		a.publishFailed(w, r, err)
		return
	}
	out := make([]inboxItem, len(rows))
	for i, n := range rows {
		out[i] = inboxItem{ID: n.ID, Seq: n.Seq, Topic: n.Topic, Data: n.Data,
			CreatedAt: n.CreatedAt.UTC().Format(realtime.TimeFormat), ReadAt: wireTimePtr(n.ReadAt)}
	}
	writeJSON(w, http.StatusOK, map[string]any{"notifications": out, "unread": unread})
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
	list := a.Hub.Tracker().UserSessions(user)
	out := make([]sessionView, len(list))
	for i, s := range list {
		out[i] = viewSession(s)
	}
	writeJSON(w, http.StatusOK, map[string]any{"sessions": out})
}

// kick is DELETE /v1/sessions/{session}: the API key, or the session's own user.
func (a *API) kick(w http.ResponseWriter, r *http.Request) {
	s, ok := a.Hub.Tracker().Get(chi.URLParam(r, "session"))
	if !a.Auth.Publisher(r) {
		id, err := a.Auth.Client(r)
		if err != nil {
			writeError(w, err)
			return
		}
		ok = ok && s.User == id.User // another user's session answers as an unknown one
	}
	if !ok {
		writeError(w, errorf(http.StatusNotFound, "unknown_session", "no live session with this id"))
		return
	}
	a.Hub.End(s, realtime.ReasonKicked)
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
	all := a.Hub.Tracker().All()
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
