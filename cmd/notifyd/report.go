package main

import (
	"context"
	"encoding/csv"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"math"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/notifyd/notifyd/store"
)

// runReport is `notifyd report [--since 24h] [--until RFC3339] [--format table|csv|json]
// [--top 20]`: the delivery report from the reporting views, for the database of DATABASE_URL.
func runReport(ctx context.Context, args []string, getenv func(string) string, w io.Writer) error {
	fl := flag.NewFlagSet("report", flag.ContinueOnError)
	fl.SetOutput(w)
	since := fl.Duration("since", 24*time.Hour, "report on this much time before --until")
	untilStr := fl.String("until", "", "end of the window, RFC 3339 (default now)")
	format := fl.String("format", "table", "table, csv or json")
	top := fl.Int("top", 20, "users listed in unread_aging")
	dbURL := fl.String("database", "", "Postgres URL (default $DATABASE_URL)")
	if err := fl.Parse(args); err != nil {
		return err
	}
	if fl.NArg() > 0 {
		return fmt.Errorf("report: unexpected argument %q", fl.Arg(0))
	}
	if *since <= 0 {
		return errors.New("report: --since must be a positive duration such as 24h")
	}
	switch *format {
	case "table", "csv", "json":
	default:
		return fmt.Errorf("report: --format %q: want table, csv or json", *format)
	}
	until := time.Now()
	if *untilStr != "" {
		t, err := time.Parse(time.RFC3339, *untilStr)
		if err != nil {
			return fmt.Errorf("report: --until: %w", err)
		}
		until = t
	}
	url := *dbURL
	if url == "" {
		url = getenv("DATABASE_URL")
	}
	if url == "" {
		url = defaults.DatabaseURL
	}
	st, err := store.Open(ctx, url, store.Options{MaxConns: 2})
	if err != nil {
		return fmt.Errorf("report: %w", err)
	}
	defer st.Close()
	rep, err := st.Report(ctx, until.Add(-*since), until, *top)
	if err != nil {
		return err
	}
	return writeReport(w, rep, *format)
}

// writeReport prints rep as text tables, CSV (one block per section, each row led by the
// section's name) or one JSON document.
func writeReport(w io.Writer, rep *store.Report, format string) error {
	switch format {
	case "json":
		type section struct {
			Name    string           `json:"name"`
			Title   string           `json:"title"`
			Columns []string         `json:"columns"`
			Rows    []map[string]any `json:"rows"`
		}
		out := struct {
			Since    string    `json:"since"`
			Until    string    `json:"until"`
			Sections []section `json:"sections"`
		}{Since: jsonTime(rep.Since), Until: jsonTime(rep.Until)}
		for _, s := range rep.Sections {
			sec := section{Name: s.Name, Title: s.Title, Columns: s.Columns, Rows: []map[string]any{}}
			for _, row := range s.Rows {
				obj := make(map[string]any, len(row))
				for i, v := range row {
					obj[s.Columns[i]] = jsonValue(v)
				}
				sec.Rows = append(sec.Rows, obj)
			}
			out.Sections = append(out.Sections, sec)
		}
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		return enc.Encode(out)
	case "csv":
		cw := csv.NewWriter(w)
		for i, s := range rep.Sections {
			if i > 0 {
				cw.Write(nil)
			}
			_ = cw.Write(append([]string{"section"}, s.Columns...))
			for _, row := range s.Rows {
				rec := []string{s.Name}
				for _, v := range row {
					rec = append(rec, cell(v, false))
				}
				_ = cw.Write(rec)
			}
		}
		cw.Flush()
		return cw.Error()
	default:
		fmt.Fprintf(w, "notifyd delivery report, %s to %s\n", tableTime(rep.Since), tableTime(rep.Until))
		for _, s := range rep.Sections {
			fmt.Fprintf(w, "\n== %s (%s)\n", s.Title, s.Name)
			if len(s.Rows) == 0 {
				fmt.Fprintln(w, "(none)")
				continue
			}
			tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
			fmt.Fprintln(tw, strings.Join(s.Columns, "\t")+"\t")
			for _, row := range s.Rows {
				cells := make([]string, len(row))
				for i, v := range row {
					cells[i] = cell(v, true)
				}
				fmt.Fprintln(tw, strings.Join(cells, "\t")+"\t")
			}
			if err := tw.Flush(); err != nil {
				return err
			}
		}
		return nil
	}
}

func tableTime(t time.Time) string { return t.UTC().Format("2006-01-02 15:04Z") }

func jsonTime(t time.Time) string { return t.UTC().Format(time.RFC3339Nano) }

// cell formats a value for a table (short) or CSV (exact).
func cell(v any, short bool) string {
	switch v := v.(type) {
	case nil:
		if short {
			return "-"
		}
		return ""
	case time.Time:
		if short {
			return tableTime(v)
		}
		return jsonTime(v)
	case float64:
		if math.IsNaN(v) {
			return ""
		}
		if short {
			return strconv.FormatFloat(v, 'f', 1, 64)
		}
		return strconv.FormatFloat(v, 'f', -1, 64)
	case string:
		return v
	default:
		return fmt.Sprint(v)
	}
}

func jsonValue(v any) any {
	switch v := v.(type) {
	case time.Time:
		return jsonTime(v)
	case float64:
		if math.IsNaN(v) || math.IsInf(v, 0) {
			return nil
		}
	}
	return v
}
