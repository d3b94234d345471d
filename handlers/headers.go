package handlers

import "net/http"

// Header values that every answer of a kind carries, each in one shared slice:
// assigning it to a response's header map allocates nothing, where Header.Set
// makes a new slice per call (a few per publish, measurable in the GC's share
// of a single publish). No code appends to or writes into these slices in
// place; Header.Add on one appends to a full slice, which copies it.
var (
	headerJSON    = []string{"application/json"}
	headerNoSniff = []string{"nosniff"}
	// noCacheHeaders keep answers out of browser and proxy caches (the
	// headers of chi's middleware.NoCache).
	noCacheHeaders = []struct {
		key string
		val []string
	}{
		{"Cache-Control", []string{"no-cache, no-store, no-transform, must-revalidate, private, max-age=0"}},
		{"Expires", []string{"Thu, 01 Jan 1970 00:00:00 GMT"}},
		{"Pragma", []string{"no-cache"}},
		{"X-Accel-Expires", []string{"0"}},
	}
	// conditionalHeaders are the request headers noCache drops, so that no
	// handler answers 304 from a client's cached copy.
	conditionalHeaders = []string{"ETag", "If-Modified-Since", "If-Match", "If-None-Match", "If-Range", "If-Unmodified-Since"}
)

// noSniff tells browsers to take every answer as the Content-Type it declares
// (JSON stays JSON, never sniffed into HTML or script).
func noSniff(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header()["X-Content-Type-Options"] = headerNoSniff
		next.ServeHTTP(w, r)
	})
}

// noCache marks the API's answers uncacheable: what chi's middleware.NoCache
// does, without its allocation per header per request.
func noCache(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		for _, k := range conditionalHeaders {
			delete(r.Header, k)
		}
		h := w.Header()
		for _, c := range noCacheHeaders {
			h[c.key] = c.val
		}
		next.ServeHTTP(w, r)
	})
}
