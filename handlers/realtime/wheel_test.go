package realtime

import (
	"context"
	"fmt"
	"slices"
	"sync"
	"testing"
	"testing/synctest"
	"time"
)

func wheelIDs(ss []*Session) []string {
	ids := make([]string, len(ss))
	for i, s := range ss {
		ids[i] = s.ID
	}
	slices.Sort(ids)
	return ids
}

func TestWheelScheduleUnlinkExpire(t *testing.T) {
	const width = int64(100)
	w := newWheel(time.Duration(width), time.Unix(0, 1000))
	if w.next != 10 {
		t.Fatalf("next = %d, want 10", w.next)
	}
	mk := func(id string) *Session { return &Session{ID: id} }
	a, b, c, d, e := mk("a"), mk("b"), mk("c"), mk("d"), mk("e")
	w.mu.Lock()
	w.schedule(a, 1200) // exactly on a boundary: slot 12
	w.schedule(b, 1201) // rounds up: slot 13
	w.schedule(c, 1250)
	w.schedule(d, 1300)
	w.schedule(e, 1299)
	w.mu.Unlock()
	for s, slot := range map[*Session]int64{a: 12, b: 13, c: 13, d: 13, e: 13} {
		if s.slot.Load() != slot {
			t.Errorf("%s in slot %d, want %d", s.ID, s.slot.Load(), slot)
		}
	}
	if n := w.len(); n != 5 {
		t.Fatalf("len = %d", n)
	}
	// Unlink from the middle, the head and the tail of slot 13's list.
	w.mu.Lock()
	w.unlink(d)
	w.unlink(e) // head (last scheduled)
	w.unlink(e) // twice is harmless
	w.mu.Unlock()
	if n := w.len(); n != 3 || d.slot.Load() != 0 || e.slot.Load() != 0 {
		t.Fatalf("after unlink: len %d, slots %d %d", w.len(), d.slot.Load(), e.slot.Load())
	}
	// Never before the deadline.
	if got := w.expire(1199, nil); len(got) != 0 {
		t.Fatalf("expire(1199) = %v", wheelIDs(got))
	}
	if got := w.expire(1200, nil); !slices.Equal(wheelIDs(got), []string{"a"}) {
		t.Fatalf("expire(1200) = %v, want [a]", wheelIDs(got))
	}
	if got := w.expire(1299, nil); len(got) != 0 {
		t.Fatalf("expire(1299) = %v; b's deadline 1201 rounds up to the slot starting at 1300", wheelIDs(got))
	}
	// Moving a session to another slot.
	w.mu.Lock()
	w.schedule(c, 5000)
	w.schedule(c, 5000) // same slot: no-op
	w.mu.Unlock()
	if got := w.expire(1300, nil); !slices.Equal(wheelIDs(got), []string{"b"}) {
		t.Fatalf("expire(1300) = %v, want [b]", wheelIDs(got))
	}
	if b.slot.Load() != 0 || b.next != nil || b.prev != nil {
		t.Fatalf("an expired session keeps wheel state")
	}
	// An earlier time than the last sweep takes nothing.
	if got := w.expire(900, nil); len(got) != 0 {
		t.Fatalf("expire backwards = %v", wheelIDs(got))
	}
	if got := w.expire(5000, nil); !slices.Equal(wheelIDs(got), []string{"c"}) {
		t.Fatalf("expire(5000) = %v, want [c]", wheelIDs(got))
	}
	if w.len() != 0 || len(w.slots) != 0 {
		t.Fatalf("wheel not empty: %d sessions, %d slots", w.len(), len(w.slots))
	}
}

func TestWheelPinnedStaysOut(t *testing.T) {
	w := newWheel(100, time.Unix(0, 0))
	s := &Session{ID: "s", pins: 1}
	w.mu.Lock()
	w.schedule(s, 1000)
	w.mu.Unlock()
	if s.slot.Load() != 0 || w.len() != 0 {
		t.Fatalf("a pinned session was scheduled")
	}
}

// TestWheelLongPause covers both ways expire walks: slot by slot for a short
// gap and over the occupied slots for a long one.
func TestWheelLongPause(t *testing.T) {
	for _, gap := range []int64{10, 1_000_000} {
		w := newWheel(10, time.Unix(0, 10))
		w.mu.Lock()
		for i := int64(1); i <= 50; i++ {
			s := &Session{ID: string(rune('A' + i))}
			w.schedule(s, i*gap)
		}
		w.mu.Unlock()
		now := 25 * gap
		got := w.expire(now, nil)
		if len(got) != 25 {
			t.Fatalf("gap %d: expired %d, want 25", gap, len(got))
		}
		for _, s := range got {
			if s.slot.Load() != 0 {
				t.Fatalf("expired session still has a slot")
			}
		}
		if w.len() != 25 {
			t.Fatalf("gap %d: %d left, want 25", gap, w.len())
		}
		if got := w.expire(1<<60, nil); len(got) != 25 {
			t.Fatalf("gap %d: final expire took %d", gap, len(got))
		}
	}
}

