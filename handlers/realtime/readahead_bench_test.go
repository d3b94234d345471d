package realtime

import (
	"runtime"
	"testing"
)

// BenchmarkSweepReadAhead measures what touch's read-ahead saves a sweep
// tick: the removal of 1% of 1,000,000 tracked sessions (what Hub.Sweep
// hands removeAll at a tick), by removeAll as it is (read-ahead) and by
// removeAllPlain, the same removal without touch (plain). Each op removes
// sessions that have not been touched for a hundred ops (every hundredth
// session, a different hundredth each op), so their memory is cold as an
// expiring session's is, and adds them back untimed.
func BenchmarkSweepReadAhead(b *testing.B) {
	const n, every = 1_000_000, 100
	h := NewHub(testConfig(), Hooks{})
	ss := benchSessions(h, n, "")
	for _, s := range ss {
		if _, err := h.tracker.add(s, "", 0, nil); err != nil {
			b.Fatal(err)
		}
	}
	victims := make([]*Session, 0, n/every)
	round := 0
	for _, c := range []struct {
		name   string
		remove func([]*Session)
	}{{"read-ahead", h.tracker.removeAll}, {"plain", h.tracker.removeAllPlain}} {
		b.Run(c.name, func(b *testing.B) {
			runtime.GC() // the setup's garbage, or the other variant's, is not this one's to collect
			for b.Loop() {
				b.StopTimer()
				victims = victims[:0]
				for i := round % every; i < n; i += every {
					victims = append(victims, ss[i])
				}
				round++
				b.StartTimer()
				c.remove(victims)
				b.StopTimer()
				if got := h.tracker.sessions.Load(); got != n-int64(len(victims)) {
					b.Fatalf("%d sessions tracked after the removal, want %d", got, n-len(victims))
				}
				for _, s := range victims {
					if _, err := h.tracker.add(s, "", 0, nil); err != nil {
						b.Fatal(err)
					}
				}
				b.StartTimer()
			}
			b.ReportMetric(float64(len(victims)), "removed/op")
		})
	}
}

// removeAllPlain is removeAll without touch's read-ahead, for
// BenchmarkSweepReadAhead's comparison; TestRemoveAllPlain keeps it
// removing what removeAll removes.
func (t *Tracker) removeAllPlain(ss []*Session) {
	if len(ss) == 0 {
		return
	}
	workers := workersFor(len(ss))
	var start [trackerShards + 1]int
	for _, s := range ss {
		start[s.idSlot%trackerShards+1]++
	}
	for i := range trackerShards {
		start[i+1] += start[i]
	}
	grouped := make([]*Session, len(ss))
	next := start
	for _, s := range ss {
		i := s.idSlot % trackerShards
		grouped[next[i]] = s
		next[i]++
	}
	run(workers, func(w int) {
		var n removed
		for i := w; i < trackerShards; i += workers {
			group := grouped[start[i]:start[i+1]]
			if len(group) == 0 {
				continue
			}
			us, is := &t.users[i], &t.ids[i]
			us.mu.Lock()
			is.mu.Lock()
			for _, s := range group {
				n.remove(us, is, s)
			}
			is.mu.Unlock()
			us.mu.Unlock()
		}
		t.count(&n)
	})
}

// removeAllPlain leaves the tracker as removeAll does: the same sessions
// gone, the same counts.
func TestRemoveAllPlain(t *testing.T) {
	for _, remove := range []func(*Tracker, []*Session){(*Tracker).removeAll, (*Tracker).removeAllPlain} {
		h := NewHub(testConfig(), Hooks{})
		ss := benchSessions(h, 3000, "")
		for _, s := range ss {
			if _, err := h.tracker.add(s, "", 0, nil); err != nil {
				t.Fatal(err)
			}
		}
		var gone []*Session
		for i := 0; i < len(ss); i += 3 {
			gone = append(gone, ss[i])
		}
		remove(h.tracker, gone)
		if got, want := h.tracker.sessions.Load(), int64(len(ss)-len(gone)); got != want {
			t.Fatalf("%d sessions left, want %d", got, want)
		}
		for i, s := range ss {
			_, ok := h.tracker.Get(s.ID)
			if ok != (i%3 != 0) {
				t.Fatalf("session %d tracked %v after the removal", i, ok)
			}
		}
		if got := h.tracker.userCount.Load(); got != 1500 {
			t.Fatalf("%d users left, want 1500 (every user keeps one of its two sessions or both)", got)
		}
	}
}
