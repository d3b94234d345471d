package main

import (
	"fmt"
	"io"
	"os"
	"runtime"
	"strings"
	"time"
)

// Check is one judged number of a scenario.
type Check struct {
	What     string `json:"what"`
	Target   string `json:"target"`
	Measured string `json:"measured"`
	Pass     bool   `json:"pass"`
}

// checks judges a result against its scenario's targets and the
// correctness every run must show.
func checks(r *Result) []Check {
	var cs []Check
	add := func(what, target, measured string, pass bool) {
		cs = append(cs, Check{What: what, Target: target, Measured: measured, Pass: pass})
	}
	tg := r.Scenario.Targets
	if r.Error != "" {
		add("run", "completes", r.Error, false)
	}
	if c := r.Connect; c != nil {
		pass := c.Errors == 0 && c.ReplayBad == 0
		if tg.MinConnectRate > 0 {
			add("connect rate (each replay checked)", fmt.Sprintf(">= %s/s, 0 errors", num(tg.MinConnectRate)),
				fmt.Sprintf("%s/s (%s in %.2fs), %d errors, %d bad replays, p99 %.0f ms", num(c.PerSecond), num(float64(c.Sessions)),
					c.Seconds, c.Errors, c.ReplayBad, c.Latency.P99), pass && c.PerSecond >= tg.MinConnectRate)
		} else {
			add("sessions connected", "all, replay exact", fmt.Sprintf("%s of %s in %.1fs (%s/s), %d bad replays",
				num(float64(c.Sessions-c.Errors)), num(float64(c.Sessions)), c.Seconds, num(c.PerSecond), c.ReplayBad), pass)
		}
		if p := c.CPU; p != nil {
			add("CPU while connecting, per session", "reported", fmt.Sprintf("machine %.0f µs (%.0f%% of a core): server %.0f µs, Postgres %.0f µs (the machine's Postgres %.0f µs), tool %.0f µs",
				p.MachineUS, p.Machine, p.ServerUS, p.PostgresUS, p.PostgresAllUS, p.BenchUS), true)
		}
	}
	if m := r.Memory; m != nil {
		target, pass := "reported", true
		if tg.MaxRSSPerSession > 0 {
			target = "<= " + kib(tg.MaxRSSPerSession)
			pass = m.PerSession <= tg.MaxRSSPerSession
		}
		measured := fmt.Sprintf("%s settled (%s right after connecting; %s MiB total)",
			kib(m.PerSession), kib(m.PerSessionLoaded), num(float64(m.SettledRSS)/(1<<20)))
		if n := float64(r.Connect.Sessions - r.Connect.Errors); m.Goroutines > 0 && n > 0 {
			measured += fmt.Sprintf("; per session: %.2f goroutines, stacks %s, heap in use %s", m.Goroutines/n,
				kib((m.StackInuse-m.BaseStackInuse)/n), kib((m.HeapInuse-m.BaseHeapInuse)/n))
		}
		add("server RSS per session", target, measured, pass)
	}
	if r.IdleCPU != nil {
		target, pass := "reported", true
		if tg.MaxIdleCPU > 0 {
			target = fmt.Sprintf("<= %g%% of a core", tg.MaxIdleCPU)
			pass = *r.IdleCPU <= tg.MaxIdleCPU
		}
		add(fmt.Sprintf("idle server CPU (%s pings)", r.Scenario.PingInterval), target, fmt.Sprintf("%.2f%%", *r.IdleCPU), pass)
	}
	if p := r.Publish; p != nil {
		what := fmt.Sprintf("delivered/s (%s", p.Mode)
		switch p.Mode {
		case publishSingle:
			what += fmt.Sprintf(", %d publishers)", p.Publishers)
		default:
			what += fmt.Sprintf(" of %d, %d publishers)", p.Batch, p.Publishers)
		}
		target, pass := "reported", true
		if tg.MinDeliveredPerSec > 0 {
			target = ">= " + num(tg.MinDeliveredPerSec)
			pass = p.DeliveredPerSec >= tg.MinDeliveredPerSec
		}
		readBack := ""
		if p.ReadBack >= 0 {
			readBack = fmt.Sprintf(", %.0f%% read back from Postgres", 100*p.ReadBack)
		}
		add(what, target, fmt.Sprintf("%s (%s committed/s, server CPU %.0f%%%s)", num(p.DeliveredPerSec), num(p.PublishedPerSec), p.ServerCPU, readBack), pass)
		if c := p.CPU; c != nil {
			grouped := ""
			if p.CallsPerTx > 0 {
				grouped = fmt.Sprintf("; %.1f requests per transaction", p.CallsPerTx)
			}
			add("CPU while publishing, per committed notification", "reported",
				fmt.Sprintf("machine %.0f µs (%.0f%% of a core): server %.0f µs, Postgres %.0f µs (the machine's Postgres %.0f µs), tool %.0f µs%s",
					c.MachineUS, c.Machine, c.ServerUS, c.PostgresUS, c.PostgresAllUS, c.BenchUS, grouped), true)
		}
		if g := p.Groups; g != nil {
			add("group commit in the store", "reported", g.String(), true)
		}
		target, pass = "reported", true
		if tg.MaxP99Ms > 0 {
			target = fmt.Sprintf("p99 <= %g ms", tg.MaxP99Ms)
			pass = p.Latency.P99 <= tg.MaxP99Ms
		}
		add("publish-to-receive latency", target, fmt.Sprintf("p50 %.1f / p95 %.1f / p99 %.1f / max %.1f ms",
			p.Latency.P50, p.Latency.P95, p.Latency.P99, p.Latency.Max), pass)
		add("lost (by seq), duplicated, publish errors", "0", fmt.Sprintf("%d lost of %s, %d gaps, %d dups, %d errors",
			p.Lost, num(float64(p.Expected)), p.Gaps, p.Duplicates, p.Errors),
			p.Lost == 0 && p.Gaps == 0 && p.Duplicates == 0 && p.Errors == 0 && p.Expected > 0)
	}
	if rc := r.Reconnect; rc != nil {
		target := "reported"
		pass := rc.Errors == 0 && rc.ReplayBad == 0
		if tg.MaxAllSyncedSec > 0 {
			target = fmt.Sprintf("all synced <= %gs", tg.MaxAllSyncedSec)
			pass = pass && rc.AllSynced <= tg.MaxAllSyncedSec
		}
		add(fmt.Sprintf("%s reconnect within %gs, %d unread each", num(float64(rc.Clients)), rc.Within, r.Scenario.ReconnectUnread),
			target, fmt.Sprintf("all synced at %.2fs (each p50 %.0f / p99 %.0f ms), %d errors, %d bad replays",
				rc.AllSynced, rc.Latency.P50, rc.Latency.P99, rc.Errors, rc.ReplayBad), pass)
	}
	if e := r.Evict; e != nil {
		target := "all evicted"
		pass := e.Evicted == e.Silent && e.WrongBye == 0 && e.OthersLost == 0
		if tg.MaxEvictLagMs > 0 {
			target += fmt.Sprintf(", <= %g ms after deadline", tg.MaxEvictLagMs)
			pass = pass && e.Lag.Max <= tg.MaxEvictLagMs
		}
		add("eviction of silent sessions", target, fmt.Sprintf("%d of %d evicted, lag p50 %.0f / max %.0f ms, %d live ones evicted",
			e.Evicted, e.Silent, e.Lag.P50, e.Lag.Max, e.OthersLost), pass)
	}
	if r.SweepMaxMs != nil {
		target, pass := "reported", true
		if tg.MaxSweepMs > 0 {
			target = fmt.Sprintf("< %g ms", tg.MaxSweepMs)
			pass = *r.SweepMaxMs < tg.MaxSweepMs
		}
		add("heartbeat sweep tick (server-timed, max)", target, fmt.Sprintf("%.3f ms (last %.3f ms)", *r.SweepMaxMs, *r.SweepLastMs), pass)
	}
	unexpected := 0
	var byes []string
	for _, k := range sortedKeys(r.Byes) {
		if r.Evict != nil && k == "heartbeat_timeout" {
			continue
		}
		unexpected += r.Byes[k]
		byes = append(byes, fmt.Sprintf("%s %d", k, r.Byes[k]))
	}
	if unexpected > 0 || r.ErrorMessages > 0 || r.BadMessages > 0 || r.PingErrors > 0 {
		add("unexpected byes, error messages, ping errors", "0", fmt.Sprintf("byes [%s], %d error messages, %d unparsable, %d ping errors",
			strings.Join(byes, ", "), r.ErrorMessages, r.BadMessages, r.PingErrors), false)
	}
	return cs
}