// evictionClock runs a hub with its sweeper in a synctest bubble and records
// when each session ended.
type evictionClock struct {
	mu    sync.Mutex
	ended map[*Session]time.Time
}

func (c *evictionClock) hooks() Hooks {
	return Hooks{Ended: func(s *Session, r Reason) {
		c.mu.Lock()
		c.ended[s] = time.Now()
		c.mu.Unlock()
	}}
}

func (c *evictionClock) at(s *Session) time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.ended[s]
}

func startHub(t *testing.T, cfg Config) (*Hub, *evictionClock) {
	c := &evictionClock{ended: map[*Session]time.Time{}}
	h := NewHub(cfg, c.hooks())
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		h.Run(ctx)
		close(done)
	}()
	t.Cleanup(func() {
		cancel()
		<-done
	})
	return h, c
}

// TestSweepEvictionWindow: a silent session is evicted no sooner than
// PingTimeout after its last Touch and no later than one second after that,
// whatever the phase of the touch against the sweeper's ticks.
func TestSweepEvictionWindow(t *testing.T) {
	for _, every := range []time.Duration{50 * time.Millisecond, 100 * time.Millisecond, 250 * time.Millisecond, 0, 500 * time.Millisecond} {
		name := "SweepEvery=" + every.String()
		if every == 0 {
			name = "SweepEvery=default"
		}
		t.Run(name, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				cfg := testConfig()
				cfg.SweepEvery = every
				time.Sleep(123 * time.Millisecond) // the ticks start off the slot boundaries
				h, clock := startHub(t, cfg)
				offsets := []time.Duration{0, time.Millisecond, 37 * time.Millisecond, 99 * time.Millisecond,
					100 * time.Millisecond, 101 * time.Millisecond, 249 * time.Millisecond, 250 * time.Millisecond,
					499 * time.Millisecond, 777 * time.Millisecond, 1234 * time.Millisecond, 5 * time.Second}
				type tc struct {
					s    *Session
					last time.Time
				}
				var cases []tc
				start := time.Now()
				for _, off := range offsets {
					s := mustLive(t, h, "u", WebSocket)
					time.Sleep(time.Until(start.Add(off)))
					h.Touch(s)
					cases = append(cases, tc{s, time.Now()})
				}
				if n := h.wheel.len(); n != len(offsets) {
					t.Fatalf("wheel holds %d, want %d", n, len(offsets))
				}
				// Just before each deadline nothing is gone.
				for _, c := range cases {
					time.Sleep(time.Until(c.last.Add(cfg.PingTimeout - time.Millisecond)))
					synctest.Wait()
					if isDone(c.s) {
						t.Fatalf("touched at %v, evicted by %v (%v < PingTimeout)",
							c.last.Sub(start), time.Since(c.last), time.Since(c.last))
					}
				}
				last := cases[len(cases)-1].last
				time.Sleep(time.Until(last.Add(cfg.PingTimeout + time.Second)))
				synctest.Wait()
				for _, c := range cases {
					if !isDone(c.s) {
						t.Fatalf("touched at %v: still live %v after", c.last.Sub(start), time.Since(c.last))
					}
					if c.s.Reason() != ReasonHeartbeat {
						t.Fatalf("reason %q, want heartbeat_timeout", c.s.Reason())
					}
					silent := clock.at(c.s).Sub(c.last)
					if silent < cfg.PingTimeout || silent > cfg.PingTimeout+time.Second {
						t.Errorf("touched at +%v: evicted after %v of silence, want within [%v, %v]",
							c.last.Sub(start), silent, cfg.PingTimeout, cfg.PingTimeout+time.Second)
					}
					if limit := cfg.PingTimeout + 2*h.cfg.SweepEvery; silent > limit {
						t.Errorf("evicted after %v, want within two sweep ticks (%v)", silent, limit)
					}
				}
				if st := h.Stats(); st.Evictions != uint64(len(cases)) || st.Sessions != 0 || st.Users != 0 {
					t.Fatalf("Stats = %+v, want %d evictions and nobody online", st, len(cases))
				}
				if n := h.wheel.len(); n != 0 {
					t.Fatalf("wheel still holds %d", n)
				}
				checkConsistent(t, h)
			})
		})
	}
}

