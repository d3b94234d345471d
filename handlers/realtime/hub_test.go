package realtime

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"
)

func TestDeliverToEveryDeviceOfTheUser(t *testing.T) {
	h := NewHub(testConfig(), Hooks{})
	alice := []*Session{mustLive(t, h, "alice", WebSocket), mustLive(t, h, "alice", SSE), mustLive(t, h, "alice", LongPoll)}
	bob := mustLive(t, h, "bob", WebSocket)
	// A batch mixing users, including one nobody is online for.
	h.Deliver([]Notification{notif("alice", 1), notif("alice", 2), notif("bob", 1), notif("carol", 1), notif("alice", 3)})
	for _, s := range alice {
		frames := s.Take()
		if got := describe(t, frames); got != "1 2 3" {
			t.Fatalf("alice's %s got %q", s.Transport, got)
		}
		for _, f := range frames {
			if m := decode(t, f); m.ID != fmt.Sprint("alice-", m.Seq) {
				t.Fatalf("alice got %+v", m)
			}
		}
	}
	frames := bob.Take()
	if got := describe(t, frames); got != "1" || frames[0].ID != "bob-1" {
		t.Fatalf("bob got %q", got)
	}
	// The encoded frame is shared: one encoding per notification.
	h.Deliver([]Notification{notif("alice", 4)})
	f0, f1 := alice[0].Take(), alice[1].Take()
	if &f0[0].JSON[0] != &f1[0].JSON[0] {
		t.Fatalf("each session got its own encoding")
	}
	h.Deliver(nil)
}

func TestBroadcastRead(t *testing.T) {
	h := NewHub(testConfig(), Hooks{})
	alice := []*Session{mustLive(t, h, "alice", WebSocket), mustLive(t, h, "alice", LongPoll)}
	replaying := mustRegister(t, h, "alice", SSE, "") // read state reaches it during replay too
	replaying.Take()
	bob := mustLive(t, h, "bob", WebSocket)
	h.BroadcastRead("alice", []string{"a-1", "a-2"}, 5)
	for _, s := range append(alice, replaying) {
		frames := s.Take()
		if len(frames) != 1 {
			t.Fatalf("%s got %q", s.Transport, describe(t, frames))
		}
		m := decode(t, frames[0])
		if m.Type != TypeRead || !slices.Equal(m.IDs, []string{"a-1", "a-2"}) || m.Unread != 5 {
			t.Fatalf("read = %+v", m)
		}
	}
	if got := bob.Take(); got != nil {
		t.Fatalf("bob got %q", describe(t, got))
	}
	h.BroadcastRead("alice", nil, 0)
	if got := string(alice[0].Take()[0].JSON); got != `{"type":"read","ids":[],"unread":0}` {
		t.Fatalf("read with no ids = %s", got)
	}
	h.BroadcastRead("nobody", []string{"x"}, 1)
}

func TestKick(t *testing.T) {
	var started, ended atomic.Int32
	h := NewHub(testConfig(), Hooks{
		Started: func(*Session) { started.Add(1) },
		Ended:   func(*Session, Reason) { ended.Add(1) },
	})
	a := mustLive(t, h, "alice", WebSocket)
	b := mustLive(t, h, "alice", SSE)
	if !h.Kick(a.ID) {
		t.Fatalf("Kick of a live session = false")
	}
	if !isDone(a) || a.Reason() != ReasonKicked {
		t.Fatalf("kicked session: done %v reason %q", isDone(a), a.Reason())
	}
	if h.Kick(a.ID) || h.Kick("nope") {
		t.Fatalf("Kick of a gone session = true")
	}
	if isDone(b) {
		t.Fatalf("the user's other session ended")
	}
	if st := h.Stats(); st.Sessions != 1 || st.Evictions != 0 {
		t.Fatalf("Stats = %+v", st)
	}
	if started.Load() != 2 || ended.Load() != 1 {
		t.Fatalf("hooks: started %d, ended %d", started.Load(), ended.Load())
	}
	checkConsistent(t, h)
}

