-- Several gateway instances on one store (issue 14). The queue orders by an explicit id,
-- not SQLite's rowid (PostgreSQL has none), and a claim names the instance that holds it,
-- so a restarted instance frees only its own claims and a dead one's are taken over once
-- its heartbeat stops. The table is rebuilt with its rows and ids kept (ids = old rowids).

CREATE TABLE inbound_messages_new (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    message_sid TEXT NOT NULL UNIQUE,
    person_id INTEGER NOT NULL REFERENCES people(id) ON DELETE CASCADE,
    payload TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'pending'
        CHECK (status IN ('pending', 'processing', 'done', 'failed')),
    attempts INTEGER NOT NULL DEFAULT 0,
    next_try_at TEXT NOT NULL,
    error TEXT,
    received_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    merged_into TEXT REFERENCES inbound_messages(message_sid) ON DELETE CASCADE,
    claimed_by TEXT
);
INSERT INTO inbound_messages_new (id, message_sid, person_id, payload, status, attempts,
        next_try_at, error, received_at, updated_at, merged_into)
    SELECT rowid, message_sid, person_id, payload, status, attempts, next_try_at, error,
        received_at, updated_at, merged_into FROM inbound_messages;
DROP TABLE inbound_messages;
ALTER TABLE inbound_messages_new RENAME TO inbound_messages;
CREATE INDEX inbound_ready ON inbound_messages(status, next_try_at);
CREATE INDEX inbound_person ON inbound_messages(person_id, status);
CREATE INDEX inbound_merged ON inbound_messages(merged_into) WHERE merged_into IS NOT NULL;

-- Every running instance, and when it last said it was alive.
CREATE TABLE instances (
    id TEXT PRIMARY KEY,
    started_at TEXT NOT NULL,
    seen_at TEXT NOT NULL
);
