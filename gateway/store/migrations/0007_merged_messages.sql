-- A burst of messages from one person is answered in one turn: the messages that waited behind
-- the one answered point at it (their status is 'done'; the answer is the reply of that one).
ALTER TABLE inbound_messages ADD COLUMN merged_into TEXT
    REFERENCES inbound_messages(message_sid) ON DELETE CASCADE;
CREATE INDEX inbound_merged ON inbound_messages(merged_into) WHERE merged_into IS NOT NULL;
