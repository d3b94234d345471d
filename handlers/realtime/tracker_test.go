package realtime

import (
	"encoding/base64"
	"errors"
	"fmt"
	"math/rand/v2"
	"strings"
	"sync"
	"testing"
)

func TestTrackerAddRemoveGet(t *testing.T) {
	h := NewHub(testConfig(), Hooks{})
	tr := NewTracker()
	a := newSession(h, "alice", WebSocket)
	b := newSession(h, "bob", SSE)
	for _, s := range []*Session{a, b} {
		if replaced, err := tr.add(s, "", 0, nil); err != nil || replaced != nil {
			t.Fatalf("add: %v, %v", replaced, err)
		}
		if len(s.ID) != 20 || strings.Trim(s.ID, "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_") != "" {
			t.Fatalf("session id %q is not 20 URL-safe characters", s.ID)
		}
	}
	if a.ID == b.ID {
		t.Fatalf("session ids %q, %q are not distinct", a.ID, b.ID)
	}
	if got, ok := tr.Get(a.ID); !ok || got != a {
		t.Fatalf("Get(a) = %v, %v", got, ok)
	}
	if _, ok := tr.Get("nope"); ok {
		t.Fatalf("Get of an unknown id found something")
	}
	if got := tr.UserSessions("alice"); len(got) != 1 || got[0] != a {
		t.Fatalf("UserSessions(alice) = %v", got)
	}
	if got := tr.UserSessions("carol"); got != nil {
		t.Fatalf("UserSessions(carol) = %v, want nil", got)
	}
	sessions, users, by := tr.Counts()
	if sessions != 2 || users != 2 || by[WebSocket] != 1 || by[SSE] != 1 || by[LongPoll] != 0 {
		t.Fatalf("Counts = %d, %d, %v", sessions, users, by)
	}
	if len(by) != len(Transports) {
		t.Fatalf("Counts by transport %v does not name every transport", by)
	}

	if !tr.remove(a) {
		t.Fatalf("remove(a) = false")
	}
	if tr.remove(a) {
		t.Fatalf("second remove(a) = true")
	}
	if _, ok := tr.Get(a.ID); ok {
		t.Fatalf("a still found after remove")
	}
	if got := tr.UserSessions("alice"); got != nil {
		t.Fatalf("UserSessions(alice) after remove = %v", got)
	}
	sessions, users, by = tr.Counts()
	if sessions != 1 || users != 1 || by[WebSocket] != 0 || by[SSE] != 1 {
		t.Fatalf("Counts after remove = %d, %d, %v", sessions, users, by)
	}
	if all := tr.All(); len(all) != 1 || all[0] != b {
		t.Fatalf("All = %v", all)
	}
}

func TestTrackerBeforeRunsWithFinalID(t *testing.T) {
	h := NewHub(testConfig(), Hooks{})
	tr := NewTracker()
	old := newSession(h, "alice", WebSocket)
	if _, err := tr.add(old, "", 0, nil); err != nil {
		t.Fatal(err)
	}
	s := newSession(h, "alice", SSE)
	var seen string
	var foundBefore bool
	if _, err := tr.add(s, old.ID, 0, func() {
		seen = s.ID
		got, ok := tr.Get(old.ID)
		foundBefore = ok && got == s
	}); err != nil {
		t.Fatal(err)
	}
	if seen != old.ID {
		t.Fatalf("before saw id %q, want the resumed %q", seen, old.ID)
	}
	if foundBefore {
		t.Fatalf("the new session was findable by id before `before` ran")
	}
}

