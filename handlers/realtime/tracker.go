package realtime

import (
	"errors"
	"hash/maphash"
	"runtime"
	"sync"
	"sync/atomic"
)

// ErrTooManySessions is returned by Register when a user is at the sessions limit.
var ErrTooManySessions = errors.New("too many sessions for this user")

const trackerShards = 64

// Tracker is the presence tracker: every live session by id and by user, across
// all transports. Add, remove and lookup are O(1) (a user's sessions are a
// short slice bounded by the per-user limit); the maps are sharded so that
// connects and disconnects of different users rarely contend.
//
// Lock order: a user shard, then an id shard.
type Tracker struct {
	seed  maphash.Seed
	ids   [trackerShards]idShard
	users [trackerShards]userShard

	sessions    atomic.Int64
	userCount   atomic.Int64
	byTransport [3]atomic.Int64
}

type idShard struct {
	mu sync.RWMutex
	m  map[string]*Session
}

type userShard struct {
	mu sync.RWMutex
	m  map[string][]*Session
}

// NewTracker returns an empty tracker.
func NewTracker() *Tracker {
	t := &Tracker{seed: maphash.MakeSeed()}
	for i := range t.ids {
		t.ids[i].m = make(map[string]*Session)
		t.users[i].m = make(map[string][]*Session)
	}
	return t
}

func (t *Tracker) idShard(id string) *idShard {
	return &t.ids[maphash.String(t.seed, id)%trackerShards]
}

func (t *Tracker) userShard(user string) *userShard {
	return &t.users[maphash.String(t.seed, user)%trackerShards]
}

func transportIndex(tr Transport) int {
	switch tr {
	case SSE:
		return 1
	case LongPoll:
		return 2
	}
	return 0
}

// add registers s. When resume names a live session of the same user, s takes
// that session's id and place and the old session is returned (the caller ends
// it as replaced); a resume id of another user or of no live session is
// ignored and s keeps its own id. A new session beyond maxPerUser fails with
// ErrTooManySessions (a resumed one replaces and so never counts twice). before
// runs under the user's lock once s has its final id and before anyone can
// find s, so it can queue hello as the session's first frame.
func (t *Tracker) add(s *Session, resume string, maxPerUser int, before func()) (replaced *Session, err error) {
	us := t.userShard(s.User)
	us.mu.Lock()
	defer us.mu.Unlock()
	list := us.m[s.User]
	idx := -1
	if resume != "" {
		for i, old := range list {
			if old.ID == resume {
				idx = i
				break
			}
		}
	}
	if idx < 0 && maxPerUser > 0 && len(list) >= maxPerUser {
		return nil, ErrTooManySessions
	}
	if idx >= 0 {
		replaced = list[idx]
		s.ID = replaced.ID
		list[idx] = s
		t.byTransport[transportIndex(replaced.Transport)].Add(-1)
	} else {
		if len(list) == 0 {
			t.userCount.Add(1)
		}
		list = append(list, s)
		us.m[s.User] = list
		t.sessions.Add(1)
	}
	t.byTransport[transportIndex(s.Transport)].Add(1)
	if before != nil {
		before()
	}
	is := t.idShard(s.ID)
	is.mu.Lock()
	is.m[s.ID] = s
	is.mu.Unlock()
	return replaced, nil
}

// remove drops s if it is still the session registered under its id (a
// session replaced by a resume is already gone). It reports whether it did.
func (t *Tracker) remove(s *Session) bool {
	us := t.userShard(s.User)
	us.mu.Lock()
	ok := t.removeUserLocked(us, s)
	us.mu.Unlock()
	if !ok {
		return false
	}
	is := t.idShard(s.ID)
	is.mu.Lock()
	delete(is.m, s.ID)
	is.mu.Unlock()
	return true
}

// removeUserLocked takes s out of its user's list (us, locked) and reports
// whether it was there. When it was, the id map also holds s under s.ID (a
// resume that takes the id over also takes the list slot), so the caller
// deletes that entry without looking it up first: at a million sessions
// every map access is a cache miss of its own.
func (t *Tracker) removeUserLocked(us *userShard, s *Session) bool {
	list := us.m[s.User]
	idx := -1
	for i, cur := range list {
		if cur == s {
			idx = i
			break
		}
	}
	if idx < 0 {
		return false
	}
	last := len(list) - 1
	list[idx] = list[last]
	list[last] = nil
	list = list[:last]
	if len(list) == 0 {
		delete(us.m, s.User)
		t.userCount.Add(-1)
	} else {
		us.m[s.User] = list
	}
	t.sessions.Add(-1)
	t.byTransport[transportIndex(s.Transport)].Add(-1)
	return true
}

