"""Load-balancing, z-, SimBal and cross-entropy losses (being written; see API_SPEC)."""
