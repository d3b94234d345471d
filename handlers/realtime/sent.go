package realtime

import "hash/maphash"

// sentSeed hashes notification ids for sentRing.
var sentSeed = maphash.MakeSeed()

// sentRing remembers the notifications most recently handed to a session's
// writer and not yet acked, so that an ack of an id the session was never
// sent (or acked already) can be refused before it costs a delivery record
// anything.
//
// Invariant: it holds at most cap(ids) entries, each the 64-bit hash of a
// notification id (never the id itself, so it keeps no frame alive), in the
// order they were sent; a full ring forgets its oldest entry. An ack is
// admitted at most once per entry: admitting clears the entry. A hash
// collision (2^-64 per pair) could only admit one ack that should not have
// been, which the recorder then counts as unmatched.
type sentRing struct {
	ids  []uint64 // 0 marks an empty or acked slot
	next int      // where the next id goes once the ring is full
	live int      // non-zero entries
}

// sentHash is the ring's key for id; never 0, the empty mark.
func sentHash(id string) uint64 {
	h := maphash.String(sentSeed, id)
	if h == 0 {
		h = 1
	}
	return h
}

// add remembers id, forgetting the oldest entry when the ring holds max.
func (r *sentRing) add(id string, max int) {
	h := sentHash(id)
	if len(r.ids) < max {
		r.ids = append(r.ids, h)
		r.live++
		return
	}
	if r.next >= len(r.ids) {
		r.next = 0
	}
	if r.ids[r.next] == 0 {
		r.live++
	}
	r.ids[r.next] = h
	r.next++
}

// take reports whether id is remembered and forgets it, so a second ack of
// the same id is refused.
func (r *sentRing) take(id string) bool {
	if r.live == 0 {
		return false
	}
	h := sentHash(id)
	for i, v := range r.ids {
		if v == h {
			r.ids[i] = 0
			r.live--
			return true
		}
	}
	return false
}
