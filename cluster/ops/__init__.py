"""Operating the service on one machine (`tbml up/down/status`): processes, run state, auth, and the start/stop
of each piece (Redis, Ray head, actors, Serve). May import actors and ml (never cli)."""
