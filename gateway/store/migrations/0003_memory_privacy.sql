-- Summaries are retried after a failed text-model call without losing the conversation.
ALTER TABLE conversations ADD COLUMN summary_attempts INTEGER NOT NULL DEFAULT 0;
ALTER TABLE conversations ADD COLUMN summary_next_try_at TEXT;
CREATE INDEX conversations_to_summarize ON conversations(summarized_at, ended_at);

-- Usage carries the model, so a price table can turn it into money.
ALTER TABLE usage ADD COLUMN model TEXT;

-- LGPD: a person's request to erase their data, recorded for the admin.
CREATE TABLE privacy_requests (
    id INTEGER PRIMARY KEY,
    person_id INTEGER REFERENCES people(id) ON DELETE SET NULL,
    e164 TEXT NOT NULL,
    channel TEXT NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('erase', 'export')),
    text TEXT NOT NULL,
    requested_at TEXT NOT NULL,
    handled_at TEXT
);