func TestShutdown(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		var mu sync.Mutex
		byes := map[string]Frame{}
		h := NewHub(testConfig(), Hooks{})
		var ss []*Session
		for i := range 10 {
			s := mustLive(t, h, fmt.Sprint("u", i%4), Transports[i%3])
			ss = append(ss, s)
			// A writer: waits for the end, says bye, and takes a moment to flush.
			done := h.Hold()
			go func() {
				defer done()
				<-s.Done()
				time.Sleep(100 * time.Millisecond)
				mu.Lock()
				byes[s.ID] = h.Bye(s.Reason())
				mu.Unlock()
			}()
		}
		if h.Closing() {
			t.Fatalf("Closing before Shutdown")
		}
		start := time.Now()
		if err := h.Shutdown(context.Background()); err != nil {
			t.Fatalf("Shutdown: %v", err)
		}
		if time.Since(start) < 100*time.Millisecond {
			t.Fatalf("Shutdown did not wait for the writers")
		}
		if !h.Closing() {
			t.Fatalf("Closing after Shutdown = false")
		}
		for _, s := range ss {
			if s.Reason() != ReasonShutdown {
				t.Fatalf("reason %q", s.Reason())
			}
			m := decode(t, byes[s.ID])
			if m.Type != TypeBye || m.Reason != ReasonShutdown || m.RetryMs < 1000 || m.RetryMs >= 2000 {
				t.Fatalf("bye = %+v, want shutdown with retry in [1000, 2000) ms", m)
			}
		}
		if st := h.Stats(); st.Sessions != 0 || st.Users != 0 || st.Evictions != 0 || h.wheel.len() != 0 {
			t.Fatalf("after Shutdown: %+v, wheel %d", st, h.wheel.len())
		}
		// A registration that slips past a transport's Closing check ends at once.
		s := mustRegister(t, h, "late", WebSocket, "")
		if !isDone(s) || s.Reason() != ReasonShutdown {
			t.Fatalf("late session: done %v reason %q", isDone(s), s.Reason())
		}
		if st := h.Stats(); st.Sessions != 0 {
			t.Fatalf("late session counted: %+v", st)
		}
		checkConsistent(t, h)
	})
}

func TestShutdownTimeout(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := NewHub(testConfig(), Hooks{})
		s := mustLive(t, h, "alice", WebSocket)
		release := make(chan struct{})
		done := h.Hold() // a writer stuck on a dead peer
		go func() { <-release; done() }()
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if err := h.Shutdown(ctx); !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("Shutdown = %v, want the context's error", err)
		}
		if s.Reason() != ReasonShutdown {
			t.Fatalf("reason %q", s.Reason())
		}
		close(release)
	})
}

// TestShutdownRacesRegister: registrations running while Shutdown starts
// either end with shutdown or never registered; none stays live.
func TestShutdownRacesRegister(t *testing.T) {
	h := NewHub(testConfig(), Hooks{})
	var wg sync.WaitGroup
	var mu sync.Mutex
	var all []*Session
	registered := make(chan struct{}) // closed at the first registration: Shutdown starts mid-stream
	var once sync.Once
	for w := range 8 {
		wg.Go(func() {
			for i := range 50 {
				s := newSession(h, fmt.Sprint("u", w, "-", i%5), WebSocket)
				if err := h.Register(s, ""); err != nil {
					continue
				}
				mu.Lock()
				all = append(all, s)
				mu.Unlock()
				once.Do(func() { close(registered) })
			}
		})
	}
	<-registered
	if err := h.Shutdown(context.Background()); err != nil {
		t.Fatal(err)
	}
	wg.Wait()
	for _, s := range all {
		if s.Reason() != ReasonShutdown {
			t.Fatalf("session %s: reason %q after Shutdown", s.ID, s.Reason())
		}
	}
	if st := h.Stats(); st.Sessions != 0 || st.Users != 0 {
		t.Fatalf("Stats after Shutdown = %+v", st)
	}
	checkConsistent(t, h)
}

func TestBye(t *testing.T) {
	h := NewHub(testConfig(), Hooks{})
	for _, r := range []Reason{ReasonKicked, ReasonReplaced, ReasonHeartbeat, ReasonSlowConsumer} {
		if !r.SendsBye() {
			t.Fatalf("%s does not send bye", r)
		}
		m := decode(t, h.Bye(r))
		if m.Reason != r || m.RetryMs != 1000 {
			t.Fatalf("bye %s = %+v", r, m)
		}
	}
	for _, r := range []Reason{ReasonClientClose, ReasonError} {
		if r.SendsBye() {
			t.Fatalf("%s sends bye", r)
		}
	}
}

