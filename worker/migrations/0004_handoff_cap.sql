-- How many hand-offs the resume chain had before this run. Hand-offs are free (they do
-- not spend the resume budget) up to a cap, so a run that itself makes its leader step
-- down (blocking the event loop past the renew deadline, say) cannot flap leadership
-- for ever: past the cap a hand-off counts as a failed attempt.
ALTER TABLE runs ADD COLUMN handoffs int NOT NULL DEFAULT 0;
