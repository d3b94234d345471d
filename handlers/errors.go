package handlers

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"reflect"
	"strconv"
	"strings"
	"time"

	"github.com/gorilla/websocket"

	"github.com/notifyd/notifyd/store"
)

// Error is an API error: an HTTP status and the code and message of the JSON body
// `{"error":{"code":"…","message":"…"}}`. Errors of the HTTP layer itself (auth, query
// parameters) are made with errorf; domain errors (store.Error, with a store.E* code) become
// one in apiError, by the table domainCodes.
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

// domainCode is how a domain error code is carried to a client.
type domainCode struct {
	status int    // HTTP status
	close  int    // WebSocket close code
	wire   string // the code in the JSON body (PROTOCOL.md)
}

// domainCodes maps every domain error code to its HTTP status, WebSocket close code and wire
// code. It is the one place these are decided: only a database failure is 503 unavailable,
// a closing server is 503 shutting_down, and input Postgres refuses is 400.
var domainCodes = map[string]domainCode{
	store.EINVALID:         {http.StatusBadRequest, websocket.ClosePolicyViolation, "bad_request"},
	store.ENOTFOUND:        {http.StatusNotFound, websocket.ClosePolicyViolation, "not_found"},
	store.ECONFLICT:        {http.StatusConflict, websocket.ClosePolicyViolation, "conflict"},
	store.ETOOLARGE:        {http.StatusRequestEntityTooLarge, websocket.CloseMessageTooBig, "too_large"},
	store.ETOOMANYSESSIONS: {http.StatusTooManyRequests, websocket.ClosePolicyViolation, "too_many_sessions"},
	store.EUNAVAILABLE:     {http.StatusServiceUnavailable, websocket.CloseInternalServerErr, "unavailable"},
	store.ESHUTTINGDOWN:    {http.StatusServiceUnavailable, websocket.CloseServiceRestart, "shutting_down"},
	store.EINTERNAL:        {http.StatusInternalServerError, websocket.CloseInternalServerErr, "internal"},
}

// lookupCode returns the table row of a domain code; an unknown code is EINTERNAL.
func lookupCode(code string) domainCode {
	if c, ok := domainCodes[code]; ok {
		return c
	}
	return domainCodes[store.EINTERNAL]
}

// httpStatus is the HTTP status of a domain error code.
func httpStatus(code string) int { return lookupCode(code).status }

// closeCode is the WebSocket close code of a domain error code.
func closeCode(code string) int { return lookupCode(code).close }

// apiError returns err as an API error: an *Error as it is, any other error by its domain
// code (store.ErrorCode) and client-facing message (store.ErrorMessage), so that no Go or SQL
// internals reach a client.
func apiError(err error) *Error {
	var e *Error
	if errors.As(err, &e) {
		return e
	}
	c := lookupCode(store.ErrorCode(err))
	msg := store.ErrorMessage(err)
	if c.wire == "internal" {
		msg = "internal error"
	}
	return &Error{Status: c.status, Code: c.wire, Message: msg}
}

// Errors every endpoint may answer.
var (
	errUnauthorized = errorf(http.StatusUnauthorized, "unauthorized", "a valid token is required")
	errForbidden    = errorf(http.StatusForbidden, "forbidden", "not allowed")
	errUnavailable  = apiError(store.Errorf(store.EUNAVAILABLE, "the database is unavailable; retry later"))
	errShuttingDown = apiError(store.ErrClosed)
)

type errorBody struct {
	Error struct {
		Code    string `json:"code"`
		Message string `json:"message"`
	} `json:"error"`
}

// writeError answers err as JSON (see apiError); an error with no code is a 500.
func writeError(w http.ResponseWriter, err error) {
	e := apiError(err)
	if e.RetryAfter > 0 {
		w.Header().Set("Retry-After", strconv.Itoa(retrySeconds(e.RetryAfter)))
	}
	var body errorBody
	body.Error.Code, body.Error.Message = e.Code, e.Message
	writeJSON(w, e.Status, body)
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header()["Content-Type"] = headerJSON
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(v)
}

