"""Stand-ins for services outside this machine, speaking their own paths and payloads."""