func TestTrackerMultiDeviceAndTransports(t *testing.T) {
	h := NewHub(testConfig(), Hooks{})
	var alice []*Session
	for _, tr := range []Transport{WebSocket, WebSocket, SSE, LongPoll} {
		alice = append(alice, mustRegister(t, h, "alice", tr, ""))
	}
	mustRegister(t, h, "bob", LongPoll, "")
	st := h.Stats()
	if st.Sessions != 5 || st.Users != 2 {
		t.Fatalf("Stats = %+v, want 5 sessions of 2 users", st)
	}
	want := map[Transport]int64{WebSocket: 2, SSE: 1, LongPoll: 2}
	for tp, n := range want {
		if st.ByTransport[tp] != n {
			t.Fatalf("ByTransport = %v, want %v", st.ByTransport, want)
		}
	}
	got := h.UserSessions("alice")
	if len(got) != 4 {
		t.Fatalf("alice has %d sessions, want 4", len(got))
	}
	// UserSessions is a copy: changing it changes nothing.
	got[0] = nil
	if h.UserSessions("alice")[0] == nil {
		t.Fatalf("UserSessions returned the tracker's own slice")
	}
	checkConsistent(t, h)

	// Removing devices one by one keeps the user online until the last.
	for i, s := range alice {
		h.End(s, ReasonClientClose)
		st := h.Stats()
		wantUsers := int64(2)
		if i == len(alice)-1 {
			wantUsers = 1
		}
		if st.Sessions != int64(4-i) || st.Users != wantUsers {
			t.Fatalf("after ending %d of alice's sessions: %+v", i+1, st)
		}
		checkConsistent(t, h)
	}
}

func TestTrackerPerUserLimit(t *testing.T) {
	cfg := testConfig()
	cfg.MaxSessionsPerUser = 3
	h := NewHub(cfg, Hooks{})
	var live []*Session
	for range 3 {
		live = append(live, mustRegister(t, h, "alice", WebSocket, ""))
	}
	s := newSession(h, "alice", SSE)
	if err := h.Register(s, ""); !errors.Is(err, ErrTooManySessions) {
		t.Fatalf("4th session: err = %v, want ErrTooManySessions", err)
	}
	if _, ok := h.Session(s.ID); ok || isDone(s) {
		t.Fatalf("a refused session was tracked or ended")
	}
	if got := describe(t, s.Take()); got != "" {
		t.Fatalf("a refused session was sent %q", got)
	}
	// The limit is per user.
	mustRegister(t, h, "bob", WebSocket, "")
	// A resume at the limit replaces and so is allowed.
	r := mustRegister(t, h, "alice", LongPoll, live[0].ID)
	if r.ID != live[0].ID || live[0].Reason() != ReasonReplaced {
		t.Fatalf("resume at the limit: id %q reason %q", r.ID, live[0].Reason())
	}
	if st := h.Stats(); st.Sessions != 4 || st.Users != 2 {
		t.Fatalf("Stats = %+v", st)
	}
	// Ending one frees a place.
	h.End(live[1], ReasonClientClose)
	mustRegister(t, h, "alice", SSE, "")
	if err := h.Register(newSession(h, "alice", SSE), ""); !errors.Is(err, ErrTooManySessions) {
		t.Fatalf("past the limit again: err = %v", err)
	}
	checkConsistent(t, h)

	// 0 means no limit.
	cfg.MaxSessionsPerUser = 0
	h = NewHub(cfg, Hooks{})
	for range 100 {
		mustRegister(t, h, "carol", WebSocket, "")
	}
}