// TestSweepTouchedKeepAlive: sessions that keep touching within the timeout
// are never evicted; the one that stops is.
func TestSweepTouchedKeepAlive(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		cfg := testConfig()
		h, clock := startHub(t, cfg)
		chatty := mustLive(t, h, "alice", WebSocket)
		barely := mustLive(t, h, "alice", SSE)       // touches just inside the timeout
		lazy := mustLive(t, h, "bob", LongPoll)      // stops after 2 minutes
		writer := mustLive(t, h, "carol", WebSocket) // its frames do not count as life
		ctx, cancel := context.WithCancel(context.Background())
		var wg sync.WaitGroup
		touch := func(s *Session, every time.Duration, until time.Duration) {
			wg.Go(func() {
				end := time.Now().Add(until)
				for time.Now().Before(end) {
					select {
					case <-ctx.Done():
						return
					case <-time.After(every):
					}
					h.Touch(s)
				}
			})
		}
		touch(chatty, cfg.PingInterval, time.Hour)
		touch(barely, cfg.PingTimeout-time.Millisecond, time.Hour)
		touch(lazy, cfg.PingInterval, 2*time.Minute)
		wg.Go(func() {
			for {
				select {
				case <-ctx.Done():
					return
				case <-time.After(time.Second):
					writer.Send(PongFrame(time.Now()))
					writer.Take()
				}
			}
		})
		time.Sleep(10 * time.Minute)
		synctest.Wait()
		if isDone(chatty) || isDone(barely) {
			t.Fatalf("touched sessions evicted: %q %q", chatty.Reason(), barely.Reason())
		}
		if lazy.Reason() != ReasonHeartbeat || writer.Reason() != ReasonHeartbeat {
			t.Fatalf("silent sessions: %q %q, want heartbeat_timeout", lazy.Reason(), writer.Reason())
		}
		if silent := clock.at(lazy).Sub(lazy.LastSeen()); silent < cfg.PingTimeout || silent > cfg.PingTimeout+time.Second {
			t.Fatalf("lazy evicted %v after its last touch", silent)
		}
		if st := h.Stats(); st.Evictions != 2 || st.Sessions != 2 {
			t.Fatalf("Stats = %+v", st)
		}
		cancel()
		wg.Wait()
		checkConsistent(t, h)
	})
}

// TestSweepPinned: a pinned session is never evicted while pinned, however
// long; its timeout runs from Unpin.
func TestSweepPinned(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		cfg := testConfig()
		h, clock := startHub(t, cfg)
		s := mustLive(t, h, "alice", LongPoll)
		other := mustLive(t, h, "bob", LongPoll)
		time.Sleep(cfg.PingTimeout / 2)
		h.Pin(s)
		h.Pin(s) // two polls overlap
		if inWheel(h, s) || h.wheel.len() != 1 {
			t.Fatalf("a pinned session is in the wheel")
		}
		h.Touch(s) // a message while pinned does not put it back
		if inWheel(h, s) {
			t.Fatalf("Touch put a pinned session in the wheel")
		}
		time.Sleep(10 * cfg.PingTimeout)
		synctest.Wait()
		if isDone(s) {
			t.Fatalf("pinned session ended: %s", s.Reason())
		}
		if other.Reason() != ReasonHeartbeat {
			t.Fatalf("unpinned session: %q", other.Reason())
		}
		h.Unpin(s) // one poll of two returns: still pinned
		time.Sleep(2 * cfg.PingTimeout)
		synctest.Wait()
		if isDone(s) || inWheel(h, s) {
			t.Fatalf("still pinned once: done %v, in wheel %v", isDone(s), inWheel(h, s))
		}
		time.Sleep(333 * time.Millisecond)
		h.Unpin(s)
		unpinned := time.Now()
		if !inWheel(h, s) {
			t.Fatalf("Unpin did not schedule the session")
		}
		h.Unpin(s) // an extra Unpin is harmless
		time.Sleep(cfg.PingTimeout - time.Millisecond)
		synctest.Wait()
		if isDone(s) {
			t.Fatalf("evicted %v after Unpin", time.Since(unpinned))
		}
		time.Sleep(time.Second + time.Millisecond)
		synctest.Wait()
		if s.Reason() != ReasonHeartbeat {
			t.Fatalf("reason %q after the timeout from Unpin", s.Reason())
		}
		if silent := clock.at(s).Sub(unpinned); silent < cfg.PingTimeout || silent > cfg.PingTimeout+time.Second {
			t.Fatalf("evicted %v after Unpin", silent)
		}
		if st := h.Stats(); st.Evictions != 2 {
			t.Fatalf("Evictions = %d, want 2", st.Evictions)
		}
		checkConsistent(t, h)
	})
}

