-- No change to the tables: ledger rows written from here on keep their
-- entries in a compact form (src/state/stored.rs) that an operator built
-- before it cannot read. Recorded as a migration so that such an operator
-- refuses this database (a migration it does not know) instead of taking
-- each compact row for a damaged one. Rows in the old form still read.
SELECT 1;