// RegisterCounted counts the user's sessions on other nodes against the limit: with a limit
// of 3 and 2 sessions elsewhere there is room for one here; a resume of a session here still
// replaces it; no limit stays no limit.
func TestTrackerPerUserLimitElsewhere(t *testing.T) {
	cfg := testConfig()
	cfg.MaxSessionsPerUser = 3
	h := NewHub(cfg, Hooks{})
	first := newSession(h, "alice", WebSocket)
	if err := h.RegisterCounted(first, "", 2); err != nil {
		t.Fatalf("1 here + 2 elsewhere: %v", err)
	}
	if n := h.UserSessionCount("alice"); n != 1 {
		t.Fatalf("UserSessionCount = %d, want 1", n)
	}
	s := newSession(h, "alice", SSE)
	if err := h.RegisterCounted(s, "", 2); !errors.Is(err, ErrTooManySessions) {
		t.Fatalf("2 here + 2 elsewhere: err = %v, want ErrTooManySessions", err)
	}
	if _, ok := h.Session(s.ID); ok {
		t.Fatal("a refused session was tracked")
	}
	if err := h.RegisterCounted(newSession(h, "alice", SSE), "", 3); !errors.Is(err, ErrTooManySessions) {
		t.Fatalf("1 here + 3 elsewhere: err = %v, want ErrTooManySessions", err)
	}
	r := newSession(h, "alice", LongPoll)
	if err := h.RegisterCounted(r, first.ID, 5); err != nil || r.ID != first.ID || first.Reason() != ReasonReplaced {
		t.Fatalf("resume with the cluster over the limit: %v, id %q, old reason %q", err, r.ID, first.Reason())
	}
	if err := h.RegisterCounted(newSession(h, "bob", SSE), "", 2); err != nil {
		t.Fatalf("another user: %v", err)
	}
	checkConsistent(t, h)

	cfg.MaxSessionsPerUser = 0
	h = NewHub(cfg, Hooks{})
	if err := h.RegisterCounted(newSession(h, "carol", SSE), "", 1000); err != nil {
		t.Fatalf("no limit: %v", err)
	}
}

func TestTrackerResumeSameUser(t *testing.T) {
	tr := NewTracker()
	h := NewHub(testConfig(), Hooks{})
	old := newSession(h, "alice", WebSocket)
	other := newSession(h, "alice", LongPoll)
	for _, s := range []*Session{old, other} {
		if _, err := tr.add(s, "", 0, nil); err != nil {
			t.Fatal(err)
		}
	}
	s := newSession(h, "alice", SSE)
	replaced, err := tr.add(s, old.ID, 2, nil) // at the limit: a resume still fits
	if err != nil {
		t.Fatalf("resume: %v", err)
	}
	if replaced != old {
		t.Fatalf("resume returned %v, want the old session", replaced)
	}
	if s.ID != old.ID {
		t.Fatalf("resumed session id %q, want %q", s.ID, old.ID)
	}
	if got, _ := tr.Get(old.ID); got != s {
		t.Fatalf("Get(id) after resume = %p, want the new session", got)
	}
	sessions, users, by := tr.Counts()
	if sessions != 2 || users != 1 || by[WebSocket] != 0 || by[SSE] != 1 || by[LongPoll] != 1 {
		t.Fatalf("Counts after resume = %d, %d, %v; want the device counted once, as sse", sessions, users, by)
	}
	if list := tr.UserSessions("alice"); len(list) != 2 {
		t.Fatalf("alice lists %d sessions after resume, want 2", len(list))
	}
	// Removing the replaced session touches nothing.
	if tr.remove(old) {
		t.Fatalf("remove(replaced) = true")
	}
	if got, ok := tr.Get(s.ID); !ok || got != s {
		t.Fatalf("removing the replaced session dropped its successor")
	}
	if sessions, _, _ := tr.Counts(); sessions != 2 {
		t.Fatalf("removing the replaced session changed the count to %d", sessions)
	}
	if !tr.remove(s) || !tr.remove(other) {
		t.Fatalf("remove of live sessions failed")
	}
	if sessions, users, by := tr.Counts(); sessions != 0 || users != 0 || by[SSE]+by[WebSocket]+by[LongPoll] != 0 {
		t.Fatalf("Counts when empty = %d, %d, %v", sessions, users, by)
	}
}