func TestCursors(t *testing.T) {
	h := NewHub(testConfig(), Hooks{})
	a1 := mustLive(t, h, "alice", WebSocket)
	a2 := h.NewSession(SessionInfo{User: "alice", Transport: SSE}, 3)
	if err := h.Register(a2, ""); err != nil {
		t.Fatal(err)
	}
	a2.FinishReplay(nil, 0, false)
	b := h.NewSession(SessionInfo{User: "bob", Transport: SSE}, 0)
	if err := h.Register(b, ""); err != nil {
		t.Fatal(err)
	}
	b.FinishReplay(backlogFrames("bob", 1, 9), 9, false)
	h.Deliver(notifs("alice", 1, 2))
	got := h.Cursors()
	if len(got) != 2 || got["alice"] != 2 || got["bob"] != 9 {
		t.Fatalf("Cursors = %v, want alice 2 (a1 holds 2, a2 holds 3), bob 9", got)
	}
	h.End(a1, ReasonClientClose)
	if got := h.Cursors(); got["alice"] != 3 {
		t.Fatalf("Cursors after a1 left = %v", got)
	}
}

func TestWrittenCountsDeliveries(t *testing.T) {
	var written atomic.Int32
	h := NewHub(testConfig(), Hooks{Written: func(s *Session, f []Frame) { written.Add(int32(len(f))) }})
	s := mustRegister(t, h, "alice", WebSocket, "")
	s.FinishReplay(backlogFrames("alice", 1, 3), 3, false)
	h.Deliver(notifs("alice", 4, 5))
	s.Send(PongFrame(time.Now()))
	frames := s.Take() // hello, 1r 2r 3r, synced, 4, 5, pong
	h.Written(s, frames)
	if st := h.Stats(); st.Deliveries != 5 {
		t.Fatalf("Deliveries = %d, want 5 (notifications only)", st.Deliveries)
	}
	if written.Load() != int32(len(frames)) {
		t.Fatalf("Written hook saw %d frames", written.Load())
	}
}

func TestNewHubDefaults(t *testing.T) {
	h := NewHub(Config{PingTimeout: time.Minute}, Hooks{})
	cfg := h.Config()
	if cfg.SweepEvery != 250*time.Millisecond || cfg.QueueLimit != 1256 || cfg.ByeRetry != time.Second {
		t.Fatalf("defaults = %+v", cfg)
	}
	// The defaults are the ones the hub works with, not only the ones it reports.
	if h.wheel.width != int64(cfg.SweepEvery) {
		t.Fatalf("wheel slot width %v, want the sweep interval %v", time.Duration(h.wheel.width), cfg.SweepEvery)
	}
	if m := decode(t, h.Bye(ReasonKicked)); m.RetryMs != cfg.ByeRetry.Milliseconds() {
		t.Fatalf("bye retry_ms = %d, want %d", m.RetryMs, cfg.ByeRetry.Milliseconds())
	}
	s, s2 := newSession(h, "alice", WebSocket), newSession(h, "alice", WebSocket)
	if s.ID != "" {
		t.Fatalf("an unregistered session has id %q", s.ID)
	}
	if s.limit != cfg.QueueLimit {
		t.Fatalf("session queue limit %d, want %d", s.limit, cfg.QueueLimit)
	}
	if st := h.Stats(); st.Sessions != 0 || st.Users != 0 || len(h.Sessions()) != 0 {
		t.Fatalf("a new hub has sessions: %+v", st)
	}
	for _, x := range []*Session{s, s2} {
		if err := h.Register(x, ""); err != nil {
			t.Fatal(err)
		}
	}
	if s.ID == "" || s.ID == s2.ID {
		t.Fatalf("session ids are empty or repeat")
	}
	if got, ok := h.Session(s2.ID); !ok || got != s2 {
		t.Fatalf("Session(%q) = %p, %v; want the registered session", s2.ID, got, ok)
	}
	if st := h.Stats(); st.Sessions != 2 || st.Users != 1 || st.ByTransport[WebSocket] != 2 ||
		len(h.UserSessions("alice")) != 2 || len(h.Sessions()) != 2 {
		t.Fatalf("after two registers: %+v", st)
	}
	if s.Cursor() != 0 || isDone(s) || s.Reason() != "" {
		t.Fatalf("fresh session state")
	}
	for _, tr := range Transports {
		if !tr.Valid() {
			t.Fatalf("%s not valid", tr)
		}
	}
	if Transport("carrier-pigeon").Valid() {
		t.Fatalf("unknown transport valid")
	}
}

