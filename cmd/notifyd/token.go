package main

import (
	"flag"
	"fmt"
	"io"
	"os"
	"time"

	"github.com/notifyd/notifyd/handlers"
)

// runToken prints a client token signed with NOTIFY_JWT_SECRET.
func runToken(args []string, w io.Writer) error {
	fl := flag.NewFlagSet("token", flag.ContinueOnError)
	user := fl.String("user", "", "user id (the token's sub)")
	device := fl.String("device", "", "device name (optional)")
	ttl := fl.Duration("ttl", 24*time.Hour, "lifetime")
	if err := fl.Parse(args); err != nil {
		return err
	}
	secret := os.Getenv("NOTIFY_JWT_SECRET")
	if secret == "" {
		return fmt.Errorf("NOTIFY_JWT_SECRET is not set")
	}
	if !handlers.ValidUser(*user) {
		return fmt.Errorf("-user must be 1-128 characters of [A-Za-z0-9._:@-]")
	}
	if maxTTL, err := tokenTTLCap(os.Getenv("NOTIFY_MAX_TOKEN_TTL")); err != nil {
		return err
	} else if *ttl > maxTTL {
		return fmt.Errorf("-ttl %s is longer than NOTIFY_MAX_TOKEN_TTL (%s): the server would refuse the token", *ttl, maxTTL)
	}
	tok, err := handlers.NewAuth(secret, "", nil).NewToken(*user, *device, *ttl)
	if err != nil {
		return err
	}
	_, err = fmt.Fprintln(w, tok)
	return err
}

// tokenTTLCap reads NOTIFY_MAX_TOKEN_TTL as LoadConfig does.
func tokenTTLCap(v string) (time.Duration, error) {
	if v == "" {
		return defaults.MaxTokenTTL, nil
	}
	d, err := time.ParseDuration(v)
	if err != nil || d <= 0 {
		return 0, fmt.Errorf("NOTIFY_MAX_TOKEN_TTL=%q: want a positive Go duration such as 24h", v)
	}
	return d, nil
}
