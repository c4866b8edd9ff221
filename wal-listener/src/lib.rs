//! Logical-replication listener (pgoutput). Filled in by the wal-listener issue.
