-- The schema as of SQLite migration 0009, in PostgreSQL: it has no past to replay, so it
-- starts here; from 0010 on every migration is written in both dialects with one number.
-- Timestamps stay ISO-8601 text made in Python, so they compare alike in both engines.
-- Identity columns never reuse an id, as SQLite's AUTOINCREMENT does not.

CREATE TABLE people (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    e164 text NOT NULL UNIQUE,
    name text,
    summary text,
    summary_updated_at text,
    first_seen text NOT NULL,
    last_seen text NOT NULL
);

CREATE TABLE conversations (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    person_id bigint NOT NULL REFERENCES people(id) ON DELETE CASCADE,
    channel text NOT NULL CHECK (channel IN ('call', 'whatsapp')),
    external_id text,
    started_at text NOT NULL,
    last_activity_at text NOT NULL,
    ended_at text,
    summarized_at text,
    summary_attempts integer NOT NULL DEFAULT 0,
    summary_next_try_at text,
    greeting_latency_ms double precision
);
CREATE INDEX conversations_person ON conversations(person_id, started_at);
CREATE INDEX conversations_to_summarize ON conversations(summarized_at, ended_at);

CREATE TABLE turns (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    conversation_id bigint NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
    role text NOT NULL CHECK (role IN ('user', 'assistant', 'dtmf', 'system')),
    text text NOT NULL,
    audio_ms integer,
    at text NOT NULL,
    response_latency_ms double precision,
    upstream_first_audio_ms double precision
);
CREATE INDEX turns_conversation ON turns(conversation_id, id);

CREATE TABLE inbound_messages (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    message_sid text NOT NULL UNIQUE,
    person_id bigint NOT NULL REFERENCES people(id) ON DELETE CASCADE,
    payload text NOT NULL,
    status text NOT NULL DEFAULT 'pending'
        CHECK (status IN ('pending', 'processing', 'done', 'failed')),
    attempts integer NOT NULL DEFAULT 0,
    next_try_at text NOT NULL,
    error text,
    received_at text NOT NULL,
    updated_at text NOT NULL,
    merged_into text REFERENCES inbound_messages(message_sid) ON DELETE CASCADE,
    claimed_by text
);
CREATE INDEX inbound_ready ON inbound_messages(status, next_try_at);
CREATE INDEX inbound_person ON inbound_messages(person_id, status);
CREATE INDEX inbound_merged ON inbound_messages(merged_into) WHERE merged_into IS NOT NULL;

CREATE TABLE media (
    id text PRIMARY KEY,
    person_id bigint REFERENCES people(id) ON DELETE CASCADE,
    content_type text NOT NULL,
    data bytea NOT NULL,
    created_at text NOT NULL,
    expires_at text NOT NULL
);
CREATE INDEX media_expiry ON media(expires_at);

CREATE TABLE usage (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    person_id bigint NOT NULL REFERENCES people(id) ON DELETE CASCADE,
    conversation_id bigint REFERENCES conversations(id) ON DELETE CASCADE,
    response_id text,
    input_tokens integer NOT NULL DEFAULT 0,
    output_tokens integer NOT NULL DEFAULT 0,
    input_audio_tokens integer NOT NULL DEFAULT 0,
    output_audio_tokens integer NOT NULL DEFAULT 0,
    audio_seconds double precision NOT NULL DEFAULT 0,
    at text NOT NULL,
    model text
);
CREATE INDEX usage_person ON usage(person_id, at);

CREATE TABLE whatsapp_replies (
    message_sid text PRIMARY KEY REFERENCES inbound_messages(message_sid) ON DELETE CASCADE,
    person_id bigint NOT NULL REFERENCES people(id) ON DELETE CASCADE,
    conversation_id bigint REFERENCES conversations(id) ON DELETE SET NULL,
    kind text NOT NULL CHECK (kind IN ('model', 'fixed')),
    user_text text,
    user_audio_ms integer,
    text text NOT NULL,
    audio_ms integer,
    media_ids text NOT NULL DEFAULT '[]',
    response_id text,
    created_at text NOT NULL
);

CREATE TABLE outbound_messages (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    message_sid text UNIQUE,
    inbound_sid text REFERENCES inbound_messages(message_sid) ON DELETE CASCADE,
    part integer,
    kind text CHECK (kind IN ('text', 'voice')),
    status text NOT NULL,
    status_rank integer NOT NULL DEFAULT 0,
    error_code integer,
    error_message text,
    created_at text NOT NULL,
    updated_at text NOT NULL,
    UNIQUE (inbound_sid, part)
);

CREATE TABLE privacy_requests (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    person_id bigint REFERENCES people(id) ON DELETE SET NULL,
    e164 text NOT NULL,
    channel text NOT NULL,
    kind text NOT NULL CHECK (kind IN ('erase', 'export')),
    text text NOT NULL,
    requested_at text NOT NULL,
    handled_at text
);

CREATE TABLE leads (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    person_id bigint NOT NULL REFERENCES people(id) ON DELETE CASCADE,
    conversation_id bigint REFERENCES conversations(id) ON DELETE SET NULL,
    channel text NOT NULL CHECK (channel IN ('call', 'whatsapp')),
    name text NOT NULL,
    interest text NOT NULL CHECK (interest IN ('advertising', 'digital_marketing', 'ai',
        'real_estate', 'agribusiness', 'other')),
    company text,
    city text,
    budget text,
    timeline text,
    notes text,
    created_at text NOT NULL,
    updated_at text NOT NULL
);
CREATE UNIQUE INDEX leads_conversation ON leads(conversation_id)
    WHERE conversation_id IS NOT NULL;
CREATE INDEX leads_person ON leads(person_id);

CREATE TABLE crm_outbox (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    lead_id bigint NOT NULL REFERENCES leads(id) ON DELETE CASCADE,
    body text NOT NULL,
    attempts integer NOT NULL DEFAULT 0,
    next_attempt_at text,
    delivered_at text,
    last_error text,
    created_at text NOT NULL
);
CREATE INDEX crm_outbox_lead ON crm_outbox(lead_id, id);
CREATE INDEX crm_outbox_due ON crm_outbox(next_attempt_at) WHERE delivered_at IS NULL;

CREATE TABLE instances (
    id text PRIMARY KEY,
    started_at text NOT NULL,
    seen_at text NOT NULL
);
