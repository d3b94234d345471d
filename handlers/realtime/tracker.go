package realtime

import (
	crand "crypto/rand"
	"encoding/base64"
	"encoding/binary"
	"hash/maphash"
	"runtime"
	"slices"
	"sync"
	"sync/atomic"
	"unsafe"

	"github.com/notifyd/notifyd/store"
)

// ErrTooManySessions is returned by Register when a user is at the sessions limit.
var ErrTooManySessions error = store.Errorf(store.ETOOMANYSESSIONS, "this user has too many live sessions")

const trackerShards = 64

// Tracker is the presence tracker: every live session by id and by user, across
// all transports. Add, remove and lookup are O(1) (a user's sessions are a
// short slice bounded by the per-user limit); both tables are sharded by
// user, so that connects and disconnects of different users rarely contend.
//
// Sessions by id are a table of slots, not a map: a session id carries its
// slot (newSessionID), so finding a session by id costs one slot read and
// an id compare, and removing it one slot write. At a million sessions each
// map access is several cache misses; this is one.
//
// Lock order: a user shard, then the id shard of the same number.
type Tracker struct {
	seed  maphash.Seed
	ids   [trackerShards]idShard
	users [trackerShards]userShard

	sessions    atomic.Int64
	userCount   atomic.Int64
	byTransport [3]atomic.Int64
}

// idShard holds the sessions whose slot numbers are its shard number modulo
// trackerShards; a slot's index here is its number divided by trackerShards.
type idShard struct {
	mu    sync.RWMutex
	slots []*Session
	free  []uint32 // indexes of empty slots
}

// reserve takes an empty slot (is locked) and returns its index.
func (is *idShard) reserve() uint32 {
	if n := len(is.free); n > 0 {
		i := is.free[n-1]
		is.free = is.free[:n-1]
		return i
	}
	is.slots = append(is.slots, nil)
	return uint32(len(is.slots) - 1)
}

// sessionIDRandom is how many random bytes a session id has; the slot
// number (4 bytes) follows them.
const sessionIDRandom = 11

// newSessionID is a new session id for slot: 11 random bytes (88 bits: ids
// are unguessable, and a freed slot's next id is another) and the slot
// number, as 20 URL-safe characters.
func newSessionID(slot uint32) string {
	var b [sessionIDRandom + 4]byte
	_, _ = crand.Read(b[:sessionIDRandom]) // crypto/rand.Read never fails
	binary.BigEndian.PutUint32(b[sessionIDRandom:], slot)
	return base64.RawURLEncoding.EncodeToString(b[:])
}

// idSlotOf is the slot number an id names; false when it is no session id.
func idSlotOf(id string) (uint32, bool) {
	var b [sessionIDRandom + 4]byte
	if base64.RawURLEncoding.EncodedLen(len(b)) != len(id) {
		return 0, false
	}
	if n, err := base64.RawURLEncoding.Decode(b[:], []byte(id)); err != nil || n != len(b) {
		return 0, false
	}
	return binary.BigEndian.Uint32(b[sessionIDRandom:]), true
}

type userShard struct {
	mu sync.RWMutex
	m  map[string][]*Session
}

// NewTracker returns an empty tracker.
func NewTracker() *Tracker {
	t := &Tracker{seed: maphash.MakeSeed()}
	for i := range t.users {
		t.users[i].m = make(map[string][]*Session)
	}
	return t
}

func (t *Tracker) shardOf(user string) uint32 {
	return uint32(maphash.String(t.seed, user) % trackerShards)
}

