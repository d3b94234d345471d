package handlers

import "net/http"

// Header values that many answers carry, each in one shared slice: assigning
// it to a response's header map allocates nothing, where Header.Set makes a
// new slice per call. No code appends to or writes into these slices in place;
// Header.Add on one appends to a full slice, which copies it.
var (
	headerJSON    = []string{"application/json"}
	headerNoSniff = []string{"nosniff"}
)

// noSniff tells browsers to take every answer as the Content-Type it declares
// (JSON stays JSON, never sniffed into HTML or script).
func noSniff(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header()["X-Content-Type-Options"] = headerNoSniff
		next.ServeHTTP(w, r)
	})
}
