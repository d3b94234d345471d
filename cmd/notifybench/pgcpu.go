package main

import (
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
)

// Postgres CPU is counted two ways. The machine's Postgres cluster may serve
// other clients than this run (other test suites on a shared machine), so the
// per-unit figure counts only the backends that serve the measured processes:
// those whose process title names, as their client's port, a TCP connection
// to Postgres that the server or the tool holds (Postgres titles a backend
// "postgres: ... user db 127.0.0.1(port) state"). The cluster's total (every
// process named postgres, with the WAL writer, checkpointer and what other
// clients cost) is kept beside it.

// pgPort is the port Postgres listens on (the client side of a connection to
// it is what names a backend).
const pgPort = 5432

var backendTitle = regexp.MustCompile(`\((\d+)\) `)

// ownBackends returns the pids of the Postgres backends whose clients are
// connections held by the processes pids.
func ownBackends(pids ...int) []int {
	ports := map[int]bool{}
	for _, pid := range pids {
		if pid <= 0 {
			continue
		}
		for port := range clientPorts(pid) {
			ports[port] = true
		}
	}
	if len(ports) == 0 {
		return nil
	}
	var out []int
	for _, pid := range postgresPIDs() {
		title, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
		if err != nil {
			continue
		}
		m := backendTitle.FindSubmatch(title)
		if m == nil {
			continue
		}
		if port, err := strconv.Atoi(string(m[1])); err == nil && ports[port] {
			out = append(out, pid)
		}
	}
	return out
}

// postgresPIDs returns the pids of the machine's postgres processes.
func postgresPIDs() []int {
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return nil
	}
	var out []int
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		comm, err := os.ReadFile(fmt.Sprintf("/proc/%d/comm", pid))
		if err == nil && strings.TrimSpace(string(comm)) == "postgres" {
			out = append(out, pid)
		}
	}
	return out
}

// clientPorts returns the local ports of pid's TCP connections to Postgres.
func clientPorts(pid int) map[int]bool {
	inodes := map[string]bool{}
	fds, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	if err != nil {
		return nil
	}
	for _, fd := range fds {
		link, err := os.Readlink(filepath.Join(fmt.Sprintf("/proc/%d/fd", pid), fd.Name()))
		if err == nil && strings.HasPrefix(link, "socket:[") {
			inodes[strings.TrimSuffix(strings.TrimPrefix(link, "socket:["), "]")] = true
		}
	}
	ports := map[int]bool{}
	for _, table := range []string{"tcp", "tcp6"} {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/net/%s", pid, table))
		if err != nil {
			continue
		}
		for port := range parseClientPorts(string(b), inodes, pgPort) {
			ports[port] = true
		}
	}
	return ports
}

// parseClientPorts reads a /proc/net/tcp table: the local ports of the
// sockets in inodes whose remote port is remote.
func parseClientPorts(table string, inodes map[string]bool, remote int) map[int]bool {
	ports := map[int]bool{}
	for _, line := range strings.Split(table, "\n") {
		f := strings.Fields(line)
		if len(f) < 10 || !inodes[f[9]] {
			continue
		}
		_, lport, ok1 := strings.Cut(f[1], ":")
		_, rport, ok2 := strings.Cut(f[2], ":")
		if !ok1 || !ok2 {
			continue
		}
		l, err1 := strconv.ParseInt(lport, 16, 32)
		r, err2 := strconv.ParseInt(rport, 16, 32)
		if err1 == nil && err2 == nil && int(r) == remote {
			ports[int(l)] = true
		}
	}
	return ports
}

// backendTicks is the CPU (clock ticks) of each backend in pids.
func backendTicks(pids []int) map[int]int64 {
	out := make(map[int]int64, len(pids))
	for _, pid := range pids {
		if s, err := readProc(pid); err == nil {
			out[pid] = s.CPUTick
		}
	}
	return out
}

// ticksSince sums what the backends of now spent since before (a backend
// not in before started meanwhile: all of its CPU counts).
func ticksSince(before, now map[int]int64) int64 {
	var sum int64
	for pid, t := range now {
		sum += t - before[pid]
	}
	return sum
}
