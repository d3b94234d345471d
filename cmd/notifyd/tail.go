package main

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/r3labs/sse/v2"
	"gopkg.in/cenkalti/backoff.v1"

	"github.com/notifyd/notifyd/handlers"
)

// tailTokenTTL is the lifetime of the token tail mints for each connection.
const tailTokenTTL = time.Hour

// runTail is `notifyd tail -user U [-cursor N] [-url URL]`: what one user
// receives, live, through the same SSE endpoint a browser uses, one line per
// message (its type, then its JSON), until ctx ends. It connects as a device
// of its own (-device), so it is one more session of the user: it sees every
// notification and read, and never marks anything read.
//
// It reads the stream with r3labs/sse/v2's client, set up as
// ../shared/LIBRARIES.md says: a backoff that never gives up
// (MaxElapsedTime 0) bound to ctx, reconnecting with Last-Event-ID after a
// drop, and a loop around the subscription, since the client does not
// reconnect after a clean end of the response (bye). It pings the session
// as the protocol asks of an SSE client, so it is not evicted.
func runTail(ctx context.Context, args []string, getenv func(string) string, w io.Writer) error {
	fl := flag.NewFlagSet("tail", flag.ContinueOnError)
	user := fl.String("user", "", "user id to watch")
	cursor := fl.Int64("cursor", 0, "start above this seq (0 replays every unread notification first)")
	base := fl.String("url", "http://localhost:8080", "the server's base URL")
	device := fl.String("device", "notifyd-tail", "device name of tail's session")
	caFile := fl.String("cacert", "", "PEM file of the CA to trust for an https URL (default: the system's)")
	if err := fl.Parse(args); err != nil {
		return err
	}
	secret := getenv("NOTIFY_JWT_SECRET")
	if secret == "" {
		return errors.New("NOTIFY_JWT_SECRET is not set")
	}
	if !handlers.ValidUser(*user) {
		return errors.New("-user must be 1-128 characters of [A-Za-z0-9._:@-]")
	}
	if *cursor < 0 {
		return errors.New("-cursor must be 0 or more")
	}
	httpClient, err := tailHTTPClient(*caFile)
	if err != nil {
		return err
	}
	t := &tail{base: strings.TrimSuffix(*base, "/"), user: *user, device: *device,
		auth: handlers.NewAuth(secret, "", nil), http: httpClient, out: w}
	return t.run(ctx, *cursor)
}