func TestHubResume(t *testing.T) {
	var ended []Reason
	var mu sync.Mutex
	h := NewHub(testConfig(), Hooks{Ended: func(s *Session, r Reason) {
		mu.Lock()
		ended = append(ended, r)
		mu.Unlock()
	}})
	old := mustLive(t, h, "alice", WebSocket)
	h.Pin(old)
	s := mustRegister(t, h, "alice", LongPoll, old.ID)
	if s.ID != old.ID {
		t.Fatalf("resumed id %q, want %q", s.ID, old.ID)
	}
	if !isDone(old) || old.Reason() != ReasonReplaced {
		t.Fatalf("old session: done %v reason %q, want replaced", isDone(old), old.Reason())
	}
	m := decode(t, s.Take()[0])
	if m.Type != TypeHello || m.Session != old.ID || m.Transport != LongPoll {
		t.Fatalf("resumed session's first frame = %+v, want hello with the old id", m)
	}
	if st := h.Stats(); st.Sessions != 1 || st.Users != 1 || st.ByTransport[LongPoll] != 1 || st.ByTransport[WebSocket] != 0 {
		t.Fatalf("Stats after resume = %+v", st)
	}
	if inWheel(h, old) || !inWheel(h, s) {
		t.Fatalf("wheel: old in %v, new in %v", inWheel(h, old), inWheel(h, s))
	}
	// Ending the old one again (its transport noticing) changes nothing.
	h.End(old, ReasonClientClose)
	if got, ok := h.Session(s.ID); !ok || got != s {
		t.Fatalf("ending the replaced session dropped the new one")
	}
	if old.Reason() != ReasonReplaced {
		t.Fatalf("old reason became %q", old.Reason())
	}
	checkConsistent(t, h)
	mu.Lock()
	defer mu.Unlock()
	if len(ended) != 1 || ended[0] != ReasonReplaced {
		t.Fatalf("Ended hooks: %v", ended)
	}
}

func TestResumeOtherUsersSessionIgnored(t *testing.T) {
	h := NewHub(testConfig(), Hooks{})
	bob := mustLive(t, h, "bob", WebSocket)
	s := mustRegister(t, h, "mallory", WebSocket, bob.ID)
	if s.ID == bob.ID {
		t.Fatalf("mallory took over bob's session id")
	}
	if isDone(bob) {
		t.Fatalf("bob's session ended: %s", bob.Reason())
	}
	if got, _ := h.Session(bob.ID); got != bob {
		t.Fatalf("Get(bob's id) = %v", got)
	}
	if m := decode(t, s.Take()[0]); m.Session != s.ID || m.User != "mallory" {
		t.Fatalf("mallory's hello = %+v", m)
	}
	// An unknown or ended id is ignored too.
	u := mustRegister(t, h, "bob", SSE, "no-such-session")
	if u.ID == "no-such-session" {
		t.Fatalf("resume of an unknown id took that id")
	}
	h.End(bob, ReasonClientClose)
	v := mustRegister(t, h, "bob", SSE, bob.ID)
	if v.ID == bob.ID {
		t.Fatalf("resume of an ended session took its id")
	}
	if st := h.Stats(); st.Sessions != 3 || st.Users != 2 {
		t.Fatalf("Stats = %+v", st)
	}
	checkConsistent(t, h)
}

