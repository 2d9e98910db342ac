"""Running the service: `cluster.ops` (start, stop and inspect it on one machine) and the training-job entry
point for `ray job submit`. May import deployments, actors and ml (never cli)."""
