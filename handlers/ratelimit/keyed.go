// Package ratelimit is a token bucket per key (a user, a client address) in
// bounded memory, on golang.org/x/time/rate.
//
// Invariant: a key's bucket is dropped only once it has been unused for as
// long as it takes to refill, when a fresh bucket for that key would be the
// same; so evicting idle keys never changes an answer. Only when more than
// MaxKeys keys are busy at once is a busy one dropped (an arbitrary one),
// which can only let its key through sooner, never refuse it.
package ratelimit

import (
	"math"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/time/rate"
)

// Limit is a rate and a burst. The zero Limit limits nothing.
type Limit struct {
	Rate  rate.Limit // tokens per second
	Burst int        // the most taken at once
}

// Off reports whether l limits nothing.
func (l Limit) Off() bool { return l.Burst <= 0 }

// refill is how long an emptied bucket takes to fill again.
func (l Limit) refill() time.Duration {
	if l.Rate <= 0 {
		return time.Duration(math.MaxInt64)
	}
	return time.Duration(float64(l.Burst) / float64(l.Rate) * float64(time.Second))
}

// DefaultMaxKeys bounds the keys a Keyed holds.
const DefaultMaxKeys = 100_000

// sweepEvery is how often idle keys are swept when nothing forces it.
const sweepEvery = time.Minute

// Keyed is a Limit per key.
type Keyed struct {
	limit   Limit
	maxKeys int
	now     func() time.Time

	mu        sync.Mutex
	keys      map[string]*bucket
	lastSweep time.Time

	refused atomic.Uint64
}

type bucket struct {
	lim  *rate.Limiter
	used time.Time
}

// New returns a Keyed of limit holding at most maxKeys keys (DefaultMaxKeys
// when maxKeys <= 0).
func New(limit Limit, maxKeys int) *Keyed {
	if maxKeys <= 0 {
		maxKeys = DefaultMaxKeys
	}
	return &Keyed{limit: limit, maxKeys: maxKeys, now: time.Now, keys: map[string]*bucket{}}
}

// Allow takes a token of key's bucket. When there is none it reports false
// and how long until there is one.
func (k *Keyed) Allow(key string) (bool, time.Duration) {
	if k == nil || k.limit.Off() {
		return true, 0
	}
	now := k.now()
	k.mu.Lock()
	defer k.mu.Unlock()
	if now.Sub(k.lastSweep) >= sweepEvery {
		k.sweep(now)
	}
	b := k.keys[key]
	if b == nil {
		if len(k.keys) >= k.maxKeys {
			k.sweep(now)
			for drop := range k.keys { // all busy: drop one
				if len(k.keys) < k.maxKeys {
					break
				}
				delete(k.keys, drop)
			}
		}
		b = &bucket{lim: rate.NewLimiter(k.limit.Rate, k.limit.Burst)}
		k.keys[key] = b
	}
	b.used = now
	r := b.lim.ReserveN(now, 1)
	if !r.OK() {
		k.refused.Add(1)
		return false, k.limit.refill()
	}
	if d := r.DelayFrom(now); d > 0 {
		r.CancelAt(now)
		k.refused.Add(1)
		return false, d
	}
	return true, 0
}

// sweep drops the keys unused for a whole refill.
func (k *Keyed) sweep(now time.Time) {
	k.lastSweep = now
	idle := k.limit.refill()
	for key, b := range k.keys {
		if now.Sub(b.used) >= idle {
			delete(k.keys, key)
		}
	}
}

// Refused is how many Allow calls were refused.
func (k *Keyed) Refused() uint64 {
	if k == nil {
		return 0
	}
	return k.refused.Load()
}

// Len is how many keys are held.
func (k *Keyed) Len() int {
	k.mu.Lock()
	defer k.mu.Unlock()
	return len(k.keys)
}
