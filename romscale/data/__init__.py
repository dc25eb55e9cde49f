"""Packaged text -> cleaned, de-duplicated corpus -> memory-mapped token shards (`romscale data`)."""