// TestTrackerConcurrent adds, resumes and removes from many goroutines on
// shared users; the counts must match what each goroutine holds at the end.
func TestTrackerConcurrent(t *testing.T) {
	h := NewHub(testConfig(), Hooks{})
	tr := NewTracker()
	const workers, ops, users = 16, 600, 40
	held := make([][]*Session, workers)
	var wg sync.WaitGroup
	for w := range workers {
		wg.Go(func() {
			rng := rand.New(rand.NewPCG(uint64(w), 7))
			var mine []*Session
			for range ops {
				switch r := rng.IntN(10); {
				case r < 5 || len(mine) == 0: // add
					s := newSession(h, fmt.Sprintf("u%d", rng.IntN(users)), Transports[rng.IntN(3)])
					if _, err := tr.add(s, "", 0, nil); err != nil {
						t.Error(err)
						return
					}
					mine = append(mine, s)
				case r < 7: // resume one of mine on another transport
					i := rng.IntN(len(mine))
					old := mine[i]
					s := newSession(h, old.User, Transports[rng.IntN(3)])
					replaced, err := tr.add(s, old.ID, 0, nil)
					if err != nil || replaced != old || s.ID != old.ID {
						t.Errorf("resume: %v %v", replaced, err)
						return
					}
					mine[i] = s
				default: // remove
					i := rng.IntN(len(mine))
					if !tr.remove(mine[i]) {
						t.Errorf("remove of a live session failed")
						return
					}
					mine[i] = mine[len(mine)-1]
					mine = mine[:len(mine)-1]
				}
				if rng.IntN(4) == 0 && len(mine) > 0 {
					s := mine[rng.IntN(len(mine))]
					if got, ok := tr.Get(s.ID); !ok || got != s {
						t.Errorf("Get of a live session = %v, %v", got, ok)
						return
					}
				}
			}
			held[w] = mine
		})
	}
	wg.Go(func() { // readers alongside
		for range 200 {
			tr.Counts()
			tr.All()
			tr.Users(func(string, []*Session) {})
		}
	})
	wg.Wait()

	want := map[Transport]int64{}
	wantUsers := map[string]bool{}
	var n int64
	for _, mine := range held {
		for _, s := range mine {
			n++
			want[s.Transport]++
			wantUsers[s.User] = true
			if got, ok := tr.Get(s.ID); !ok || got != s {
				t.Errorf("held session %s not found", s.ID)
			}
		}
	}
	sessions, nusers, by := tr.Counts()
	if sessions != n || nusers != int64(len(wantUsers)) {
		t.Fatalf("Counts = %d sessions, %d users; want %d, %d", sessions, nusers, n, len(wantUsers))
	}
	for _, tp := range Transports {
		if by[tp] != want[tp] {
			t.Fatalf("by transport %v, want %v", by, want)
		}
	}
	if len(tr.All()) != int(n) {
		t.Fatalf("All has %d, want %d", len(tr.All()), n)
	}
	for _, mine := range held {
		for _, s := range mine {
			tr.remove(s)
		}
	}
	if sessions, nusers, by := tr.Counts(); sessions != 0 || nusers != 0 || by[WebSocket]+by[SSE]+by[LongPoll] != 0 {
		t.Fatalf("Counts after removing everything = %d, %d, %v", sessions, nusers, by)
	}
}

// TestTrackerRemoveAll removes a batch large enough to be split over
// goroutines, mixed with sessions that were replaced by a resume (no longer
// registered, so they must not take their successor with them) and with
// users who keep another device online.
func TestTrackerRemoveAll(t *testing.T) {
	h := NewHub(testConfig(), Hooks{})
	tr := NewTracker()
	const n = 3 * 1024 // workersFor splits it
	var batch, keep []*Session
	for i := range n {
		s := newSession(h, fmt.Sprintf("u%d", i/2), Transports[i%3])
		if _, err := tr.add(s, "", 0, nil); err != nil {
			t.Fatal(err)
		}
		switch {
		case i%10 == 0: // replaced by a resume: the batch holds the old one
			next := newSession(h, s.User, s.Transport)
			if old, err := tr.add(next, s.ID, 0, nil); err != nil || old != s {
				t.Fatalf("resume: %v, %v", old, err)
			}
			batch = append(batch, s)
			keep = append(keep, next)
		case i%5 == 1:
			keep = append(keep, s)
		default:
			batch = append(batch, s)
		}
	}
	tr.removeAll(batch)
	sessions, users, by := tr.Counts()
	if sessions != int64(len(keep)) {
		t.Fatalf("sessions = %d, want %d", sessions, len(keep))
	}
	var sum int64
	for _, c := range by {
		sum += c
	}
	if sum != sessions {
		t.Fatalf("per-transport counts %v add up to %d, not %d", by, sum, sessions)
	}
	online := map[string]bool{}
	for _, s := range keep {
		online[s.User] = true
		if got, ok := tr.Get(s.ID); !ok || got != s {
			t.Fatalf("kept session %s: Get = %v, %v", s.ID, got, ok)
		}
	}
	if users != int64(len(online)) {
		t.Fatalf("users = %d, want %d", users, len(online))
	}
	for _, s := range batch {
		if got, ok := tr.Get(s.ID); ok && got == s {
			t.Fatalf("removed session %s is still registered", s.ID)
		}
		if !online[s.User] && tr.Online(s.User) {
			t.Fatalf("user %s still online", s.User)
		}
	}
	if got := len(tr.All()); got != len(keep) {
		t.Fatalf("All() has %d sessions, want %d", got, len(keep))
	}
}