// tailHTTPClient speaks HTTP/2 where the server offers it, trusting caFile
// when given.
func tailHTTPClient(caFile string) (*http.Client, error) {
	tr := http.DefaultTransport.(*http.Transport).Clone()
	tr.ForceAttemptHTTP2 = true
	if caFile != "" {
		pem, err := os.ReadFile(caFile)
		if err != nil {
			return nil, fmt.Errorf("-cacert: %w", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("-cacert %s: no PEM certificate in it", caFile)
		}
		tr.TLSClientConfig = &tls.Config{RootCAs: pool}
	}
	return &http.Client{Transport: tr}, nil
}

// tail is one running `notifyd tail`.
type tail struct {
	base, user, device string
	auth               *handlers.Auth
	http               *http.Client
	out                io.Writer

	outMu   sync.Mutex
	session atomic.Pointer[string] // the session id of the latest hello
	token   atomic.Pointer[string] // the token of the current connection
	ping    atomic.Int64           // the ping interval of the latest hello (ns)
	retry   atomic.Int64           // bye's retry_ms: how long to wait before reconnecting (ns)
	got     atomic.Bool            // a message arrived since the last subscribe
}

// run subscribes until ctx ends: it returns nil then, or the error of a
// connect the server refused (bad token, unknown user) before any message.
func (t *tail) run(ctx context.Context, cursor int64) error {
	client := sse.NewClient(t.base + "/v1/sse")
	client.Connection = t.http
	client.LastEventID.Store([]byte(strconv.FormatInt(cursor, 10)))
	bo := backoff.NewExponentialBackOff()
	bo.InitialInterval = 500 * time.Millisecond
	bo.MaxInterval = 30 * time.Second
	bo.MaxElapsedTime = 0 // never give up: the default stops 15 min after the subscription began
	client.ReconnectStrategy = backoff.WithContext(bo, ctx)
	client.ReconnectNotify = func(err error, next time.Duration) {
		t.line("# reconnecting in %s: %v", next.Round(time.Millisecond), err)
	}
	client.ResponseValidator = tailValidate

	pingCtx, stopPing := context.WithCancel(ctx)
	defer stopPing()
	go t.pinger(pingCtx)

	for ctx.Err() == nil {
		tok, err := t.auth.NewToken(t.user, t.device, tailTokenTTL)
		if err != nil {
			return err
		}
		t.token.Store(&tok)
		// Headers is read by the subscription only; it is set between two.
		client.Headers["Authorization"] = "Bearer " + tok
		t.got.Store(false)
		err = client.SubscribeRawWithContext(ctx, t.handle)
		if ctx.Err() != nil {
			return nil
		}
		var refused *tailRefused
		if errors.As(err, &refused) && !t.got.Load() {
			return err
		}
		// A clean end (bye) or a refusal after a while (the token expired):
		// wait as bye said, then connect again with a fresh token.
		wait := time.Duration(t.retry.Swap(0))
		if wait <= 0 {
			wait = time.Second
		}
		select {
		case <-ctx.Done():
		case <-time.After(wait):
		}
	}
	return nil
}

// tailRefused is a connect the server answered with a client error.
type tailRefused struct {
	status int
	body   string
}

func (e *tailRefused) Error() string {
	return fmt.Sprintf("the server refused the stream: %d %s", e.status, e.body)
}

// tailValidate is the client's ResponseValidator: a 4xx other than 429 is
// not retried by the backoff (the subscription returns it), anything else
// but 200 is.
func tailValidate(_ *sse.Client, resp *http.Response) error {
	if resp.StatusCode == http.StatusOK {
		return nil
	}
	raw, _ := io.ReadAll(io.LimitReader(resp.Body, 1024))
	resp.Body.Close()
	err := &tailRefused{status: resp.StatusCode, body: strings.TrimSpace(string(raw))}
	if resp.StatusCode >= 400 && resp.StatusCode < 500 && resp.StatusCode != http.StatusTooManyRequests {
		return backoff.Permanent(err)
	}
	return err
}

// handle prints one message and keeps what the session needs from it.
func (t *tail) handle(ev *sse.Event) {
	if len(ev.Data) == 0 {
		return
	}
	t.got.Store(true)
	var m struct {
		Type           string `json:"type"`
		Session        string `json:"session"`
		PingIntervalMs int64  `json:"ping_interval_ms"`
		RetryMs        int64  `json:"retry_ms"`
	}
	_ = json.Unmarshal(ev.Data, &m)
	switch m.Type {
	case "hello":
		t.session.Store(&m.Session)
		t.ping.Store(int64(time.Duration(m.PingIntervalMs) * time.Millisecond))
	case "bye":
		t.retry.Store(int64(time.Duration(m.RetryMs) * time.Millisecond))
	}
	// One line per message: the data may come split over data: lines.
	var b bytes.Buffer
	if err := json.Compact(&b, ev.Data); err != nil {
		b.Reset()
		b.Write(bytes.ReplaceAll(ev.Data, []byte("\n"), []byte(" ")))
	}
	typ := string(ev.Event)
	if typ == "" {
		typ = m.Type
	}
	t.line("%s %s", typ, b.Bytes())
}

// line prints one line of output.
func (t *tail) line(format string, args ...any) {
	t.outMu.Lock()
	defer t.outMu.Unlock()
	fmt.Fprintf(t.out, format+"\n", args...)
}

// pinger sends the protocol's ping to the current session every ping
// interval (the hello's), so the server does not evict it.
func (t *tail) pinger(ctx context.Context) {
	for {
		every := time.Duration(t.ping.Load())
		if every <= 0 {
			every = time.Second // no hello yet
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(every):
		}
		sid, tok := t.session.Load(), t.token.Load()
		if sid == nil || tok == nil || time.Duration(t.ping.Load()) <= 0 {
			continue
		}
		t.sendPing(ctx, *sid, *tok)
	}
}

// sendPing posts one ping; a failure is left to the stream (a session that
// is gone ends it, and tail reconnects).
func (t *tail) sendPing(ctx context.Context, session, token string) {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, "POST", t.base+"/v1/sessions/"+url.PathEscape(session)+"/messages",
		strings.NewReader(`{"type":"ping"}`))
	if err != nil {
		return
	}
	req.Header.Set("Authorization", "Bearer "+token)
	req.Header.Set("Content-Type", "application/json")
	resp, err := t.http.Do(req)
	if err != nil {
		return
	}
	_, _ = io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
}
