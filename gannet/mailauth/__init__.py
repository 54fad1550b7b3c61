"""Mail authentication: SPF, DKIM, DMARC, ARC and Authentication-Results (inbound checks),
DKIM signing and ARC sealing (outbound), and `gannet doctor`."""
