package store

import (
	"context"
	"errors"
	"fmt"
	"strings"

	"github.com/jackc/pgerrcode"
	"github.com/jackc/pgx/v5/pgconn"
)

// Error codes of the domain errors of notifyd (the store and the realtime hub).
// Each says what went wrong in terms a client can act on; the HTTP status or
// WebSocket close code that carries it is chosen in one place, by the handlers.
const (
	// EINVALID: the request itself is wrong (a field, or data Postgres cannot
	// store); retrying it unchanged fails again.
	EINVALID = "invalid"
	// ENOTFOUND: the thing asked for does not exist.
	ENOTFOUND = "not_found"
	// ECONFLICT: the request clashes with the current state.
	ECONFLICT = "conflict"
	// ETOOLARGE: the request is over a size limit.
	ETOOLARGE = "too_large"
	// EUNAVAILABLE: the database failed; the same request may succeed later.
	EUNAVAILABLE = "unavailable"
	// ETOOMANYSESSIONS: the user is at the live-sessions limit; a session must end first.
	ETOOMANYSESSIONS = "too_many_sessions"
	// ESHUTTINGDOWN: this server is closing; retry against it after its restart or elsewhere.
	ESHUTTINGDOWN = "shutting_down"
	// EINTERNAL: a bug or an error with no code.
	EINTERNAL = "internal"
)

// Error is a domain error: a code from the list above and a message fit to
// show a client (no Go or SQL internals). Err, when set, is the cause, for
// logs and errors.Is/As; it is not shown to clients.
type Error struct {
	Code    string
	Message string
	Err     error
}

// Error returns the code and message, and the cause when there is one.
func (e *Error) Error() string {
	s := e.Code + ": " + e.Message
	if e.Err != nil {
		s += ": " + e.Err.Error()
	}
	return s
}

// Unwrap returns the cause.
func (e *Error) Unwrap() error { return e.Err }

// Is makes every error of a code match that code's sentinel: errors.Is(err,
// ErrInvalid) holds for any EINVALID error.
func (e *Error) Is(target error) bool {
	t, ok := target.(*Error)
	return ok && t.Code == e.Code
}

// Errorf returns an *Error with the code and message.
func Errorf(code, message string) *Error { return &Error{Code: code, Message: message} }

// ErrorCode returns the code of err: the code of the first *Error in its chain;
// EINVALID for a Postgres rejection of the data itself (see rejectedData); ""
// for nil; EINTERNAL otherwise.
func ErrorCode(err error) string {
	if err == nil {
		return ""
	}
	var e *Error
	if errors.As(err, &e) {
		return e.Code
	}
	if _, ok := rejectedData(err); ok {
		return EINVALID
	}
	return EINTERNAL
}

// ErrorMessage returns the client-facing message of err: that of the first
// *Error in its chain, a description of the data Postgres rejected, or a
// generic text for anything else (whose details belong in logs only).
func ErrorMessage(err error) string {
	if err == nil {
		return ""
	}
	var e *Error
	if errors.As(err, &e) {
		return e.Message
	}
	if msg, ok := rejectedData(err); ok {
		return msg
	}
	return "internal error"
}

// rejectedData reports whether Postgres refused err's statement because of the
// data it was given, and describes the refusal in Postgres's own words (which
// name the value, never Go types): class 22 data exceptions (a NUL in text, an
// invalid byte sequence, a number out of range, an unsupported \u escape in
// jsonb) and 54000 program_limit_exceeded (a key too long to index).
// Retrying such a statement cannot help: the request is invalid.
func rejectedData(err error) (string, bool) {
	var pgErr *pgconn.PgError
	if !errors.As(err, &pgErr) {
		return "", false
	}
	if !strings.HasPrefix(pgErr.Code, "22") && pgErr.Code != pgerrcode.ProgramLimitExceeded {
		return "", false
	}
	msg := "the database rejected the data: " + pgErr.Message
	if pgErr.Detail != "" {
		msg += " (" + pgErr.Detail + ")"
	}
	return msg, true
}

// DBError gives the error of a failed statement its code: err as it is when it
// has one; EINVALID with Postgres's description when the data was refused;
// else EUNAVAILABLE (the database failed, or did not answer before the
// context ended), the cause kept for logs. what names the operation, for logs.
// Code that runs SQL on the store's pool outside this package passes its
// errors through DBError.
func DBError(what string, err error) error {
	if err == nil {
		return nil
	}
	var e *Error
	if errors.As(err, &e) {
		return err
	}
	if msg, ok := rejectedData(err); ok {
		return &Error{Code: EINVALID, Message: msg, Err: fmt.Errorf("%s: %w", what, err)}
	}
	return &Error{Code: EUNAVAILABLE, Message: "the database is unavailable; retry later", Err: fmt.Errorf("%s: %w", what, err)}
}

// ctxError is the error of a wait ended by ctx: EUNAVAILABLE (the store did not
// answer in time), with ctx's error kept so errors.Is(err, context.Canceled) holds.
func ctxError(what string, ctx context.Context) error {
	return &Error{Code: EUNAVAILABLE, Message: "the database did not answer in time; retry later", Err: fmt.Errorf("%s: %w", what, ctx.Err())}
}
