package realtime

import (
	"encoding/json"
	"fmt"
	"strings"
	"testing"
	"time"
)

// testConfig is the protocol's default heartbeat with a small queue.
func testConfig() Config {
	return Config{
		PingInterval:       20 * time.Second,
		PingTimeout:        60 * time.Second,
		SweepEvery:         250 * time.Millisecond,
		MaxSessionsPerUser: 20,
		QueueLimit:         64,
		ByeRetry:           time.Second,
	}
}

// newSession makes an unregistered session of user over tr.
func newSession(h *Hub, user string, tr Transport) *Session {
	return h.NewSession(SessionInfo{User: user, Device: "dev-" + user, Transport: tr,
		RemoteAddr: "192.0.2.1:1234", UserAgent: "test"}, 0)
}

// mustRegister registers a new session (still replaying: its hello is queued).
func mustRegister(t testing.TB, h *Hub, user string, tr Transport, resume string) *Session {
	t.Helper()
	s := newSession(h, user, tr)
	if err := h.Register(s, resume); err != nil {
		t.Fatalf("Register(%s, %s, resume %q): %v", user, tr, resume, err)
	}
	return s
}

// mustLive registers a session, finishes an empty replay and drops hello and
// synced, so that its queue then holds only live frames.
func mustLive(t testing.TB, h *Hub, user string, tr Transport) *Session {
	t.Helper()
	s := mustRegister(t, h, user, tr, "")
	s.FinishReplay(nil, 0, false)
	if got := describe(t, s.Take()); got != "hello synced:0" {
		t.Fatalf("new live session queued %q, want hello then synced", got)
	}
	return s
}

// wireMsg is the union of every server message, decoded from a frame.
type wireMsg struct {
	Type           string          `json:"type"`
	Session        string          `json:"session"`
	User           string          `json:"user"`
	Transport      Transport       `json:"transport"`
	PingIntervalMs int64           `json:"ping_interval_ms"`
	PingTimeoutMs  int64           `json:"ping_timeout_ms"`
	ServerTime     string          `json:"server_time"`
	ID             string          `json:"id"`
	Seq            int64           `json:"seq"`
	Topic          string          `json:"topic"`
	Data           json.RawMessage `json:"data"`
	CreatedAt      string          `json:"created_at"`
	Replayed       *bool           `json:"replayed"`
	Cursor         int64           `json:"cursor"`
	Unread         int64           `json:"unread"`
	Truncated      bool            `json:"truncated"`
	IDs            []string        `json:"ids"`
	Reason         Reason          `json:"reason"`
	RetryMs        int64           `json:"retry_ms"`
	Code           string          `json:"code"`
	Message        string          `json:"message"`
}

func decode(t testing.TB, f Frame) wireMsg {
	t.Helper()
	var m wireMsg
	if err := json.Unmarshal(f.JSON, &m); err != nil {
		t.Fatalf("frame %q is not JSON: %v", f.JSON, err)
	}
	if m.Type != f.Type {
		t.Fatalf("frame.Type %q but JSON type %q", f.Type, m.Type)
	}
	if f.Type == TypeNotification {
		if m.Seq != f.Seq || m.ID != f.ID {
			t.Fatalf("frame seq/id %d/%s but JSON %d/%s", f.Seq, f.ID, m.Seq, m.ID)
		}
		if m.Replayed == nil || *m.Replayed != f.Replayed {
			t.Fatalf("frame %s: replayed missing or wrong", f.JSON)
		}
	}
	return m
}

// describe renders frames compactly: notifications as their seq ("3", with r
// when replayed), synced as synced:cursor, bye as bye:reason, others by type.
func describe(t testing.TB, frames []Frame) string {
	t.Helper()
	parts := make([]string, 0, len(frames))
	for _, f := range frames {
		m := decode(t, f)
		switch m.Type {
		case TypeNotification:
			p := fmt.Sprint(m.Seq)
			if *m.Replayed {
				p += "r"
			}
			parts = append(parts, p)
		case TypeSynced:
			parts = append(parts, fmt.Sprintf("synced:%d", m.Cursor))
		case TypeBye:
			parts = append(parts, "bye:"+string(m.Reason))
		default:
			parts = append(parts, m.Type)
		}
	}
	return strings.Join(parts, " ")
}

