package realtime

import (
	"fmt"
	"runtime"
	"strconv"
	"sync/atomic"
	"testing"
	"time"
)

// benchSession builds a live session directly (no crypto ids, no hello), the
// way Register leaves it once its transport took hello and the replay is done.
func benchSession(h *Hub, user, id string, tr Transport) *Session {
	s := &Session{
		ID:          id,
		SessionInfo: SessionInfo{User: user, Device: "d", Transport: tr},
		hub:         h,
		limit:       h.cfg.QueueLimit,
		wake:        make(chan struct{}, 1),
		done:        make(chan struct{}),
	}
	return s
}

// benchAdd tracks s and schedules its heartbeat deadline at deadline (unix ns).
func benchAdd(b *testing.B, h *Hub, s *Session, deadline int64) {
	if _, err := h.tracker.add(s, "", 0, nil); err != nil {
		b.Fatal(err)
	}
	s.lastSeen.Store(deadline - int64(h.cfg.PingTimeout))
	h.wheel.mu.Lock()
	h.wheel.schedule(s, deadline)
	h.wheel.mu.Unlock()
}

func benchSessions(h *Hub, n int, prefix string) []*Session {
	ss := make([]*Session, n)
	for i := range ss {
		ss[i] = benchSession(h, prefix+"u"+strconv.Itoa(i/2), prefix+"s"+strconv.Itoa(i), Transports[i%3])
	}
	return ss
}

func sizeName(n int) string {
	switch {
	case n >= 1_000_000 && n%1_000_000 == 0:
		return fmt.Sprintf("%dM", n/1_000_000)
	case n >= 1000 && n%1000 == 0:
		return fmt.Sprintf("%dk", n/1000)
	}
	return strconv.Itoa(n)
}

// BenchmarkTrackerAddRemove: one add and one remove (a connect and a
// disconnect) in a tracker that already holds 100k sessions.
func BenchmarkTrackerAddRemove(b *testing.B) {
	h := NewHub(testConfig(), Hooks{})
	tr := h.tracker
	for _, s := range benchSessions(h, 100_000, "bg") {
		if _, err := tr.add(s, "", 0, nil); err != nil {
			b.Fatal(err)
		}
	}
	pool := benchSessions(h, 1024, "p")
	b.ReportAllocs()
	i := 0
	for b.Loop() {
		s := pool[i%len(pool)]
		i++
		if _, err := tr.add(s, "", 0, nil); err != nil {
			b.Fatal(err)
		}
		tr.remove(s)
	}
}

// BenchmarkTrackerGet: lookups by session id from every core (what the
// message POST and long-poll endpoints do), in a tracker of 100k sessions.
func BenchmarkTrackerGet(b *testing.B) {
	h := NewHub(testConfig(), Hooks{})
	ss := benchSessions(h, 100_000, "")
	for _, s := range ss {
		if _, err := h.tracker.add(s, "", 0, nil); err != nil {
			b.Fatal(err)
		}
	}
	ids := make([]string, len(ss))
	for i, s := range ss {
		ids[i] = s.ID
	}
	var seed atomic.Uint64
	b.ReportAllocs()
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		i := int(seed.Add(7919))
		for pb.Next() {
			i = (i + 7919) % len(ids)
			if _, ok := h.tracker.Get(ids[i]); !ok {
				b.Error("missing")
				return
			}
		}
	})
}

// BenchmarkTouch: a heartbeat from a client, over 10k registered sessions.
// same-slot is the common case (the deadline stays in the slot it is in: no
// lock); reschedule forces every touch to move the session in the wheel
// (1µs slots); parallel is same-slot from every core.
func BenchmarkTouch(b *testing.B) {
	run := func(b *testing.B, every time.Duration, parallel bool) {
		cfg := testConfig()
		cfg.SweepEvery = every
		h := NewHub(cfg, Hooks{})
		ss := benchSessions(h, 10_000, "")
		for _, s := range ss {
			benchAdd(b, h, s, time.Now().Add(cfg.PingTimeout).UnixNano())
		}
		b.ReportAllocs()
		if parallel {
			var seed atomic.Uint64
			b.RunParallel(func(pb *testing.PB) {
				i := int(seed.Add(104729))
				for pb.Next() {
					i++
					h.Touch(ss[i%len(ss)])
				}
			})
			return
		}
		i := 0
		for b.Loop() {
			h.Touch(ss[i%len(ss)])
			i++
		}
	}
	b.Run("same-slot", func(b *testing.B) { run(b, 250*time.Millisecond, false) })
	b.Run("reschedule", func(b *testing.B) { run(b, time.Microsecond, false) })
	b.Run("same-slot-parallel", func(b *testing.B) { run(b, 250*time.Millisecond, true) })
}

