package handlers

import (
	"bytes"
	"encoding/json"
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

// validate checks one notification and returns it in the store's form.
func (a *API) validateItem(it publishItem, where string) (store.NewNotification, error) {
	bad := func(msg string) error { return errorf(http.StatusBadRequest, "invalid_notification", where+msg) }
	if !ValidUser(it.UserID) {
		return store.NewNotification{}, bad("user_id must be 1-128 characters of [A-Za-z0-9._:@-]")
	}
	if !topicChars.valid(it.Topic) {
		return store.NewNotification{}, bad("topic must be 1-128 characters of [A-Za-z0-9._:/-]")
	}
	data := bytes.TrimSpace(it.Data)
	if len(data) == 0 || bytes.Equal(data, []byte("null")) {
		data = []byte("{}")
	}
	var compact bytes.Buffer
	if err := json.Compact(&compact, data); err == nil {
		data = compact.Bytes()
	}
	if len(data) > a.Limits.MaxDataBytes {
		return store.NewNotification{}, errorf(http.StatusRequestEntityTooLarge, "too_large", where+"data is larger than the limit")
	}
	if len(it.IdempotencyKey) > 200 {
		return store.NewNotification{}, bad("idempotency_key is longer than 200 characters")
	}
	if bytes.IndexByte(data, 0) >= 0 || bytes.Contains(data, []byte(`\u0000`)) {
		return store.NewNotification{}, bad("data may not contain NUL characters")
	}
	return store.NewNotification{UserID: it.UserID, Topic: it.Topic, Data: json.RawMessage(data),
		IdempotencyKey: it.IdempotencyKey, ExpiresAt: it.ExpiresAt}, nil
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
	var req publishRequest
	limit := int64(a.Limits.MaxDataBytes)*int64(a.Limits.MaxBatch) + 1<<20
	if err := decodeJSON(w, r, limit, &req); err != nil {
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
	var items []publishItem
	if req.UserIDs != nil {
		if len(req.UserIDs) == 0 {
			writeError(w, errorf(http.StatusBadRequest, "bad_request", "user_ids is empty"))
			return
		}
		seen := make(map[string]bool, len(req.UserIDs))
		for _, u := range req.UserIDs {
			if !seen[u] {
				seen[u] = true
				items = append(items, publishItem{UserID: u, Topic: req.Topic, Data: req.Data, IdempotencyKey: req.IdempotencyKey, ExpiresAt: req.ExpiresAt})
			}
		}
	} else {
		if req.Topic != "" || req.Data != nil || req.IdempotencyKey != "" {
			writeError(w, errorf(http.StatusBadRequest, "bad_request", "a batch carries its fields per notification"))
			return
		}
		items = req.Notifications
	}
	if len(items) == 0 || len(items) > a.Limits.MaxBatch {
		writeError(w, errorf(http.StatusRequestEntityTooLarge, "batch_too_large", "a batch holds 1 to the batch limit of notifications"))
		return
	}
	ns := make([]store.NewNotification, len(items))
	for i, it := range items {
		n, err := a.validateItem(it, "notification "+strconv.Itoa(i)+": ")
		if err != nil {
			writeError(w, err)
			return
		}
		ns[i] = n
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