// TestSweepTouchAfterExpire: a session touched after its slot came due but
// before the sweep decided is put back, not evicted.
func TestSweepTouchAfterExpire(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		cfg := testConfig()
		h := NewHub(cfg, Hooks{})
		s := mustLive(t, h, "alice", WebSocket)
		time.Sleep(cfg.PingTimeout + time.Second)
		// Sweep as of a moment ago: the slot is due, but lastSeen is newer.
		s.lastSeen.Store(time.Now().UnixNano())
		if n := h.Sweep(time.Now()); n != 0 || isDone(s) {
			t.Fatalf("Sweep evicted a freshly touched session")
		}
		if !inWheel(h, s) {
			t.Fatalf("the touched session was not put back in the wheel")
		}
		time.Sleep(cfg.PingTimeout)
		if n := h.Sweep(time.Now()); n != 1 || s.Reason() != ReasonHeartbeat {
			t.Fatalf("Sweep = %d, reason %q", n, s.Reason())
		}
		if n := h.Sweep(time.Now()); n != 0 {
			t.Fatalf("a second sweep evicted %d", n)
		}
	})
}

// TestEndRemovesFromWheel: every way a session ends takes it out of the wheel
// and of presence, and nothing brings it back.
func TestEndRemovesFromWheel(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		cfg := testConfig()
		cfg.QueueLimit = 4
		h := NewHub(cfg, Hooks{})
		paths := []struct {
			name   string
			reason Reason
			live   bool // finish the replay first
			end    func(s *Session)
		}{
			{"client close", ReasonClientClose, true, func(s *Session) { h.End(s, ReasonClientClose) }},
			{"error", ReasonError, false, func(s *Session) { h.End(s, ReasonError) }},
			{"kick", ReasonKicked, true, func(s *Session) { h.Kick(s.ID) }},
			{"kick pinned", ReasonKicked, true, func(s *Session) { h.Pin(s); h.Kick(s.ID) }},
			{"resume", ReasonReplaced, true, func(s *Session) {
				r := mustRegister(t, h, s.User, SSE, s.ID)
				h.End(r, ReasonClientClose)
			}},
			{"send overflow", ReasonSlowConsumer, false, func(s *Session) {
				for range cfg.QueueLimit {
					s.Send(PongFrame(time.Now()))
				}
			}},
			{"deliver overflow", ReasonSlowConsumer, true, func(s *Session) { h.Deliver(notifs(s.User, 1, 10)) }},
			{"replay overflow", ReasonSlowConsumer, false, func(s *Session) { h.Deliver(notifs(s.User, 1, 10)) }},
			{"backlog overflow", ReasonSlowConsumer, false, func(s *Session) { s.FinishReplay(backlogFrames(s.User, 1, 10), 10, false) }},
			{"shutdown", ReasonShutdown, true, func(s *Session) {
				if err := h.Shutdown(context.Background()); err != nil {
					t.Fatal(err)
				}
			}},
		}
		for i, p := range paths {
			if p.reason == ReasonShutdown {
				// Shutdown ends everyone: make the heartbeat path first.
				s := mustLive(t, h, "hb", WebSocket)
				time.Sleep(cfg.PingTimeout + time.Second)
				if n := h.Sweep(time.Now()); n != 1 || s.Reason() != ReasonHeartbeat || inWheel(h, s) || h.wheel.len() != 0 {
					t.Errorf("heartbeat: swept %d, reason %q, wheel %d", n, s.Reason(), h.wheel.len())
				}
			}
			var s *Session
			if p.live {
				s = mustLive(t, h, fmt.Sprint("user", i), WebSocket)
			} else {
				s = mustRegister(t, h, fmt.Sprint("user", i), WebSocket, "")
			}
			before := h.wheel.len()
			p.end(s)
			if got := h.wheel.len(); got != before-1 {
				t.Errorf("%s: wheel %d -> %d", p.name, before, got)
			}
			if !isDone(s) || s.Reason() != p.reason {
				t.Errorf("%s: done %v, reason %q; want %q", p.name, isDone(s), s.Reason(), p.reason)
			}
			if inWheel(h, s) {
				t.Errorf("%s: still in the wheel", p.name)
			}
			if got, ok := h.Session(s.ID); ok && got == s {
				t.Errorf("%s: still tracked", p.name)
			}
			h.Touch(s)
			h.Pin(s)
			h.Unpin(s)
			h.End(s, ReasonError)
			if inWheel(h, s) || s.Reason() != p.reason {
				t.Errorf("%s: after End, Touch/Unpin scheduled it again or End changed the reason", p.name)
			}
			checkConsistent(t, h)
		}
	})
}
