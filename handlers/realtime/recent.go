package realtime

import (
	"slices"
	"strings"
	"sync"
	"time"
)

// recent keeps the notifications this process has just published (through
// the API, after their commit), so that when their commit signal reaches the
// dispatcher it need not read them back from Postgres. It changes no
// guarantee: delivery is still driven by the commit signal, in commit order,
// and a range that is not wholly here is fetched as before. Entries for users
// nobody is connected as are not kept; entries live at most recentTTL and
// there are at most recentMax of them.
type recent struct {
	mu    sync.Mutex
	m     map[recentKey]Notification
	order []recentEntry // insertion order, for expiry
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
	recentTTL = 30 * time.Second
	recentMax = 200_000
)

// Remember offers notifications that were just committed to the dispatcher.
// Notifications of users with no live session are ignored.
func (d *Dispatcher) Remember(ns []Notification) {
	now := time.Now()
	c := &d.recent
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.m == nil {
		c.m = make(map[recentKey]Notification)
	}
	for _, n := range ns {
		if !d.hub.tracker.Online(n.User) {
			continue
		}
		k := recentKey{n.User, n.Seq}
		c.m[k] = n
		c.order = append(c.order, recentEntry{k, now})
	}
	// Expire from the front: the oldest first.
	drop := 0
	for drop < len(c.order) && (len(c.order)-drop > recentMax || now.Sub(c.order[drop].at) > recentTTL) {
		delete(c.m, c.order[drop].key)
		drop++
	}
	if drop > 0 {
		c.order = slices.Delete(c.order, 0, drop)
	}
}

// take removes and returns the notifications of the ranges that are wholly
// here, and returns the ranges that are not, to be fetched.
func (c *recent) take(rs []Range) (found []Notification, missing []Range) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if len(c.m) == 0 {
		return nil, rs
	}
	for _, r := range rs {
		whole := r.To-r.From < 10_000
		for seq := r.From; whole && seq <= r.To; seq++ {
			_, whole = c.m[recentKey{r.User, seq}]
		}
		if !whole {
			missing = append(missing, r)
			continue
		}
		for seq := r.From; seq <= r.To; seq++ {
			k := recentKey{r.User, seq}
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
