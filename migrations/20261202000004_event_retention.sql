-- Retention of events and their runs (`events::retention`): old settled events are found by
-- their creation time. A BRIN index: a few pages for millions of rows, and next to no cost
-- on the insert path, because events are inserted in creation order.
CREATE INDEX event_records_created_brin ON event_records USING brin (created_at);
