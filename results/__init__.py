"""Results: the run-record store, the paper's reference tables and the report that sets them side by side."""