// machine describes where the numbers were taken.
func machine() string {
	model := "unknown CPU"
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for _, line := range strings.Split(string(b), "\n") {
			if v, ok := strings.CutPrefix(line, "model name"); ok {
				model = strings.TrimSpace(strings.TrimPrefix(strings.TrimSpace(v), ":"))
				break
			}
		}
	}
	mem := ""
	if b, err := os.ReadFile("/proc/meminfo"); err == nil {
		var kb int64
		if _, err := fmt.Sscanf(string(b), "MemTotal: %d kB", &kb); err == nil {
			mem = fmt.Sprintf(", %.0f GiB", float64(kb)/(1<<20))
		}
	}
	return fmt.Sprintf("%d cores (%s)%s, %s %s/%s", runtime.NumCPU(), model, mem, runtime.Version(), runtime.GOOS, runtime.GOARCH)
}

// Report is the whole output of one invocation.
type Report struct {
	Date    string    `json:"date"`
	Machine string    `json:"machine"`
	Commit  string    `json:"commit"`
	Note    string    `json:"note"`
	Results []*Result `json:"results"`
}

const reportNote = "server (own process, NOTIFY_DEV=0), notifybench and Postgres 15 on the same machine; " +
	"loopback only; each process limited to 20,000 open files; RSS and CPU read from the server's /proc."