// A session id names its slot in the id table: Get finds a session by it
// only with the whole id, a freed slot is reused with another id, and ids
// that are not ours (wrong length, not base64, a slot out of range or
// forged random bytes) find nothing.
func TestTrackerIDSlots(t *testing.T) {
	h := NewHub(testConfig(), Hooks{})
	tr := NewTracker()
	add := func(user string) *Session {
		s := newSession(h, user, WebSocket)
		if _, err := tr.add(s, "", 0, nil); err != nil {
			t.Fatal(err)
		}
		return s
	}
	a := add("alice")
	oldID := a.ID
	if !tr.remove(a) {
		t.Fatal("remove(a) = false")
	}
	if _, ok := tr.Get(oldID); ok {
		t.Fatal("Get found a removed session")
	}
	// The same user lands in the same shard and takes the freed slot.
	a2 := add("alice")
	if a2.idSlot != a.idSlot {
		t.Fatalf("slot %d not reused (new slot %d)", a.idSlot, a2.idSlot)
	}
	if a2.ID == oldID {
		t.Fatal("a reused slot got the same id")
	}
	if _, ok := tr.Get(oldID); ok {
		t.Fatal("the old id finds the slot's new session")
	}
	if got, ok := tr.Get(a2.ID); !ok || got != a2 {
		t.Fatalf("Get(a2) = %v, %v", got, ok)
	}
	raw, err := base64.RawURLEncoding.DecodeString(a2.ID)
	if err != nil {
		t.Fatal(err)
	}
	forged := append([]byte(nil), raw...)
	forged[0] ^= 1 // same slot, other random bytes
	far := append([]byte(nil), raw...)
	far[len(far)-3] = 0x7f // a slot far beyond the table
	for _, id := range []string{"", "nope", a2.ID + "A", a2.ID[:19] + "!",
		base64.RawURLEncoding.EncodeToString(forged), base64.RawURLEncoding.EncodeToString(far)} {
		if s, ok := tr.Get(id); ok {
			t.Fatalf("Get(%q) found %s", id, s.ID)
		}
	}
}

// Session ids come from clients (resume, long-poll, acks). Whatever the
// string, Get must not panic and finds a session only by its exact id.
func FuzzTrackerGet(f *testing.F) {
	h := NewHub(testConfig(), Hooks{})
	tr := NewTracker()
	var live []*Session
	for i := range 200 {
		s := newSession(h, fmt.Sprintf("u%d", i), WebSocket)
		if _, err := tr.add(s, "", 0, nil); err != nil {
			f.Fatal(err)
		}
		live = append(live, s)
	}
	for _, s := range live[:5] {
		f.Add(s.ID)
	}
	f.Add("")
	f.Add("AAAAAAAAAAAAAAAAAAAA")
	f.Add("____________________")
	f.Fuzz(func(t *testing.T, id string) {
		s, ok := tr.Get(id)
		if ok != (s != nil) || ok && s.ID != id {
			t.Fatalf("Get(%q) = %v, %v", id, s, ok)
		}
		if _, valid := idSlotOf(id); !valid && ok {
			t.Fatalf("Get(%q) found a session for an id that names no slot", id)
		}
	})
}