// notif is user's notification number seq.
func notif(user string, seq int64) Notification {
	return Notification{
		ID: fmt.Sprintf("%s-%d", user, seq), User: user, Seq: seq, Topic: "order.shipped",
		Data:      json.RawMessage(fmt.Sprintf(`{"n":%d}`, seq)),
		CreatedAt: time.Date(2025, 1, 2, 3, 4, 5, 0, time.UTC),
	}
}

func notifs(user string, from, to int64) []Notification {
	var ns []Notification
	for seq := from; seq <= to; seq++ {
		ns = append(ns, notif(user, seq))
	}
	return ns
}

func backlogFrames(user string, from, to int64) []Frame {
	var fs []Frame
	for _, n := range notifs(user, from, to) {
		fs = append(fs, NotificationFrame(n, true))
	}
	return fs
}

func isDone(s *Session) bool {
	select {
	case <-s.Done():
		return true
	default:
		return false
	}
}

func inWheel(h *Hub, s *Session) bool {
	h.wheel.mu.Lock()
	defer h.wheel.mu.Unlock()
	return s.slot.Load() != 0
}

// checkConsistent verifies that the tracker's counters agree with its maps,
// that every tracked session is live and findable, and that the wheel holds
// exactly the tracked sessions that are not pinned.
func checkConsistent(t testing.TB, h *Hub) {
	t.Helper()
	tr := h.tracker
	all := tr.All()
	sessions, users, byTransport := tr.Counts()
	if int64(len(all)) != sessions {
		t.Errorf("Counts says %d sessions, All has %d", sessions, len(all))
	}
	var sum int64
	for _, n := range byTransport {
		if n < 0 {
			t.Errorf("negative transport count: %v", byTransport)
		}
		sum += n
	}
	if sum != sessions {
		t.Errorf("by transport %v sums to %d, want %d", byTransport, sum, sessions)
	}
	want := map[Transport]int64{}
	unpinned := 0
	for _, s := range all {
		want[s.Transport]++
		if got, ok := tr.Get(s.ID); !ok || got != s {
			t.Errorf("Get(%s) = %p, %v; want %p", s.ID, got, ok, s)
		}
		if isDone(s) {
			t.Errorf("ended session %s (%s) still tracked", s.ID, s.Reason())
		}
		h.wheel.mu.Lock()
		pinned, slot := s.pins > 0, s.slot.Load()
		h.wheel.mu.Unlock()
		switch {
		case pinned && slot != 0:
			t.Errorf("pinned session %s is in the wheel", s.ID)
		case !pinned && slot == 0:
			t.Errorf("live session %s is not in the wheel", s.ID)
		case !pinned:
			unpinned++
		}
	}
	for _, tp := range Transports {
		if byTransport[tp] != want[tp] {
			t.Errorf("by transport %v, sessions say %v", byTransport, want)
			break
		}
	}
	var nusers, listed int64
	tr.Users(func(user string, list []*Session) {
		nusers++
		listed += int64(len(list))
		if len(list) == 0 {
			t.Errorf("user %s listed with no sessions", user)
		}
		for _, s := range list {
			if s.User != user {
				t.Errorf("session of %s listed under %s", s.User, user)
			}
		}
	})
	if nusers != users || listed != sessions {
		t.Errorf("Users lists %d users / %d sessions; Counts says %d / %d", nusers, listed, users, sessions)
	}
	if n := h.wheel.len(); n != unpinned {
		t.Errorf("wheel holds %d sessions, want the %d live unpinned ones", n, unpinned)
	}
}
