package realtime

import (
	"cmp"
	"context"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/notifyd/notifyd/store"
)

// recent keeps the notifications this process has just published (through
// the API, after their commit), so that when their commit signal reaches the
// dispatcher it need not read them back from Postgres. It changes no
// guarantee: delivery is still driven by the commit signal, in commit order,
// and a range that is not wholly here is fetched as before. Entries for users
// nobody is connected as are not kept; entries live at most recentTTL and
// there are at most recentMax of them.
//
// The commit signal and the publisher's answer from Postgres race: the
// signal often arrives first. So a publish announces its users before it
// starts (Expect), and a signal whose rows are missing while one of its
// users is expected waits, at most expectWait, for the publish to hand them
// over, rather than reading them back at once.
type recent struct {
	mu       sync.Mutex
	m        map[recentKey]Notification
	order    []recentEntry // insertion order, for expiry: order[head:] are kept, the front expired
	head     int
	expected map[string]int // users with publishes in flight here
	changed  chan struct{}  // closed (and replaced) when rows arrive or a publish ends
	wait     time.Duration  // the longest a signal waits for an expected publish (expectWait)
}

type recentKey struct {
	user string
	seq  int64
}

type recentEntry struct {
	key recentKey
	at  time.Time
}

const (
	recentTTL  = 30 * time.Second
	recentMax  = 200_000
	expectWait = 20 * time.Millisecond
)

// Expect tells the dispatcher that this process is about to publish for
// users: it is the store's PublishHook (store.Store.SetPublishHook). It must
// be followed by one call of the returned function, once the publish is over,
// with the notifications it committed (none if it failed). Users with no live
// session when the publish starts are ignored, and their rows are not kept
// (presence is looked up once per user, here); nor are rows that expire, left
// to the store's filtering of expired rows.
func (d *Dispatcher) Expect(users []string) (committed func([]store.Notification)) {
	var online []string
	for _, u := range users {
		if d.hub.tracker.Online(u) {
			online = append(online, u)
		}
	}
	c := &d.recent
	if len(online) > 0 {
		c.mu.Lock()
		if c.expected == nil {
			c.expected = make(map[string]int)
		}
		for _, u := range online {
			c.expected[u]++
		}
		c.mu.Unlock()
	}
	return func(rows []store.Notification) {
		var ns []Notification
		if len(online) > 0 {
			ns = make([]Notification, 0, len(rows))
			for i := range rows {
				if rows[i].ExpiresAt == nil {
					ns = append(ns, FromStore(rows[i]))
				}
			}
		}
		c.mu.Lock()
		defer c.mu.Unlock()
		c.rememberLocked(ns) // before the counts drop: it keeps the rows of expected users
		for _, u := range online {
			if c.expected[u]--; c.expected[u] <= 0 {
				delete(c.expected, u)
			}
		}
		if c.changed != nil {
			close(c.changed)
			c.changed = nil
		}
	}
}

// rememberLocked keeps the notifications of expected users, and expires old ones.
func (c *recent) rememberLocked(ns []Notification) {
	now := time.Now()
	if c.m == nil {
		c.m = make(map[recentKey]Notification)
	}
	for _, n := range ns {
		if c.expected[n.User] <= 0 {
			continue
		}
		k := recentKey{n.User, n.Seq}
		c.m[k] = n
		c.order = append(c.order, recentEntry{k, now})
	}
	// Expire from the front, the oldest first, by moving head past them. The kept entries move
	// to the start only once the expired front is half the slice, so each entry is copied at
	// most once for every time it was appended and expiring a row costs O(1). (Shifting the
	// queue at every publish would copy up to recentMax entries, megabytes, per group once the
	// memory is full: BenchmarkRememberFull.)
	for c.head < len(c.order) && (len(c.order)-c.head > recentMax || now.Sub(c.order[c.head].at) > recentTTL) {
		delete(c.m, c.order[c.head].key)
		c.order[c.head] = recentEntry{} // drops the key's string
		c.head++
	}
	if c.head > 0 && c.head >= len(c.order)/2 {
		n := copy(c.order, c.order[c.head:])
		clear(c.order[n:])
		c.order, c.head = c.order[:n], 0
	}
}

// await returns a channel that is closed when rows arrive or a publish ends,
// or nil when no user of rs is expected (waiting would be in vain).
func (c *recent) await(rs []store.SeqRange) <-chan struct{} {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, r := range rs {
		if c.expected[r.UserID] > 0 {
			if c.changed == nil {
				c.changed = make(chan struct{})
			}
			return c.changed
		}
	}
	return nil
}

// takeOrWait is take, then, while ranges are missing whose users have a
// publish in flight here, waiting (at most expectWait) for it to hand them over.
func (c *recent) takeOrWait(ctx context.Context, rs []store.SeqRange) (found []Notification, missing []store.SeqRange) {
	found, missing = c.take(rs)
	var timer *time.Timer
	for len(missing) > 0 {
		wait := c.await(missing)
		if wait == nil {
			break
		}
		if timer == nil {
			timer = time.NewTimer(cmp.Or(c.wait, expectWait))
			defer timer.Stop()
		}
		select {
		case <-wait:
		case <-timer.C:
			return found, missing
		case <-ctx.Done():
			return found, missing
		}
		more, still := c.take(missing)
		found, missing = append(found, more...), still
	}
	return found, missing
}

// take removes and returns the notifications of the ranges that are wholly
// here, and returns the ranges that are not, to be fetched.
func (c *recent) take(rs []store.SeqRange) (found []Notification, missing []store.SeqRange) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if len(c.m) == 0 {
		return nil, rs
	}
	for _, r := range rs {
		whole := r.To-r.From < 10_000
		for seq := r.From; whole && seq <= r.To; seq++ {
			_, whole = c.m[recentKey{r.UserID, seq}]
		}
		if !whole {
			missing = append(missing, r)
			continue
		}
		for seq := r.From; seq <= r.To; seq++ {
			k := recentKey{r.UserID, seq}
			found = append(found, c.m[k])
			delete(c.m, k) // its order entry expires on its own
		}
	}
	return found, missing
}

// sortByUserSeq orders notifications as Source.Fetch does: by user (byte
// order), then seq.
func sortByUserSeq(ns []Notification) {
	slices.SortFunc(ns, func(a, b Notification) int {
		if c := strings.Compare(a.User, b.User); c != 0 {
			return c
		}
		return int(a.Seq - b.Seq)
	})
}
