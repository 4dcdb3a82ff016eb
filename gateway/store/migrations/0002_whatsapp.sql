-- WhatsApp replies and the messages sent for them.

-- A reply, saved once it is known (the model's, or a fixed message), so a retry or a restart
-- resends it instead of asking the model again.
CREATE TABLE whatsapp_replies (
    message_sid TEXT PRIMARY KEY REFERENCES inbound_messages(message_sid) ON DELETE CASCADE,
    person_id INTEGER NOT NULL REFERENCES people(id) ON DELETE CASCADE,
    conversation_id INTEGER REFERENCES conversations(id) ON DELETE SET NULL,
    kind TEXT NOT NULL CHECK (kind IN ('model', 'fixed')),
    user_text TEXT,
    user_audio_ms INTEGER,
    text TEXT NOT NULL,
    audio_ms INTEGER,
    media_ids TEXT NOT NULL DEFAULT '[]',
    response_id TEXT,
    created_at TEXT NOT NULL
);

-- Both sides of a model reply become turns in the same statement as the reply row: a crash
-- can never leave turns without their reply, which a retry would then write a second time.
CREATE TRIGGER whatsapp_reply_turns AFTER INSERT ON whatsapp_replies
WHEN NEW.conversation_id IS NOT NULL
BEGIN
    INSERT INTO turns (conversation_id, role, text, audio_ms, at) VALUES
        (NEW.conversation_id, 'user', COALESCE(NEW.user_text, ''), NEW.user_audio_ms,
         NEW.created_at),
        (NEW.conversation_id, 'assistant', NEW.text, NEW.audio_ms, NEW.created_at);
    UPDATE conversations SET last_activity_at = NEW.created_at WHERE id = NEW.conversation_id;
END;

-- Every message we asked Twilio to send, and what its status callbacks said. `message_sid` is
-- NULL when Twilio refused the create itself (e.g. 63016 outside the 24-hour window).
-- A status callback may beat the create's answer: then the row starts with the SID only.
CREATE TABLE outbound_messages (
    id INTEGER PRIMARY KEY,
    message_sid TEXT UNIQUE,
    inbound_sid TEXT REFERENCES inbound_messages(message_sid) ON DELETE CASCADE,
    part INTEGER,
    kind TEXT CHECK (kind IN ('text', 'voice')),
    status TEXT NOT NULL,
    status_rank INTEGER NOT NULL DEFAULT 0,
    error_code INTEGER,
    error_message TEXT,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    UNIQUE (inbound_sid, part)
);