func (t *Tracker) userShard(user string) *userShard {
	return &t.users[t.shardOf(user)]
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

// add registers s and gives it its id. When resume names a live session of
// the same user, s takes that session's id and place and the old session is
// returned (the caller ends it as replaced); a resume id of another user or
// of no live session is ignored and s gets a new id. A new session beyond
// maxPerUser fails with ErrTooManySessions (a resumed one replaces and so
// never counts twice). before runs under the user's lock once s has its
// final id and before anyone can find s, so it can queue hello as the
// session's first frame.
func (t *Tracker) add(s *Session, resume string, maxPerUser int, before func()) (replaced *Session, err error) {
	return t.addCounted(s, resume, maxPerUser, 0, before)
}

// addCounted is add with elsewhere sessions of the user (on other nodes) counted against
// maxPerUser besides the user's sessions here.
func (t *Tracker) addCounted(s *Session, resume string, maxPerUser, elsewhere int, before func()) (replaced *Session, err error) {
	shard := t.shardOf(s.User)
	us, is := &t.users[shard], &t.ids[shard]
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
	if idx < 0 && maxPerUser > 0 && len(list)+elsewhere >= maxPerUser {
		return nil, ErrTooManySessions
	}
	if idx >= 0 {
		replaced = list[idx]
		s.ID, s.idSlot = replaced.ID, replaced.idSlot
		list[idx] = s
		t.byTransport[transportIndex(replaced.Transport)].Add(-1)
	} else {
		if len(list) == 0 {
			t.userCount.Add(1)
		}
		list = append(list, s)
		us.m[s.User] = list
		t.sessions.Add(1)
		is.mu.Lock()
		s.idSlot = is.reserve()*trackerShards + shard
		is.mu.Unlock()
		s.ID = newSessionID(s.idSlot)
	}
	t.byTransport[transportIndex(s.Transport)].Add(1)
	if before != nil {
		before()
	}
	is.mu.Lock()
	is.slots[s.idSlot/trackerShards] = s
	is.mu.Unlock()
	return replaced, nil
}

// remove drops s if it is still the session registered under its id (a
// session replaced by a resume is already gone). It reports whether it did.
func (t *Tracker) remove(s *Session) bool {
	shard := t.shardOf(s.User)
	us, is := &t.users[shard], &t.ids[shard]
	us.mu.Lock()
	is.mu.Lock()
	var n removed
	ok := n.remove(us, is, s)
	is.mu.Unlock()
	us.mu.Unlock()
	t.count(&n)
	return ok
}

// removed counts what a removal took away, so that a batch updates the
// tracker's shared counters once rather than once per session (each update
// would move their cache line between cores).
type removed struct {
	sessions, users int64
	byTransport     [3]int64
}

// remove takes s out of its id slot and its user's list (us and is, of its
// shard, locked), counts it and reports whether it was there. s is
// registered exactly when it holds its id slot: add fills the slot and the
// list entry under the same user lock, and a resume takes over both. So the
// slot decides, and a user's only session is deleted without reading its
// list: at a million sessions each of those reads is a cache miss.
func (n *removed) remove(us *userShard, is *idShard, s *Session) bool {
	i := s.idSlot / trackerShards
	if int(i) >= len(is.slots) || is.slots[i] != s {
		return false
	}
	is.slots[i] = nil
	is.free = append(is.free, i)
	list := us.m[s.User]
	if len(list) == 1 {
		delete(us.m, s.User)
		n.users++
	} else {
		idx := slices.Index(list, s)
		last := len(list) - 1
		list[idx] = list[last]
		list[last] = nil
		us.m[s.User] = list[:last]
	}
	n.sessions++
	n.byTransport[transportIndex(s.Transport)]++
	return true
}

// count applies a removal's counts to the tracker's counters.
func (t *Tracker) count(n *removed) {
	t.sessions.Add(-n.sessions)
	t.userCount.Add(-n.users)
	for i, k := range n.byTransport {
		if k != 0 {
			t.byTransport[i].Add(-k)
		}
	}
}

// workersFor is how many goroutines a batch of n removals is spread over:
// from 1024 on, one per core (up to 8).
func workersFor(n int) int {
	if n < 1024 {
		return 1
	}
	return min(runtime.GOMAXPROCS(0), 8)
}

// removeAll removes many sessions at once, as a sweep tick does. It groups
// them by shard (a session's id slot names its shard, so grouping reads no
// strings), so each shard is locked once per batch rather than once per
// session, and a large batch is split by shard over up to GOMAXPROCS
// goroutines: the work is dominated by cache misses on the user maps, which
// independent cores take in parallel. Sessions no longer registered are
// skipped.
func (t *Tracker) removeAll(ss []*Session) {
	if len(ss) == 0 {
		return
	}
	workers := workersFor(len(ss))
	// Group by shard in one array: count, then place (no append growth).
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
		var touched uintptr
		for i := w; i < trackerShards; i += workers {
			group := grouped[start[i]:start[i+1]]
			if len(group) == 0 {
				continue
			}
			us, is := &t.users[i], &t.ids[i]
			us.mu.Lock()
			is.mu.Lock()
			for j, s := range group {
				if j+touchAhead < len(group) {
					touched += is.touch(group[j+touchAhead])
				}
				n.remove(us, is, s)
			}
			is.mu.Unlock()
			us.mu.Unlock()
		}
		t.count(&n)
		touchSink.Add(uint64(touched))
	})
}

// touchAhead is how far ahead of its removals removeAll reads the memory
// they will need.
const touchAhead = 4

// touchSink keeps the compiler from dropping touch's reads.
var touchSink atomic.Uint64

// touch reads the cache lines that removing s will need and that do not
// depend on each other: its id slot and the first byte of its user name (the
// map hashes it). Reading them a few sessions ahead lets the CPU wait for
// several misses at once instead of one after another;
// BenchmarkSweepReadAhead (in make bench) compares removals with and without
// it. is is locked.
func (is *idShard) touch(s *Session) uintptr {
	var v uintptr
	if k := s.idSlot / trackerShards; int(k) < len(is.slots) {
		v = uintptr(unsafe.Pointer(is.slots[k]))
	}
	if len(s.User) > 0 {
		v += uintptr(s.User[0])
	}
	return v
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
	slot, ok := idSlotOf(id)
	if !ok {
		return nil, false
	}
	is := &t.ids[slot%trackerShards]
	is.mu.RLock()
	var s *Session
	if i := slot / trackerShards; int(i) < len(is.slots) {
		s = is.slots[i]
	}
	is.mu.RUnlock()
	if s == nil || s.ID != id {
		return nil, false
	}
	return s, true
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

// sessionsOf is how many live sessions user has.
func (t *Tracker) sessionsOf(user string) int {
	us := t.userShard(user)
	us.mu.RLock()
	n := len(us.m[user])
	us.mu.RUnlock()
	return n
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
		for _, s := range is.slots {
			if s != nil {
				out = append(out, s)
			}
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