// TestHubConcurrentStress runs every hub operation at once under the race
// detector, with the sweeper evicting for real; at the end the tracker and
// the wheel agree and Shutdown leaves nothing behind.
func TestHubConcurrentStress(t *testing.T) {
	cfg := testConfig()
	cfg.PingTimeout = 5 * time.Millisecond
	cfg.SweepEvery = time.Millisecond
	cfg.QueueLimit = 32
	cfg.MaxSessionsPerUser = 6
	var started, ended atomic.Int64
	h := NewHub(cfg, Hooks{
		Started: func(*Session) { started.Add(1) },
		Ended:   func(*Session, Reason) { ended.Add(1) },
	})
	ctx, cancel := context.WithCancel(context.Background())
	runDone := make(chan struct{})
	go func() {
		h.Run(ctx)
		close(runDone)
	}()
	const workers, users = 8, 12
	var wg sync.WaitGroup
	var mu sync.Mutex
	var created []*Session
	for w := range workers {
		wg.Go(func() {
			rng := rand.New(rand.NewPCG(uint64(w), 1))
			var mine []*Session
			pins := map[*Session]int{}
			seq := int64(w) * 1_000_000
			for range 1500 {
				user := fmt.Sprint("u", rng.IntN(users))
				switch r := rng.IntN(20); {
				case r < 4 || len(mine) == 0:
					resume := ""
					if len(mine) > 0 && rng.IntN(3) == 0 {
						resume = mine[rng.IntN(len(mine))].ID
					}
					s := newSession(h, user, Transports[rng.IntN(3)])
					if err := h.Register(s, resume); err != nil {
						if !errors.Is(err, ErrTooManySessions) {
							t.Error(err)
						}
						continue
					}
					if rng.IntN(2) == 0 {
						s.FinishReplay(nil, 0, false)
					}
					mine = append(mine, s)
					mu.Lock()
					created = append(created, s)
					mu.Unlock()
				case r < 8:
					h.Touch(mine[rng.IntN(len(mine))])
				case r < 10:
					s := mine[rng.IntN(len(mine))]
					h.Pin(s)
					pins[s]++
				case r < 12:
					for s, n := range pins {
						h.Unpin(s)
						if n == 1 {
							delete(pins, s)
						} else {
							pins[s] = n - 1
						}
						break
					}
				case r < 15:
					seq++
					h.Deliver([]Notification{notif(user, seq)})
				case r < 16:
					h.BroadcastRead(user, []string{"x"}, 1)
				case r < 17:
					h.Kick(mine[rng.IntN(len(mine))].ID)
				case r < 18:
					i := rng.IntN(len(mine))
					h.End(mine[i], ReasonClientClose)
					mine[i] = mine[len(mine)-1]
					mine = mine[:len(mine)-1]
				case r < 19:
					for _, s := range mine {
						s.Take()
					}
				default:
					h.Stats()
					h.Cursors()
					h.Sweep(time.Now())
				}
			}
			for s, n := range pins {
				for range n {
					h.Unpin(s)
				}
			}
		})
	}
	wg.Wait()
	cancel()
	<-runDone
	checkConsistent(t, h)

	if err := h.Shutdown(context.Background()); err != nil {
		t.Fatal(err)
	}
	for _, s := range created {
		if !isDone(s) {
			t.Fatalf("session %s still live after Shutdown", s.ID)
		}
	}
	if started.Load() != int64(len(created)) || ended.Load() != started.Load() {
		t.Fatalf("hooks: %d started, %d ended, %d created", started.Load(), ended.Load(), len(created))
	}
	if st := h.Stats(); st.Sessions != 0 || st.Users != 0 || st.Evictions == 0 {
		t.Fatalf("Stats = %+v, want empty with some evictions", st)
	}
	if n := h.wheel.len(); n != 0 {
		t.Fatalf("wheel holds %d after Shutdown", n)
	}
}
