-- Learned transport order (GET/POST /v1/negotiate): which transports recently worked, per client
-- network (/24 of IPv4, /48 of IPv6) and browser family. Clients report each transport they tried;
-- the server answers the order to try, transports that last worked first.
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

---- create above / drop below ----

DROP TABLE transport_outcomes;
