-- Leads the clone takes (the save_lead tool), and the outbox that carries each save to the
-- CRM webhook. Ids are never reused (AUTOINCREMENT, as 0006 made the rule): an outbox id is
-- the CRM's idempotency key (X-Almada-Delivery), so it must never name another delivery.

-- One lead per conversation: a second save in the same conversation updates the row. A lead
-- outside any conversation (conversation_id NULL) is a row of its own each time.
CREATE TABLE leads (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    person_id INTEGER NOT NULL REFERENCES people(id) ON DELETE CASCADE,
    conversation_id INTEGER REFERENCES conversations(id) ON DELETE SET NULL,
    channel TEXT NOT NULL CHECK (channel IN ('call', 'whatsapp')),
    name TEXT NOT NULL,
    interest TEXT NOT NULL CHECK (interest IN ('advertising', 'digital_marketing', 'ai',
        'real_estate', 'agribusiness', 'other')),
    company TEXT,
    city TEXT,
    budget TEXT,
    timeline TEXT,
    notes TEXT,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
CREATE UNIQUE INDEX leads_conversation ON leads(conversation_id)
    WHERE conversation_id IS NOT NULL;
CREATE INDEX leads_person ON leads(person_id);

-- One row per save: the JSON body exactly as it is signed and sent. Delivered: delivered_at
-- set. Pending: not delivered, next_attempt_at says when it is due. Given up: not delivered
-- and next_attempt_at NULL (410 Gone, or still failing after the give-up window).
CREATE TABLE crm_outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    lead_id INTEGER NOT NULL REFERENCES leads(id) ON DELETE CASCADE,
    body TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at TEXT,
    delivered_at TEXT,
    last_error TEXT,
    created_at TEXT NOT NULL
);
CREATE INDEX crm_outbox_lead ON crm_outbox(lead_id, id);
CREATE INDEX crm_outbox_due ON crm_outbox(next_attempt_at) WHERE delivered_at IS NULL;
