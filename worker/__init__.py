"""invoice-relay: forward each distinct invoice PDF from a shared mailbox once."""