// decodeJSON reads a JSON body of at most limit bytes into v.
func decodeJSON(w http.ResponseWriter, r *http.Request, limit int64, v any) error {
	r.Body = http.MaxBytesReader(w, r.Body, limit)
	return decodeStrict(r.Body, v)
}

// decodeStrict decodes the one JSON value rd holds into v, refusing unknown
// fields, with decoded's answers.
func decodeStrict(rd io.Reader, v any) error {
	dec := json.NewDecoder(rd)
	dec.DisallowUnknownFields()
	return decoded(dec, dec.Decode(v))
}

// decoded is the answer to a body that dec decoded with the result err: an
// *Error as it is, a body past its byte limit 413 too_large, any other
// decoding error 400 naming the problem (jsonProblem), and data after the
// one JSON value 400.
func decoded(dec *json.Decoder, err error) error {
	if err != nil {
		var api *Error
		if errors.As(err, &api) {
			return api
		}
		var tooBig *http.MaxBytesError
		if errors.As(err, &tooBig) {
			return errorf(http.StatusRequestEntityTooLarge, "too_large", "request body is too large")
		}
		return errorf(http.StatusBadRequest, "bad_request", "invalid JSON body: "+jsonProblem(err))
	}
	if dec.More() {
		return errorf(http.StatusBadRequest, "bad_request", "trailing data after the JSON body")
	}
	return nil
}

// jsonProblem describes a decoding error in the client's terms: the field and the JSON type
// it must have, or where the syntax broke, never the Go types it was decoded into.
func jsonProblem(err error) string {
	var syntax *json.SyntaxError
	var typ *json.UnmarshalTypeError
	var when *time.ParseError
	switch {
	case errors.As(err, &syntax):
		return fmt.Sprintf("%s (at byte %d)", strings.TrimPrefix(syntax.Error(), "json: "), syntax.Offset)
	case errors.As(err, &typ):
		field := typ.Field
		if field == "" {
			field = "the body"
		}
		return fmt.Sprintf("%s: must be %s (at byte %d)", field, jsonKind(typ.Type), typ.Offset)
	case errors.As(err, &when):
		return "a time must be RFC 3339, such as 2026-11-26T21:04:05Z"
	case errors.Is(err, io.EOF):
		return "the body is empty"
	case errors.Is(err, io.ErrUnexpectedEOF):
		return "the body ends before the JSON value does"
	case strings.HasPrefix(err.Error(), "json: unknown field "):
		return strings.TrimPrefix(err.Error(), "json: ")
	}
	return "not a JSON value of the expected shape"
}

// jsonKind names the JSON type that decodes into t: "a string", "an array of strings", ...
func jsonKind(t reflect.Type) string {
	if t == nil {
		return "another JSON type"
	}
	for t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	if k := t.Kind(); k == reflect.Slice || k == reflect.Array {
		e := t.Elem()
		for e.Kind() == reflect.Pointer {
			e = e.Elem()
		}
		if n, ok := kindNames[e.Kind()]; ok {
			return "an array of " + n[1]
		}
		return "an array"
	}
	if n, ok := kindNames[t.Kind()]; ok {
		return n[0]
	}
	return "another JSON type"
}

// kindNames gives the JSON name, singular and plural, of what a Go kind decodes from.
var kindNames = map[reflect.Kind][2]string{
	reflect.String: {"a string", "strings"},
	reflect.Bool:   {"true or false", "true or false values"},
	reflect.Int:    {"an integer", "integers"}, reflect.Int8: {"an integer", "integers"},
	reflect.Int16: {"an integer", "integers"}, reflect.Int32: {"an integer", "integers"},
	reflect.Int64: {"an integer", "integers"}, reflect.Uint: {"an integer", "integers"},
	reflect.Uint8: {"an integer", "integers"}, reflect.Uint16: {"an integer", "integers"},
	reflect.Uint32: {"an integer", "integers"}, reflect.Uint64: {"an integer", "integers"},
	reflect.Float32: {"a number", "numbers"}, reflect.Float64: {"a number", "numbers"},
	reflect.Struct: {"an object", "objects"}, reflect.Map: {"an object", "objects"},
	reflect.Slice: {"an array", "arrays"}, reflect.Array: {"an array", "arrays"},
}
