"""Gannet's operator side: the admin HTTP API, dashboard and /metrics, and the
command-line tools (queue, trace, sendmail). Reads and acts on the queue only
through gannet.queue.store; never imported by the SMTP or delivery paths."""
