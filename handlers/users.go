package handlers

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"maps"
	"net/http"
	"slices"
	"strconv"
	"time"

	"github.com/go-chi/chi/v5"

	"github.com/notifyd/notifyd/handlers/realtime"
	"github.com/notifyd/notifyd/store"
)

// Presence is the cluster beyond this node, read from Postgres (store.Presence): the open
// sessions of the other live nodes. The handlers merge it with this node's hub; without it
// (nil) presence, stats and the session cap are this node's alone.
type Presence interface {
	// Node is this node's id.
	Node() string
	// OthersLive reports whether another node held a lease at the last look; when false the
	// reads below are skipped.
	OthersLive() bool
	// CountElsewhere counts user's open sessions on other live nodes, except the session with
	// id except (the one a connect resumes).
	CountElsewhere(ctx context.Context, user, except string) (int, error)
	// UserSessions lists user's open sessions on other live nodes.
	UserSessions(ctx context.Context, user string) ([]store.RemoteSession, error)
	// Recent lists the newest n open sessions of the other live nodes.
	Recent(ctx context.Context, n int) ([]store.RemoteSession, error)
	// Stats are the other live nodes' sessions.
	Stats(ctx context.Context) (store.ClusterStats, error)
}

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
		CreatedAt: realtime.WireTime(n.CreatedAt), ReadAt: wireTimePtr(n.ReadAt)})
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
	s := realtime.WireTime(*t)
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
	// LastSeenAt is null for a session of another node: its row learns it only at the end.
	LastSeenAt *string `json:"last_seen_at"`
	RemoteAddr string  `json:"remote_addr"`
	UserAgent  string  `json:"user_agent"`
	// Node is the node serving the session (in a cluster only).
	Node string `json:"node,omitempty"`

	connectedAt time.Time // for sorting
}

func (a *API) viewSession(s *realtime.Session) sessionView {
	seen := realtime.WireTime(s.LastSeen())
	v := sessionView{ID: s.ID, User: s.User, Device: s.Device, Transport: s.Transport,
		ConnectedAt: realtime.WireTime(s.ConnectedAt), LastSeenAt: &seen,
		RemoteAddr: s.RemoteAddr, UserAgent: s.UserAgent, connectedAt: s.ConnectedAt}
	if a.Presence != nil {
		v.Node = a.Presence.Node()
	}
	return v
}

func viewRemoteSession(s store.RemoteSession) sessionView {
	return sessionView{ID: s.ID, User: s.User, Device: s.Device, Transport: realtime.Transport(s.Transport),
		ConnectedAt: realtime.WireTime(s.ConnectedAt), LastSeenAt: wireTimePtr(s.LastSeenAt),
		RemoteAddr: s.RemoteAddr, UserAgent: s.UserAgent, Node: s.Node, connectedAt: s.ConnectedAt}
}

// userSessions is GET /v1/users/{user}/sessions: the user's devices, on every node of the
// cluster (this node's from memory, the others' from Postgres: see Presence).
func (a *API) userSessions(w http.ResponseWriter, r *http.Request) {
	user, err := a.userParam(r)
	if err != nil {
		writeError(w, err)
		return
	}
	list := a.Hub.UserSessions(user)
	out := make([]sessionView, 0, len(list))
	for _, s := range list {
		out = append(out, a.viewSession(s))
	}
	if a.Presence != nil && a.Presence.OthersLive() {
		remote, err := a.Presence.UserSessions(r.Context(), user)
		if err != nil {
			a.readFailed(w, r, err)
			return
		}
		out = mergeSessions(out, remote, len(out)+len(remote))
	}
	writeJSON(w, http.StatusOK, map[string]any{"sessions": out})
}

// mergeSessions adds the other nodes' sessions to this node's, skipping a session id this
// node has (a session resumed here whose old row's end is not flushed yet: it lives here),
// and returns the newest n, newest first.
func mergeSessions(local []sessionView, remote []store.RemoteSession, n int) []sessionView {
	here := make(map[string]bool, len(local))
	for _, v := range local {
		here[v.ID] = true
	}
	for _, s := range remote {
		if !here[s.ID] {
			local = append(local, viewRemoteSession(s))
		}
	}
	slices.SortStableFunc(local, func(x, y sessionView) int { return y.connectedAt.Compare(x.connectedAt) })
	if len(local) > n {
		local = local[:n]
	}
	return local
}

// readFailed answers a failed presence read (503 when Postgres failed).
func (a *API) readFailed(w http.ResponseWriter, r *http.Request, err error) {
	if r.Context().Err() != nil {
		return // the client left
	}
	a.Log.Warn("presence read failed", "err", err)
	writeError(w, err)
}

