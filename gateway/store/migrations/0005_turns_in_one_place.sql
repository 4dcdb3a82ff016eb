-- Turns are written in one place for every channel (Store._insert_turn, in the reply's own
-- transaction for WhatsApp), no longer by a trigger for WhatsApp and by Python for calls.
DROP TRIGGER whatsapp_reply_turns;

-- A call's greeting latency (media stream start -> first greeting frame) has its own column,
-- instead of riding in the first assistant turn's response_latency_ms, where it was inferred.
ALTER TABLE conversations ADD COLUMN greeting_latency_ms REAL;
UPDATE conversations SET greeting_latency_ms = (
    SELECT t.response_latency_ms FROM turns t
    WHERE t.conversation_id = conversations.id AND t.role = 'assistant' ORDER BY t.id LIMIT 1
) WHERE channel = 'call';
UPDATE turns SET response_latency_ms = NULL WHERE id IN (
    SELECT MIN(t.id) FROM turns t JOIN conversations c ON c.id = t.conversation_id
    WHERE c.channel = 'call' AND t.role = 'assistant' GROUP BY t.conversation_id
);
