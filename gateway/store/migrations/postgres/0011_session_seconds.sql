-- GPT-Live (VOICE_BACKEND=live) bills seconds of session, not tokens: a usage row of its
-- model carries them (SessionUsage.seconds), priced per minute in config/prices.toml.
ALTER TABLE usage ADD COLUMN session_seconds double precision NOT NULL DEFAULT 0;
