"""Spot instances: where an instance reads EC2's interruption notice (the seam the tests point at loopback)."""

from __future__ import annotations

# The instance metadata service as an instance sees it; host.sh reads spot interruption notices there (IMDSv2).
IMDS = "http://169.254.169.254"
