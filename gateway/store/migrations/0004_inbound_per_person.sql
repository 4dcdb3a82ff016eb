-- The queue holds a person's later messages back while an earlier one is unfinished:
-- that lookup goes by person.
CREATE INDEX inbound_person ON inbound_messages(person_id, status);