// BenchmarkSweep measures one sweeper tick (Hub.Sweep) with N sessions
// online, their deadlines spread over the next PingTimeout, and either 1% of
// them falling due at the tick (each then ended: unlinked, removed from
// presence, counted) or none. The expiring sessions are rebuilt before every
// tick with the timer stopped; only Sweep is timed.
func BenchmarkSweep(b *testing.B) {
	for _, n := range []int{10_000, 100_000, 1_000_000} {
		b.Run("sessions="+sizeName(n), func(b *testing.B) {
			cfg := testConfig()
			h := NewHub(cfg, Hooks{})
			width := int64(cfg.SweepEvery)
			// The tick: a slot boundary a little after now.
			tick := (time.Now().Add(time.Minute).UnixNano()/width + 1) * width
			slot := tick / width
			slots := int64(cfg.PingTimeout) / width
			for i, s := range benchSessions(h, n, "") {
				// Later than the tick, spread over the PingTimeout's slots.
				benchAdd(b, h, s, tick+width*(1+int64(i)%slots)-int64(i%1000))
			}
			for _, pct := range []int{1, 0} {
				b.Run(fmt.Sprintf("expiring=%d%%", pct), func(b *testing.B) {
					k := n * pct / 100
					round := 0
					now := time.Unix(0, tick)
					for b.Loop() {
						b.StopTimer()
						round++
						prefix := fmt.Sprintf("x%d-", round)
						for j := range k {
							s := benchSession(h, prefix+"u"+strconv.Itoa(j), prefix+strconv.Itoa(j), Transports[j%3])
							benchAdd(b, h, s, tick-int64(j%1000)) // due at this tick
						}
						h.wheel.next = slot // as if the previous tick just ran
						b.StartTimer()
						if got := h.Sweep(now); got != k {
							b.Fatalf("swept %d, want %d", got, k)
						}
					}
					if st := h.Stats(); st.Sessions != int64(n) {
						b.Fatalf("%d sessions left, want %d", st.Sessions, n)
					}
					b.ReportMetric(float64(k), "evicted/op")
				})
			}
		})
	}
}

// BenchmarkHold1M registers 1,000,000 sessions (500k users, two devices each)
// through NewSession and Register, as transports do, drops their hello (a
// transport writes it at once) and reports the heap the tracker and the
// wheel then hold per session, and the cost of one registration.
func BenchmarkHold1M(b *testing.B) {
	const n = 1_000_000
	for b.Loop() {
		b.StopTimer()
		runtime.GC()
		var before, after runtime.MemStats
		runtime.ReadMemStats(&before)
		h := NewHub(testConfig(), Hooks{})
		infos := make([]SessionInfo, n)
		for i := range infos {
			infos[i] = SessionInfo{User: "user-" + strconv.Itoa(i/2), Device: "d", Transport: Transports[i%3]}
		}
		b.StartTimer()
		start := time.Now()
		for i := range n {
			s := h.NewSession(infos[i], 0)
			if err := h.Register(s, ""); err != nil {
				b.Fatal(err)
			}
			s.FinishReplay(nil, 0, false)
			s.Take()
		}
		elapsed := time.Since(start)
		b.StopTimer()
		infos = nil
		runtime.GC()
		runtime.ReadMemStats(&after)
		st := h.Stats()
		if st.Sessions != n || st.Users != n/2 {
			b.Fatalf("Stats = %+v", st)
		}
		if got := h.wheel.len(); got != n {
			b.Fatalf("wheel holds %d", got)
		}
		b.ReportMetric(float64(after.HeapAlloc-before.HeapAlloc)/n, "heap-B/session")
		b.ReportMetric(float64(elapsed.Nanoseconds())/n, "ns/register")
		b.ReportMetric(n, "sessions")
		runtime.KeepAlive(h)
		b.StartTimer()
	}
}

// BenchmarkDeliver: one live notification to a user with three devices
// (encode once, queue three times), as the dispatcher does per commit.
func BenchmarkDeliver(b *testing.B) {
	h := NewHub(testConfig(), Hooks{})
	var ss []*Session
	for _, tr := range Transports {
		s := benchSession(h, "alice", "a-"+string(tr), tr)
		benchAdd(b, h, s, time.Now().Add(time.Hour).UnixNano())
		ss = append(ss, s)
	}
	n := notif("alice", 1)
	b.ReportAllocs()
	for b.Loop() {
		n.Seq++
		h.Deliver([]Notification{n})
		for _, s := range ss {
			s.Take()
		}
	}
}

// BenchmarkRegisterEnd: a connect (new session, register, hello, empty
// replay) and a disconnect, with 100k others online.
func BenchmarkRegisterEnd(b *testing.B) {
	h := NewHub(testConfig(), Hooks{})
	for _, s := range benchSessions(h, 100_000, "bg") {
		benchAdd(b, h, s, time.Now().Add(time.Hour).UnixNano())
	}
	info := SessionInfo{User: "alice", Device: "d", Transport: WebSocket}
	b.ReportAllocs()
	for b.Loop() {
		s := h.NewSession(info, 0)
		if err := h.Register(s, ""); err != nil {
			b.Fatal(err)
		}
		s.FinishReplay(nil, 0, false)
		s.Take()
		h.End(s, ReasonClientClose)
	}
}