// parallelRemoveMin is the batch size from which removeAll spreads its work
// over several goroutines.
const parallelRemoveMin = 1024

// removeAll removes many sessions at once, as a sweep tick does. It groups
// them by shard, so each shard is locked once per batch rather than once per
// session, and a large batch is split by shard over up to GOMAXPROCS
// goroutines: the work is dominated by cache misses on the maps, which
// independent cores take in parallel. Sessions no longer registered are
// skipped.
func (t *Tracker) removeAll(ss []*Session) {
	if len(ss) == 0 {
		return
	}
	workers := 1
	if len(ss) >= parallelRemoveMin {
		workers = min(runtime.GOMAXPROCS(0), 8)
	}
	var byUser, byID [trackerShards][]*Session
	for _, s := range ss {
		i := maphash.String(t.seed, s.User) % trackerShards
		byUser[i] = append(byUser[i], s)
	}
	var mu sync.Mutex
	run(workers, func(w int) {
		var local [trackerShards][]*Session
		for i := w; i < trackerShards; i += workers {
			if len(byUser[i]) == 0 {
				continue
			}
			us := &t.users[i]
			us.mu.Lock()
			for _, s := range byUser[i] {
				if t.removeUserLocked(us, s) {
					j := maphash.String(t.seed, s.ID) % trackerShards
					local[j] = append(local[j], s)
				}
			}
			us.mu.Unlock()
		}
		mu.Lock()
		for j := range local {
			byID[j] = append(byID[j], local[j]...)
		}
		mu.Unlock()
	})
	run(workers, func(w int) {
		for j := w; j < trackerShards; j += workers {
			if len(byID[j]) == 0 {
				continue
			}
			is := &t.ids[j]
			is.mu.Lock()
			for _, s := range byID[j] {
				delete(is.m, s.ID)
			}
			is.mu.Unlock()
		}
	})
}

// run calls fn(0..n-1), each on its own goroutine except the last, which runs
// on the caller's, and returns when all are done.
func run(n int, fn func(w int)) {
	var wg sync.WaitGroup
	for w := range n - 1 {
		wg.Go(func() { fn(w) })
	}
	fn(n - 1)
	wg.Wait()
}

// Get returns the live session with this id.
func (t *Tracker) Get(id string) (*Session, bool) {
	is := t.idShard(id)
	is.mu.RLock()
	s, ok := is.m[id]
	is.mu.RUnlock()
	return s, ok
}

// UserSessions returns a copy of the user's live sessions.
func (t *Tracker) UserSessions(user string) []*Session {
	us := t.userShard(user)
	us.mu.RLock()
	defer us.mu.RUnlock()
	list := us.m[user]
	if len(list) == 0 {
		return nil
	}
	return append([]*Session(nil), list...)
}

// appendUserSessions appends the user's sessions to dst without allocating a
// new slice per call (the hot delivery path).
func (t *Tracker) appendUserSessions(dst []*Session, user string) []*Session {
	us := t.userShard(user)
	us.mu.RLock()
	dst = append(dst, us.m[user]...)
	us.mu.RUnlock()
	return dst
}

// Users calls fn for every user with at least one live session.
func (t *Tracker) Users(fn func(user string, sessions []*Session)) {
	for i := range t.users {
		us := &t.users[i]
		us.mu.RLock()
		for u, list := range us.m {
			fn(u, list)
		}
		us.mu.RUnlock()
	}
}

// All returns every live session.
func (t *Tracker) All() []*Session {
	out := make([]*Session, 0, t.sessions.Load())
	for i := range t.ids {
		is := &t.ids[i]
		is.mu.RLock()
		for _, s := range is.m {
			out = append(out, s)
		}
		is.mu.RUnlock()
	}
	return out
}

// Counts returns the number of sessions, of users online, and of sessions per transport.
func (t *Tracker) Counts() (sessions, users int64, byTransport map[Transport]int64) {
	byTransport = make(map[Transport]int64, len(Transports))
	for _, tr := range Transports {
		byTransport[tr] = t.byTransport[transportIndex(tr)].Load()
	}
	return t.sessions.Load(), t.userCount.Load(), byTransport
}

// Online reports whether user has a live session.
func (t *Tracker) Online(user string) bool {
	us := t.userShard(user)
	us.mu.RLock()
	n := len(us.m[user])
	us.mu.RUnlock()
	return n > 0
}
