package handlers

import (
	"bytes"
	"encoding/json"
	"errors"
	"net/http"
	"strconv"
	"time"

	"github.com/notifyd/notifyd/handlers/realtime"
	"github.com/notifyd/notifyd/store"
)

// topicChars is what a topic may be made of: 1 to 128 of [A-Za-z0-9._:/-].
var topicChars = newCharset("._:/-")

// publishRequest is the body of POST /v1/notifications: one notification
// (user_id), one fanned out to many users (user_ids), or a batch
// (notifications).
type publishRequest struct {
	UserID         string          `json:"user_id"`
	UserIDs        []string        `json:"user_ids"`
	Topic          string          `json:"topic"`
	Data           json.RawMessage `json:"data"`
	IdempotencyKey string          `json:"idempotency_key"`
	ExpiresAt      *time.Time      `json:"expires_at"`
	Notifications  []publishItem   `json:"notifications"`
}

type publishItem struct {
	UserID         string          `json:"user_id"`
	Topic          string          `json:"topic"`
	Data           json.RawMessage `json:"data"`
	IdempotencyKey string          `json:"idempotency_key"`
	ExpiresAt      *time.Time      `json:"expires_at"`
}

type published struct {
	ID        string `json:"id"`
	UserID    string `json:"user_id"`
	Seq       int64  `json:"seq"`
	CreatedAt string `json:"created_at"`
}

func toPublished(p store.Published) published {
	return published{ID: p.ID, UserID: p.UserID, Seq: p.Seq, CreatedAt: realtime.WireTime(p.CreatedAt)}
}

// validateItem checks one notification and returns it in the store's form.
func (a *API) validateItem(it publishItem, where string) (store.NewNotification, error) {
	data, err := a.checkData(it.Data, where)
	if err != nil {
		return store.NewNotification{}, err
	}
	return a.checkRecipient(it, data, where)
}

// checkRecipient checks what a notification holds besides its data (checked
// once, by checkData, and shared by every recipient of a fan-out).
func (a *API) checkRecipient(it publishItem, data json.RawMessage, where string) (store.NewNotification, error) {
	bad := func(msg string) error { return errorf(http.StatusBadRequest, "invalid_notification", where+msg) }
	if !ValidUser(it.UserID) {
		return store.NewNotification{}, bad("user_id must be 1-128 characters of [A-Za-z0-9._:@-]")
	}
	if !topicChars.valid(it.Topic) {
		return store.NewNotification{}, bad("topic must be 1-128 characters of [A-Za-z0-9._:/-]")
	}
	if len(it.IdempotencyKey) > 200 {
		return store.NewNotification{}, bad("idempotency_key is longer than 200 characters")
	}
	return store.NewNotification{UserID: it.UserID, Topic: it.Topic, Data: data,
		IdempotencyKey: it.IdempotencyKey, ExpiresAt: it.ExpiresAt}, nil
}

// checkData returns a notification's data compacted ({} for none), or why it
// is refused.
func (a *API) checkData(raw json.RawMessage, where string) (json.RawMessage, error) {
	data := bytes.TrimSpace(raw)
	if len(data) == 0 || bytes.Equal(data, []byte("null")) {
		data = []byte("{}")
	}
	var compact bytes.Buffer
	if err := json.Compact(&compact, data); err == nil {
		data = compact.Bytes()
	}
	if len(data) > a.Limits.MaxDataBytes {
		return nil, errorf(http.StatusRequestEntityTooLarge, "too_large", where+"data is larger than the limit")
	}
	if bytes.IndexByte(data, 0) >= 0 || bytes.Contains(data, []byte(`\u0000`)) {
		return nil, errorf(http.StatusBadRequest, "invalid_notification", where+"data may not contain NUL characters")
	}
	return json.RawMessage(data), nil
}

