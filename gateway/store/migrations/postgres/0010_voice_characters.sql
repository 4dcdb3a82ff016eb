-- ElevenLabs bills the characters it speaks (VOICE_PROVIDER=elevenlabs): a usage row of its
-- model carries them, priced per 1,000 characters in config/prices.toml.
ALTER TABLE usage ADD COLUMN characters integer NOT NULL DEFAULT 0;
