package realtime

import (
	"sync"
	"testing"
	"testing/synctest"
	"time"
)

func TestHelloIsFirst(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		cfg := testConfig()
		h := NewHub(cfg, Hooks{})
		s := newSession(h, "alice", SSE)
		select {
		case <-s.Wake():
			t.Fatalf("an unregistered session was woken")
		default:
		}
		if err := h.Register(s, ""); err != nil {
			t.Fatal(err)
		}
		select {
		case <-s.Wake():
		default:
			t.Fatalf("Register did not wake the writer for hello")
		}
		frames := s.Take()
		if len(frames) != 1 {
			t.Fatalf("after Register: %q, want hello alone", describe(t, frames))
		}
		m := decode(t, frames[0])
		if m.Type != TypeHello || m.Session != s.ID || m.User != "alice" || m.Transport != SSE ||
			m.PingIntervalMs != 20000 || m.PingTimeoutMs != 60000 {
			t.Fatalf("hello = %+v", m)
		}
		if st, err := time.Parse(time.RFC3339Nano, m.ServerTime); err != nil || !st.Equal(time.Now().Truncate(time.Millisecond)) {
			t.Fatalf("hello server_time %q: %v", m.ServerTime, err)
		}
		if s.Take() != nil {
			t.Fatalf("Take after Take returned frames")
		}
	})
}

// TestHelloFirstUnderConcurrentTraffic races Register against deliveries and
// read broadcasts to the same user: hello must still come first.
func TestHelloFirstUnderConcurrentTraffic(t *testing.T) {
	cfg := testConfig()
	cfg.QueueLimit = 1 << 16
	h := NewHub(cfg, Hooks{})
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Go(func() {
		for seq := int64(1); ; seq++ {
			select {
			case <-stop:
				return
			default:
			}
			h.Deliver([]Notification{notif("alice", seq)})
			h.BroadcastRead("alice", []string{"x"}, seq)
		}
	})
	for range 200 {
		s := mustRegister(t, h, "alice", WebSocket, "")
		s.FinishReplay(nil, 0, false)
		if f := s.Take(); f[0].Type != TypeHello {
			t.Fatalf("first frame %q, want hello", describe(t, f))
		}
		h.End(s, ReasonClientClose)
	}
	close(stop)
	wg.Wait()
}

// TestReplayMerge is the case in the brief: backlog 1..5, live 4..8 published
// while the replay runs. The session gets hello, 1..5 replayed, synced at 5,
// then 6, 7, 8 live, each once.
func TestReplayMerge(t *testing.T) {
	h := NewHub(testConfig(), Hooks{})
	s := mustRegister(t, h, "alice", WebSocket, "")
	h.Deliver(notifs("alice", 4, 8))
	if got := describe(t, s.Take()); got != "hello" {
		t.Fatalf("during replay the queue holds %q, want hello alone", got)
	}
	s.FinishReplay(backlogFrames("alice", 1, 5), 7, false)
	frames := s.Take()
	if got, want := describe(t, frames), "1r 2r 3r 4r 5r synced:5 6 7 8"; got != want {
		t.Fatalf("after replay: %q, want %q", got, want)
	}
	synced := decode(t, frames[5])
	if synced.Cursor != 5 || synced.Unread != 7 || synced.Truncated {
		t.Fatalf("synced = %+v", synced)
	}
	if n := decode(t, frames[6]); n.ID != "alice-6" || n.Topic != "order.shipped" || string(n.Data) != `{"n":6}` ||
		n.CreatedAt != "2025-01-02T03:04:05.000Z" {
		t.Fatalf("live notification = %+v", n)
	}
	if s.Cursor() != 8 {
		t.Fatalf("Cursor = %d, want 8", s.Cursor())
	}
	// Live from here on: duplicates and old seqs are dropped.
	h.Deliver(notifs("alice", 7, 10))
	h.Deliver([]Notification{notif("alice", 3), notif("alice", 10), notif("alice", 11)})
	if got := describe(t, s.Take()); got != "9 10 11" {
		t.Fatalf("live: %q, want 9 10 11", got)
	}
}

