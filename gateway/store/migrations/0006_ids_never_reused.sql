-- Ids are never reused: an erased person's (or conversation's, or turn's) id must never name
-- someone else, since warm sessions, live calls and freshness marks hold ids in memory.
-- INTEGER PRIMARY KEY alone hands out MAX(id) + 1, so erasing the newest row freed its id;
-- AUTOINCREMENT keeps the highest id ever used in sqlite_sequence. SQLite cannot add it to a
-- table in place: each table is rebuilt with its rows and ids kept (foreign keys are off
-- during migrations, and the migration proves every reference before it commits).

CREATE TABLE people_new (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    e164 TEXT NOT NULL UNIQUE,
    name TEXT,
    summary TEXT,
    summary_updated_at TEXT,
    first_seen TEXT NOT NULL,
    last_seen TEXT NOT NULL
);
INSERT INTO people_new (id, e164, name, summary, summary_updated_at, first_seen, last_seen)
    SELECT id, e164, name, summary, summary_updated_at, first_seen, last_seen FROM people;
DROP TABLE people;
ALTER TABLE people_new RENAME TO people;

CREATE TABLE conversations_new (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    person_id INTEGER NOT NULL REFERENCES people(id) ON DELETE CASCADE,
    channel TEXT NOT NULL CHECK (channel IN ('call', 'whatsapp')),
    external_id TEXT,
    started_at TEXT NOT NULL,
    last_activity_at TEXT NOT NULL,
    ended_at TEXT,
    summarized_at TEXT,
    summary_attempts INTEGER NOT NULL DEFAULT 0,
    summary_next_try_at TEXT,
    greeting_latency_ms REAL
);
INSERT INTO conversations_new (id, person_id, channel, external_id, started_at,
        last_activity_at, ended_at, summarized_at, summary_attempts, summary_next_try_at,
        greeting_latency_ms)
    SELECT id, person_id, channel, external_id, started_at, last_activity_at, ended_at,
        summarized_at, summary_attempts, summary_next_try_at, greeting_latency_ms
    FROM conversations;
DROP TABLE conversations;
ALTER TABLE conversations_new RENAME TO conversations;
CREATE INDEX conversations_person ON conversations(person_id, started_at);
CREATE INDEX conversations_to_summarize ON conversations(summarized_at, ended_at);

CREATE TABLE turns_new (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    conversation_id INTEGER NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
    role TEXT NOT NULL CHECK (role IN ('user', 'assistant', 'dtmf', 'system')),
    text TEXT NOT NULL,
    audio_ms INTEGER,
    at TEXT NOT NULL,
    response_latency_ms REAL,
    upstream_first_audio_ms REAL
);
INSERT INTO turns_new (id, conversation_id, role, text, audio_ms, at, response_latency_ms,
        upstream_first_audio_ms)
    SELECT id, conversation_id, role, text, audio_ms, at, response_latency_ms,
        upstream_first_audio_ms FROM turns;
DROP TABLE turns;
ALTER TABLE turns_new RENAME TO turns;
CREATE INDEX turns_conversation ON turns(conversation_id, id);