// writeMarkdown writes the results table.
func writeMarkdown(w io.Writer, rep *Report) {
	fmt.Fprintf(w, "Measured %s on %s, commit %s. %s\n\n", rep.Date, rep.Machine, rep.Commit, rep.Note)
	fmt.Fprintln(w, "| scenario | measure | target | measured | met |")
	fmt.Fprintln(w, "|---|---|---|---|---|")
	for _, r := range rep.Results {
		title := r.Scenario.Title
		if title == "" {
			title = r.Scenario.Name
		}
		for i, c := range r.Checks {
			name := ""
			if i == 0 {
				name = "**" + r.Scenario.Name + "**: " + title
				if c := r.CPU; c != nil {
					name += fmt.Sprintf(" (CPU over the run, %% of one core: machine %.0f, server %.0f, Postgres %.0f (the machine's %.0f), tool %.0f; load at start %s)",
						c.Machine, c.Server, c.Postgres, c.PostgresAll, c.Bench, c.LoadAvg)
				}
			}
			mark := "yes"
			if !c.Pass {
				mark = "**NO**"
			}
			fmt.Fprintf(w, "| %s | %s | %s | %s | %s |\n", name, c.What, c.Target, c.Measured, mark)
		}
	}
}

// num formats a number with thousands separators.
func num(v float64) string {
	s := fmt.Sprintf("%.0f", v)
	neg := strings.HasPrefix(s, "-")
	s = strings.TrimPrefix(s, "-")
	var b strings.Builder
	for i, c := range s {
		if i > 0 && (len(s)-i)%3 == 0 {
			b.WriteByte(',')
		}
		b.WriteRune(c)
	}
	if neg {
		return "-" + b.String()
	}
	return b.String()
}

func kib(bytes float64) string { return fmt.Sprintf("%.1f KiB", bytes/1024) }

func today() string { return time.Now().UTC().Format("2006-01-02 15:04 UTC") }