func TestReplayMergeOrdering(t *testing.T) {
	tests := []struct {
		name      string
		cursor    int64
		backlog   [2]int64 // from..to, empty when from > to
		live      []int64  // delivered during the replay, in this order
		truncated bool
		want      string
	}{
		{"no backlog", 0, [2]int64{1, 0}, []int64{1, 2}, false, "synced:0 1 2"},
		{"client cursor, nothing new", 10, [2]int64{1, 0}, []int64{9, 10, 11}, false, "synced:10 11"},
		{"live out of order with duplicates", 0, [2]int64{1, 3}, []int64{8, 6, 2, 7, 6, 4, 5, 8}, false, "1r 2r 3r synced:3 4 5 6 7 8"},
		{"live all below", 0, [2]int64{1, 5}, []int64{1, 3, 5}, false, "1r 2r 3r 4r 5r synced:5"},
		{"backlog above cursor only", 3, [2]int64{2, 6}, nil, false, "4r 5r 6r synced:6"},
		{"truncated backlog", 0, [2]int64{1, 3}, []int64{9}, true, "1r 2r 3r synced:3 9"},
		{"gap kept", 0, [2]int64{1, 2}, []int64{5}, false, "1r 2r synced:2 5"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h := NewHub(testConfig(), Hooks{})
			s := h.NewSession(SessionInfo{User: "u", Transport: WebSocket}, tt.cursor)
			if err := h.Register(s, ""); err != nil {
				t.Fatal(err)
			}
			s.Take()
			for _, seq := range tt.live {
				h.Deliver([]Notification{notif("u", seq)})
			}
			s.FinishReplay(backlogFrames("u", tt.backlog[0], tt.backlog[1]), 0, tt.truncated)
			frames := s.Take()
			if got := describe(t, frames); got != tt.want {
				t.Fatalf("got %q, want %q", got, tt.want)
			}
			for _, f := range frames {
				if f.Type == TypeSynced && decode(t, f).Truncated != tt.truncated {
					t.Fatalf("synced.truncated wrong")
				}
			}
		})
	}
}

// TestSeqsOnlyIncrease hammers one session with concurrent, overlapping
// deliveries around its replay: every seq arrives once, in increasing order.
func TestSeqsOnlyIncrease(t *testing.T) {
	cfg := testConfig()
	cfg.QueueLimit = 1 << 16
	h := NewHub(cfg, Hooks{})
	s := mustRegister(t, h, "alice", WebSocket, "")
	const top = 2000
	var wg sync.WaitGroup
	for w := range 4 {
		wg.Go(func() {
			for seq := int64(1 + w); seq <= top; seq += 2 {
				h.Deliver([]Notification{notif("alice", seq)})
			}
		})
	}
	var got []Frame
	var mu sync.Mutex
	wg.Go(func() {
		for range 50 {
			f := s.Take()
			mu.Lock()
			got = append(got, f...)
			mu.Unlock()
		}
	})
	s.FinishReplay(backlogFrames("alice", 1, 300), 0, false)
	wg.Wait()
	got = append(got, s.Take()...)
	last := int64(0)
	seen := map[int64]bool{}
	for _, f := range got {
		if f.Type != TypeNotification {
			continue
		}
		if f.Seq <= last {
			t.Fatalf("seq %d after %d", f.Seq, last)
		}
		last = f.Seq
		seen[f.Seq] = true
	}
	if !seen[1] || !seen[300] || !seen[top] {
		t.Fatalf("missing seqs: 1 %v, 300 %v, %d %v", seen[1], seen[300], top, seen[top])
	}
	for seq := int64(1); seq <= 300; seq++ {
		if !seen[seq] {
			t.Fatalf("backlog seq %d missing", seq)
		}
	}
	if isDone(s) {
		t.Fatalf("session ended: %s", s.Reason())
	}
}

