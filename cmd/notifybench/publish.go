package main

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
)

// Publish modes: the API one notification per request, the API in batches,
// or the application's own SQL inserts (delivered like API publishes).
const (
	publishSingle = "single"
	publishBatch  = "batch"
	publishSQL    = "sql"
)

// publisher sends notifications to the scenario's users, round robin, from
// C concurrent workers, and counts what committed per user.
type publisher struct {
	t         *target
	users     []string
	committed []atomic.Int64 // per user: notifications committed (201) in this phase
	cursor    atomic.Uint64  // next user index, round robin

	errors   atomic.Int64
	mu       sync.Mutex
	statuses map[string]int // non-201 outcomes: "status 503", "error ...", counted
	reqLat   latencies      // request round trip (201 = committed)
}

func newPublisher(t *target, users []string) *publisher {
	return &publisher{t: t, users: users, committed: make([]atomic.Int64, len(users)), statuses: map[string]int{}}
}

func (p *publisher) fail(what string) {
	p.errors.Add(1)
	p.mu.Lock()
	p.statuses[what]++
	p.mu.Unlock()
}

// take returns the indexes of the next n users (distinct while n <= users).
func (p *publisher) take(n int) []int {
	start := p.cursor.Add(uint64(n)) - uint64(n)
	out := make([]int, n)
	for i := range out {
		out[i] = int((start + uint64(i)) % uint64(len(p.users)))
	}
	return out
}

// run publishes with workers in mode until ctx ends or d has passed. It
// returns the wall time from the first send to the last answer.
func (p *publisher) run(ctx context.Context, mode string, workers, batch int, d time.Duration) (time.Duration, error) {
	if mode == publishSingle {
		batch = 1
	}
	ctx, cancel := context.WithTimeout(ctx, d)
	defer cancel()
	var pool *pgxpool.Pool
	if mode == publishSQL {
		cfg, err := pgxpool.ParseConfig(p.t.DBURL)
		if err != nil {
			return 0, err
		}
		cfg.MaxConns = int32(workers)
		pool, err = pgxpool.NewWithConfig(context.WithoutCancel(ctx), cfg)
		if err != nil {
			return 0, fmt.Errorf("sql publisher: %w", err)
		}
		defer pool.Close()
	}
	client := &http.Client{Timeout: 60 * time.Second, Transport: &http.Transport{
		MaxConnsPerHost: workers, MaxIdleConnsPerHost: workers, DisableCompression: true}}
	defer client.CloseIdleConnections()
	start := time.Now()
	var wg sync.WaitGroup
	for range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for ctx.Err() == nil {
				idx := p.take(batch)
				switch mode {
				case publishSQL:
					p.sendSQL(pool, idx)
				default:
					p.sendAPI(client, mode, idx)
				}
			}
		}()
	}
	wg.Wait()
	return time.Since(start), nil
}

// sendAPI posts one request. It is not cancelled when the phase ends: an
// answer is needed to know whether the rows committed.
func (p *publisher) sendAPI(client *http.Client, mode string, idx []int) {
	var body bytes.Buffer
	t := strconv.FormatInt(time.Now().UnixNano(), 10)
	item := func(u int) {
		body.WriteString(`{"user_id":"`)
		body.WriteString(p.users[u])
		body.WriteString(`","topic":"bench","data":{"t":`)
		body.WriteString(t)
		body.WriteString(`}}`)
	}
	if mode == publishSingle {
		item(idx[0])
	} else {
		body.WriteString(`{"notifications":[`)
		for i, u := range idx {
			if i > 0 {
				body.WriteByte(',')
			}
			item(u)
		}
		body.WriteString(`]}`)
	}
	req, err := http.NewRequest(http.MethodPost, p.t.URL+"/v1/notifications", &body)
	if err != nil {
		p.fail("error " + err.Error())
		return
	}
	req.Header.Set("Authorization", "Bearer "+p.t.APIKey)
	req.Header.Set("Content-Type", "application/json")
	sent := time.Now()
	resp, err := client.Do(req)
	if err != nil {
		p.fail("error " + err.Error())
		return
	}
	_, _ = io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusCreated {
		p.fail("status " + strconv.Itoa(resp.StatusCode))
		return
	}
	p.reqLat.add(idx[0], time.Since(sent))
	for _, u := range idx {
		p.committed[u].Add(1)
	}
}

// benchInsert is how an application inserts notifications with its own SQL;
// rows go in user order so that concurrent batches lock the per-user
// counters in one order.
const benchInsert = `INSERT INTO notifications (user_id, topic, data)
SELECT u, 'bench', d::jsonb FROM unnest($1::text[], $2::text[]) AS x(u, d) ORDER BY u`

func (p *publisher) sendSQL(pool *pgxpool.Pool, idx []int) {
	users := make([]string, len(idx))
	datas := make([]string, len(idx))
	data := `{"t":` + strconv.FormatInt(time.Now().UnixNano(), 10) + `}`
	for i, u := range idx {
		users[i], datas[i] = p.users[u], data
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	sent := time.Now()
	tag, err := pool.Exec(ctx, benchInsert, users, datas)
	if err != nil {
		p.fail("sql " + err.Error())
		return
	}
	if tag.RowsAffected() != int64(len(idx)) {
		p.fail("sql short insert")
		return
	}
	p.reqLat.add(idx[0], time.Since(sent))
	for _, u := range idx {
		p.committed[u].Add(1)
	}
}

// storeUnread inserts n notifications for each user with SQL (offline
// backlog for replay checks), in statements of about 10,000 rows. Their data
// carries no send time, so they never count as live latency.
func storeUnread(ctx context.Context, dbURL string, users []string, n int) error {
	if n <= 0 || len(users) == 0 {
		return nil
	}
	pool, err := pgxpool.New(ctx, dbURL)
	if err != nil {
		return err
	}
	defer pool.Close()
	var us, ds []string
	flush := func() error {
		if len(us) == 0 {
			return nil
		}
		_, err := pool.Exec(ctx, benchInsert, us, ds)
		us, ds = us[:0], ds[:0]
		return err
	}
	for _, u := range users {
		for range n {
			us = append(us, u)
			ds = append(ds, `{}`)
		}
		if len(us) >= 10000 {
			if err := flush(); err != nil {
				return fmt.Errorf("store unread: %w", err)
			}
		}
	}
	if err := flush(); err != nil {
		return fmt.Errorf("store unread: %w", err)
	}
	// A bulk load into a fresh schema leaves the planner without statistics
	// until autovacuum's next round (up to a minute): give them now, as a
	// long-running database has them.
	if _, err := pool.Exec(ctx, "ANALYZE notifications"); err != nil {
		return fmt.Errorf("store unread: analyze: %w", err)
	}
	return nil
}
