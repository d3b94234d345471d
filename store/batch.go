package store

import (
	"context"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
)

// A batcher combines the requests of concurrent callers into one statement: a
// connect storm or a mass reconnect would otherwise send one query per client
// and queue for pool connections, while Postgres and the driver spend their
// time on per-statement overhead rather than rows. A caller queues its request;
// whoever holds one of the batcher's slots runs everything queued (up to max)
// in one statement and completes each request. A lone caller finds a free slot
// and runs its own request at once, so batching adds no wait when it is quiet.
type batcher[R batchable] struct {
	slots   chan struct{}
	pending chan R
	max     int
	// run sets the results of every request of batch. It is detached from the
	// callers' contexts: one caller giving up must not fail the others.
	run func(batch []R)
}

// batchable is a request of a batcher: a pointer to a struct that embeds
// batchItem.
type batchable interface{ completed() chan struct{} }

// batchItem is what every batched request embeds: done is closed once the
// request's results are set.
type batchItem struct{ done chan struct{} }

func newBatchItem() batchItem { return batchItem{done: make(chan struct{})} }

func (b *batchItem) completed() chan struct{} { return b.done }

// newBatcher runs at most slots statements at once, each of at most max
// requests.
func newBatcher[R batchable](slots, max int, run func(batch []R)) *batcher[R] {
	return &batcher[R]{slots: make(chan struct{}, slots), pending: make(chan R, 16*max), max: max, run: run}
}

// do queues r and returns nil once its results are set, or ctx's error when
// ctx ends first (r stays queued or in flight; whoever runs it drops the
// results).
func (b *batcher[R]) do(ctx context.Context, r R) error {
	select {
	case b.pending <- r:
	case <-ctx.Done():
		return ctx.Err()
	}
	for {
		select {
		case <-r.completed():
			return nil
		case b.slots <- struct{}{}:
			batch := b.take()
			if len(batch) > 0 {
				b.run(batch)
				for _, q := range batch {
					close(q.completed())
				}
			}
			<-b.slots
			if len(batch) == 0 {
				// r is in a batch that another caller is running.
				select {
				case <-r.completed():
				case <-ctx.Done():
				}
			}
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// take removes up to max queued requests.
func (b *batcher[R]) take() []R {
	var batch []R
	for len(batch) < b.max {
		select {
		case r := <-b.pending:
			batch = append(batch, r)
		default:
			return batch
		}
	}
	return batch
}

// genericPlanSQL, sent in the same implicit transaction as a batched statement, makes Postgres
// run the statement's cached generic plan. Left to choose, it plans every execution anew: the
// generic plan's estimate assumes ten array elements, which looks dearer than a custom plan for
// one or a few, so a lone call paid its planning every time. A lone count took 550 µs against
// 230 µs with the generic plan (BenchmarkCountElsewhere); a lone replay planned for 0.26-0.7 ms
// against 0.02 ms, to execute in 0.1 ms (EXPLAIN ANALYZE). Both statements join per array
// element through LATERAL index probes, so the element count the plan assumes does not change
// its shape; BenchmarkReplay1000 ran no slower on the generic plan.
const genericPlanSQL = `SELECT set_config('plan_cache_mode', 'force_generic_plan', true)`

// queryGeneric runs the batched statement sql with args on its generic plan (genericPlanSQL),
// handing its rows to scan, in one round trip.
func queryGeneric(ctx context.Context, pool *pgxpool.Pool, scan func(pgx.Rows) error, sql string, args ...any) error {
	b := &pgx.Batch{}
	b.Queue(genericPlanSQL)
	b.Queue(sql, args...).Query(scan)
	return pool.SendBatch(ctx, b).Close()
}
