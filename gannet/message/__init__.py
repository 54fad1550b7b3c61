"""Messages on their way in: envelope records, header edits, and the body spool."""
