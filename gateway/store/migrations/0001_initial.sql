-- People are keyed by their E.164 number; calls and WhatsApp share the row.
CREATE TABLE people (
    id INTEGER PRIMARY KEY,
    e164 TEXT NOT NULL UNIQUE,
    name TEXT,
    summary TEXT,
    summary_updated_at TEXT,
    first_seen TEXT NOT NULL,
    last_seen TEXT NOT NULL
);

CREATE TABLE conversations (
    id INTEGER PRIMARY KEY,
    person_id INTEGER NOT NULL REFERENCES people(id) ON DELETE CASCADE,
    channel TEXT NOT NULL CHECK (channel IN ('call', 'whatsapp')),
    external_id TEXT,
    started_at TEXT NOT NULL,
    last_activity_at TEXT NOT NULL,
    ended_at TEXT,
    summarized_at TEXT
);
CREATE INDEX conversations_person ON conversations(person_id, started_at);

CREATE TABLE turns (
    id INTEGER PRIMARY KEY,
    conversation_id INTEGER NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
    role TEXT NOT NULL CHECK (role IN ('user', 'assistant', 'dtmf', 'system')),
    text TEXT NOT NULL,
    audio_ms INTEGER,
    at TEXT NOT NULL,
    response_latency_ms REAL,
    upstream_first_audio_ms REAL
);
CREATE INDEX turns_conversation ON turns(conversation_id, id);

-- The durable WhatsApp queue: a row exists before Twilio gets its 200.
CREATE TABLE inbound_messages (
    message_sid TEXT PRIMARY KEY,
    person_id INTEGER NOT NULL REFERENCES people(id) ON DELETE CASCADE,
    payload TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'pending'
        CHECK (status IN ('pending', 'processing', 'done', 'failed')),
    attempts INTEGER NOT NULL DEFAULT 0,
    next_try_at TEXT NOT NULL,
    error TEXT,
    received_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
CREATE INDEX inbound_ready ON inbound_messages(status, next_try_at);

CREATE TABLE media (
    id TEXT PRIMARY KEY,
    person_id INTEGER REFERENCES people(id) ON DELETE CASCADE,
    content_type TEXT NOT NULL,
    data BLOB NOT NULL,
    created_at TEXT NOT NULL,
    expires_at TEXT NOT NULL
);
CREATE INDEX media_expiry ON media(expires_at);

CREATE TABLE usage (
    id INTEGER PRIMARY KEY,
    person_id INTEGER NOT NULL REFERENCES people(id) ON DELETE CASCADE,
    conversation_id INTEGER REFERENCES conversations(id) ON DELETE CASCADE,
    response_id TEXT,
    input_tokens INTEGER NOT NULL DEFAULT 0,
    output_tokens INTEGER NOT NULL DEFAULT 0,
    input_audio_tokens INTEGER NOT NULL DEFAULT 0,
    output_audio_tokens INTEGER NOT NULL DEFAULT 0,
    audio_seconds REAL NOT NULL DEFAULT 0,
    at TEXT NOT NULL
);
CREATE INDEX usage_person ON usage(person_id, at);
