-- Learned transport order, counted by user (GET/POST /v1/negotiate). One row per (network, browser
-- family, transport, user, source): source 'server' is a session of that user the server saw reach
-- hello and deliver (the client acknowledged a notification on it), source 'client' is the user's
-- latest report of that transport. A user counts once however often they report, and a user the
-- server saw succeed counts as a success whatever they report. transport_outcomes counted reports,
-- which one user could repeat to rewrite a network's order; its counts cannot be split by user.
CREATE TABLE transport_observations (
    network   cidr NOT NULL,
    browser   text NOT NULL,
    transport text NOT NULL CHECK (transport IN ('websocket', 'sse', 'longpoll')),
    user_id   text NOT NULL,
    source    text NOT NULL CHECK (source IN ('server', 'client')),
    ok        boolean NOT NULL,
    reason    text,
    at        timestamptz NOT NULL,
    PRIMARY KEY (network, browser, transport, user_id, source)
);
CREATE INDEX transport_observations_at ON transport_observations (at);
DROP TABLE transport_outcomes;

---- create above / drop below ----

DROP TABLE transport_observations;
CREATE TABLE transport_outcomes (
    network         cidr NOT NULL,
    browser         text NOT NULL,
    transport       text NOT NULL CHECK (transport IN ('websocket', 'sse', 'longpoll')),
    successes       bigint NOT NULL DEFAULT 0,
    failures        bigint NOT NULL DEFAULT 0,
    last_success_at timestamptz,
    last_failure_at timestamptz,
    last_reason     text,
    PRIMARY KEY (network, browser, transport)
);