func TestQueueOverflowSlowConsumer(t *testing.T) {
	t.Run("live", func(t *testing.T) {
		cfg := testConfig()
		cfg.QueueLimit = 8
		var ended []Reason
		h := NewHub(cfg, Hooks{Ended: func(s *Session, r Reason) { ended = append(ended, r) }})
		s := mustLive(t, h, "alice", WebSocket)
		other := mustLive(t, h, "alice", SSE)
		done := make(chan struct{})
		go func() {
			defer close(done)
			for seq := int64(1); seq <= 10_000; seq++ {
				h.Deliver([]Notification{notif("alice", seq)})
				other.Take() // this device keeps up
			}
		}()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			t.Fatalf("Deliver blocked on a full queue")
		}
		if s.Reason() != ReasonSlowConsumer {
			t.Fatalf("reason %q, want slow_consumer", s.Reason())
		}
		if isDone(other) {
			t.Fatalf("the other device ended too: %s", other.Reason())
		}
		if got := len(s.Take()); got != cfg.QueueLimit {
			t.Fatalf("%d frames queued, want the limit %d", got, cfg.QueueLimit)
		}
		if s.Send(PongFrame(time.Now())) {
			t.Fatalf("Send on an ended session succeeded")
		}
		if st := h.Stats(); st.Sessions != 1 || st.Evictions != 0 {
			t.Fatalf("Stats = %+v", st)
		}
		if len(ended) != 1 || ended[0] != ReasonSlowConsumer {
			t.Fatalf("Ended hook calls %v", ended)
		}
		checkConsistent(t, h)
	})
	t.Run("send", func(t *testing.T) {
		cfg := testConfig()
		cfg.QueueLimit = 3
		h := NewHub(cfg, Hooks{})
		s := mustLive(t, h, "alice", WebSocket)
		for i := range 3 {
			if !s.Send(PongFrame(time.Now())) {
				t.Fatalf("Send %d failed below the limit", i)
			}
		}
		if s.Send(PongFrame(time.Now())) {
			t.Fatalf("Send past the limit succeeded")
		}
		if s.Reason() != ReasonSlowConsumer {
			t.Fatalf("reason %q", s.Reason())
		}
	})
	t.Run("during replay", func(t *testing.T) {
		cfg := testConfig()
		cfg.QueueLimit = 4
		h := NewHub(cfg, Hooks{})
		s := mustRegister(t, h, "alice", WebSocket, "")
		h.Deliver(notifs("alice", 1, 4))
		if isDone(s) {
			t.Fatalf("ended at the limit")
		}
		h.Deliver(notifs("alice", 5, 100))
		if s.Reason() != ReasonSlowConsumer {
			t.Fatalf("reason %q", s.Reason())
		}
		s.FinishReplay(backlogFrames("alice", 1, 2), 0, false)
		if got := describe(t, s.Take()); got != "hello" {
			t.Fatalf("an ended session queued %q", got)
		}
	})
	t.Run("backlog", func(t *testing.T) {
		cfg := testConfig()
		cfg.QueueLimit = 4
		h := NewHub(cfg, Hooks{})
		s := mustRegister(t, h, "alice", WebSocket, "")
		s.FinishReplay(backlogFrames("alice", 1, 10), 0, false)
		if s.Reason() != ReasonSlowConsumer {
			t.Fatalf("reason %q", s.Reason())
		}
		if got := describe(t, s.Take()); got != "hello 1r 2r 3r" {
			t.Fatalf("queued %q", got)
		}
		if h.Stats().Sessions != 0 {
			t.Fatalf("still counted")
		}
	})
}

func TestWakeIsLevelTriggered(t *testing.T) {
	h := NewHub(testConfig(), Hooks{})
	s := mustLive(t, h, "alice", WebSocket)
	// hello and synced left a wake behind (Take does not consume it: a
	// writer may wake to an empty queue, never sleep on a full one).
	select {
	case <-s.Wake():
	default:
		t.Fatalf("no wake for hello and synced")
	}
	select {
	case <-s.Wake():
		t.Fatalf("woken twice")
	default:
	}
	for range 5 {
		s.Send(PongFrame(time.Now()))
	}
	<-s.Wake()
	select {
	case <-s.Wake():
		t.Fatalf("five frames woke twice")
	default:
	}
	if n := len(s.Take()); n != 5 {
		t.Fatalf("took %d", n)
	}
}