// kick is DELETE /v1/sessions/{session}: the API key, or the session's own user.
func (a *API) kick(w http.ResponseWriter, r *http.Request) {
	id := chi.URLParam(r, "session")
	s, ok := a.Hub.Session(id)
	if !a.Auth.Publisher(r) {
		client, err := a.Auth.Client(r)
		if err != nil {
			writeError(w, err)
			return
		}
		ok = ok && s.User == client.User // another user's session answers as an unknown one
	}
	// A session that ended since the lookup is no longer live either; one
	// that resumed in its place has the same id and the same user.
	if !ok || !a.Hub.Kick(id) {
		writeError(w, errorf(http.StatusNotFound, "unknown_session", "no live session with this id"))
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

// stats is GET /v1/stats: this node's figures, and in a cluster the totals of sessions,
// users and transports over every live node with a per-node breakdown (nodes).
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
	// Without Postgres the other nodes' figures are missing: the answer is this node's, marked
	// cluster_unavailable, so that the dashboard still shows what this node knows.
	partial := false
	if a.Presence != nil {
		if err := a.clusterStats(r.Context(), st, out); err != nil {
			a.Log.Warn("stats: the other nodes' figures are unavailable", "err", err)
			partial = true
		}
	}
	if r.URL.Query().Get("recent") != "" {
		recent, err := a.recentSessions(r.Context(), 50, !partial)
		if err != nil {
			a.Log.Warn("stats: the other nodes' sessions are unavailable", "err", err)
			partial = true
			recent, _ = a.recentSessions(r.Context(), 50, false)
		}
		out["recent_sessions"] = recent
	}
	if partial {
		out["cluster_unavailable"] = true
	}
	writeJSON(w, http.StatusOK, out)
}

// nodeStatsView is one node of /v1/stats' nodes.
type nodeStatsView struct {
	Node        string           `json:"node"`
	Sessions    int64            `json:"sessions"`
	Users       int64            `json:"users"`
	ByTransport map[string]int64 `json:"by_transport"`
	Draining    bool             `json:"draining"`
}

// clusterStats sets out's sessions, users and by_transport to the cluster's totals and adds
// nodes: this node first (from memory), then the other live nodes by id (from Postgres). On an
// error out has nodes with this node alone and its own totals.
func (a *API) clusterStats(ctx context.Context, local realtime.Stats, out map[string]any) error {
	self := nodeStatsView{Node: a.Presence.Node(), Sessions: local.Sessions, Users: local.Users,
		ByTransport: make(map[string]int64, len(realtime.Transports)), Draining: a.Draining != nil && a.Draining()}
	for _, tr := range realtime.Transports {
		self.ByTransport[string(tr)] = local.ByTransport[tr]
	}
	nodes := []nodeStatsView{self}
	sessions, users := local.Sessions, local.Users
	total := maps.Clone(self.ByTransport)
	if a.Presence.OthersLive() {
		cs, err := a.Presence.Stats(ctx)
		if err != nil {
			out["nodes"] = nodes
			return err
		}
		for _, n := range cs.Nodes {
			v := nodeStatsView{Node: n.Node, Sessions: n.Sessions, Users: n.Users, ByTransport: map[string]int64{}, Draining: n.Draining}
			for _, tr := range realtime.Transports {
				v.ByTransport[string(tr)] = n.ByTransport[string(tr)]
			}
			for tr, k := range n.ByTransport {
				total[tr] += k
			}
			sessions += n.Sessions
			nodes = append(nodes, v)
		}
		users += cs.RemoteUsers - cs.SharedUsers
	}
	out["sessions"], out["users"], out["by_transport"], out["nodes"] = sessions, users, total, nodes
	return nil
}

// recentSessions lists the newest n live sessions, newest first: this node's, and with
// cluster the other live nodes' too.
func (a *API) recentSessions(ctx context.Context, n int, cluster bool) ([]sessionView, error) {
	all := a.Hub.Sessions()
	// Partial selection would do; live sessions are few enough for a sort.
	sortByConnected(all)
	if len(all) > n {
		all = all[:n]
	}
	out := make([]sessionView, len(all))
	for i, s := range all {
		out[i] = a.viewSession(s)
	}
	if cluster && a.Presence != nil && a.Presence.OthersLive() {
		remote, err := a.Presence.Recent(ctx, n)
		if err != nil {
			return nil, err
		}
		out = mergeSessions(out, remote, n)
	}
	return out, nil
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
