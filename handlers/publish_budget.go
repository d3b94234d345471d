package handlers

import (
	"io"
	"net/http"
	"sync/atomic"
	"time"
)

// publishBudget bounds the bytes of publish bodies in flight: read or being
// read by requests that have not answered yet. What a publish holds (its
// decoded rows, the statement's parameters) grows with its body, so the
// budget bounds the memory and the number of large publishes at once.
//
// Invariant: a request is refused only while other requests hold bytes, so
// a body within the request limit always gets through once it is alone, and
// the budget never deadlocks; bytes are given back when the request answers.
// A body of known length is charged before it is read; one sent chunked is
// charged as it is read, and refused at the read that overruns.
type publishBudget struct {
	max  int64 // 0: no bound
	used atomic.Int64
}

// errPublishBusy answers a publish that found the budget spent: 429 with
// Retry-After, nothing stored (a 2xx is only ever a commit).
var errPublishBusy = &Error{Status: http.StatusTooManyRequests, Code: "busy",
	Message: "too many publish bytes in flight; retry", RetryAfter: time.Second}

// admit charges r's body to the budget, or refuses it with errPublishBusy.
// The caller calls release when it has answered.
func (b *publishBudget) admit(r *http.Request) (release func(), err error) {
	if b == nil || b.max <= 0 {
		return func() {}, nil
	}
	if n := r.ContentLength; n >= 0 {
		if !b.take(n, 0) {
			return nil, errPublishBusy
		}
		return func() { b.used.Add(-n) }, nil
	}
	cr := &chargedReader{b: b, r: r.Body}
	r.Body = struct {
		io.Reader
		io.Closer
	}{cr, r.Body}
	return func() { b.used.Add(-cr.n) }, nil
}

// take charges n more bytes to a request holding held already; it refuses
// (charging nothing) when that overruns the budget while others hold bytes.
func (b *publishBudget) take(n, held int64) bool {
	total := b.used.Add(n)
	if total > b.max && total-n-held > 0 {
		b.used.Add(-n)
		return false
	}
	return true
}

// chargedReader charges what it reads to its budget.
type chargedReader struct {
	b *publishBudget
	r io.Reader
	n int64 // charged so far
}

func (c *chargedReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	if n > 0 {
		if !c.b.take(int64(n), c.n) {
			return 0, errPublishBusy
		}
		c.n += int64(n)
	}
	return n, err
}
