package handlers

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"reflect"
	"strings"
)

// smallPublishBytes is the largest body of known length that decodePublish
// reads whole and decodes in one pass: a single publish, a small fan-out or
// batch. Its length bounds what it holds, so the arrays' lengths are checked
// after the pass; a longer body, or one sent chunked, is decoded as a stream.
const smallPublishBytes = 16 << 10

// decodePublish reads a publish body of size bytes (-1: unknown) from rd.
// Unknown fields, wrong types and bad syntax are 400 bad_request naming the
// field, a body past the reader's byte limit 413 too_large, and user_ids or
// notifications longer than maxBatch 413 batch_too_large.
func decodePublish(rd io.Reader, size int64, maxBatch int, req *publishRequest) error {
	if size < 0 || size > smallPublishBytes {
		return decodePublishStream(rd, maxBatch, req)
	}
	body := make([]byte, size)
	if _, err := io.ReadFull(rd, body); err != nil {
		return decoded(nil, err) // empty, or ended before its Content-Length
	}
	if trimmed := bytes.TrimLeft(body, " \t\r\n"); len(trimmed) == 0 || trimmed[0] != '{' {
		// Empty, or not an object: the stream decoder's answers for these.
		return decodePublishStream(bytes.NewReader(body), maxBatch, req)
	}
	if err := decodeStrict(bytes.NewReader(body), req); err != nil {
		return err
	}
	if len(req.UserIDs) > maxBatch || len(req.Notifications) > maxBatch {
		return errBatchTooLarge
	}
	return nil
}

// decodePublishStream reads a publish body from rd token by token, so that the
// length of user_ids and notifications is checked while they are read: an
// array longer than maxBatch is refused (413 batch_too_large) as soon as the
// decoder passes the limit, having held no more of it than the limit, rather
// than after the whole array was decoded. Its other answers are
// decodePublish's.
func decodePublishStream(rd io.Reader, maxBatch int, req *publishRequest) error {
	dec := json.NewDecoder(rd)
	dec.DisallowUnknownFields()
	return decoded(dec, readPublish(dec, maxBatch, req))
}

var (
	typeRequest = reflect.TypeFor[publishRequest]()
	typeStrings = reflect.TypeFor[[]string]()
	typeString  = reflect.TypeFor[string]()
	typeItems   = reflect.TypeFor[[]publishItem]()
)

// errBatchTooLarge answers a batch or fan-out of more than the batch limit.
var errBatchTooLarge = errorf(http.StatusRequestEntityTooLarge, "batch_too_large", "a batch holds 1 to the batch limit of notifications")

func readPublish(dec *json.Decoder, maxBatch int, req *publishRequest) error {
	if err := openValue(dec, '{', typeRequest, ""); err != nil {
		return err // io.EOF: the body is empty
	}
	err := readFields(dec, maxBatch, req)
	if errors.Is(err, io.EOF) {
		return io.ErrUnexpectedEOF // the body ended inside the object
	}
	return err
}

func readFields(dec *json.Decoder, maxBatch int, req *publishRequest) error {
	for dec.More() {
		tok, err := dec.Token()
		if err != nil {
			return err
		}
		key, _ := tok.(string) // the decoder gives an object's keys as strings
		switch fieldName(key) {
		case "user_id":
			err = decodeField(dec, key, &req.UserID)
		case "topic":
			err = decodeField(dec, key, &req.Topic)
		case "data":
			err = decodeField(dec, key, &req.Data)
		case "idempotency_key":
			err = decodeField(dec, key, &req.IdempotencyKey)
		case "expires_at":
			err = decodeField(dec, key, &req.ExpiresAt)
		case "user_ids":
			req.UserIDs, err = readUserIDs(dec, maxBatch)
		case "notifications":
			req.Notifications, err = readItems(dec, maxBatch)
		default:
			return fmt.Errorf("json: unknown field %q", key)
		}
		if err != nil {
			return err
		}
	}
	_, err := dec.Token() // the closing brace: More said there is nothing else
	return err
}

// publishFields are the keys of a publish body.
var publishFields = []string{"user_id", "topic", "data", "idempotency_key", "expires_at", "user_ids", "notifications"}

// fieldName is the field key names, matched as encoding/json matches keys to
// struct fields: exactly, else without regard to case.
func fieldName(key string) string {
	for _, f := range publishFields {
		if key == f {
			return f
		}
	}
	for _, f := range publishFields {
		if strings.EqualFold(key, f) {
			return f
		}
	}
	return key
}

// openValue reads the token opening an array or object (want) and reports a
// type error naming field when the value is anything else. A null gives
// errNull.
func openValue(dec *json.Decoder, want json.Delim, t reflect.Type, field string) error {
	off := dec.InputOffset()
	tok, err := dec.Token()
	if err != nil {
		return err
	}
	if tok == nil && field != "" {
		return errNull
	}
	if d, ok := tok.(json.Delim); !ok || d != want {
		return &json.UnmarshalTypeError{Value: "value", Type: t, Field: field, Offset: off}
	}
	return nil
}

// errNull is openValue's answer to a null, which leaves the field unset.
var errNull = errors.New("null")

// readUserIDs reads the user_ids array (nil for null), refusing it once it
// holds more than maxBatch entries.
func readUserIDs(dec *json.Decoder, maxBatch int) ([]string, error) {
	if err := openValue(dec, '[', typeStrings, "user_ids"); err != nil {
		if err == errNull {
			return nil, nil
		}
		return nil, err
	}
	ids := []string{}
	for dec.More() {
		if len(ids) >= maxBatch {
			return nil, errBatchTooLarge
		}
		off := dec.InputOffset()
		tok, err := dec.Token()
		if err != nil {
			return nil, err
		}
		id, ok := tok.(string)
		if !ok {
			return nil, &json.UnmarshalTypeError{Value: "value", Type: typeString, Field: "user_ids", Offset: off}
		}
		ids = append(ids, id)
	}
	_, err := dec.Token()
	return ids, err
}

// readItems reads the notifications array (nil for null), refusing it once it
// holds more than maxBatch entries.
func readItems(dec *json.Decoder, maxBatch int) ([]publishItem, error) {
	if err := openValue(dec, '[', typeItems, "notifications"); err != nil {
		if err == errNull {
			return nil, nil
		}
		return nil, err
	}
	items := []publishItem{}
	for dec.More() {
		if len(items) >= maxBatch {
			return nil, errBatchTooLarge
		}
		var it publishItem
		if err := decodeField(dec, "notifications", &it); err != nil {
			return nil, err
		}
		items = append(items, it)
	}
	_, err := dec.Token()
	return items, err
}

// decodeField decodes the next value into v; a type error names field (and,
// inside it, the field of the element that was wrong).
func decodeField(dec *json.Decoder, field string, v any) error {
	err := dec.Decode(v)
	var typ *json.UnmarshalTypeError
	if errors.As(err, &typ) {
		if typ.Field == "" {
			typ.Field = field
		} else {
			typ.Field = field + "." + typ.Field
		}
	}
	return err
}