// publish is POST /v1/notifications. It answers 201 only once every row is
// committed, 200 when the idempotency key had been seen, 400 when a row is
// invalid (also when Postgres refuses its data), 503 with nothing stored while
// Postgres is unreachable or the server is shutting down.
func (a *API) publish(w http.ResponseWriter, r *http.Request) {
	if !a.Auth.Publisher(r) {
		writeError(w, errUnauthorized)
		return
	}
	release, err := a.publishBudget.admit(r)
	if err != nil {
		a.Metrics.publishBusy()
		writeError(w, err)
		return
	}
	defer release()
	var req publishRequest
	limit := int64(a.Limits.MaxDataBytes)*int64(a.Limits.MaxBatch) + 1<<20
	if err := decodePublish(http.MaxBytesReader(w, r.Body, limit), r.ContentLength, a.Limits.MaxBatch, &req); err != nil {
		if errors.Is(err, errPublishBusy) {
			a.Metrics.publishBusy()
		}
		writeError(w, err)
		return
	}
	forms := 0
	for _, set := range []bool{req.UserID != "", req.UserIDs != nil, req.Notifications != nil} {
		if set {
			forms++
		}
	}
	if forms != 1 {
		writeError(w, errorf(http.StatusBadRequest, "bad_request", "give exactly one of user_id, user_ids or notifications"))
		return
	}
	if req.UserID != "" {
		a.publishOne(w, r, req)
		return
	}
	var ns []store.NewNotification
	if req.UserIDs != nil {
		ns, err = a.fanOut(req)
	} else {
		ns, err = a.batch(req)
	}
	if err != nil {
		writeError(w, err)
		return
	}
	res, err := a.Store.Publish(r.Context(), ns)
	if err != nil {
		a.publishFailed(w, r, err)
		return
	}
	out := make([]published, len(res))
	status := http.StatusOK
	for i, p := range res {
		out[i] = toPublished(p)
		if !p.Duplicate {
			status = http.StatusCreated
		}
	}
	if a.Metrics != nil {
		a.Metrics.published.Add(float64(len(res)))
	}
	writeJSON(w, status, map[string]any{"notifications": out})
}

// fanOut is a fan-out request as notifications, one per distinct user in the
// order of user_ids, all sharing the one copy of data: the request's memory
// grows with the users, never with users × data.
func (a *API) fanOut(req publishRequest) ([]store.NewNotification, error) {
	if len(req.UserIDs) == 0 {
		return nil, errorf(http.StatusBadRequest, "bad_request", "user_ids is empty")
	}
	data, err := a.checkData(req.Data, "")
	if err != nil {
		return nil, err
	}
	seen := make(map[string]bool, len(req.UserIDs))
	ns := make([]store.NewNotification, 0, len(req.UserIDs))
	for _, u := range req.UserIDs {
		if seen[u] {
			continue
		}
		seen[u] = true
		n, err := a.checkRecipient(publishItem{UserID: u, Topic: req.Topic, IdempotencyKey: req.IdempotencyKey, ExpiresAt: req.ExpiresAt},
			data, "notification "+strconv.Itoa(len(ns))+": ")
		if err != nil {
			return nil, err
		}
		ns = append(ns, n)
	}
	return ns, nil
}

// batch is a batch request as notifications, each checked.
func (a *API) batch(req publishRequest) ([]store.NewNotification, error) {
	if req.Topic != "" || req.Data != nil || req.IdempotencyKey != "" {
		return nil, errorf(http.StatusBadRequest, "bad_request", "a batch carries its fields per notification")
	}
	if len(req.Notifications) == 0 {
		return nil, errBatchTooLarge
	}
	ns := make([]store.NewNotification, len(req.Notifications))
	for i, it := range req.Notifications {
		n, err := a.validateItem(it, "notification "+strconv.Itoa(i)+": ")
		if err != nil {
			return nil, err
		}
		ns[i] = n
	}
	return ns, nil
}

func (a *API) publishOne(w http.ResponseWriter, r *http.Request, req publishRequest) {
	n, err := a.validateItem(publishItem{UserID: req.UserID, Topic: req.Topic, Data: req.Data,
		IdempotencyKey: req.IdempotencyKey, ExpiresAt: req.ExpiresAt}, "")
	if err != nil {
		writeError(w, err)
		return
	}
	p, err := a.Store.PublishOne(r.Context(), n)
	if err != nil {
		a.publishFailed(w, r, err)
		return
	}
	status := http.StatusCreated
	if p.Duplicate {
		status = http.StatusOK
	}
	if a.Metrics != nil {
		a.Metrics.published.Inc()
	}
	writeJSON(w, status, toPublished(p))
}

// publishFailed answers a store error by its code (apiError).
func (a *API) publishFailed(w http.ResponseWriter, r *http.Request, err error) {
	if r.Context().Err() != nil {
		return // the client left; whether the row committed it must learn by idempotency key
	}
	if store.ErrorCode(err) == store.EINVALID {
		a.Log.Info("publish refused", "err", err)
	} else {
		a.Log.Warn("publish failed", "err", err)
	}
	writeError(w, err)
}
