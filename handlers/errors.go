package handlers

import (
	"encoding/json"
	"errors"
	"net/http"
	"strconv"
	"time"
)

// Error is an API error: an HTTP status and the code and message of the JSON body
// `{"error":{"code":"…","message":"…"}}`.
type Error struct {
	Status  int
	Code    string
	Message string
	// RetryAfter, when set, is sent as the Retry-After header (whole seconds).
	RetryAfter time.Duration
}

func (e *Error) Error() string { return e.Code + ": " + e.Message }

func errorf(status int, code, message string) *Error {
	return &Error{Status: status, Code: code, Message: message}
}

// Errors every endpoint may answer.
var (
	errUnauthorized = errorf(http.StatusUnauthorized, "unauthorized", "a valid token is required")
	errForbidden    = errorf(http.StatusForbidden, "forbidden", "not allowed")
	errUnavailable  = errorf(http.StatusServiceUnavailable, "unavailable", "the database is unavailable; retry later")
	errShuttingDown = errorf(http.StatusServiceUnavailable, "shutting_down", "the server is restarting; retry later")
)

type errorBody struct {
	Error struct {
		Code    string `json:"code"`
		Message string `json:"message"`
	} `json:"error"`
}

// writeError answers err as JSON; an error that is not an *Error is a 500.
func writeError(w http.ResponseWriter, err error) {
	var e *Error
	if !errors.As(err, &e) {
		e = errorf(http.StatusInternalServerError, "internal", "internal error")
	}
	if e.RetryAfter > 0 {
		w.Header().Set("Retry-After", strconv.Itoa(retrySeconds(e.RetryAfter)))
	}
	var body errorBody
	body.Error.Code, body.Error.Message = e.Code, e.Message
	writeJSON(w, e.Status, body)
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(v)
}

// decodeJSON reads a JSON body of at most limit bytes into v.
func decodeJSON(w http.ResponseWriter, r *http.Request, limit int64, v any) error {
	r.Body = http.MaxBytesReader(w, r.Body, limit)
	dec := json.NewDecoder(r.Body)
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		var tooBig *http.MaxBytesError
		if errors.As(err, &tooBig) {
			return errorf(http.StatusRequestEntityTooLarge, "too_large", "request body is too large")
		}
		return errorf(http.StatusBadRequest, "bad_request", "invalid JSON body: "+err.Error())
	}
	if dec.More() {
		return errorf(http.StatusBadRequest, "bad_request", "trailing data after the JSON body")
	}
	return nil
}
